//! Errors of the block store.

use crate::block::{SnapId, VolumeId};

/// Everything a [`Store`](crate::Store) operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a data file (or the store directory) failed.
    #[error("I/O error {op}")]
    Io {
        /// What the store was doing, as a verb phrase ("writing block data").
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The rocksdb index failed.
    #[error("index (rocksdb) operation failed")]
    Index(#[from] rocksdb::Error),
    /// A block's data does not match its checksum (media corruption), or its index
    /// entry cannot be decoded.
    #[error("block {block} of volume {volume:016x} is corrupt")]
    Corrupt {
        /// Volume holding the block.
        volume: VolumeId,
        /// Block index within the volume.
        block: u64,
    },
    /// The volume does not exist on this store.
    #[error("no such volume {0:016x}")]
    NoSuchVolume(VolumeId),
    /// `create_volume` for a volume that already exists.
    #[error("volume {0:016x} already exists")]
    VolumeExists(VolumeId),
    /// The volume has no (completed) snapshot of that id.
    #[error("volume {volume:016x} has no snapshot {snapshot}")]
    NoSuchSnapshot {
        /// The volume.
        volume: VolumeId,
        /// The snapshot asked for.
        snapshot: SnapId,
    },
    /// `delete_snapshot` of a snapshot that clones read through: delete the clones
    /// first.
    #[error("snapshot {snapshot} of volume {volume:016x} has clones {clones:016x?}")]
    SnapshotHasClones {
        /// The volume.
        volume: VolumeId,
        /// The snapshot.
        snapshot: SnapId,
        /// The volumes cloned from it.
        clones: Vec<VolumeId>,
    },
    /// `delete_volume` of a volume that clones read through: delete the clones first.
    #[error("volume {volume:016x} has clones {clones:016x?}")]
    VolumeHasClones {
        /// The volume.
        volume: VolumeId,
        /// The volumes cloned from its snapshots.
        clones: Vec<VolumeId>,
    },
    /// The filesystem (or the slot space of a data file) is full.
    #[error("no space left for block data")]
    NoSpace,
    /// A request the store refuses (bad checksum, too many blocks) or a store that has
    /// failed itself after an unrecoverable error.
    #[error("{0}")]
    Failed(String),
}

impl StoreError {
    /// Wraps an I/O error, turning ENOSPC into [`StoreError::NoSpace`].
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> StoreError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace
        } else {
            StoreError::Io { op, source }
        }
    }
}
