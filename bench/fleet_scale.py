#!/usr/bin/env python3
"""Fleet at scale (not CI): N relays peered all-to-all, L listeners registered through them.

    bench/fleet_scale.py [--relays 10] [--listeners 10000] [OUTDIR]

Starts N relays (``homenet node --bind 127.0.0.41.. --port 16973 --fleet-key-file F
--peers <every other> --rl-auth open --no-mdns``, one keys file with an admin key for the
FleetService.Peers calls), then ONE child process (``fleet_scale.py hold``) that registers the
L listeners as raw gRPC ``RelayService.Listen`` streams (``register`` with ``pool_size=0``,
then answer every ``ping`` with a ``pong``), spread round-robin over the relays, at most 900
streams per HTTP/2 connection (the relays allow 1,000), ceil(L/N/900) channels per relay.
Measures, polling every relay's ``FleetService.Peers`` every ``--poll`` s (signed with the
admin key; a relay is *converged* when it lists every other relay ``up`` and the sum of their
``listeners`` is ``L - its own``):

  1. join: relays started -> every relay sees every peer up (no listeners yet);
     register: the first ``register`` sent -> all L ``registered`` replies (in the child);
     converged: the first ``register`` sent -> every relay converged.
  2. restart of relay K (``--restart``, default the middle one): ``kill -9``; detected = until
     every other relay lists K as not up; restarted K ``READY``; K's own view converged (a
     fresh relay joining a full fleet); its listeners re-registered at K as fresh streams
     (with the resumption secrets they got); converged = until every relay sees them again.
  3. memory: RSS of every relay with the peers up and no listener, and after the listeners
     registered (+ ``--settle`` s): (sum of the increases) / L, the fleet's bytes per
     listener (each relay holds its own L/N streams and a directory copy of the other
     L - L/N); split by the restarted relay K: its RSS once its directory is full (L - own
     entries, no own listener) and after its own listeners are back, against a fresh relay's
     baseline. Plus the wire size of a Snapshot of L/N entries and of a one-entry Delta
     (fleet_pb2), and the Python size of the directory's dict of Entry objects (tracemalloc).
  Also: CPU of the relays and of the listener process over the settle window (pings every
  2 s), and streams lost (a relay drops a listener silent for 3 ping intervals).

Output: OUTDIR/fleet_scale.json (every figure), summary.txt (printed), relay logs in
$BP/log (BP=/tmp/hnb-fleet-scale); PID files in $BP/run (``BP=/tmp/hnb-fleet-scale
bench/peers.sh stop`` cleans up after a killed run). Everything on 127.0.0.0/8; every
process it starts is stopped by PID at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memstat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STREAMS_PER_CHANNEL = 900


def now() -> float:
    return time.time()


def out(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================================
# The listener process: L raw Listen streams in one asyncio loop
# ================================================================================================
class Holder:
    def __init__(self, relays: list[str], counts: list[int], inflight: int) -> None:
        import grpc

        from homenet.control.v1 import relay_pb2, relay_pb2_grpc

        self.grpc, self.pb, self.pb_grpc = grpc, relay_pb2, relay_pb2_grpc
        self.relays = relays
        self.counts = counts
        self.sem = asyncio.Semaphore(inflight)
        self.node_id = secrets.token_hex(8)
        # listener state: per relay, a list of [listen_id, secret, live]
        self.listeners: list[list[list]] = [
            [[f"fs{r:02d}x{j:05d}{secrets.token_urlsafe(6)}", "", False] for j in range(n)]
            for r, n in enumerate(counts)
        ]
        self.channels: list[list] = [[] for _ in relays]
        self.tasks: set[asyncio.Task] = set()
        self.pongs = 0
        self.lost = [0] * len(relays)
        self.errors: dict[str, int] = {}
        self.first_error = ""

    def _open_channels(self, r: int) -> None:
        n = max(1, math.ceil(self.counts[r] / STREAMS_PER_CHANNEL))
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
        self.channels[r] = [
            self.grpc.aio.insecure_channel(self.relays[r], options=[*opts, ("homenet.bench.channel", i)])
            for i in range(n)
        ]

    def _error(self, e: BaseException) -> None:
        k = type(e).__name__
        if isinstance(e, self.grpc.aio.AioRpcError):
            k = f"{e.code().name}"
        self.errors[k] = self.errors.get(k, 0) + 1
        self.first_error = self.first_error or f"{k}: {str(e)[:200]}"

    async def _listener(self, r: int, j: int, registered: asyncio.Queue) -> None:
        lst = self.listeners[r][j]
        ch = self.channels[r][j // STREAMS_PER_CHANNEL]
        pb = self.pb
        ok = False
        call = None
        try:
            async with self.sem:  # the stream opens here: a relay ends one silent for 10 s before register
                call = self.pb_grpc.RelayServiceStub(ch).Listen()
                reg = pb.Register(
                    listen_id=lst[0], resume_secret=lst[1], name="fleet_scale", version="bench", pool_size=0,
                    node_id=self.node_id,
                )  # fmt: skip
                await call.write(pb.ListenerMessage(register=reg))
                first = await call.read()
                if first is self.grpc.aio.EOF or first.WhichOneof("msg") != "registered":
                    raise ConnectionError("stream ended before registered")
            lst[1], lst[2], ok = first.registered.resume_secret, True, True
            registered.put_nowait(True)
            while True:
                msg = await call.read()
                if msg is self.grpc.aio.EOF:
                    break
                if msg.WhichOneof("msg") == "ping":
                    await call.write(pb.ListenerMessage(pong=pb.Pong(seq=msg.ping.seq)))
                    self.pongs += 1
        except asyncio.CancelledError:
            if call is not None:
                call.cancel()
            raise
        except Exception as e:  # a benchmark counts every kind
            if not ok:
                self._error(e)
                registered.put_nowait(False)
        if ok:
            lst[2] = False
            self.lost[r] += 1

    async def register(self, relays: list[int]) -> dict:
        """Register (again) every listener of these relays that is not live; fresh channels."""
        q: asyncio.Queue = asyncio.Queue()
        want = 0
        t0 = now()
        for r in relays:
            for ch in self.channels[r]:
                await ch.close(None)
            self._open_channels(r)
            for j, lst in enumerate(self.listeners[r]):
                if lst[2]:
                    continue
                want += 1
                t = asyncio.ensure_future(self._listener(r, j, q))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
        good = bad = 0
        while good + bad < want:
            if await q.get():
                good += 1
            else:
                bad += 1
        return {"t0": t0, "t1": now(), "registered": good, "failed": bad, "errors": dict(self.errors),
                "first_error": self.first_error}  # fmt: skip

    def status(self) -> dict:
        return {"live": sum(lst[2] for rs in self.listeners for lst in rs), "lost": list(self.lost),
                "pongs": self.pongs, "tasks": len(self.tasks)}  # fmt: skip

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for chs in self.channels:
            for ch in chs:
                await ch.close(None)


async def hold_main(a: argparse.Namespace) -> None:
    relays = a.relays_csv.split(",")
    counts = [int(x) for x in a.counts.split(",")]
    h = Holder(relays, counts, a.inflight)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(ev: str, **kw: object) -> None:
        sys.stdout.write(json.dumps({"ev": ev, **kw}) + "\n")
        sys.stdout.flush()

    say("ready", pid=os.getpid())
    try:
        while line := (await reader.readline()).decode().strip():
            cmd, *rest = line.split()
            if cmd == "register":
                rs = [int(x) for x in rest] if rest else list(range(len(relays)))
                say("registered", relays=rs, **(await h.register(rs)))
            elif cmd == "status":
                say("status", **h.status())
            elif cmd == "quit":
                break
    finally:
        await h.close()
        say("closed")


# ================================================================================================
# The coordinator
# ================================================================================================
class Relays:
    """The relay processes: started, killed and stopped by PID (PID files in $BP/run)."""

    def __init__(self, a: argparse.Namespace, bp: Path, keys: Path) -> None:
        self.a, self.bp, self.keys = a, bp, keys
        base = [int(x) for x in a.base.split(".")]
        self.hosts = [".".join(map(str, [*base[:3], base[3] + i])) for i in range(a.relays)]
        self.addrs = [f"{h}:{a.port}" for h in self.hosts]
        self.procs: list[subprocess.Popen | None] = [None] * a.relays

    def cmd(self, i: int) -> list[str]:
        st = self.bp / "state" / f"relay{i}"
        peers = [x for p in self.addrs if p != self.addrs[i] for x in ("--peers", p)]
        return [
            self.a.homenet, "node", "--bind", self.hosts[i], "--port", str(self.a.port), "--name", f"relay{i}",
            "--fleet-key-file", str(self.keys / "fleet.key"), "--keys-file", str(self.keys / "keys.toml"),
            *peers, "--no-mdns", "--rl-auth", "open", "--connect-auth", "none", "--log-level", "warning",
            "--max-listeners-per-source", "100000",  # every simulated listener comes from 127.0.0.1
            "--state-dir", str(st),
        ]  # fmt: skip

    def start(self, i: int) -> None:
        st = self.bp / "state" / f"relay{i}"
        subprocess.run(["rm", "-rf", str(st)], check=True)
        st.mkdir(parents=True)
        log = open(self.bp / "log" / f"relay{i}.out", "ab")  # noqa: SIM115 - the child keeps it
        log.write(f"--- start {time.strftime('%T')}\n".encode())
        log.flush()
        self.procs[i] = subprocess.Popen(self.cmd(i), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        (self.bp / "run" / f"relay{i}.pid").write_text(str(self.procs[i].pid))

    async def ready(self, i: int, timeout: float = 30.0) -> float:
        """Wait for relay i's READY line (after its latest start); returns the time."""
        path = self.bp / "log" / f"relay{i}.out"
        t_end = now() + timeout
        while now() < t_end:
            text = path.read_text(errors="replace").rsplit("--- start", 1)[-1]
            if "\nREADY " in text:
                return now()
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"relay{i} exited ({self.procs[i].returncode}): {text[-400:]}")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"relay{i} not READY in {timeout:g}s")

    def pid(self, i: int) -> int:
        return self.procs[i].pid

    def kill9(self, i: int) -> None:
        p = self.procs[i]
        p.send_signal(signal.SIGKILL)
        p.wait()
        (self.bp / "run" / f"relay{i}.pid").unlink(missing_ok=True)

    def stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.terminate()
        t_end = now() + 15
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, t_end - now()))
            if p.poll() is None:
                p.kill()
                p.wait()
        for i in range(len(self.procs)):
            (self.bp / "run" / f"relay{i}.pid").unlink(missing_ok=True)


