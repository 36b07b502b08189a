#!/usr/bin/env bash
# Many services, no traffic: what it costs weir to front N services of two pools
# each while they sit idle. For each N: RSS and idle CPU of a running weir, the
# time to start (process launch to /readyz), `weir check` of the config, and a
# reload of the unchanged config (POST /api/v1/reload, what SIGHUP does).
# Optionally HAProxy and nginx with the same N backends of two servers, for an
# RSS comparison (they route by Host through a map, as weir does).
#
# Run from the repository root:
#     benches/load/many-services.sh
#
# Environment (all optional):
#   COUNTS        service counts to measure, in order        (default "1000 10000")
#   IDLE_SECS     idle CPU is measured over this many seconds (default 20)
#   SETTLE_SECS   wait after ready before measuring          (default 5)
#   TARGETS       which proxies, in order          (default "weir haproxy nginx")
#   WEIR_BIN      weir binary; default: `cargo build --release` and
#                 use target/release/weir
#   WEIR_FEATURES cargo features of that build (default jemalloc, as release
#                 builds; empty for glibc's malloc); make is installed if missing
#   WEIR_LOG      RUST_LOG for weir                          (default warn)
#   READY_TIMEOUT seconds to wait for a process to answer    (default 120)
#   KEEP_WORKDIR  1 = keep the temp dir (configs, logs)
#   OUT_MD        where the report is written (default benches/load/many-services.md)
#
# No traffic flows: endpoints are loopback addresses nothing listens on, and no
# health checks are configured. Everything listens on 127.0.0.1 only; every
# process is started here with its own config under a mktemp dir and killed on
# exit.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

COUNTS=${COUNTS:-"1000 10000"}
IDLE_SECS=${IDLE_SECS:-20}
SETTLE_SECS=${SETTLE_SECS:-5}
TARGETS=${TARGETS:-"weir haproxy nginx"}
WEIR_BIN=${WEIR_BIN:-}
WEIR_FEATURES=${WEIR_FEATURES-jemalloc}
WEIR_LOG=${WEIR_LOG:-warn}
READY_TIMEOUT=${READY_TIMEOUT:-120}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
OUT_MD=${OUT_MD:-$SCRIPT_DIR/many-services.md}

log() { printf '[many-services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
# install_pkgs, alive, stop_pid: shared by the load scripts.
# shellcheck source=lib.sh
. "$SCRIPT_DIR/lib.sh"

for t in $TARGETS; do
    case $t in
        weir | haproxy | nginx) ;;
        *) die "unknown target '$t' in TARGETS (known: weir haproxy nginx)" ;;
    esac
done
for n in $COUNTS; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "COUNTS must be positive integers (got '$n')"
    ((n <= 49152)) || die "at most 49152 services (endpoint addresses run out)"
done
[[ $IDLE_SECS =~ ^[1-9][0-9]*$ ]] || die "IDLE_SECS must be a positive integer"
[[ $SETTLE_SECS =~ ^[0-9]+$ ]] || die "SETTLE_SECS must be a non-negative integer"

# --------------------------------------------------------------------------
# Dependencies (Debian packages), installed only if missing.
# --------------------------------------------------------------------------

