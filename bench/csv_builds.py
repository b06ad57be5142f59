#!/usr/bin/env python3
"""Two tally builds on the CSV column sum, alternating run by run (the order swapped each
round, because this VM's speed drifts): wall and CPU time medians, and whether their sums
agree byte for byte.

    bench/csv_builds.py BEFORE_BINARY AFTER_BINARY [ROUNDS]   (default 10)

The CSV (300,000 rows x 100 columns of ddd.ddd, ~236 MB) is written once to
target/bench-data/builds_300000x100.csv. Prints numbers only; nothing is asserted.
"""
import os
import random
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV = os.path.join(ROOT, "target/bench-data/builds_300000x100.csv")


def write_csv(path, rows=300_000, cols=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(7)
    with open(path + ".tmp", "w") as f:
        f.write(",".join(f"c{c}" for c in range(cols)) + "\n")
        for _ in range(rows):
            f.write(",".join(f"{rng.randrange(1000)}.{rng.randrange(1000):03d}"
                             for _ in range(cols)) + "\n")
    os.replace(path + ".tmp", path)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bins = {"before": sys.argv[1], "after": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    if not os.path.exists(CSV):
        write_csv(CSV)
    runs = {k: [] for k in bins}
    outs = {}
    for r in range(rounds):
        for k in (list(bins) if r % 2 == 0 else list(bins)[::-1]):
            t0 = time.perf_counter()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run([bins[k], "sum", CSV, "--every", "10", "--quiet"],
                                 capture_output=True, check=True).stdout
            wall = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
            runs[k].append((wall, cpu))
            outs[k] = out
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in runs.items()}
    for k, (w, c) in med.items():
        print(f"{k:7} wall median {w:.3f} s  cpu median {c:.3f} s  (n={len(runs[k])})")
    print(f"after / before: cpu {med['after'][1] / med['before'][1]:.3f}, "
          f"wall {med['after'][0] / med['before'][0]:.3f}")
    print("sums identical:", outs["before"] == outs["after"])


if __name__ == "__main__":
    main()
