#!/usr/bin/env bash
# Builds target/debian/sio-push_<version>_<arch>.deb: the release binary, the man page generated
# from the clap definitions, and the packaged config (config.example.toml with the demo off, its
# demo site commented out, and data in /var/lib/sio-push). Installs cargo-deb if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb

cargo build --locked --release
mkdir -p target/packaging
cargo run --locked --release --quiet --example man > target/packaging/sio-push.1
gzip -9nf target/packaging/sio-push.1

awk '
  /^\[sites\.demo\]/ { demo = 1 }
  demo && !/^#/ && NF { print "# " $0; next }
  /^demo = / { print "demo = false"; next }
  /^data_dir = / { print "data_dir = \"/var/lib/sio-push\""; next }
  { print }
' config.example.toml > target/packaging/config.toml
# The packaged config must load as it is.
target/release/sio-push check-config --config target/packaging/config.toml >/dev/null

rm -f target/debian/sio-push_*.deb
cargo deb --locked --no-build --output target/debian/
ls target/debian/sio-push_*.deb