missing=()
command -v curl >/dev/null || missing+=(curl)
if [[ -z $WEIR_BIN && -n $WEIR_FEATURES ]] && has_target weir; then command -v make >/dev/null || missing+=(make); fi
if has_target haproxy; then command -v haproxy >/dev/null || missing+=(haproxy); fi
if has_target nginx; then command -v nginx >/dev/null || missing+=(nginx); fi
((${#missing[@]} == 0)) || install_pkgs "${missing[@]}"

CLK_TCK=$(getconf CLK_TCK)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if has_target weir; then
    if [[ -z $WEIR_BIN ]]; then
        log "building weir (cargo build --release --features '$WEIR_FEATURES')"
        (cd "$REPO_ROOT" && cargo build --release --bin weir --features "$WEIR_FEATURES" >&2) || die "cargo build --release failed"
        WEIR_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/weir
    fi
    [[ -x $WEIR_BIN ]] || die "weir binary not found or not executable: $WEIR_BIN"
    WEIR_BIN=$(cd "$(dirname "$WEIR_BIN")" && pwd)/$(basename "$WEIR_BIN")
fi

# --------------------------------------------------------------------------
# Work dir, process bookkeeping, cleanup
# --------------------------------------------------------------------------
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-many.XXXXXX")
RESULTS=$WORKDIR/results.tsv
: >"$RESULTS"
PIDS=()



cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [[ $KEEP_WORKDIR == 1 ]]; then
        log "work dir kept: $WORKDIR"
    else
        rm -rf "$WORKDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port is taken if any IPv4/IPv6 TCP socket on this host uses it locally.
port_busy() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
USED_PORTS=" "
pick_port() { # VAR: store a free port in VAR
    local p i
    for ((i = 0; i < 500; i++)); do
        p=$((20000 + RANDOM % 12000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_busy "$p" && continue
        USED_PORTS+="$p "
        printf -v "$1" %s "$p"
        return 0
    done
    die "no free port found"
}

# wait_ready URL PID NAME LOGFILE: poll until URL answers (any HTTP status
# from the process itself counts: the proxies answer 404/503 for no route).
wait_ready() {
    local url=$1 pid=$2 name=$3 logf=$4 code
    local deadline=$((SECONDS + READY_TIMEOUT))
    while true; do
        code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null || true)
        [[ $code =~ ^[1-5][0-9][0-9]$ ]] && return 0
        if ! alive "$pid"; then
            log "$name exited before answering; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name did not answer $url within ${READY_TIMEOUT}s; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        sleep 0.02
    done
}

now_ms() { date +%s%3N; }
rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
# utime + stime of a process, in clock ticks.
cpu_ticks() {
    local st
    st=$(cat "/proc/$1/stat")
    st=${st##*) }
    awk '{ print $12 + $13 }' <<<"$st"
}
# Percent of one core PID used over IDLE_SECS.
idle_cpu_pct() {
    local pid=$1 a b t0 t1
    a=$(cpu_ticks "$pid")
    t0=$(now_ms)
    sleep "$IDLE_SECS"
    b=$(cpu_ticks "$pid")
    t1=$(now_ms)
    awk -v d=$((b - a)) -v ms=$((t1 - t0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", 100 * d / hz / (ms / 1000) }'
}
# Configs are written by awk (bash loops over 10,000 services take minutes).
# Service I's pool P (0 stable, 1 canary) has one endpoint 127.X.Y.(10+P):9,
# X.Y from I: a loopback address nothing listens on.
AWK_EP='function ep(i, p) { return sprintf("127.%d.%d.%d:9", 64 + int(i / 256) % 192, i % 256, 10 + p) }'

gen_weir() { # N PROXY_PORT ADMIN_PORT OUT
    awk -v n="$1" -v port="$2" -v admin="$3" -v dir="$WORKDIR/weir-state-$1" "$AWK_EP"'
    BEGIN {
        printf "[proxy]\nlisten = \"127.0.0.1:%s\"\nworkers = 1\n\n", port
        printf "[admin]\nlisten = \"127.0.0.1:%s\"\n\n[state]\ndir = \"%s\"\n\n", admin, dir
        for (i = 0; i < n; i++) {
            printf "[[service]]\nname = \"svc%d\"\nhosts = [\"svc%d.example.com\"]\nbaseline = \"stable\"\n", i, i
            printf "[service.pools.stable]\nendpoints = [\"%s\"]\nweight = 90\n", ep(i, 0)
            printf "[service.pools.canary]\nendpoints = [\"%s\"]\nweight = 10\n\n", ep(i, 1)
        }
    }' >"$4"
}

gen_haproxy() { # N PORT OUT
    local map=$WORKDIR/haproxy-$1.map
    awk -v n="$1" -v port="$2" -v map="$map" "$AWK_EP"'
    BEGIN {
        printf "global\n    nbthread 1\n    maxconn 8192\n\n"
        printf "defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n"
        printf "frontend many\n    bind 127.0.0.1:%s\n", port
        printf "    use_backend %%[req.hdr(host),lower,map(%s)]\n\n", map
        for (i = 0; i < n; i++)
            printf "backend svc%d\n    server stable %s weight 90\n    server canary %s weight 10\n", i, ep(i, 0), ep(i, 1)
    }' >"$3"
    awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++) printf "svc%d.example.com svc%d\n", i, i }' >"$map"
}

gen_nginx() { # N PORT OUT
    local user=""
    ((EUID == 0)) && user="user root;"
    mkdir -p "$WORKDIR/nginx-tmp"
    awk -v n="$1" -v port="$2" -v dir="$WORKDIR" -v user="$user" "$AWK_EP"'
    BEGIN {
        printf "%s\nworker_processes 1;\ndaemon off;\npid %s/nginx-%d.pid;\n", user, dir, n
        printf "error_log %s/nginx-%d.error.log warn;\nevents { worker_connections 1024; }\n", dir, n
        printf "http {\n    access_log off;\n"
        split("client_body proxy fastcgi uwsgi scgi", t, " ")
        for (k = 1; k <= 5; k++) printf "    %s_temp_path %s/nginx-tmp;\n", t[k], dir
        printf "    map_hash_max_size 262144;\n    map_hash_bucket_size 128;\n"
        printf "    map $host $pool {\n        default none;\n"
        for (i = 0; i < n; i++) printf "        svc%d.example.com svc%d;\n", i, i
        printf "    }\n"
        for (i = 0; i < n; i++)
            printf "    upstream svc%d { server %s weight=90; server %s weight=10; }\n", i, ep(i, 0), ep(i, 1)
        printf "    server {\n        listen 127.0.0.1:%s;\n        location / { proxy_pass http://$pool; }\n    }\n}\n", port
    }' >"$3"
}

# record TARGET N KEY VALUE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
# Wall time of a command, in ms.
time_ms() {
    local t0 rc=0
    t0=$(now_ms)
    "$@" >/dev/null 2>&1 || rc=$?
    echo $(($(now_ms) - t0))
    return "$rc"
}

run_weir() {
    local n=$1 port admin cfg pid t0 ready ms code
    pick_port port
    pick_port admin
    cfg=$WORKDIR/weir-$n.toml
    gen_weir "$n" "$port" "$admin" "$cfg"
    log "weir, $n services: weir check"
    ms=$(time_ms "$WEIR_BIN" check --config "$cfg") || die "weir check failed on $cfg"
    record weir "$n" check_ms "$ms"
    log "weir, $n services: start"
    t0=$(now_ms)
    RUST_LOG=$WEIR_LOG "$WEIR_BIN" run --config "$cfg" >"$WORKDIR/weir-$n.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "http://127.0.0.1:$admin/readyz" "$pid" weir "$WORKDIR/weir-$n.log" || die "weir did not start"
    ready=$(($(now_ms) - t0))
    record weir "$n" start_ms "$ready"
    sleep "$SETTLE_SECS"
    record weir "$n" rss_mb "$(rss_mb "$pid")"
    log "weir, $n services: idle CPU over ${IDLE_SECS}s"
    record weir "$n" idle_cpu_pct "$(idle_cpu_pct "$pid")"
    log "weir, $n services: reload"
    t0=$(now_ms)
    code=$(curl -sS -o "$WORKDIR/reload-$n.json" -w '%{http_code}' --max-time 120 \
        -X POST "http://127.0.0.1:$admin/api/v1/reload" || true)
    ms=$(($(now_ms) - t0))
    [[ $code == 200 ]] || die "reload answered $code: $(head -c 300 "$WORKDIR/reload-$n.json")"
    record weir "$n" reload_ms "$ms"
    record weir "$n" rss_after_reload_mb "$(rss_mb "$pid")"
    stop_pid "$pid"
}

run_haproxy() {
    local n=$1 port cfg pid t0
    pick_port port
    cfg=$WORKDIR/haproxy-$n.cfg
    gen_haproxy "$n" "$port" "$cfg"
    log "haproxy, $n backends"
    t0=$(now_ms)
    haproxy -db -f "$cfg" >"$WORKDIR/haproxy-$n.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "http://127.0.0.1:$port/" "$pid" haproxy "$WORKDIR/haproxy-$n.log" || die "haproxy did not start"
    record haproxy "$n" start_ms $(($(now_ms) - t0))
    sleep "$SETTLE_SECS"
    record haproxy "$n" rss_mb "$(rss_mb "$pid")"
    record haproxy "$n" idle_cpu_pct "$(idle_cpu_pct "$pid")"
    stop_pid "$pid"
}

run_nginx() {
    local n=$1 port cfg pid t0 rss=0 worker
    pick_port port
    cfg=$WORKDIR/nginx-$n.conf
    gen_nginx "$n" "$port" "$cfg"
    log "nginx, $n upstreams"
    t0=$(now_ms)
    nginx -c "$cfg" -p "$WORKDIR" >"$WORKDIR/nginx-$n.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "http://127.0.0.1:$port/" "$pid" nginx "$WORKDIR/nginx-$n.error.log" || die "nginx did not start"
    record nginx "$n" start_ms $(($(now_ms) - t0))
    sleep "$SETTLE_SECS"
    # Master plus its one worker: the two together are what nginx costs.
    rss=$(rss_mb "$pid")
    for worker in $(pgrep -P "$pid" || true); do
        rss=$(awk -v a="$rss" -v b="$(rss_mb "$worker")" 'BEGIN { printf "%.1f", a + b }')
    done
    record nginx "$n" rss_mb "$rss"
    record nginx "$n" idle_cpu_pct "$(idle_cpu_pct "$pid")"
    stop_pid "$pid"
}

for n in $COUNTS; do
    for t in $TARGETS; do "run_$t" "$n"; done
done

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
value() { awk -F'\t' -v t="$1" -v n="$2" -v k="$3" '$1 == t && $2 == n && $3 == k { v = $4 } END { print (v == "" ? "—" : v) }' "$RESULTS"; }
{
    echo "# Many services, idle"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPU(s), $(uname -r)."
    if has_target weir; then
        echo "weir: $("$WEIR_BIN" --version 2>/dev/null | head -n 1) ($WEIR_BIN), repo at $(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')."
    fi
    echo "Each service: one host, two pools (90/10) of one endpoint each, no health checks,"
    echo "no SLO, no traffic. RSS ${SETTLE_SECS} s after ready; idle CPU over ${IDLE_SECS} s"
    echo "(utime + stime, % of one core); nginx RSS is master + worker."
    echo
    echo "| proxy | services | RSS MB | idle CPU % | start ms | \`weir check\` ms | reload ms | RSS after reload MB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for n in $COUNTS; do
        for t in $TARGETS; do
            echo "| $t | $n | $(value "$t" "$n" rss_mb) | $(value "$t" "$n" idle_cpu_pct) | $(value "$t" "$n" start_ms) | $(value "$t" "$n" check_ms) | $(value "$t" "$n" reload_ms) | $(value "$t" "$n" rss_after_reload_mb) |"
        done
    done
} >"$OUT_MD"
cat "$OUT_MD"
log "report written to $OUT_MD"
