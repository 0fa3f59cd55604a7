//! Encoding of the block index kept in rocksdb (column family `index`).
//!
//! Key: volume id (u64 big-endian) ++ block index (u64 big-endian), so one volume's
//! entries are contiguous and sorted by block.
//!
//! Value (little-endian): the block's current version — slot (u64), version (u64),
//! crc (u32), tag (16 bytes), sync generation (u64), birth (u64) — then a count (u8, at
//! most [`MAX_PREV`]) and that many older versions in the same 52-byte layout, newest
//! first: 53, 105 or 157 bytes, checked on decode because it comes from disk. Values
//! written before snapshots existed have 44-byte versions without a birth (45, 89 or
//! 133 bytes); they decode with birth 0, which every snapshot sees.
//!
//! The *birth* of a version is the volume's live snapshot generation when it was
//! written (see `store.rs`, "Snapshots"): snapshot `s` holds every version with
//! `birth <= s` that was still live when `s` was taken. A version with the slot
//! [`TOMBSTONE`] has no data: it hides the block (a trim in a clone, which must not read
//! through to the parent).
//!
//! Column family `history` keeps the versions that live entries replaced but that some
//! snapshot still reads. Key: volume (u64 BE) ++ block (u64 BE) ++ birth (u64 BE); value:
//! the version (52 bytes) ++ death (u64 LE), the live generation that replaced it.
//! Snapshot `s` reads the history version with `birth <= s < death`. The intervals of one
//! block's versions never overlap (a replacing version is born at or after the death of
//! the one it replaced), so at most one matches, and then the live entry does not
//! (its birth is at or after that death); see [`HistoryEntry`].
//!
//! The generation of a version is the sync generation it was written in: every version
//! of generation `g` is durable (index entry and data) once the sync that closes `g` has
//! completed (see `store.rs`). The older versions are the candidates for the block's last
//! durable version should the current one be lost in a power cut: for every sync
//! generation `k` that may turn out to be the last completed one, the newest version of
//! generation `<= k` (see [`IndexEntry::successor`]).

use crate::block::{BlockMeta, VolumeId};

/// Column family of the block index.
pub(crate) const INDEX_CF: &str = "index";
/// Column family of the small metadata records (`put_meta`).
pub(crate) const META_CF: &str = "meta";
/// Column family of the versions kept for snapshots.
pub(crate) const HISTORY_CF: &str = "history";

/// Slot of a version without data (a tombstone).
pub(crate) const TOMBSTONE: u64 = u64::MAX;

/// Length of a history key.
pub(crate) const HISTORY_KEY_LEN: usize = 24;

/// Length of an index key.
pub(crate) const KEY_LEN: usize = 16;

/// Most older versions an index value carries.
pub(crate) const MAX_PREV: usize = 2;

/// Length of one encoded version.
const VERSION_LEN: usize = 52;

/// Length of one version in the layout before births (decoded with birth 0).
const LEGACY_VERSION_LEN: usize = 44;

/// Length of an encoded history value: a version and its death.
const HISTORY_LEN: usize = VERSION_LEN + 8;

/// Index key of one block.
pub(crate) fn key(vol: VolumeId, block: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..8].copy_from_slice(&vol.to_be_bytes());
    key[8..].copy_from_slice(&block.to_be_bytes());
    key
}

/// Smallest key after every key of `vol` (exclusive upper bound of the volume's range),
/// or `None` for the last possible volume id, whose range runs to the end of the column
/// family.
pub(crate) fn volume_end(vol: VolumeId) -> Option<[u8; KEY_LEN]> {
    vol.checked_add(1).map(|next| key(next, 0))
}

/// History key of the version of `block` born in `birth`.
pub(crate) fn history_key(vol: VolumeId, block: u64, birth: u64) -> [u8; HISTORY_KEY_LEN] {
    let mut key = [0u8; HISTORY_KEY_LEN];
    key[..8].copy_from_slice(&vol.to_be_bytes());
    key[8..16].copy_from_slice(&block.to_be_bytes());
    key[16..].copy_from_slice(&birth.to_be_bytes());
    key
}

