#!/usr/bin/env bash
# The .deb, end to end (run by scripts/test.sh, as root on a Debian machine): build it
# with cargo-deb the way a release is built, install it with dpkg, check what it put on
# the system, start weir as the unit would (there is no systemd as PID 1 here: the
# unit's own ExecStart line, as the weir user, in the state dir), wait for /healthz,
# stop it with SIGTERM and expect a clean exit, then purge the package.
#
#   scripts/deb-smoke.sh            leaves the .deb in <target dir>/debian/
#
# It uses the packaged config's ports (127.0.0.1:8080 and :9901) and refuses to start if
# something already answers there or a `weir` package is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'deb-smoke: %s\n' "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (dpkg -i, a system user)"
command -v dpkg >/dev/null || die "needs dpkg (a Debian machine)"
if dpkg-query -W -f '${Status}' weir 2>/dev/null | grep -q 'ok installed'; then
    die "a weir package is already installed; remove it first: dpkg --purge weir"
fi
if curl -fsS --max-time 2 http://127.0.0.1:9901/healthz >/dev/null 2>&1; then
    die "something already answers on 127.0.0.1:9901 (the packaged config's admin port)"
fi
# The version check runs `weir ctl`, the health wait curl.
command -v curl >/dev/null || die "needs curl"

if ! command -v cargo-deb >/dev/null; then
    say "installing cargo-deb"
    cargo install cargo-deb --locked
fi

target=$(cargo metadata --format-version 1 --no-deps |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
release="$target/release"

# As release builds are (the Dockerfile): fleet mode and jemalloc.
say "building weir (release)"
cargo build --release --locked --features fleet,jemalloc --bin weir

# The man pages and completions come from the binary being packaged, into the target
# dir, where the assets in Cargo.toml's [package.metadata.deb] expect them.
rm -rf "$release/man" "$release/completions"
mkdir -p "$release/completions"
"$release/weir" man --dir "$release/man" >/dev/null
# Debian ships man pages gzipped; cargo-deb leaves files from the target dir as they are.
gzip -9n "$release/man"/*.1
"$release/weir" completions bash >"$release/completions/weir.bash"
"$release/weir" completions zsh >"$release/completions/_weir"
"$release/weir" completions fish >"$release/completions/weir.fish"

say "packaging"
# Stripped, as Debian ships binaries: the release profile's line tables are for
# profiling a build, not for every installed copy (cargo deb --dbgsym keeps them apart).
deb=$(cargo deb --no-build --strip -p weir-cli --output "$target/debian/" | tail -n 1)
[ -f "$deb" ] || die "cargo deb did not say where the package is (got: $deb)"
say "built $deb"

pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if dpkg-query -W -f '${Status}' weir 2>/dev/null | grep -q 'installed'; then
        dpkg --purge weir >/dev/null || true
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
dpkg -i "$deb"

# What the package put on the system.
expected="weir $("$release/weir" --version | cut -d' ' -f2-)"
got=$(/usr/bin/weir --version)
[ "$got" = "$expected" ] || die "installed weir --version says '$got', the build '$expected'"
case "$got" in *"(unknown)"*) [ -d .git ] && die "the revision is unknown in a git checkout" ;; esac
say "installed: $got"
getent passwd weir >/dev/null || die "no weir user"
[ "$(stat -c %U /var/lib/weir)" = weir ] || die "/var/lib/weir is not owned by weir"
dpkg-query -W -f '${Conffiles}\n' weir | grep -q '^ */etc/weir/weir.toml ' ||
    die "/etc/weir/weir.toml is not a conffile"
unit=/usr/lib/systemd/system/weir.service
[ -f "$unit" ] || die "no $unit"
for f in /usr/share/man/man1/weir.1.gz /usr/share/man/man1/weir-ctl-status.1.gz \
    /usr/share/bash-completion/completions/weir /usr/share/zsh/vendor-completions/_weir \
    /usr/share/fish/vendor_completions.d/weir.fish /usr/share/doc/weir/examples/weir.toml; do
    [ -f "$f" ] || die "missing $f"
done
if command -v man >/dev/null; then
    [ "$(man -w weir)" = /usr/share/man/man1/weir.1.gz ] || die "man -w weir: $(man -w weir 2>&1)"
fi
if command -v systemd-analyze >/dev/null; then
    # Warnings (unknown keys, bad values) go to stderr with exit 0: any output fails.
    problems=$(systemd-analyze verify "$unit" 2>&1) || die "systemd-analyze verify: $problems"
    [ -z "$problems" ] || die "systemd-analyze verify: $problems"
fi
runuser -u weir -- /usr/bin/weir check --config /etc/weir/weir.toml >/dev/null ||
    die "weir check refuses the packaged config"

# Start it as the unit does: its ExecStart, as the weir user, in the state dir. setpriv
# execs (no child process), so $! is weir itself and gets the SIGTERM below.
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
[ -n "$exec_start" ] || die "no ExecStart in $unit"
# shellcheck disable=SC2086 # the unit's command line, split as systemd splits it
(cd /var/lib/weir && exec setpriv --reuid=weir --regid=weir --init-groups -- $exec_start) &
pid=$!
deadline=$((SECONDS + 30))
until curl -fsS --max-time 1 http://127.0.0.1:9901/healthz >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "weir exited before answering /healthz"
    [ "$SECONDS" -lt "$deadline" ] || die "no /healthz within 30 s"
    sleep 0.2
done
say "weir answers /healthz"
header=$(/usr/bin/weir ctl status | head -n 1)
[ "$header" = "$got at http://127.0.0.1:9901" ] || die "weir ctl status says '$header'"
[ -n "$(ls -A /var/lib/weir)" ] || die "weir wrote nothing to /var/lib/weir"

kill -TERM "$pid"
deadline=$((SECONDS + 45))
while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "weir still running 45 s after SIGTERM"
    sleep 0.2
done
code=0
wait "$pid" || code=$?
pid=
[ "$code" -eq 0 ] || die "weir exited with $code after SIGTERM"
say "weir stopped cleanly on SIGTERM"

dpkg --purge weir >/dev/null
for f in /usr/bin/weir /etc/weir/weir.toml "$unit" /var/lib/weir; do
    [ ! -e "$f" ] || die "$f is still there after dpkg --purge"
done
say "ok: built, installed, started, stopped and purged $(basename "$deb")"
