#!/usr/bin/env python3
"""Summarize a bench/run_http.sh output folder:  summarize_http.py OUTDIR [OUTDIR...]

HTTP requests/s through HomeNet's gateway vs frp (vhost HTTP), haproxy (mode http) and
direct: median [min-max] over the repetitions, wrk's p50/p99 latency, the CPU of the relay,
the home agent and nginx, CPU per request, and the ratios homenet/frp, homenet/haproxy
(medians, and paired per repetition). Labels are "SYSTEM#REP#MODE" (as written by run_http.sh).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import fmt, load, med, ratio, rep_of, table

ORDER = ["direct", "haproxy", "frp", "homenet", "homenet-route"]
HN_SYSTEMS = ["homenet", "homenet-route"]
MODE_ORDER = ["1k-c1", "1k-c50", "1m-c1", "1m-c50", "close-c1"]
DESCR = {
    "direct": "wrk -> nginx",
    "haproxy": "haproxy mode http -> nginx",
    "frp": "frps vhostHTTPPort + frpc type=http (Host: web.relay.test)",
    "homenet": "HomeNet relay gateway + `homenet rl --to nginx` (Host: web.relay.test)",
    "homenet-route": "the same, routed by `HN-Route: web`",
}
MODE_DESCR = {
    "1k-c1": "1 KiB, 1 connection, keep-alive",
    "1k-c50": "1 KiB, 50 connections, keep-alive",
    "1m-c1": "1 MiB, 1 connection, keep-alive",
    "1m-c50": "1 MiB, 50 connections, keep-alive",
    "close-c1": "1 KiB, 1 connection, Connection: close (a new connection per request)",
}


def parts(label):
    p = (label or "").split("#")
    p += [""] * (3 - len(p))
    return p[0], p[1], p[2]  # system, rep, mode


def ordered(seen, order):
    return [x for x in order if x in seen] + sorted(set(seen) - set(order))


def errors_of(r):
    if "error" in r:
        return 1
    return sum((r.get("errors") or {}).values())


def main(dirs):
    runs = load(dirs, "http.jsonl")
    cpu = {r["label"]: r for r in load(dirs, "cpu.jsonl")}
    by = defaultdict(list)  # (system, mode) -> runs
    for r in runs:
        s, _, m = parts(r.get("label"))
        by[(s, m)].append(r)
    systems = ordered({k[0] for k in by}, ORDER)
    modes = ordered({k[1] for k in by}, MODE_ORDER)

    if systems:
        print("Systems: " + "; ".join(f"{s} = {DESCR.get(s, s)}" for s in systems))

    def pct(rs, fld):
        vals = [100.0 * cpu[r["label"]][fld] / cpu[r["label"]]["wall_s"] for r in rs
                if r["label"] in cpu and cpu[r["label"]].get("wall_s")]  # fmt: skip
        return med(vals)

    def us_per_req(rs, fld):
        vals = [1e6 * cpu[r["label"]][fld] / r["requests"] for r in rs if r.get("requests") and r["label"] in cpu]
        return med(vals)

    medians = {}  # (system, mode, metric) -> median
    per_rep = {}  # (system, mode, metric) -> {rep: value}
    for m in modes:
        rows = []
        for s in systems:
            rs = by.get((s, m), [])
            if not rs:
                continue
            ok = [r for r in rs if "error" not in r]
            for metric in ("req_per_s", "p50_ms", "p99_ms", "mbyte_per_s"):
                medians[(s, m, metric)] = med([r.get(metric) for r in ok])
                per_rep[(s, m, metric)] = {rep_of(r["label"]): r.get(metric) for r in ok}

            def cell(v, nd=0, unit=""):
                return "-" if v is None else f"{v:.{nd}f}{unit}"

            has_relay = s != "direct"
            has_home = s not in ("direct", "haproxy")
            cpus = "/".join(
                [cell(pct(ok, "relay_cpu_s")) if has_relay else "-", cell(pct(ok, "home_cpu_s")) if has_home else "-"]
            )
            per_req = "/".join(
                [
                    cell(us_per_req(ok, "relay_cpu_s")) if has_relay else "-",
                    cell(us_per_req(ok, "home_cpu_s")) if has_home else "-",
                ]
            )
            rows.append(
                [
                    s,
                    fmt([r.get("req_per_s") for r in ok], 0),
                    cell(medians[(s, m, "mbyte_per_s")], 1),
                    cell(medians[(s, m, "p50_ms")], 3),
                    cell(medians[(s, m, "p99_ms")], 3),
                    cpus,
                    per_req,
                    cell(pct(ok, "nginx_cpu_s")),
                    sum(errors_of(r) for r in rs),
                ]
            )
        table(
            f"{m}: {MODE_DESCR.get(m, m)}; median [min-max] over repetitions",
            ["system", "req/s", "MiB/s", "p50 ms", "p99 ms", "CPU% relay/home", "CPU us/req relay/home",
             "nginx CPU%", "errors"],
            rows,
        )  # fmt: skip

    # -- ratios ------------------------------------------------------------------------------------
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    def paired(a_sys, b_sys, m, metric):
        a, b = per_rep.get((a_sys, m, metric), {}), per_rep.get((b_sys, m, metric), {})
        return med([ratio(a[k], b[k]) for k in a if k in b])

    refs = [r for r in ("frp", "haproxy", "direct") if r in systems]
    hns = [s for s in HN_SYSTEMS if s in systems]
    if refs and hns:
        rows = []
        for m in modes:
            for s in hns:
                v = medians.get((s, m, "req_per_s"))
                if v is None:
                    continue
                row = [m, s, f"{v:.0f}"]
                for ref in refs:
                    rv = medians.get((ref, m, "req_per_s"))
                    row.append(f"{x(ratio(v, rv))} ({x(paired(s, ref, m, 'req_per_s'))})")
                p99, fp99 = medians.get((s, m, "p99_ms")), medians.get(("frp", m, "p99_ms"))
                row.append(x(ratio(p99, fp99)))
                rows.append(row)
        table(
            "Ratios of requests/s, same run: median/median (median of the per-repetition ratios)",
            ["mode", "system", "req/s", *[f"vs {r}" for r in refs], "p99 vs frp"],
            rows,
        )

    prof = load([os.path.join(d, "profile") for d in dirs], "http.jsonl")
    if prof:
        pcpu = {r["label"]: r for r in load([os.path.join(d, "profile") for d in dirs], "cpu.jsonl")}
        rows = []
        for r in prof:
            c = pcpu.get(r["label"], {})
            w = c.get("wall_s") or 0
            rows.append(
                [
                    parts(r["label"])[2],
                    f"{r.get('req_per_s', 0):.0f}",
                    f"{r.get('p50_ms', 0):.3f}",
                    f"{r.get('p99_ms', 0):.3f}",
                    "-" if not w else f"{100 * c['relay_cpu_s'] / w:.0f}/{100 * c['home_cpu_s'] / w:.0f}",
                ]
            )
        table(
            "homenet under py-spy (OUTDIR/profile/MODE.{relay,home}.pyspy.txt; py-spy itself costs some req/s)",
            ["mode", "req/s", "p50 ms", "p99 ms", "CPU% relay/home"],
            rows,
        )

    for d in dirs:
        checks = os.path.join(d, "check.txt")
        if os.path.exists(checks):
            with open(checks) as f:
                lines = f.read().split("\n")
            bad = [ln for ln in lines if "WRONG" in ln]
            n = sum(1 for ln in lines if ln.strip())
            print(f"\nResponse check (status + body sha256 of both files per system): {n - len(bad)}/{n} ok")
            for ln in bad:
                print("  " + ln)
        lst = os.path.join(d, "listeners.json")
        if os.path.exists(lst):
            try:
                with open(lst) as f:
                    data = json.load(f)
                items = data if isinstance(data, list) else data.get("listeners", [])
                for it in items:
                    print(
                        f"Relay listener {it.get('listen_id', '?')} after the run (no request open): "
                        f"active_sessions = {it.get('active_sessions')} (should be 0), total_sessions = "
                        f"{it.get('total_sessions')}, bytes up/down = {it.get('bytes_up')}/{it.get('bytes_down')}"
                    )
            except (ValueError, AttributeError) as exc:
                print(f"listeners.json unreadable: {exc}")
        env = os.path.join(d, "env.txt")
        if os.path.exists(env):
            with open(env) as f:
                print(
                    "\n"
                    + "".join(
                        ln for ln in f if ln.startswith(("load average", "homenet", "REPS", "HOMENET_", "haproxy"))
                    ).rstrip()
                )


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
