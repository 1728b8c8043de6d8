"""Writing responses the way a broken server would: crash, stall, garbage, bad status line.

Every SSE frame written through ``SseWriter`` counts as one chunk for ``crash_after_chunks`` and
``stall_after_chunks``. A non-streamed answer counts as zero chunks: a crash or a stall happens
before any byte of it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import NoReturn

from aiohttp import web

from llamacpp_sim.faults import CrashMode, Fault
from llamacpp_sim.wire import SSE_HEADERS

GARBAGE = b"\x00\xff\xfe<<garbage>> \x1b[31m}{ not json, not sse \x07\r\n\xc3\x28"
BAD_STATUS_LINE = b"HTTP/1.1 2OO NOT-A-STATUS \xff\xfe\r\nServer llama.cpp\r\n\r\n"


async def forever() -> NoReturn:
    # The handler is cancelled by aiohttp when the connection drops, or by SimBackend.aclose().
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def break_connection(request: web.BaseRequest, mode: CrashMode) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if mode == "reset":
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger on with a zero timeout makes close() send RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def write_bad_status_line(request: web.BaseRequest) -> NoReturn:
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(BAD_STATUS_LINE)
        transport.close()
    await forever()


class SseWriter:
    """An SSE response that applies the crash and stall faults by chunk count."""

    def __init__(
        self,
        request: web.BaseRequest,
        fault: Fault | None,
        keepalive_s: float,
        on_fault: Callable[[], None],
        on_stall: Callable[[], None],
    ) -> None:
        self.request = request
        self.fault = fault
        self.keepalive_s = keepalive_s
        self.on_fault = on_fault
        self.on_stall = on_stall
        self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.chunks_sent = 0

    async def _prepare(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)

    async def send(self, frame: str) -> None:
        fault = self.fault
        if fault is not None:
            if (
                fault.crash_after_chunks is not None
                and self.chunks_sent >= fault.crash_after_chunks
            ):
                await self.crash(fault.crash_mode)
            if (
                fault.stall_after_chunks is not None
                and self.chunks_sent >= fault.stall_after_chunks
            ):
                await self.stall(fault.stall_keepalive)
        await self._prepare()
        await self.response.write(frame.encode("utf-8"))
        self.chunks_sent += 1

    async def send_data(self, payload: str) -> None:
        await self.send(f"data: {payload}\n\n")

    async def send_event(self, event: str, payload: str) -> None:
        await self.send(f"event: {event}\ndata: {payload}\n\n")

    async def finish(self) -> web.StreamResponse:
        await self._prepare()
        await self.response.write_eof()
        return self.response

    async def crash(self, mode: CrashMode) -> NoReturn:
        self.on_fault()
        break_connection(self.request, mode)
        await forever()

    async def stall(self, keepalive: bool) -> NoReturn:
        self.on_fault()
        self.on_stall()
        if not keepalive:
            await forever()
        await self._prepare()
        while True:
            await self.response.write(b": keep-alive\n\n")
            await asyncio.sleep(self.keepalive_s)
