//! Encoding of the block index kept in rocksdb (column family `index`).
//!
//! Key: volume id (u64 big-endian) ++ block index (u64 big-endian), so one volume's
//! entries are contiguous and sorted by block. Value: slot, version (u64 little-endian),
//! crc (u32 LE), tag (16 bytes): a fixed 36 bytes, checked on decode because it comes
//! from disk.

use crate::block::{BlockMeta, VolumeId};

/// Column family of the block index.
pub(crate) const INDEX_CF: &str = "index";
/// Column family of the small metadata records (`put_meta`).
pub(crate) const META_CF: &str = "meta";

/// Length of an index key.
pub(crate) const KEY_LEN: usize = 16;
/// Length of an index value.
pub(crate) const VALUE_LEN: usize = 36;

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

/// What the index stores for a block: where its data is and what it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Slot in the volume's data file.
    pub slot: u64,
    /// Version, checksum and tag.
    pub meta: BlockMeta,
}

impl IndexEntry {
    pub(crate) fn encode(&self) -> [u8; VALUE_LEN] {
        let mut value = [0u8; VALUE_LEN];
        value[0..8].copy_from_slice(&self.slot.to_le_bytes());
        value[8..16].copy_from_slice(&self.meta.version.to_le_bytes());
        value[16..20].copy_from_slice(&self.meta.crc.to_le_bytes());
        value[20..36].copy_from_slice(&self.meta.tag);
        value
    }

    /// Decodes a value read from the index; `None` when it is malformed.
    pub(crate) fn decode(value: &[u8]) -> Option<IndexEntry> {
        let value: &[u8; VALUE_LEN] = value.try_into().ok()?;
        Some(IndexEntry {
            slot: u64::from_le_bytes(value[0..8].try_into().ok()?),
            meta: BlockMeta {
                version: u64::from_le_bytes(value[8..16].try_into().ok()?),
                crc: u32::from_le_bytes(value[16..20].try_into().ok()?),
                tag: value[20..36].try_into().ok()?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let value = entry.encode();
        assert_eq!(IndexEntry::decode(&value), Some(entry));
        assert_eq!(IndexEntry::decode(&value[..35]), None);
        let mut long = value.to_vec();
        long.push(0);
        assert_eq!(IndexEntry::decode(&long), None);
        assert_eq!(IndexEntry::decode(&[]), None);
    }
}