class Poller:
    """Every relay's FleetService.Peers, signed with the admin key."""

    def __init__(self, addrs: list[str], admin_key: Path) -> None:
        from homenet.control.client import ControlClient
        from homenet.node.auth import Credentials
        from homenet.node.keys import key_from_file

        kid, secret = key_from_file(admin_key)
        self.creds = Credentials(kid, secret)
        self.addrs = addrs
        self.make = ControlClient
        self.clients = [ControlClient(x, timeout=5.0, creds=self.creds) for x in addrs]
        self.closing: list = []

    def renew(self, i: int) -> None:  # a restarted relay: a fresh channel
        self.closing.append(self.clients[i])
        self.clients[i] = self.make(self.addrs[i], timeout=5.0, creds=self.creds)

    async def views(self) -> list[dict | None]:
        async def one(c):
            try:
                resp = await c.peers()
            except Exception:  # a relay down or busy: no view this round
                return None
            return {p.target: (p.state, p.listeners) for p in resp.peers}

        return await asyncio.gather(*(one(c) for c in self.clients))

    async def close(self) -> None:
        for c in self.clients + self.closing:
            await c.channel.close(None)


def converged(view: dict | None, me: str, addrs: list[str], want_sum: int) -> bool:
    if view is None:
        return False
    others = [x for x in addrs if x != me]
    return all(view.get(x, ("", 0))[0] == "up" for x in others) and sum(view[x][1] for x in others) == want_sum


