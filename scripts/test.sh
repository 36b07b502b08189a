#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then checks
# formatting and lints and runs every test, benches included in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the test suite uses; installed only when missing.
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# --all-targets builds and runs lib, binary, integration tests and benches (criterion
# runs each bench once in test mode, so they never rot); doc tests separately.
cargo test --all-targets
cargo test --doc
