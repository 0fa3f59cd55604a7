//! A volume opened for I/O: byte-addressed reads and writes over encrypted 4 KiB blocks.
//!
//! Any offset and length works. A write covering part of a block reads that block,
//! patches it and writes a new version (read-modify-write) while holding the block's
//! range lock, so overlapping requests never tear a block. Unwritten blocks read as
//! zeros and take no space.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use replica::{BLOCK_SIZE, Block, BlockMeta, BlockWrite, SnapId, Store, StoreError};

use crate::catalog::{MetaError, StorageClass};
use crate::crypto::{BlockAddress, BlockCipher};
use crate::range_lock::RangeLock;
use crate::sequence::VersionCounter;

/// Block size as u64, for offset arithmetic.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
/// Blocks per store call for large zeroing writes.
const ZERO_BATCH_BLOCKS: u64 = 1024;

/// Errors of volume I/O.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request does not fit the volume.
    #[error(
        "request at offset {offset} length {len} is past the end of volume {volume} ({size} bytes)"
    )]
    OutOfRange {
        /// Volume name.
        volume: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A block failed its checksum: the stored bytes changed (media corruption).
    #[error("volume {volume} block {block}: checksum mismatch (media corruption)")]
    Corrupt {
        /// Volume name.
        volume: String,
        /// Block index.
        block: u64,
    },
    /// A block's checksum held but its tag did not: wrong key, or data moved/replayed.
    #[error("volume {volume} block {block}: authentication failed (wrong key or tampered data)")]
    Authentication {
        /// Volume name.
        volume: String,
        /// Block index.
        block: u64,
    },
    /// The block store failed.
    #[error("volume {volume}: {source}")]
    Store {
        /// Volume name.
        volume: String,
        /// The cause.
        source: StoreError,
    },
    /// The version counter could not be persisted.
    #[error("volume {volume}: {source}")]
    Meta {
        /// Volume name.
        volume: String,
        /// The cause.
        source: MetaError,
    },
    /// The volume was deleted while in use.
    #[error("volume {0} was deleted")]
    Deleted(String),
    /// The volume is read-only.
    #[error("volume {0} is read-only")]
    ReadOnly(String),
    /// A block was stored under a volume whose key this one does not hold (a clone
    /// whose origin chain does not match the store's).
    #[error(
        "volume {volume} block {block}: stored under volume {source_id:016x}, whose key it does not hold"
    )]
    UnknownSource {
        /// Volume name.
        volume: String,
        /// Block index.
        block: u64,
        /// The volume the store says holds the block.
        source_id: u64,
    },
}

/// A piece of a read: data, or a run of zeros (unallocated).
#[derive(Debug, Clone)]
pub enum Segment {
    /// Plaintext bytes.
    Data(Bytes),
    /// This many zero bytes.
    Zero(u64),
}

/// A run of the allocation map, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteExtent {
    /// Length in bytes.
    pub length: u64,
    /// Whether storage is allocated (false: reads as zeros).
    pub allocated: bool,
}

/// What identifies a volume's blocks.
#[derive(Debug, Clone)]
pub struct VolumeIdentity {
    /// Name.
    pub name: String,
    /// Store volume id.
    pub id: u64,
    /// Tenant id.
    pub tenant_id: u64,
    /// Storage class.
    pub class: StorageClass,
    /// Chunk size in bytes.
    pub chunk_size: u64,
}

/// An open volume: the live volume, or a read-only view of one of its snapshots.
#[derive(Debug)]
pub struct Volume {
    ident: VolumeIdentity,
    size: AtomicU64,
    store: Arc<Store>,
    /// The ciphers of the volume (first) and of the origins a clone reads through to,
    /// by store volume id.
    ciphers: Vec<(u64, BlockCipher)>,
    /// Block versions for new writes; `None` for a snapshot view.
    versions: Option<VersionCounter>,
    /// The snapshot this view reads (`None`: the live volume).
    view: Option<SnapId>,
    locks: RangeLock,
    deleted: AtomicBool,
    read_only: AtomicBool,
    /// NBD connections attached for writing.
    writers: AtomicUsize,
}