async def wait_until(poller: Poller, cond, timeout: float, poll: float, only=None) -> tuple[dict, list]:
    """Poll until cond(i, view) holds for every relay i (of ``only``); returns {i: first time}."""
    first: dict[int, float] = {}
    idx = list(only) if only is not None else list(range(len(poller.addrs)))
    t_end = now() + timeout
    views: list = []
    while now() < t_end:
        views = await poller.views()
        t = now()
        for i in idx:
            if i not in first and cond(i, views[i]):
                first[i] = t
        if len(first) == len(idx):
            break
        await asyncio.sleep(poll)
    return first, views


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def rss(pids: list[int]) -> list[int]:
    return [memstat.measure([p])["rss_kib"] for p in pids]


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fld = f.read().rsplit(")", 1)[1].split()
        return (int(fld[11]) + int(fld[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def sizes(per_relay: int, n_total: int) -> dict:
    """Wire size of a Snapshot / one-entry Delta; Python size of a directory copy."""
    from homenet.control.v1 import fleet_pb2
    from homenet.node.fleet import Entry

    ts = time.time_ns()
    ident = fleet_pb2.RelayIdentity(relay_id=secrets.token_hex(8), epoch=ts, address="127.0.0.41:16973", name="relay0")
    ids = [f"fs00x{j:05d}{secrets.token_urlsafe(6)}" for j in range(per_relay)]
    entries = [fleet_pb2.DirectoryEntry(listen_id=x, registered_at=ts + j, online=True) for j, x in enumerate(ids)]
    snap = fleet_pb2.DirectoryEvent(relay=ident, snapshot=fleet_pb2.Snapshot(entries=entries)).ByteSize()
    delta = fleet_pb2.DirectoryEvent(relay=ident, delta=fleet_pb2.Delta(upserted=entries[:1])).ByteSize()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    copy = {f"fs01x{j:05d}{secrets.token_urlsafe(6)}": None for j in range(n_total)}
    copy = {k: Entry(k, ts + j, True) for j, k in enumerate(copy)}
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del copy
    return {
        "listen_id_len": len(ids[0]),
        "snapshot_entries": per_relay,
        "snapshot_bytes": snap,
        "snapshot_bytes_per_entry": round(snap / max(1, per_relay), 1),
        "delta_one_entry_bytes": delta,
        "python_dir_entries": n_total,
        "python_dir_bytes_per_entry": round(used / max(1, n_total), 1),
    }


async def coordinator(a: argparse.Namespace) -> dict:
    bp = Path(a.bp)
    for d in ("run", "log", "state"):
        (bp / d).mkdir(parents=True, exist_ok=True)
    keys = bp / "keys"
    subprocess.run(["rm", "-rf", str(keys)], check=True)
    keys.mkdir(mode=0o700)
    with open(keys / "fleet.key", "w") as f:
        subprocess.run([a.homenet, "key", "fleet"], stdout=f, check=True)
    with open(keys / "admin.key", "w") as f:
        subprocess.run([a.homenet, "key", "--keys-file", str(keys / "keys.toml"), "new", "admin", "--role", "admin"],
                       stdout=f, stderr=subprocess.DEVNULL, check=True)  # fmt: skip
    os.chmod(keys / "fleet.key", 0o600)
    os.chmod(keys / "admin.key", 0o600)

    relays = Relays(a, bp, keys)
    n, big_l = a.relays, a.listeners
    counts = [len(range(i, big_l, n)) for i in range(n)]  # round-robin
    for h in relays.hosts:  # the port must be free on every address
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous run is fine
            try:
                s.bind((h, a.port))
            except OSError as e:
                why = f"{h}:{a.port} is not free ({e.strerror}); a previous run? BP={bp} bench/peers.sh stop"
                raise SystemExit(why) from None
    k = a.restart if a.restart is not None else n // 2
    res: dict = {"relays": n, "listeners": big_l, "per_relay": counts, "port": a.port, "restart": k,
                 "hosts": relays.hosts, "poll_s": a.poll}  # fmt: skip
    res["env"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": " ".join(os.uname()[i] for i in (0, 2, 4)),
        "cpus": os.cpu_count(), "load_start": loadavg(),
        "homenet": subprocess.run([a.homenet, "--version"], capture_output=True, text=True).stdout.strip(),
        "tree": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True).stdout.strip()
        + ("" if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "--", "homenet"]).returncode == 0
           else "+dirty"),
        "relay_cmd": " ".join(relays.cmd(0)),
    }  # fmt: skip
    holder = None
    poller = None
    try:
        # -- 0. relays up, peered ---------------------------------------------------------------
        out(f"starting {n} relays on {relays.hosts[0]}..{relays.hosts[-1]}:{a.port} (BP={bp})")
        t0 = now()
        for i in range(n):
            relays.start(i)
        ready = [await relays.ready(i) for i in range(n)]
        poller = Poller(relays.addrs, keys / "admin.key")
        first, _ = await wait_until(poller, lambda i, v: converged(v, relays.addrs[i], relays.addrs, 0), 120, a.poll)
        if len(first) < n:
            raise RuntimeError(f"peers not up after 120 s: {n - len(first)} relays not converged")
        res["join"] = {"all_ready_s": round(max(ready) - t0, 2), "peers_up_s": round(max(first.values()) - t0, 2)}
        out(f"all READY in {res['join']['all_ready_s']} s, every peer up in {res['join']['peers_up_s']} s")
        await asyncio.sleep(2)
        pids = [relays.pid(i) for i in range(n)]
        rss0 = rss(pids)
        res["rss_before_kib"] = rss0

        # -- 1. register L listeners -------------------------------------------------------------
        holder = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "hold", "--relays-csv", ",".join(relays.addrs),
            "--counts", ",".join(map(str, counts)), "--inflight", str(a.inflight),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        (bp / "run" / "holder.pid").write_text(str(holder.pid))

        async def ask(cmd: str) -> dict:
            holder.stdin.write((cmd + "\n").encode())
            await holder.stdin.drain()
            while True:
                line = await holder.stdout.readline()
                if not line:
                    raise RuntimeError("the listener process exited")
                ev = json.loads(line)
                if ev["ev"] != "ready":
                    return ev

        hold_rss0 = None
        ev = json.loads(await holder.stdout.readline())
        hold_rss0 = memstat.measure([holder.pid])["rss_kib"]
        out(f"registering {big_l} listeners ({counts[0]} per relay, {math.ceil(counts[0] / STREAMS_PER_CHANNEL)} "
            f"channel(s) per relay, {a.inflight} in flight)")  # fmt: skip
        cr0 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        reg_task = asyncio.ensure_future(ask("register"))
        first, views = await wait_until(
            poller, lambda i, v: converged(v, relays.addrs[i], relays.addrs, big_l - counts[i]), a.timeout, a.poll
        )
        ev = await reg_task
        cr1 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        t0r = ev["t0"]
        res["register"] = {
            "registered": ev["registered"], "failed": ev["failed"], "errors": ev["errors"],
            "first_error": ev["first_error"], "register_s": round(ev["t1"] - t0r, 2),
            "converged_s": round(max(first.values()) - t0r, 2) if len(first) == n else None,
            "converged_relays": len(first),
            "per_relay_converged_s": [round(first[i] - t0r, 2) if i in first else None for i in range(n)],
            "per_s": round(ev["registered"] / max(1e-9, ev["t1"] - t0r), 0),
            # CPU seconds from the first register until every relay converged
            "relay_cpu_s": [round(y - x, 2) for x, y in zip(cr0[:n], cr1[:n], strict=True)],
            "holder_cpu_s": round(cr1[n] - cr0[n], 2),
        }  # fmt: skip
        out(f"registered {ev['registered']} (failed {ev['failed']}) in {res['register']['register_s']} s; "
            f"every relay converged {res['register']['converged_s']} s after the first register")  # fmt: skip
        if len(first) < n:
            res["register"]["views_at_timeout"] = [
                None if v is None else {t: list(s) for t, s in v.items()} for v in views
            ]

        # -- steady state: RSS, CPU, streams lost ---------------------------------------------
        c0 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        ts0 = now()
        await asyncio.sleep(a.settle)
        c1 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        wall = now() - ts0
        rss1 = rss(pids)
        st = await ask("status")
        hold_rss1 = memstat.measure([holder.pid])["rss_kib"]
        deltas = [b - x for x, b in zip(rss0, rss1, strict=True)]
        res["steady"] = {
            "settle_s": round(wall, 1),
            "relay_cpu_pct": [round(100 * (y - x) / wall, 1) for x, y in zip(c0[:n], c1[:n], strict=True)],
            "holder_cpu_pct": round(100 * (c1[n] - c0[n]) / wall, 1),
            "live": st["live"], "lost": st["lost"], "pongs": st["pongs"],
        }  # fmt: skip
        res["rss_after_kib"] = rss1
        res["memory"] = {
            "relay_rss_before_mib_median": round(statistics.median(rss0) / 1024, 1),
            "relay_rss_after_mib_median": round(statistics.median(rss1) / 1024, 1),
            "sum_increase_mib": round(sum(deltas) / 1024, 1),
            "fleet_bytes_per_listener": round(1024 * sum(deltas) / big_l),
            "relay_increase_kib": deltas,
            "holder_rss_mib": [round(hold_rss0 / 1024, 1), round(hold_rss1 / 1024, 1)],
            "holder_bytes_per_stream": round(1024 * (hold_rss1 - hold_rss0) / big_l),
        }  # fmt: skip
        out(f"steady {wall:.0f} s: live {st['live']}/{big_l}, lost {sum(st['lost'])}; relay CPU "
            f"{statistics.median(res['steady']['relay_cpu_pct'])}% median, listener process "
            f"{res['steady']['holder_cpu_pct']}%; relay RSS +{sum(deltas) / 1024:.1f} MiB in all = "
            f"{res['memory']['fleet_bytes_per_listener']} B/listener")  # fmt: skip

        # -- 2. kill -9 relay k, restart, re-register ----------------------------------------
        others = [i for i in range(n) if i != k]
        ak = relays.addrs[k]
        out(f"kill -9 relay{k} ({ak})")
        t_kill = now()
        relays.kill9(k)
        det, _ = await wait_until(
            poller, lambda i, v: v is not None and v.get(ak, ("", 0))[0] != "up", 30, a.poll, only=others
        )
        t_det = max(det.values()) if len(det) == len(others) else None
        relays.start(k)
        t_start = now()
        t_ready = await relays.ready(k)
        poller.renew(k)
        pids[k] = relays.pid(k)
        first, _ = await wait_until(
            poller, lambda i, v: converged(v, relays.addrs[i], relays.addrs, big_l - counts[k]),
            60, a.poll, only=[k],
        )  # fmt: skip
        t_kview = first.get(k)
        await asyncio.sleep(1)
        rss_k_dir = rss([pids[k]])[0]
        st = await ask("status")
        lost_k = st["lost"][k]
        ck0 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        reg_task = asyncio.ensure_future(ask(f"register {k}"))
        await asyncio.sleep(0)
        first, _ = await wait_until(
            poller, lambda i, v: converged(v, relays.addrs[i], relays.addrs, big_l - counts[i]), a.timeout, a.poll
        )
        ev = await reg_task
        ck1 = [cpu_s(p) for p in pids] + [cpu_s(holder.pid)]
        await asyncio.sleep(max(2.0, a.settle / 2))
        rss_k_full = rss([pids[k]])[0]
        st2 = await ask("status")

        def rel(t: float | None, since: float) -> float | None:
            return None if t is None else round(t - since, 2)

        res["restart_k"] = {
            "relay": k, "address": ak, "its_listeners": counts[k], "streams_lost": lost_k,
            "detected_by_all_s": rel(t_det, t_kill),
            "per_relay_detected_s": [rel(det.get(i), t_kill) for i in others],
            "restarted_ready_s": rel(t_ready, t_start),
            "own_view_converged_s": rel(t_kview, t_start),
            "reregister_s": round(ev["t1"] - ev["t0"], 2), "reregistered": ev["registered"], "failed": ev["failed"],
            "errors": ev["errors"], "first_error": ev["first_error"],
            "all_see_them_s": rel(max(first.values()) if len(first) == n else None, ev["t0"]),
            "all_see_them_since_kill_s": rel(max(first.values()) if len(first) == n else None, t_kill),
            "converged_relays": len(first),
            "live_after": st2["live"], "lost_after": st2["lost"],
            "reregister_cpu_s": {"relay_k": round(ck1[k] - ck0[k], 2), "holder": round(ck1[n] - ck0[n], 2),
                                 "other_relays": round(sum(ck1[i] - ck0[i] for i in others), 2)},
        }  # fmt: skip
        dir_entries = big_l - counts[k]
        res["memory"].update({
            "k_rss_fresh_kib": rss0[k], "k_rss_dir_only_kib": rss_k_dir, "k_rss_dir_and_own_kib": rss_k_full,
            "directory_bytes_per_entry": round(1024 * (rss_k_dir - rss0[k]) / max(1, dir_entries)),
            "own_listener_bytes": round(1024 * (rss_k_full - rss_k_dir) / max(1, counts[k])),
        })  # fmt: skip
        out(f"relay{k}: others saw it gone in {res['restart_k']['detected_by_all_s']} s; READY "
            f"{res['restart_k']['restarted_ready_s']} s after restart; its view converged "
            f"{res['restart_k']['own_view_converged_s']} s after restart; {ev['registered']} re-registered in "
            f"{res['restart_k']['reregister_s']} s; every relay sees them {res['restart_k']['all_see_them_s']} s "
            f"after the first re-register")  # fmt: skip
        res["sizes"] = sizes(counts[0], big_l)
        res["env"]["load_end"] = loadavg()
        with contextlib.suppress(Exception):
            await ask("quit")
    finally:
        if holder is not None and holder.returncode is None:
            with contextlib.suppress(Exception):
                holder.stdin.close()
            try:
                await asyncio.wait_for(holder.wait(), 15)
            except TimeoutError:
                holder.kill()
                await holder.wait()
            (bp / "run" / "holder.pid").unlink(missing_ok=True)
        if poller is not None:
            await poller.close()
        relays.stop_all()
    return res


