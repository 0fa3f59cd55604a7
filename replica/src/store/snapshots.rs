//! Snapshots, rollback and clones of a volume (the design and its invariants are in
//! the top comment of `store.rs`; the lookups in `view.rs`).
//!
//! Every operation here is deterministic given the same sequence of operations, so
//! replicas that apply the same snapshot operations in the same order to the same
//! writes get the same snapshot ids and contents.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rocksdb::{WriteBatch, WriteOptions};

use super::{
    DISCARD_BATCH, MAX_CLONE_DEPTH, MAX_SNAPSHOTS, Reservation, Store, Volume, VolumeRecord,
    VolumeState, check_snapshot, decode_entry, snapshot_record_key, sync_dir, volume_record_key,
};
use crate::block::{BlockWrite, SnapId, SnapshotInfo, VolumeId};
use crate::datafile::DataFile;
use crate::error::StoreError;
use crate::index::{self, HISTORY_CF, HistoryEntry, INDEX_CF, IndexEntry, META_CF, Version};
use crate::slots::SlotMap;

/// Most blocks a rollback copies per read and write.
const ROLLBACK_CHUNK: usize = 1024;

impl Store {
    /// Takes a snapshot of a volume and returns its id (ids increase, never reused).
    ///
    /// The snapshot holds exactly the writes and discards whose index commit finished
    /// before the call took the volume's commit lock, and none after. No data is copied.
    /// Returns once the snapshot and its content are durable (the store is synced).
    pub async fn create_snapshot(&self, vol: VolumeId) -> Result<SnapId, StoreError> {
        self.check_healthy()?;
        let volume = self.volume(vol)?;
        let _admin = volume.admin.lock().await;
        let snap = {
            let mut state = volume.commit.lock();
            if state.deleted {
                return Err(StoreError::NoSuchVolume(vol));
            }
            if state.snapshots.len() >= MAX_SNAPSHOTS {
                return Err(StoreError::Failed(format!(
                    "volume {vol:016x} has {MAX_SNAPSHOTS} snapshots already"
                )));
            }
            let snap = state.birth;
            state.birth = snap.saturating_add(1);
            // From now on writers keep what the snapshot reads.
            state.snapshots.insert(snap, false);
            snap
        };
        let recorded = self.record_snapshot(&volume, snap).await;
        let mut state = volume.commit.lock();
        match recorded {
            Ok(()) => {
                state.snapshots.insert(snap, true);
                Ok(snap)
            }
            Err(e) => {
                // The history versions kept for it stay until the next open drops them.
                state.snapshots.remove(&snap);
                Err(e)
            }
        }
    }

    /// Makes a new snapshot's content durable, then its record.
    async fn record_snapshot(&self, volume: &Volume, snap: SnapId) -> Result<(), StoreError> {
        // Every version the snapshot reads was committed before the generation this
        // sync closes. The record comes after, in a later WAL write: a record that
        // survives a power cut implies the sync's record did.
        self.sync().await?;
        let meta = self.cf(META_CF)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, snapshot_record_key(volume.id, snap), []);
        let record = VolumeRecord {
            next_birth: snap.saturating_add(1),
            origin: volume.origin,
        };
        batch.put_cf(meta, volume_record_key(volume.id), record.encode());
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    /// Deletes a snapshot: the versions only it read are dropped and their space
    /// reclaimed (the store is synced before this returns). Other snapshots are intact.
    /// Refused with [`StoreError::SnapshotHasClones`] while clones read through to it.
    pub async fn delete_snapshot(&self, vol: VolumeId, snap: SnapId) -> Result<(), StoreError> {
        self.check_healthy()?;
        let volume = self.volume(vol)?;
        let _admin = volume.admin.lock().await;
        check_snapshot(&volume, snap)?;
        let clones = self.clones_of(vol, Some(snap));
        if !clones.is_empty() {
            return Err(StoreError::SnapshotHasClones {
                volume: vol,
                snapshot: snap,
                clones,
            });
        }
        // The record goes first and durably: a crash after it leaves history versions
        // nobody reads, which `open` drops; the other order could leave a snapshot
        // missing versions.
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .delete_cf_opt(self.cf(META_CF)?, snapshot_record_key(vol, snap), &options)?;
        let remaining: BTreeSet<SnapId> = {
            let mut state = volume.commit.lock();
            state.snapshots.remove(&snap);
            state.snapshots.keys().copied().collect()
        };
        self.drop_history(&volume, |entry| {
            entry.visible_at(snap)
                && remaining
                    .range(entry.version.birth..entry.death)
                    .next()
                    .is_none()
        })?;
        self.sync().await
    }

