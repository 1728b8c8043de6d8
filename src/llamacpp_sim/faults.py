"""Faults a simulated backend can be told to show, at start-up or through ``/sim/control``.

Durations are model seconds, divided by the backend's time scale like every other duration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

CrashMode = Literal["close", "reset"]


@dataclass(frozen=True)
class Fault:
    """What to break; every field off by default, several may be combined."""

    loading_s: float = 0.0
    error_500: bool = False
    crash_after_chunks: int | None = None
    crash_mode: CrashMode = "close"
    stall_after_chunks: int | None = None
    stall_keepalive: bool = False
    hang: bool = False
    hang_health: bool = False
    garbage: bool = False
    garbage_status_line: bool = False
    health_delay_s: float = 0.0
    slots_lie: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Fault | None:
        """Parse a control-endpoint body; ``null`` or ``{}`` clears the fault."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError("the fault must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        if not data:
            return None
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = _check(name, value)
        return cls(**values)


_BOOL_FIELDS = {
    "error_500",
    "stall_keepalive",
    "hang",
    "hang_health",
    "garbage",
    "garbage_status_line",
    "slots_lie",
}
_SECONDS_FIELDS = {"loading_s", "health_delay_s"}
_CHUNK_FIELDS = {"crash_after_chunks", "stall_after_chunks"}


def _check(name: str, value: Any) -> Any:
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name in _SECONDS_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number of seconds >= 0")
        return float(value)
    if name in _CHUNK_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 or null")
        return value
    if value not in ("close", "reset"):
        raise ValueError("crash_mode must be 'close' or 'reset'")
    return value
