//! Helpers shared by the store's integration tests: deterministic block contents and
//! a store in a temporary directory.

#![allow(dead_code)]

use std::path::Path;

use trireme_replica::{Block, BlockMeta, BlockWrite, Store, StoreOptions};

/// Deterministic contents of `block` at `version`: every (block, version) pair gives a
/// different pattern, so a block from the wrong place or time is recognised.
pub fn payload(block: u64, version: u64) -> Box<Block> {
    let mut data = Block::zeroed();
    let mut state = block
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(version.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        | 1;
    for chunk in data.0.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    data
}

/// Tag derived from block and version (the store does not interpret it).
pub fn tag(block: u64, version: u64) -> [u8; 16] {
    let mut tag = [0u8; 16];
    tag[..8].copy_from_slice(&block.to_le_bytes());
    tag[8..].copy_from_slice(&version.to_le_bytes());
    tag
}

/// A write of [`payload`]`(block, version)` with correct metadata.
pub fn write(block: u64, version: u64) -> BlockWrite {
    let data = payload(block, version);
    BlockWrite {
        block,
        meta: BlockMeta {
            version,
            crc: data.crc(),
            tag: tag(block, version),
        },
        data,
    }
}

/// Asserts that a read block is exactly [`payload`]`(block, version)` with its metadata.
pub fn assert_block(found: Option<&(BlockMeta, Box<Block>)>, block: u64, version: u64) {
    let Some((meta, data)) = found else {
        panic!("block {block}: expected version {version}, found nothing");
    };
    assert_eq!(meta.version, version, "block {block}: version");
    assert_eq!(meta.tag, tag(block, version), "block {block}: tag");
    assert_eq!(meta.crc, data.crc(), "block {block}: crc");
    assert!(
        data.0 == payload(block, version).0,
        "block {block}: data is not version {version}"
    );
}

/// Checks that `data` is [`payload`] of its own block and version.
pub fn consistent(block: u64, meta: &BlockMeta, data: &Block) -> bool {
    meta.tag == tag(block, meta.version) && data.0 == payload(block, meta.version).0
}

pub fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap_or_else(|e| panic!("open store: {e:?}"))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// Physical size of a file (512-byte units from stat), to see punched holes.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
