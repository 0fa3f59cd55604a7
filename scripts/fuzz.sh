#!/usr/bin/env bash
# Builds the fuzz targets (NBD protocol core in nbd-server/fuzz, image readers in
# image/fuzz) with libFuzzer's coverage instrumentation on the stable toolchain and runs
# each for a while. Image targets start from seeds in image/fuzz/seeds/<target>.
# usage: scripts/fuzz.sh [seconds per target, default 30] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(handshake request_parser qcow2 vmdk)
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/cache/trireme/fuzz-target}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
triple="$(rustc -vV | sed -n 's/^host: //p')"
for manifest in nbd-server/fuzz/Cargo.toml image/fuzz/Cargo.toml; do
  cargo build --release --locked --manifest-path "$manifest" --target "$triple"
done
for t in "${targets[@]}"; do
  corpus="$CARGO_TARGET_DIR/corpus/$t"
  log="$CARGO_TARGET_DIR/fuzz-$t.log"
  mkdir -p "$corpus"
  if [ -d "image/fuzz/seeds/$t" ]; then cp -n image/fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true; fi
  echo "== fuzz $t for ${secs}s"
  if ! "$CARGO_TARGET_DIR/$triple/release/$t" -max_total_time="$secs" -print_final_stats=1 \
    -artifact_prefix="$CARGO_TARGET_DIR/$t-" "$corpus" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed; the input is saved as $CARGO_TARGET_DIR/$t-crash-*" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log"
done
