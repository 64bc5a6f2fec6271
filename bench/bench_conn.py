#!/usr/bin/env python3
"""Connection-setup benchmark through any TCP relay/tunnel.

The target HOST:PORT must (eventually) reach a TCP echo server.
Every connection: connect, send 1 byte, read it back (latency = connect ->
echo received), close.  Output: one JSON object on stdout.

  bench_conn.py seq  HOST:PORT [-n 2000]            sequential connections
  bench_conn.py conc HOST:PORT [-n 2000] [-c 50]    c concurrent clients, n total
  bench_conn.py hold HOST:PORT [-n 1000]            open n connections (each
        echoes 1 byte), keep them all open and idle, measure memory, verify
        they are still alive, close them.

Routing preambles (HOST:PORT is then the relay itself):
  --http-connect=T  send "CONNECT T HTTP/1.1" first and wait for 200 (PageKite)
  --homenet=T       HomeNet data plane: "HN/1 CONNECT T\n" and the 1-byte payload
                    go out in ONE write (pipelined, no round trip); the reply line
                    "HN/1 200 ok\n" and the echoed byte are read back. Latency is
                    still connect -> echo received.
  --homenet-route=HOP/HOP/...
                    the same through several nodes (Remote Listen): one
                    "HN/1 CONNECT HOP\n" line per hop, all lines and the payload in
                    ONE write (pipelined); one "HN/1 200 ..." reply line per hop is
                    expected before the echo. E.g. home/127.0.0.1:7001 (relay ->
                    listener "home" -> target) or echo (a `homenet rl` listener).
                    --homenet=T is --homenet-route=T.

Memory (any mode): --server-pids P[,P..] / --client-pids P[,P..] are roots
of process trees (relay side / home-agent side); their RSS/PSS is sampled
(baseline before, max during, and in hold mode while all n are open).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memstat

TIMEOUT = 10.0
CONNECT_REQ = None  # bytes of an HTTP CONNECT request, set by --http-connect
HN_REQ = None  # bytes of the HomeNet request lines, set by --homenet / --homenet-route
HN_HOPS = 0  # number of request lines = reply lines expected


def _check_connect_reply(buf):
    if not buf.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]:
        raise ConnectionError(f"CONNECT refused: {buf[:80]!r}")


def _split_hn_reply(buf):
    """(echo byte, True) once buf holds the HN_HOPS reply lines and one byte after them."""
    pos = 0
    for _ in range(HN_HOPS):
        i = buf.find(b"\n", pos)
        if i < 0:
            if len(buf) - pos >= 8 and not buf.startswith(b"HN/1 200", pos):
                raise ConnectionError(f"HomeNet refused: {buf[pos : pos + 80]!r}")
            return None, False
        if not buf.startswith(b"HN/1 200", pos):
            raise ConnectionError(f"HomeNet refused: {buf[pos:i]!r}")
        pos = i + 1
    if len(buf) < pos + 1:
        return None, False
    return buf[pos : pos + 1], True


def _hn_eof(buf):
    for line in buf.split(b"\n"):
        if line and not line.startswith(b"HN/1 200"):
            raise ConnectionError(f"HomeNet refused: {line[:80]!r}")
    raise ConnectionError("eof/bad echo")


def _hn_exchange(s):
    s.sendall(HN_REQ + b"x")  # request + payload in one write
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            _hn_eof(buf)
        buf += chunk
        d, done = _split_hn_reply(buf)
        if done:
            return d


async def _hn_exchange_async(loop, s):
    await loop.sock_sendall(s, HN_REQ + b"x")
    buf = b""
    while True:
        chunk = await loop.sock_recv(s, 4096)
        if not chunk:
            _hn_eof(buf)
        buf += chunk
        d, done = _split_hn_reply(buf)
        if done:
            return d


FIRST_ERRORS = {}  # error kind -> first message (copied into the output)


def _count_err(errs, e):
    k = type(e).__name__
    errs[k] = errs.get(k, 0) + 1
    FIRST_ERRORS.setdefault(k, str(e)[:160])


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def lat_summary(lats_s):
    v = sorted(x * 1000.0 for x in lats_s)
    if not v:
        return {}
    return {
        "p50_ms": round(pct(v, 50), 3),
        "p90_ms": round(pct(v, 90), 3),
        "p99_ms": round(pct(v, 99), 3),
        "max_ms": round(v[-1], 3),
        "mean_ms": round(statistics.fmean(v), 3),
    }


class MemSampler(threading.Thread):
    """Samples the process trees every `interval` s; keeps the max of each sum."""

    def __init__(self, groups, interval=0.25):
        super().__init__(daemon=True)
        self.groups, self.interval = groups, interval
        self.peak = {g: {} for g in groups}
        self.stop_ev = threading.Event()

    def sample(self):
        out = {}
        for g, roots in self.groups.items():
            m = memstat.measure(roots)
            out[g] = m
            pk = self.peak[g]
            for k, val in m.items():
                pk[k] = max(pk.get(k, 0), val)
        return out

    def run(self):
        while not self.stop_ev.wait(self.interval):
            self.sample()

    def stop(self):
        self.stop_ev.set()
        self.join()
        self.sample()
        return self.peak


def addr_of(s):
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


def run_seq(addr, n):
    lats, errs = [], {}
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        try:
            s = socket.create_connection(addr, timeout=TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if HN_REQ:
                d = _hn_exchange(s)
                b = time.perf_counter()
                s.close()
                if d != b"x":
                    raise ConnectionError("eof/bad echo")
                lats.append(b - a)
                continue
            if CONNECT_REQ:
                s.sendall(CONNECT_REQ)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("eof in CONNECT reply")
                    buf += chunk
                _check_connect_reply(buf)
            s.sendall(b"x")
            d = s.recv(1)
            b = time.perf_counter()
            s.close()
            if d != b"x":
                raise ConnectionError("eof/bad echo")
            lats.append(b - a)
        except Exception as e:
            _count_err(errs, e)
    wall = time.perf_counter() - t0
    return lats, errs, wall


async def _one(loop, addr, keep=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a = time.perf_counter()
    try:
        async with asyncio.timeout(TIMEOUT):  # cheaper than wait_for (no extra task)
            await loop.sock_connect(s, addr)
            if HN_REQ:
                d = await _hn_exchange_async(loop, s)
            elif CONNECT_REQ:
                await loop.sock_sendall(s, CONNECT_REQ)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await loop.sock_recv(s, 4096)
                    if not chunk:
                        raise ConnectionError("eof in CONNECT reply")
                    buf += chunk
                _check_connect_reply(buf)
            if not HN_REQ:
                await loop.sock_sendall(s, b"x")
                d = await loop.sock_recv(s, 1)
        b = time.perf_counter()
        if d != b"x":
            raise ConnectionError("eof/bad echo")
    except BaseException:
        s.close()
        raise
    if keep is None:
        s.close()
    else:
        keep.append(s)
    return b - a


async def _conc(addr, n, c, keep=None):
    loop = asyncio.get_running_loop()
    lats, errs = [], {}
    it = iter(range(n))

    async def worker():
        for _ in it:
            try:
                lats.append(await _one(loop, addr, keep))
            except Exception as e:
                _count_err(errs, e)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    return lats, errs, time.perf_counter() - t0


async def _ping_all(socks):
    loop = asyncio.get_running_loop()
    alive = 0

    async def ping(s):
        nonlocal alive
        try:
            async with asyncio.timeout(TIMEOUT):
                await loop.sock_sendall(s, b"y")
                if await loop.sock_recv(s, 1) == b"y":
                    alive += 1
        except Exception:
            pass

    await asyncio.gather(*(ping(s) for s in socks))
    return alive


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["seq", "conc", "hold"])
    ap.add_argument("target", help="HOST:PORT of the tunnel's public side")
    ap.add_argument("-n", type=int, default=None, help="connections (default 2000; hold: 1000)")
    ap.add_argument("-c", type=int, default=50, help="concurrent clients (conc, and opening in hold)")
    ap.add_argument("--hold-seconds", type=float, default=3.0)
    ap.add_argument("--server-pids", default="", help="relay-side process tree roots")
    ap.add_argument("--client-pids", default="", help="home-agent-side process tree roots")
    ap.add_argument("--label", default="", help="free text copied into the output")
    ap.add_argument(
        "--http-connect",
        default="",
        metavar="HOST:PORT",
        help="send 'CONNECT HOST:PORT' first and expect 200 (relays that route "
        "raw TCP by an HTTP CONNECT preamble, e.g. PageKite raw kites)",
    )
    ap.add_argument(
        "--homenet",
        default="",
        metavar="HOST:PORT",
        help="send 'HN/1 CONNECT HOST:PORT' and the payload in one write, expect 'HN/1 200'",
    )
    ap.add_argument(
        "--homenet-route",
        default="",
        metavar="HOP/HOP/...",
        help="one 'HN/1 CONNECT HOP' line per hop, all pipelined with the payload in one write; "
        "expect one 'HN/1 200' line per hop (e.g. home/127.0.0.1:7001 through a relay)",
    )
    a = ap.parse_args()
    global CONNECT_REQ, HN_REQ, HN_HOPS
    if a.homenet and a.homenet_route:
        ap.error("--homenet and --homenet-route are exclusive")
    route = a.homenet_route or a.homenet
    if route:
        hops = [h for h in route.split("/") if h]
        if not hops:
            ap.error("empty --homenet-route")
        HN_REQ = "".join(f"HN/1 CONNECT {h}\n" for h in hops).encode()
        HN_HOPS = len(hops)
    if a.http_connect:
        CONNECT_REQ = (f"CONNECT {a.http_connect} HTTP/1.1\r\nHost: {a.http_connect}\r\n\r\n").encode()
    n = a.n or (1000 if a.mode == "hold" else 2000)
    addr = addr_of(a.target)

    groups = {}
    if a.server_pids:
        groups["server"] = memstat.parse_pids([a.server_pids])
    if a.client_pids:
        groups["client"] = memstat.parse_pids([a.client_pids])
    sampler = MemSampler(groups) if groups else None
    out = {"mode": a.mode, "target": a.target, "label": a.label, "n": n}
    if a.http_connect:
        out["http_connect"] = a.http_connect
    if route:
        out["homenet"] = route
    if sampler:
        out["mem_before"] = sampler.sample()
        sampler.peak = {g: {} for g in groups}
        sampler.start()

    if a.mode == "seq":
        lats, errs, wall = run_seq(addr, n)
    elif a.mode == "conc":
        out["c"] = a.c
        lats, errs, wall = asyncio.run(_conc(addr, n, a.c))
    else:
        out["c"] = a.c
        keep = []

        async def hold():
            lats, errs, wall = await _conc(addr, n, a.c, keep)
            await asyncio.sleep(a.hold_seconds)
            if sampler:
                out["mem_held"] = sampler.sample()
            out["alive_after_hold"] = await _ping_all(keep)
            return lats, errs, wall

        lats, errs, wall = asyncio.run(hold())
        out["open_s"] = round(wall, 3)
        for s in keep:
            s.close()

    if sampler:
        out["mem_peak"] = sampler.stop()
    out.update(
        {
            "ok": len(lats),
            "errors": errs,
            "wall_s": round(wall, 3),
            "conn_per_s": round(len(lats) / wall, 1) if wall > 0 else None,
        }
    )
    if FIRST_ERRORS:
        out["first_errors"] = FIRST_ERRORS
    out.update(lat_summary(lats))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
