"""Connections below HTTP routing: request heads bounded in size and time, idle connections
closed, a cap on open connections and the open-file limit, over raw sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
import unittest
import unittest.mock
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn

from llamacpp_ha.config import build_config
from llamacpp_ha.connections import (
    WRITE_CHUNK,
    ConnectionGuard,
    ConnectionLimits,
    connection_room,
    raise_open_file_limit,
)
from llamacpp_sim import SimConfig
from serving import Served, balancer_for, sims
from sim_support import wait_until

MiB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set: the balancer under test runs in it."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def connect(lb: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = lb.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def get_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /health on a kept-alive connection; the status line and headers of its answer."""
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    return await read_answer(reader)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer with a Content-Length; its status line and headers."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return head


class HeadSizeTest(unittest.IsolatedAsyncioTestCase):
    async def test_endless_head_is_refused_early_and_memory_stays_bounded(self) -> None:
        openings = {
            "header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ",
            "url": b"GET /health?",
        }
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], max_header_size=8192) as lb,
        ):
            for name, opening in openings.items():
                with self.subTest(name):
                    reader, writer = await connect(lb)
                    answer = asyncio.create_task(reader.read(65536))
                    chunk = b"a" * 65536
                    baseline = peak = rss_bytes()
                    sent = 0
                    writer.write(opening)
                    # A client trying to send 50 MiB of one header (or of its URL).
                    while sent < 50 * MiB and not answer.done() and peak - baseline < 16 * MiB:
                        writer.write(chunk)
                        try:
                            async with asyncio.timeout(5):
                                await writer.drain()
                        except ConnectionError:
                            break
                        sent += len(chunk)
                        peak = max(peak, rss_bytes())
                    growth = (peak - baseline) / MiB
                    if not answer.done():
                        answer.cancel()
                        writer.close()
                        self.fail(
                            f"no answer after {sent / MiB:.0f} MiB; RSS grew {growth:.0f} MiB"
                        )
                    response = await answer
                    writer.close()
                    self.assertTrue(response.startswith(b"HTTP/1.1 431 "), response[:100])
                    self.assertIn(b"request_headers_too_large", response)
                    self.assertLess(growth, 8, f"RSS grew {growth:.1f} MiB")
                    self.assertLess(sent, 16 * MiB)
            # Everyone else was served all along, and still is.
            reader, writer = await connect(lb)
            self.assertIn(b" 200 ", await get_health(reader, writer))
            writer.close()

    async def test_heads_within_the_limit_pass_however_they_arrive(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], max_header_size=8192) as lb,
        ):
            reader, writer = await connect(lb)
            # 6 KiB of headers, 100 bytes a read; then two requests in one write, the first with
            # a body larger than the head limit: bodies do not count.
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 6000 + b"\r\n\r\n"
            for start in range(0, len(head), 100):
                writer.write(head[start : start + 100])
                await writer.drain()
            self.assertIn(b" 200 ", await read_answer(reader))
            body = b'{"prompt": "' + b"b" * 20_000 + b'"}'
            writer.write(
                b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )  # fmt: skip
            self.assertIn(b" 200 ", await read_answer(reader))
            self.assertIn(b" 200 ", await read_answer(reader))
            writer.close()


