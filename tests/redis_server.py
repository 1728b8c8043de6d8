"""A real redis-server for the replicas' tests, on a free port (no tests here)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from serving import free_port


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, nothing saved; `stop()` and `start()` again on
    the same port (Redis going away and coming back)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed: run scripts/install-test-deps.sh")
        self._binary = binary
        self._workdir = workdir
        self.port = free_port()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            while not await self._answers():  # noqa: ASYNC110 - a process has no event to await
                await asyncio.sleep(0.01)

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await reader.readline()).startswith(b"+PONG")
        finally:
            writer.close()

    async def stop(self) -> None:
        """SIGKILL: Redis vanishes as a crashed or unplugged one does."""
        if self._proc is not None:
            self._proc.kill()
            await self._proc.wait()
            self._proc = None


@asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
