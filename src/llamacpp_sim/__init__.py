"""A faithful llama-server simulator: slots, prompt cache, continuous batching and faults.

``SimBackend(SimConfig(...))`` serves one simulated llama-server on a real socket; the console
script ``llamacpp-ha-sim`` serves several from one process.
"""

from __future__ import annotations

from llamacpp_sim.config import SimConfig
from llamacpp_sim.faults import Fault
from llamacpp_sim.profiles import PROFILES, Profile
from llamacpp_sim.recording import RecordedRequest
from llamacpp_sim.server import SimBackend

__all__ = ["PROFILES", "Fault", "Profile", "RecordedRequest", "SimBackend", "SimConfig"]
