#!/usr/bin/env python3
"""Slow handshakes against a TCP port, and the latency a real client sees meanwhile.

  slowloris.py attack HOST PORT [--sockets 1000] [--sources 100] [--prefix 127.0.4.]
                                [--drip 0.5] [--payload 'HN/1'] [--hold-on-data]
      Opens SOCKETS connections spread over SOURCES local addresses (PREFIX1..PREFIXn, all in
      127.0.0.0/8), sends PAYLOAD one byte every DRIP seconds and never finishes it. A socket
      the server closes is opened again at once, so SOCKETS attempts stay open all the time.
      By default any byte the server sends counts as a close (a HomeNet node only ever
      replies to an unfinished preamble to refuse it); with --hold-on-data received bytes are
      read and discarded, and only EOF or a reset ends a socket (for a plain TCP proxy, which
      forwards the trickle to an echo server that sends it back).
      Prints ``OPEN n`` once every socket was opened, then, when stdin closes or on SIGTERM,
      one JSON line: opened, closed by the server, the first bytes they were closed with (with
      --hold-on-data: the first bytes received on the connection, or "(eof)") and the bytes
      received in all.

  slowloris.py probe HOST PORT [--tries 20] [--line 'HN/1 CONNECT 127.0.0.1:7001\\n'] [--source ADDR]
                               [--interval 0]
      Round trips of a real client: connect, send LINE + a payload, read until the payload
      comes back (after one reply line when LINE is given), one at a time, INTERVAL seconds
      apart (so the probes can span the attack's cycles). Prints one JSON line with the
      latencies in ms (p50, p99, max, all).

Only loopback addresses: the harness never sends traffic anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import time


async def attack(args: argparse.Namespace) -> None:
    opened = closed = received = 0
    endings: dict[str, int] = {}
    first_round = asyncio.Event()
    started = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def ended(data: bytes) -> None:
        nonlocal closed
        closed += 1
        key = data.split(b"\n", 1)[0].decode("ascii", "replace")[:100] or "(eof)"
        endings[key] = endings.get(key, 0) + 1

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Any byte from the server ends the socket (the default)."""
        # one read for the whole socket: a cancelled read still holds the stream's waiter until
        # it unwinds, and a new read() then raises RuntimeError (it killed the socket's task)
        read = asyncio.ensure_future(reader.read(200))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            for byte in args.payload.encode():
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait({read, stopping}, timeout=args.drip, return_when="FIRST_COMPLETED")
                if read.done() or stop.is_set():
                    break
            else:  # the whole payload trickled out: hold it open until the server gives up
                await asyncio.wait({read, stopping}, return_when="FIRST_COMPLETED")
            if read.done():
                ended(read.result())  # a reset raises OSError: counted by the caller
        finally:
            read.cancel()
            stopping.cancel()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """--hold-on-data: discard what the server sends; only EOF (or a reset) ends the socket."""
        first = bytearray()

        async def until_eof() -> None:
            nonlocal received
            while data := await reader.read(4096):
                received += len(data)
                if len(first) < 100:
                    first.extend(data[: 100 - len(first)])

        eof = asyncio.ensure_future(until_eof())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            for byte in args.payload.encode():
                writer.write(bytes([byte]))
                await writer.drain()
                done, _ = await asyncio.wait({eof, stopping}, timeout=args.drip, return_when="FIRST_COMPLETED")
                if done:
                    break
            else:  # the whole payload trickled out: hold it open until the server gives up
                await asyncio.wait({eof, stopping}, return_when="FIRST_COMPLETED")
            if eof.done():
                eof.result()  # a reset raises OSError: counted by the caller
                ended(bytes(first))
        finally:
            eof.cancel()
            stopping.cancel()

    async def one(i: int) -> None:
        nonlocal opened, closed, started
        source = f"{args.prefix}{i % args.sources + 1}"
        counted = False
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.05)  # the server's backlog is full: try again shortly
                continue
            opened += 1
            if not counted:
                counted = True
                started += 1
                if started == args.sockets:
                    first_round.set()
            try:
                if args.hold_on_data:
                    await hold(reader, writer)
                else:
                    await trickle(reader, writer)
            except OSError:
                closed += 1
                endings["(reset)"] = endings.get("(reset)", 0) + 1
            finally:
                writer.transport.abort()

    async def stdin_closed() -> None:
        await loop.run_in_executor(None, sys.stdin.read)
        stop.set()

    tasks = [asyncio.ensure_future(one(i)) for i in range(args.sockets)]
    watch = asyncio.ensure_future(stdin_closed())
    waiter = asyncio.ensure_future(first_round.wait())
    await asyncio.wait({waiter, asyncio.ensure_future(stop.wait())}, return_when="FIRST_COMPLETED")
    if first_round.is_set():
        print(f"OPEN {args.sockets}", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    watch.cancel()
    report = {"opened": opened, "closed_by_server": closed, "endings": endings}
    if args.hold_on_data:
        report["bytes_received"] = received
    print(json.dumps(report), flush=True)


async def probe(args: argparse.Namespace) -> None:
    line = args.line.encode().decode("unicode_escape").encode("latin-1")
    lat: list[float] = []
    for i in range(args.tries):
        if i and args.interval > 0:
            await asyncio.sleep(args.interval)
        payload = b"probe %d\n" % i
        t0 = time.perf_counter()
        local = (args.source, 0) if args.source else None
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection(args.host, args.port, local_addr=local)
            writer.write(line + payload)
            await writer.drain()
            if line:
                reply = await reader.readline()
                if not reply.startswith(b"HN/1 200"):
                    sys.exit(f"probe: refused: {reply!r}")
            got = await reader.readexactly(len(payload))
        lat.append((time.perf_counter() - t0) * 1000)
        assert got == payload
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    lat_sorted = sorted(lat)
    p99 = lat_sorted[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(
        json.dumps(
            {
                "tries": len(lat),
                "p50_ms": round(statistics.median(lat), 3),
                "p99_ms": round(p99, 3),
                "max_ms": round(max(lat), 3),
                "all_ms": [round(x, 3) for x in lat],
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("attack")
    a.add_argument("host")
    a.add_argument("port", type=int)
    a.add_argument("--sockets", type=int, default=1000)
    a.add_argument("--sources", type=int, default=100)
    a.add_argument("--prefix", default="127.0.4.")
    a.add_argument("--drip", type=float, default=0.5)
    a.add_argument("--payload", default="HN/1")
    a.add_argument("--hold-on-data", action="store_true", help="ignore received bytes; only EOF/reset ends a socket")
    b = sub.add_parser("probe")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--tries", type=int, default=20)
    b.add_argument("--line", default="")
    b.add_argument("--source", default="")
    b.add_argument("--interval", type=float, default=0.0, help="seconds between round trips (not timed)")
    args = p.parse_args()
    if not (args.host.startswith("127.") or args.host == "::1"):
        sys.exit("slowloris.py: loopback targets only")
    asyncio.run(attack(args) if args.mode == "attack" else probe(args))


if __name__ == "__main__":
    main()
