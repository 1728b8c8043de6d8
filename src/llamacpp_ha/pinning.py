"""Slot pinning (`id_slot`), only where it is safe.

llama-server honours a request's `id_slot`, but a request pinned to a busy slot waits in the
server's own queue while other slots idle, and one pinned to an empty slot skips the host-cache
restore. So a request is pinned only to a slot that is idle by our own count and whose recorded
content shares the request's prefix. What a slot holds is known only where we know which slot
served a request: a pinned one, or an answer that names its slot (`/completion` does). A
request that llama-server places itself may land on any idle slot, so it makes every record of
that backend's idle slots unreliable, and they are forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence

from .slot_ledger import SlotLedger

# Endpoints whose body llama-server reads `id_slot` from; `/v1/messages` ignores it.
PINNABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/completion"})


def _shared(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading keys two prompts share (keys are cumulative: equal at n, equal below)."""
    for depth in range(min(len(a), len(b)), 0, -1):
        if a[depth - 1] == b[depth - 1]:
            return depth
    return 0


class SlotPins:
    """Per backend, slot id -> the prefix keys of the prompt it last computed."""

    def __init__(self) -> None:
        self._contents: dict[str, dict[int, tuple[str, ...]]] = {}

    def choose(self, backend: str, ledger: SlotLedger, keys: Sequence[str]) -> int | None:
        """An idle slot of `backend` that holds a prefix of `keys`, or None."""
        contents = self._contents.get(backend)
        if not contents or not keys:
            return None
        claims = ledger.claims
        # A request we did not pin, or traffic around us, occupies a slot we cannot name:
        # then no slot is idle for certain.
        if ledger.external_busy or any(c.slot_id is None for c in claims):
            return None
        held = {c.slot_id for c in claims}
        best, depth = None, 0
        for slot, recorded in contents.items():
            if slot in held or slot >= ledger.total:
                continue
            shared = _shared(recorded, keys)
            if shared > depth:
                best, depth = slot, shared
        return best

    def placed_unpinned(self, backend: str) -> None:
        """llama-server picks the slot: any idle slot's content may be replaced."""
        self._contents.pop(backend, None)

    def computed(self, backend: str, slot: int, keys: Sequence[str]) -> None:
        """Slot `slot` of `backend` has just computed the prompt of `keys`."""
        if keys and slot >= 0:
            self._contents.setdefault(backend, {})[slot] = tuple(keys)

    def forget_backend(self, backend: str) -> None:
        self._contents.pop(backend, None)