/// Counts one writable attachment of a volume until dropped.
#[derive(Debug)]
pub struct WriterGuard {
    volume: Arc<Volume>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.volume.writers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Volume {
    /// Open a volume over `store` with its data key's cipher.
    pub fn new(
        ident: VolumeIdentity,
        size: u64,
        store: Arc<Store>,
        cipher: BlockCipher,
        versions: VersionCounter,
    ) -> Self {
        let id = ident.id;
        Volume::with_sources(ident, size, store, vec![(id, cipher)], Some(versions), None)
    }

    /// A volume whose blocks may be stored under other volumes (a clone's origins:
    /// `ciphers` holds each source's cipher, its own first), or a snapshot view
    /// (`view`, with no version counter: it is read-only).
    pub fn with_sources(
        ident: VolumeIdentity,
        size: u64,
        store: Arc<Store>,
        ciphers: Vec<(u64, BlockCipher)>,
        versions: Option<VersionCounter>,
        view: Option<SnapId>,
    ) -> Self {
        let read_only = versions.is_none() || view.is_some();
        Volume {
            ident,
            size: AtomicU64::new(size),
            store,
            ciphers,
            versions,
            view,
            locks: RangeLock::default(),
            deleted: AtomicBool::new(false),
            read_only: AtomicBool::new(read_only),
            writers: AtomicUsize::new(0),
        }
    }

    /// The snapshot this view reads, `None` for the live volume.
    pub fn snapshot(&self) -> Option<SnapId> {
        self.view
    }

    /// Counts a writable attachment (an NBD connection) until the guard is dropped.
    pub fn attach_writer(self: &Arc<Self>) -> WriterGuard {
        self.writers.fetch_add(1, Ordering::AcqRel);
        WriterGuard {
            volume: Arc::clone(self),
        }
    }

    /// Writable attachments now.
    pub fn writers(&self) -> usize {
        self.writers.load(Ordering::Acquire)
    }

    /// Holds every block of the volume: writes, trims and zeroing wait until dropped.
    pub(crate) async fn lock_all(&self) -> crate::range_lock::RangeGuard<'_> {
        self.locks.lock(0..u64::MAX).await
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.ident.name
    }

