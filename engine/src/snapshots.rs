//! Snapshots and clones of volumes, on top of the block store's (redirect-on-write,
//! no data copied; see `replica/src/store.rs`).
//!
//! The catalog names them: a snapshot record `snapshot/VOLUME@NAME` maps a name to the
//! store's snapshot id; a clone is a volume record with an `origin`. The store's
//! operation always comes first and the catalog record after it, so a crash in between
//! leaves at worst a store snapshot or volume that nothing names, which
//! [`Engine::reconcile`] removes at the next start (the operation was never reported
//! done). Deleting goes the other way: the record first, then the store.
//!
//! Keys: a clone has its own volume key for what it writes (block versions are nonces
//! and its counter is its own, so sharing the origin's key could repeat a nonce); it
//! reads the blocks it shares with its origin with the origin's key, which the store
//! tells apart by the volume each block is stored under. Clones therefore stay in their
//! origin's tenant: a clone in another tenant would need the origin's key there, and
//! is refused.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::catalog::{
    CloneOrigin, SNAPSHOT_PREFIX, SnapshotRecord, VOLUME_PREFIX, VolumeRecord, snapshot_key,
    split_snapshot_ref, validate_name,
};
use crate::node::{Engine, EngineError, VolumeInfo, now};
use crate::volume::BLOCK;

/// A snapshot as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// The volume's size when it was taken.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Bytes only this snapshot holds: what deleting it gives back.
    pub exclusive_bytes: u64,
    /// Volumes cloned from it.
    pub clones: Vec<String>,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackInfo {
    /// The volume after the rollback.
    pub volume: VolumeInfo,
    /// The snapshot rolled back to.
    pub snapshot: String,
    /// NBD connections that were attached for writing (only with `force`).
    pub attached_writers: usize,
}

/// Splits and checks `VOLUME@SNAPSHOT`.
pub fn parse_snapshot_ref(s: &str) -> Result<(&str, &str), EngineError> {
    let Some((volume, snapshot)) = split_snapshot_ref(s) else {
        return Err(EngineError::Invalid(format!(
            "{s:?} names no snapshot: expected VOLUME@SNAPSHOT"
        )));
    };
    validate_name("volume", volume).map_err(EngineError::Invalid)?;
    validate_name("snapshot", snapshot).map_err(EngineError::Invalid)?;
    Ok((volume, snapshot))
}

impl Engine {
    fn snapshot_record(&self, volume: &str, name: &str) -> Result<SnapshotRecord, EngineError> {
        self.get_record(&snapshot_key(volume, name))?
            .ok_or_else(|| EngineError::NoSuchSnapshot(format!("{volume}@{name}")))
    }

