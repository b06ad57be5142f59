#!/usr/bin/env python3
"""Range-query and rollup timings of tally builds on the same 2,000,000 points, alternating.

    bench/series_query.py ROUNDS 'label=BINARY' ...

Each round starts each build fresh (`serve --store memory`, retention long enough), writes
one series of POINTS points (default 2,000,000: one a second with +-20 ms jitter,
integers 10..=25, ending an hour ago) over `/write`, then times, REPS times each (median):

  raw 100k    GET /v1/series/NAME?from=&to=     100,000 raw points (decoded from blocks)
  step 1 min  GET /v1/series/NAME?step=60000&agg=sum   every block decoded (33,334 buckets)
  step 1 h    GET /v1/series/NAME?step=3600000&agg=max most blocks from their aggregates
  refresh     POST /v1/series/rollups/refresh  rollups of every series recomputed
  rollups     GET /v1/series/NAME/rollups      the published rollup (33,334 windows)

and prints the medians per build (median over rounds) and after/before ratios against
the first build. Client and server share the machine: run it under the benchmark lock.
"""
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

POINTS = int(os.environ.get("TALLY_BENCH_POINTS", "2000000"))
REPS = int(os.environ.get("TALLY_BENCH_REPS", "15"))
PORT = int(os.environ.get("TALLY_BENCH_PORT", "5098"))
NAME = "q,set=jittered:value"


def batches():
    rng = random.Random(13)
    end = (int(time.time()) - 3600) * 1000
    start = end - POINTS * 1000
    lines = [
        f"q,set=jittered value={rng.randint(10, 25)} {start + i * 1000 + rng.randint(-20, 20)}\n"
        for i in range(POINTS)
    ]
    return start, ["".join(lines[i : i + 100_000]).encode() for i in range(0, POINTS, 100_000)]


def request(conn, method, path, body=None):
    conn.request(method, path, body=body)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        raise SystemExit(f"{method} {path}: {r.status} {data[:200]!r}")
    return data


def run(binary, start, bodies, log):
    days = POINTS // 86400 + 3
    proc = subprocess.Popen(
        [binary, "serve", "--bind", f"127.0.0.1:{PORT}", "--store", "memory", "--log-level", "warn",
         "--log-file", log, "--retention", str(days * 86400), "--rollup-interval", "3600"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                c = http.client.HTTPConnection("127.0.0.1", PORT)
                request(c, "GET", "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        for b in bodies:
            request(c, "POST", "/write?precision=ms", b)
        frm = start + POINTS // 2 * 1000
        cases = [
            ("raw 100k", "GET", f"/v1/series/{NAME}?from={frm}&to={frm + 100_000 * 1000 - 500}"),
            ("step 1 min", "GET", f"/v1/series/{NAME}?step=60000&agg=sum"),
            ("step 1 h", "GET", f"/v1/series/{NAME}?step=3600000&agg=max"),
            ("refresh", "POST", "/v1/series/rollups/refresh"),
            ("rollups", "GET", f"/v1/series/{NAME}/rollups"),
        ]
        out = {}
        for label, method, path in cases:
            times = []
            for _ in range(REPS):
                t = time.perf_counter()
                request(c, method, path, b"{}" if method == "POST" else None)
                times.append(time.perf_counter() - t)
            out[label] = statistics.median(times) * 1000
        return out
    finally:
        proc.terminate()
        proc.wait()


def main():
    rounds = int(sys.argv[1])
    builds = [a.split("=", 1) for a in sys.argv[2:]]
    start, bodies = batches()
    log = os.path.join(tempfile.mkdtemp(), "tally.log")
    results = {label: [] for label, _ in builds}
    for r in range(rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for label, binary in order:
            results[label].append(run(binary, start, bodies, log))
    cases = list(results[builds[0][0]][0])
    print(f"{POINTS} points, {rounds} rounds, median of {REPS} requests per round (ms)")
    print(f'{"case":<12}' + "".join(f"{label:>14}" for label, _ in builds) + "".join(
        f'{label + "/" + builds[0][0]:>18}' for label, _ in builds[1:]))
    for case in cases:
        med = [statistics.median(x[case] for x in results[label]) for label, _ in builds]
        print(f"{case:<12}" + "".join(f"{m:14.2f}" for m in med) + "".join(f"{m / med[0]:17.2f}x" for m in med[1:]))


if __name__ == "__main__":
    main()
