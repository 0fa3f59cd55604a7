//! What the NBD server needs from the storage behind an export.
//!
//! The server owns the protocol; everything behind these traits (volumes, encryption,
//! the block store) is the engine's business. Offsets and lengths passed here have been
//! validated against `size()` by the server before the call.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// `base:allocation` flag: the extent is a hole (no storage allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// Why an export operation failed, mapped onto the NBD error numbers.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Data could not be read or written (includes checksum and authentication failures).
    #[error("I/O error: {0}")]
    Io(String),
    /// The store is out of space.
    #[error("no space left")]
    NoSpace,
    /// The request is not valid for this export.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The operation cannot be done fast (WRITE_ZEROES with FAST_ZERO) or at all.
    #[error("not supported")]
    NotSupported,
    /// The export is read-only.
    #[error("export is read-only")]
    ReadOnly,
    /// The server is shutting down or the volume went away.
    #[error("shutting down")]
    Shutdown,
}

impl ExportError {
    /// The NBD error value (errno-like, from the protocol's fixed list).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Io(_) => 5,         // EIO
            ExportError::NoSpace => 28,      // ENOSPC
            ExportError::Invalid(_) => 22,   // EINVAL
            ExportError::NotSupported => 95, // ENOTSUP
            ExportError::ReadOnly => 1,      // EPERM
            ExportError::Shutdown => 108,    // ESHUTDOWN
        }
    }
}

/// One piece of a read result: data, or a run of zeros the server may send as a hole.
#[derive(Debug, Clone)]
pub enum ReadSegment {
    /// Bytes read from the volume.
    Data(Bytes),
    /// This many bytes that read as zeros (unallocated or trimmed).
    Zero(u64),
}

/// One extent of block status: `length` bytes sharing the `STATE_*` flags in `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub length: u64,
    /// `STATE_HOLE | STATE_ZERO` bits.
    pub flags: u32,
}

/// The storage behind one export, shared by all connections to it.
#[async_trait]
pub trait Export: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Whether a FLUSH on one connection covers writes completed on every connection
    /// to this export (allows `NBD_FLAG_CAN_MULTI_CONN`).
    fn flush_covers_all_connections(&self) -> bool;
    /// Read `len` bytes at `offset`; the segments' lengths add up to `len`.
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>, ExportError>;
    /// Write `data` at `offset`; with `fua` the data is durable before this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError>;
    /// Make every write completed before this call durable.
    async fn flush(&self) -> Result<(), ExportError>;
    /// Discard a range; it reads as zeros afterwards.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Zero a range. `may_unmap`: the space may be freed (no NBD_CMD_FLAG_NO_HOLE).
    /// `fast_only`: fail with `NotSupported` unless zeroing is cheap (NBD_CMD_FLAG_FAST_ZERO).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), ExportError>;
    /// Hint that a range will be read soon.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Allocation status from `offset`, covering at least the first byte and at most
    /// `len` bytes; extents are in order and contiguous.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
}

/// What a client sees of an export before opening it.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Export name.
    pub name: String,
    /// Human-readable description (NBD_INFO_DESCRIPTION, OPT_LIST).
    pub description: String,
}

/// An opened export.
#[derive(Debug, Clone)]
pub struct ExportHandle {
    /// Export name.
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// The storage.
    pub export: Arc<dyn Export>,
}

/// The set of exports a server offers. Lookups are in-memory and must not block.
pub trait Catalog: Send + Sync + std::fmt::Debug {
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportSummary>;
    /// Find an export by name (the empty name means the default export, if any).
    fn open(&self, name: &str) -> Option<ExportHandle>;
}
