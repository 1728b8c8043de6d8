"""Host-memory cache of evicted slot states, as llama-server's ``--cache-ram``.

When a slot is about to overwrite a state, the state is saved here; when a new prompt shares a
longer prefix with a saved state than with the slot's own cache, the saved state is restored into
the slot first. Entries are evicted least recently used first, bounded by their total tokens.
"""

from __future__ import annotations


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    # Binary search on slice equality: the comparisons run in C, which beats a Python loop for
    # the multi-thousand-token prompts of long conversations.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class HostCache:
    """LRU store of token sequences bounded by their total length."""

    def __init__(self, limit_tokens: int) -> None:
        self.limit_tokens = limit_tokens
        self._entries: list[list[int]] = []
        self.hits = 0

    @property
    def total_tokens(self) -> int:
        return sum(len(e) for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def save(self, tokens: list[int]) -> None:
        if not tokens or len(tokens) > self.limit_tokens:
            return
        for i, entry in enumerate(self._entries):
            if len(entry) >= len(tokens) and entry[: len(tokens)] == tokens:
                self._entries.append(self._entries.pop(i))
                return
        self._entries = [
            e for e in self._entries if not (len(e) < len(tokens) and tokens[: len(e)] == e)
        ]
        self._entries.append(list(tokens))
        while self.total_tokens > self.limit_tokens:
            self._entries.pop(0)

    def best(self, prompt: list[int], better_than: int) -> list[int] | None:
        """The saved state sharing the longest prefix with ``prompt``, if longer than given."""
        best_i, best_n = -1, better_than
        for i, entry in enumerate(self._entries):
            n = common_prefix_len(entry, prompt)
            if n > best_n:
                best_i, best_n = i, n
        if best_i < 0:
            return None
        entry = self._entries.pop(best_i)
        self._entries.append(entry)
        self.hits += 1
        return list(entry)