    /// Identity (ids, class, chunk size).
    pub fn identity(&self) -> &VolumeIdentity {
        &self.ident
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn set_read_only(&self, read_only: bool) {
        // A snapshot view stays read-only whatever its volume's setting.
        let frozen = self.versions.is_none() || self.view.is_some();
        self.read_only.store(read_only || frozen, Ordering::Release);
    }

    /// Refuse changes to a read-only volume.
    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.read_only() {
            return Err(VolumeError::ReadOnly(self.ident.name.clone()));
        }
        Ok(())
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    fn check(&self, offset: u64, len: u64) -> Result<Range<u64>, VolumeError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(VolumeError::Deleted(self.ident.name.clone()));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset / BLOCK..end.div_ceil(BLOCK)),
            _ => Err(VolumeError::OutOfRange {
                volume: self.ident.name.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    fn addr(&self, block: u64, version: u64) -> BlockAddress {
        BlockAddress {
            tenant: self.ident.tenant_id,
            volume: self.ident.id,
            block,
            version,
        }
    }

    fn store_err(&self, source: StoreError) -> VolumeError {
        match source {
            StoreError::Corrupt { block, .. } => VolumeError::Corrupt {
                volume: self.ident.name.clone(),
                block,
            },
            // The snapshot a view reads was deleted.
            StoreError::NoSuchSnapshot { .. } | StoreError::NoSuchVolume(_) => {
                VolumeError::Deleted(self.ident.name.clone())
            }
            source => VolumeError::Store {
                volume: self.ident.name.clone(),
                source,
            },
        }
    }

    /// Decrypt a block stored under volume `source` in place, verifying its tag.
    fn open_block(
        &self,
        source: u64,
        block: u64,
        meta: &BlockMeta,
        data: &mut Block,
    ) -> Result<(), VolumeError> {
        let Some((_, cipher)) = self.ciphers.iter().find(|(id, _)| *id == source) else {
            tracing::error!(volume = %self.ident.name, block, source = format_args!("{source:016x}"),
                "block stored under a volume outside this volume's origin chain; returning EIO");
            return Err(VolumeError::UnknownSource {
                volume: self.ident.name.clone(),
                block,
                source_id: source,
            });
        };
        let addr = BlockAddress {
            volume: source,
            ..self.addr(block, meta.version)
        };
        cipher.open(&addr, &mut data.0, &meta.tag).map_err(|_| {
            tracing::error!(volume = %self.ident.name, block, version = meta.version,
                "block failed authentication: wrong key or altered data; returning EIO");
            VolumeError::Authentication {
                volume: self.ident.name.clone(),
                block,
            }
        })
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<Segment>, VolumeError> {
        let blocks = self.check(offset, len)?;
        let end = offset + len;
        let stored = self
            .store
            .read_blocks_at(self.ident.id, self.view, blocks.clone())
            .await
            .map_err(|e| self.store_err(e))?;
        let mut out: Vec<Segment> = Vec::new();
        let mut data = BytesMut::new();
        let mut zeros = 0u64;
        for (block, entry) in blocks.zip(stored) {
            let start = block * BLOCK;
            let lo = offset.max(start);
            let hi = end.min(start + BLOCK);
            let (a, b) = (usize_of(lo - start), usize_of(hi - start));
            match entry {
                None => {
                    if !data.is_empty() {
                        out.push(Segment::Data(data.split().freeze()));
                    }
                    zeros += hi - lo;
                }
                Some(mut found) => {
                    self.open_block(found.source, block, &found.meta, &mut found.data)?;
                    let buf = found.data;
                    if zeros > 0 {
                        out.push(Segment::Zero(zeros));
                        zeros = 0;
                    }
                    data.extend_from_slice(&buf.0[a..b]);
                }
            }
        }
        if !data.is_empty() {
            out.push(Segment::Data(data.freeze()));
        }
        if zeros > 0 {
            out.push(Segment::Zero(zeros));
        }
        Ok(out)
    }

    /// The current plaintext of one block, or None when unallocated.
    async fn read_plain(&self, block: u64) -> Result<Option<Box<Block>>, VolumeError> {
        let found = self
            .store
            .read_blocks_at(self.ident.id, self.view, block..block + 1)
            .await
            .map_err(|e| self.store_err(e))?
            .pop()
            .flatten();
        match found {
            None => Ok(None),
            Some(mut found) => {
                self.open_block(found.source, block, &found.meta, &mut found.data)?;
                Ok(Some(found.data))
            }
        }
    }

    /// Encrypt plaintext blocks (in place) into store writes with fresh versions.
    fn seal(&self, blocks: Vec<(u64, Box<Block>)>) -> Result<Vec<BlockWrite>, VolumeError> {
        let n = u64::try_from(blocks.len()).unwrap_or(u64::MAX);
        let (Some(versions), Some((_, cipher))) = (&self.versions, self.ciphers.first()) else {
            return Err(VolumeError::ReadOnly(self.ident.name.clone()));
        };
        let first = versions.take(n).map_err(|source| VolumeError::Meta {
            volume: self.ident.name.clone(),
            source,
        })?;
        Ok(blocks
            .into_iter()
            .zip(first..)
            .map(|((block, mut data), version)| {
                let tag = cipher.seal(&self.addr(block, version), &mut data.0);
                let crc = crc32fast::hash(&data.0);
                BlockWrite {
                    block,
                    meta: BlockMeta { version, crc, tag },
                    data,
                }
            })
            .collect())
    }

    /// Build the new plaintext of `block` from its old content (for partial cover) and
    /// `fill`, which writes the bytes `lo..hi` of the block.
    async fn patched(
        &self,
        block: u64,
        lo: usize,
        hi: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Box<Block>, VolumeError> {
        let mut buf = if lo == 0 && hi == BLOCK_SIZE {
            Block::zeroed()
        } else {
            self.read_plain(block).await?.unwrap_or_else(Block::zeroed)
        };
        fill(&mut buf.0[lo..hi]);
        Ok(buf)
    }

    /// Write `data` at `offset`; durable before returning when `fua`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let blocks = self.check(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let _guard = self.locks.lock(blocks.clone()).await;
        let end = offset + len;
        let mut plain = Vec::with_capacity(usize_of(blocks.end - blocks.start));
        for block in blocks {
            let start = block * BLOCK;
            let lo = offset.max(start);
            let hi = end.min(start + BLOCK);
            let src = &data[usize_of(lo - offset)..usize_of(hi - offset)];
            let buf = match <&[u8; BLOCK_SIZE]>::try_from(src) {
                // A whole block: one copy, nothing to read.
                Ok(whole) => Block::from_bytes(whole),
                Err(_) => {
                    self.patched(block, usize_of(lo - start), usize_of(hi - start), |dst| {
                        dst.copy_from_slice(src)
                    })
                    .await?
                }
            };
            plain.push((block, buf));
        }
        let writes = self.seal(plain)?;
        self.store
            .write_blocks(self.ident.id, writes)
            .await
            .map_err(|e| self.store_err(e))?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zero a range. With `may_unmap` whole blocks are freed (they read as zeros);
    /// otherwise zero blocks are written and stay allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let blocks = self.check(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let _guard = self.locks.lock(blocks.clone()).await;
        let end = offset + len;
        // Whole blocks inside the range; the partial edges are patched.
        let whole = offset.div_ceil(BLOCK)..end / BLOCK;
        let mut edges = Vec::new();
        for block in [blocks.start, blocks.end - 1] {
            if !whole.contains(&block) && !edges.contains(&block) {
                edges.push(block);
            }
        }
        let mut plain = Vec::new();
        for block in edges {
            let start = block * BLOCK;
            let (lo, hi) = (offset.max(start), end.min(start + BLOCK));
            if !may_unmap
                || self
                    .store
                    .block_meta(self.ident.id, block)
                    .map_err(|e| self.store_err(e))?
                    .is_some()
            {
                let buf = self
                    .patched(block, usize_of(lo - start), usize_of(hi - start), |d| {
                        d.fill(0)
                    })
                    .await?;
                plain.push((block, buf));
            }
        }
        if !plain.is_empty() {
            let writes = self.seal(plain)?;
            self.store
                .write_blocks(self.ident.id, writes)
                .await
                .map_err(|e| self.store_err(e))?;
        }
        if whole.start < whole.end {
            if may_unmap {
                self.store
                    .discard_blocks(self.ident.id, whole)
                    .await
                    .map_err(|e| self.store_err(e))?;
            } else {
                let mut b = whole.start;
                while b < whole.end {
                    let batch_end = whole.end.min(b + ZERO_BATCH_BLOCKS);
                    let writes =
                        self.seal((b..batch_end).map(|i| (i, Block::zeroed())).collect())?;
                    self.store
                        .write_blocks(self.ident.id, writes)
                        .await
                        .map_err(|e| self.store_err(e))?;
                    b = batch_end;
                }
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Make every write completed before this call durable.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.store.sync().await.map_err(|e| self.store_err(e))
    }

    /// Allocation map of `len` bytes at `offset`, merged into runs.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<ByteExtent>, VolumeError> {
        let blocks = self.check(offset, len)?;
        let end = offset + len;
        let runs = self
            .store
            .extents_at(self.ident.id, self.view, blocks)
            .map_err(|e| self.store_err(e))?;
        let mut out: Vec<ByteExtent> = Vec::with_capacity(runs.len());
        for run in runs {
            let lo = offset.max(run.start * BLOCK);
            let hi = end.min((run.start + run.count) * BLOCK);
            if hi <= lo {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.allocated == run.allocated => last.length += hi - lo,
                _ => out.push(ByteExtent {
                    length: hi - lo,
                    allocated: run.allocated,
                }),
            }
        }
        Ok(out)
    }

    /// Bytes of storage in use.
    pub fn allocated_bytes(&self) -> Result<u64, VolumeError> {
        let blocks = self
            .store
            .allocated_blocks(self.ident.id)
            .map_err(|e| self.store_err(e))?;
        Ok(blocks.saturating_mul(BLOCK))
    }
}

/// A block-relative offset or a block count as usize (always within a 32 MiB request
/// or a 4 KiB block, far below usize::MAX on the 64-bit targets we build for).
fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}
