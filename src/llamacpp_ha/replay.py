"""What other replicas sent, replayed into this replica's routing state.

Each replica announces the requests it sends (the prompt's keys and token counts, the slot it
pinned) and what their answers said; `RoutingReplay` applies them here as if they were ours:
the prefix index learns that the backend holds the prompt, and our shadow of that backend's
caches (`server_cache.py`) launches, answers and releases the request on the slot llama-server's
rules give it. So a conversation whose last turn went through another replica is routed to the
backend that cached it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .prefix_index import PrefixIndex
from .registry import BackendState
from .server_cache import CachedPrompt

# Requests of replicas that stopped announcing their ends are forgotten beyond this many.
_MAX_REMEMBERED = 10_000


@dataclass
class _Remote:
    """A request another replica sent: where our shadow of that backend put it."""

    backend: BackendState
    slot: int | None
    prompt: CachedPrompt


class RoutingReplay:
    def __init__(self, index: PrefixIndex, find: Callable[[str], BackendState | None]) -> None:
        self._index = index
        self._find = find
        self._sent: dict[tuple[str, str], _Remote] = {}  # (replica, lease) -> where it went

    def sent(
        self,
        replica: str,
        lease_id: str,
        backend_name: str,
        keys: list[str],
        tokens_at: list[int],
        length: int,
        slot_id: int | None,
    ) -> None:
        backend = self._find(backend_name)
        if backend is None or not keys:
            return
        prompt = CachedPrompt(tuple(keys), tuple(tokens_at), int(length))
        self._index.record(backend_name, prompt.keys, prompt.length)
        prediction = backend.caches.launch(prompt, slot_id)
        if len(self._sent) >= _MAX_REMEMBERED:
            self._sent.pop(next(iter(self._sent)))
        slot = prediction.slot if prediction is not None else None
        self._sent[(replica, lease_id)] = _Remote(backend, slot, prompt)

    def answered(
        self,
        replica: str,
        lease_id: str,
        backend_name: str,
        keys: list[str],
        tokens: int,
        generated: int,
    ) -> None:
        if self._find(backend_name) is None:
            return
        self._index.record(backend_name, tuple(keys), int(tokens))
        remote = self._sent.get((replica, lease_id))
        if remote is not None and remote.slot is not None:
            remote.backend.caches.answered(remote.slot, remote.prompt, int(generated))

    def done(self, replica: str, lease_id: str) -> None:
        remote = self._sent.pop((replica, lease_id), None)
        if remote is not None and remote.slot is not None:
            remote.backend.caches.release(remote.slot, time.monotonic())

    def forget(self, replicas: Iterable[str]) -> None:
        """Replicas that stopped: what they had sent will not be announced as done."""
        gone = set(replicas)
        for key in [k for k in self._sent if k[0] in gone]:
            self.done(*key)
