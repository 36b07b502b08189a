#!/usr/bin/env bash
# Memory per connection: weir vs HAProxy vs nginx as proxies, configured as in
# compare.sh (the same benches/load/*.in templates; only the connection limits
# are raised and the upstream gets a large file at /big). Three runs per proxy,
# each on a freshly started proxy:
#   idle   open N keep-alive client connections, one request answered on each,
#          then keep them open and idle: (RSS with them open - RSS at start) / N
#   cycles close them all, wait until the proxy has none left, read the RSS
#          left above the start; open and close again, CYCLES times in all
#          (the idle figure is the first cycle's)
#   slow   SLOW_N connections each ask for a BIG_MB MiB file through the proxy
#          and do not read it (SO_RCVBUF of RCVBUF bytes set before connect, so
#          the client's kernel holds almost nothing): peak RSS over SLOW_HOLD s
# RSS is VmRSS from /proc/PID/status, summed over the proxy's processes (nginx:
# master + workers). The client is benches/load/conn-memory-client.py (python3,
# standard library only).
#
# Run from the repository root:
#     benches/load/conn-memory.sh
#
# Environment (all optional):
#   TARGETS       which proxies, in order       (default "weir haproxy nginx")
#   N             idle keep-alive connections   (default 10000)
#   CYCLES        open/close cycles             (default 7)
#   SLOW_N        slow-reader connections       (default 1000)
#   BIG_MB        size of the file the slow readers ask for, MiB (default 4)
#   RCVBUF        the slow readers' SO_RCVBUF, bytes (default 4096)
#   SLOW_HOLD     seconds the slow readers are held after all connected (default 15)
#   SLOW_READ     bytes each slow reader reads per second; 0 = none (default 0)
#   SETTLE        max seconds to wait for the RSS to stop moving (default 15)
#   CLOSE_WAIT    seconds to wait after the last connection closed before that,
#                 for allocators that purge on a timer (jemalloc: ~10 s) (default 12)
#   WEIR_BIN      weir binary; default: `cargo build --release` and use
#                 target/release/weir (only if weir is in TARGETS)
#   WEIR_FEATURES cargo features of that build (default jemalloc, as release
#                 builds; empty for glibc's malloc); make is installed if missing
#   WEIR_BASE_BIN a second weir binary measured as target `weir-base`
#   WEIR_LOG      RUST_LOG for weir             (default warn)
#   WEIR_ENV      extra environment for weir only, e.g.
#                 "GLIBC_TUNABLES=glibc.malloc.trim_threshold=65536" (default none)
#   PROXY_CPU     core the proxy is pinned to   (default 0)
#   LOADGEN_CPU   core the client and the upstream nginx are pinned to (default 1)
#   READY_TIMEOUT seconds to wait for a process to answer (default 20)
#   KEEP_WORKDIR  1 = keep the temp dir (configs, logs, raw client output)
#   OUT_MD        where the report is written (default benches/load/conn-memory.md)
#
# Everything listens on 127.0.0.1 only; every process is started here with its
# own config under a mktemp dir and killed on exit.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

TARGETS=${TARGETS:-"weir haproxy nginx"}
N=${N:-10000}
CYCLES=${CYCLES:-7}
SLOW_N=${SLOW_N:-1000}
BIG_MB=${BIG_MB:-4}
RCVBUF=${RCVBUF:-4096}
SLOW_HOLD=${SLOW_HOLD:-15}
SLOW_READ=${SLOW_READ:-0}
SETTLE=${SETTLE:-15}
CLOSE_WAIT=${CLOSE_WAIT:-12}
WEIR_BIN=${WEIR_BIN:-}
WEIR_FEATURES=${WEIR_FEATURES-jemalloc}
WEIR_BASE_BIN=${WEIR_BASE_BIN:-}
WEIR_LOG=${WEIR_LOG:-warn}
WEIR_ENV=${WEIR_ENV:-}
PROXY_CPU=${PROXY_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
READY_TIMEOUT=${READY_TIMEOUT:-20}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
OUT_MD=${OUT_MD:-$SCRIPT_DIR/conn-memory.md}
CLIENT=$SCRIPT_DIR/conn-memory-client.py

log() { printf '[conn-memory] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
has_target() { [[ " $TARGETS " == *" $1 "* ]]; }
# install_pkgs, alive, stop_pid: shared by the load scripts.
# shellcheck source=lib.sh
. "$SCRIPT_DIR/lib.sh"

for t in $TARGETS; do
    case $t in
        weir | weir-base | haproxy | nginx) ;;
        *) die "unknown target '$t' in TARGETS (known: weir weir-base haproxy nginx)" ;;
    esac
