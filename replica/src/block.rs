//! The unit of storage: a 4 KiB block of ciphertext, the metadata the index keeps for
//! it, and the shapes in which callers hand blocks in and get allocation maps out.

/// Size of a block and of a slot in a data file, in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// [`BLOCK_SIZE`] as a file offset unit.
pub(crate) const BLOCK_BYTES: u64 = 4096;

/// Identifies a volume on this node; its data file is named after it in hex.
pub type VolumeId = u64;

/// Identifies a snapshot within its volume: the volume's live snapshot generation when
/// it was taken (increasing, never reused).
pub type SnapId = u64;

/// A block read through a view (a volume's live blocks or a snapshot, a clone reading
/// through to its origin): its data, its metadata, and the volume it was stored under.
/// For a clone, `source` is the origin volume for blocks the clone never wrote; the
/// writer decrypts those with the origin's volume id and key.
#[derive(Debug)]
pub struct ViewBlock {
    /// Volume whose writer wrote the block.
    pub source: VolumeId,
    /// Version, checksum and tag.
    pub meta: BlockMeta,
    /// The ciphertext.
    pub data: Box<Block>,
}

/// A snapshot and the space it alone holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot.
    pub id: SnapId,
    /// Blocks whose version no other snapshot and not the live volume reads: what
    /// deleting the snapshot gives back.
    pub exclusive_blocks: u64,
}

/// A 4 KiB buffer aligned for O_DIRECT.
///
/// Always handled boxed: the alignment makes it usable as a direct I/O buffer, and the
/// box gives it a stable address while the kernel reads or writes it.
#[repr(C, align(4096))]
pub struct Block(pub [u8; BLOCK_SIZE]);

impl Block {
    /// A heap-allocated block of zeros.
    pub fn zeroed() -> Box<Block> {
        // `Box::new(Block([0; BLOCK_SIZE]))` would build the 4 KiB value on the stack
        // first; the optimiser usually elides that, but this is cheap and certain.
        let layout = std::alloc::Layout::new::<Block>();
        // SAFETY: `Block` has non-zero size, and an all-zero byte pattern is a valid
        // `[u8; BLOCK_SIZE]`.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Block>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` was just allocated with the layout of `Block` by the global
        // allocator, is non-null, initialised (zeroed), and owned by nobody else.
        unsafe { Box::from_raw(ptr) }
    }

    /// `n` contiguous blocks of zeros in one allocation.
    pub(crate) fn zeroed_vec(n: usize) -> Vec<Block> {
        if n == 0 {
            return Vec::new();
        }
        let Ok(layout) = std::alloc::Layout::array::<Block>(n) else {
            panic!("{n} blocks overflow the address space");
        };
        // SAFETY: the layout has non-zero size, and an all-zero byte pattern is a valid
        // `Block`.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Block>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` was allocated by the global allocator with the layout of
        // `[Block; n]` (what a `Vec<Block>` of capacity `n` uses), and all `n` elements
        // are initialised.
        unsafe { Vec::from_raw_parts(ptr, n, n) }
    }

    /// A heap-allocated copy of this block.
    pub(crate) fn boxed_copy(&self) -> Box<Block> {
        let mut boxed = Box::<Block>::new_uninit();
        // SAFETY: copies all `BLOCK_SIZE` bytes of `self` into the fresh allocation,
        // which the two do not overlap, fully initialising it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.as_ptr(),
                boxed.as_mut_ptr().cast::<u8>(),
                BLOCK_SIZE,
            );
            boxed.assume_init()
        }
    }

    /// A heap-allocated block holding a copy of `data`.
    pub fn from_bytes(data: &[u8; BLOCK_SIZE]) -> Box<Block> {
        let mut boxed = Box::<Block>::new_uninit();
        // SAFETY: copies all `BLOCK_SIZE` bytes of `data` into the fresh allocation,
        // which the two do not overlap, fully initialising it (no zeroing first: this
        // is the write path's one copy of each full block).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                boxed.as_mut_ptr().cast::<u8>(),
                BLOCK_SIZE,
            );
            boxed.assume_init()
        }
    }

    /// CRC32 (IEEE) of the block's bytes, the checksum kept in [`BlockMeta::crc`].
    pub fn crc(&self) -> u32 {
        crc32fast::hash(&self.0)
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("crc", &self.crc()).finish()
    }
}

/// Per-block metadata kept in the index next to the slot number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMeta {
    /// Writer's sequence number for this block; a write is applied only if it is newer.
    pub version: u64,
    /// CRC32 of the 4096 stored (ciphertext) bytes.
    pub crc: u32,
    /// AES-GCM tag of the block, kept for the writer; the store does not interpret it.
    pub tag: [u8; 16],
}

/// One block to write: where it goes in the volume, its metadata, and its data.
#[derive(Debug)]
pub struct BlockWrite {
    /// Block index within the volume.
    pub block: u64,
    /// Version, checksum and tag; `meta.crc` must match `data`.
    pub meta: BlockMeta,
    /// The ciphertext.
    pub data: Box<Block>,
}

/// A run of blocks that are all allocated or all unallocated (counts in blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First block of the run.
    pub start: u64,
    /// Number of blocks in the run (never 0).
    pub count: u64,
    /// Whether the blocks hold data.
    pub allocated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_block_is_aligned_and_zero() {
        let block = Block::zeroed();
        let addr = std::ptr::from_ref::<Block>(&block).addr();
        assert_eq!(addr % BLOCK_SIZE, 0);
        assert!(block.0.iter().all(|&b| b == 0));
        assert_eq!(block.crc(), crc32fast::hash(&[0u8; BLOCK_SIZE]));
    }

    #[test]
    fn from_bytes_copies() {
        let mut data = [0u8; BLOCK_SIZE];
        data[17] = 9;
        let block = Block::from_bytes(&data);
        assert_eq!(block.0[17], 9);
        assert_eq!(block.crc(), crc32fast::hash(&data));
    }
}
