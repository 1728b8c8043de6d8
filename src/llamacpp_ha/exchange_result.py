"""`ExchangeResult`: what one proxied request did, for stats, metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass, field

from .usage import Usage


# Slotted: every open stream holds one.
@dataclass(slots=True)
class ExchangeResult:
    """Filled in as the exchange goes; read once it has been released."""

    endpoint: str = ""
    model: str | None = None
    request_id: str | None = None
    key_id: str | None = None
    backend: str | None = None
    status: int = 0
    queue_wait_s: float = 0.0
    # Until the response's first byte left for the client: for a stream its first event, for
    # a JSON answer the whole answer (it is sent in one piece once the backend is done).
    ttfb_s: float | None = None
    total_s: float = 0.0
    attempts: int = 0
    client_disconnected: bool = False
    error: str | None = None
    error_code: str | None = None
    mid_stream: bool = False  # the failure came after the response had started
    resumed: int = 0  # times the stream went on from another backend after one broke it
    resume_refused: str | None = None  # why a broken stream was not continued
    usage: Usage = field(default_factory=Usage)
