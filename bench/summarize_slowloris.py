#!/usr/bin/env python3
"""Summarize a bench/run_slowloris.sh output folder:  summarize_slowloris.py OUTDIR [OUTDIR...]

Latency of a real client (probe round trips, ms) with no attack and under a slow-handshake
attack, per system: median over the repetitions of each repetition's p50 / p99 / max, with
[min-max] of the p99s; the HomeNet/haproxy ratio of the medians (and the median of the
same-repetition ratios); what the attacker saw (sockets opened, closed by the server, how),
the relay's CPU while the probe ran, and the connections established on the public port.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any

ORDER = ["homenet", "haproxy"]
METRICS = ("p50_ms", "p99_ms", "max_ms")


def load(dirs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        path = os.path.join(d, "slowloris.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(dirs: list[str]) -> None:
    rows = load(dirs)
    if not rows:
        sys.exit("no slowloris.jsonl in " + " ".join(dirs))
    systems = [s for s in ORDER if any(r["system"] == s for r in rows)]
    systems += sorted({r["system"] for r in rows} - set(systems))
    by = {(r["system"], r["phase"], r["rep"]): r for r in rows}

    def ok(r: dict[str, Any] | None) -> bool:
        return r is not None and "error" not in r["probe"]

    def vals(system: str, phase: str, metric: str) -> list[float]:
        return [r["probe"][metric] for (s, p, _), r in sorted(by.items()) if s == system and p == phase and ok(r)]

    reps = sorted({r["rep"] for r in rows})
    print(f"Probe round trips, ms (median over {len(reps)} repetitions of each run's p50 / p99 / max;")
    print("[min-max] of the p99s; probes slower than 10 ms / 100 ms / 1 s, all repetitions).")
    print("idle = no attack; attack = while the slow sockets are held.\n")
    out = []
    for s in systems:
        for phase in ("idle", "attack"):
            p99s = vals(s, phase, "p99_ms")
            cells = [fmt(med(vals(s, phase, m))) for m in METRICS]
            cells[1] += f" [{fmt(min(p99s))}-{fmt(max(p99s))}]" if p99s else ""
            tries = [r["probe"]["tries"] for (s2, p, _), r in by.items() if s2 == s and p == phase and ok(r)]
            fails = sum(1 for (s2, p, _), r in by.items() if s2 == s and p == phase and not ok(r))
            runs = f"{len(tries)}x{med(tries) or 0:.0f}" + (f" ({fails} failed)" if fails else "")
            every = [
                x for (s2, p, _), r in by.items() if s2 == s and p == phase and ok(r) for x in r["probe"]["all_ms"]
            ]
            slow = "/".join(str(sum(x > lim for x in every)) for lim in (10, 100, 1000))
            out.append([f"{s} {phase}", *cells, runs, slow])
    print(table(["system", "p50", "p99 [min-max]", "max", "probes", ">10ms/>100ms/>1s"], out))

    if "homenet" in systems and "haproxy" in systems:
        print()
        for phase in ("idle", "attack"):
            parts = []
            for m in METRICS:
                a, b = med(vals("homenet", phase, m)), med(vals("haproxy", phase, m))
                paired = [
                    by[("homenet", phase, k)]["probe"][m] / by[("haproxy", phase, k)]["probe"][m]
                    for k in reps
                    if ok(by.get(("homenet", phase, k)))
                    and ok(by.get(("haproxy", phase, k)))
                    and by[("haproxy", phase, k)]["probe"][m] > 0
                ]
                rat = f"{a / b:.2f}x" if a is not None and b else "-"
                parts.append(f"{m[:-3]} {rat} (paired {fmt(med(paired))}x)")
            print(f"HomeNet/haproxy {phase}: " + ", ".join(parts))
        hn, hap = med(vals("homenet", "attack", "p99_ms")), med(vals("haproxy", "attack", "p99_ms"))
        print(
            f"\n=> p99 under attack, HomeNet/haproxy: {hn / hap:.2f}x"
            if hn is not None and hap
            else "\n=> p99 ratio: -"
        )

    print("\nAttacker and relay, per run (attack phase):")
    out.clear()
    for (s, phase, rep), r in sorted(by.items(), key=lambda kv: (systems.index(kv[0][0]), kv[0][2])):
        if phase != "attack":
            continue
        att: dict[str, Any] = r.get("attacker") or {}
        endings = ", ".join(f"{k!r}: {v}" for k, v in sorted(att.get("endings", {}).items(), key=lambda kv: -kv[1])[:3])
        wall = r.get("wall_s") or 0
        cpu = f"{100 * r['relay_cpu_s'] / wall:.0f}%" if wall else "-"
        err = r["probe"].get("error", "")
        out.append(
            [
                f"{s} #{rep}",
                str(att.get("opened", "-")),
                str(att.get("closed_by_server", "-")),
                endings or "-",
                str(r.get("established", "-")),
                cpu,
                err[:60],
            ]
        )
    print(table(["run", "opened", "closed", "closed how (top 3)", "estab.", "relay CPU", "probe error"], out))
    print("\nopened/closed: sockets the attacker opened / saw closed by the server over the whole attack;")
    print("estab.: connections established on the public port when the probe started;")
    print("relay CPU: the relay process's CPU time / wall time during the probe (100% = one core).")


if __name__ == "__main__":
    main(sys.argv[1:] or sys.exit(__doc__))
