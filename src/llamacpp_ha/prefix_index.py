"""Which backend probably holds a prompt's prefix in its cache.

A request's prompt is summarised as cumulative SHA-256 keys: one per chat message (so turn n+1,
which repeats turn n's messages and adds more, contains all of turn n's keys), or one per
`BLOCK_BYTES` of a plain prompt. After a backend serves a request we record every key of it.
`PrefixIndex.match()` says, for a new request, how many of its leading keys each backend holds;
the backend with the longest match is where the longest part of its prompt was last computed:
a conversation's earlier turn, or another conversation with the same system prompt or document.

`SessionStore` is the index in this process: each key remembers the last backend that computed
it. Entries expire `ttl_s` after their last use; it holds at most `max_entries` keys (least
recently used go first).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

BLOCK_BYTES = 256


def prefix_keys(body: dict[str, Any]) -> tuple[str, ...]:
    """Cumulative prefix hashes of the prompt in an OpenAI, Anthropic or llama-server body."""
    hasher = hashlib.sha256(str(body.get("model", "")).encode())
    keys: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[Any] = []
        if "system" in body:  # Anthropic puts the system prompt beside the messages.
            parts.append({"role": "system", "content": body["system"]})
        parts.extend(messages)
        for part in parts:
            hasher.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
            hasher.update(b"\x1e")
            keys.append(hasher.hexdigest())
        return tuple(keys)
    prompt = body.get("prompt", body.get("content"))
    if isinstance(prompt, str):
        data = prompt.encode()
        # Only whole blocks: the next turn's prompt extends this one past its last boundary.
        for start in range(0, len(data) - BLOCK_BYTES + 1, BLOCK_BYTES):
            hasher.update(data[start : start + BLOCK_BYTES])
            keys.append(hasher.hexdigest())
    return tuple(keys)


class PrefixIndex(Protocol):
    """What each backend probably holds of a prompt, as prefix keys."""

    def match(self, keys: Sequence[str]) -> dict[str, int]:
        """Backend name -> how many of `keys`, from the first, it holds (absent: none)."""
        ...

    def record(self, keys: Sequence[str], backend: str) -> None:
        """`backend` has just computed the prompt of `keys`."""
        ...

    def forget_backend(self, backend: str) -> None: ...

    def configure(self, ttl_s: float, max_entries: int) -> None: ...


class SessionStore:
    """Prefix key → backend name, with TTL and a size bound (least recently used goes first)."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, ttl_s: float, max_entries: int) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._evict()

    def match(self, keys: Sequence[str]) -> dict[str, int]:
        now = self._clock()
        held: dict[str, int] = {}
        for depth in range(len(keys), 0, -1):
            found = self._entries.get(keys[depth - 1])
            if found is None:
                continue
            backend, expires_at = found
            if expires_at <= now:
                del self._entries[keys[depth - 1]]
                continue
            held.setdefault(backend, depth)
        return held

    def lookup(self, keys: Sequence[str]) -> str | None:
        """The backend of the longest key of `keys` on record."""
        held = self.match(keys)
        return max(held, key=held.__getitem__) if held else None

    def record(self, keys: Sequence[str], backend: str) -> None:
        expires_at = self._clock() + self._ttl_s
        for key in keys:
            self._entries[key] = (backend, expires_at)
            self._entries.move_to_end(key)
        self._evict()

    def forget_backend(self, backend: str) -> None:
        for key in [k for k, (b, _) in self._entries.items() if b == backend]:
            del self._entries[key]

    def _evict(self) -> None:
        now = self._clock()
        while self._entries:
            key, (_, expires_at) = next(iter(self._entries.items()))
            if len(self._entries) <= self._max_entries and expires_at > now:
                break
            del self._entries[key]
