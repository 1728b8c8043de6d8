"""Slot pinning (`id_slot`), only where it is safe.

llama-server honours a request's `id_slot`, but a request pinned to a busy slot waits in the
server's own queue while other slots idle, and one pinned to an empty slot skips the host-cache
restore. So a request is pinned only to a slot that is idle by our own count, whose content (as
the backend's cache shadow, `server_cache.py`, has it) shares the request's prefix, and only
when that reuses at least as much as the slot llama-server would pick itself: the pin then makes
the choice explicit, whatever the server's own similarity setting. Never while traffic that
reaches the backend around us holds a slot we cannot name.
"""

from __future__ import annotations

from .server_cache import CachedPrompt, ServerCaches
from .slot_ledger import SlotLedger

# Endpoints whose body llama-server reads `id_slot` from; `/v1/messages` ignores it.
PINNABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/completion"})


def choose_slot(caches: ServerCaches, ledger: SlotLedger, prompt: CachedPrompt) -> int | None:
    """The slot to pin `prompt` to on this backend, or None to let llama-server choose."""
    if ledger.external_busy or not prompt.keys:
        return None
    held = {c.lands_on for c in ledger.claims}
    best, shared = None, 0
    for slot in caches.slots:
        if slot.busy or slot.id in held or not slot.prompt.length:
            continue
        here = slot.prompt.shared(prompt)
        if here > shared:
            best, shared = slot.id, here
    if best is None:
        return None
    pinned, free_choice = caches.predict(prompt, best), caches.predict(prompt)
    if pinned is None or free_choice is None or pinned.reused < free_choice.reused:
        return None
    return best
