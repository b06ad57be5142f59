#!/usr/bin/env bash
# Ingest rate of Influx line protocol over HTTP, tally against VictoriaMetrics, in one run
# with the same client and payload.
#
#   bench/ingest.sh [SECONDS]      (default: 5; about how long tally's run should take)
#
# Both servers run on loopback, one at a time, each fresh for each run: VictoriaMetrics
# (Debian package `victoria-metrics`, installed if missing) on a temp storage dir, and
# `tally serve --store memory`. The client is `tally load --mode write`: CONNS connections
# (one series each, timestamps 1 ms apart), each sending the same number of batches of
# 10,000 lines to `/write?precision=ms` with no delay. The batch count is sized so that
# tally at 4 million samples/s takes about SECONDS. Runs for `--values demo` (integers
# 10..=25, like the demo upstream) and `--values random` (random floats); prints samples/s
# for each server, the ratio, the rows each server counted, and tally's compressed bytes
# per sealed point (`tally_series_bytes_per_point`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-5}
CONNS=${TALLY_BENCH_CONNS:-8}
BATCH=10000
AIM=4000000
BATCHES=$(( (SECONDS_PER_RUN * AIM + CONNS * BATCH - 1) / (CONNS * BATCH) ))
VM_PORT=${TALLY_BENCH_VM_PORT:-8428}
TALLY_PORT=${TALLY_BENCH_PORT:-5098}

if ! command -v victoria-metrics >/dev/null; then
  apt-get install -y victoria-metrics >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y victoria-metrics >/dev/null; }
fi
cargo build --release --quiet
TALLY=target/release/tally
WORK=$(mktemp -d)
SERVER=
stop_server() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  SERVER=
}
trap 'stop_server; rm -rf "$WORK"' EXIT

wait_healthy() {
  for _ in $(seq 200); do curl -sf "$1" >/dev/null && return; sleep 0.05; done
  echo "server at $1 did not start" >&2; exit 1
}

start_vm() {
  rm -rf "$WORK/vm"
  victoria-metrics -httpListenAddr "127.0.0.1:$VM_PORT" -storageDataPath "$WORK/vm" \
    -retentionPeriod 1d -loggerLevel ERROR >"$WORK/vm.log" 2>&1 &
  SERVER=$!
  wait_healthy "http://127.0.0.1:$VM_PORT/health"
}

start_tally() {
  "$TALLY" serve --bind "127.0.0.1:$TALLY_PORT" --store memory --log-level warn \
    --log-file "$WORK/tally.log" --max-points 1000000000 --max-write-bytes $((64 << 20)) &
  SERVER=$!
  wait_healthy "http://127.0.0.1:$TALLY_PORT/healthz"
}

load() {
  "$TALLY" load --target "$1" --mode write --values "$2" --batch-lines $BATCH \
    --connection-count "$CONNS" --connection-value "$BATCHES" --delay-range 0 --json --quiet
}

# A metric summed over its labels, from a server's Prometheus text page.
metric() {
  curl -sf "$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2; n++ }
    END { if (n) printf "%.15g\n", s }'
}

echo "machine: $(nproc) cores; $CONNS connections x $BATCHES batches x $BATCH lines = $((CONNS * BATCHES * BATCH)) samples per run"
echo "$(dpkg-query -W victoria-metrics 2>/dev/null || echo victoria-metrics)"
printf '%-8s %-16s %12s %9s %9s %14s %11s %7s\n' values server samples/s p50_ms p99_ms rows_counted bytes/point ratio
# Compilers running next to the benchmark (another build on this machine) are noise.
noise() {
  local n
  n=$(ps -eo comm= | grep -cE '^(rustc|cargo|cc1|cc|ld)$' || true)
  [ "${n:-0}" -eq 0 ] || echo "  (noise: $n compiler processes running around the $1 run)"
}

for values in demo random; do
  start_vm
  noise "$values"
  vm=$(load "http://127.0.0.1:$VM_PORT" "$values")
  sleep 1 # VictoriaMetrics counts rows once its in-memory buffers are flushed
  vm_rows=$(metric "http://127.0.0.1:$VM_PORT" vm_rows_inserted_total)
  stop_server
  sync # VictoriaMetrics' files must not be written back during tally's run
  start_tally
  tally=$(load "http://127.0.0.1:$TALLY_PORT" "$values")
  noise "$values"
  tally_rows=$(metric "http://127.0.0.1:$TALLY_PORT" tally_series_points_accepted_total)
  bpp=$(metric "http://127.0.0.1:$TALLY_PORT" tally_series_bytes_per_point)
  stop_server
  python3 - "$values" "$vm" "$vm_rows" "$tally" "$tally_rows" "$bpp" <<'PY'
import json, sys
values, vm, vm_rows, tally, tally_rows, bpp = sys.argv[1:]
vm, tally = json.loads(vm), json.loads(tally)
for name, r, rows, b in (("victoria-metrics", vm, vm_rows, "-"), ("tally", tally, tally_rows, f"{float(bpp):.2f}")):
    ratio = r["lines_per_s"] / vm["lines_per_s"]
    l = r["latency_ms"]
    print(f'{values:<8} {name:<16} {r["lines_per_s"]:12.0f} {l["p50"]:9.1f} {l["p99"]:9.1f} {rows or "?":>14} {b:>11} {ratio:6.2f}x')
    if r["errors"]:
        print(f'  !! {r["errors"]} batches failed: {r["error_kinds"]}')
PY
done
