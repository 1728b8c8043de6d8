"""A faithful llama-server simulator: slots, prompt cache, continuous batching and faults.

``SimBackend(SimConfig(...))`` serves one simulated llama-server on a real socket in the caller's
event loop; the console script ``llamacpp-ha-sim`` (``python -m llamacpp_sim``) serves several
from one process, and ``spawn()`` starts that process and returns once its backends listen.
"""

from __future__ import annotations

from llamacpp_sim.config import SimConfig
from llamacpp_sim.faults import Fault
from llamacpp_sim.profiles import PROFILES, Profile
from llamacpp_sim.recording import RecordedRequest
from llamacpp_sim.router import SimRouter
from llamacpp_sim.server import SimBackend
from llamacpp_sim.spawn import SimProcess, SpawnedBackend, SpawnError, spawn

__all__ = [
    "PROFILES",
    "Fault",
    "Profile",
    "RecordedRequest",
    "SimBackend",
    "SimConfig",
    "SimProcess",
    "SimRouter",
    "SpawnError",
    "SpawnedBackend",
    "spawn",
]
