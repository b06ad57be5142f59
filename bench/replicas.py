#!/usr/bin/env python3
"""Submit-then-poll throughput of tally with 1, 2 and 3 replicas on one Redis, against
Celery with a Redis broker and result backend, driven by the same Python client design
at the same concurrency; then the time from a kill -9 of a replica to the last of its
jobs finishing on another.

    cargo build --release
    flock -x /tmp/tally-cpu.lock python3 bench/replicas.py [--seconds 10] [--clients 32]

Everything runs on this machine: a private redis-server on a free port (no persistence,
the same for both systems; --aof always to measure with fsync), tally replicas
(`target/release/tally serve --store redis://...`, --workers 2 each, the default on two
cores) and Celery worker nodes (prefork, --concurrency 2 each: one node per tally
replica). Celery comes from PyPI, pinned, in bench/.venv, which the script creates.

The client: P processes x T threads (the same for both systems). Each thread loops:
  - tally: POST /v1/jobs {"kind": "test.echo", "params": {"n": i}} on one replica, then
    GET /api/get_results/{id} until done (that route holds a poll up to --poll-hold-ms
    for a job this replica runs), pausing --poll-pause-ms between polls. With several
    replicas the client round-robins over them itself (no nginx) and polls the *next*
    replica, not the one that took the job: every poll is a cross-replica read. HTTP is
    a small keep-alive client on a raw socket (see Http);
  - Celery: echo.delay(i), then AsyncResult.get() (the Redis backend waits on pub/sub).
Both tasks return their argument, which the client checks. jobs/s counts jobs whose
result the client saw, after a warm-up; p50/p99 are submit -> result seen. CPU ms/job is
the CPU time of the client processes, the servers (tally replicas, or Celery nodes with
their pool processes) and redis-server over the measured window, per job.

The failover part starts 3 replicas with --lease-ms L, fills the queue with
test.sleep jobs, kills one replica (kill -9) while both its workers run jobs, and
reports the time from the kill to the last reclaimed job (attempts >= 2) finishing on a
survivor, which the lease bounds (L + the job's own time + a reclaim scan).
"""

import argparse
import http.client
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv"
# Pinned, so that a rerun measures the same Celery.
PIP_PINS = ["celery[redis]==5.6.3"]


def ensure_venv():
    """Re-runs this script inside bench/.venv, creating it (and installing Celery) first."""
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists() or subprocess.run(
        [py, "-c", "import celery, redis"], capture_output=True
    ).returncode:
        print(f"creating {VENV} with {' '.join(PIP_PINS)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PIP_PINS],
            check=True,
        )
    os.execv(py, [str(py), __file__, *sys.argv[1:]])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    until = time.time() + timeout
    while time.time() < until:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"{what} did not listen on {port}")


class Procs:
    """Every child this script starts, stopped by pid at the end."""

    def __init__(self):
        self.children = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
        self.children.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.children):
            self.stop(p)


def redis_cli(port, *args):
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True
    ).stdout


CLK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pids):
    """CPU seconds (user + system) used so far by these processes and their children."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = raw[raw.rindex(")") + 2:].split()
            stats[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / CLK)
    want = set(pids)
    grew = True
    while grew:
        extra = {p for p, (pp, _) in stats.items() if pp in want and p not in want}
        want |= extra
        grew = bool(extra)
    return sum(stats[p][1] for p in want if p in stats)


# ---------------------------------------------------------------- the client

class Http:
    """A keep-alive HTTP/1.1 client on one socket: the request written in one send, the
    answer read by its Content-Length. http.client does the same with ~4x the CPU per
    request, and the client shares the two cores with the servers it measures."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.buf = b""

    def request(self, method, path, body=b""):
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        if body:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            self.buf += chunk
        end = self.buf.index(b"\r\n\r\n") + 4
        lines = self.buf[:end].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        while len(self.buf) < end + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[end:end + length], self.buf[end + length:]
        return status, data

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def tally_thread(submit, poll, end, warm, pause, out):
    cs = Http(submit)
    cp = cs if poll == submit else Http(poll)
    lat, errors, polls, n = [], 0, 0, 0
    while True:
        t0 = time.perf_counter()
        if time.time() >= end:
            break
        n += 1
        try:
            body = json.dumps({"kind": "test.echo", "params": {"n": n}}).encode()
            status, data = cs.request("POST", "/v1/jobs", body)
            if status != 202:
                errors += 1
                continue
            jid = json.loads(data)["id"]
            while True:
                # The statistics API's poll: it waits up to --poll-hold-ms for a job
                # this replica runs, instead of answering "running" at once.
                status, data = cp.request("GET", f"/api/get_results/{jid}")
                res = json.loads(data)
                polls += 1
                if res["status"] == "done":
                    if res["data"] != {"n": n}:
                        errors += 1
                    break
                if res["status"] != "running":
                    errors += 1
                    break
                time.sleep(pause)
        except (OSError, ValueError, IndexError):
            errors += 1
            cs.close()
            cp.close()
            continue
        if t0 >= warm and time.time() < end:
            lat.append(time.perf_counter() - t0)
    out.append((lat, errors, polls))


