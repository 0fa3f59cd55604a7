//! The vocabulary of replication: epochs, sequence numbers, replicas, blocks, block
//! versions, the metadata-store record of a volume, and the rule that decides whether a
//! store takes a block version (executed atomically by the store, defined here once).

use std::fmt;

/// Number of copies of a `replicated` volume.
pub const REPLICAS: usize = 3;

/// Fewest copies a write may be acknowledged on.
pub const MIN_COPIES: usize = 2;

/// Bits of a [`Seq`] below the epoch.
pub const SEQ_COUNTER_BITS: u32 = 40;

/// Highest epoch a volume can reach: the epoch must fit above the counter in a `Seq`.
pub const MAX_EPOCH: u32 = (1 << (64 - SEQ_COUNTER_BITS)) - 1;

/// A writer generation of a volume, granted by compare-and-swap in the metadata store.
/// Replicas refuse requests with an epoch older than the highest they persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch after this one, or `None` when the volume ran out of epochs.
    pub fn next(self) -> Option<Epoch> {
        (self.0 < MAX_EPOCH).then_some(Epoch(self.0 + 1))
    }

    /// The first sequence number of this epoch: every seq a writer of this epoch hands
    /// out is above it, and below the base of the next epoch.
    pub fn base(self) -> Seq {
        Seq(u64::from(self.0) << SEQ_COUNTER_BITS)
    }
}

/// The version of a block write, unique per volume: also the AES-GCM nonce of the block.
///
/// Why a seq never repeats for a volume, across writers and restarts: the high 24 bits
/// are the writer's epoch, and an epoch is granted to exactly one writer by a
/// compare-and-swap in the metadata store that only ever increases it; a writer never
/// reuses an epoch after a restart (attaching always takes a new one); within its epoch a
/// writer hands out seqs from an in-memory counter that only increases and fails
/// (instead of wrapping) when the 40-bit counter is exhausted. Two writers therefore
/// never share a high part, and one writer never repeats a low part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// "Nothing": below every real write.
    pub const ZERO: Seq = Seq(0);

    /// The epoch of the writer that issued this seq.
    pub fn epoch(self) -> Epoch {
        // The shift leaves at most 64 - SEQ_COUNTER_BITS = 24 bits.
        Epoch(u32::try_from(self.0 >> SEQ_COUNTER_BITS).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.epoch().0,
            self.0 & ((1 << SEQ_COUNTER_BITS) - 1)
        )
    }
}

/// One of the three copies of a volume (0, 1 or 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub u8);

impl ReplicaId {
    /// All copies of a volume.
    pub fn all() -> impl Iterator<Item = ReplicaId> {
        (0..REPLICAS).map(|i| ReplicaId(u8::try_from(i).unwrap_or(u8::MAX)))
    }

    /// Position in per-replica arrays.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A 4 KiB block of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

/// Opaque block payload (ciphertext) with a checksum that binds it to its block and
/// version, so a block moved, replayed or altered fails verification. (The engine's
/// AES-GCM tag binds the same fields; the checksum lets replicas and scrubbers check
/// without keys.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub bytes: Vec<u8>,
    pub checksum: u32,
}

impl Payload {
    /// Seals `bytes` as the content of `block` at version `seq`.
    pub fn seal(block: BlockIndex, seq: Seq, bytes: Vec<u8>) -> Payload {
        let checksum = checksum(block, seq, &bytes);
        Payload { bytes, checksum }
    }

    /// Whether these bytes are intact and belong to `block` at version `seq`.
    pub fn verify(&self, block: BlockIndex, seq: Seq) -> bool {
        checksum(block, seq, &self.bytes) == self.checksum
    }
}

fn checksum(block: BlockIndex, seq: Seq, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block.0.to_le_bytes());
    h.update(&seq.0.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// What a block version holds: data, or a trim tombstone (reads back as zeros). Trims
/// are versions so that ordering by seq covers them too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Data(Payload),
    Trim,
}

/// One version of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockVersion {
    pub seq: Seq,
    pub content: Content,
}

impl BlockVersion {
    /// Whether this version is intact for `block` (tombstones always are).
    pub fn verify(&self, block: BlockIndex) -> bool {
        match &self.content {
            Content::Data(p) => p.verify(block, self.seq),
            Content::Trim => true,
        }
    }
}

