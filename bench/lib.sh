# Shared by the series benchmarks (`ingest.sh`, `series_bytes.sh`): sourced after `cd` to
# the repository's root. Installs missing Debian packages, builds tally unless TALLY_BIN
# names a binary, keeps one server at a time in $SERVER (stopped on exit, with $WORK).

# Installs the Debian packages whose commands are missing: `need CMD[=PACKAGE] ...`.
need() {
  local missing=() c
  for c in "$@"; do command -v "${c%%=*}" >/dev/null || missing+=("${c#*=}"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "installing ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  apt-get install -y "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
}

if [ -z "${TALLY_BIN:-}" ]; then
  cargo build --release --quiet
  TALLY_BIN=target/release/tally
fi
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

# A metric summed over its labels (those containing FILTER, when given), from a server's
# Prometheus text page: `metric BASE_URL NAME [FILTER]`.
metric() {
  curl -sf "$1/metrics" | awk -v m="$2" -v f="${3:-}" '($1 == m || index($1, m "{") == 1) && index($1, f) { s += $2; n++ }
    END { if (n) printf "%.15g\n", s }'
}
