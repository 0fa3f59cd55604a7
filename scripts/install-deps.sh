#!/usr/bin/env bash
# Installs what building and testing Trireme needs on Debian 12 (as root): the C
# toolchain pieces RocksDB's bindings need, and the real NBD clients the tests drive.
# Idempotent and quiet when everything is already there.
set -euo pipefail

packages=(
  libclang-dev clang pkg-config       # rocksdb bindings (bindgen) and bundled build
  qemu-utils                          # qemu-img, qemu-io, qemu-nbd
  fio libnbd-bin python3-libnbd nbdkit nbd-client   # libnbd-bin has nbdfuse
  jq procps iproute2 util-linux openssl
  zstd bzip2                          # unpacking the sample images in ../shared/samples
  genisoimage                         # ISO images for the import tests
  etcd-server protobuf-compiler libprotobuf-dev  # metadata store: etcd for its tests; etcd-client builds its protos
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
