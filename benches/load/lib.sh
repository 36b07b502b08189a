# Helpers shared by the load scripts (compare.sh, conn-memory.sh, many-services.sh),
# sourced after they define log, die and the PIDS array.

# Install Debian packages (as root, or through sudo), keeping their own system services
# from being started: the scripts start every process themselves.
install_pkgs() {
    local sudo=() rc=0 made_policy=0
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to install: $*"
        sudo=(sudo)
    fi
    # Keep the packages' own system services from being started by the
    # install: this benchmark starts every process itself.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    log "installing: $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
    if ((rc == 0)); then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "$@" >&2 || rc=$?
    fi
    if ((made_policy)); then "${sudo[@]}" rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || die "apt-get failed (rc=$rc)"
}

# Whether a process is alive (a zombie is not).
alive() {
    local st
    [[ -r /proc/$1/stat ]] || return 1
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st%% *} != Z ]]
}

# Stop a process we started (TERM, then KILL after 10 s), reap it and forget it in PIDS.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
