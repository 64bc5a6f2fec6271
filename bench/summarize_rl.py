#!/usr/bin/env python3
"""Summarize a bench/run_rl.sh output folder:  summarize_rl.py OUTDIR [OUTDIR...]

Remote Listen: HomeNet (relay + home) vs frp and ssh -R. Prints median [min-max] over the
repetitions, the CPU used by the relay and the home agent, memory of relay + home with
HOLD_N held connections, ratios against frp (medians, and paired per repetition), the
issue's targets (MET / MISSED), and the effect of the warm pool (hn-pool vs hn-nopool).
Labels are "SYSTEM#REP#MODE[#TOOL]" (as written by run_rl.sh).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import fmt, group, load, med, mib, ratio, rep_of, table, verdict

REF = "frp"
ORDER = ["frp", "ssh", "hn-pool", "hn-nopool", "hn-rl"]
HN_SYSTEMS = ["hn-pool", "hn-nopool", "hn-rl"]
DESCR = {
    "frp": "frps + frpc (frp 0.65 defaults: TLS, tcpMux)",
    "ssh": "sshd + ssh -N -R (default cipher)",
    "hn-pool": "HomeNet relay + home node, warm pool 4 (2 hops: home/IP:PORT)",
    "hn-nopool": "HomeNet relay + home node, --pool-size 0 (dial-back per client)",
    "hn-rl": "HomeNet relay + `homenet rl --to` (1 hop: LISTENID, one listener per service)",
}
TARGET_TPUT = 3.0  # single-stream throughput >= 3x frp
TARGET_SEQ = 2.0  # sequential conn/s >= 2x frp (and p99 setup latency <= frp's)
TARGET_RSS = 0.5  # RSS of relay + home with HOLD_N held <= 0.5x frp's


def systems_of(g):
    seen = {k[0] for k in g}
    return [s for s in ORDER if s in seen] + sorted(seen - set(ORDER))


def cpu_cells(cpu, labels, listen=False):
    """'relay/home[/listen]' CPU % of one core (medians over the labels)."""
    parts = []
    for fld in ("relay_cpu_s", "home_cpu_s") + (("listen_cpu_s",) if listen else ()):
        vals = [100.0 * cpu[lb][fld] / cpu[lb]["wall_s"] for lb in labels if lb in cpu and cpu[lb].get("wall_s")]
        parts.append("-" if not vals else f"{statistics.median(vals):.0f}")
    return "/".join(parts)


def cpu_per_conn(cpu, rs):
    """'relay/home' CPU milliseconds per successful connection (medians over the runs)."""
    parts = []
    for fld in ("relay_cpu_s", "home_cpu_s"):
        vals = [1000.0 * cpu[r["label"]][fld] / r["ok"] for r in rs if r.get("ok") and r["label"] in cpu]
        parts.append("-" if not vals else f"{statistics.median(vals):.2f}")
    return "/".join(parts)


def main(dirs):
    cpu = {r["label"]: r for r in load(dirs, "cpu.jsonl")}
    medians = {}  # (system, mode, tool, metric) -> median
    per_rep = {}  # (system, mode, tool, metric) -> {rep: value}

    def keep(s, m, tool, metric, rs, f=None):
        f = f or (lambda r: r.get(metric))
        medians[(s, m, tool, metric)] = med([f(r) for r in rs])
        per_rep[(s, m, tool, metric)] = {rep_of(r["label"]): f(r) for r in rs if f(r) is not None}

    print("Systems: " + "; ".join(f"{s} = {d}" for s, d in DESCR.items()))

    # -- throughput --------------------------------------------------------------------------------
    tput = group(load(dirs, "tput_hnperf.jsonl") + load(dirs, "tput_iperf3.jsonl"))
    for tool in ("hnperf", "iperf3"):
        modes = sorted({k[1] for k in tput if k[2] == tool})
        if not modes:
            continue
        hdr = ["system"] + [f"{m} Gbit/s" for m in modes]
        hdr += [f"{m} CPU% relay/home" + ("/listen" if tool == "iperf3" else "") for m in modes]
        rows = []
        for s in systems_of(tput):
            cells, cpus = [], []
            for m in modes:
                rs = tput.get((s, m, tool), [])
                errs = sum("error" in r for r in rs)
                keep(s, m, tool, "gbit_s", rs)
                cells.append(fmt([r.get("gbit_s") for r in rs]) + (f" ({errs} err)" if errs else ""))
                cpus.append(cpu_cells(cpu, [r["label"] for r in rs], listen=tool == "iperf3" and s.startswith("hn")))
            if any(tput.get((s, m, tool)) for m in modes):
                rows.append([s, *cells, *cpus])
        what = (
            "hnperf -M (same C client + sink for every row; HomeNet rows: the client speaks the preamble)"
            if tool == "hnperf"
            else "iperf3 (HomeNet rows: iperf3 -> `homenet listen` -> relay -> home: one more local process)"
        )
        table(f"Throughput public -> home, {what}; receiver side; P=streams", hdr, rows)

    # -- connections -------------------------------------------------------------------------------
    conn = group(load(dirs, "conn.jsonl"))
    if conn:
        hdr = [
            "system",
            "mode",
            "n",
            "conn/s",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "CPU% relay/home",
            "CPU ms/conn relay/home",
            "errors",
        ]
        rows = []
        for s in systems_of(conn):
            for m in ("seq", "conc"):
                rs = conn.get((s, m, ""), [])
                if not rs:
                    continue
                errs = sum(sum(r.get("errors", {}).values()) for r in rs)
                for metric in ("conn_per_s", "p50_ms", "p99_ms"):
                    keep(s, m, "", metric, rs)
                rows.append(
                    [
                        s,
                        m + (f" c={rs[0].get('c')}" if m == "conc" else ""),
                        rs[0].get("n"),
                        fmt([r.get("conn_per_s") for r in rs], 0),
                        fmt([r.get("p50_ms") for r in rs], 3),
                        fmt([r.get("p99_ms") for r in rs], 3),
                        fmt([r.get("mean_ms") for r in rs], 3),
                        cpu_cells(cpu, [r["label"] for r in rs]),
                        cpu_per_conn(cpu, rs),
                        errs,
                    ]
                )
        table("Connection setup (connect + 1-byte echo + close; latency = connect -> echo received)", hdr, rows)

    # -- memory ------------------------------------------------------------------------------------
    hold = group(load(dirs, "hold.jsonl"))
    if hold:
        hdr = [
            "system",
            "held/alive",
            "idle RSS r+h",
            "held RSS relay",
            "held RSS home",
            "held RSS r+h",
            "held PSS r+h",
            "peak RSS r+h",
        ]
        rows = []
        for s in systems_of(hold):
            rs = hold.get((s, "hold", ""), [])
            if not rs:
                continue

            def both(r, when, fld):
                m = r.get(when, {})
                if not m.get("server") or not m.get("client"):
                    return None
                return mib(m["server"].get(fld, 0) + m["client"].get(fld, 0))

            def one(r, when, grp, fld):
                v = r.get(when, {}).get(grp, {}).get(fld)
                return None if v is None else mib(v)

            keep(s, "hold", "", "rss_mib", rs, lambda r: both(r, "mem_held", "rss_kib"))
            keep(s, "hold", "", "pss_mib", rs, lambda r: both(r, "mem_held", "pss_kib"))
            rows.append(
                [
                    s,
                    "/".join(
                        str(int(statistics.median([r.get(k) or 0 for r in rs]))) for k in ("ok", "alive_after_hold")
                    ),
                    fmt([both(r, "mem_before", "rss_kib") for r in rs], 1),
                    fmt([one(r, "mem_held", "server", "rss_kib") for r in rs], 1),
                    fmt([one(r, "mem_held", "client", "rss_kib") for r in rs], 1),
                    fmt([both(r, "mem_held", "rss_kib") for r in rs], 1),
                    fmt([both(r, "mem_held", "pss_kib") for r in rs], 1),
                    fmt([both(r, "mem_peak", "hwm_kib") for r in rs], 1),
                ]
            )
        table(
            "Memory of relay + home agent (MiB; process trees; fresh processes per run) with the connections "
            "held idle (r+h = relay + home)",
            hdr,
            rows,
        )

    # -- ratios vs frp and targets -----------------------------------------------------------------
    def paired(s, mode, tool, metric):
        a, b = per_rep.get((s, mode, tool, metric), {}), per_rep.get((REF, mode, tool, metric), {})
        return med([ratio(a[k], b[k]) for k in a if k in b])

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    figures = [
        ("P1 Gbit/s (hnperf)", "P1", "hnperf", "gbit_s"),
        ("P8 Gbit/s (hnperf)", "P8", "hnperf", "gbit_s"),
        ("P1 Gbit/s (iperf3)", "P1", "iperf3", "gbit_s"),
        ("P8 Gbit/s (iperf3)", "P8", "iperf3", "gbit_s"),
        ("seq conn/s", "seq", "", "conn_per_s"),
        ("seq p50 ms", "seq", "", "p50_ms"),
        ("seq p99 ms", "seq", "", "p99_ms"),
        ("conc conn/s", "conc", "", "conn_per_s"),
        ("conc p99 ms", "conc", "", "p99_ms"),
        ("held RSS r+h MiB", "hold", "", "rss_mib"),
        ("held PSS r+h MiB", "hold", "", "pss_mib"),
    ]
    systems = [s for s in ORDER if any(k[0] == s for k in medians)]
    others = [s for s in systems if s != REF]
    if REF in systems and others:
        rows = []
        for name, mode, tool, metric in figures:
            ref = medians.get((REF, mode, tool, metric))
            if ref is None:
                continue
            row = [name, f"{ref:.2f}"]
            for s in others:
                v = medians.get((s, mode, tool, metric))
                row.append("-" if v is None else f"{v:.2f} = {x(ratio(v, ref))} ({x(paired(s, mode, tool, metric))})")
            rows.append(row)
        table(
            "Ratios vs frp: value = median/frp's median (median of the per-repetition ratios)",
            ["figure", "frp", *others],
            rows,
        )

        rows = []
        for s in [s for s in HN_SYSTEMS if s in systems]:
            t = ratio(medians.get((s, "P1", "hnperf", "gbit_s")), medians.get((REF, "P1", "hnperf", "gbit_s")))
            t3 = ratio(medians.get((s, "P1", "iperf3", "gbit_s")), medians.get((REF, "P1", "iperf3", "gbit_s")))
            rows.append([s, f"1-stream throughput >= {TARGET_TPUT:g}x frp (hnperf)", x(t), verdict(t, TARGET_TPUT)])
            if t3 is not None:
                rows.append(["", "  (same with iperf3 via `homenet listen`)", x(t3), verdict(t3, TARGET_TPUT)])
            c = ratio(medians.get((s, "seq", "", "conn_per_s")), medians.get((REF, "seq", "", "conn_per_s")))
            rows.append([s, f"seq conn/s >= {TARGET_SEQ:g}x frp", x(c), verdict(c, TARGET_SEQ)])
            hp, fp = medians.get((s, "seq", "", "p99_ms")), medians.get((REF, "seq", "", "p99_ms"))
            p = ratio(hp, fp)
            rows.append(
                [
                    s,
                    "seq p99 setup latency <= frp's",
                    "-" if p is None else f"{hp:.3f} vs {fp:.3f} ms ({x(p)})",
                    verdict(p, 1.0, higher=False),
                ]
            )
            r = ratio(medians.get((s, "hold", "", "rss_mib")), medians.get((REF, "hold", "", "rss_mib")))
            rows.append([s, f"RSS relay+home, held <= {TARGET_RSS:g}x frp", x(r), verdict(r, TARGET_RSS, higher=False)])
        if rows:
            table("Targets (ratios of the medians, same run)", ["system", "target", "ratio", "verdict"], rows)

    # -- warm pool ----------------------------------------------------------------------------------
    if any(k[0] == "hn-pool" for k in medians) and any(k[0] == "hn-nopool" for k in medians):
        rows = []
        for name, mode, tool, metric in figures[4:9]:
            on, off = medians.get(("hn-pool", mode, tool, metric)), medians.get(("hn-nopool", mode, tool, metric))
            if on is None or off is None:
                continue
            a = per_rep.get(("hn-pool", mode, tool, metric), {})
            b = per_rep.get(("hn-nopool", mode, tool, metric), {})
            pr = med([ratio(a[k], b[k]) for k in a if k in b])
            rows.append([name, f"{on:.2f}", f"{off:.2f}", f"{x(ratio(on, off))} ({x(pr)})"])
        if rows:
            table(
                "Warm pool: hn-pool (4 parked connections) vs hn-nopool (dial-back per client)",
                ["figure", "pool on", "pool off", "on/off (paired)"],
                rows,
            )

    prof = load(dirs, "profile.jsonl")
    if prof:
        rows = [
            [
                r["label"].split("#")[0],
                r["label"].split("#")[-1],
                f"{r.get('conn_per_s') or 0:.0f}",
                f"{r.get('p50_ms', 0):.3f}",
                f"{r.get('p99_ms', 0):.3f}",
                cpu_per_conn(cpu, [r]),
            ]
            for r in prof
        ]
        table(
            "Profile runs (seq; bare = no profiler; profiles in OUTDIR/profile/SYSTEM.{relay,home}.*.txt)",
            ["system", "run", "conn/s", "p50 ms", "p99 ms", "CPU ms/conn relay/home"],
            rows,
        )

    for d in dirs:
        env = os.path.join(d, "env.txt")
        if os.path.exists(env):
            with open(env) as f:
                print("\n" + "".join(ln for ln in f if ln.startswith(("load average", "homenet", "REPS"))).rstrip())


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
