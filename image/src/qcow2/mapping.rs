//! Guest-to-host mapping: decoding L2 entries (standard and extended, with their
//! subcluster bitmaps) into runs of one kind, and the bounded cache of L2 tables.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::ImageError;

/// Bits 9..=55 of an L1 entry: the L2 table's offset.
pub(super) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9..=55 of a standard L2 entry: the data cluster's offset.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
pub(super) const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
/// Extended L2 entries split a cluster into this many subclusters.
const SUBCLUSTERS: u32 = 32;

/// What a run of guest bytes inside one cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mapping {
    /// Stored as is at this host offset (in the image file, or in the external data
    /// file when there is one).
    Host(u64),
    /// Inside a compressed cluster; the value is the cluster's L2 entry.
    Compressed(u64),
    /// Reads as zeros, whatever the backing file holds.
    Zero,
    /// Not in this image: the backing file's bytes, or zeros.
    Unallocated,
}

/// How this image lays its clusters out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    /// Data clusters live in an external data file, where host offset 0 is valid.
    pub external_data: bool,
}

impl Layout {
    pub(super) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Words (u64) per L2 entry.
    pub(super) fn entry_words(&self) -> usize {
        if self.extended_l2 { 2 } else { 1 }
    }

    /// Decodes the L2 entry (`entry`, and `bitmap` for extended L2) of one cluster:
    /// what the bytes from `in_cluster` hold, and how many bytes of the cluster
    /// from there have that same kind (host-contiguous for [`Mapping::Host`]).
    pub(super) fn classify(
        &self,
        entry: u64,
        bitmap: u64,
        in_cluster: u64,
    ) -> Result<(Mapping, u64), ImageError> {
        let cluster_size = self.cluster_size();
        let to_end = cluster_size - in_cluster;
        if entry & OFLAG_COMPRESSED != 0 {
            if self.external_data {
                return Err(ImageError::Invalid(
                    "a compressed cluster in an image with an external data file".into(),
                ));
            }
            return Ok((Mapping::Compressed(entry), to_end));
        }
        let offset = entry & L2E_OFFSET_MASK;
        // Offset 0 means unallocated, except in an external data file, where the
        // copied bit (refcount exactly one) tells an allocated cluster at 0 apart.
        let allocated = offset != 0 || (self.external_data && entry & OFLAG_COPIED != 0);
        if allocated && offset & (cluster_size - 1) != 0 {
            return Err(ImageError::Invalid(format!(
                "the data cluster offset {offset:#x} is not cluster aligned"
            )));
        }
        if !self.extended_l2 {
            let mapping = if entry & OFLAG_ZERO != 0 {
                Mapping::Zero
            } else if allocated {
                Mapping::Host(offset + in_cluster)
            } else {
                Mapping::Unallocated
            };
            return Ok((mapping, to_end));
        }
        // Subclusters: bit i of the low word says allocated, of the high word zero.
        let alloc = bitmap & 0xffff_ffff;
        let zero = bitmap >> 32;
        if allocated && alloc & zero != 0 {
            return Err(ImageError::Invalid(format!(
                "an extended L2 bitmap {bitmap:#x} marks subclusters both allocated and zero"
            )));
        }
        if !allocated && alloc != 0 {
            return Err(ImageError::Invalid(format!(
                "an extended L2 bitmap {bitmap:#x} allocates subclusters of an unallocated cluster"
            )));
        }
        let sc_bits = self.cluster_bits - SUBCLUSTERS.trailing_zeros();
        let first = in_cluster >> sc_bits;
        let kind_of = |sc: u64| -> u8 {
            if zero >> sc & 1 != 0 {
                0
            } else if alloc >> sc & 1 != 0 {
                1
            } else {
                2
            }
        };
        let kind = kind_of(first);
        let mut end = first + 1;
        while end < u64::from(SUBCLUSTERS) && kind_of(end) == kind {
            end += 1;
        }
        let len = (end << sc_bits) - in_cluster;
        let mapping = match kind {
            0 => Mapping::Zero,
            1 => Mapping::Host(offset + in_cluster),
            _ => Mapping::Unallocated,
        };
        Ok((mapping, len))
    }
}

