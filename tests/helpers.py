"""Shared test harness: real `homenet` processes and real TCP servers on 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

READY_TIMEOUT = 20.0


@dataclass
class NodeProc:
    """A running `homenet ...` process; ``url`` comes from its READY/LISTENING line."""

    proc: asyncio.subprocess.Process
    stderr_path: Path
    url: str = ""
    lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def next_line(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        """The next stdout line starting with ``prefix`` (other lines are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line.startswith(prefix):
                    return line
                if line == "":
                    code = await self.proc.wait()
                    raise AssertionError(f"process exited ({code}) before {prefix!r}; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            await self.lines.put(raw.decode().rstrip("\n"))
        await self.lines.put("")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; kill it if it does not exit in time."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        return self.proc.returncode if self.proc.returncode is not None else -1


def proc_env(tmp: Path, secure: bool = False) -> dict[str, str]:
    """Environment of every process a test starts.

    mDNS never leaves loopback, whatever flags a test forgets; state (keys, listenIds) lives
    in the test's own directory, so `hnctl` finds the nodes' admin key there. Unless
    ``secure``, auth is relaxed so tests of other features need no keys (flags still win).
    """
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HOMENET_MDNS_INTERFACE": "127.0.0.1",
        "HOMENET_STATE_DIR": str(tmp / "state"),
        # one process per node unless a test asks for workers (tests/integration/test_workers.py)
        "HOMENET_WORKERS": "1",
    }
    for var in ("HOMENET_CONFIG", "HOMENET_KEY", "HOMENET_KEY_FILE", "HOMENET_KEYS_FILE"):
        env.pop(var, None)
    if not secure:
        env.update(HOMENET_CONNECT_AUTH="none", HOMENET_RL_AUTH="open", HOMENET_QUERY_AUTH="open")
    return env


async def spawn(
    args: list[str], tmp: Path, ready: str | None = "READY ", secure: bool = False, env: dict[str, str] | None = None
) -> NodeProc:
    """Start ``python -m homenet ARGS`` and wait for its ``ready`` line (its URL is recorded)."""
    tmp.mkdir(parents=True, exist_ok=True)
    err = tmp / f"proc-{len(list(tmp.glob('proc-*')))}.stderr"
    env = env if env is not None else proc_env(tmp, secure)
    with err.open("wb") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "homenet", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=fh, env=env,
        )  # fmt: skip
    node = NodeProc(proc, err)
    node._reader = asyncio.get_running_loop().create_task(node._pump())
    if ready is not None:
        try:
            line = await node.next_line(ready)
        except BaseException:
            await node.stop(signal.SIGKILL)
            raise
        node.url = line.split()[1]
    return node


def node_args(bind: str = "127.0.0.1", *extra: str) -> list[str]:
    return ["node", "--bind", bind, "--port", "0", "--no-mdns", "--log-level", "debug", *extra]


@dataclass
class EchoServer:
    """An asyncio TCP echo server; counts connections so tests can prove a target never saw one."""

    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(1 << 18):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self._handle, self.host, self.port, limit=1 << 20, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def echo_server(host: str = "127.0.0.1") -> AsyncIterator[EchoServer]:
    srv = await EchoServer(host).start()
    try:
        yield srv
    finally:
        await srv.close()


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes (cheap to make, easy to checksum)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]
