#!/usr/bin/env bash
# CSV column sums: `tally sum FILE --every 10` against polars (scan_csv), DuckDB
# (read_csv), pandas (read_csv usecols) and `wc -l`, on one ~1 GB file of
# 1.5 million rows x 100 numeric columns (values like 123.456, as the engine's own
# benchmark generator writes them). Best of RUNS (default 3) wall-clock runs each, file
# in the page cache; prints a table with ratios and checks that every tool's sums agree
# within 1e-6 relative.
#
#   bench/csv_sum.sh                 # ROWS=1500000 COLS=100 EVERY=10 RUNS=3
#   ROWS=200000 bench/csv_sum.sh     # a quick run
#
# The Python tools live in a venv cached at target/bench-venv; the CSV under
# target/bench-data/. Tests never assert timings; this script only prints them.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1500000}
COLS=${COLS:-100}
EVERY=${EVERY:-10}
RUNS=${RUNS:-3}
VENV=target/bench-venv
DATA=target/bench-data
FILE=$DATA/sums_${ROWS}x${COLS}.csv

if ! "$VENV/bin/python" -c 'import polars, duckdb, pandas' 2>/dev/null; then
    echo "setting up $VENV (polars, duckdb, pandas)..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q polars duckdb pandas
fi

echo "building tally (release)..." >&2
cargo build --release -q --bin tally
TALLY=$PWD/target/release/tally

mkdir -p "$DATA"
if [ ! -s "$FILE" ]; then
    echo "generating $FILE ($ROWS rows x $COLS columns)..." >&2
    "$VENV/bin/python" - "$FILE" "$ROWS" "$COLS" <<'PY'
import sys
import numpy as np
import polars as pl

path, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(7)
chunk = 100_000
with open(path, "wb") as f:
    f.write((",".join(f"c{c}" for c in range(cols)) + "\n").encode())
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        v = rng.integers(0, 1_000_000, size=(n, cols))
        df = pl.DataFrame({f"c{c}": v[:, c] for c in range(cols)}).select(
            pl.format("{}.{}", pl.col(f"c{c}") // 1000,
                      (pl.col(f"c{c}") % 1000).cast(pl.Utf8).str.zfill(3)).alias(f"c{c}")
            for c in range(cols)
        )
        df.write_csv(f, include_header=False, quote_style="never")
        done += n
PY
fi

"$VENV/bin/python" - "$FILE" "$EVERY" "$RUNS" "$TALLY" <<'PY'
import json
import os
import subprocess
import sys
import time

import duckdb
import pandas as pd
import polars as pl

path, every, runs, tally = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(path) as f:
    header = f.readline().rstrip("\n").split(",")
cols = header[0::every]
size = os.path.getsize(path)


def run_tally():
    out = subprocess.run([tally, "sum", path, "--every", str(every)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_polars():
    df = pl.scan_csv(path).select([pl.col(c).sum() for c in cols]).collect()
    return {c: float(df[c][0]) for c in cols}


def run_duckdb():
    con = duckdb.connect()
    q = ", ".join(f'sum("{c}")' for c in cols)
    row = con.execute(f"SELECT {q} FROM read_csv('{path}', header=true)").fetchall()[0]
    con.close()
    return {c: float(x) for c, x in zip(cols, row)}


def run_pandas():
    s = pd.read_csv(path, usecols=cols).sum()
    return {c: float(s[c]) for c in cols}


def run_wc():
    subprocess.run(["wc", "-l", path], check=True, capture_output=True)
    return None


tools = [("tally sum", run_tally), ("polars scan_csv", run_polars),
         ("duckdb read_csv", run_duckdb), ("pandas read_csv", run_pandas),
         ("wc -l", run_wc)]

# Warm the page cache once.
run_wc()
best, sums = {}, {}
for name, fn in tools:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t)
    best[name] = min(times)
    if r is not None:
        sums[name] = r
    print(f"  {name:16} best {best[name]:.3f} s  runs {' '.join(f'{x:.3f}' for x in times)}",
          file=sys.stderr)

ref = sums["tally sum"]
agree = True
for name, s in sums.items():
    for c in cols:
        a, b = ref[c], s[c]
        if abs(a - b) > 1e-6 * max(abs(a), abs(b), 1.0):
            agree = False
            print(f"DISAGREE {name} {c}: tally {a!r} vs {b!r}", file=sys.stderr)

t = best["tally sum"]
print(f"\nfile: {path}, {size / 1e9:.2f} GB, {len(header)} columns, summing {len(cols)} "
      f"(every {every}); best of {runs}; {os.cpu_count()} cores\n")
print("| tool | best s | GB/s | time / tally |")
print("|---|---|---|---|")
for name, _ in tools:
    b = best[name]
    print(f"| {name} | {b:.3f} | {size / 1e9 / b:.2f} | {b / t:.2f}x |")
print(f"\nsums agree within 1e-6 relative: {'yes' if agree else 'NO'}")
sys.exit(0 if agree else 1)
PY
