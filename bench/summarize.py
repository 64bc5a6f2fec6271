#!/usr/bin/env python3
"""Summarize a bench/run.sh output folder:  summarize.py OUTDIR [OUTDIR...]

Prints median [min-max] over repetitions for each system, the relay CPU used, and the
HomeNet ratios against haproxy and direct with the targets for one HomeNet hop.
Labels are "SYSTEM#REP#MODE[#TOOL]" (as written by run.sh).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

HN, HNL = "homenet", "homenet-listen"
RSS_TARGET_MIB = 40.0


def load(dirs, name):
    rows = []
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p):
            with open(p) as f:
                rows += [json.loads(x) for x in f if x.strip().startswith("{")]
    return rows


def rep_of(label):
    parts = (label or "").split("#")
    return parts[1] if len(parts) > 1 else ""


def key(label):
    parts = (label or "").split("#")
    parts += [""] * (4 - len(parts))
    return parts[0], parts[2], parts[3]  # system, mode, tool


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(vals, nd=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} [{min(vals):.{nd}f}-{max(vals):.{nd}f}]"


def table(title, header, rows):
    print(f"\n{title}")
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip())


def group(rows):
    g = defaultdict(list)
    for r in rows:
        g[key(r.get("label"))].append(r)
    return g


def systems_of(g):
    order = ["direct", "haproxy", HN, HNL]
    seen = {k[0] for k in g}
    return [s for s in order if s in seen] + sorted(seen - set(order))


def mib(kib):
    return None if kib is None else kib / 1024.0


def cpu_pct(cpu, labels):
    """Relay CPU % (of one core) during the measurements with these labels."""
    vals = [100.0 * cpu[lb]["relay_cpu_s"] / cpu[lb]["wall_s"] for lb in labels if lb in cpu and cpu[lb]["wall_s"]]
    return vals


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def verdict(value, target, higher=True):
    if value is None:
        return "n/a"
    ok = value >= target if higher else value <= target
    return "MET" if ok else "MISSED"


def main(dirs):
    cpu = {r["label"]: r for r in load(dirs, "cpu.jsonl")}
    medians = {}  # (system, mode, tool, metric) -> median
    per_rep = {}  # (system, mode, tool, metric) -> {rep: value}, for paired ratios

    tput = group(load(dirs, "tput_iperf3.jsonl") + load(dirs, "tput_hnperf.jsonl"))
    if tput:
        for tool in ("hnperf", "iperf3"):
            modes = sorted({k[1] for k in tput if k[2] == tool})
            if not modes:
                continue
            hdr = ["system"] + [f"{m} Gbit/s" for m in modes] + [f"{m} relay CPU%" for m in modes]
            rows = []
            for s in systems_of(tput):
                cells, cpus, any_row = [], [], False
                for m in modes:
                    rs = tput.get((s, m, tool), [])
                    any_row |= bool(rs)
                    errs = sum("error" in r for r in rs)
                    vals = [r.get("gbit_s") for r in rs]
                    medians[(s, m, tool, "gbit_s")] = med(vals)
                    per_rep[(s, m, tool, "gbit_s")] = {rep_of(r["label"]): r.get("gbit_s") for r in rs}
                    cells.append(fmt(vals) + (f" ({errs} err)" if errs else ""))
                    cpus.append(fmt(cpu_pct(cpu, [r["label"] for r in rs]), 0) if s != "direct" else "-")
                if any_row:
                    rows.append([s, *cells, *cpus])
            what = (
                "hnperf (bench/hnperf.c; 'homenet' = preamble client, one hop)"
                if tool == "hnperf"
                else "iperf3 ('homenet-listen' = iperf3 -> homenet listen -> node)"
            )
            table(f"Throughput, {what}; receiver side; P=streams public->home, R=home->public", hdr, rows)

    conn = group(load(dirs, "conn.jsonl"))
    if conn:
        hdr = ["system", "mode", "conn/s", "p50 ms", "p99 ms", "mean ms", "relay CPU%", "errors"]
        rows = []
        for s in systems_of(conn):
            for m in ("seq", "conc"):
                rs = conn.get((s, m, ""), [])
                if not rs:
                    continue
                errs = sum(sum(r.get("errors", {}).values()) for r in rs)
                for metric in ("conn_per_s", "p50_ms", "p99_ms"):
                    medians[(s, m, "", metric)] = med([r.get(metric) for r in rs])
                    per_rep[(s, m, "", metric)] = {rep_of(r["label"]): r.get(metric) for r in rs}
                rows.append(
                    [
                        s,
                        m + (f" c={rs[0].get('c')}" if m == "conc" else ""),
                        fmt([r.get("conn_per_s") for r in rs], 0),
                        fmt([r.get("p50_ms") for r in rs], 3),
                        fmt([r.get("p99_ms") for r in rs], 3),
                        fmt([r.get("mean_ms") for r in rs], 3),
                        fmt(cpu_pct(cpu, [r["label"] for r in rs]), 0) if s != "direct" else "-",
                        errs,
                    ]
                )
        table("Connection setup (connect + 1-byte echo + close; latency = connect -> echo)", hdr, rows)

    hold = group(load(dirs, "hold.jsonl"))
    if hold:
        hdr = [
            "system",
            "held/alive",
            "open s",
            "node RSS idle",
            "node RSS held",
            "node PSS held",
            "node peak RSS",
            "listen RSS held",
            "listen PSS held",
        ]
        rows = []
        for s in systems_of(hold):
            rs = hold.get((s, "hold", ""), [])
            if not rs:
                continue

            def m(when, grp, fld, rs=rs):
                return [mib(r.get(when, {}).get(grp, {}).get(fld)) if r.get(when, {}).get(grp) else None for r in rs]

            medians[(s, "hold", "", "rss_mib")] = med(m("mem_held", "server", "rss_kib"))
            medians[(s, "hold", "", "pss_mib")] = med(m("mem_held", "server", "pss_kib"))
            rows.append(
                [
                    s,
                    "/".join(
                        str(int(statistics.median([r.get(k) or 0 for r in rs]))) for k in ("ok", "alive_after_hold")
                    ),
                    fmt([r.get("open_s") for r in rs], 2),
                    fmt(m("mem_before", "server", "rss_kib"), 1),
                    fmt(m("mem_held", "server", "rss_kib"), 1),
                    fmt(m("mem_held", "server", "pss_kib"), 1),
                    fmt(m("mem_peak", "server", "hwm_kib"), 1),
                    fmt(m("mem_held", "client", "rss_kib"), 1),
                    fmt(m("mem_held", "client", "pss_kib"), 1),
                ]
            )
        table(
            "Memory with N idle spliced connections held open (MiB; 'node' = the relay process: haproxy "
            "for haproxy; fresh node per run for HomeNet)",
            hdr,
            rows,
        )

    # -- ratios and targets ------------------------------------------------------------------------
    rows = []

    def add(what, hn_sys, mode, tool, metric, target_hap=None, target_dir=None):
        hv = medians.get((hn_sys, mode, tool, metric))
        hp = medians.get(("haproxy", mode, tool, metric))
        dv = medians.get(("direct", mode, tool, metric))
        if hv is None:
            return
        rh, rd = ratio(hv, hp), ratio(hv, dv)

        def paired(other):  # median over repetitions of the same-repetition ratio
            a, b = per_rep.get((hn_sys, mode, tool, metric), {}), per_rep.get((other, mode, tool, metric), {})
            r = med([ratio(a[k], b[k]) for k in a if k in b])
            return "-" if r is None else f"{r:.2f}x"

        rows.append(
            [
                what,
                f"{hv:.2f}",
                "-" if rh is None else f"{rh:.2f}x",
                "-" if rd is None else f"{rd:.2f}x",
                f"{paired('haproxy')} {paired('direct')}",
                f">= {target_hap}x haproxy: {verdict(rh, target_hap)}" if target_hap else "",
                f">= {target_dir}x direct: {verdict(rd, target_dir)}" if target_dir else "",
            ]
        )

    for m in sorted({k[1] for k in medians if k[2] == "hnperf"}):
        add(f"throughput {m} Gbit/s (hnperf, {HN})", HN, m, "hnperf", "gbit_s", 1.5, 0.5)
    for m in sorted({k[1] for k in medians if k[2] == "iperf3"}):
        add(f"throughput {m} Gbit/s (iperf3, {HNL})", HNL, m, "iperf3", "gbit_s")
    for s in (HN, HNL):
        add(f"seq conn/s ({s})", s, "seq", "", "conn_per_s", 0.7 if s == HN else None)
        add(f"seq p50 ms ({s})", s, "seq", "", "p50_ms")
        add(f"seq p99 ms ({s})", s, "seq", "", "p99_ms")
        add(f"conc conn/s ({s})", s, "conc", "", "conn_per_s")
    for s in (HN, HNL):
        rss = medians.get((s, "hold", "", "rss_mib"))
        pss = medians.get((s, "hold", "", "pss_mib"))
        if rss is not None:
            rows.append(
                [
                    f"node RSS, {s}, held (MiB)",
                    f"{rss:.1f} (PSS {pss:.1f})",
                    "",
                    "",
                    "",
                    f"<= {RSS_TARGET_MIB:g} MiB: {verdict(rss, RSS_TARGET_MIB, higher=False)}" if s == HN else "",
                    "",
                ]
            )
    if rows:
        table(
            "HomeNet vs haproxy and direct: ratios of the medians (the targets use these; targets are for one "
            "HomeNet hop = 'homenet').\n'paired' = median over repetitions of the same-repetition ratio "
            "(/haproxy /direct): less sensitive to outside load that hit one repetition",
            ["figure", "HomeNet", "/haproxy", "/direct", "paired", "target", "target"],
            rows,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["."])