def summary(r: dict) -> str:
    m, reg, st, rk, sz = r["memory"], r["register"], r["steady"], r["restart_k"], r["sizes"]
    lines = [
        f"Fleet at scale: {r['relays']} relays x {r['per_relay'][0]} listeners = {r['listeners']} "
        f"(homenet {r['env']['homenet']}, tree {r['env']['tree']}, {r['env']['cpus']} cpus, "
        f"load {' '.join(r['env']['load_start'])} at start)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| relays started -> all READY / every peer up everywhere | {r['join']['all_ready_s']} s / "
        f"{r['join']['peers_up_s']} s |",
        f"| register {r['listeners']} listeners (first register -> last registered) | {reg['register_s']} s "
        f"({reg['per_s']:.0f}/s; failed {reg['failed']}) |",
        f"| ... every relay's Peers shows all of them (first register -> converged) | {reg['converged_s']} s |",
        f"| CPU meanwhile: relays (sum) / listener process | {sum(reg['relay_cpu_s']):.1f} s / "
        f"{reg['holder_cpu_s']} s |",
        f"| steady state ({st['settle_s']} s): relay CPU median [min-max] | "
        f"{statistics.median(st['relay_cpu_pct'])}% [{min(st['relay_cpu_pct'])}-{max(st['relay_cpu_pct'])}] |",
        f"| steady state: the listener process's CPU (pongs to {r['listeners']} streams) | {st['holder_cpu_pct']}% |",
        f"| streams alive / lost | {st['live']} / {sum(st['lost'])} |",
        f"| kill -9 relay{rk['relay']} ({rk['its_listeners']} listeners): every other relay lists it not up | "
        f"{rk['detected_by_all_s']} s after the kill |",
        f"| restarted relay{rk['relay']}: READY / its own view of the fleet converged | "
        f"{rk['restarted_ready_s']} s / {rk['own_view_converged_s']} s after the restart |",
        f"| its {rk['its_listeners']} listeners re-registered at it (fresh streams) | {rk['reregister_s']} s "
        f"(failed {rk['failed']}) |",
        f"| ... every relay sees them again (first re-register -> converged) | {rk['all_see_them_s']} s |",
        f"| CPU meanwhile: relay{rk['relay']} / the other relays (sum) / listener process | "
        f"{rk['reregister_cpu_s']['relay_k']} s / {rk['reregister_cpu_s']['other_relays']} s / "
        f"{rk['reregister_cpu_s']['holder']} s |",
        f"| relay RSS before / after listeners, median | {m['relay_rss_before_mib_median']} / "
        f"{m['relay_rss_after_mib_median']} MiB |",
        f"| sum of relay RSS increases / L (fleet bytes per listener) | {m['fleet_bytes_per_listener']} B |",
        f"| directory copy, per entry (relay{rk['relay']} restarted: full directory, no own listener, vs fresh) | "
        f"{m['directory_bytes_per_entry']} B |",
        f"| own listener stream, per listener (relay{rk['relay']}: after vs before its own came back) | "
        f"{m['own_listener_bytes']} B |",
        f"| listener process RSS (L streams) | {m['holder_rss_mib'][1]} MiB "
        f"({m['holder_bytes_per_stream']} B/stream) |",
        f"| Snapshot of {sz['snapshot_entries']} entries on the wire (ids of {sz['listen_id_len']} chars) | "
        f"{sz['snapshot_bytes']} B ({sz['snapshot_bytes_per_entry']} B/entry) |",
        f"| one-entry Delta event (sent to each of N-1 watchers per registration) | {sz['delta_one_entry_bytes']} B |",
        f"| Python dict of {sz['python_dir_entries']} Entry (tracemalloc) | "
        f"{sz['python_dir_bytes_per_entry']} B/entry |",
    ]  # fmt: skip
    if reg.get("errors"):
        lines.append(f"registration errors: {reg['errors']} first: {reg['first_error']}")
    if rk.get("errors"):
        lines.append(f"re-registration errors: {rk['errors']} first: {rk['first_error']}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "hold":
        ap = argparse.ArgumentParser()
        ap.add_argument("hold")
        ap.add_argument("--relays-csv", required=True)
        ap.add_argument("--counts", required=True)
        ap.add_argument("--inflight", type=int, default=256)
        a = ap.parse_args()
        asyncio.run(hold_main(a))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=None)
    ap.add_argument("--relays", type=int, default=10)
    ap.add_argument("--listeners", type=int, default=10_000)
    ap.add_argument("--base", default="127.0.0.41", help="first relay address (then +1 each)")
    ap.add_argument("--port", type=int, default=16973)
    ap.add_argument("--restart", type=int, default=None, help="the relay to kill -9 and restart (default N//2)")
    ap.add_argument("--settle", type=float, default=10.0, help="steady-state window after registration (s)")
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between Peers polls")
    ap.add_argument("--inflight", type=int, default=256, help="registrations in flight at once")
    ap.add_argument("--timeout", type=float, default=180.0, help="deadline of each convergence (s)")
    ap.add_argument("--bp", default=os.environ.get("BP", "/tmp/hnb-fleet-scale"))
    ap.add_argument("--homenet", default=os.environ.get("HOMENET", str(ROOT / ".venv" / "bin" / "homenet")))
    a = ap.parse_args()
    if not a.base.startswith("127."):
        ap.error("--base must be on 127.0.0.0/8")
    outdir = Path(a.outdir or Path(a.bp) / "results" / time.strftime("scale-%Y%m%d-%H%M%S"))
    outdir.mkdir(parents=True, exist_ok=True)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    async def run() -> dict:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await coordinator(a)

    t0 = now()
    res = asyncio.run(run())
    res["wall_s"] = round(now() - t0, 1)
    (outdir / "fleet_scale.json").write_text(json.dumps(res, indent=1))
    text = summary(res) + f"\n\nwhole run {res['wall_s']} s; results: {outdir}"
    (outdir / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
