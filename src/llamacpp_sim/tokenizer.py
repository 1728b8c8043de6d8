"""Deterministic word-piece tokenizer.

A piece is a run of up to six letters, or any other non-space character, each taking one
following space along; every other whitespace character is a piece of its own. Because a piece
never reaches back across a newline or a space it has not consumed, ``tokenize(a + b) ==
tokenize(a) + tokenize(b)`` whenever ``a`` ends in whitespace or ``b`` starts with a newline:
exactly the message boundaries of the chat template, so turn n+1's prompt extends turn n's
prompt plus its reply, token for token. About one token per English word, like a real BPE.
"""

from __future__ import annotations

import hashlib
import re

_PIECE = re.compile(r"[^\W\d_]{1,6} ?|\S ?|\s")

BOS_ID = 1
EOS_ID = 2
_HASHED_BASE = 256
_HASHED_SPAN = 1 << 24
N_VOCAB = _HASHED_BASE + _HASHED_SPAN
BOS_PIECE = "<|bos|>"
EOS_PIECE = "<|eos|>"
_MAX_REMEMBERED = 1 << 20


class Tokenizer:
    """Maps text to token ids and back; ids are stable across processes and backends."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {BOS_ID: BOS_PIECE, EOS_ID: EOS_PIECE}

    def piece_id(self, piece: str) -> int:
        known = self._ids.get(piece)
        if known is not None:
            return known
        if len(piece) == 1 and 2 < ord(piece) < _HASHED_BASE:
            token = ord(piece)
        else:
            digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=4).digest()
            token = _HASHED_BASE + int.from_bytes(digest, "big") % _HASHED_SPAN
        if len(self._ids) >= _MAX_REMEMBERED:
            # Bounded memory on long runs; ids stay stable, only /detokenize forgets.
            self._ids.clear()
            self._pieces = {BOS_ID: BOS_PIECE, EOS_ID: EOS_PIECE}
        self._ids[piece] = token
        self._pieces.setdefault(token, piece)
        return token

    def pieces(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.piece_id(p) for p in _PIECE.findall(text)]
        return [BOS_ID, *ids] if add_bos else ids

    def piece(self, token: int) -> str:
        found = self._pieces.get(token)
        if found is not None:
            return found
        if 2 < token < _HASHED_BASE:
            return chr(token)
        return ""

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(self.piece(t) for t in tokens if t not in (BOS_ID, EOS_ID))
