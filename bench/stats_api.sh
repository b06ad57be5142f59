#!/usr/bin/env bash
# Submit-then-poll throughput of the statistics API against the same server's no-op
# routes (the ceiling of HTTP + client on this machine), in one run.
#
#   bench/stats_api.sh [SECONDS] [CLIENTS...]      (default: 5 s; 8 32 64 clients)
#
# The server runs as a user would run it: SQLite store on disk (synchronous=FULL, group
# commit), info-level request log to a file. Each client POSTs /api/states_mean, then
# polls /api/get_results/<id> until done; the ceiling does the same against /api/noop
# and /api/noop_result/<id>, which parse the body and answer at once.
# Prints jobs/s, p50/p99 (submit -> done seen), the submit's own p50 (until the id is
# back: where the store's commit shows) and the ratio to the ceiling. The client parses
# each reply into the fields it acts on, so a bigger answer costs it little more than the
# no-op's (it shares the cores with the server).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-5}
shift || true
CLIENTS=("$@")
[ ${#CLIENTS[@]} -gt 0 ] || CLIENTS=(8 32 64)

cargo build --release --quiet
cargo bench --bench submit_poll --no-run --quiet
CLIENT=$(ls -t target/release/deps/submit_poll-* | grep -v '\.d$' | head -1)
WORK=$(mktemp -d)
PORT=${TALLY_BENCH_PORT:-5099}
DATASET=${TALLY_BENCH_DATASET:-tests/fixtures/health.csv}
trap 'kill $SERVER 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

start() {
  target/release/tally serve --bind 127.0.0.1:$PORT --enable-test-jobs \
    --store "sqlite:$WORK/tally.db" --log-file "$WORK/tally.log" \
    --stats-dataset "$DATASET" "$@" &
  SERVER=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && return; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}

run() { "$CLIENT" "http://127.0.0.1:$PORT" "$1" "$2" "$3" "$SECONDS_PER_RUN"; }

echo "machine: $(nproc) cores; ${SECONDS_PER_RUN}s per run; dataset $DATASET"
printf '%-8s %-28s %10s %9s %9s %11s %8s %10s\n' clients endpoint jobs/s p50_ms p99_ms submit_p50 polls ratio
start
for c in "${CLIENTS[@]}"; do
  noop=$(run /api/noop /api/noop_result/ "$c")
  stats=$(run /api/states_mean /api/get_results/ "$c")
  python3 - "$c" "$noop" "$stats" <<'PY'
import json, sys
c, noop, stats = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name, r in (("no-op (ceiling)", noop), ("/api/states_mean (sqlite)", stats)):
    ratio = r["jobs_per_s"] / noop["jobs_per_s"]
    print(f'{c:<8} {name:<28} {r["jobs_per_s"]:10.0f} {r["p50_ms"]:9.2f} {r["p99_ms"]:9.2f} {r["submit_p50_ms"]:11.2f} {r["polls_per_job"]:8.2f} {ratio:9.0%}')
    if r["errors"]:
        print(f'  !! {r["errors"]} errors')
PY
done
