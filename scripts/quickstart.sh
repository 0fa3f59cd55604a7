#!/usr/bin/env bash
# Quick start: install what is needed, build, start a one-node dev cluster, create a
# demo volume and use it through NBD with qemu-io and qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh
cargo build --release --bin trireme
T="$TRIREME_BIN"
export TRIREME_CLUSTER="${TRIREME_CLUSTER:-$PWD/trireme-dev}"

"$T" dev up
"$T" dev status
"$T" volume info demo >/dev/null 2>&1 || "$T" volume create demo --size 1G
URI=nbd://127.0.0.1:10809/demo
echo "== qemu-io: write a pattern, read it back, zero, discard, flush"
qemu-io -f raw "$URI" -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' -c 'write -z 1M 1M' \
  -c 'discard 2M 1M' -c 'flush' -c 'write -f -P 0x11 4M 64k' -c 'read -P 0x11 4M 64k'
echo "== qemu-img info and map"
qemu-img info "$URI"
qemu-img map --output=human -f raw "$URI"
"$T" volume info demo
echo
echo "Trireme is serving $URI (stop it with: $T --cluster $TRIREME_CLUSTER dev down)"
