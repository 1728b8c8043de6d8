"""What each backend probably holds of a prompt in its cache.

A prompt is summarised as cumulative hashes of its text (`PromptKeys`): one key at every
`BLOCK_BYTES` of the text, and one at the end of every chat message. Turn n+1 of a conversation
repeats turn n's messages, so it contains all of turn n's keys; two prompts that paste the same
document share the keys of its whole blocks, even inside one message. Each key knows how many
bytes of text it covers, which routing turns into tokens at each backend's measured ratio.

`CacheIndex` is the index of this process. It keeps, per backend, the prompts that backend has
computed, most recently used last, and bounds them by that backend's cache capacity in tokens
(its slots' context plus its host prompt cache, `--cache-ram`), evicting the least recently used
as llama-server does. A key maps to every backend that holds it, not to the last one: a hot
system prompt may live on several backends. What llama-server really reused
(`timings.cache_n`) corrects the index after every response (`correct()`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

BLOCK_BYTES = 256
# The smallest capacity an over-prediction may shrink a backend's estimate to, in tokens:
# below this the index would forget even the prompts in the backend's slots.
MIN_CAPACITY_TOKENS = 4096


@dataclass(frozen=True)
class PromptKeys:
    """A prompt's prefix keys and, for each, the bytes of prompt text it covers."""

    keys: tuple[str, ...] = ()
    ends: tuple[int, ...] = ()
    size: int = 0  # bytes of prompt text in all

    def __len__(self) -> int:
        return len(self.keys)


class _Hasher:
    """Cumulative keys over a stream of text: one per whole block and one per `close()`."""

    def __init__(self, seed: bytes) -> None:
        self._hash = hashlib.blake2b(seed, digest_size=16)
        self._offset = 0
        self.keys: list[str] = []
        self.ends: list[int] = []

    def feed(self, data: bytes) -> None:
        pos = 0
        while len(data) - pos >= (room := BLOCK_BYTES - self._offset % BLOCK_BYTES):
            self._hash.update(data[pos : pos + room])
            pos += room
            self._offset += room
            self._emit()
        if pos < len(data):
            self._hash.update(data[pos:])
            self._offset += len(data) - pos

    def close(self) -> None:
        """A message ends here: the next turn repeats it whole, so it is a key."""
        if self._offset and (not self.ends or self.ends[-1] != self._offset):
            self._emit()
        # A separator after each message, so that "ab" + "c" and "a" + "bc" differ.
        self._hash.update(b"\x1e")

    def _emit(self) -> None:
        self.keys.append(self._hash.hexdigest())
        self.ends.append(self._offset)

    def result(self) -> PromptKeys:
        return PromptKeys(tuple(self.keys), tuple(self.ends), self._offset)


def _text(content: Any) -> bytes:
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, list):  # content parts: text as text, anything else as its JSON
        return b"".join(
            part["text"].encode()
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else orjson.dumps(part, option=orjson.OPT_SORT_KEYS)
            for part in content
        )
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def prompt_keys(body: dict[str, Any]) -> PromptKeys:
    """The prefix keys of the prompt in an OpenAI, Anthropic or llama-server body."""
    hasher = _Hasher(str(body.get("model", "")).encode())
    messages = body.get("messages")
    if isinstance(messages, list):
        if "system" in body:  # Anthropic puts the system prompt beside the messages.
            hasher.feed(b"system\x1f" + _text(body["system"]))
            hasher.close()
        for message in messages:
            if isinstance(message, dict):
                rest = {k: v for k, v in message.items() if k not in ("role", "content")}
                hasher.feed(str(message.get("role", "")).encode() + b"\x1f")
                if rest:  # tool calls, names: part of what the template renders
                    hasher.feed(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS))
                hasher.feed(_text(message.get("content", "")))
            else:
                hasher.feed(_text(message))
            hasher.close()
        return hasher.result()
    prompt = body.get("prompt", body.get("content"))
    if isinstance(prompt, str):
        # Only whole blocks: the next turn's prompt extends this one past its last boundary.
        hasher.feed(prompt.encode())
    return hasher.result()


class PrefixIndex(Protocol):
    """What each backend probably holds of a prompt, as prefix keys."""

    def match(self, keys: Sequence[str]) -> dict[str, int]:
        """Backend name -> how many of `keys`, from the first, it holds (absent: none)."""
        ...

    def record(self, backend: str, keys: Sequence[str], tokens: int) -> None:
        """`backend` has just computed the prompt of `keys`, `tokens` tokens long."""
        ...

    def correct(self, backend: str, keys: Sequence[str], predicted: int, found: int) -> None:
        """`backend` was thought to hold `predicted` of `keys` and reused only `found`."""
        ...

    def set_capacity(self, backend: str, tokens: int) -> None: ...

    def forget_backend(self, backend: str) -> None: ...

    def configure(self, ttl_s: float, max_entries: int) -> None: ...


@dataclass(eq=False)
class _Prompt:
    keys: tuple[str, ...]
    tokens: int
    used_at: float


@dataclass(eq=False)
class _BackendCache:
    """One backend's prompts, least recently used first, and how many hold each key."""

    capacity: int  # what the backend can hold, in tokens (configured)
    estimate: int  # what it is believed to hold: the capacity, shrunk by over-predictions
    prompts: OrderedDict[str, _Prompt] = field(default_factory=OrderedDict)  # by last key
    refs: dict[str, int] = field(default_factory=dict)
    newest: dict[str, str] = field(default_factory=dict)  # key -> last key of its newest prompt
    used: int = 0


