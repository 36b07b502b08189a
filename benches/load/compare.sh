#!/usr/bin/env bash
# Load comparison: weir vs HAProxy vs nginx (as proxies) vs no proxy at all,
# all doing the same job: a per-request 90/10 weighted split between two
# upstream pools ("stable", "canary") with keep-alive on both sides.
# Clients speak HTTP/1.1 (wrk) and/or cleartext HTTP/2 with prior knowledge
# (h2load); the proxies always forward over HTTP/1.1 keep-alive.
#
# Run from the repository root:
#     benches/load/compare.sh
#
# Environment (all optional):
#   PROTOCOLS     client protocols, in order: h1 = HTTP/1.1 with wrk,
#                 h2 = h2c (prior knowledge) with h2load        (default "h1 h2")
#   DURATION      duration of each measured run (wrk -d, h2load -D) (default 10s)
#   CONNS         wrk keep-alive connections                    (default 64)
#   H2_CONNS      h2load connections (-c)                       (default 4)
#   H2_STREAMS    h2load concurrent streams per connection (-m) (default 16)
#   H2_THREADS    h2load threads (-t)                           (default 1)
#   REPEATS       measured runs per target                      (default 3)
#   WRK_THREADS   wrk threads; wrk shares one pinned core with
#                 the upstream, so more threads only add
#                 context switches                              (default 1)
#   WARMUP        uncounted warm-up per target and protocol     (default 2s)
#   TARGETS       which targets, in order      (default "direct weir haproxy nginx")
#   WEIR_BASE_BIN a second weir binary measured as target `weir-base` (e.g. the
#                 build before a change), for before/after ratios from one run
#   WEIR_BIN      weir binary; default: `cargo build --release` and
#                 use target/release/weir (only if weir is in TARGETS)
#   WEIR_FEATURES cargo features of that build (default jemalloc, as release
#                 builds; empty for glibc's malloc); make is installed if missing
#   WEIR_LOG      RUST_LOG for weir                             (default warn)
#   PROXY_CPU     core the proxy under test is pinned to        (default 0)
#   LOADGEN_CPU   core wrk/h2load and the upstream nginx are pinned to (default 1)
#   READY_TIMEOUT seconds to wait for a process to answer       (default 20)
#   WAIT_IDLE     before each target (and before repeating a noisy run),
#                 wait up to this many seconds for both cores to be
#                 <=5% busy                                     (default 0)
#   SPLIT_CHECK_N requests of the pre-run 90/10 split check     (default 1000)
#   NOISE_PCT     a run is flagged noisy if more than this % of either
#                 core went to processes other than ours        (default 3)
#   NOISY_RETRIES times a noisy run is repeated before it is kept (default 2)
#   KEEP_WORKDIR  1 = keep the temp dir (configs, logs, raw wrk/h2load output)
#   OUT_MD        where the report is written      (default benches/load/last-run.md)
#
# Everything listens on 127.0.0.1 only; every process is started here with
# its own config under a mktemp dir and killed on exit.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PROTOCOLS=${PROTOCOLS:-"h1 h2"}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-16}
H2_THREADS=${H2_THREADS:-1}
REPEATS=${REPEATS:-3}
WRK_THREADS=${WRK_THREADS:-1}
WARMUP=${WARMUP:-2s}
TARGETS=${TARGETS:-"direct weir haproxy nginx"}
WEIR_BIN=${WEIR_BIN:-}
WEIR_FEATURES=${WEIR_FEATURES-jemalloc}
WEIR_BASE_BIN=${WEIR_BASE_BIN:-}
WEIR_LOG=${WEIR_LOG:-warn}
PROXY_CPU=${PROXY_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
READY_TIMEOUT=${READY_TIMEOUT:-20}
WAIT_IDLE=${WAIT_IDLE:-0}
NOISE_PCT=${NOISE_PCT:-3}
IDLE_PCT=5
NOISY_RETRIES=${NOISY_RETRIES:-2}
SPLIT_CHECK_N=${SPLIT_CHECK_N:-1000}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
OUT_MD=${OUT_MD:-$SCRIPT_DIR/last-run.md}

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
# install_pkgs, alive, stop_pid: shared by the load scripts.
# shellcheck source=lib.sh
. "$SCRIPT_DIR/lib.sh"
has_proto() { [[ " $PROTOCOLS " == *" $1 "* ]]; }

for t in $TARGETS; do
    case $t in
        direct | weir | weir-base | haproxy | nginx) ;;
        *) die "unknown target '$t' in TARGETS (known: direct weir weir-base haproxy nginx)" ;;
    esac
done
for p in $PROTOCOLS; do
    case $p in
        h1 | h2) ;;
        *) die "unknown protocol '$p' in PROTOCOLS (known: h1 h2)" ;;
    esac
