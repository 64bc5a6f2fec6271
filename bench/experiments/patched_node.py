#!/usr/bin/env python3
"""Run a HomeNet node with what-if patches applied in memory (homenet/ itself is untouched).

    patched_node.py [--patch NAME]... -- NODE_ARGS...
    e.g. patched_node.py --patch connect --patch eager -- --bind 127.0.0.1 --port 16969 \\
             --allow 127.0.0.1/32 --no-mdns --log-level warning

For profiling experiments only (bench/profile.sh compares them); never for the headline
figures, which always measure the installed `homenet node`.

Patches:
  connect  dial targets with a plain non-blocking connect() + add_writer instead of uvloop's
           loop.sock_connect(), which calls getaddrinfo(type=0) and so misses uvloop's
           numeric-address fast path: every dial then goes through the libuv thread pool
           (futex + eventfd wake-ups, two extra context switches per connection).
  eager    in homenet.node.server, loop.sock_recv() first tries a plain sock.recv() (the
           preamble usually arrives with the connection): saves a reader registration
           (epoll_ctl add + del) and one loop iteration per connection.
  notimer  no per-session idle timer (the splice's call_later), to see what it costs.
  smallpipe  256 KiB pipes and 2 fills per readable event (instead of 1 MiB and 8): does a
           smaller burst per stream help many parallel streams on one loop?
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import types

from homenet.cli import main as cli_main
from homenet.node import dialer, server, splice


async def fast_connect(addr, port, timeout):
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        dialer.tune(sock)
        err = sock.connect_ex((str(addr), port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
            try:
                async with asyncio.timeout(timeout):
                    await fut
            finally:
                loop.remove_writer(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


class _EagerLoop:
    """The running loop, but sock_recv() tries a plain recv() first."""

    def __init__(self, loop):
        self._loop = loop

    def __getattr__(self, name):
        return getattr(self._loop, name)

    async def sock_recv(self, sock, n):
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return await self._loop.sock_recv(sock, n)


class _AsyncioShim(types.ModuleType):
    """`asyncio` for homenet.node.server only: get_running_loop() returns an _EagerLoop."""

    def __getattr__(self, name):
        return getattr(asyncio, name)

    @staticmethod
    def get_running_loop():
        return _EagerLoop(asyncio.get_running_loop())


def main() -> int:
    argv = sys.argv[1:]
    patches = []
    while argv and argv[0] == "--patch":
        patches.append(argv[1])
        argv = argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    for p in patches:
        if p == "connect":
            dialer.connect = fast_connect
        elif p == "eager":
            server.asyncio = _AsyncioShim("asyncio")
        elif p == "notimer":
            orig = server.Splice.__init__

            def init(self, *a, orig=orig, **kw):
                kw["idle_timeout"] = None
                orig(self, *a, **kw)

            server.Splice.__init__ = init
        elif p == "smallpipe":
            splice.CHUNK = 256 * 1024
            splice._BURST = 2
        else:
            sys.exit(f"unknown patch {p}")
    print(f"patches: {','.join(patches) or 'none'}", file=sys.stderr, flush=True)
    return cli_main.main(["node", *argv])


if __name__ == "__main__":
    sys.exit(main())
