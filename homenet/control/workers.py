"""``homenet node --workers N``: one node on every core.

A supervisor process owns the sockets and N worker processes serve them. Each worker is a
whole node (its own asyncio loop, control server, relay registry) and a **fleet member** of
its siblings: the same directory watches, lookups and signed forwarded hops as relays of a
fleet (:mod:`homenet.control.fleet`), over a private plaintext loopback port per worker, with
a fleet key the supervisor makes for the node's lifetime. What a fleet relays through a
second TCP hop, siblings hand over as a file descriptor (:mod:`homenet.node.handoff`).

Sockets:

* the **one port**: with ``reuseport`` (the default) every worker has its own listening
  socket bound with ``SO_REUSEPORT`` (the kernel spreads connections over their accept
  queues); with ``shared`` one listening socket, made by the supervisor, is inherited by all;
* one **private port** per worker (``127.0.0.1``, made once by the supervisor and inherited by
  each incarnation of that worker, so it keeps its address across restarts).

Worker 0 also runs what a node must run once: its Remote Listen clients, the mDNS record
of the node, and the health port. A worker that dies is started again (only its own
sessions are lost; its listeners reconnect and land on a live sibling); SIGTERM drains every
worker; the supervisor exits when they all did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from homenet.node.address import Endpoint
from homenet.node.keys import KeyStore, ensure_first_key, first_key_notice, new_secret
from homenet.node.log import fields
from homenet.node.replay import replay_path
from homenet.node.settings import Settings

log = logging.getLogger("homenet.workers")

#: The environment variable that makes ``homenet node`` a worker (set by the supervisor).
SPEC_ENV = "HOMENET_WORKER_SPEC"
#: A worker's exit status meaning "the node cannot go on" (a relay refused its listenId):
#: the supervisor stops every worker instead of starting this one again.
EXIT_FATAL = 3
_BACKLOG = 4096
#: Restart delays: the first, and the cap for a worker that keeps dying young.
RESTART_FIRST, RESTART_MAX = 0.1, 5.0
#: A worker that ran this long before it died is restarted without delay growth.
HEALTHY_AFTER = 5.0
#: Seconds a worker may take to say READY.
START_TIMEOUT = 30.0

Announce = Callable[[str], None]


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells one worker (JSON in :data:`SPEC_ENV`)."""

    index: int
    #: Every worker's private port, by index.
    siblings: tuple[str, ...]
    #: Every worker's handoff Unix socket, by index.
    handoffs: tuple[str, ...]
    fleet_key_file: str
    #: The replay table every worker checks nonces in (:mod:`homenet.node.replay`).
    replay_file: str
    private_fd: int
    #: The shared listening socket (``shared`` mode), or -1: bind the port with SO_REUSEPORT.
    public_fd: int
    bind: str
    port: int
    supervisor: int

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> WorkerSpec:
        d = json.loads(text)
        d["siblings"], d["handoffs"] = tuple(d["siblings"]), tuple(d["handoffs"])
        return cls(**d)

    @property
    def private(self) -> Endpoint:
        host, port = self.siblings[self.index].rsplit(":", 1)
        return Endpoint(host, int(port))

    def sibling_handoffs(self) -> dict[Endpoint, str]:
        """Every other worker's private port -> its handoff socket."""
        out = {}
        for i, (addr, path) in enumerate(zip(self.siblings, self.handoffs, strict=True)):
            if i != self.index:
                host, port = addr.rsplit(":", 1)
                out[Endpoint(host, int(port))] = path
        return out


def current_spec() -> WorkerSpec | None:
    """This process's worker spec, if a supervisor started it."""
    text = os.environ.get(SPEC_ENV)
    return WorkerSpec.loads(text) if text else None


def worker_settings(settings: Settings, spec: WorkerSpec) -> Settings:
    """A worker's settings: a fleet of its siblings; worker 0 alone keeps the once-per-node
    roles (Remote Listen, the health port)."""
    first = spec.index == 0
    return settings.replace(
        workers=1,
        fleet_key_file=spec.fleet_key_file,
        peers=tuple(s for i, s in enumerate(spec.siblings) if i != spec.index),
        rl=settings.rl if first else (),
        health_port=settings.health_port if first else 0,
        metrics_bind=settings.metrics_bind if first else "",  # worker 0 serves the node's, merged
    )


