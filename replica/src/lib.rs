//! The storage node's durable block store.
//!
//! Block data lives in one data file per volume, in 4 KiB slots written with io_uring
//! (O_DIRECT where the filesystem allows it). The index (volume, block) -> slot, version,
//! checksum, tag lives in rocksdb. Writes are redirect-on-write: a new version goes to a
//! free slot, then the index switches to it in one rocksdb batch, so a crash never
//! leaves a torn block. A slot freed by an overwrite or a trim is only reused after the
//! next `sync`, once the index that no longer points at it is durable.
//!
//! The store only ever sees ciphertext; keys live with the writer (the engine).
//!
//! Snapshots are redirect-on-write too: taking one copies nothing; versions a snapshot
//! still reads move to a `history` column family when the live volume replaces them.
//! A clone is a volume whose unwritten blocks read through to a snapshot of its origin;
//! reads say which volume each block was stored under ([`ViewBlock::source`]), since
//! the writer authenticates a block with its volume id. See `store.rs`.
//!
//! Modules: `block` (the block and its metadata), `store` (the [`Store`]; snapshots and
//! clones in `store/snapshots.rs`, view lookups in `store/view.rs`), `index` (rocksdb
//! key and value encoding), `slots` (free and freed slots of a data file),
//! `datafile` (a volume's data file, O_DIRECT with fallback), `uring` (the io_uring
//! worker thread), `error`.

mod block;
mod datafile;
mod error;
mod index;
mod slots;
mod store;
mod uring;

pub use block::{
    BLOCK_SIZE, Block, BlockMeta, BlockWrite, Extent, SnapId, SnapshotInfo, ViewBlock, VolumeId,
};
pub use error::StoreError;
pub use store::{MAX_BLOCKS_PER_IO, MAX_CLONE_DEPTH, MAX_SNAPSHOTS, Store, StoreOptions};
