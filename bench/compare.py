#!/usr/bin/env python3
"""Compares tally builds or settings on the submit-then-poll benchmark, in alternating
rounds, because on a shared VM the machine's speed drifts by ±30% within minutes: only
runs interleaved in time compare fairly.

    bench/compare.py ROUNDS SECONDS CLIENTS 'LABEL=[ENV=VALUE ...] BINARY [serve flags]' ...

Each spec starts one server (SQLite store in a temporary directory unless the flags
name --store, info log to a file, the bundled-in test routes on). Every round runs the
no-op ceiling against the first server, then /api/states_mean against each server in
turn. Prints each run and the medians, with the ratio to the median ceiling.

Example (a build from before a change against the current one, and a setting):

    cargo build --release && cp target/release/tally /tmp/tally-new
    bench/compare.py 8 3 32 'old=/tmp/tally-old' 'new=/tmp/tally-new' \\
        'normal=/tmp/tally-new --sqlite-sync normal'
"""
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client_binary():
    subprocess.run(["cargo", "bench", "--bench", "submit_poll", "--no-run", "--quiet"],
                   cwd=ROOT, check=True)
    found = [p for p in glob.glob(os.path.join(ROOT, "target/release/deps/submit_poll-*"))
             if not p.endswith(".d")]
    return max(found, key=os.path.getmtime)


def start(spec, port, work):
    label, rest = spec.split("=", 1)
    parts = shlex.split(rest)
    env = dict(os.environ)
    while parts and "=" in parts[0] and not parts[0].startswith(("/", ".")):
        key, value = parts.pop(0).split("=", 1)
        env[key] = value
    binary, flags = parts[0], parts[1:]
    store = [] if "--store" in flags else ["--store", f"sqlite:{work}/tally.db"]
    args = [os.path.abspath(binary), "serve", "--bind", f"127.0.0.1:{port}",
            "--enable-test-jobs", "--log-file", f"{work}/tally.log",
            "--stats-dataset", os.path.join(ROOT, "tests/fixtures/health.csv")]
    proc = subprocess.Popen(args + store + flags, env=env, cwd=work)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
            return label, port, proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"{label}: server did not start")


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    rounds, seconds, clients = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    client = client_binary()
    dirs = [tempfile.TemporaryDirectory() for _ in sys.argv[4:]]
    servers = [start(spec, 5300 + i, d.name) for i, (spec, d) in enumerate(zip(sys.argv[4:], dirs))]

    def run(port, route, result, secs):
        out = subprocess.run([client, f"http://127.0.0.1:{port}", route, result,
                              str(clients), str(secs)], capture_output=True, text=True)
        return json.loads(out.stdout)

    try:
        for _, port, _ in servers:  # warm-up
            run(port, "/api/states_mean", "/api/get_results/", 1)
        ceiling, results = [], {label: [] for label, _, _ in servers}
        for r in range(rounds):
            ceiling.append(run(servers[0][1], "/api/noop", "/api/noop_result/", seconds))
            for label, port, _ in servers:
                results[label].append(run(port, "/api/states_mean", "/api/get_results/", seconds))
            print(f"round {r + 1}/{rounds}: ceiling {ceiling[-1]['jobs_per_s']:.0f}, " +
                  ", ".join(f"{label} {v[-1]['jobs_per_s']:.0f}" for label, v in results.items()),
                  flush=True)
        top = statistics.median(c["jobs_per_s"] for c in ceiling)
        print(f"\n{clients} clients, {rounds} rounds of {seconds:g} s; medians:")
        print(f"{'':16} {'jobs/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}")
        print(f"{'no-op ceiling':16} {top:8.0f} {'100%':>6}")
        for label, runs in results.items():
            med = statistics.median(x["jobs_per_s"] for x in runs)
            p50 = statistics.median(x["p50_ms"] for x in runs)
            p99 = statistics.median(x["p99_ms"] for x in runs)
            errors = sum(x["errors"] for x in runs)
            print(f"{label:16} {med:8.0f} {med / top:6.0%} {p50:7.2f} {p99:7.2f}" +
                  (f"  !! {errors} errors" if errors else ""))
    finally:
        for _, _, proc in servers:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