    /// Removes the history versions of `volume` for which `unread` holds, in batches;
    /// their slots are freed after the next sync.
    fn drop_history(
        &self,
        volume: &Volume,
        unread: impl Fn(&HistoryEntry) -> bool,
    ) -> Result<(), StoreError> {
        let cf = self.cf(HISTORY_CF)?;
        let vol = volume.id;
        let mut batch = WriteBatch::default();
        let mut freed = Vec::new();
        let mut pending = 0u64;
        let flush = |batch: &mut WriteBatch, freed: &mut Vec<u64>| -> Result<(), StoreError> {
            if !batch.is_empty() {
                self.db
                    .write_opt(std::mem::take(batch), &self.write_options)?;
            }
            volume.slots.lock().free_after_sync(std::mem::take(freed));
            Ok(())
        };
        self.scan_history(vol, |block, birth, entry| {
            if unread(&entry) {
                batch.delete_cf(cf, index::history_key(vol, block, birth));
                freed.extend(entry.version.data_slot());
                pending += 1;
                if pending >= DISCARD_BATCH {
                    flush(&mut batch, &mut freed)?;
                    pending = 0;
                }
            }
            Ok(())
        })?;
        flush(&mut batch, &mut freed)
    }

    /// Calls `f(block, birth, entry)` for every history version of `vol`, in key order.
    pub(super) fn scan_history(
        &self,
        vol: VolumeId,
        mut f: impl FnMut(u64, u64, HistoryEntry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let cf = self.cf(HISTORY_CF)?;
        let mut options = rocksdb::ReadOptions::default();
        if let Some(next) = vol.checked_add(1) {
            options.set_iterate_upper_bound(index::history_key(next, 0, 0).to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(cf, options);
        iter.seek(index::history_key(vol, 0, 0));
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Some((key_vol, block, birth)) = index::decode_history_key(key) else {
                return Err(StoreError::Failed(
                    "history key of the wrong length".to_owned(),
                ));
            };
            if key_vol != vol {
                break;
            }
            let entry =
                HistoryEntry::decode(value).ok_or(StoreError::Corrupt { volume: vol, block })?;
            f(block, birth, entry)?;
            iter.next();
        }
        iter.status()?;
        Ok(())
    }

    /// The volume's snapshots, oldest first, each with the blocks it alone holds (what
    /// deleting it gives back). Scans the volume's history: O(history versions).
    pub fn snapshots(&self, vol: VolumeId) -> Result<Vec<SnapshotInfo>, StoreError> {
        let volume = self.volume(vol)?;
        let snaps: BTreeSet<SnapId> = {
            let state = volume.commit.lock();
            state
                .snapshots
                .iter()
                .filter(|&(_, &recorded)| recorded)
                .map(|(&s, _)| s)
                .collect()
        };
        let mut exclusive: HashMap<SnapId, u64> = HashMap::new();
        self.scan_history(vol, |_, _, entry| {
            if entry.version.is_tombstone() {
                return Ok(());
            }
            let mut readers = snaps.range(entry.version.birth..entry.death);
            if let (Some(&only), None) = (readers.next(), readers.next()) {
                *exclusive.entry(only).or_default() += 1;
            }
            Ok(())
        })?;
        Ok(snaps
            .into_iter()
            .map(|id| SnapshotInfo {
                id,
                exclusive_blocks: exclusive.get(&id).copied().unwrap_or(0),
            })
            .collect())
    }

    /// Creates volume `vol` as a clone of snapshot `snap` of `origin`: instant, it reads
    /// the origin's snapshot for every block it has not written or trimmed. Its writes,
    /// trims and snapshots never touch the origin. Chains of clones are allowed up to
    /// [`MAX_CLONE_DEPTH`].
    pub async fn create_clone(
        &self,
        vol: VolumeId,
        origin: VolumeId,
        snap: SnapId,
    ) -> Result<(), StoreError> {
        let origin_volume = self.volume(origin)?;
        // Held so the snapshot cannot be deleted meanwhile.
        let _admin = origin_volume.admin.lock().await;
        let _catalog = self.catalog.lock();
        check_snapshot(&origin_volume, snap)?;
        let depth = self.chain(&origin_volume)?.len();
        if depth >= MAX_CLONE_DEPTH {
            return Err(StoreError::Failed(format!(
                "volume {origin:016x} is a clone {depth} levels deep; at most \
                 {MAX_CLONE_DEPTH} are allowed"
            )));
        }
        if self.volumes.read().contains_key(&vol) {
            return Err(StoreError::VolumeExists(vol));
        }
        // The record first: a crash before the data file exists leaves a record without
        // a file, which `open` removes; the other order would leave a clone that is an
        // empty volume.
        let record = VolumeRecord {
            next_birth: 1,
            origin: Some((origin, snap)),
        };
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.put_cf_opt(
            self.cf(META_CF)?,
            volume_record_key(vol),
            record.encode(),
            &options,
        )?;
        let file = match DataFile::create(&self.data_file_path(vol), self.options.direct_io) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::VolumeExists(vol));
            }
            Err(e) => return Err(StoreError::io("creating a data file", e)),
        };
        sync_dir(&self.data_dir)?;
        let volume = Volume::new(
            vol,
            file,
            SlotMap::default(),
            0,
            record.origin,
            VolumeState::new(1, []),
        );
        self.volumes.write().insert(vol, Arc::new(volume));
        Ok(())
    }

    /// The volume and snapshot a clone reads through to; `None` for a volume that is no
    /// clone.
    pub fn clone_origin(&self, vol: VolumeId) -> Result<Option<(VolumeId, SnapId)>, StoreError> {
        Ok(self.volume(vol)?.origin)
    }

    /// Makes the live volume read as snapshot `snap` again. Every snapshot, older and
    /// newer, stays as it was. Returns once the result is durable.
    ///
    /// The blocks changed since the snapshot get its version back: copied to new slots
    /// (data read and written again: the cost is the blocks changed, nothing else), a
    /// tombstone, or no entry. The volume must have no writer meanwhile: a block written
    /// during the rollback fails it with nothing changed. The index changes are one
    /// rocksdb batch; a power cut before the final sync may leave some blocks rolled back
    /// and others not, as with unflushed writes.
    pub async fn rollback(&self, vol: VolumeId, snap: SnapId) -> Result<(), StoreError> {
        self.check_healthy()?;
        let volume = self.volume(vol)?;
        let _admin = volume.admin.lock().await;
        check_snapshot(&volume, snap)?;
        // Blocks whose live entry is not what the snapshot reads: those born after it,
        // and those with a history version it reads (their live entry, if any, was born
        // after it).
        let mut changed: HashMap<u64, Option<IndexEntry>> = HashMap::new();
        self.scan_index(vol, 0..u64::MAX, |block, value| {
            let entry = decode_entry(vol, block, value)?;
            if entry.birth > snap {
                changed.insert(block, Some(entry));
            }
            Ok(true)
        })?;
        let mut targets: Vec<(u64, Option<Version>)> = Vec::new();
        self.scan_history(vol, |block, _, entry| {
            if entry.visible_at(snap) {
                targets.push((block, Some(entry.version)));
                changed.entry(block).or_insert(None);
            }
            Ok(())
        })?;
        // The history scan went in block order, at most one version per block.
        let unread: Vec<(u64, Option<Version>)> = changed
            .keys()
            .filter(|&&block| targets.binary_search_by_key(&block, |(b, _)| *b).is_err())
            .map(|&block| (block, None))
            .collect();
        targets.extend(unread);
        targets.sort_unstable_by_key(|(block, _)| *block);

        // Copy the data versions to new slots, in chunks.
        let to_copy: Vec<(u64, Version)> = targets
            .iter()
            .filter_map(|&(block, v)| v.filter(|v| !v.is_tombstone()).map(|v| (block, v)))
            .collect();
        let mut copies: HashMap<u64, u64> = HashMap::new();
        let mut reservations: Vec<Reservation> = Vec::new();
        for chunk in to_copy.chunks(ROLLBACK_CHUNK) {
            let writes = self.read_versions(&volume, chunk).await?;
            let (placed, reservation) = self.write_data(&volume, writes).await?;
            for (block, _, slot) in placed {
                copies.insert(block, slot);
            }
            reservations.push(reservation);
        }

        {
            let cf = self.cf(INDEX_CF)?;
            let history = self.cf(HISTORY_CF)?;
            let state = volume.commit.lock();
            if state.deleted {
                return Err(StoreError::NoSuchVolume(vol));
            }
            let generations = *self.generations.lock();
            let mut batch = WriteBatch::default();
            let mut freed = Vec::new();
            let mut live_delta = 0i64;
            for (block, target) in &targets {
                let key = index::key(vol, *block);
                let now = match self.db.get_pinned_cf(cf, key)? {
                    Some(value) => Some(decode_entry(vol, *block, &value)?),
                    None => None,
                };
                let before = changed.get(block).copied().flatten();
                if now != before {
                    return Err(StoreError::Failed(format!(
                        "volume {vol:016x} was written during its rollback; nothing rolled back"
                    )));
                }
                if let Some(old) = &now {
                    state.retire(history, vol, *block, old.current(), &mut batch, &mut freed);
                    if !old.is_tombstone() {
                        live_delta -= 1;
                    }
                }
                let new = match target {
                    None => None,
                    Some(v) if v.is_tombstone() => {
                        Some(Version::tombstone(generations.current, state.birth))
                    }
                    Some(v) => {
                        let slot = copies.get(block).copied().ok_or_else(|| {
                            StoreError::Failed("rollback copy missing".to_owned())
                        })?;
                        live_delta += 1;
                        Some(Version {
                            slot,
                            meta: v.meta,
                            generation: generations.current,
                            birth: state.birth,
                        })
                    }
                };
                match new {
                    Some(new) => {
                        let entry = IndexEntry::successor(now.as_ref(), new, generations.synced);
                        batch.put_cf(cf, key, entry.encode());
                    }
                    None => batch.delete_cf(cf, key),
                }
            }
            if !batch.is_empty() {
                self.db.write_opt(batch, &self.write_options)?;
            }
            if live_delta >= 0 {
                volume
                    .live
                    .fetch_add(live_delta.unsigned_abs(), Ordering::Relaxed);
            } else {
                volume
                    .live
                    .fetch_sub(live_delta.unsigned_abs(), Ordering::Relaxed);
            }
            volume.slots.lock().free_after_sync(freed);
            // Every copied slot is referenced by the index now.
            for reservation in &mut reservations {
                reservation.runs.clear();
            }
            drop(state);
        }
        self.sync().await
    }

    /// Reads the data of versions of `volume` (sorted by block) as writes of the same
    /// blocks and metadata.
    async fn read_versions(
        &self,
        volume: &Volume,
        versions: &[(u64, Version)],
    ) -> Result<Vec<BlockWrite>, StoreError> {
        let mut writes = Vec::with_capacity(versions.len());
        // One read per version: the blocks of a chunk may be far apart.
        let pin = super::ReadPin::new(volume);
        for &(block, version) in versions {
            let read = self
                .read_entries(volume, 1, block, vec![(block, version.slot, version.meta)])
                .await?;
            let Some(Some((meta, data))) = read.into_iter().next() else {
                return Err(StoreError::Corrupt {
                    volume: volume.id,
                    block,
                });
            };
            writes.push(BlockWrite { block, meta, data });
        }
        drop(pin);
        Ok(writes)
    }
}
