#!/usr/bin/env python3
"""Bulk throughput through a TCP relay/tunnel with iperf3.

  bench_tput.py HOST:PORT [-P 1] [-t 10] [--reverse] [--label X]

HOST:PORT is the tunnel's public side; it must reach an `iperf3 -s` server
(the "home service").  Prints one JSON object: receiver-side Gbit/s, sender
retransmits, and the CPU use iperf3 reports for its own two ends.
--reverse (iperf3 -R) sends home -> public instead of public -> home.
"""

import argparse
import json
import re
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("-P", type=int, default=1)
    ap.add_argument("-t", type=int, default=10)
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    cmd = ["iperf3", "-c", host, "-p", port, "-t", str(a.t), "-P", str(a.P), "-J"]
    if a.reverse:
        cmd.append("-R")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.t + 60)
    out = {"target": a.target, "label": a.label, "P": a.P, "t": a.t, "reverse": a.reverse}
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        m = re.search(r'"error":\s*"([^"]*)"', p.stdout)
        out["error"] = m.group(1) if m else (p.stderr or p.stdout)[-300:]
        print(json.dumps(out))
        return 1
    if "error" in j:
        out["error"] = j["error"]
        print(json.dumps(out))
        return 1
    end = j["end"]
    out["gbit_s"] = round(end["sum_received"]["bits_per_second"] / 1e9, 3)
    out["sender_gbit_s"] = round(end["sum_sent"]["bits_per_second"] / 1e9, 3)
    out["retransmits"] = end["sum_sent"].get("retransmits")
    cpu = end.get("cpu_utilization_percent", {})
    out["iperf_cpu_host_pct"] = round(cpu.get("host_total", 0), 1)
    out["iperf_cpu_remote_pct"] = round(cpu.get("remote_total", 0), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
