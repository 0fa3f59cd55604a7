//! Reading a *view* of a volume: its live blocks or one of its snapshots, following a
//! clone to its origin for the blocks it never wrote.
//!
//! [`Store::view_versions`] is the one lookup of "the version of block k visible in
//! view V"; every read (`read_blocks_at`, `extents_at`, `block_meta_at`, and through
//! them the live `read_blocks`, `extents`, `block_meta`) goes through it. For the live
//! view of a volume that is no clone it is exactly the index scan (or point lookup)
//! the store always did: snapshots cost live reads nothing.

use std::ops::Range;
use std::sync::Arc;

use super::{MAX_BLOCKS_PER_IO, ReadList, ReadPin, Store, Volume, check_snapshot, decode_entry};
use crate::block::{BlockMeta, SnapId, ViewBlock, VolumeId};
use crate::error::StoreError;
use crate::index::{self, HISTORY_CF, HistoryEntry, INDEX_CF, Version};
use crate::store::MAX_CLONE_DEPTH;

/// A version with data found in a view.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    pub block: u64,
    /// Volume whose data file holds it.
    pub source: VolumeId,
    pub version: Version,
}

impl Store {
    /// Reads a range of blocks (at most [`MAX_BLOCKS_PER_IO`]) of a view: the live
    /// volume (`snap` `None`) or snapshot `snap`. One element per block, `None` for
    /// unallocated ones; each block says which volume it was stored under (for a clone,
    /// its origin for the blocks it never wrote). Any block failing its checksum fails
    /// the whole read with [`StoreError::Corrupt`]. A snapshot deleted while the read
    /// runs fails it with [`StoreError::NoSuchSnapshot`].
    pub async fn read_blocks_at(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        blocks: Range<u64>,
    ) -> Result<Vec<Option<ViewBlock>>, StoreError> {
        self.volume(vol)?;
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let count = usize::try_from(blocks.end - blocks.start)
            .ok()
            .filter(|&n| n <= MAX_BLOCKS_PER_IO)
            .ok_or_else(|| {
                StoreError::Failed(format!(
                    "read of {} blocks (at most {MAX_BLOCKS_PER_IO})",
                    blocks.end - blocks.start
                ))
            })?;
        self.read_view(vol, snap, blocks.start, count).await
    }

    /// Reads `count` blocks (1 to [`MAX_BLOCKS_PER_IO`]) from `first` of a view.
    pub(super) async fn read_view(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        first: u64,
        count: usize,
    ) -> Result<Vec<Option<ViewBlock>>, StoreError> {
        let volume = self.volume(vol)?;
        if let Some(snap) = snap {
            check_snapshot(&volume, snap)?;
        }
        // Every volume of the chain is pinned before any lookup, so no slot found is
        // reused while this read runs.
        let chain = self.chain(&volume)?;
        let pins: Vec<ReadPin<'_>> = chain.iter().map(|v| ReadPin::new(v)).collect();
        let seen =
            self.view_versions(vol, snap, first, u64::try_from(count).unwrap_or(u64::MAX))?;
        let mut out: Vec<Option<ViewBlock>> = Vec::with_capacity(count);
        out.resize_with(count, || None);
        for source in &chain {
            let list: ReadList = seen
                .iter()
                .filter(|s| s.source == source.id)
                .map(|s| (s.block, s.version.slot, s.version.meta))
                .collect();
            if list.is_empty() {
                continue;
            }
            let read = self.read_entries(source, count, first, list).await?;
            for (place, found) in out.iter_mut().zip(read) {
                if let Some((meta, data)) = found {
                    *place = Some(ViewBlock {
                        source: source.id,
                        meta,
                        data,
                    });
                }
            }
        }
        drop(pins);
        if let Some(snap) = snap {
            check_snapshot(&volume, snap)?;
        }
        Ok(out)
    }

    /// Metadata of a block in a view, with the volume it was stored under; no data read.
    pub fn block_meta_at(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        block: u64,
    ) -> Result<Option<(VolumeId, BlockMeta)>, StoreError> {
        let volume = self.volume(vol)?;
        if let Some(snap) = snap {
            check_snapshot(&volume, snap)?;
        }
        let seen = self.view_versions(vol, snap, block, 1)?;
        Ok(seen.first().map(|s| (s.source, s.version.meta)))
    }

    /// The volume and its origins, nearest first (at most [`MAX_CLONE_DEPTH`] + 1).
    pub(super) fn chain(&self, volume: &Arc<Volume>) -> Result<Vec<Arc<Volume>>, StoreError> {
        let mut chain = vec![Arc::clone(volume)];
        let mut origin = volume.origin;
        while let Some((vol, _)) = origin {
            if chain.len() > MAX_CLONE_DEPTH {
                return Err(StoreError::Failed(format!(
                    "volume {:016x}: clone chain longer than {MAX_CLONE_DEPTH}",
                    volume.id
                )));
            }
            let next = self.volume(vol)?;
            origin = next.origin;
            chain.push(next);
        }
        Ok(chain)
    }

