#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and end-to-end tests that drive
# the real trireme binary with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy,
# nbdsh, fio).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets --all-features -- -D warnings
echo "== build"
cargo build --release --workspace --all-targets
echo "== fuzz the NBD handshake and request parser and the QCOW2 and VMDK readers (30 s each)"
scripts/fuzz.sh 30
echo "== tests"
# Two tests at a time within each test binary; every end-to-end test has its own
# cluster folder and ports.
cargo test --release --workspace -- --test-threads="${TEST_THREADS:-2}"
