#!/usr/bin/env bash
# Proxied latency while the control plane writes: p99 of requests through weir while an
# admin client reads the service document 50 times a second ("reads"), then while it
# makes 50 weight changes a second instead ("writes": each fsynced to the state file and
# the journal before its 200), alternating, REPEATS times each. The same client at the
# same rate in both, so the difference is what the writes themselves cost the proxy.
#
# What it shows: a weight change never stalls the data plane — the controller's writes
# (and their fsyncs) run off the async workers, and nothing on the request path or the
# admin read path waits for the writer's lock. The goal is a p99 with changes within 10%
# of the p99 without, in the same run.
#
# Run from the repository root:
#     benches/load/weight-churn.sh
#
# Environment (all optional):
#   WEIR_BIN     weir binary (default: cargo build --release, target/release/weir)
#   DURATION     each measured run (wrk -d)                   (default 10s)
#   CONNS        wrk connections                              (default 32)
#   RATE         weight changes per second during churn runs  (default 50)
#   REPEATS      runs of each kind, alternating               (default 3)
#   WORKERS      weir's [proxy] workers (default 0: one per CPU, weir's default)
#   PROXY_CPU    cores weir runs on (taskset list)           (default: all)
#   LOADGEN_CPU  cores wrk, the upstreams and the admin client run on (default: all)
#                WORKERS=1 PROXY_CPU=0 LOADGEN_CPU=1 is the hardest case: the proxy's
#                one worker and the blocking thread that writes share one core.
#   STATE_PARENT where the state dir is made; must be a real disk so that fsyncs cost
#                what they cost in production                 (default target/)
#   OUT_MD       the report                 (default benches/load/weight-churn.md)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
RATE=${RATE:-50}
REPEATS=${REPEATS:-3}
ALL_CPUS=0-$(($(nproc) - 1))
WORKERS=${WORKERS:-0}
PROXY_CPU=${PROXY_CPU:-$ALL_CPUS}
LOADGEN_CPU=${LOADGEN_CPU:-$ALL_CPUS}
STATE_PARENT=${STATE_PARENT:-$REPO_ROOT/target}
OUT_MD=${OUT_MD:-$SCRIPT_DIR/weight-churn.md}

command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "needs taskset (util-linux)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
if [ -z "${WEIR_BIN:-}" ]; then
  (cd "$REPO_ROOT" && cargo build --release --quiet)
  WEIR_BIN=$REPO_ROOT/target/release/weir
fi

mkdir -p "$STATE_PARENT"
WORK=$(mktemp -d "$STATE_PARENT/weight-churn.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() {
  for _ in $(seq 1 200); do
    if python3 - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
    sleep 0.05
  done
  echo "no answer from $1" >&2
  exit 1
}

UP1=$(free_port); UP2=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
taskset -c "$LOADGEN_CPU" "$WEIR_BIN" upstream --listen "127.0.0.1:$UP1" --name stable >/dev/null 2>&1 & PIDS+=($!)
taskset -c "$LOADGEN_CPU" "$WEIR_BIN" upstream --listen "127.0.0.1:$UP2" --name canary >/dev/null 2>&1 & PIDS+=($!)
cat > "$WORK/weir.toml" <<TOML
[proxy]
listen = "127.0.0.1:$PROXY"
workers = $WORKERS
[admin]
listen = "127.0.0.1:$ADMIN"
[state]
dir = "$WORK/state"
[[service]]
name = "shop"
baseline = "stable"
[service.pools.stable]
endpoints = ["127.0.0.1:$UP1"]
weight = 90
[service.pools.canary]
endpoints = ["127.0.0.1:$UP2"]
weight = 10
TOML
RUST_LOG=warn taskset -c "$PROXY_CPU" "$WEIR_BIN" run --config "$WORK/weir.toml" >"$WORK/weir.log" 2>&1 & PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/readyz"
wait_http "http://127.0.0.1:$PROXY/"

# RATE admin calls per second over one keep-alive connection for $2 seconds: $1 = put
# (weight changes; every answer must be a 200, i.e. durable) or get (the service
# document). Prints how many were made.
churn() {
  taskset -c "$LOADGEN_CPU" python3 - "$ADMIN" "$RATE" "$2" "$1" <<'PY'
import http.client, json, sys, time
port, rate, seconds, mode = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
start = time.monotonic()
n = 0
while time.monotonic() - start < seconds:
    due = start + n / rate
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    canary = 10 + (n % 10)
    body = json.dumps({"weights": {"stable": 100 - canary, "canary": canary}})
    if mode == "put":
        conn.request("PUT", "/api/v1/services/shop/weights", body,
                     {"content-type": "application/json"})
    else:
        conn.request("GET", "/api/v1/services/shop")
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        sys.exit(f"{mode} answered {resp.status}")
    n += 1
print(n)
PY
}

seconds=${DURATION%s}
p99_of() { awk '$1 == "99%" { print $2 }' "$1"; }
to_ms() {
  python3 -c '
import sys
v = sys.argv[1]
for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
    if v.endswith(unit):
        print(float(v[:-len(unit)]) * f); break' "$1"
}

rows=()
quiet=(); busy=()
for r in $(seq 1 "$REPEATS"); do
  for kind in reads writes; do
    out="$WORK/wrk-$kind-$r.txt"
    mode=get
    [ "$kind" = writes ] && mode=put
    churn "$mode" "$seconds" > "$WORK/churn-$kind-$r.txt" &
    cpid=$!
    taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$PROXY/" > "$out"
    wait "$cpid"
    calls=$(cat "$WORK/churn-$kind-$r.txt")
    p99=$(to_ms "$(p99_of "$out")")
    rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
    rows+=("| $r | $kind | $calls | $rps | $p99 |")
    if [ "$kind" = reads ]; then quiet+=("$p99"); else busy+=("$p99"); fi
    echo "run $r $kind: p99 ${p99} ms, ${rps} req/s, ${calls} admin calls" >&2
  done
done

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mq=$(median "${quiet[@]}"); mb=$(median "${busy[@]}")
ratio=$(python3 -c "print(f'{$mb / $mq:.3f}')")
{
  echo "# Proxied p99 with and without weight changes"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), wrk -t1 -c$CONNS -d$DURATION, weir workers = $WORKERS (0: one per CPU) on CPUs $PROXY_CPU,"
  echo "wrk, the upstreams and the admin client on CPUs $LOADGEN_CPU,"
  echo "admin client: $RATE calls/s, GET of the service document (reads) or a weight"
  echo "change fsynced before its 200 (writes); runs alternating."
  echo
  echo "| run | kind | admin calls | req/s | p99 ms |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Median p99: with reads $mq ms, with weight changes $mb ms: ratio **$ratio** (goal ≤ 1.10)."
} > "$OUT_MD"
cat "$OUT_MD"
