//! Volumes as NBD exports: the engine behind the NBD server's `Catalog` and `Export`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use engine::{Engine, EngineError, Segment, Volume, VolumeError, WriterGuard};
use nbd_server::{
    Catalog, Export, ExportError, ExportHandle, ExportSummary, Extent, ReadSegment, STATE_HOLE,
    STATE_ZERO,
};

/// Every volume of the node, exported under its name, and every snapshot, exported
/// read-only as `VOLUME@SNAPSHOT`.
#[derive(Debug)]
pub struct VolumeCatalog {
    engine: Arc<Engine>,
}

impl VolumeCatalog {
    /// Export the volumes of `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        VolumeCatalog { engine }
    }
}

impl Catalog for VolumeCatalog {
    fn list(&self) -> Vec<ExportSummary> {
        let mut exports: Vec<ExportSummary> = match self.engine.list_volumes() {
            Ok(vols) => vols
                .into_iter()
                .map(|v| ExportSummary {
                    description: format!("trireme volume, tenant {}, class {}", v.tenant, v.class),
                    name: v.name,
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "listing volumes for NBD_OPT_LIST");
                Vec::new()
            }
        };
        match self.engine.list_snapshots(None) {
            Ok(snaps) => exports.extend(snaps.into_iter().map(|s| ExportSummary {
                description: format!("trireme snapshot of volume {} (read-only)", s.volume),
                name: format!("{}@{}", s.volume, s.name),
            })),
            Err(e) => tracing::error!(error = %e, "listing snapshots for NBD_OPT_LIST"),
        }
        exports
    }

    fn open(&self, name: &str) -> Option<ExportHandle> {
        match self.engine.volume(name) {
            Ok(volume) => {
                // A writable export counts as attached for writing while it is open
                // (a rollback is refused meanwhile unless forced).
                let writer = (!volume.read_only()).then(|| volume.attach_writer());
                let description = match volume.snapshot() {
                    Some(_) => format!("trireme snapshot {name} (read-only)"),
                    None => format!("trireme volume {name}"),
                };
                Some(ExportHandle {
                    name: name.to_string(),
                    description,
                    export: Arc::new(VolumeExport {
                        volume,
                        _writer: writer,
                    }),
                })
            }
            Err(EngineError::NoSuchVolume(_) | EngineError::NoSuchSnapshot(_)) => None,
            Err(e) => {
                tracing::error!(volume = name, error = %e, "opening volume for NBD");
                None
            }
        }
    }
}

/// One volume behind an NBD export.
#[derive(Debug)]
pub struct VolumeExport {
    volume: Arc<Volume>,
    /// Held while a writable export is open.
    _writer: Option<WriterGuard>,
}

fn nbd_error(e: VolumeError) -> ExportError {
    match e {
        VolumeError::OutOfRange { .. } => ExportError::Invalid(e.to_string()),
        VolumeError::Deleted(_) => ExportError::Shutdown,
        VolumeError::ReadOnly(_) => ExportError::ReadOnly,
        VolumeError::Store {
            source: replica::StoreError::NoSpace,
            ..
        } => ExportError::NoSpace,
        // Checksum and tag failures were logged where they were found.
        VolumeError::Corrupt { .. } | VolumeError::Authentication { .. } => {
            ExportError::Io(e.to_string())
        }
        other => {
            tracing::error!(error = %other, "volume I/O failed");
            ExportError::Io(other.to_string())
        }
    }
}

#[async_trait]
impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        self.volume.read_only()
    }

    fn flush_covers_all_connections(&self) -> bool {
        // A flush syncs the whole store, so it covers writes completed on any connection.
        true
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>, ExportError> {
        let segments = self.volume.read(offset, len).await.map_err(nbd_error)?;
        Ok(segments
            .into_iter()
            .map(|s| match s {
                Segment::Data(b) => ReadSegment::Data(b),
                Segment::Zero(n) => ReadSegment::Zero(n),
            })
            .collect())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.volume
            .write(offset, &data, fua)
            .await
            .map_err(nbd_error)
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.volume.flush().await.map_err(nbd_error)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.volume
            .write_zeroes(offset, len, true, fua)
            .await
            .map_err(nbd_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        // Unmapping is a metadata operation (fast); writing zero blocks is as slow as
        // any write, so FAST_ZERO with NO_HOLE is refused as the spec asks.
        if fast_only && !may_unmap {
            return Err(ExportError::NotSupported);
        }
        self.volume
            .write_zeroes(offset, len, may_unmap, fua)
            .await
            .map_err(nbd_error)
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        // Data files use O_DIRECT and there is no read cache to warm; CACHE is advisory.
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let extents = self.volume.extents(offset, len).map_err(nbd_error)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: if e.allocated {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                },
            })
            .collect())
    }
}