class SlowAndIdleTest(unittest.IsolatedAsyncioTestCase):
    async def test_trickled_head_is_cut_after_header_timeout(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], header_timeout_s=0.5, keepalive_timeout_s=30) as lb,
        ):
            for kept_alive in (False, True):
                with self.subTest(kept_alive=kept_alive):
                    reader, writer = await connect(lb)
                    if kept_alive:
                        self.assertIn(b" 200 ", await get_health(reader, writer))
                    answer = asyncio.create_task(reader.read())  # everything, until closed
                    started = time.monotonic()
                    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                    try:
                        async with asyncio.timeout(5):
                            while not answer.done():
                                writer.write(b"X-Trickle: 1\r\n")
                                # the client's pace: one header line every 0.1 s, or the answer
                                await asyncio.wait({answer}, timeout=0.1)
                    except TimeoutError:
                        self.fail("a client trickling its headers was never cut")
                    elapsed = time.monotonic() - started
                    writer.close()
                    self.assertTrue(answer.result().startswith(b"HTTP/1.1 408 "), answer.result())
                    self.assertGreaterEqual(elapsed, 0.5)
                    self.assertLess(elapsed, 3)

    async def test_a_body_trickled_after_its_answer_is_cut_too(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], header_timeout_s=0.5, keepalive_timeout_s=30) as lb,
        ):
            reader, writer = await connect(lb)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
            )
            self.assertIn(b" 413 ", await read_answer(reader))
            started = time.monotonic()
            closed = asyncio.create_task(reader.read())
            try:
                async with asyncio.timeout(5):
                    while not closed.done():
                        writer.write(b"x")
                        await asyncio.wait({closed}, timeout=0.1)  # the client's pace
            except TimeoutError:
                self.fail("a client trickling a body already answered was never cut")
            writer.close()
            self.assertLess(time.monotonic() - started, 3)

    async def test_idle_connections_are_closed(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], keepalive_timeout_s=0.5) as lb,
        ):
            for kept_alive in (False, True):
                with self.subTest(kept_alive=kept_alive):
                    reader, writer = await connect(lb)
                    if kept_alive:
                        self.assertIn(b" 200 ", await get_health(reader, writer))
                    started = time.monotonic()
                    try:
                        async with asyncio.timeout(5):
                            rest = await reader.read()
                    except TimeoutError:
                        self.fail("an idle connection was never closed")
                    elapsed = time.monotonic() - started
                    writer.close()
                    self.assertEqual(rest, b"")  # closed without a word: nothing was asked
                    self.assertGreaterEqual(elapsed, 0.4)
                    self.assertLess(elapsed, 3)


class MaxConnectionsTest(unittest.IsolatedAsyncioTestCase):
    async def test_connections_beyond_the_cap_get_503_while_the_others_are_served(self) -> None:
        async with (
            sims(SimConfig(slots=1, profile="test")) as (sim,),
            balancer_for([sim], max_connections=5, keepalive_timeout_s=30) as lb,
        ):
            held = [await connect(lb) for _ in range(5)]
            for reader, writer in held:
                self.assertIn(b" 200 ", await get_health(reader, writer))
            reader, writer = await connect(lb)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
                body = await reader.read()  # the whole answer, then the close
            writer.close()
            self.assertIn(b"retry-after: ", head.lower())
            self.assertIn(b"connection: close", head.lower())
            self.assertIn(b'"code": "too_many_connections"', body)
            for reader, writer in held:
                self.assertIn(b" 200 ", await get_health(reader, writer))
            # One leaves: a newcomer takes its place.
            reader, writer = held.pop()
            writer.close()
            await wait_until(lambda: lb.server.connection_guard.open == 4)
            reader, writer = await connect(lb)
            self.assertIn(b" 200 ", await get_health(reader, writer))
            for _, other in [*held, (reader, writer)]:
                other.close()


class OpenFileLimitTest(unittest.IsolatedAsyncioTestCase):
    async def test_soft_limit_is_raised_to_the_hard_limit_at_start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        try:
            async with sims(SimConfig(slots=1, profile="test")) as (sim,), balancer_for([sim]):
                self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    async def test_a_limit_that_cannot_be_raised_is_kept(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))

        def refuse(resource_id: int, limits: tuple[int, int]) -> None:
            raise ValueError("not allowed")  # as macOS answers for RLIM_INFINITY

        try:
            # setrlimit is the process boundary.
            with (
                unittest.mock.patch.object(resource, "setrlimit", refuse),
                self.assertLogs("llamacpp_ha.connections", logging.WARNING),
            ):
                self.assertEqual(raise_open_file_limit(), min(soft, 512))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_max_connections_fits_in_the_open_files(self) -> None:
        self.assertEqual(connection_room(1024), 768)
        self.assertEqual(connection_room(100), 50)
        self.assertEqual(connection_room(1_048_576), 1_048_320)
        config = build_config({"max_connections": 4096}, require_backends=False)
        guard = ConnectionGuard.from_config(config, max_header_size=lambda: 8192)
        guard.fit_open_files(None)
        self.assertEqual(guard.limits.max_connections, 4096)
        with self.assertLogs("llamacpp_ha.connections", logging.WARNING):
            guard.fit_open_files(1024)
        self.assertEqual(guard.limits.max_connections, 768)