done
[[ -n ${PROTOCOLS// /} ]] || die "PROTOCOLS is empty (use h1, h2 or \"h1 h2\")"
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || die "REPEATS must be a positive integer"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer"
[[ $WRK_THREADS =~ ^[1-9][0-9]*$ ]] || die "WRK_THREADS must be a positive integer"
((WRK_THREADS <= CONNS)) || die "WRK_THREADS must not exceed CONNS"
[[ $H2_CONNS =~ ^[1-9][0-9]*$ ]] || die "H2_CONNS must be a positive integer"
[[ $H2_STREAMS =~ ^[1-9][0-9]*$ ]] || die "H2_STREAMS must be a positive integer"
[[ $H2_THREADS =~ ^[1-9][0-9]*$ ]] || die "H2_THREADS must be a positive integer"
((H2_THREADS <= H2_CONNS)) || die "H2_THREADS must not exceed H2_CONNS"
H2_TOTAL_STREAMS=$((H2_CONNS * H2_STREAMS))

# --------------------------------------------------------------------------
# Dependencies (Debian packages), installed only if missing.
# --------------------------------------------------------------------------

missing=()
command -v nginx >/dev/null || missing+=(nginx)
if has_proto h1; then command -v wrk >/dev/null || missing+=(wrk); fi
if has_proto h2; then
    if ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then missing+=(nghttp2-client); fi
fi
command -v curl >/dev/null || missing+=(curl)
if [[ -z $WEIR_BIN && -n $WEIR_FEATURES ]] && has_target weir; then command -v make >/dev/null || missing+=(make); fi
command -v taskset >/dev/null || missing+=(util-linux)
if has_target haproxy; then command -v haproxy >/dev/null || missing+=(haproxy); fi
((${#missing[@]} == 0)) || install_pkgs "${missing[@]}"
if has_proto h2; then
    curl --version | grep -qw HTTP2 || die "curl without HTTP/2 support: the h2 checks need curl --http2-prior-knowledge"
fi

NCPU=$(nproc)
if ((NCPU < 2)); then
    log "warning: only $NCPU CPU; proxy and load generator will share it"
    PROXY_CPU=0
    LOADGEN_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --------------------------------------------------------------------------
# weir binary
# --------------------------------------------------------------------------
if has_target weir; then
    if [[ -z $WEIR_BIN ]]; then
        log "building weir (cargo build --release --features '$WEIR_FEATURES')"
        (cd "$REPO_ROOT" && cargo build --release --features "$WEIR_FEATURES" >&2) || die "cargo build --release failed"
        WEIR_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/weir
    fi
    [[ -x $WEIR_BIN ]] || die "weir binary not found or not executable: $WEIR_BIN"
    WEIR_BIN=$(cd "$(dirname "$WEIR_BIN")" && pwd)/$(basename "$WEIR_BIN")
fi
if has_target weir-base; then
    [[ -x $WEIR_BASE_BIN ]] || die "target weir-base needs WEIR_BASE_BIN (an executable weir)"
fi

# --------------------------------------------------------------------------
# Work dir, process bookkeeping, cleanup
# --------------------------------------------------------------------------
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-compare.XXXXXX")
RESULTS_H1=$WORKDIR/results-h1.tsv
RESULTS_H2=$WORKDIR/results-h2.tsv
: >"$RESULTS_H1"
: >"$RESULTS_H2"
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
pick_port() { # VAR: store a free port in VAR (no subshell, so USED_PORTS sticks)
    local p i
    # 20000-31999: high, and below the usual ephemeral range (32768+), so
    # wrk's/the proxies' outgoing connections cannot collide with it.
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

pick_port UPSTREAM_STABLE_PORT
pick_port UPSTREAM_CANARY_PORT
pick_port UPSTREAM_H2_PORT
USER_LINE=""
((EUID == 0)) && USER_LINE="user root;"

# render TEMPLATE OUTPUT [KEY=VALUE...]: replace @KEY@ in benches/load/TEMPLATE.in
render() {
    local src=$SCRIPT_DIR/$1.in dst=$WORKDIR/$2
    shift 2
    local args=(-e "s|@WORKDIR@|$WORKDIR|g"
        -e "s|@USER_LINE@|$USER_LINE|g"
        -e "s|@UPSTREAM_STABLE_PORT@|$UPSTREAM_STABLE_PORT|g"
        -e "s|@UPSTREAM_CANARY_PORT@|$UPSTREAM_CANARY_PORT|g"
        -e "s|@UPSTREAM_H2_PORT@|$UPSTREAM_H2_PORT|g")
    local kv
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$src" >"$dst"
    if grep -q '@[A-Z_]*@' "$dst"; then die "unfilled placeholder in $dst"; fi
}

# wait_ready URL PID NAME LOGFILE [CURL_ARGS...]: poll until URL answers 2xx,
# with a deadline. With --http2-prior-knowledge the answer must also be HTTP/2.
wait_ready() {
    local url=$1 pid=$2 name=$3 logf=$4
    shift 4
    local want=1.1
    [[ " $* " == *" --http2-prior-knowledge "* ]] && want=2
    local deadline=$((SECONDS + READY_TIMEOUT))
    until [[ $(curl -fsS -o /dev/null -w '%{http_version}' --max-time 1 "$@" "$url" 2>/dev/null) == "$want" ]]; do
        if ! alive "$pid"; then
            log "$name exited before answering; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name did not answer $url (HTTP/$want) within ${READY_TIMEOUT}s; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        sleep 0.05
    done
}

# Busy ticks of one core from /proc/stat: user+nice+system+irq+softirq
# (everything on that core, whoever it was for; excludes idle/iowait/steal).
core_busy_ticks() {
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat
}

# Busy % of the two pinned cores over ~1 s, as "P L" (proxy core, loadgen core).
cores_busy_pct() {
    local a0 a1 b0 b1 t0 t1
    read -r a0 a1 t0 < <(awk -v p="cpu$PROXY_CPU" -v l="cpu$LOADGEN_CPU" \
        '$1 == p { bp = $2 + $3 + $4 + $7 + $8 } $1 == l { bl = $2 + $3 + $4 + $7 + $8 } $1 == p { tp = 0; for (i = 2; i <= NF; i++) tp += $i } END { print bp, bl, tp }' /proc/stat)
    sleep 1
    read -r b0 b1 t1 < <(awk -v p="cpu$PROXY_CPU" -v l="cpu$LOADGEN_CPU" \
        '$1 == p { bp = $2 + $3 + $4 + $7 + $8 } $1 == l { bl = $2 + $3 + $4 + $7 + $8 } $1 == p { tp = 0; for (i = 2; i <= NF; i++) tp += $i } END { print bp, bl, tp }' /proc/stat)
    awk -v p=$((b0 - a0)) -v l=$((b1 - a1)) -v t=$((t1 - t0)) 'BEGIN { if (t <= 0) t = 1; printf "%.0f %.0f\n", 100 * p / t, 100 * l / t }'
}

# CPU ticks of this shell's reaped children (cutime+cstime, fields 16+17):
# read around a foreground wrk, the difference is wrk's own CPU time.
reaped_child_ticks() {
    local s f
    s=$(cat "/proc/$$/stat")
    s=${s##*) }
    read -ra f <<<"$s"
    echo $((f[13] + f[14]))
}

# CPU ticks summed over PIDs, as "utime stime" (/proc/PID/stat fields 14, 15).
proc_ticks() {
    local ut=0 st=0 pid s f
    for pid in "$@"; do
        s=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        s=${s##*) } # drop "pid (comm) "; what is left starts at field 3
        read -ra f <<<"$s"
        ut=$((ut + f[11]))
        st=$((st + f[12]))
    done
    echo "$ut $st"
}

children_of() {
    local parent=$1 d s f
    for d in /proc/[0-9]*; do
        s=$(cat "$d/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -ra f <<<"$s"
        [[ ${f[1]} == "$parent" ]] && echo "${d#/proc/}"
    done
    return 0
}

# --------------------------------------------------------------------------
# Load generators: wrk (h1), h2load (h2)
# --------------------------------------------------------------------------
run_load() { # PROTO URL DURATION OUTFILE
    local proto=$1 url=$2 dur=$3 out=$4 cmd
    if [[ $proto == h1 ]]; then
        cmd=(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$dur" --latency "$url")
    else
        # http:// URI: h2load speaks h2c with prior knowledge (its default
        # --no-tls-proto=h2c), no Upgrade. Timing-based run of exactly DURATION;
        # the warm-up is a separate run so that the proxy CPU read around this
        # one covers only the measured requests.
        cmd=(h2load -t"$H2_THREADS" -c"$H2_CONNS" -m"$H2_STREAMS" -D "$dur" "$url")
    fi
    if ! taskset -c "$LOADGEN_CPU" "${cmd[@]}" >"$out" 2>&1; then
        cat "$out" >&2
        die "${cmd[0]} failed against $url"
    fi
}

# prints: req_per_s p50_us p99_us requests socket_errors non_2xx_3xx
parse_wrk() {
    awk '
    function us(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") return n
        if (u == "ms") return n * 1000
        if (u == "s")  return n * 1000000
        if (u == "m")  return n * 60000000
        if (u == "h")  return n * 3600000000
        return n
    }
    /Latency Distribution/        { dist = 1; next }
    dist && $1 == "50%"           { p50 = us($2) }
    dist && $1 == "99%"           { p99 = us($2); dist = 0 }
    / requests in /               { req = $1 }
    /Socket errors:/              { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) sock += $i + 0 }
    /Non-2xx or 3xx responses:/   { non2xx = $NF + 0 }
    /^Requests\/sec:/             { rps = $2 }
    END {
        if (rps == "" || req == "" || p50 == "" || p99 == "") exit 1
        printf "%s %s %s %s %d %d\n", rps, p50, p99, req, sock, non2xx
    }' "$1"
}

# prints: req_per_s done succeeded failed errored timeout status_4xx_5xx
#         min_us max_us mean_us sd_us
# (h2load: "failed" includes non-2xx/3xx answers; "errored" and "timeout" are
# subsets of "failed"; done = succeeded + failed.)
parse_h2load() {
    awk '
    function us(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") return n
        if (u == "ms") return n * 1000
        if (u == "s")  return n * 1000000
        return n
    }
    /^Application protocol:/      { proto = $3 }
    /^finished in /               { rps = $4 }
    /^requests: /                 { for (i = 2; i < NF; i++) { k = $(i + 1); sub(/,$/, "", k); v[k] = $i + 0 } req = 1 }
    /^status codes: /             { for (i = 3; i < NF; i++) { k = $(i + 1); sub(/,$/, "", k); sc[k] = $i + 0 } }
    /^time for request:/          { mn = us($4); mx = us($5); mean = us($6); sd = us($7) }
    END {
        if (proto != "h2c") { print "h2load did not speak h2c (Application protocol: " proto ")" > "/dev/stderr"; exit 1 }
        if (rps == "" || !req || mean == "") exit 1
        printf "%s %d %d %d %d %d %d %s %s %s %s\n", rps, v["done"], v["succeeded"], v["failed"], v["errored"], v["timeout"],
            sc["4xx"] + sc["5xx"], mn, mx, mean, sd
    }' "$1"
}

# --------------------------------------------------------------------------
# Upstream: nginx, two server blocks, pinned to LOADGEN_CPU
# --------------------------------------------------------------------------
mkdir -p "$WORKDIR/nginx-upstream-tmp" "$WORKDIR/nginx-proxy-tmp" "$WORKDIR/weir-state"
render nginx-upstream.conf nginx-upstream.conf
log "work dir: $WORKDIR"
log "starting upstream nginx on 127.0.0.1:$UPSTREAM_STABLE_PORT (stable) and :$UPSTREAM_CANARY_PORT (canary), h2c :$UPSTREAM_H2_PORT (direct h2 baseline only), CPU $LOADGEN_CPU"
taskset -c "$LOADGEN_CPU" nginx -p "$WORKDIR/" -e "$WORKDIR/nginx-upstream.error.log" \
    -c "$WORKDIR/nginx-upstream.conf" >"$WORKDIR/nginx-upstream.out" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_ready "http://127.0.0.1:$UPSTREAM_STABLE_PORT/" "$UPSTREAM_PID" "upstream nginx" "$WORKDIR/nginx-upstream.error.log" ||
    die "upstream nginx did not start"
wait_ready "http://127.0.0.1:$UPSTREAM_CANARY_PORT/" "$UPSTREAM_PID" "upstream nginx" "$WORKDIR/nginx-upstream.error.log" ||
    die "upstream nginx did not start"
if has_proto h2 && has_target direct; then
    wait_ready "http://127.0.0.1:$UPSTREAM_H2_PORT/" "$UPSTREAM_PID" "upstream nginx (h2c)" "$WORKDIR/nginx-upstream.error.log" \
        --http2-prior-knowledge || die "upstream nginx did not answer h2c"
fi
mapfile -t UPSTREAM_PIDS < <(echo "$UPSTREAM_PID"; children_of "$UPSTREAM_PID")

# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------
declare -A SPLIT_NOTE=()

# split_check PROTO TARGET URL: SPLIT_CHECK_N requests on one connection,
# counting which pool answered (the two upstream bodies differ). h1: curl,
# sequential. h2: nghttp (from nghttp2-client, like h2load), one h2c connection
# with prior knowledge, requests multiplexed; curl 7.88 cannot do this one: it
# fails with "Error in the HTTP2 framing layer" when it reuses an h2c
# prior-knowledge connection for the second URL.
split_check() {
    local proto=$1 target=$2 url=$3 key="$1 $2" out stable canary other total
    if [[ $proto == h1 ]]; then
        out=$(curl -sS --max-time 60 "$url/split-check/[1-$SPLIT_CHECK_N]" 2>/dev/null) || true
    else
        out=$(timeout 60 nghttp -m "$SPLIT_CHECK_N" "$url/split-check" 2>/dev/null) || true
    fi
    stable=$(grep -c '^stable$' <<<"$out" || true)
    canary=$(grep -c '^canary$' <<<"$out" || true)
    total=$((stable + canary))
    other=$((SPLIT_CHECK_N - total))
    if ((total > 0)); then
        SPLIT_NOTE[$key]=$(awk -v s="$stable" -v c="$canary" -v o="$other" \
            'BEGIN { printf "stable %d, canary %d (%.1f%% canary)%s", s, c, 100 * c / (s + c), (o ? sprintf(", %d failed", o) : "") }')
    else
        SPLIT_NOTE[$key]="no answer from either pool"
    fi
    log "$proto $target split check ($SPLIT_CHECK_N requests): ${SPLIT_NOTE[$key]}"
    if ((total == 0 || other > 0 || canary * 100 < total * 5 || canary * 100 > total * 15)); then
        log "warning: $proto $target split is not ~90/10 or had failures"
    fi
}

# start_target PROTO TARGET -> sets LOAD_URL (for PROTO), TARGET_PID, CPU_PIDS.
# The proxies listen for HTTP/1.1 and h2c alike, whatever PROTO is: weir on one
# port (hyper's auto builder tells them apart by the h2 preface), HAProxy and
# nginx on a second port (`proto h2` / `listen ... http2`) of the same
# frontend / server block. PROTO only picks the URL and the readiness check.
start_target() {
    local proto=$1 t=$2 port h2_port admin_port
    TARGET_PID=""
    CPU_PIDS=()
    case $t in
        direct)
            if [[ $proto == h1 ]]; then
                LOAD_URL="http://127.0.0.1:$UPSTREAM_STABLE_PORT/"
            else
                LOAD_URL="http://127.0.0.1:$UPSTREAM_H2_PORT/"
            fi
            return 0
            ;;
        weir | weir-base)
            local bin=$WEIR_BIN
            [[ $t == weir ]] || bin=$WEIR_BASE_BIN
            pick_port port
            pick_port admin_port
            h2_port=$port
            render weir.toml "$t.toml" PROXY_PORT="$port" ADMIN_PORT="$admin_port"
            log "starting $t ($bin) on 127.0.0.1:$port (HTTP/1.1 and h2c), CPU $PROXY_CPU"
            RUST_LOG=$WEIR_LOG taskset -c "$PROXY_CPU" "$bin" run --config "$WORKDIR/$t.toml" \
                >"$WORKDIR/$t.log" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/$t.log
            ;;
        haproxy)
            pick_port port
            pick_port h2_port
            render haproxy.cfg haproxy.cfg PROXY_PORT="$port" PROXY_H2_PORT="$h2_port"
            haproxy -c -q -f "$WORKDIR/haproxy.cfg" >&2 || die "haproxy config check failed"
            log "starting haproxy on 127.0.0.1:$port (HTTP/1.1) and :$h2_port (h2c), CPU $PROXY_CPU"
            taskset -c "$PROXY_CPU" haproxy -db -f "$WORKDIR/haproxy.cfg" >"$WORKDIR/haproxy.log" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/haproxy.log
            ;;
        nginx)
            pick_port port
            pick_port h2_port
            render nginx-proxy.conf nginx-proxy.conf PROXY_PORT="$port" PROXY_H2_PORT="$h2_port"
            log "starting nginx (proxy) on 127.0.0.1:$port (HTTP/1.1) and :$h2_port (h2c), CPU $PROXY_CPU"
            taskset -c "$PROXY_CPU" nginx -p "$WORKDIR/" -e "$WORKDIR/nginx-proxy.error.log" \
                -c "$WORKDIR/nginx-proxy.conf" >"$WORKDIR/nginx-proxy.out" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/nginx-proxy.error.log
            ;;
    esac
    PIDS+=("$TARGET_PID")
    wait_ready "http://127.0.0.1:$port/" "$TARGET_PID" "$t" "$TARGET_LOG" || die "$t did not start"
    if [[ $proto == h1 ]]; then
        LOAD_URL="http://127.0.0.1:$port/"
    else
        LOAD_URL="http://127.0.0.1:$h2_port/"
        # curl --http2-prior-knowledge: the answer must come back as HTTP/2.
        wait_ready "$LOAD_URL" "$TARGET_PID" "$t" "$TARGET_LOG" --http2-prior-knowledge ||
            die "$t does not answer h2c (prior knowledge) on $LOAD_URL"
        log "$t answers h2c with prior knowledge on $LOAD_URL"
    fi
    mapfile -t CPU_PIDS < <(echo "$TARGET_PID"; children_of "$TARGET_PID")
}

declare -A BG_NOTE=()
NOISY=0
RETRIED=0

# wait_idle: sample both cores (1 s); with WAIT_IDLE > 0, keep sampling until
# both are <= IDLE_PCT (5) % busy or WAIT_IDLE seconds have passed. Sets BGP/BGL.
wait_idle() {
    local start=$SECONDS next_log=$SECONDS
    read -r BGP BGL < <(cores_busy_pct)
    while ((BGP > IDLE_PCT || BGL > IDLE_PCT)) && ((SECONDS - start < WAIT_IDLE)); do
        if ((SECONDS >= next_log)); then
            log "cores busy (proxy core ${BGP}%, load-gen core ${BGL}%); waiting for idle ($((SECONDS - start))s of ${WAIT_IDLE}s)"
            next_log=$((SECONDS + 30))
        fi
        read -r BGP BGL < <(cores_busy_pct)
    done
}

# measure_run PROTO TARGET OUTFILE: one measured wrk/h2load run against
# LOAD_URL; sets the per-run globals.
measure_run() {
    local proto=$1 t=$2 out=$3
    c0=$(core_busy_ticks "$PROXY_CPU")
    l0=$(core_busy_ticks "$LOADGEN_CPU")
    read -r pu0 ps0 < <(proc_ticks "${CPU_PIDS[@]}")
    read -r uu0 us0 < <(proc_ticks "${UPSTREAM_PIDS[@]}")
    t0=$(date +%s%N)
    w0=$(reaped_child_ticks)
    run_load "$proto" "$LOAD_URL" "$DURATION" "$out"
    w1=$(reaped_child_ticks)
    t1=$(date +%s%N)
    read -r pu1 ps1 < <(proc_ticks "${CPU_PIDS[@]}")
    read -r uu1 us1 < <(proc_ticks "${UPSTREAM_PIDS[@]}")
    c1=$(core_busy_ticks "$PROXY_CPU")
    l1=$(core_busy_ticks "$LOADGEN_CPU")
    # Busy time on each core that none of our processes accounts for
    # (another build, a cron job...), as % of the run's wall time. The load
    # generator (wrk or h2load) is a reaped child, so w counts either.
    read -r fp fl < <(awk -v cp=$((c1 - c0)) -v p=$((pu1 - pu0 + ps1 - ps0)) \
        -v cl=$((l1 - l0)) -v u=$((uu1 - uu0 + us1 - us0)) -v w=$((w1 - w0)) \
        -v hz="$CLK_TCK" -v ns=$((t1 - t0)) \
        'BEGIN { sec = ns / 1e9; a = (cp - p) / hz / sec * 100; b = (cl - u - w) / hz / sec * 100;
                 printf "%.0f %.0f\n", (a < 0 ? 0 : a), (b < 0 ? 0 : b) }')
    # How busy each core was over the run, whoever for: the one near 100 %
    # is what capped req/s.
    busy=$(awk -v cp=$((c1 - c0)) -v cl=$((l1 - l0)) -v hz="$CLK_TCK" -v ns=$((t1 - t0)) \
        'BEGIN { sec = ns / 1e9; printf "%.0f%% / %.0f%%", cp / hz / sec * 100, cl / hz / sec * 100 }')
    noisy=0
    # With no proxy (direct) nothing of ours runs on the proxy core, so only
    # the load-gen core counts.
    if ((fl > NOISE_PCT)) || { [[ $t != direct ]] && ((fp > NOISE_PCT)); }; then noisy=1; fi
    if [[ -n $TARGET_PID ]] && ! alive "$TARGET_PID"; then
        tail -n 30 "$TARGET_LOG" >&2 || true
        die "$t died during a measured run"
    fi
}

# cpu_per_req TARGET REQUESTS: from the last measure_run, sets pcpu (proxy CPU s),
# pus (proxy µs/req), psplit (user / sys µs/req), cus (proxy-core µs/req) and
# uus (upstream µs/req).
cpu_per_req() {
    local t=$1 n=$2
    if [[ $t == direct ]]; then
        pcpu=-
        pus=-
        cus=-
        psplit=-
    else
        cus=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.3f", d / hz * 1e6 / n }')
        pcpu=$(awk -v d=$((pu1 - pu0 + ps1 - ps0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", d / hz }')
        pus=$(awk -v d=$((pu1 - pu0 + ps1 - ps0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.3f", d / hz * 1e6 / n }')
        psplit=$(awk -v u=$((pu1 - pu0)) -v s=$((ps1 - ps0)) -v hz="$CLK_TCK" -v n="$n" \
            'BEGIN { printf "%.2f / %.2f", u / hz * 1e6 / n, s / hz * 1e6 / n }')
    fi
    uus=$(awk -v d=$((uu1 - uu0 + us1 - us0)) -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.3f", d / hz * 1e6 / n }')
}

tool_of() { [[ $1 == h1 ]] && echo wrk || echo h2load; }

for proto in $PROTOCOLS; do
    tool=$(tool_of "$proto")
    for t in $TARGETS; do
        key="$proto $t"
        # Anything else busy on the two cores skews every number below.
        wait_idle
        BG_NOTE[$key]="proxy core ${BGP}%, load-gen core ${BGL}%"
        if ((BGP > IDLE_PCT || BGL > IDLE_PCT)); then
            NOISY=1
            log "warning: cores not idle before $proto $t (${BG_NOTE[$key]} busy): other work on this machine will skew the results"
        fi
        start_target "$proto" "$t"
        if [[ $t != direct ]]; then split_check "$proto" "$t" "${LOAD_URL%/}"; fi
        log "$proto $t: warm-up ($WARMUP, not counted)"
        run_load "$proto" "$LOAD_URL" "$WARMUP" "$WORKDIR/$tool-$t-warmup.txt"
        for ((r = 1; r <= REPEATS; r++)); do
            out=$WORKDIR/$tool-$t-$r.txt
            for ((attempt = 0; ; attempt++)); do
                if ((attempt > 0 && WAIT_IDLE > 0)); then wait_idle; fi
                measure_run "$proto" "$t" "$out"
                ((noisy && attempt < NOISY_RETRIES)) || break
                RETRIED=$((RETRIED + 1))
                log "warning: $proto $t run $r: ${fp}% of the proxy core and ${fl}% of the load-gen core went to other work; retrying ($((attempt + 1))/$NOISY_RETRIES)"
            done
            if ((noisy)); then
                log "warning: $proto $t run $r: ${fp}% of the proxy core and ${fl}% of the load-gen core went to other work; kept as noisy"
            fi
            if [[ $proto == h1 ]]; then
                parsed=$(parse_wrk "$out") || {
                    cat "$out" >&2
                    die "could not parse wrk output ($out)"
                }
                read -r rps p50 p99 req sock non2xx <<<"$parsed"
                ((req > 0)) || die "$t run $r: wrk completed no requests"
                cpu_per_req "$t" "$req"
                printf '%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                    "$t" "$r" "$rps" "$p50" "$p99" "$req" "$sock" "$non2xx" "$pcpu" "$pus" "$uus" "$cus" "$psplit" \
                    "$fp% / $fl%" "$noisy" "$busy" >>"$RESULTS_H1"
                log "h1 $t run $r/$REPEATS: $rps req/s, p50 ${p50}us, p99 ${p99}us, proxy CPU ${pus} us/req, errors: socket $sock, non-2xx/3xx $non2xx, other load ${fp}%/${fl}%"
            else
                parsed=$(parse_h2load "$out") || {
                    cat "$out" >&2
                    die "could not parse h2load output ($out)"
                }
                read -r rps ndone ok failed errored timedout non2xx lmin lmax lmean lsd <<<"$parsed"
                ((ok > 0)) || {
                    cat "$out" >&2
                    die "$t run $r: h2load got no successful response"
                }
                # Per request = per completed request (done = succeeded + failed):
                # the proxy did the work for failed ones too.
                cpu_per_req "$t" "$ndone"
                printf '%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                    "$t" "$r" "$rps" "$lmean" "$lmax" "$ndone" "$failed" "$errored" "$timedout" "$non2xx" \
                    "$pcpu" "$pus" "$uus" "$cus" "$psplit" "$fp% / $fl%" "$noisy" "$lmin" "$lsd" "$ok" "$busy" >>"$RESULTS_H2"
                log "h2 $t run $r/$REPEATS: $rps req/s, latency mean ${lmean}us max ${lmax}us, proxy CPU ${pus} us/req, errors: failed $failed (errored $errored, timeout $timedout, 4xx/5xx $non2xx), other load ${fp}%/${fl}%"
            fi
        done
        if [[ -n $TARGET_PID ]]; then stop_pid "$TARGET_PID"; fi
    done
done

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
col() { awk -F'\t' -v t="$2" -v c="$3" '$1 == t { print $c }' "$1"; } # FILE TARGET COLUMN
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
sum() { awk '{ s += $1 } END { print s + 0 }'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { printf f, v }'; }
ms() { awk -v v="$1" 'BEGIN { printf "%.3f ms", v / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f×", a / b }'; }

declare -A MED_RPS=() MED_CPU=()
NOISY_RUNS=""
REPORT=$WORKDIR/report.md
first_line() { "$@" 2>&1 | head -n 1 || true; }
weir_version="n/a (not in TARGETS)"
if has_target weir; then
    weir_version=$(timeout 5 "$WEIR_BIN" --version 2>/dev/null | head -n 1 || true)
    [[ -n $weir_version ]] || weir_version="(no --version)"
    weir_version+=" — $WEIR_BIN, built $(date -u -r "$WEIR_BIN" '+%Y-%m-%d %H:%M:%S UTC')"
    # Someone may be editing the sources while this runs: say so if the binary
    # measured is older than them (then it is not exactly the HEAD shown).
    newer=$(cd "$REPO_ROOT" && find src crates Cargo.toml Cargo.lock -newer "$WEIR_BIN" -type f 2>/dev/null | wc -l)
    ((newer == 0)) || weir_version+=" (**$newer source file(s) newer than this binary**)"
fi
git_rev=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo "no commits")
H1_TITLE="HTTP/1.1 (wrk, $CONNS connections)"
H2_TITLE="HTTP/2 (h2load, $H2_TOTAL_STREAMS streams over $H2_CONNS connections)"

# target_label PROTO TARGET FILE NOISY_COLUMN: sets LABEL (⚠ if the target had
# noisy runs) and notes them in NOISY_RUNS; not for $(...), which would lose that.
target_label() {
    local proto=$1 t=$2 nnoisy
    LABEL=$t
    if [[ $t == direct ]]; then
        LABEL="direct (no proxy)"
        [[ $proto == h2 ]] && LABEL="direct (no proxy; upstream nginx speaks h2c)"
    fi
    [[ $t == nginx ]] && LABEL="nginx (proxy)"
    nnoisy=$(col "$3" "$t" "$4" | sum)
    if ((nnoisy > 0)); then
        LABEL+=" ⚠"
        NOISY_RUNS+=" $proto/$t:$nnoisy"
    fi
    return 0
}

ratio_table() { # PROTO
    has_target weir || return 0
    local p=$1
    echo "| weir ÷ other ($p) | vs HAProxy | vs nginx |"
    echo "|---|---|---|"
    echo "| proxy CPU µs/req (lower is better for weir) | $(ratio "${MED_CPU[$p weir]:-}" "${MED_CPU[$p haproxy]:-}") | $(ratio "${MED_CPU[$p weir]:-}" "${MED_CPU[$p nginx]:-}") |"
    echo "| req/s (higher is better for weir) | $(ratio "${MED_RPS[$p weir]:-}" "${MED_RPS[$p haproxy]:-}") | $(ratio "${MED_RPS[$p weir]:-}" "${MED_RPS[$p nginx]:-}") |"
    echo
    if has_target weir-base; then
        echo "| weir ÷ weir-base ($p) | ratio |"
        echo "|---|---|"
        echo "| proxy CPU µs/req | $(ratio "${MED_CPU[$p weir]:-}" "${MED_CPU[$p weir-base]:-}") |"
        echo "| req/s | $(ratio "${MED_RPS[$p weir]:-}" "${MED_RPS[$p weir-base]:-}") |"
        echo
    fi
}

# The cells every protocol's table shares, for target $2 of protocol $1 in results file
# $3 (req/s in column 3, CPU µs/request in column $4): sets the caller's rps, rmin, rmax
# and cpu_cell, and records the medians for the ratio table.
shared_cells() {
    local proto=$1 t=$2 file=$3 cpu_col=$4
    rps=$(col "$file" "$t" 3 | median)
    rmin=$(col "$file" "$t" 3 | sort -g | head -n 1)
    rmax=$(col "$file" "$t" 3 | sort -g | tail -n 1)
    MED_RPS[$proto $t]=$rps
    if [[ $t == direct ]]; then
        cpu_cell="— (no proxy)"
    else
        MED_CPU[$proto $t]=$(col "$file" "$t" "$cpu_col" | median)
        cpu_cell=$(fmt "${MED_CPU[$proto $t]}" "%.2f")
    fi
}

report_h1() {
    local t rps rmin rmax p50 p99 sock non2xx cpu_cell err_cell
    echo "## $H1_TITLE"
    echo
    echo "| target | req/s (min–max) | p50 | p99 | proxy CPU µs/req | errors |"
    echo "|---|---|---|---|---|---|"
    for t in $TARGETS; do
        shared_cells h1 "$t" "$RESULTS_H1" 10
        p50=$(col "$RESULTS_H1" "$t" 4 | median)
        p99=$(col "$RESULTS_H1" "$t" 5 | median)
        sock=$(col "$RESULTS_H1" "$t" 7 | sum)
        non2xx=$(col "$RESULTS_H1" "$t" 8 | sum)
        if ((sock + non2xx == 0)); then err_cell=0; else err_cell="socket $sock, non-2xx/3xx $non2xx"; fi
        target_label h1 "$t" "$RESULTS_H1" 15
        printf '| %s | %s (%s–%s) | %s | %s | %s | %s |\n' "$LABEL" \
            "$(fmt "$rps" "%.0f")" "$(fmt "$rmin" "%.0f")" "$(fmt "$rmax" "%.0f")" \
            "$(ms "$p50")" "$(ms "$p99")" "$cpu_cell" "$err_cell"
    done
    echo
    ratio_table h1
}

report_h2() {
    local t rps rmin rmax lmean lmax failed errored timedout non2xx cpu_cell err_cell
    echo "## $H2_TITLE"
    echo
    echo "Latency is h2load's *time for request* (it reports no percentiles): mean is the median of the"
    echo "runs' means, max the largest over all runs. Errors: h2load's *failed* requests (they include"
    echo "non-2xx/3xx answers; *errored* = stream/connection failures and *timeout* are subsets of them)."
    echo
    echo "| target | req/s (min–max) | mean latency | max latency | proxy CPU µs/req | errors |"
    echo "|---|---|---|---|---|---|"
    for t in $TARGETS; do
        shared_cells h2 "$t" "$RESULTS_H2" 12
        lmean=$(col "$RESULTS_H2" "$t" 4 | median)
        lmax=$(col "$RESULTS_H2" "$t" 5 | sort -g | tail -n 1)
        failed=$(col "$RESULTS_H2" "$t" 7 | sum)
        errored=$(col "$RESULTS_H2" "$t" 8 | sum)
        timedout=$(col "$RESULTS_H2" "$t" 9 | sum)
        non2xx=$(col "$RESULTS_H2" "$t" 10 | sum)
        if ((failed == 0)); then err_cell=0; else err_cell="failed $failed (errored $errored, timeout $timedout, 4xx/5xx $non2xx)"; fi
        target_label h2 "$t" "$RESULTS_H2" 17
        printf '| %s | %s (%s–%s) | %s | %s | %s | %s |\n' "$LABEL" \
            "$(fmt "$rps" "%.0f")" "$(fmt "$rmin" "%.0f")" "$(fmt "$rmax" "%.0f")" \
            "$(ms "$lmean")" "$(ms "$lmax")" "$cpu_cell" "$err_cell"
    done
    echo
    ratio_table h2
}

{
    echo "# weir load comparison"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- machine: $NCPU CPUs, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- pinning: proxy on CPU $PROXY_CPU; load generator (wrk / h2load) + upstream nginx on CPU $LOADGEN_CPU"
    echo "- protocols: $PROTOCOLS (client side; the proxies always forward over HTTP/1.1 keep-alive)"
    if has_proto h1; then
        echo "- h1: wrk, $WRK_THREADS thread(s), $CONNS keep-alive connections, $DURATION per run, $REPEATS run(s) per target, $WARMUP warm-up"
    fi
    if has_proto h2; then
        echo "- h2: h2load, $H2_THREADS thread(s), $H2_CONNS connections × $H2_STREAMS concurrent streams = $H2_TOTAL_STREAMS streams, cleartext HTTP/2 with prior knowledge (h2c), $DURATION per run (-D), $REPEATS run(s) per target, $WARMUP warm-up (a separate h2load run)"
    fi
    echo "- workload: GET / → 200, 7-byte body; proxies split 90/10 per request between two upstream pools"
    echo "- versions:"
    echo "  - $(first_line nginx -v)"
    echo "  - $(first_line haproxy -v)"
    if has_proto h1; then echo "  - $(first_line wrk -v)"; fi
    if has_proto h2; then echo "  - $(first_line h2load --version)"; fi
    echo "  - weir: $weir_version (repo HEAD at run time: $git_rev)"
    echo
    echo "Medians over $REPEATS run(s); req/s range is min–max. Errors are summed over all measured runs."
    echo
    for proto in $PROTOCOLS; do "report_$proto"; done
    echo "Cores busy in the second before each target started (should be ~0%):"
    for proto in $PROTOCOLS; do
        for t in $TARGETS; do echo "- $proto $t: ${BG_NOTE[$proto $t]}"; done
    done
    echo
    if ((NOISY)) || [[ -n $NOISY_RUNS ]]; then
        echo "**Warning: the machine was not idle (⚠ = target with noisy runs:${NOISY_RUNS:- none during runs});"
        echo "other processes took CPU from the proxy or the load generator. Treat these numbers as noisy"
        echo "and re-run on an idle machine (WAIT_IDLE=300 waits for idle cores before each target).**"
        echo
    fi
    if ((${#SPLIT_NOTE[@]} > 0)); then
        echo "Split check ($SPLIT_CHECK_N requests on one connection before warm-up; h1: sequential, curl; h2: multiplexed on one h2c connection, nghttp):"
        for proto in $PROTOCOLS; do
            for t in $TARGETS; do
                [[ -n ${SPLIT_NOTE[$proto $t]:-} ]] && echo "- $proto $t: ${SPLIT_NOTE[$proto $t]}"
            done
        done
        echo
    fi
    echo "<details><summary>Per-run results</summary>"
    echo
    echo "proxy µs/req: the proxy's own processes (utime+stime), also split into user / system."
    echo "proxy-core µs/req: everything the proxy's core was busy with (incl. softirq network work"
    echo "and anything else scheduled there). upstream µs/req: the upstream nginx (master + worker)."
    echo "For h2, per request means per request h2load completed (*done* = succeeded + failed)."
    echo
    echo "cores busy: how busy the proxy / load-gen core was during the run (anything on it); the one near"
    echo "100% is what capped req/s. other load: the part of that not accounted to the proxy, upstream or load"
    echo "generator, as % of the run; above ${NOISE_PCT}% the run is marked noisy. Noisy runs repeated: $RETRIED."
    echo
    if has_proto h1; then
        echo "$H1_TITLE:"
        echo
        echo "| target | run | req/s | p50 | p99 | requests | proxy CPU s | proxy µs/req | user / sys µs/req | proxy-core µs/req | upstream µs/req | socket errors | non-2xx/3xx | cores busy | other load |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        while IFS=$'\t' read -r t r rps p50 p99 req sock non2xx pcpu pus uus cus psplit other noisy busy; do
            ((noisy)) && other+=" **noisy**"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$t" "$r" "$rps" "$(ms "$p50")" "$(ms "$p99")" "$req" "$pcpu" "$pus" "$psplit" "$cus" "$uus" "$sock" "$non2xx" "$busy" "$other"
        done <"$RESULTS_H1"
        echo
    fi
    if has_proto h2; then
        echo "$H2_TITLE:"
        echo
        echo "| target | run | req/s | latency min / mean / max (sd) | done | succeeded | proxy CPU s | proxy µs/req | user / sys µs/req | proxy-core µs/req | upstream µs/req | failed (errored, timeout, 4xx/5xx) | cores busy | other load |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        while IFS=$'\t' read -r t r rps lmean lmax ndone failed errored timedout non2xx pcpu pus uus cus psplit other noisy lmin lsd ok busy; do
            ((noisy)) && other+=" **noisy**"
            printf '| %s | %s | %s | %s / %s / %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s (%s, %s, %s) | %s | %s |\n' \
                "$t" "$r" "$rps" "$(ms "$lmin")" "$(ms "$lmean")" "$(ms "$lmax")" "$(ms "$lsd")" "$ndone" "$ok" \
                "$pcpu" "$pus" "$psplit" "$cus" "$uus" "$failed" "$errored" "$timedout" "$non2xx" "$busy" "$other"
        done <"$RESULTS_H2"
        echo
    fi
    echo "</details>"
} >"$REPORT"

echo
cat "$REPORT"
cp "$REPORT" "$OUT_MD"
log "report written to $OUT_MD"
