#!/usr/bin/env python3
"""Summarize a bench/run_fleet.sh output folder:  summarize_fleet.py OUTDIR [OUTDIR...]

A fleet of two relays: the client at the owner relay (relay_a holds the listeners) vs at the
non-owner (relay_b forwards over one internal hop to relay_a). Prints median [min-max] over the
repetitions, the CPU of each process, relay_b's forwarded hops per connection, and the
non-owner/owner ratios (of the medians, and paired: the median of the same-repetition ratios).
Labels are "VIA#REP#MODE[#TOOL]" with VIA = owner | non-owner (as written by run_fleet.sh).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import fmt, group, load, med, ratio, rep_of, table

VIAS = ["owner", "non-owner"]
DESCR = {
    "owner": "client -> relay_a (holds the listener) -> home",
    "non-owner": "client -> relay_b -> one forwarded hop -> relay_a -> home",
}


def cpu_pct(cpu, labels, procs):
    """'a/b/c' CPU % of one core of each process (medians over the labels)."""
    parts = []
    for p in procs:
        vals = [100.0 * cpu[lb][f"{p}_cpu_s"] / cpu[lb]["wall_s"] for lb in labels if cpu.get(lb, {}).get("wall_s")]
        parts.append("-" if not vals else f"{statistics.median(vals):.0f}")
    return "/".join(parts)


def cpu_ms(cpu, rs, procs):
    """'a/b/c' CPU milliseconds per successful connection of each process (medians)."""
    parts = []
    for p in procs:
        vals = [1000.0 * cpu[r["label"]][f"{p}_cpu_s"] / r["ok"] for r in rs if r.get("ok") and r["label"] in cpu]
        parts.append("-" if not vals else f"{statistics.median(vals):.2f}")
    return "/".join(parts)


def fwd_per(fwd, rs, per="ok"):
    """relay_b's forwarded hops during these runs, per successful connection (or per run)."""
    vals = []
    for r in rs:
        f = fwd.get(r["label"])
        if not f or f["forwarded_before"] < 0 or f["forwarded_after"] < 0:
            continue
        d = f["forwarded_after"] - f["forwarded_before"]
        vals.append(d / r["ok"] if per == "ok" and r.get("ok") else d)
    return "-" if not vals else f"{statistics.median(vals):.2f}"


def main(dirs):
    cpu = {r["label"]: r for r in load(dirs, "cpu.jsonl")}
    fwd = {r["label"]: r for r in load(dirs, "fwd.jsonl")}
    medians = {}
    per_rep = {}

    def keep(v, m, tool, metric, rs):
        medians[(v, m, tool, metric)] = med([r.get(metric) for r in rs])
        per_rep[(v, m, tool, metric)] = {rep_of(r["label"]): r.get(metric) for r in rs if r.get(metric) is not None}

    print("Paths: " + "; ".join(f"{v} = {d}" for v, d in DESCR.items()))

    tput = group(load(dirs, "tput_hnperf.jsonl"))
    if tput:
        modes = sorted({k[1] for k in tput})
        hdr = ["via", *(f"{m} Gbit/s" for m in modes), *(f"{m} CPU% relay_a/relay_b/home" for m in modes)]
        hdr.append("hops fwd by relay_b per run")
        rows = []
        for v in VIAS:
            cells, cpus, allrs = [], [], []
            for m in modes:
                rs = tput.get((v, m, "hnperf"), [])
                allrs += rs
                errs = sum("error" in r for r in rs)
                keep(v, m, "hnperf", "gbit_s", rs)
                cells.append(fmt([r.get("gbit_s") for r in rs]) + (f" ({errs} err)" if errs else ""))
                cpus.append(cpu_pct(cpu, [r["label"] for r in rs], ("relay_a", "relay_b", "rl_sink")))
            if allrs:
                rows.append([v, *cells, *cpus, fwd_per(fwd, allrs, per="run")])
        table("Throughput client -> home (hnperf -M to the hnperf sink through listener s1), receiver side", hdr, rows)

    conn = group(load(dirs, "conn.jsonl"))
    if conn:
        hdr = ["via", "mode", "n", "conn/s", "p50 ms", "p99 ms", "mean ms", "CPU% relay_a/relay_b/home",
               "CPU ms/conn relay_a/relay_b/home", "fwd/conn", "errors"]  # fmt: skip
        rows = []
        for m in ("seq", "conc"):
            for v in VIAS:
                rs = conn.get((v, m, ""), [])
                if not rs:
                    continue
                errs = sum(sum(r.get("errors", {}).values()) for r in rs)
                for metric in ("conn_per_s", "p50_ms", "p99_ms", "mean_ms"):
                    keep(v, m, "", metric, rs)
                procs = ("relay_a", "relay_b", "rl_echo")
                rows.append([
                    v, m + (f" c={rs[0].get('c')}" if m == "conc" else ""), rs[0].get("n"),
                    fmt([r.get("conn_per_s") for r in rs], 0), fmt([r.get("p50_ms") for r in rs], 3),
                    fmt([r.get("p99_ms") for r in rs], 3), fmt([r.get("mean_ms") for r in rs], 3),
                    cpu_pct(cpu, [r["label"] for r in rs], procs), cpu_ms(cpu, rs, procs), fwd_per(fwd, rs), errs,
                ])  # fmt: skip
        table("Connection setup through listener h1 (connect + 1-byte echo + close; latency = connect -> echo)",
              hdr, rows)  # fmt: skip

    name = {"gbit_s": "Gbit/s", "conn_per_s": "conn/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms", "mean_ms": "mean ms"}

    def num(x):
        return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 10 else f"{x:.3f}"

    order = {"gbit_s": 0, "conn_per_s": 1, "p50_ms": 2, "p99_ms": 3, "mean_ms": 4}
    rows = []
    for (v, m, tool, metric), a in sorted(
        medians.items(), key=lambda kv: (kv[0][2] != "hnperf", kv[0][1] != "seq", kv[0][1], order.get(kv[0][3], 9))
    ):
        if v != "owner":
            continue
        b = medians.get(("non-owner", m, tool, metric))
        pa, pb = per_rep.get(("owner", m, tool, metric), {}), per_rep.get(("non-owner", m, tool, metric), {})
        paired = med([ratio(pb[k], pa[k]) for k in pa if k in pb])
        r = ratio(b, a)
        rows.append([
            f"{m} {name.get(metric, metric)}", num(a), num(b),
            "-" if r is None else f"{r:.2f}x", "-" if paired is None else f"{paired:.2f}x",
        ])  # fmt: skip
    if rows:
        table(
            "Non-owner / owner (the extra internal hop): ratios of the medians, and paired "
            "(median of the same-repetition ratios)",
            ["figure", "owner", "non-owner", "B/A", "paired"],
            rows,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
