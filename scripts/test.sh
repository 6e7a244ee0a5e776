#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, the end-to-end suite (the release binary
# driven by socket.io-client 2.x and 4.x under `node --test`), a secrets scan of their logs, a
# load-generator smoke run, a short fuzzing run, then the .deb
# built, checked and installed for real (as root: it installs and purges the package). Installs
# what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The status page is tested in headless Chromium (Debian's package; playwright-core drives it).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The proof that 200 means on disk traces the server's syscalls (and finds its pid with pgrep).
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v pgrep >/dev/null 2>&1 || missing+=(procps)
# The TLS test makes a throwaway certificate.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The failed-fsync test builds a small LD_PRELOAD library (tests/e2e/fixtures/failsync.c).
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
# The Redis store is tested against real servers, a cluster of them too, behind a real HAProxy.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

echo "== cargo test"
cargo test --locked --all-targets

echo "== cargo build --release"
cargo build --locked --release
# The power-cut test's file system (tests/lossyfs, FUSE; mounts as root through /dev/fuse).
cargo build --locked --release -p sio-push-lossyfs

echo "== end-to-end (node --test, socket.io-client 2.x and 4.x)"
(
  cd tests/e2e
  npm ci --no-audit --no-fund --loglevel=error
  logs=$(mktemp -d)
  SIO_PUSH_E2E_LOG_DIR="$logs" SIO_PUSH_BIN="$PWD/../../target/release/sio-push" \
    SIO_PUSH_LOSSYFS_BIN="$PWD/../../target/release/sio-push-lossyfs" npm test
  echo "== the protocol cases again on two nodes sharing Redis (client on one, /send on the other)"
  SIO_PUSH_E2E_CLUSTER=1 SIO_PUSH_E2E_LOG_DIR="$logs" SIO_PUSH_BIN="$PWD/../../target/release/sio-push" \
    npm test -- protocol.test.mjs order.test.mjs send.test.mjs limits.test.mjs
  echo "== no token or API key in the logs of the whole run"
  node scan-logs.mjs "$logs"
  rm -rf "$logs"
)

echo "== load generator smoke run (correctness only; figures are in BENCHMARKS.md)"
cargo build --locked --release -p sio-push-bench
target/release/sio-push-bench smoke --server-bin target/release/sio-push
target/release/sio-push-bench smoke --server-bin target/release/sio-push --redis-nodes 2

echo "== fuzzing the /send body and config parsers (a short run; scripts/fuzz.sh SECS for longer)"
scripts/fuzz.sh 20

echo "== the .deb: build, lintian, systemd-analyze, install, run, remove, purge"
packaging/test-package.sh
