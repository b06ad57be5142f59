#!/usr/bin/env bash
# Resident memory of `tally serve` (SQLite store) before and after 100,000 finished
# statistics jobs: results live in the store, so the heap must not grow with them.
#
#   bench/memory.sh [JOBS]        (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-100000}
cargo build --release --quiet
cargo bench --bench submit_poll --no-run --quiet
CLIENT=$(ls -t target/release/deps/submit_poll-* | grep -v '\.d$' | head -1)
WORK=$(mktemp -d)
PORT=${TALLY_BENCH_PORT:-5098}
trap 'kill $SERVER 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
target/release/tally serve --bind 127.0.0.1:$PORT --store "sqlite:$WORK/tally.db" \
  --log-file "$WORK/tally.log" --stats-dataset tests/fixtures/health.csv &
SERVER=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$SERVER/status"; }
URL="http://127.0.0.1:$PORT"
# Warm up every path (and the SQLite page caches) before the first reading.
"$CLIENT" "$URL" /api/states_mean /api/get_results/ 32 600 5000 >/dev/null
before=$(rss)
"$CLIENT" "$URL" /api/states_mean /api/get_results/ 32 600 "$JOBS"
after=$(rss)
done_jobs=$(curl -s "$URL/v1/jobs/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["done"])')
echo "finished jobs in store: $done_jobs"
echo "RSS after warm-up: $((before / 1024)) MiB; after $JOBS more jobs: $((after / 1024)) MiB; growth: $(( (after - before) )) KiB"
echo "store file: $(du -sh "$WORK" | cut -f1)"