/// How a store takes a block version. The store evaluates [`ApplyRule::admits`]
/// atomically against what it holds for the block (its index), so the rule needs no
/// in-memory copy of the index in the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyRule {
    /// A normal write: only a newer version replaces the stored one, so reordering on
    /// the network cannot resurrect old data.
    IfNewer,
    /// Read-repair: the version came from a verified copy; it replaces a stored version
    /// that is not newer (same seq included: the stored bytes failed verification).
    Repair,
    /// Resync and reconciliation: the chosen version of the in-sync copies replaces
    /// anything stored that predates the job (`seq <= keep_from`: suspect, it may come
    /// from a fenced writer or a failed write), but never a newer write sent directly by
    /// the current writer during the job.
    Install { keep_from: Seq },
}

impl ApplyRule {
    /// Whether `new` (or a removal, `None`) replaces `stored` for `block`.
    pub fn admits(
        self,
        block: BlockIndex,
        stored: Option<&BlockVersion>,
        new: Option<&BlockVersion>,
    ) -> bool {
        let stored_seq = stored.map_or(Seq::ZERO, |v| v.seq);
        let new_seq = new.map_or(Seq::ZERO, |v| v.seq);
        match self {
            ApplyRule::IfNewer => new_seq > stored_seq,
            ApplyRule::Repair => {
                new_seq > stored_seq
                    || (new_seq == stored_seq && stored.is_some_and(|v| !v.verify(block)))
            }
            ApplyRule::Install { keep_from } => stored_seq <= keep_from || new_seq > stored_seq,
        }
    }
}

/// The metadata-store record of a volume: changed only by compare-and-swap on `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Current writer generation.
    pub epoch: Epoch,
    /// Node of the writer that holds `epoch`.
    pub writer: u32,
    /// Copies that hold every acknowledged write.
    pub in_sync: [bool; REPLICAS],
    /// For an out-of-sync copy: the seq up to which its content is known to agree with
    /// the volume's history (its own watermark may be higher if a fenced writer kept
    /// writing to it); `u64::MAX` when its own watermark is trusted.
    pub trusted: [Seq; REPLICAS],
}

impl VolumeMeta {
    /// A new volume: epoch 0 (no writer yet), all copies in sync.
    pub fn new() -> VolumeMeta {
        VolumeMeta {
            epoch: Epoch(0),
            writer: 0,
            in_sync: [true; REPLICAS],
            trusted: [Seq(u64::MAX); REPLICAS],
        }
    }

    /// Number of in-sync copies.
    pub fn in_sync_count(&self) -> usize {
        self.in_sync.iter().filter(|x| **x).count()
    }
}

impl Default for VolumeMeta {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_of_later_epochs_are_higher() {
        let a = Seq(Epoch(3).base().0 + (1 << 39));
        let b = Seq(Epoch(4).base().0 + 1);
        assert!(a < b);
        assert_eq!(a.epoch(), Epoch(3));
        assert_eq!(b.epoch(), Epoch(4));
        assert_eq!(Epoch(MAX_EPOCH).next(), None);
    }

    #[test]
    fn apply_rules() {
        let b = BlockIndex(7);
        let v = |s: u64| BlockVersion {
            seq: Seq(s),
            content: Content::Data(Payload::seal(b, Seq(s), vec![1, 2])),
        };
        assert!(ApplyRule::IfNewer.admits(b, Some(&v(1)), Some(&v(2))));
        assert!(!ApplyRule::IfNewer.admits(b, Some(&v(2)), Some(&v(2))));
        assert!(!ApplyRule::IfNewer.admits(b, Some(&v(3)), Some(&v(2))));
        let mut bad = v(2);
        if let Content::Data(p) = &mut bad.content {
            p.bytes[0] ^= 1;
        }
        assert!(ApplyRule::Repair.admits(b, Some(&bad), Some(&v(2))));
        assert!(!ApplyRule::Repair.admits(b, Some(&v(2)), Some(&v(2))));
        assert!(ApplyRule::Install { keep_from: Seq(5) }.admits(b, Some(&v(4)), None));
        assert!(!ApplyRule::Install { keep_from: Seq(5) }.admits(b, Some(&v(6)), Some(&v(5))));
    }
}