def public_socket(spec: WorkerSpec) -> socket.socket:
    """The worker's listening socket on the one port."""
    if spec.public_fd >= 0:
        return socket.socket(fileno=spec.public_fd)
    return bound_socket(spec.bind, spec.port, reuse_port=True, listen=True)


def bound_socket(bind: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    """A TCP socket bound to ``bind:port`` (dual-stack on ``::``), listening if asked."""
    family, _, _, _, sockaddr = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if listen:
            sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def die_with_supervisor(spec: WorkerSpec) -> None:
    """Linux: this worker is killed when its supervisor dies (even by kill -9), so no
    orphan keeps the port or a listener identity."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != spec.supervisor:  # it died before prctl took effect
        os._exit(EXIT_FATAL)


class Worker:
    """One worker process as the supervisor sees it."""

    def __init__(self, index: int, private: socket.socket) -> None:
        self.index = index
        self.private = private
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.started = 0.0
        self.restarts = 0
        self.delay = RESTART_FIRST
        self._public: socket.socket | None = None


class Supervisor:
    """Starts the workers, restarts the ones that die, drains them all on SIGTERM."""

    def __init__(self, settings: Settings, argv: list[str], announce: Announce, notice: Announce | None) -> None:
        self.settings = settings
        self.argv = argv
        self.announce = announce
        self.notice = notice
        self.count = settings.worker_count
        self.failure: int | None = None
        self._stopping = False
        self._dir = Path(tempfile.mkdtemp(prefix="homenet-workers-"))  # 0700: only we reach it
        self._workers: list[Worker] = []
        self._shared: socket.socket | None = None
        self._reserve: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_file = ""
        self._replay = Path()
        self._port = settings.port

    # -- set-up ----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        s = self.settings
        self._first_key()
        self._replay = replay_path(self.settings, self._dir)  # outlives a worker's restart, and ours
        if s.fleet_key_file:
            self._key_file = s.fleet_key_file
        else:  # the workers' own fleet, for this run only
            path = self._dir / "fleet.key"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"workers:{new_secret().reveal()}\n")
            self._key_file = str(path)
        if s.worker_accept == "shared":
            self._shared = bound_socket(s.bind, s.port, reuse_port=False, listen=True)
            self._port = self._shared.getsockname()[1]
        else:  # hold the port (port 0 picks one) while workers bind it with SO_REUSEPORT
            self._reserve = bound_socket(s.bind, s.port, reuse_port=True, listen=False)
            self._port = self._reserve.getsockname()[1]
        for i in range(self.count):
            private = bound_socket("127.0.0.1", 0, reuse_port=False, listen=True)
            self._workers.append(Worker(i, private))

    def _first_key(self) -> None:
        keys = KeyStore(self.settings.keys_path)
        try:
            first = ensure_first_key(keys)
        except OSError as exc:
            log.warning("keys.first_key_not_written", extra=fields(path=str(keys.path), error=exc.strerror or str(exc)))
            return
        if first is not None and self.notice is not None:
            for line in first_key_notice(first, keys.path):
                self.notice(line)

    def _spec(self, w: Worker) -> WorkerSpec:
        return WorkerSpec(
            index=w.index,
            siblings=tuple(f"127.0.0.1:{x.private.getsockname()[1]}" for x in self._workers),
            handoffs=tuple(str(self._dir / f"w{x.index}.sock") for x in self._workers),
            fleet_key_file=self._key_file,
            replay_file=str(self._replay),
            private_fd=w.private.fileno(),
            public_fd=self._shared.fileno() if self._shared is not None else -1,
            bind=self.settings.bind,
            port=self._port,
            supervisor=os.getpid(),
        )

    # -- workers ---------------------------------------------------------------------------------
    async def _spawn(self, w: Worker) -> None:
        spec = self._spec(w)
        fds = [w.private.fileno()] + ([spec.public_fd] if spec.public_fd >= 0 else [])
        env = {**os.environ, SPEC_ENV: spec.dumps()}
        w.ready.clear()
        w.started = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "homenet", *self.argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env, pass_fds=fds,
        )  # fmt: skip
        log.info("worker.started", extra=fields(worker=w.index, pid=w.proc.pid, restarts=w.restarts))
        self._spawn_task(self._read(w, w.proc))

    async def _read(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        """A worker's stdout: READY says it serves; other lines (a listener granted) go on."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            if text.startswith("READY "):
                w.ready.set()
            else:
                self.announce(text)

    async def _watch(self, w: Worker) -> None:
        """Wait for the worker to exit; start it again unless the node is stopping."""
        while True:
            assert w.proc is not None
            rc = await w.proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - w.started
            log.warning("worker.exited", extra=fields(worker=w.index, status=_status(rc), lived=round(lived, 3)))
            if rc == EXIT_FATAL or (not w.ready.is_set() and w.restarts == 0):
                self.failure = 1 if rc in (EXIT_FATAL, 0) or rc < 0 else rc  # its own line said why
                self._stop_all()
                return
            w.delay = RESTART_FIRST if lived >= HEALTHY_AFTER else min(RESTART_MAX, w.delay * 2)
            await asyncio.sleep(w.delay)
            if self._stopping:
                return
            w.restarts += 1
            await self._spawn(w)

    def _spawn_task(self, aw: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _stop_all(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._signal_all(signal.SIGTERM)
        self._done.set()

    # -- the run ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, then: Callable[[Callable[[], None]], None]) -> int:
        """Serve until ``stop`` (SIGTERM); returns the exit status."""
        self._done = asyncio.Event()
        try:
            self._prepare()
            for w in self._workers:
                await self._spawn(w)
            if not await self._all_ready():
                return self.failure or 1
            host = f"[{self.settings.bind}]" if ":" in self.settings.bind else self.settings.bind
            self.announce(f"READY hn://{host}:{self._port}")
            log.info("workers.ready", extra=fields(workers=self.count, port=self._port))
            for w in self._workers:
                self._spawn_task(self._watch(w))
            stop_wait = asyncio.ensure_future(stop.wait())
            done_wait = asyncio.ensure_future(self._done.wait())
            await asyncio.wait([stop_wait, done_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            done_wait.cancel()
            then(lambda: self._signal_all(signal.SIGTERM))  # a second signal cuts the drains short
            self._stop_all()
            await self._wait_all(self.settings.drain_grace + 5.0)
            return self.failure or 0
        finally:
            await self._close()

    async def _all_ready(self) -> bool:
        """Every worker said READY (False: one failed first; the node stops)."""
        waits = [asyncio.ensure_future(w.ready.wait()) for w in self._workers]
        exits = [asyncio.ensure_future(w.proc.wait()) for w in self._workers if w.proc is not None]
        try:
            async with asyncio.timeout(START_TIMEOUT):
                pending = set(waits)
                while pending:
                    done, _ = await asyncio.wait(pending | set(exits), return_when=asyncio.FIRST_COMPLETED)
                    if any(e in done for e in exits):
                        rc = next(e.result() for e in exits if e.done())
                        self.failure = rc if rc > 0 and rc != EXIT_FATAL else 1
                        self._stop_all()
                        return False
                    pending -= done
        except TimeoutError:
            log.error("workers.start_timeout", extra=fields(seconds=START_TIMEOUT))
            self.failure = 1
            self._stop_all()
            return False
        finally:
            for t in waits + exits:
                t.cancel()
        return True

    async def _wait_all(self, timeout: float) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.warning("workers.kill", extra=fields(after=timeout))
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))

    async def _close(self) -> None:
        self._stopping = True
        self._signal_all(signal.SIGKILL)  # only workers still alive here: an error path
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                await w.proc.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._workers:
            w.private.close()
        for sock in (self._shared, self._reserve):
            if sock is not None:
                sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _status(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
