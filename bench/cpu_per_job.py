#!/usr/bin/env python3
"""Server CPU time per job (the server process's user + system time over a run, divided by
the jobs done) for several builds or settings, in alternating rounds whose order flips
every round. Throughput on this shared VM moves with whatever else runs; the CPU a job
costs the server moves much less, so small differences show here first.

    bench/cpu_per_job.py ROUNDS SECONDS CLIENTS 'LABEL=[ENV=VALUE ...] BINARY [serve flags]' ...

Servers start as in compare.py (SQLite store in a temporary directory, info log to a
file, test routes on); the client is the same submit-then-poll client on /api/states_mean.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import client_binary, start  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    rounds, seconds, clients = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    client = client_binary()
    dirs = [tempfile.TemporaryDirectory() for _ in sys.argv[4:]]
    servers = [start(spec, 5400 + i, d.name) for i, (spec, d) in enumerate(zip(sys.argv[4:], dirs))]

    def run(port, secs):
        out = subprocess.run([client, f"http://127.0.0.1:{port}", "/api/states_mean",
                              "/api/get_results/", clients, str(secs)],
                             capture_output=True, text=True)
        return json.loads(out.stdout)

    try:
        for _, port, _ in servers:  # warm-up
            run(port, 1)
        cost = {label: [] for label, _, _ in servers}
        rate = {label: [] for label, _, _ in servers}
        for r in range(rounds):
            for label, port, proc in (servers if r % 2 == 0 else servers[::-1]):
                before = cpu_seconds(proc.pid)
                res = run(port, seconds)
                cost[label].append((cpu_seconds(proc.pid) - before) / res["jobs"] * 1e6)
                rate[label].append(res["jobs_per_s"])
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{label} {cost[label][-1]:.1f} us/job ({rate[label][-1]:.0f} jobs/s)"
                for label, _, _ in servers), flush=True)
        print(f"\n{clients} clients, {rounds} rounds of {seconds} s; medians:")
        print(f"{'':16} {'us/job':>7} {'jobs/s':>8}")
        for label, _, _ in servers:
            print(f"{label:16} {statistics.median(cost[label]):7.1f} "
                  f"{statistics.median(rate[label]):8.0f}")
    finally:
        for _, _, proc in servers:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
