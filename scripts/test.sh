#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, the end-to-end suite (the release binary
# driven by socket.io-client 2.x and 4.x under `node --test`), then the .deb built, checked and
# installed for real (as root: it installs and purges the package). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "== installing Node.js and npm (Debian packages)"
  apt-get update -qq
  apt-get install -y -qq nodejs npm
fi

echo "== cargo test"
cargo test --locked --all-targets

echo "== cargo build --release"
cargo build --locked --release

echo "== end-to-end (node --test, socket.io-client 2.x and 4.x)"
(
  cd tests/e2e
  npm ci --no-audit --no-fund --loglevel=error
  SIO_PUSH_BIN="$PWD/../../target/release/sio-push" npm test
)

echo "== the .deb: build, lintian, systemd-analyze, install, run, remove, purge"
packaging/test-package.sh
