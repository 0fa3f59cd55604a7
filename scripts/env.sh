# Sourced by the scripts: one target folder outside the clone and one profile
# (release) for build, test, clippy and bench, so the bundled RocksDB is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/trireme/target}"
export TRIREME_BIN="$CARGO_TARGET_DIR/release/trireme"
