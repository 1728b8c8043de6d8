"""Our HTTP/1.1 connections to backends (`backend_connections.py`) against a raw socket
server that sends exactly the bytes a test gives it: framing, reuse, back-pressure, faults."""

from __future__ import annotations

import asyncio
import unittest
from collections.abc import Awaitable, Callable

from llamacpp_ha.backend_connections import (
    BadResponse,
    BodyBroken,
    ClosedEarly,
    ConnectFailed,
    NoAnswer,
    Pool,
    Response,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def read_all(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


class BackendConnectionsTest(unittest.IsolatedAsyncioTestCase):
    async def serve(self, handler: Handler) -> str:
        """A server calling `handler` for each connection; its URL. Counts connections."""
        self.connections = 0
        writers: set[asyncio.StreamWriter] = set()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writers.add(writer)
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        async def stop() -> None:
            # From 3.12 on, wait_closed waits for every connection's handler, and a handler
            # reading to EOF would wait for the pool's idle connection: close them here.
            server.close()
            for writer in writers:
                writer.close()
            await server.wait_closed()

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        self.addAsyncCleanup(stop)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def pool(self, idle_s: float = 4.0) -> Pool:
        pool = Pool(idle_s=idle_s)
        self.addCleanup(pool.close)
        return pool

    async def request(self, pool: Pool, url: str, body: bytes = b"{}") -> Response:
        return await pool.request(
            "POST",
            url,
            [("Content-Type", "application/json")],
            body,
            tls=False,
            connect_s=2,
            first_byte_s=5,
        )

    async def test_requests_are_written_whole_and_answers_read_by_length(self) -> None:
        seen: list[tuple[bytes, bytes]] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await read_request(reader))
            writer.write(
                b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"
            )
            await writer.drain()
            await reader.read()

        url = await self.serve(handler)
        response = await self.request(self.pool(), url, b'{"a": 1}')
        self.assertEqual(response.status, 201)
        self.assertEqual(response.headers["x-a"], "1, 2")  # repeated: joined, names lowered
        self.assertEqual(await read_all(response), b"hello")
        head, body = seen[0]
        self.assertTrue(head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n"), head)
        self.assertIn(b"\r\nHost: 127.0.0.1:", head)
        self.assertIn(b"\r\nContent-Type: application/json\r\n", head)
        self.assertEqual(body, b'{"a": 1}')

    async def test_a_kept_alive_connection_carries_the_next_request(self) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                await writer.drain()

        url, pool = await self.serve(handler), self.pool()
        for _ in range(3):
            response = await self.request(pool, url)
            self.assertEqual(await read_all(response), b"abcde")
            response.release(reuse=True)
            response.release(reuse=True)  # idempotent: the connection is not put back twice
        self.assertEqual(self.connections, 1)

    async def test_a_connection_not_read_to_its_end_is_never_reused(self) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            await reader.read()  # until our side closes it

        url, pool = await self.serve(handler), self.pool()
        response = await self.request(pool, url)
        self.assertEqual(await response.read(), b"abc")
        response.release(reuse=True)  # asked to keep it, but its body is not over
        second = await self.request(pool, url)
        second.release()
        self.assertEqual(self.connections, 2)

    async def test_connections_idle_too_long_or_closed_by_the_backend_are_not_reused(
        self,
    ) -> None:
        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            # and close, as llama-server does once a kept-alive connection has idled 5 s

        url, pool = await self.serve(answer_once), self.pool()
        for _ in range(3):
            response = await self.request(pool, url)
            self.assertEqual(await read_all(response), b"ok")
            response.release(reuse=True)
            # The backend's close reaches us as the end of an idle connection, which leaves
            # the pool: the next request connects anew instead of writing into a dead one.
            connections = self.connections
            await asyncio.wait_for(self.until_no_idle(pool), 5)
            self.assertEqual(self.connections, connections)
        self.assertEqual(self.connections, 3)

        async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

        url, pool = await self.serve(keep_alive), self.pool(idle_s=0)
        for _ in range(2):
            response = await self.request(pool, url)
            await read_all(response)
            response.release(reuse=True)
        self.assertEqual(self.connections, 2)  # idle for 0 s is too long

    async def until_no_idle(self, pool: Pool) -> None:
        while any(pool._idle.values()):  # noqa: ASYNC110 - nothing announces a connection's end
            await asyncio.sleep(0.005)

    async def test_a_body_up_to_the_close_ends_with_the_connection(self) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
            await writer.drain()

        response = await self.request(self.pool(), await self.serve(handler))
        self.assertEqual(await read_all(response), b"data: 1\n\n")

    async def test_informational_answers_are_skipped(self) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()

        response = await self.request(self.pool(), await self.serve(handler))
        self.assertEqual((response.status, await read_all(response)), (200, b"ok"))

    async def test_faults_before_the_headers(self) -> None:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
            await reader.read()

        pool = self.pool()
        with self.assertRaises(ClosedEarly):
            await self.request(pool, await self.serve(close_at_once))
        with self.assertRaisesRegex(BadResponse, "invalid HTTP response"):
            await self.request(pool, await self.serve(garbage))
        with self.assertRaisesRegex(ConnectFailed, "connection refused"):
            await self.request(pool, "http://127.0.0.1:1/v1/chat/completions")  # nobody there
        url = await self.serve(close_at_once)
        with self.assertRaisesRegex(ValueError, "line break"):
            await pool.request(
                "POST", url, [("X-A", "1\r\nX-B: 2")], b"", tls=False, connect_s=2, first_byte_s=5
            )

    async def test_no_headers_within_the_first_byte_timeout(self) -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await reader.read()

        url = await self.serve(silent)
        with self.assertRaisesRegex(NoAnswer, "no answer within 0.2 s"):
            await self.pool().request(
                "POST", url, [], b"", tls=False, connect_s=2, first_byte_s=0.2
            )

    async def test_a_body_cut_short_is_a_fault_after_what_arrived(self) -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()

        response = await self.request(self.pool(), await self.serve(handler))
        self.assertEqual(await response.read(), b"partial")
        with self.assertRaises(BodyBroken):
            await response.read()

    async def test_a_reader_behind_pauses_the_socket(self) -> None:
        sent = asyncio.Event()
        total = 0

        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal total
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = b"x" * 65536
            try:
                while total < 256 * 2**20:
                    writer.write(b"10000\r\n" + block + b"\r\n")
                    # Bounded: once our side stops reading, the kernel's buffers fill and
                    # this drain waits instead of the body piling up in our process.
                    await asyncio.wait_for(writer.drain(), 0.5)
                    total += len(block)
            except TimeoutError:
                sent.set()
                await reader.read()

        response = await self.request(self.pool(), await self.serve(flood))
        await asyncio.wait_for(sent.wait(), 30)
        self.assertLess(total, 64 * 2**20, "the backend was never held back")
        got = len(await response.read())
        self.assertLessEqual(got, 2 * 2**20)  # what was buffered: about the high-water mark
        response.release()

    async def test_pump_hands_each_part_to_the_sink_until_it_says_stop(self) -> None:
        parts = [b"data: %d\n\n" % i for i in range(6)]
        go = [asyncio.Event() for _ in parts]

        async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part, event in zip(parts, go, strict=True):
                await event.wait()  # one part at a time, each once the last was taken
                writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()

        response = await self.request(self.pool(), await self.serve(paced))
        got: list[bytes] = []

        def sink(part: bytes) -> bool:
            got.append(part)
            if len(got) < len(parts):
                go[len(got)].set()
            return len(got) != 3  # the third: stop, as a relay whose client is behind

        go[0].set()
        self.assertFalse(await response.pump(sink))
        self.assertEqual(got, parts[:3])
        self.assertTrue(await response.pump(sink))  # the rest, to the body's end
        self.assertEqual(got, parts)
        self.assertEqual(await response.read(), b"")

        def failing(part: bytes) -> bool:
            raise RuntimeError("the sink's own")

        go = [asyncio.Event() for _ in parts]
        response = await self.request(self.pool(), await self.serve(paced))
        go[0].set()
        with self.assertRaisesRegex(RuntimeError, "the sink's own"):
            await response.pump(failing)  # raised where the reader waits, not in the loop
        response.release()

    async def test_a_response_released_midway_fails_its_pending_read(self) -> None:
        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await writer.drain()
            await reader.read()

        response = await self.request(self.pool(), await self.serve(stall))
        reading = asyncio.ensure_future(response.read())
        await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(response.release)  # as the idle watchdog does
        with self.assertRaises(BodyBroken):
            await asyncio.wait_for(reading, 5)
