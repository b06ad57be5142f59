#!/usr/bin/env python3
"""Line-protocol payloads as agents send them, one file per 10,000-line batch.

    bench/lp_payload.py KIND DIR BATCHES [CONNS]

KIND:
  single        `demo,host=hN value=V <ms>`: one series per connection, integers 10..=25
                like the demo upstream, timestamps 1 ms apart (send with precision=ms).
  interleaved   `sensor,host=hN,region=rM value=F.FFF <ns>`: each connection (agent) owns
                700 series; a batch holds ~14 rounds of its 700 series, one line per series
                per round, series alternating line by line (rounds 1 s apart).
  series10k     `sensor,host=hN,region=rM,dc=dK,rack=rJ,env=E value=F.FFF <ns>`: each
                connection owns 10,000 series with 5 tags; a batch is one round of all of
                them (rounds 10 s apart).

Connection c sends the files `DIR/c<c>-<k>.lp`, k = 0, 1, ... in order, so its series'
timestamps only go forward (each connection is one agent and owns its own series).
Timestamps end an hour before now, well inside both servers' retention. Written by this
script, not by tally, so the client side of the benchmark owes nothing to tally.
"""
import os
import random
import sys
import time

BATCH = 10_000


def series_interleaved(conn):
    return [f"sensor,host=h{conn * 700 + i},region=r{i % 8} value=" for i in range(700)]


def series_single(conn):
    return [f"demo,host=h{conn} value="]


def series_10k(conn):
    out = []
    for i in range(10_000):
        n = conn * 10_000 + i
        out.append(
            f"sensor,host=h{n},region=r{n % 8},dc=d{n % 3},rack=k{n % 50},env={'prod' if n % 4 else 'test'} value="
        )
    return out


def main():
    kind, out_dir, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conns = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    make, step_ns = {
        "interleaved": (series_interleaved, 1_000_000_000),
        "series10k": (series_10k, 10_000_000_000),
        "single": (series_single, 1_000_000),
    }[kind]
    unit = 1_000_000 if kind == "single" else 1  # ms for the single-series payload
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(13)
    per_conn = (batches + conns - 1) // conns
    for conn in range(conns):
        prefixes = make(conn)
        rounds = per_conn * BATCH // len(prefixes) + 1
        t = (time.time_ns() // 1_000_000_000 - 3600) * 1_000_000_000 - rounds * step_ns
        t //= unit
        step = step_ns // unit
        line = 0
        lines = []
        k = 0
        while k < per_conn:
            ts = f" {t}\n"
            for p in prefixes:
                if kind == "single":
                    lines.append(f"{p}{rng.randint(10, 25)}{ts}")
                else:
                    lines.append(f"{p}{rng.randrange(100_000) / 1000:.3f}{ts}")
                line += 1
                if line == BATCH:
                    with open(os.path.join(out_dir, f"c{conn}-{k}.lp"), "w") as f:
                        f.write("".join(lines))
                    lines, line, k = [], 0, k + 1
                    if k == per_conn:
                        break
            t += step


if __name__ == "__main__":
    main()