/// Splits a history key; `None` when it has the wrong length.
pub(crate) fn decode_history_key(key: &[u8]) -> Option<(VolumeId, u64, u64)> {
    let key: &[u8; HISTORY_KEY_LEN] = key.try_into().ok()?;
    Some((
        u64::from_be_bytes(key[..8].try_into().ok()?),
        u64::from_be_bytes(key[8..16].try_into().ok()?),
        u64::from_be_bytes(key[16..].try_into().ok()?),
    ))
}

/// Splits a key read back from the index; `None` when it has the wrong length.
pub(crate) fn decode_key(key: &[u8]) -> Option<(VolumeId, u64)> {
    let key: &[u8; KEY_LEN] = key.try_into().ok()?;
    let (vol, block) = key.split_at(8);
    Some((
        u64::from_be_bytes(vol.try_into().ok()?),
        u64::from_be_bytes(block.try_into().ok()?),
    ))
}

/// One version of a block: where its data is, what it should be, the sync generation
/// it was written in and the snapshot generation it was born in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    /// Slot in the volume's data file; [`TOMBSTONE`] for a version without data.
    pub slot: u64,
    /// Version, checksum and tag.
    pub meta: BlockMeta,
    /// Sync generation the version was written in.
    pub generation: u64,
    /// The volume's live snapshot generation when the version was written.
    pub birth: u64,
}

impl Version {
    /// A version without data that hides the block (written in `generation`, born in
    /// `birth`).
    pub(crate) fn tombstone(generation: u64, birth: u64) -> Version {
        Version {
            slot: TOMBSTONE,
            meta: BlockMeta {
                version: 0,
                crc: 0,
                tag: [0; 16],
            },
            generation,
            birth,
        }
    }

    /// Whether the version has no data.
    pub(crate) fn is_tombstone(&self) -> bool {
        self.slot == TOMBSTONE
    }

    /// The slot holding the version's data, `None` for a tombstone.
    pub(crate) fn data_slot(&self) -> Option<u64> {
        (!self.is_tombstone()).then_some(self.slot)
    }

    fn encode_into(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.slot.to_le_bytes());
        out[8..16].copy_from_slice(&self.meta.version.to_le_bytes());
        out[16..20].copy_from_slice(&self.meta.crc.to_le_bytes());
        out[20..36].copy_from_slice(&self.meta.tag);
        out[36..44].copy_from_slice(&self.generation.to_le_bytes());
        out[44..52].copy_from_slice(&self.birth.to_le_bytes());
    }

    /// Decodes a version of `len` bytes ([`VERSION_LEN`] or [`LEGACY_VERSION_LEN`]).
    fn decode(value: &[u8]) -> Option<Version> {
        if value.len() != VERSION_LEN && value.len() != LEGACY_VERSION_LEN {
            return None;
        }
        let birth = match value.get(44..52) {
            Some(bytes) => u64::from_le_bytes(bytes.try_into().ok()?),
            None => 0,
        };
        Some(Version {
            slot: u64::from_le_bytes(value.get(0..8)?.try_into().ok()?),
            meta: BlockMeta {
                version: u64::from_le_bytes(value.get(8..16)?.try_into().ok()?),
                crc: u32::from_le_bytes(value.get(16..20)?.try_into().ok()?),
                tag: value.get(20..36)?.try_into().ok()?,
            },
            generation: u64::from_le_bytes(value.get(36..44)?.try_into().ok()?),
            birth,
        })
    }
}

/// A version kept for snapshots after the live entry moved on: snapshots `s` with
/// `version.birth <= s < death` read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HistoryEntry {
    /// The replaced version (its birth is also in the key).
    pub version: Version,
    /// Live generation of the volume when the version was replaced or trimmed.
    pub death: u64,
}

impl HistoryEntry {
    /// Whether snapshot `snap` reads this version.
    pub(crate) fn visible_at(&self, snap: u64) -> bool {
        self.version.birth <= snap && snap < self.death
    }

    /// Encodes the entry (60 bytes).
    pub(crate) fn encode(&self) -> [u8; HISTORY_LEN] {
        let mut value = [0u8; HISTORY_LEN];
        self.version.encode_into(&mut value[..VERSION_LEN]);
        value[VERSION_LEN..].copy_from_slice(&self.death.to_le_bytes());
        value
    }

