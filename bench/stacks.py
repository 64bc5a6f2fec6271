#!/usr/bin/env python3
"""Top functions of a py-spy "raw" (collapsed stacks) profile.

    stacks.py FILE.raw [--top 25] [--seconds S --rate R]

Each input line is ``frame;frame;...;leaf COUNT`` (``py-spy record --format raw``).
Prints the functions with the most *self* samples (the leaf: where the CPU was) and the
most *inclusive* samples (on the stack: what the time was spent under), as % of all
samples; with --seconds and --rate also as % of wall time (how busy the thread was).
Line numbers are dropped so that one function is one row.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r":\d+\)$")


def norm(frame: str) -> str:
    frame = _LINE.sub(")", frame.strip())
    # short file names: keep the last two path parts
    m = re.match(r"(.*) \((.*)\)$", frame)
    if m:
        func, path = m.groups()
        path = "/".join(path.split("/")[-2:])
        return f"{func} ({path})"
    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seconds", type=float, default=0.0, help="sampling duration")
    ap.add_argument("--rate", type=float, default=0.0, help="samples per second")
    a = ap.parse_args()
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(a.file) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = [norm(x) for x in stack.split(";") if x]
            if not frames:
                continue
            total += n
            self_c[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        print("no samples")
        return
    possible = a.seconds * a.rate
    busy = f", {100.0 * total / possible:.0f}% of the wall time" if possible else ""
    print(f"{total} samples{busy}")
    for title, c in (("self (leaf) time", self_c), ("inclusive time", incl)):
        print(f"\n  {title}: % of samples" + ("  % of wall" if possible else ""))
        for fr, n in c.most_common(a.top):
            wall = f"  {100.0 * n / possible:5.1f}" if possible else ""
            print(f"  {100.0 * n / total:5.1f}{wall}  {fr}")


if __name__ == "__main__":
    main()
