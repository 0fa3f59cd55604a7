//! Trireme's volume engine: volumes of encrypted 4 KiB blocks over a block store.
//!
//! - `crypto`: AES-256-GCM per block and the key hierarchy (master -> tenant -> volume).
//! - `master_key`: the cluster master key file.
//! - `crashsafe`: crash-safe file writes.
//! - `catalog`: tenant and volume records and the metadata key-value seam.
//! - `sequence`: per-volume block versions (nonces), persisted ahead of use.
//! - `range_lock`: block-range locks for read-modify-write.
//! - `volume`: byte-addressed I/O on one volume.
//! - `node`: the node's engine: catalog operations and open volumes.
//! - `snapshots`: snapshots, rollback and clones of volumes.

pub mod catalog;
pub mod crashsafe;
pub mod crypto;
pub mod master_key;
pub mod node;
pub mod range_lock;
pub mod sequence;
pub mod snapshots;
pub mod volume;

pub use catalog::StorageClass;
pub use node::{
    DEFAULT_TENANT, Engine, EngineError, TenantInfo, VolumeInfo, VolumeSpec, parse_size,
};
pub use snapshots::{RollbackInfo, SnapshotInfo, parse_snapshot_ref};
pub use volume::{BLOCK, ByteExtent, Segment, Volume, VolumeError, WriterGuard};