    /// Decodes a value read from the history; `None` when it is malformed (wrong
    /// length, or a death not after the birth).
    pub(crate) fn decode(value: &[u8]) -> Option<HistoryEntry> {
        if value.len() != HISTORY_LEN {
            return None;
        }
        let version = Version::decode(value.get(..VERSION_LEN)?)?;
        let death = u64::from_le_bytes(value.get(VERSION_LEN..)?.try_into().ok()?);
        (death > version.birth).then_some(HistoryEntry { version, death })
    }
}

/// What the index stores for a block: its current version and the older versions that
/// may be its last durable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Slot in the volume's data file.
    pub slot: u64,
    /// Version, checksum and tag.
    pub meta: BlockMeta,
    /// Sync generation the entry was written in.
    pub generation: u64,
    /// Live snapshot generation of the volume when the entry was written.
    pub birth: u64,
    /// Older versions, newest first, all of a lower generation; `None`s at the end.
    pub prev: [Option<Version>; MAX_PREV],
}

impl IndexEntry {
    /// An entry without older versions (a restored or first version).
    pub(crate) fn new(version: Version) -> IndexEntry {
        IndexEntry {
            slot: version.slot,
            meta: version.meta,
            generation: version.generation,
            birth: version.birth,
            prev: [None; MAX_PREV],
        }
    }

    /// The current version.
    pub(crate) fn current(&self) -> Version {
        Version {
            slot: self.slot,
            meta: self.meta,
            generation: self.generation,
            birth: self.birth,
        }
    }

    /// Whether the current version has no data.
    pub(crate) fn is_tombstone(&self) -> bool {
        self.slot == TOMBSTONE
    }

