"""Server-sent events as the relay needs them: whole events, and whether the stream ended well.

`EventFramer` is fed the body as it arrives and hands back only complete events (everything up
to the last blank line), so a client never receives half an event, and an error event sent
after a cut starts on a line of its own. It checks each event's JSON (a backend that garbles an
event is at fault, not the client's parser), keeps the last `usage`/`timings` it saw, and at the
end says whether the stream reached the end its protocol promises (llama-server 0.3.36,
`server-context.cpp`: OpenAI-style streams end with `data: [DONE]`; the native `/completion`
with an event whose `stop` is true; Anthropic's `/v1/messages` with `message_stop`). A stream
that stops short of it was truncated, however cleanly its connection closed.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Protocol

import orjson

from .usage import Usage, from_answer


class StreamEnd(Enum):
    """The event that ends a stream of a given protocol."""

    DONE = "data: [DONE]"
    STOP = 'an event with "stop": true'
    MESSAGE_STOP = "a message_stop event"


END_BY_PATH = {
    "/v1/chat/completions": StreamEnd.DONE,
    "/v1/completions": StreamEnd.DONE,
    "/completion": StreamEnd.STOP,
    "/completions": StreamEnd.STOP,
    "/infill": StreamEnd.STOP,
    "/v1/messages": StreamEnd.MESSAGE_STOP,
}

# An event ends at a blank line; llama-server writes "\n\n", others may use CRLF.
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class BadStream(Exception):
    """The stream broke its protocol; the message says how, without quoting it."""


class EventReader(Protocol):
    """What reads a stream's good events as they are framed (`resume.Transcript`)."""

    def read(self, event: dict[str, Any] | None) -> None:
        """A good event's JSON (None for `[DONE]`): the one parse serves both."""

    def read_text(self, text: str) -> None:
        """A chat token's text, from an event known by its bytes to be of the shape that every
        token of the stream so far had (`_TokenShape`): its text is all that differs."""


class _TokenShape:
    """A chat stream's token event as its backend writes them: `head`, then the token's text as
    a JSON string, then `tail`. llama-server writes each token of a stream with the same bytes
    around the text (the same id, created, model), so an event whose data is `head`, one JSON
    string and `tail` is valid JSON of the same shape, a token and nothing more: parsing the
    string alone checks it whole, at a fraction of the cost of parsing the event."""

    __slots__ = ("head", "shortest", "tail", "tail_at")

    def __init__(self, head: bytes, tail: bytes) -> None:
        self.head = head
        self.tail = tail
        self.tail_at = -len(tail)
        self.shortest = len(head) + len(tail) + 2  # the text "", its two quotes

    @classmethod
    def of(cls, data: bytes, event: dict[str, Any]) -> _TokenShape | None:
        """The shape of `event` (parsed from `data`) if it is a token: one choice, not
        finished, whose delta is its text only; None for any other event."""
        # Where the text is written: after the only `"delta":{"content":` (none can be in a
        # string, where quotes are escaped), exactly as orjson would write it; a backend that
        # writes it otherwise (spaces, other escapes) just has every event parsed. Looked for
        # first: one search turns away the events around the tokens (role, finish, usage).
        at = data.find(_TOKEN_KEY)
        if at < 0 or "usage" in event or "timings" in event:
            return None
        choices = event.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return None
        text = delta.get("content")
        if type(text) is not str:
            return None
        if data.rfind(_TOKEN_KEY) != at:
            return None
        start = at + len(_TOKEN_KEY)
        written = orjson.dumps(text)
        if data[start : start + len(written)] != written:
            return None
        return cls(data[:start], data[start + len(written) :])

    def text(self, data: bytes) -> str | None:
        """The token's text if `data` is an event of this shape; None otherwise (it may still
        be good JSON, of another shape)."""
        if len(data) < self.shortest or not data.startswith(self.head):
            return None
        if not data.endswith(self.tail):
            return None
        try:
            text = orjson.loads(data[len(self.head) : self.tail_at])
        except orjson.JSONDecodeError:
            return None
        return text if type(text) is str else None


_TOKEN_KEY = b'"delta":{"content":'
# Events parsed whole that a stream looks at for a token's shape without a token of that shape
# coming, before it stops looking: a backend whose tokens differ in more than their text (a
# counter, timings), or that writes them otherwise, would pay for the look at each one. One
# that matches is looked at again (llama-server's `created` moves on every second).
_SHAPE_TRIES = 8