class MalformedHttpTest(unittest.IsolatedAsyncioTestCase):
    async def test_what_the_parser_refuses_gets_a_json_400(self) -> None:
        async with sims(SimConfig(slots=1, profile="test")) as fleet, balancer_for(fleet) as lb:
            for request in (
                b"HELLO\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x7fb\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            ):
                reader, writer = await connect(lb)
                writer.write(request)
                async with asyncio.timeout(5):
                    answer = await reader.read()
                writer.close()
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertIn(b" 400 ", head.split(b"\r\n")[0], request)
                self.assertIn(b"content-type: application/json", head.lower(), request)
                self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")


class _ChunkApp:
    """A plain ASGI app that answers with what its request asks for, and records what
    `WRITE_CHUNK` returned: `/chunked` streams `n` chunks written directly, `/sized` answers
    with a Content-Length, `/stalled` writes directly until the client is behind."""

    def __init__(self) -> None:
        self.results: list[bool] = []
        self.done = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        write = scope["extensions"][WRITE_CHUNK]
        self.results.append(write(b"before the start"))
        path, sized = scope["path"], scope["path"] == "/sized"
        headers = [(b"content-length", b"4")] if sized else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if sized:
            self.results.append(write(b"body"))
            await send({"type": "http.response.body", "body": b"body"})
        elif path == "/stalled":  # a client that reads nothing: the socket's buffers fill
            written = 0
            while write(b"x" * 65536):
                written += 1
                assert written < 1_000, "the transport never paused"
            self.results.append(False)
            self.done.set()
            # send() waits for the client to catch up; here the client leaves instead.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            n = int(scope["query_string"].decode().partition("=")[2] or 3)
            for i in range(n):
                self.results.append(write(b"chunk %d;" % i))
            self.results.append(write(b""))  # nothing to write: no chunk, not the body's end
            await send({"type": "http.response.body", "body": b"end", "more_body": False})
        self.done.set()


@asynccontextmanager
async def _served_protocol(app: Any) -> AsyncIterator[str]:
    """`app` under uvicorn with our connection protocol, on a port of its own."""
    guard = ConnectionGuard(
        ConnectionLimits(
            max_connections=16,
            header_timeout_s=5.0,
            keepalive_timeout_s=5.0,
            max_header_size=lambda: 16384,
        )
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills soon when unread
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=guard.protocol, lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), within_s=10)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


class WriteChunkTest(unittest.IsolatedAsyncioTestCase):
    """`WRITE_CHUNK` writes a streamed body's chunks as uvicorn's `send` would, and declines
    (False) wherever `send` must decide instead."""

    async def test_chunks_written_directly_arrive_as_one_chunked_body(self) -> None:
        app = _ChunkApp()
        async with _served_protocol(app) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/chunked?n=3") as response:
                self.assertEqual(response.headers.get("Transfer-Encoding"), "chunked")
                body = await response.read()
            # The same connection serves the next request: the body ended where it should.
            async with http.get(url + "/chunked?n=1") as again:
                self.assertEqual(await again.read(), b"chunk 0;end")
        self.assertEqual(body, b"chunk 0;chunk 1;chunk 2;end")
        # Before the start: declined. Then every chunk, and the empty one, written.
        self.assertEqual(app.results, [False, True, True, True, True, False, True, True])

    async def test_a_sized_answer_or_a_head_request_is_left_to_send(self) -> None:
        app = _ChunkApp()
        async with _served_protocol(app) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/sized") as response:
                self.assertEqual(await response.read(), b"body")
            self.assertEqual(app.results, [False, False])
            app.results.clear()
            async with http.head(url + "/chunked?n=2") as response:
                self.assertEqual(await response.read(), b"")
            self.assertEqual(app.results, [False, False, False, False])

    async def test_a_client_that_does_not_read_makes_it_decline(self) -> None:
        app = _ChunkApp()
        async with _served_protocol(app) as url:
            host, port = url.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port), limit=1024)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # reads nothing until the app has given up
            writer.write(b"GET /stalled HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                await app.done.wait()
            self.assertEqual(app.results, [False, False])
            writer.close()
            await writer.wait_closed()