def celery_thread(app_dir, end, warm, out):
    sys.path.insert(0, app_dir)
    from bench_celery_app import echo  # noqa: E402 (needs the path and the broker env)

    lat, errors, n = [], 0, 0
    while True:
        t0 = time.perf_counter()
        if time.time() >= end:
            break
        n += 1
        try:
            if echo.delay(n).get(timeout=30) != n:
                errors += 1
                continue
        except Exception:  # a timeout or a broker error counts, and the run goes on
            errors += 1
            continue
        if t0 >= warm and time.time() < end:
            lat.append(time.perf_counter() - t0)
    out.append((lat, errors, 0))


def client_process(kind, targets, threads, index, start, warm_s, seconds, app_dir, pause, q):
    while time.time() < start:
        time.sleep(0.001)
    warm = time.perf_counter() + warm_s
    end = start + warm_s + seconds
    out = []
    ts = []
    for t in range(threads):
        k = index * threads + t
        if kind == "tally":
            submit = targets[k % len(targets)]
            poll = targets[(k + 1) % len(targets)]
            args = (submit, poll, end, warm, pause, out)
            ts.append(threading.Thread(target=tally_thread, args=args))
        else:
            ts.append(threading.Thread(target=celery_thread, args=(app_dir, end, warm, out)))
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat = [x for o in out for x in o[0]]
    q.put((lat, sum(o[1] for o in out), sum(o[2] for o in out)))


def drive(kind, targets, procs, threads, seconds, warm_s, app_dir=None, servers=(), redis_pid=None,
          pause=0.001):
    # Spawned, not forked: the parent holds Celery's broker connections (its readiness
    # ping), which a forked child would share.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 2  # a spawned interpreter takes a moment to start
    ps = [
        ctx.Process(
            target=client_process,
            args=(kind, targets, threads, i, start, warm_s, seconds, app_dir, pause, q),
        )
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    # CPU of each side over the measured window: the client processes, the servers
    # (tally replicas or Celery nodes with their pool processes) and Redis.
    while time.time() < start + warm_s:
        time.sleep(0.01)
    cpu0 = [tree_cpu([p.pid for p in ps]), tree_cpu(servers), tree_cpu([redis_pid])]
    while time.time() < start + warm_s + seconds:
        time.sleep(0.01)
    cpu1 = [tree_cpu([p.pid for p in ps]), tree_cpu(servers), tree_cpu([redis_pid])]
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    polls = sum(r[2] for r in results)
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    return {
        "jobs_per_s": len(lat) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "polls_per_job": polls / max(1, len(lat)),
        # CPU milliseconds per job: client, server, redis.
        "cpu_ms": [(b - a) * 1000 / max(1, len(lat)) for a, b in zip(cpu0, cpu1)],
    }


# ---------------------------------------------------------------- the systems

def start_tally(procs, redis_port, n, lease_ms, log_dir, workers=2):
    out = []
    for i in range(n):
        port = free_port()
        log = open(log_dir / f"tally-{i}.log", "w")
        p = procs.start(
            [
                ROOT / "target/release/tally", "serve",
                "--bind", f"127.0.0.1:{port}",
                "--store", f"redis://127.0.0.1:{redis_port}/0",
                "--workers", str(workers), "--enable-test-jobs",
                "--lease-ms", str(lease_ms),
                "--log-level", "warn",
                "--shutdown-timeout", "5",
            ],
            cwd=log_dir, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "RUST_LOG": ""},
        )
        wait_port(port, p, f"tally replica {i}")
        out.append((p, port))
    return out


