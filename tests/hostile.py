"""A hostile llama-server: a real HTTP server on a real socket that misbehaves byte by byte.

It answers the balancer's polls like llama-server (`/health`, `/v1/models`, `/slots`, `/props`),
with `/slots` saying whatever the test sets, and answers every other request with the next
`Script`: any status and body, framed by chunks, by length or by closing the connection, cut
or stalled after any number of body bytes. Written on asyncio streams rather than a web
framework so that nothing tidies up what a test asks it to break.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Script:
    """One answer: what to send, how to frame it, and where to break off."""

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"
    framing: Literal["chunked", "length", "close"] = "chunked"
    # Stop after this many body bytes: "cut" closes the connection, "stall" keeps it open.
    stop_at: int | None = None
    stop: Literal["cut", "stall"] = "cut"
    # Body bytes per write (each is a chunk when framing is "chunked").
    write_size: int = 16


def sse(*events: object, done: bool = True) -> bytes:
    """OpenAI-style events, each a JSON object (or a raw string sent as it is)."""
    out = b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )
    return out + (b"data: [DONE]\n\n" if done else b"")


def chat_chunks(count: int, finish: bool = True) -> list[dict[str, object]]:
    chunks: list[dict[str, object]] = [
        {"id": "c1", "object": "chat.completion.chunk", "model": "m", "created": 1,
         "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
        for i in range(count)
    ]  # fmt: skip
    if finish:
        chunks.append(
            {"id": "c1", "object": "chat.completion.chunk", "model": "m", "created": 1,
             "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        )  # fmt: skip
    return chunks


@dataclass
class HostileBackend:
    scripts: list[Script] = field(default_factory=list)
    slots: int = 2
    busy_slots: int = 0  # what /slots claims is processing, true or not
    served: list[str] = field(default_factory=list)  # paths of the scripted requests
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def __aenter__(self) -> HostileBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def _slots(self) -> list[dict[str, object]]:
        return [
            {"id": i, "n_ctx": 4096, "is_processing": i < self.busy_slots}
            for i in range(self.slots)
        ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                path = target.split("?")[0]
                if method == "GET" and path in _POLLS:
                    await _send(writer, Script(json.dumps(_POLLS[path](self)).encode(),
                                               content_type="application/json",
                                               framing="length"))  # fmt: skip
                    continue
                self.served.append(path)
                script = self.scripts.pop(0) if self.scripts else _NOT_SCRIPTED
                if not await _send(writer, script):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


_POLLS: dict[str, Callable[[HostileBackend], object]] = {
    "/health": lambda b: {"status": "ok"},
    "/v1/models": lambda b: {"object": "list", "data": [{"id": "m", "object": "model"}]},
    "/slots": lambda b: b._slots(),
    "/props": lambda b: {"total_slots": b.slots},
}
_NOT_SCRIPTED = Script(
    b'{"error":{"message":"no script","type":"server_error","code":500}}',
    status=500,
    content_type="application/json",
    framing="length",
)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _send(writer: asyncio.StreamWriter, script: Script) -> bool:
    """Write the answer; False when the connection must not be used again."""
    body = script.body
    head = [f"HTTP/1.1 {script.status} X", f"Content-Type: {script.content_type}"]
    if script.framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    elif script.framing == "length":
        head.append(f"Content-Length: {len(body)}")
    else:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    for piece in _pieces(body, script.write_size):
        if script.stop_at is not None and sent + len(piece) > script.stop_at:
            piece = piece[: script.stop_at - sent]
            if piece:
                writer.write(_frame(piece, script))
            await writer.drain()
            if script.stop == "stall":
                await writer.wait_closed()  # until the balancer gives up and closes
            writer.transport.abort()
            return False
        writer.write(_frame(piece, script))
        await writer.drain()
        sent += len(piece)
    if script.framing == "chunked":
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    return script.framing != "close"


def _frame(piece: bytes, script: Script) -> bytes:
    if script.framing != "chunked":
        return piece
    return f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