class EventFramer:
    """`reader`, when given, reads every good event as it is framed (`EventReader`)."""

    def __init__(self, end: StreamEnd | None, reader: EventReader | None = None) -> None:
        self._end = end
        # Compared for every event: booleans, as a member lookup on an Enum class costs
        # several times more before Python 3.12.
        self._ends_done = end is StreamEnd.DONE
        self._ends_stop = end is StreamEnd.STOP
        self._ends_message_stop = end is StreamEnd.MESSAGE_STOP
        self._reader = reader
        # A chat token's shape, learned from the last one parsed whole (OpenAI-style only).
        self._token: _TokenShape | None = None
        self._shape_tries = _SHAPE_TRIES if self._ends_done else 0
        self._pending = b""
        self.ended = end is None  # a protocol without a promised end ends whenever it stops
        self._usage_event: dict[str, Any] | None = None
        # Set once an event broke the protocol; everything before it was good and is relayed.
        self.fault: BadStream | None = None

    @property
    def usage(self) -> Usage:
        return from_answer(self._usage_event)

    def feed(self, chunk: bytes) -> bytes:
        """The complete, good events now available (b"" if none). After an event that breaks
        the protocol, `fault` says how, and nothing more is returned."""
        if self.fault is not None:
            return b""
        if (
            not self._pending
            and chunk[-1:] == b"\n"
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.startswith(b"data: ")
            and chunk.find(b"\r") < 0
        ):
            # One event of one data line, all of the chunk: what llama-server sends for each
            # token, so the most frequent path of all, without the split and the line checks.
            try:
                self._data(chunk[6:-2])
            except BadStream as fault:
                self.fault = fault
                return b""
            return chunk
        data = self._pending + chunk if self._pending else chunk
        # find(), not `in`: before Python 3.12, `bytes in bytes` first tries the operand as an
        # integer and formats the TypeError it then discards (~1,900 instructions a test).
        if data.find(b"\r") >= 0:
            return self._feed_crlf(data)
        # llama-server's own framing, "\n\n" only: split, with no regular expression.
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            self._pending = data
            return b""
        complete, self._pending = data[:end], data[end:]
        start = 0
        for event in complete[:-2].split(b"\n\n"):
            try:
                self._check(event)
            except BadStream as fault:
                self.fault = fault
                return complete[:start]
            start += len(event) + 2
        return complete

    def _feed_crlf(self, data: bytes) -> bytes:
        end = max(_after(data, b"\n\n"), _after(data, b"\r\n\r\n"))
        if not end:
            self._pending = data
            return b""
        complete, self._pending = data[:end], data[end:]
        start = 0
        for boundary in _EVENT_END.finditer(complete):
            try:
                self._check(complete[start : boundary.start()])
            except BadStream as fault:
                self.fault = fault
                return complete[:start]
            start = boundary.end()
        return complete

    def finish(self) -> None:
        """The stream is over: raise BadStream unless it ended as its protocol promises."""
        if self.fault is not None:
            raise self.fault
        if self._pending.strip():
            raise BadStream("the stream ended in the middle of an event")
        if not self.ended:
            assert self._end is not None
            raise BadStream(f"the stream ended before {self._end.value}")

    def _check(self, event: bytes) -> None:
        name = b""
        if event.startswith(b"data: ") and event.find(b"\n") < 0:  # find(): see feed()
            payload = event[6:]  # one data line: nearly every event of every backend
        else:
            data: list[bytes] = []
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif line.startswith(b"event:"):
                    name = line[6:].strip()
            if not data:
                return  # a comment (keep-alive) or a field we do not use
            payload = b"\n".join(data)
        self._data(payload, name)

    def _data(self, payload: bytes, name: bytes = b"") -> None:
        """One event's data (and its `event:` name)."""
        if payload == b"[DONE]":
            if self._ends_done:
                self.ended = True
            if self._reader is not None:
                self._reader.read(None)
            return
        token = self._token
        if token is not None:
            text = token.text(payload)
            if text is not None:
                self._shape_tries = _SHAPE_TRIES  # it pays: look again when it stops matching
                if self._reader is not None:
                    self._reader.read_text(text)
                return
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise BadStream("an event's data is not JSON") from None
        if not isinstance(parsed, dict):
            return
        if self._reader is not None:
            self._reader.read(parsed)
        if self._shape_tries:
            self._shape_tries -= 1
            self._token = _TokenShape.of(payload, parsed) or self._token
        if "usage" in parsed or "timings" in parsed:
            self._usage_event = parsed
        if self._ends_stop:
            self.ended = self.ended or parsed.get("stop") is True
        elif self._ends_message_stop:
            stop = name == b"message_stop" or parsed.get("type") == "message_stop"
            self.ended = self.ended or stop


def _after(data: bytes, separator: bytes) -> int:
    """Where the data after the last `separator` starts; 0 if there is none."""
    at = data.rfind(separator)
    return at + len(separator) if at >= 0 else 0