class CacheIndex:
    """A `PrefixIndex` in this process, bounded per backend like the backend's cache."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
        default_capacity: int = 1 << 20,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._default_capacity = default_capacity
        self._backends: dict[str, _BackendCache] = {}
        self._holders: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def configure(self, ttl_s: float, max_entries: int) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        for name in list(self._backends):
            self._evict(name)

    def set_capacity(self, backend: str, tokens: int) -> None:
        cache = self._cache(backend)
        if tokens != cache.capacity:
            cache.capacity = tokens
            cache.estimate = tokens
            self._evict(backend)

    def capacity(self, backend: str) -> tuple[int, int]:
        """(tokens held, tokens it is believed to hold at most) on `backend`."""
        cache = self._backends.get(backend)
        return (0, 0) if cache is None else (cache.used, cache.estimate)

    def match(self, keys: Sequence[str]) -> dict[str, int]:
        # Keys are cumulative, and a backend holds every key of each prompt it holds: who holds
        # a key also holds those before it, so the holders only grow toward the first key.
        # Each depth where they grow is found by a binary search, not by a step per key: a
        # long prompt has hundreds of keys, and a fleet only a few such depths.
        held: dict[str, int] = {}
        holders_of = self._holders.get
        backends = len(self._backends)
        top = len(keys)  # depths 1..top are still to look at
        while top and len(held) < backends:
            known = len(held)
            holders = holders_of(keys[top - 1])
            if holders is None or len(holders) <= known:
                # The deepest depth in 1..top whose holders are more than those found.
                lo, hi = 0, top - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    found = holders_of(keys[mid - 1])
                    if found is not None and len(found) > known:
                        lo = mid
                    else:
                        hi = mid - 1
                if not lo:
                    break
                top = lo
                holders = holders_of(keys[top - 1])
                assert holders is not None
            for backend in holders:
                held.setdefault(backend, top)
            top -= 1
        return held

    def record(self, backend: str, keys: Sequence[str], tokens: int) -> None:
        if not keys:
            return
        cache = self._cache(backend)
        keys = tuple(keys)
        # A prompt this one extends was in the slot that just computed this one: llama-server
        # extended it there rather than keep a second copy.
        for key in keys:
            if key in cache.prompts:
                self._drop(backend, cache, key)
        last = keys[-1]
        cache.prompts[last] = _Prompt(keys, max(tokens, 1), self._clock())
        cache.used += max(tokens, 1)
        for key in keys:
            cache.refs[key] = cache.refs.get(key, 0) + 1
            cache.newest[key] = last
            self._holders.setdefault(key, set()).add(backend)
        self._evict(backend)

    def correct(self, backend: str, keys: Sequence[str], predicted: int, found: int) -> None:
        cache = self._backends.get(backend)
        if cache is None or not 0 <= found < predicted <= len(keys):
            return
        last = cache.newest.get(keys[predicted - 1])
        if last is None or last not in cache.prompts:
            return
        newer = 0
        for name in reversed(cache.prompts):
            if name == last:
                break
            newer += cache.prompts[name].tokens
        # The prompt is gone from the backend. If as much was computed after it as the
        # backend is believed to hold, the backend holds less than that: shrink the estimate.
        # A recent prompt that was not reused says nothing of the capacity (llama-server
        # declines to restore a long cached prompt for a short shared prefix).
        self._drop(backend, cache, last)
        if newer >= cache.estimate // 2:
            cache.estimate = max(MIN_CAPACITY_TOKENS, newer)
            self._evict(backend)

    def regain(self, backend: str) -> None:
        """A prediction fell short of what was reused: let the estimate grow back."""
        cache = self._backends.get(backend)
        if cache is not None and cache.estimate < cache.capacity:
            cache.estimate = min(cache.capacity, cache.estimate + cache.estimate // 4 + 1)

    def forget_backend(self, backend: str) -> None:
        cache = self._backends.pop(backend, None)
        if cache is None:
            return
        for key in cache.refs:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(backend)
                if not holders:
                    del self._holders[key]

    def _cache(self, backend: str) -> _BackendCache:
        cache = self._backends.get(backend)
        if cache is None:
            capacity = self._default_capacity
            cache = self._backends[backend] = _BackendCache(capacity, capacity)
        return cache

    def _drop(self, backend: str, cache: _BackendCache, last: str) -> None:
        prompt = cache.prompts.pop(last)
        cache.used -= prompt.tokens
        for key in prompt.keys:
            left = cache.refs[key] - 1
            if left:
                cache.refs[key] = left
                continue
            del cache.refs[key]
            cache.newest.pop(key, None)
            holders = self._holders[key]
            holders.discard(backend)
            if not holders:
                del self._holders[key]

    def _evict(self, backend: str) -> None:
        cache = self._backends[backend]
        expired = self._clock() - self._ttl_s
        while cache.prompts:
            last, oldest = next(iter(cache.prompts.items()))
            if (
                cache.used <= cache.estimate
                and len(self._holders) <= self._max_entries
                and oldest.used_at > expired
            ):
                break
            self._drop(backend, cache, last)
