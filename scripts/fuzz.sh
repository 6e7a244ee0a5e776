#!/usr/bin/env bash
# Fuzzes the /send body parser and the config parser with cargo-fuzz (libFuzzer), each for a
# bounded time (default 60 s; first argument), starting from the seed corpus in fuzz/corpus/.
# A crash leaves its input in fuzz/artifacts/<target>/: fix the bug, then keep the input in
# fuzz/regressions/<target>/, where `cargo test` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
# cargo-fuzz passes nightly-only flags (sanitizers); this machine has one stable toolchain.
export RUSTC_BOOTSTRAP=1
for target in send_body config; do
  work=$(mktemp -d)
  cp "fuzz/corpus/$target"/* "$work/"
  cp "fuzz/regressions/$target"/* "$work/" 2>/dev/null || true
  echo "== fuzzing $target for ${secs}s"
  cargo fuzz run "$target" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+.*(DONE|INITED)|stat::number_of_executed_units|==[0-9]+==|SUMMARY|thread .* panicked|Done)" || true
  # cargo fuzz exits non-zero on a crash; pipefail is off for the grep, so check the artifacts.
  if compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
    echo "fuzzing $target found crashes: fuzz/artifacts/$target/"
    exit 1
  fi
  rm -rf "$work"
done
echo "fuzzing: no crash in ${secs}s per target"