    /// The versions with data visible in view (`vol`, `snap`) for the `count` blocks
    /// from `first` (clipped to the last block), sorted by block: the volume's own
    /// (history or live), and for blocks it has no version of (not even a tombstone),
    /// its origin's snapshot, recursively.
    pub(super) fn view_versions(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        first: u64,
        count: u64,
    ) -> Result<Vec<Seen>, StoreError> {
        let mut volume = self.volume(vol)?;
        let mut snap = snap;
        let mut seen = Vec::new();
        // Blocks resolved by a nearer volume (data or tombstone), sorted.
        let mut resolved: Vec<u64> = Vec::new();
        for depth in 0..=MAX_CLONE_DEPTH {
            let own = self.own_versions(volume.id, snap, first, count)?;
            let origin = volume.origin;
            if depth == 0 && origin.is_none() {
                // The common case: no merging.
                return Ok(own
                    .into_iter()
                    .filter(|(_, v)| !v.is_tombstone())
                    .map(|(block, version)| Seen {
                        block,
                        source: vol,
                        version,
                    })
                    .collect());
            }
            let mut found = Vec::new();
            for (block, version) in own {
                if resolved.binary_search(&block).is_ok() {
                    continue;
                }
                found.push(block);
                if !version.is_tombstone() {
                    seen.push(Seen {
                        block,
                        source: volume.id,
                        version,
                    });
                }
            }
            resolved.extend(found);
            resolved.sort_unstable();
            let Some((next, next_snap)) = origin else {
                seen.sort_unstable_by_key(|s| s.block);
                return Ok(seen);
            };
            volume = self.volume(next)?;
            snap = Some(next_snap);
        }
        Err(StoreError::Failed(format!(
            "volume {vol:016x}: clone chain longer than {MAX_CLONE_DEPTH}"
        )))
    }

    /// The volume's own version of each block of `blocks` in view `snap` (tombstones
    /// included), sorted by block. Live view: the index entries. Snapshot `s`: the
    /// history version with `birth <= s < death`, else the live entry if its
    /// `birth <= s` (at most one of them matches; see `index.rs`).
    fn own_versions(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        first: u64,
        count: u64,
    ) -> Result<Vec<(u64, Version)>, StoreError> {
        let mut own = Vec::new();
        if count == 0 {
            return Ok(own);
        }
        let last = first.saturating_add(count - 1);
        if count == 1 {
            // A point lookup (bloom filters, no iterator set-up) is several times
            // cheaper than a scan for the common single-block read.
            let cf = self.cf(INDEX_CF)?;
            if let Some(value) = self.db.get_pinned_cf(cf, index::key(vol, first))? {
                own.push((first, decode_entry(vol, first, &value)?.current()));
            }
        } else {
            // The index scan's range cannot hold block u64::MAX; nobody uses it.
            self.scan_index(vol, first..last.saturating_add(1), |block, value| {
                own.push((block, decode_entry(vol, block, value)?.current()));
                Ok(true)
            })?;
        }
        let Some(snap) = snap else {
            return Ok(own);
        };
        own.retain(|(_, v)| v.birth <= snap);
        let mut kept = Vec::new();
        let cf = self.cf(HISTORY_CF)?;
        let mut options = rocksdb::ReadOptions::default();
        if let Some(end) = last.checked_add(1) {
            options.set_iterate_upper_bound(index::history_key(vol, end, 0).to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(cf, options);
        iter.seek(index::history_key(vol, first, 0));
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Some((key_vol, block, birth)) = index::decode_history_key(key) else {
                return Err(StoreError::Failed(
                    "history key of the wrong length".to_owned(),
                ));
            };
            if key_vol != vol || block > last {
                break;
            }
            if birth <= snap {
                let entry = HistoryEntry::decode(value)
                    .ok_or(StoreError::Corrupt { volume: vol, block })?;
                if entry.visible_at(snap) {
                    kept.push((block, entry.version));
                }
            }
            iter.next();
        }
        iter.status()?;
        if kept.is_empty() {
            return Ok(own);
        }
        // Disjoint intervals: a block found in the history has no live entry born by
        // `snap`; should a malformed store say otherwise, the history wins.
        own.retain(|(block, _)| kept.binary_search_by_key(block, |(b, _)| *b).is_err());
        own.extend(kept);
        own.sort_unstable_by_key(|(block, _)| *block);
        Ok(own)
    }
}
