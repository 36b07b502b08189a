#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then checks
# formatting and lints and runs every test, benches included in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the test suite uses; installed only when missing.
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
# Real Prometheus for the metrics end-to-end test, and promtool to lint /metrics.
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# Headless Chromium and its WebDriver for the dashboard's browser test.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# docker-compose (v1, Python) validates docker-compose.yml without a Docker engine.
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
# grpcio for the gRPC end-to-end test's real client and server (tests/grpc/). Debian's
# interpreter by path: a `python3` first on PATH (pyenv) cannot see Debian's packages.
/usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || need+=(python3-grpcio)
# Fleet mode: real etcd members started by the tests, and protoc plus the well-known
# .proto files that the etcd client crate compiles at build time.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# The `jemalloc` feature builds jemalloc from source with make.
command -v make >/dev/null 2>&1 || need+=(make)
# Completions, man pages and the systemd unit checked by real tools (tests/it/identity.rs).
command -v zsh >/dev/null 2>&1 || need+=(zsh)
command -v fish >/dev/null 2>&1 || need+=(fish)
command -v groff >/dev/null 2>&1 || need+=(groff-base)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's packages may try to start their service; there is no init here, and the
  # tests start their own instances.
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
fi

# The tests' temporary files (state dirs, configs, etcd data) go to one directory for
# this run, removed at the end: they would otherwise pile up in /tmp run after run.
TMPDIR=$(mktemp -d /tmp/weir-tests.XXXXXX)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

cargo fmt --all -- --check
# The library's layers: a lower layer never names a higher one (scripts/layers.py), and
# the product library does not depend on the CLI's crates.
/usr/bin/python3 scripts/layers.py
if cargo tree -p weir -e normal --prefix none | grep -Eq '^(clap|anyhow) '; then
  echo "the weir library must not depend on clap or anyhow (they belong to weir-cli)" >&2
  exit 1
fi
# Both builds stay clean: the default one (no etcd client, glibc's allocator: only the
# Rust toolchain needed) and the release one (fleet mode and jemalloc), which the tests
# run.
FEATURES=weir-cli/fleet,weir-cli/jemalloc
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features "$FEATURES" -- -D warnings
# --all-targets builds and runs lib, binary, integration tests and benches (criterion
# runs each bench once in test mode, so they never rot); doc tests separately.
cargo test --workspace --all-targets --features "$FEATURES"
cargo test --workspace --doc --features "$FEATURES"
# The docker-compose stack: validated, not started (no Docker engine on CI machines).
scripts/check-compose.sh target/debug/weir
# The .deb: built with cargo-deb, installed, started, stopped and purged.
scripts/deb-smoke.sh