done
for v in N CYCLES SLOW_N BIG_MB RCVBUF SLOW_HOLD; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[[ $SLOW_READ =~ ^[0-9]+$ ]] || die "SLOW_READ must be a non-negative integer"
command -v python3 >/dev/null || die "python3 is needed for the client"

# --------------------------------------------------------------------------
# Dependencies (Debian packages), installed only if missing.
# --------------------------------------------------------------------------

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
if [[ -z $WEIR_BIN && -n $WEIR_FEATURES ]] && has_target weir; then command -v make >/dev/null || missing+=(make); fi
command -v taskset >/dev/null || missing+=(util-linux)
if has_target haproxy; then command -v haproxy >/dev/null || missing+=(haproxy); fi
((${#missing[@]} == 0)) || install_pkgs "${missing[@]}"

if (($(nproc) < 2)); then
    PROXY_CPU=0
    LOADGEN_CPU=0
fi
# N client sockets in the client, N plus upstream sockets in the proxy: as many
# as allowed, up to 2N + 4096.
NOFILE=$((2 * N + 4096))
ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
((NOFILE > N + 1024)) || die "ulimit -n is $NOFILE: too low for N=$N (raise the hard limit or lower N)"

# --------------------------------------------------------------------------
# weir binary
# --------------------------------------------------------------------------
if has_target weir; then
    if [[ -z $WEIR_BIN ]]; then
        log "building weir (cargo build --release --features '$WEIR_FEATURES')"
        (cd "$REPO_ROOT" && cargo build --release -p weir-cli --features "$WEIR_FEATURES" >&2) || die "cargo build --release failed"
        WEIR_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/weir
    fi
    [[ -x $WEIR_BIN ]] || die "weir binary not found or not executable: $WEIR_BIN"
fi
if has_target weir-base; then
    [[ -x $WEIR_BASE_BIN ]] || die "target weir-base needs WEIR_BASE_BIN (an executable weir)"
fi

# --------------------------------------------------------------------------
# Work dir, process bookkeeping, cleanup
# --------------------------------------------------------------------------
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-conn-memory.XXXXXX")
PIDS=()



cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
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

port_busy() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
USED_PORTS=" "
pick_port() { # VAR: a free port in 20000-31999 (below the ephemeral range)
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

pick_port UPSTREAM_STABLE_PORT
pick_port UPSTREAM_CANARY_PORT
pick_port UPSTREAM_H2_PORT
USER_LINE=""
((EUID == 0)) && USER_LINE="user root;"

# render TEMPLATE OUTPUT [KEY=VALUE...]: compare.sh's templates, with @KEY@ filled in
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

wait_ready() { # URL PID NAME LOGFILE
    local url=$1 pid=$2 name=$3 logf=$4 deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        if ! alive "$pid" || ((SECONDS >= deadline)); then
            log "$name did not answer $url; last log lines:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        sleep 0.05
    done
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
# Upstream: compare.sh's nginx, plus /big (a BIG_MB MiB file) on both pools
# --------------------------------------------------------------------------
mkdir -p "$WORKDIR/nginx-upstream-tmp" "$WORKDIR/nginx-proxy-tmp" "$WORKDIR/weir-state"
head -c "$((BIG_MB * 1024 * 1024))" /dev/urandom >"$WORKDIR/big.bin"
render nginx-upstream.conf nginx-upstream.conf
sed -i -e "s|worker_connections [0-9]*;|worker_connections $NOFILE;|" \
    -e "s|^\( *\)location / { return 200 .*|&\n\1location = /big { alias $WORKDIR/big.bin; default_type application/octet-stream; }|" \
    "$WORKDIR/nginx-upstream.conf"
grep -q 'location = /big' "$WORKDIR/nginx-upstream.conf" || die "could not add /big to the upstream config"
log "work dir: $WORKDIR"
taskset -c "$LOADGEN_CPU" nginx -p "$WORKDIR/" -e "$WORKDIR/nginx-upstream.error.log" \
    -c "$WORKDIR/nginx-upstream.conf" >"$WORKDIR/nginx-upstream.out" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_ready "http://127.0.0.1:$UPSTREAM_STABLE_PORT/big" "$UPSTREAM_PID" "upstream nginx" "$WORKDIR/nginx-upstream.error.log" ||
    die "upstream nginx did not start"

# start_target TARGET -> sets PORT, TARGET_PID, RSS_PIDS (comma-separated)
start_target() {
    local t=$1 admin_port h2_port
    pick_port PORT
    case $t in
        weir | weir-base)
            local bin=$WEIR_BIN
            [[ $t == weir ]] || bin=$WEIR_BASE_BIN
            pick_port admin_port
            render weir.toml "$t.toml" PROXY_PORT="$PORT" ADMIN_PORT="$admin_port"
            sed -i "s|^workers = .*|&\nmax_connections = $NOFILE|" "$WORKDIR/$t.toml"
            # shellcheck disable=SC2086 # WEIR_ENV is a list of NAME=VALUE words
            env RUST_LOG="$WEIR_LOG" $WEIR_ENV taskset -c "$PROXY_CPU" "$bin" run --config "$WORKDIR/$t.toml" \
                >>"$WORKDIR/$t.log" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/$t.log
            ;;
        haproxy)
            pick_port h2_port
            render haproxy.cfg haproxy.cfg PROXY_PORT="$PORT" PROXY_H2_PORT="$h2_port"
            # HAProxy reserves 2 fds per maxconn and refuses to start when the
            # limit is lower (strict-limits); idle clients need few server-side
            # connections, so with `no strict-limits` it only warns.
            sed -i -e "s|maxconn [0-9]*|maxconn $((N + 1024))\n    no strict-limits|" "$WORKDIR/haproxy.cfg"
            haproxy -c -q -f "$WORKDIR/haproxy.cfg" >&2 || die "haproxy config check failed"
            taskset -c "$PROXY_CPU" haproxy -db -f "$WORKDIR/haproxy.cfg" >>"$WORKDIR/haproxy.log" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/haproxy.log
            ;;
        nginx)
            pick_port h2_port
            render nginx-proxy.conf nginx-proxy.conf PROXY_PORT="$PORT" PROXY_H2_PORT="$h2_port"
            sed -i "s|worker_connections [0-9]*;|worker_connections $NOFILE;|" "$WORKDIR/nginx-proxy.conf"
            taskset -c "$PROXY_CPU" nginx -p "$WORKDIR/" -e "$WORKDIR/nginx-proxy.error.log" \
                -c "$WORKDIR/nginx-proxy.conf" >>"$WORKDIR/nginx-proxy.out" 2>&1 &
            TARGET_PID=$!
            TARGET_LOG=$WORKDIR/nginx-proxy.error.log
            ;;
    esac
    PIDS+=("$TARGET_PID")
    log "started $t on 127.0.0.1:$PORT (pid $TARGET_PID, CPU $PROXY_CPU)"
    wait_ready "http://127.0.0.1:$PORT/" "$TARGET_PID" "$t" "$TARGET_LOG" || die "$t did not start"
    RSS_PIDS=$( (
        echo "$TARGET_PID"
        children_of "$TARGET_PID"
    ) | paste -sd, -)
}

client() { # MODE OUTFILE ARGS...
    local mode=$1 out=$2
    shift 2
    taskset -c "$LOADGEN_CPU" python3 "$CLIENT" "$mode" --port "$PORT" --pids "$RSS_PIDS" \
        --settle "$SETTLE" "$@" >"$out" || die "client ($mode) failed against $t"
}

declare -A IDLE_KB AFTER1 AFTER_MAX AFTER_LAST SLOW_PEAK SLOW_END SLOW_START START_KB CYCLE_ROWS
for t in $TARGETS; do
    # Runs (a) and (b): idle connections, then close/reopen cycles.
    start_target "$t"
    log "$t: $N idle connections, $CYCLES cycles"
    client idle "$WORKDIR/$t-idle.txt" --n "$N" --cycles "$CYCLES" --close-wait "$CLOSE_WAIT"
    stop_pid "$TARGET_PID"
    start=$(awk '$1 == "start" { print $2 }' "$WORKDIR/$t-idle.txt")
    START_KB[$t]=$start
    IDLE_KB[$t]=$(awk -v s="$start" -v n="$N" '$1 == "cycle" && $2 == 1 { printf "%.2f", ($3 - s) / n }' "$WORKDIR/$t-idle.txt")
    AFTER1[$t]=$(awk -v s="$start" '$1 == "cycle" && $2 == 1 { printf "%.1f", ($4 - s) / 1024 }' "$WORKDIR/$t-idle.txt")
    AFTER_MAX[$t]=$(awk -v s="$start" '$1 == "cycle" { d = ($4 - s) / 1024; if (d > m) m = d } END { printf "%.1f", m }' "$WORKDIR/$t-idle.txt")
    AFTER_LAST[$t]=$(awk -v s="$start" '$1 == "cycle" { d = ($4 - s) / 1024 } END { printf "%.1f", d }' "$WORKDIR/$t-idle.txt")
    CYCLE_ROWS[$t]=$(awk -v s="$start" -v n="$N" '$1 == "cycle" { printf "%s%.2f / %.1f", ($2 > 1 ? "; " : ""), ($3 - s) / n, ($4 - s) / 1024 }' "$WORKDIR/$t-idle.txt")
    log "$t: start $start KiB, idle ${IDLE_KB[$t]} KiB/conn, after close ${AFTER1[$t]} MiB (cycle 1), ${AFTER_LAST[$t]} MiB (cycle $CYCLES)"

    # Run (c): slow readers, on a fresh proxy.
    start_target "$t"
    log "$t: $SLOW_N slow readers of a $BIG_MB MiB body"
    client slow "$WORKDIR/$t-slow.txt" --n "$SLOW_N" --path /big --rcvbuf "$RCVBUF" \
        --hold "$SLOW_HOLD" --read-bytes "$SLOW_READ"
    stop_pid "$TARGET_PID"
    SLOW_START[$t]=$(awk '$1 == "start" { printf "%.1f", $2 / 1024 }' "$WORKDIR/$t-slow.txt")
    SLOW_PEAK[$t]=$(awk '$1 == "slow" { printf "%.1f", $2 / 1024 }' "$WORKDIR/$t-slow.txt")
    SLOW_END[$t]=$(awk '$1 == "slow" { printf "%.1f", $3 / 1024 }' "$WORKDIR/$t-slow.txt")
    log "$t: slow readers: peak ${SLOW_PEAK[$t]} MiB (start ${SLOW_START[$t]} MiB)"
done

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
weir_desc() {
    local bin=$1
    printf '%s, built %s' "$bin" "$(date -u -r "$bin" '+%Y-%m-%d %H:%M:%S UTC')"
}
{
    echo "# Memory per connection: weir vs HAProxy vs nginx"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs ($(awk '/model name/ { $1 = $2 = $3 = ""; sub(/^ +/, ""); print; exit }' /proc/cpuinfo)),"
    echo "commit $(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')."
    has_target weir && echo "weir: $(weir_desc "$WEIR_BIN")."
    has_target weir-base && echo "weir-base: $(weir_desc "$WEIR_BASE_BIN")."
    [[ -n $WEIR_ENV ]] && echo "weir's extra environment: \`$WEIR_ENV\`."
    echo "Command: \`N=$N CYCLES=$CYCLES SETTLE=$SETTLE CLOSE_WAIT=$CLOSE_WAIT SLOW_N=$SLOW_N BIG_MB=$BIG_MB RCVBUF=$RCVBUF SLOW_HOLD=$SLOW_HOLD SLOW_READ=$SLOW_READ benches/load/conn-memory.sh\`"
    echo
    echo "| proxy | RSS at start | idle KiB/conn ($N conns) | left after close, cycle 1 | max over $CYCLES cycles | after cycle $CYCLES | slow readers: peak RSS ($SLOW_N × $BIG_MB MiB) |"
    echo "|---|---|---|---|---|---|---|"
    for t in $TARGETS; do
        printf '| %s | %.1f MiB | %s | %s MiB | %s MiB | %s MiB | %s MiB (start %s) |\n' "$t" \
            "$(awk -v k="${START_KB[$t]}" 'BEGIN { print k / 1024 }')" "${IDLE_KB[$t]}" \
            "${AFTER1[$t]}" "${AFTER_MAX[$t]}" "${AFTER_LAST[$t]}" "${SLOW_PEAK[$t]}" "${SLOW_START[$t]}"
    done
    echo
    echo "Per cycle, *KiB per open connection / MiB left above the start after all closed*:"
    echo
    for t in $TARGETS; do echo "- $t: ${CYCLE_ROWS[$t]}"; done
    echo
    echo "RSS is VmRSS summed over the proxy's processes (nginx: master and worker);"
    echo "the idle figure is (RSS with $N connections open − RSS at start) ÷ $N, read once"
    echo "the RSS stopped moving (≤ ${SETTLE} s; after closing, ${CLOSE_WAIT} s first). The slow readers set SO_RCVBUF=$RCVBUF before"
    echo "connecting and read $SLOW_READ bytes/s each; the peak is sampled every 0.1 s. Kernel"
    echo "socket buffers are not in RSS. See benches/load/README.md."
} >"$OUT_MD"
log "report: $OUT_MD"
cat "$OUT_MD"