    /// The current version followed by the older ones, newest first.
    fn chain(&self) -> impl Iterator<Item = Version> + '_ {
        std::iter::once(self.current()).chain(self.prev.iter().flatten().copied())
    }

    /// The newest version of the block written in generation `synced` or before — what
    /// the block is if `synced` is the last completed sync and nothing newer landed.
    /// `None`: the block had no entry then (as far as this entry knows; it knows every
    /// generation from the one that was synced when it was written).
    pub(crate) fn durable_at(&self, synced: u64) -> Option<Version> {
        self.chain().find(|v| v.generation <= synced)
    }

    /// The entry of a new version written in generation `generation` (the store's
    /// current one) over `old`, when every generation up to `synced` is known durable.
    ///
    /// A power cut may leave any of the generations `synced..generation` as the last
    /// completed sync (`synced` itself, or the one a sync in flight closes), and the new
    /// version's data may be lost with it. For each of them the entry keeps the newest
    /// version of at most that generation — `old`'s current version if it qualifies,
    /// else one of `old`'s own older versions, which cover every generation from the one
    /// that was synced when `old` was written — so it can be restored. At most two are
    /// needed, since `synced + 2 >= generation` (at most one sync is in flight).
    pub(crate) fn successor(old: Option<&IndexEntry>, new: Version, synced: u64) -> IndexEntry {
        let generation = new.generation;
        let mut prev = [None; MAX_PREV];
        if let Some(old) = old {
            let mut kept = 0;
            for version in old.chain() {
                if version.generation >= generation {
                    // Not durable in any generation before the new version's.
                    continue;
                }
                debug_assert!(kept < MAX_PREV, "more than {MAX_PREV} candidate versions");
                let Some(place) = prev.get_mut(kept) else {
                    break;
                };
                *place = Some(version);
                kept += 1;
                if version.generation <= synced {
                    // Durable already: nothing older can be the last durable version.
                    break;
                }
            }
        }
        IndexEntry {
            prev,
            ..IndexEntry::new(new)
        }
    }

    /// Encodes the entry (53 bytes plus 52 per older version).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let count = self.prev.iter().flatten().count();
        let mut value = vec![0u8; VERSION_LEN + 1 + count * VERSION_LEN];
        self.current().encode_into(&mut value[..VERSION_LEN]);
        // `count <= MAX_PREV`, so this never saturates.
        value[VERSION_LEN] = u8::try_from(count).unwrap_or(u8::MAX);
        for (version, out) in self
            .prev
            .iter()
            .flatten()
            .zip(value[VERSION_LEN + 1..].chunks_exact_mut(VERSION_LEN))
        {
            version.encode_into(out);
        }
        value
    }

    /// Decodes a value read from the index; `None` when it is malformed.
    pub(crate) fn decode(value: &[u8]) -> Option<IndexEntry> {
        // The layout is told by the length: 53 + 52k bytes, or the legacy 45 + 44k.
        let len = [VERSION_LEN, LEGACY_VERSION_LEN]
            .into_iter()
            .find(|&len| value.len() > len && (value.len() - len - 1).is_multiple_of(len))?;
        let current = Version::decode(value.get(..len)?)?;
        let count = usize::from(*value.get(len)?);
        if count > MAX_PREV || value.len() != len + 1 + count * len {
            return None;
        }
        let mut prev = [None; MAX_PREV];
        let mut newer = current.generation;
        for (place, bytes) in prev.iter_mut().zip(value[len + 1..].chunks_exact(len)) {
            let version = Version::decode(bytes)?;
            if version.generation >= newer {
                // Older versions have strictly decreasing generations.
                return None;
            }
            newer = version.generation;
            *place = Some(version);
        }
        Some(IndexEntry {
            prev,
            ..IndexEntry::new(current)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: u64) -> BlockMeta {
        BlockMeta {
            version,
            crc: 0xdead_0000 | u32::try_from(version & 0xffff).unwrap_or(0),
            tag: [u8::try_from(version & 0xff).unwrap_or(0); 16],
        }
    }

    fn version(slot: u64, generation: u64) -> Version {
        Version {
            slot,
            meta: meta(slot + 100),
            generation,
            birth: 1,
        }
    }

    fn successor(
        old: Option<&IndexEntry>,
        slot: u64,
        meta: BlockMeta,
        generation: u64,
        synced: u64,
    ) -> IndexEntry {
        let new = Version {
            slot,
            meta,
            generation,
            birth: 1,
        };
        IndexEntry::successor(old, new, synced)
    }

    #[test]
    fn keys_sort_by_volume_then_block() {
        assert!(key(1, u64::MAX) < key(2, 0));
        assert!(key(2, 255) < key(2, 256));
        assert_eq!(decode_key(&key(7, 9)), Some((7, 9)));
        assert_eq!(decode_key(&[0u8; 15]), None);
        assert_eq!(volume_end(1), Some(key(2, 0)));
        assert_eq!(volume_end(u64::MAX), None);
    }

    #[test]
    fn value_round_trip_and_malformed() {
        let entry = IndexEntry {
            slot: 0x0102_0304_0506_0708,
            meta: BlockMeta {
                version: u64::MAX - 3,
                crc: 0xdead_beef,
                tag: *b"0123456789abcdef",
            },
            generation: 9,
            birth: 3,
            prev: [None; MAX_PREV],
        };
        let value = entry.encode();
        assert_eq!(value.len(), 53);
        assert_eq!(IndexEntry::decode(&value), Some(entry));
        assert_eq!(IndexEntry::decode(&value[..52]), None);
        let mut long = value.clone();
        long.push(0);
        assert_eq!(IndexEntry::decode(&long), None);
        assert_eq!(IndexEntry::decode(&[]), None);
        // The old 36-byte layout is refused.
        assert_eq!(IndexEntry::decode(&[0u8; 36]), None);

        for prev in [
            [Some(version(5, 8)), None],
            [Some(version(5, 8)), Some(version(3, 7))],
        ] {
            let entry = IndexEntry { prev, ..entry };
            let value = entry.encode();
            assert_eq!(IndexEntry::decode(&value), Some(entry));
            assert_eq!(IndexEntry::decode(&value[..value.len() - 1]), None);
            let mut long = value.clone();
            long.push(0);
            assert_eq!(IndexEntry::decode(&long), None);
        }
        // A count beyond MAX_PREV, or one that disagrees with the length, is refused.
        let two = IndexEntry {
            prev: [Some(version(5, 8)), Some(version(3, 7))],
            ..entry
        }
        .encode();
        let mut bad = two.clone();
        bad[52] = 3;
        bad.extend_from_slice(&[0u8; 52]);
        assert_eq!(IndexEntry::decode(&bad), None);
        let mut bad = two.clone();
        bad[52] = 1;
        assert_eq!(IndexEntry::decode(&bad), None);
        // Older versions must have decreasing generations, below the entry's.
        let mut bad = two;
        bad[36..44].copy_from_slice(&8u64.to_le_bytes());
        assert_eq!(IndexEntry::decode(&bad), None);
    }

    #[test]
    fn legacy_layout_decodes_with_birth_zero() {
        // A value of the layout before births: 44-byte versions.
        let mut legacy = Vec::new();
        for (slot, generation) in [(7u64, 9u64), (5, 8)] {
            legacy.extend_from_slice(&slot.to_le_bytes());
            legacy.extend_from_slice(&(slot + 100).to_le_bytes());
            legacy.extend_from_slice(&0xabcdu32.to_le_bytes());
            legacy.extend_from_slice(&[1u8; 16]);
            legacy.extend_from_slice(&generation.to_le_bytes());
            if slot == 7 {
                legacy.push(1);
            }
        }
        assert_eq!(legacy.len(), 89);
        let entry = IndexEntry::decode(&legacy);
        assert!(entry.is_some_and(|e| e.slot == 7
            && e.birth == 0
            && e.prev[0].is_some_and(|p| p.slot == 5 && p.birth == 0)));
    }

    #[test]
    fn history_round_trip_and_visibility() {
        let entry = HistoryEntry {
            version: Version {
                birth: 4,
                ..version(9, 3)
            },
            death: 7,
        };
        assert_eq!(HistoryEntry::decode(&entry.encode()), Some(entry));
        assert!(!entry.visible_at(3) && entry.visible_at(4) && entry.visible_at(6));
        assert!(!entry.visible_at(7));
        // A death not after the birth is malformed.
        let bad = HistoryEntry { death: 4, ..entry };
        assert_eq!(HistoryEntry::decode(&bad.encode()), None);
        assert_eq!(HistoryEntry::decode(&entry.encode()[..59]), None);
        let key = history_key(1, 2, 3);
        assert_eq!(decode_history_key(&key), Some((1, 2, 3)));
        assert!(history_key(1, 2, u64::MAX) < history_key(1, 3, 0));
        let tomb = Version::tombstone(5, 6);
        assert!(tomb.is_tombstone() && tomb.data_slot().is_none());
    }

    #[test]
    fn successor_keeps_the_last_durable_version() {
        // First write of a block: nothing to fall back on.
        let first = successor(None, 1, meta(1), 5, 4);
        assert_eq!(first.prev, [None, None]);
        assert_eq!(first.durable_at(4), None);
        assert_eq!(first.durable_at(5).map(|v| v.slot), Some(1));

        // Overwrite of a durable version: it is the fallback.
        let durable = IndexEntry::new(version(1, 3));
        let next = successor(Some(&durable), 2, meta(2), 5, 4);
        assert_eq!(next.prev, [Some(version(1, 3)), None]);
        // Overwrites in the same generation carry the durable version forward.
        let again = successor(Some(&next), 3, meta(3), 5, 4);
        assert_eq!(again.prev, [Some(version(1, 3)), None]);
        assert_eq!(again.durable_at(4), Some(version(1, 3)));

        // A sync closing generation 5 is in flight (synced 4, writing 6): the new entry
        // keeps the generation-5 version (if that sync completes) and the durable one.
        let during = successor(Some(&again), 4, meta(4), 6, 4);
        assert_eq!(
            during.prev,
            [
                Some(Version {
                    slot: 3,
                    meta: meta(3),
                    generation: 5,
                    birth: 1,
                }),
                Some(version(1, 3))
            ]
        );
        assert_eq!(during.durable_at(4), Some(version(1, 3)));
        assert_eq!(during.durable_at(5).map(|v| v.slot), Some(3));
        let value = during.encode();
        assert_eq!(IndexEntry::decode(&value), Some(during));

        // Once that sync is known complete, the generation-5 version is enough.
        let after = successor(Some(&during), 5, meta(5), 6, 5);
        assert_eq!(after.prev, [during.prev[0], None]);
        assert_eq!(after.durable_at(5).map(|v| v.slot), Some(3));
        // A later generation, after a sync that closed 6: the gen-6 version is durable.
        let later = successor(Some(&after), 6, meta(6), 7, 6);
        assert_eq!(later.prev.map(|v| v.map(|v| v.slot)), [Some(5), None]);
    }
}
