//! Trireme's benchmarks. `benches/micro.rs` holds criterion benches of the per-block
//! hot path (encryption, checksums, index updates); `fio-compare.py` runs the same fio
//! jobs against a Trireme node and `qemu-nbd` side by side.
