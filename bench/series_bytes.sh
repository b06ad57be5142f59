#!/usr/bin/env bash
# Bytes per point of the same points in tally (sealed blocks in memory) and in
# VictoriaMetrics (on disk), side by side, on three point sets of POINTS points each (one
# series, one point a second, ending an hour ago):
#   demo       on a 1 s grid, integers 10..=25 (what the demo upstream answers)
#   jittered   1 s ± 20 ms, integers 10..=25
#   floats     1 s ± 20 ms, random floats in [0, 100) with 3 decimals (`F.FFF`, as agents send)
#   f64        1 s ± 20 ms, random floats in [0, 100) in full (17 digits): for reference;
#              VictoriaMetrics keeps 12 significant digits of them, tally every bit
#
#   bench/series_bytes.sh [POINTS]        (default 2000000)
#
# Each server runs fresh per set; the points go in over HTTP (`/write?precision=ms`, in
# batches of 100,000 lines). tally: `tally_series_bytes_per_point` (compressed bytes of
# sealed blocks per sealed point; all but the last 10 s are sealed). VictoriaMetrics:
# after /internal/force_flush and /internal/force_merge, its data parts
# (`vm_data_size_bytes{type=~"storage/.*"}`) per row, and the whole storage directory
# (`du`, index included) per row. With TALLY_BEFORE=BINARY another tally build is measured
# too. Needs victoria-metrics (`apt-get install -y victoria-metrics`; installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
POINTS=${1:-2000000}
VM_PORT=${TALLY_BENCH_VM_PORT:-8428}
TALLY_PORT=${TALLY_BENCH_PORT:-5098}
RETENTION_DAYS=$(( POINTS / 86400 + 3 ))

# shellcheck source=bench/lib.sh
. bench/lib.sh
need victoria-metrics
send() {
  for f in "$WORK"/points.*; do
    curl -sf -XPOST "$1/write?precision=ms" --data-binary "@$f" -o /dev/null
  done
}

python3 - "$WORK" "$POINTS" <<'PY'
import json, random, sys, time
work, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(13)
end = (int(time.time()) - 3600) * 1000
start = end - n * 1000
sets = {
    "demo": lambda i: (start + i * 1000, str(rng.randint(10, 25))),
    "jittered": lambda i: (start + i * 1000 + rng.randint(-20, 20), str(rng.randint(10, 25))),
    "floats": lambda i: (start + i * 1000 + rng.randint(-20, 20), f"{rng.randrange(100_000) / 1000:.3f}"),
    "f64": lambda i: (start + i * 1000 + rng.randint(-20, 20), json.dumps(rng.random() * 100)),
}
for name, point in sets.items():
    with open(f"{work}/{name}.lp", "w") as f:
        f.writelines(f"bytes,set={name} value={v} {t}\n" for t, v in map(point, range(n)))
PY

echo "$POINTS points per set; $(dpkg-query -W victoria-metrics 2>/dev/null || echo victoria-metrics); tally: $TALLY_BIN${TALLY_BEFORE:+, before: $TALLY_BEFORE}"
printf '%-9s %14s %16s %16s' set tally_B/pt vm_parts_B/pt vm_dir_B/pt
[ -n "${TALLY_BEFORE:-}" ] && printf ' %14s' before_B/pt
printf '\n'
for set in demo jittered floats f64; do
  rm -f "$WORK"/points.*
  split -l 100000 "$WORK/$set.lp" "$WORK/points."
  # VictoriaMetrics
  rm -rf "$WORK/vm"
  victoria-metrics -httpListenAddr "127.0.0.1:$VM_PORT" -storageDataPath "$WORK/vm" \
    -retentionPeriod "${RETENTION_DAYS}d" -loggerLevel ERROR >"$WORK/vm.log" 2>&1 &
  SERVER=$!
  wait_healthy "http://127.0.0.1:$VM_PORT/health"
  send "http://127.0.0.1:$VM_PORT"
  sleep 2
  curl -sf "http://127.0.0.1:$VM_PORT/internal/force_flush" >/dev/null
  curl -sf "http://127.0.0.1:$VM_PORT/internal/force_merge" >/dev/null
  sleep 2
  rows=$(metric "http://127.0.0.1:$VM_PORT" vm_rows 'type="storage/')
  parts=$(metric "http://127.0.0.1:$VM_PORT" vm_data_size_bytes 'type="storage/')
  stop_server
  dir=$(du -sb "$WORK/vm" | cut -f1)
  # tally (and the build before, if given)
  results=()
  for bin in "$TALLY_BIN" ${TALLY_BEFORE:+"$TALLY_BEFORE"}; do
    "$bin" serve --bind "127.0.0.1:$TALLY_PORT" --store memory --log-level warn \
      --log-file "$WORK/tally.log" --retention $((RETENTION_DAYS * 86400)) &
    SERVER=$!
    wait_healthy "http://127.0.0.1:$TALLY_PORT/healthz"
    send "http://127.0.0.1:$TALLY_PORT"
    accepted=$(metric "http://127.0.0.1:$TALLY_PORT" tally_series_points_accepted_total)
    [ "${accepted%.*}" = "$POINTS" ] || echo "  !! tally accepted $accepted of $POINTS points" >&2
    results+=("$(metric "http://127.0.0.1:$TALLY_PORT" tally_series_bytes_per_point)")
    stop_server
  done
  [ "${rows%.*}" = "$POINTS" ] || echo "  !! VictoriaMetrics counted $rows rows of $POINTS" >&2
  printf '%-9s %14.3f %16.3f %16.3f' "$set" "${results[0]}" "$(echo "$parts / $rows" | bc -l)" "$(echo "$dir / $rows" | bc -l)"
  [ ${#results[@]} -gt 1 ] && printf ' %14.3f' "${results[1]}"
  printf '\n'
done