CELERY_APP = """
import os
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS"], backend=os.environ["BENCH_REDIS"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

@app.task(name="echo")
def echo(x):
    return x
"""


def start_celery(procs, app_dir, n, log_dir):
    nodes = []
    for i in range(n):
        log = open(log_dir / f"celery-{i}.log", "w")
        p = procs.start(
            [
                VENV / "bin" / "celery", "-A", "bench_celery_app", "worker",
                "--pool", "prefork", "--concurrency", "2", "-O", "fair",
                "--without-heartbeat", "--without-gossip", "--without-mingle",
                "--loglevel", "WARNING", "-n", f"bench{i}@%h",
            ],
            cwd=app_dir, stdout=log, stderr=subprocess.STDOUT,
        )
        nodes.append(p)
    # Ready when every node answers a ping.
    sys.path.insert(0, str(app_dir))
    from bench_celery_app import app

    until = time.time() + 60
    while time.time() < until:
        if len(app.control.ping(timeout=0.5) or []) >= n:
            return nodes
    sys.exit("celery workers did not come up")


def get_json(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    return body


def failover(procs, redis_port, lease_ms, log_dir, jobs=60, job_ms=300):
    """kill -9 of one of three replicas while it runs jobs; seconds until the last of its
    jobs (the ones run again: attempts >= 2) finished elsewhere."""
    redis_cli(redis_port, "FLUSHALL")
    reps = start_tally(procs, redis_port, 3, lease_ms, log_dir)
    head = {"content-type": "application/json"}
    ids = []
    for i in range(jobs):
        c = http.client.HTTPConnection("127.0.0.1", reps[i % 3][1])
        body = json.dumps({"kind": "test.sleep", "params": {"ms": job_ms}})
        c.request("POST", "/v1/jobs", body, head)
        ids.append(json.loads(c.getresponse().read())["id"])
        c.close()
    victim, vport = reps[1]
    until = time.time() + 30
    while True:
        me = [r for r in get_json(vport, "/v1/replicas")["replicas"] if r["this"]]
        if me and me[0]["busy"] == 2:
            break
        if time.time() > until:
            sys.exit("the victim never ran two jobs at once")
        time.sleep(0.005)
    killed_at = time.time()
    victim.kill()
    victim.wait()
    survivor = reps[0][1]
    until = time.time() + 120
    records = {}
    while len(records) < len(ids):
        for jid in ids:
            if jid not in records:
                job = get_json(survivor, f"/v1/jobs/{jid}")
                if job["status"] in ("done", "failed", "cancelled"):
                    records[jid] = job
        if time.time() > until:
            sys.exit("jobs still unfinished two minutes after the kill")
        time.sleep(0.01)
    from datetime import datetime

    def ts(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    rerun = [r for r in records.values() if r["attempts"] >= 2]
    bad = [r for r in records.values() if r["status"] != "done"]
    last = max((ts(r["finished_at"]) for r in rerun), default=float("nan"))
    all_done = max(ts(r["finished_at"]) for r in records.values())
    for p, _ in reps:
        procs.stop(p)
    return {
        "lease_ms": lease_ms,
        "rerun_jobs": len(rerun),
        "kill_to_last_rerun_s": last - killed_at,
        "kill_to_all_done_s": all_done - killed_at,
        "not_done": len(bad),
        "jobs": jobs,
        "job_ms": job_ms,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2, help="seconds before measuring")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--clients", type=int, default=32, help="client threads in all")
    ap.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    ap.add_argument("--lease-ms", default="1000,5000", help="leases of the failover runs")
    ap.add_argument("--aof", choices=["no", "always"], default="no",
                    help="Redis persistence for both systems")
    ap.add_argument("--poll-pause-ms", type=float, default=1,
                    help="tally client: pause between two polls of an unfinished job")
    ap.add_argument("--tally-workers", type=int, default=2,
                    help="--workers of each replica (Celery nodes keep --concurrency 2)")
    ap.add_argument("--skip-celery", action="store_true")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    binary = ROOT / "target/release/tally"
    if not binary.exists():
        sys.exit("build first: cargo build --release")
    threads = max(1, args.clients // args.procs)
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="tally-replicas-"))
    try:
        rport = free_port()
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if args.aof == "always" \
            else ["--appendonly", "no"]
        redis = procs.start(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--dir", work, *persist],
            stdout=subprocess.DEVNULL,
        )
        wait_port(rport, redis, "redis-server")
        app_dir = work / "celery"
        app_dir.mkdir()
        (app_dir / "bench_celery_app.py").write_text(CELERY_APP)
        os.environ["BENCH_REDIS"] = f"redis://127.0.0.1:{rport}/1"
        import celery
        import kombu
        import redis as redis_py

        print(f"machine: {os.cpu_count()} cores; redis-server {redis_cli(rport, 'INFO', 'server').split('redis_version:')[1].split()[0]} "
              f"(persistence: {args.aof}); celery {celery.__version__}, kombu {kombu.__version__}, redis-py {redis_py.__version__}")
        print(f"client: {args.procs} processes x {threads} threads, submit then poll "
              f"(tally: {args.poll_pause_ms:g} ms between polls); "
              f"{args.warmup:g} s warm-up, {args.seconds:g} s measured per run")
        print(f"{'system':<26}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'polls/job':>11}{'errors':>8}{'tally/celery':>14}   CPU ms/job: client server redis")
        rows = []
        for n in [int(x) for x in args.replicas.split(",")]:
            redis_cli(rport, "FLUSHALL")
            reps = start_tally(procs, rport, n, 30_000, work, args.tally_workers)
            t = drive("tally", [p for _, p in reps], args.procs, threads, args.seconds, args.warmup,
                      servers=[p.pid for p, _ in reps], redis_pid=redis.pid,
                      pause=args.poll_pause_ms / 1000)
            for p, _ in reps:
                procs.stop(p)
            c = None
            if not args.skip_celery:
                redis_cli(rport, "FLUSHALL")
                nodes = start_celery(procs, app_dir, n, work)
                c = drive("celery", [], args.procs, threads, args.seconds, args.warmup, str(app_dir),
                          servers=[p.pid for p in nodes], redis_pid=redis.pid)
                for p in nodes:
                    procs.stop(p)
            for name, r in ((f"tally x{n} ({args.tally_workers} workers each)", t), (f"celery x{n} (prefork 2 each)", c)):
                if r is None:
                    continue
                ratio = f"{t['jobs_per_s'] / c['jobs_per_s']:.1f}x" if c and r is t else ""
                print(f"{name:<26}{r['jobs_per_s']:9.0f}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}"
                      f"{r['polls_per_job']:11.2f}{r['errors']:8d}{ratio:>14}"
                      f"   {r['cpu_ms'][0]:6.3f} {r['cpu_ms'][1]:6.3f} {r['cpu_ms'][2]:6.3f}", flush=True)
            rows.append((n, t, c))
        print()
        print(f"{'failover (3 replicas)':<26}{'lease ms':>9}{'rerun':>7}{'kill -> last rerun done':>25}{'kill -> all done':>18}")
        for lease in [int(x) for x in args.lease_ms.split(",")]:
            f = failover(procs, rport, lease, work)
            print(f"{'kill -9 one replica':<26}{lease:9d}{f['rerun_jobs']:7d}"
                  f"{f['kill_to_last_rerun_s']:24.2f}s{f['kill_to_all_done_s']:17.2f}s"
                  + (f"  !! {f['not_done']} not done" if f["not_done"] else ""), flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # A SIGTERM (timeout, Ctrl-C's cousin) still stops every child this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_venv()
    main()