    /// Takes a crash-consistent snapshot `VOLUME@NAME`: it holds exactly the writes
    /// acknowledged before the call (every completed write is in the store's index, and
    /// the store syncs before it records the snapshot). No data is copied.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotInfo, EngineError> {
        validate_name("snapshot", name).map_err(EngineError::Invalid)?;
        let _ops = self.snapshot_admin.lock().await;
        let key = snapshot_key(volume, name);
        let r = {
            let _g = self.admin.lock();
            let r = self.volume_record(volume)?;
            if self.meta_get(&key)?.is_some() {
                return Err(EngineError::SnapshotExists(format!("{volume}@{name}")));
            }
            r
        };
        let id = self.store().create_snapshot(r.id).await?;
        let recorded = {
            let _g = self.admin.lock();
            // Sizes only grow outside a rollback (which holds `snapshot_admin`): the size
            // now is at least the size the snapshot was taken at, and never hides data.
            match self.volume_record(volume) {
                Ok(now_r) if now_r.id == r.id => {
                    let record = SnapshotRecord {
                        volume: volume.to_string(),
                        volume_id: r.id,
                        name: name.to_string(),
                        id,
                        size: now_r.size,
                        created: now(),
                    };
                    self.put_record(&key, &record).map(|()| record)
                }
                Ok(_) => Err(EngineError::NoSuchVolume(volume.to_string())),
                Err(e) => Err(e),
            }
        };
        let record = match recorded {
            Ok(record) => record,
            Err(e) => {
                // The volume went away meanwhile, or the record could not be written:
                // the store snapshot must not outlive the failure.
                if let Err(undo) = self.store().delete_snapshot(r.id, id).await {
                    tracing::warn!(volume, snapshot = name, error = %undo,
                        "could not drop the store snapshot of a failed creation; the next start will");
                }
                return Err(e);
            }
        };
        tracing::info!(volume, snapshot = name, id, "snapshot created");
        Ok(SnapshotInfo {
            volume: record.volume,
            name: record.name,
            size: record.size,
            created: record.created,
            exclusive_bytes: 0,
            clones: Vec::new(),
        })
    }

    /// Snapshots of one volume, or of every volume, oldest first per volume, each with
    /// the space it alone holds.
    pub fn list_snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>, EngineError> {
        let records: Vec<SnapshotRecord> = match volume {
            Some(v) => {
                self.volume_record(v)?;
                self.scan_records(&snapshot_key(v, ""))?
            }
            None => self.scan_records(SNAPSHOT_PREFIX)?,
        };
        let volumes: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        let mut by_volume: BTreeMap<u64, Vec<SnapshotRecord>> = BTreeMap::new();
        for r in records {
            by_volume.entry(r.volume_id).or_default().push(r);
        }
        let mut out = Vec::new();
        for (vol, mut snaps) in by_volume {
            let exclusive: BTreeMap<u64, u64> = match self.store().snapshots(vol) {
                Ok(list) => list
                    .into_iter()
                    .map(|s| (s.id, s.exclusive_blocks))
                    .collect(),
                Err(replica::StoreError::NoSuchVolume(_)) => BTreeMap::new(),
                Err(e) => return Err(e.into()),
            };
            snaps.sort_by_key(|s| s.id);
            for s in snaps {
                let clones = volumes
                    .iter()
                    .filter(|v| {
                        v.origin
                            .as_ref()
                            .is_some_and(|o| o.volume_id == vol && o.snapshot_id == s.id)
                    })
                    .map(|v| v.name.clone())
                    .collect();
                out.push(SnapshotInfo {
                    exclusive_bytes: exclusive
                        .get(&s.id)
                        .copied()
                        .unwrap_or(0)
                        .saturating_mul(BLOCK),
                    volume: s.volume,
                    name: s.name,
                    size: s.size,
                    created: s.created,
                    clones,
                });
            }
        }
        Ok(out)
    }

    /// Deletes snapshot `VOLUME@NAME` and gives back the space only it held. Refused
    /// while clones read through to it. Returns the bytes given back.
    pub async fn delete_snapshot(&self, volume: &str, name: &str) -> Result<u64, EngineError> {
        let _ops = self.snapshot_admin.lock().await;
        let (record, freed) = {
            let _g = self.admin.lock();
            let r = self.volume_record(volume)?;
            let record = self.snapshot_record(volume, name)?;
            let clones = self.clones_of(r.id, Some(record.id))?;
            if !clones.is_empty() {
                return Err(EngineError::Busy(format!(
                    "snapshot {volume}@{name} has clones ({}); delete them first",
                    clones.join(", ")
                )));
            }
            let freed = self
                .store()
                .snapshots(r.id)?
                .iter()
                .find(|s| s.id == record.id)
                .map_or(0, |s| s.exclusive_blocks.saturating_mul(BLOCK));
            // The record first: from here on nobody can open the snapshot, and a crash
            // before the store deletion leaves an unnamed store snapshot that the next
            // start removes.
            self.meta_delete(&snapshot_key(volume, name))?;
            if let Some(view) = self.open.write().remove(&format!("{volume}@{name}")) {
                view.mark_deleted();
            }
            (record, freed)
        };
        self.store()
            .delete_snapshot(record.volume_id, record.id)
            .await?;
        tracing::info!(volume, snapshot = name, freed, "snapshot deleted");
        Ok(freed)
    }

    /// Makes volume `VOLUME` read as its snapshot `NAME` again (and takes its size
    /// back). Every snapshot, older and newer, stays. Refused while an NBD connection
    /// has the volume attached for writing, unless `force`: then writes wait for the
    /// rollback and the attached guest's cached view no longer matches the disk.
    pub async fn rollback_snapshot(
        &self,
        volume: &str,
        name: &str,
        force: bool,
    ) -> Result<RollbackInfo, EngineError> {
        let _ops = self.snapshot_admin.lock().await;
        let record = {
            let _g = self.admin.lock();
            self.volume_record(volume)?;
            self.snapshot_record(volume, name)?
        };
        let live = self.volume(volume)?;
        let refuse = |writers: usize| {
            EngineError::Busy(format!(
                "volume {volume} is attached for writing by {writers} NBD connection(s); \
                 detach it first, or force the rollback (the attached guest's cached view \
                 will no longer match the disk)"
            ))
        };
        let writers = live.writers();
        if writers > 0 && !force {
            return Err(refuse(writers));
        }
        // Every write, trim and zeroing waits from here until the rollback is done.
        let hold = live.lock_all().await;
        let writers = live.writers();
        if writers > 0 && !force {
            return Err(refuse(writers));
        }
        self.store().rollback(record.volume_id, record.id).await?;
        let info = {
            let _g = self.admin.lock();
            let mut r = self.volume_record(volume)?;
            r.size = record.size;
            self.put_record(&format!("{VOLUME_PREFIX}{volume}"), &r)?;
            live.set_size(record.size);
            self.info(&r)?
        };
        drop(hold);
        tracing::info!(
            volume,
            snapshot = name,
            force,
            writers,
            "volume rolled back"
        );
        Ok(RollbackInfo {
            volume: info,
            snapshot: format!("{volume}@{name}"),
            attached_writers: writers,
        })
    }

    /// Creates volume `new` as a clone of snapshot `VOLUME@SNAPSHOT`: instant, sharing
    /// every block it does not write with the snapshot. It stays in the origin's tenant
    /// (`tenant`, when given, must be that one).
    pub async fn clone_volume(
        &self,
        source: &str,
        new: &str,
        tenant: Option<&str>,
    ) -> Result<VolumeInfo, EngineError> {
        let (volume, snapshot) = parse_snapshot_ref(source)?;
        validate_name("volume", new).map_err(EngineError::Invalid)?;
        let _ops = self.snapshot_admin.lock().await;
        let (record, origin_id, snap_id) = {
            let _g = self.admin.lock();
            if self.meta_get(&format!("{VOLUME_PREFIX}{new}"))?.is_some() {
                return Err(EngineError::VolumeExists(new.to_string()));
            }
            let r = self.volume_record(volume)?;
            let snap = self.snapshot_record(volume, snapshot)?;
            if let Some(t) = tenant
                && t != r.tenant
            {
                return Err(EngineError::Invalid(format!(
                    "volume {volume} belongs to tenant {}; a clone stays in its origin's \
                     tenant (it reads the shared blocks with the origin's key), so a clone \
                     into tenant {t} is refused",
                    r.tenant
                )));
            }
            let tenant = self
                .tenant(&r.tenant)?
                .ok_or_else(|| EngineError::NoSuchTenant(r.tenant.clone()))?;
            let (id, wrapped_key) = self.new_volume_key(&tenant, new)?;
            let record = VolumeRecord {
                name: new.to_string(),
                id,
                tenant: r.tenant.clone(),
                tenant_id: r.tenant_id,
                size: snap.size,
                class: r.class,
                chunk_size: r.chunk_size,
                wrapped_key,
                created: now(),
                read_only: false,
                origin: Some(CloneOrigin {
                    volume: volume.to_string(),
                    volume_id: r.id,
                    snapshot: snapshot.to_string(),
                    snapshot_id: snap.id,
                }),
            };
            (record, r.id, snap.id)
        };
        self.store()
            .create_clone(record.id, origin_id, snap_id)
            .await?;
        let stored = {
            let _g = self.admin.lock();
            // The origin snapshot cannot have gone (deletions take `snapshot_admin`).
            self.put_record(&format!("{VOLUME_PREFIX}{new}"), &record)
                .and_then(|()| self.info(&record))
        };
        match stored {
            Ok(info) => {
                tracing::info!(volume = new, origin = source, "clone created");
                Ok(info)
            }
            Err(e) => {
                if let Err(undo) = self.store().delete_volume(record.id) {
                    tracing::warn!(volume = new, error = %undo,
                        "could not drop the store volume of a failed clone; the next start will");
                }
                Err(e)
            }
        }
    }

    /// Brings the store in line with the catalog after a crash: removes store
    /// snapshots and volumes that no record names (a creation cut short before its
    /// record was written, or a deletion cut short after its record was removed), and
    /// snapshot records whose store snapshot is gone. Run once at start, before
    /// serving.
    pub async fn reconcile(&self) -> Result<(), EngineError> {
        let _ops = self.snapshot_admin.lock().await;
        let volumes: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        let snapshots: Vec<SnapshotRecord> = self.scan_records(SNAPSHOT_PREFIX)?;
        let named: BTreeSet<u64> = volumes.iter().map(|v| v.id).collect();
        // Unnamed volumes: clones before their origins, so each deletion is allowed.
        let mut unnamed: Vec<u64> = self
            .store()
            .volumes()
            .into_iter()
            .filter(|id| !named.contains(id))
            .collect();
        while !unnamed.is_empty() {
            let before = unnamed.len();
            unnamed.retain(|&id| match self.store().delete_volume(id) {
                Ok(()) => {
                    tracing::warn!(
                        volume = format_args!("{id:016x}"),
                        "removed a store volume no catalog record names (its creation or \
                         deletion was cut short)"
                    );
                    false
                }
                Err(_) => true,
            });
            if unnamed.len() == before {
                tracing::error!(
                    volumes = ?unnamed,
                    "store volumes no catalog record names could not be removed"
                );
                break;
            }
        }
        for v in &volumes {
            let mut wanted: BTreeSet<u64> = snapshots
                .iter()
                .filter(|s| s.volume_id == v.id)
                .map(|s| s.id)
                .collect();
            wanted.extend(
                volumes
                    .iter()
                    .filter_map(|c| c.origin.as_ref())
                    .filter(|o| o.volume_id == v.id)
                    .map(|o| o.snapshot_id),
            );
            let stored: BTreeSet<u64> = match self.store().snapshots(v.id) {
                Ok(list) => list.into_iter().map(|s| s.id).collect(),
                Err(e) => {
                    tracing::error!(volume = %v.name, error = %e, "listing the store's snapshots");
                    continue;
                }
            };
            for &id in stored.difference(&wanted) {
                match self.store().delete_snapshot(v.id, id).await {
                    Ok(()) => tracing::warn!(
                        volume = %v.name,
                        snapshot = id,
                        "removed a store snapshot no catalog record names (its creation or \
                         deletion was cut short)"
                    ),
                    Err(e) => tracing::error!(volume = %v.name, snapshot = id, error = %e,
                        "could not remove an unnamed store snapshot"),
                }
            }
            for s in snapshots.iter().filter(|s| s.volume_id == v.id) {
                if !stored.contains(&s.id) {
                    tracing::error!(volume = %v.name, snapshot = %s.name,
                        "snapshot record without its store snapshot; removing the record");
                    self.meta_delete(&snapshot_key(&s.volume, &s.name))?;
                }
            }
        }
        // Records of snapshots of volumes that are gone.
        for s in &snapshots {
            if !named.contains(&s.volume_id) {
                self.meta_delete(&snapshot_key(&s.volume, &s.name))?;
            }
        }
        Ok(())
    }
}
