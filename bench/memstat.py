#!/usr/bin/env python3
"""Memory of process trees, from /proc.

    memstat.py PID[,PID...] [PID...]     -> JSON on stdout

Each PID is a tree root; all its descendants are included (sshd forks a child
per session, socat forks per connection, haproxy has master+worker).
Reports, summed over the tree: rss_kib (VmRSS now), hwm_kib (VmHWM = peak RSS
of each process since it started), pss_kib (proportional set size, fair for
forked children that share pages), nproc.
"""

import json
import os
import sys


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(roots):
    kids = _children_map()
    out, stack = [], list(roots)
    while stack:
        p = stack.pop()
        if p in out:
            continue
        out.append(p)
        stack.extend(kids.get(p, []))
    return out


def _status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(roots):
    pids = [p for p in tree(roots) if os.path.exists(f"/proc/{p}")]
    return {
        "nproc": len(pids),
        "rss_kib": sum(_status_kib(p, "VmRSS") for p in pids),
        "hwm_kib": sum(_status_kib(p, "VmHWM") for p in pids),
        "pss_kib": sum(_pss_kib(p) for p in pids),
    }


def parse_pids(args):
    out = []
    for a in args:
        out.extend(int(x) for x in a.split(",") if x.strip())
    return out


if __name__ == "__main__":
    print(json.dumps(measure(parse_pids(sys.argv[1:]))))
