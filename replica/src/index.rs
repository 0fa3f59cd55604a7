//! Encoding of the block index kept in rocksdb (column family `index`).
//!
//! Key: volume id (u64 big-endian) ++ block index (u64 big-endian), so one volume's
//! entries are contiguous and sorted by block.
//!
//! Value (little-endian): the block's current version — slot (u64), version (u64),
//! crc (u32), tag (16 bytes), sync generation (u64) — then a count (u8, at most
//! [`MAX_PREV`]) and that many older versions in the same 44-byte layout, newest
//! first: 45, 89 or 133 bytes, checked on decode because it comes from disk.
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

/// Length of an index key.
pub(crate) const KEY_LEN: usize = 16;

/// Most older versions an index value carries.
pub(crate) const MAX_PREV: usize = 2;

/// Length of one encoded version.
const VERSION_LEN: usize = 44;

/// Length of an index value without older versions.
const BASE_LEN: usize = VERSION_LEN + 1;

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

/// Splits a key read back from the index; `None` when it has the wrong length.
pub(crate) fn decode_key(key: &[u8]) -> Option<(VolumeId, u64)> {
    let key: &[u8; KEY_LEN] = key.try_into().ok()?;
    let (vol, block) = key.split_at(8);
    Some((
        u64::from_be_bytes(vol.try_into().ok()?),
        u64::from_be_bytes(block.try_into().ok()?),
    ))
}

/// One version of a block: where its data is, what it should be, and the sync
/// generation it was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    /// Slot in the volume's data file.
    pub slot: u64,
    /// Version, checksum and tag.
    pub meta: BlockMeta,
    /// Sync generation the version was written in.
    pub generation: u64,
}

impl Version {
    fn encode_into(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.slot.to_le_bytes());
        out[8..16].copy_from_slice(&self.meta.version.to_le_bytes());
        out[16..20].copy_from_slice(&self.meta.crc.to_le_bytes());
        out[20..36].copy_from_slice(&self.meta.tag);
        out[36..44].copy_from_slice(&self.generation.to_le_bytes());
    }

    fn decode(value: &[u8]) -> Option<Version> {
        let value: &[u8; VERSION_LEN] = value.try_into().ok()?;
        Some(Version {
            slot: u64::from_le_bytes(value[0..8].try_into().ok()?),
            meta: BlockMeta {
                version: u64::from_le_bytes(value[8..16].try_into().ok()?),
                crc: u32::from_le_bytes(value[16..20].try_into().ok()?),
                tag: value[20..36].try_into().ok()?,
            },
            generation: u64::from_le_bytes(value[36..44].try_into().ok()?),
        })
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
            prev: [None; MAX_PREV],
        }
    }

    /// The current version.
    pub(crate) fn current(&self) -> Version {
        Version {
            slot: self.slot,
            meta: self.meta,
            generation: self.generation,
        }
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
    pub(crate) fn successor(
        old: Option<&IndexEntry>,
        slot: u64,
        meta: BlockMeta,
        generation: u64,
        synced: u64,
    ) -> IndexEntry {
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
            slot,
            meta,
            generation,
            prev,
        }
    }

    /// Encodes the entry (45 bytes plus 44 per older version).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let count = self.prev.iter().flatten().count();
        let mut value = vec![0u8; BASE_LEN + count * VERSION_LEN];
        self.current().encode_into(&mut value[..VERSION_LEN]);
        // `count <= MAX_PREV`, so this never saturates.
        value[VERSION_LEN] = u8::try_from(count).unwrap_or(u8::MAX);
        for (version, out) in self
            .prev
            .iter()
            .flatten()
            .zip(value[BASE_LEN..].chunks_exact_mut(VERSION_LEN))
        {
            version.encode_into(out);
        }
        value
    }

    /// Decodes a value read from the index; `None` when it is malformed.
    pub(crate) fn decode(value: &[u8]) -> Option<IndexEntry> {
        let current = Version::decode(value.get(..VERSION_LEN)?)?;
        let count = usize::from(*value.get(VERSION_LEN)?);
        if count > MAX_PREV || value.len() != BASE_LEN + count * VERSION_LEN {
            return None;
        }
        let mut prev = [None; MAX_PREV];
        let mut newer = current.generation;
        for (place, bytes) in prev
            .iter_mut()
            .zip(value[BASE_LEN..].chunks_exact(VERSION_LEN))
        {
            let version = Version::decode(bytes)?;
            if version.generation >= newer {
                // Older versions have strictly decreasing generations.
                return None;
            }
            newer = version.generation;
            *place = Some(version);
        }
        Some(IndexEntry {
            slot: current.slot,
            meta: current.meta,
            generation: current.generation,
            prev,
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
        }
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
            prev: [None; MAX_PREV],
        };
        let value = entry.encode();
        assert_eq!(value.len(), 45);
        assert_eq!(IndexEntry::decode(&value), Some(entry));
        assert_eq!(IndexEntry::decode(&value[..44]), None);
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
        bad[44] = 3;
        bad.extend_from_slice(&[0u8; 44]);
        assert_eq!(IndexEntry::decode(&bad), None);
        let mut bad = two.clone();
        bad[44] = 1;
        assert_eq!(IndexEntry::decode(&bad), None);
        // Older versions must have decreasing generations, below the entry's.
        let mut bad = two;
        bad[36..44].copy_from_slice(&8u64.to_le_bytes());
        assert_eq!(IndexEntry::decode(&bad), None);
    }

    #[test]
    fn successor_keeps_the_last_durable_version() {
        // First write of a block: nothing to fall back on.
        let first = IndexEntry::successor(None, 1, meta(1), 5, 4);
        assert_eq!(first.prev, [None, None]);
        assert_eq!(first.durable_at(4), None);
        assert_eq!(first.durable_at(5).map(|v| v.slot), Some(1));

        // Overwrite of a durable version: it is the fallback.
        let durable = IndexEntry::new(version(1, 3));
        let next = IndexEntry::successor(Some(&durable), 2, meta(2), 5, 4);
        assert_eq!(next.prev, [Some(version(1, 3)), None]);
        // Overwrites in the same generation carry the durable version forward.
        let again = IndexEntry::successor(Some(&next), 3, meta(3), 5, 4);
        assert_eq!(again.prev, [Some(version(1, 3)), None]);
        assert_eq!(again.durable_at(4), Some(version(1, 3)));

        // A sync closing generation 5 is in flight (synced 4, writing 6): the new entry
        // keeps the generation-5 version (if that sync completes) and the durable one.
        let during = IndexEntry::successor(Some(&again), 4, meta(4), 6, 4);
        assert_eq!(
            during.prev,
            [
                Some(Version {
                    slot: 3,
                    meta: meta(3),
                    generation: 5
                }),
                Some(version(1, 3))
            ]
        );
        assert_eq!(during.durable_at(4), Some(version(1, 3)));
        assert_eq!(during.durable_at(5).map(|v| v.slot), Some(3));
        let value = during.encode();
        assert_eq!(IndexEntry::decode(&value), Some(during));

        // Once that sync is known complete, the generation-5 version is enough.
        let after = IndexEntry::successor(Some(&during), 5, meta(5), 6, 5);
        assert_eq!(after.prev, [during.prev[0], None]);
        assert_eq!(after.durable_at(5).map(|v| v.slot), Some(3));
        // A later generation, after a sync that closed 6: the gen-6 version is durable.
        let later = IndexEntry::successor(Some(&after), 6, meta(6), 7, 6);
        assert_eq!(later.prev.map(|v| v.map(|v| v.slot)), [Some(5), None]);
    }
}