/// Big-endian words of a table read from the image.
pub(super) fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// L2 tables by host offset, at most `capacity` of them; the oldest loaded is
/// dropped first (imports walk the disk in order, so older tables are done with).
#[derive(Debug)]
pub(super) struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl L2Cache {
    /// A cache holding at most `max_bytes` of tables of `table_bytes` each (and
    /// always at least one).
    pub(super) fn new(max_bytes: u64, table_bytes: u64) -> L2Cache {
        let capacity = usize::try_from(max_bytes / table_bytes.max(1))
            .unwrap_or(usize::MAX)
            .max(1);
        L2Cache {
            tables: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(super) fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        self.tables.get(&offset).cloned()
    }

    pub(super) fn insert(&mut self, offset: u64, table: Arc<[u64]>) {
        while self.tables.len() >= self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.tables.remove(&old);
        }
        if self.tables.insert(offset, table).is_none() {
            self.order.push_back(offset);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Layout = Layout {
        cluster_bits: 16,
        extended_l2: false,
        external_data: false,
    };
    const EXT: Layout = Layout {
        cluster_bits: 17,
        extended_l2: true,
        external_data: false,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(
            STD.classify(0, 0, 0).unwrap(),
            (Mapping::Unallocated, 65536)
        );
        assert_eq!(
            STD.classify(OFLAG_COPIED | 0x5_0000, 0, 100).unwrap(),
            (Mapping::Host(0x5_0000 + 100), 65436)
        );
        assert_eq!(STD.classify(1, 0, 0).unwrap().0, Mapping::Zero);
        assert_eq!(STD.classify(0x5_0000 | 1, 0, 0).unwrap().0, Mapping::Zero);
        assert!(STD.classify(0x5_0200, 0, 0).is_err());
        let c = OFLAG_COMPRESSED | 0x1234;
        assert_eq!(
            STD.classify(c, 0, 512).unwrap(),
            (Mapping::Compressed(c), 65024)
        );
    }

    #[test]
    fn external_data_offset_zero() {
        let ext = Layout {
            external_data: true,
            ..STD
        };
        assert_eq!(
            ext.classify(OFLAG_COPIED, 0, 0).unwrap().0,
            Mapping::Host(0)
        );
        assert_eq!(ext.classify(0, 0, 0).unwrap().0, Mapping::Unallocated);
        assert!(ext.classify(OFLAG_COMPRESSED | 5, 0, 0).is_err());
    }

    #[test]
    fn subcluster_runs() {
        // 128 KiB clusters: 4 KiB subclusters. 0-3 allocated, 4-5 zero, rest not.
        let bitmap = 0b1111 | (0b11_0000u64 << 32);
        let e = 0x10_0000;
        assert_eq!(
            EXT.classify(e, bitmap, 0).unwrap(),
            (Mapping::Host(e), 16384)
        );
        assert_eq!(
            EXT.classify(e, bitmap, 5000).unwrap(),
            (Mapping::Host(e + 5000), 16384 - 5000)
        );
        assert_eq!(
            EXT.classify(e, bitmap, 16384).unwrap(),
            (Mapping::Zero, 8192)
        );
        assert_eq!(
            EXT.classify(e, bitmap, 24576).unwrap(),
            (Mapping::Unallocated, 131072 - 24576)
        );
        // Zero subclusters without a host cluster.
        assert_eq!(EXT.classify(0, 1 << 32, 0).unwrap(), (Mapping::Zero, 4096));
        // Bit 0 is not the zero flag with extended L2.
        assert_eq!(EXT.classify(1, 0, 0).unwrap().0, Mapping::Unallocated);
        assert!(EXT.classify(e, 1 | 1 << 32, 0).is_err());
        assert!(EXT.classify(0, 1, 0).is_err());
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = L2Cache::new(3 * 4096, 4096);
        for i in 0..10u64 {
            cache.insert(i * 4096, Arc::from(vec![i; 512]));
            assert!(cache.len() <= 3);
        }
        assert!(cache.get(0).is_none());
        assert_eq!(cache.get(9 * 4096).unwrap()[0], 9);
        let mut tiny = L2Cache::new(0, 4096);
        tiny.insert(0, Arc::from(vec![0; 512]));
        assert_eq!(tiny.len(), 1);
    }

    #[test]
    fn decodes_big_endian_words() {
        assert_eq!(decode_table(&[0, 0, 0, 0, 0, 0, 1, 2, 9]), vec![0x102]);
    }
}
