#!/usr/bin/env bash
# Ingest rate of Influx line protocol over HTTP, tally against VictoriaMetrics, in one run,
# with the same client (wrk, not tally's own) and the same payload files.
#
#   bench/ingest.sh [ROUNDS] [PAYLOAD...]     (default: 3 rounds of single interleaved series10k)
#
# Payloads (bench/lp_payload.py writes them, one file per 10,000-line batch):
#   single       one series per connection, `demo,host=hN value=<10..25> <ms>`, 1 ms apart
#   interleaved  700 series per connection alternating line by line,
#                `sensor,host=hN,region=rM value=F.FFF <ns>` (as Telegraf sends them)
#   series10k    10,000 series with 5 tags per connection, one point each per batch
#   NAME.gz      the same batches gzipped (`gzip -6`), sent with `Content-Encoding: gzip`,
#                as Telegraf sends them with compression on: `interleaved interleaved.gz`
#                measures what decompression costs, on both servers, in one run
# CONNS connections (default 4; one wrk thread each, one agent each with its own series)
# send BATCHES batches in all (default 1200, i.e. 12M lines), each connection its files
# once and in order. In each round both servers run fresh on loopback, one at a time:
# VictoriaMetrics (Debian package `victoria-metrics`, temp storage dir) and
# `tally serve --store memory`; with TALLY_BEFORE=BINARY a second tally build runs in the
# same rounds (order alternating), for before/after comparisons. Prints samples/s per
# server and round, the rows each server counted, and the ratio tally / VictoriaMetrics
# (per round and of the medians).
#
# Needs wrk and victoria-metrics; installs both from Debian's packages when missing
# (`apt-get install -y wrk victoria-metrics`, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
shift || true
PAYLOADS=("$@")
[ ${#PAYLOADS[@]} -gt 0 ] || PAYLOADS=(single interleaved series10k)
CONNS=${TALLY_BENCH_CONNS:-4}
BATCHES=${TALLY_BENCH_BATCHES:-1200}
VM_PORT=${TALLY_BENCH_VM_PORT:-8428}
TALLY_PORT=${TALLY_BENCH_PORT:-5098}

# shellcheck source=bench/lib.sh
. bench/lib.sh
need wrk victoria-metrics

start_vm() {
  rm -rf "$WORK/vm"
  victoria-metrics -httpListenAddr "127.0.0.1:$VM_PORT" -storageDataPath "$WORK/vm" \
    -retentionPeriod 1d -loggerLevel ERROR >"$WORK/vm.log" 2>&1 &
  SERVER=$!
  wait_healthy "http://127.0.0.1:$VM_PORT/health"
}

start_tally() {
  "$1" serve --bind "127.0.0.1:$TALLY_PORT" --store memory --log-level warn \
    --log-file "$WORK/tally.log" --max-points 1000000000 --max-write-bytes $((64 << 20)) &
  SERVER=$!
  wait_healthy "http://127.0.0.1:$TALLY_PORT/healthz"
}

# wrk, one thread and connection per agent; prints the script's JSON line.
drive() {
  local base=$1 path=$2 dir=$3 encoding=${4:-identity}
  rm -f "$WORK/done"
  wrk -t"$CONNS" -c"$CONNS" -d600s --timeout 60s -s bench/wrk_write.lua "$base" \
    -- "$dir" "$path" "$CONNS" "$WORK/done" "$encoding" | grep '^{'
}

# Compilers running next to the benchmark (another build on this machine) are noise.
noise() {
  local n
  n=$(ps -eo comm= | grep -cE '^(rustc|cargo|cc1|cc|ld)$' || true)
  [ "${n:-0}" -eq 0 ] || echo "  (noise: $n compiler processes running around the $1 run)"
}

echo "machine: $(nproc) cores; $CONNS connections (wrk $(wrk --version 2>&1 | awk 'NR==1{print $2}')), $BATCHES batches x 10000 lines per run"
echo "$(dpkg-query -W victoria-metrics 2>/dev/null || echo victoria-metrics); tally: $TALLY_BIN${TALLY_BEFORE:+, before: $TALLY_BEFORE}"
RESULTS="$WORK/results"
: >"$RESULTS"
for payload in "${PAYLOADS[@]}"; do
  dir="$WORK/payload-$payload"
  base_payload=${payload%.gz}
  python3 bench/lp_payload.py "$base_payload" "$dir" "$BATCHES" "$CONNS"
  encoding=identity
  if [ "$base_payload" != "$payload" ]; then
    encoding=gzip
    # In place: the file names stay what wrk_write.lua reads.
    for f in "$dir"/*.lp; do gzip -6 -c "$f" >"$f.tmp" && mv "$f.tmp" "$f"; done
    echo "$payload: $(du -sb "$dir" | cut -f1) bytes gzipped"
  fi
  precision=ns
  [ "$base_payload" = single ] && precision=ms
  for round in $(seq "$ROUNDS"); do
    start_vm
    noise "$payload"
    r=$(drive "http://127.0.0.1:$VM_PORT" "/write?precision=$precision" "$dir" "$encoding")
    sleep 1 # VictoriaMetrics counts rows once its in-memory buffers are flushed
    echo "$payload $round victoria-metrics $(metric "http://127.0.0.1:$VM_PORT" vm_rows_inserted_total) $r" >>"$RESULTS"
    stop_server
    sync # VictoriaMetrics' files must not be written back during tally's run
    builds=("tally=$TALLY_BIN")
    [ -n "${TALLY_BEFORE:-}" ] && builds+=("before=$TALLY_BEFORE")
    # Alternate which tally build goes first.
    if [ $((round % 2)) -eq 0 ] && [ ${#builds[@]} -eq 2 ]; then builds=("${builds[1]}" "${builds[0]}"); fi
    for b in "${builds[@]}"; do
      start_tally "${b#*=}"
      r=$(drive "http://127.0.0.1:$TALLY_PORT" "/write?precision=$precision" "$dir" "$encoding")
      noise "$payload"
      echo "$payload $round ${b%%=*} $(metric "http://127.0.0.1:$TALLY_PORT" tally_series_points_accepted_total) $r" >>"$RESULTS"
      stop_server
    done
  done
  rm -rf "$dir"
done
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = {}
order = []
for line in open(sys.argv[1]):
    payload, rnd, server, counted, js = line.split(" ", 4)
    r = json.loads(js)
    rate = r["ok"] * 10000 / (r["duration_us"] / 1e6)
    rows.setdefault(payload, []).append((int(rnd), server, counted, rate, r))
    if payload not in order:
        order.append(payload)
print(f'{"payload":<12} {"round":>5} {"server":<16} {"samples/s":>12} {"p50_ms":>8} {"p99_ms":>8} {"rows_counted":>13} {"/ VM":>6}')
for p in order:
    vm = {rnd: rate for rnd, s, _, rate, _ in rows[p] if s == "victoria-metrics"}
    for rnd, server, counted, rate, r in rows[p]:
        print(f'{p:<12} {rnd:>5} {server:<16} {rate:12.0f} {r["p50_ms"]:8.1f} {r["p99_ms"]:8.1f} {counted or "?":>13} {rate / vm[rnd]:5.2f}x')
        if r["failed"] or r["socket_errors"]:
            print(f'  !! {r["failed"]} batches answered non-2xx, {r["socket_errors"]} socket errors')
    med = {}
    for _, server, _, rate, _ in rows[p]:
        med.setdefault(server, []).append(rate)
    vm_med = statistics.median(med["victoria-metrics"])
    for server, rates in med.items():
        m = statistics.median(rates)
        print(f'{p:<12} {"median":>5} {server:<16} {m:12.0f} {"":>8} {"":>8} {"":>13} {m / vm_med:5.2f}x')
PY
