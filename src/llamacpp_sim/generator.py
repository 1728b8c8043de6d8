"""Deterministic replies: the same prompt always yields the same words.

Every generated token is one short word followed by a space (the last one without), so the
reply tokenizes back to exactly the generated ids and the next turn's prompt hits the cache.
"""

from __future__ import annotations

import hashlib
import random
from array import array

_WORDS = (
    "the a of and to in is it that was he for on are as with his they at be this from have "
    "or by one had not but what all were when we there can an your which their said if do "
    "will each about how up out them then she many some so these would other into has more "
    "her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most "
    "know get through back much go good new write our me man too any day same right look "
    "think also around number great tell help must before home move try kind hand picture "
    "again change off play spell air away animal house point page letter mother answer found "
    "study still learn should world high every near add food between own below country plant "
    "last school father keep tree never start city earth eye light though head under story saw "
    "left few while along might close thing seem hard open begin life always those both paper "
    "slot cache token batch queue model prompt server stream"
)
# A word of more than six letters would tokenize as two pieces and break the one-word-per-token
# accounting, so only short words are kept.
_SHORT_WORDS = tuple(w for w in _WORDS.split() if len(w) <= 6)


def reply_pieces(prompt: list[int], n_tokens: int) -> list[str]:
    seed = hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(seed, "big"))
    words = [rng.choice(_SHORT_WORDS) for _ in range(n_tokens)]
    return [w + " " for w in words[:-1]] + words[-1:]
