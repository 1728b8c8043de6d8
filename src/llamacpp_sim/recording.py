"""What a simulated backend received, for tests to inspect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from llamacpp_sim.faults import Fault

Outcome = Literal["completed", "client_closed", "error", "fault"]


@dataclass(eq=False)
class RecordedRequest:
    """One HTTP request as received, and how it ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    arrived_at: float
    slot_id: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    outcome: Outcome | None = None
    status: int | None = None
    # The fault in force on arrival: switching faults never changes a request mid-way.
    fault: Fault | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


REC_KEY = web.RequestKey("sim_rec", RecordedRequest)
