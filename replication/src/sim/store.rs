//! In-memory block store of one simulated replica. It keeps "written" apart from
//! "durable": applied operations are visible at once but durable only after a sync; a
//! crash keeps or drops each unsynced operation at random (per block, never torn). Disk
//! faults flip bits in a stored payload, which the checksum then catches.

use std::collections::{BTreeMap, BTreeSet};

use super::rng::Rng;
use crate::replica::{Recovered, StoreOp, StoreResult};
use crate::types::{BlockIndex, BlockVersion, Content, Epoch, Seq};

/// One replica's disk.
#[derive(Debug, Default)]
pub struct MemStore {
    /// What reads see.
    pub live: BTreeMap<BlockIndex, BlockVersion>,
    /// What survives a crash for sure.
    pub durable: BTreeMap<BlockIndex, BlockVersion>,
    /// Applied since the last sync, in order: block and new value (`None`: removed).
    unsynced: Vec<(BlockIndex, Option<BlockVersion>)>,
    pub durable_epoch: Epoch,
    pub durable_watermark: Seq,
    /// Write seqs this store ever processed (taken or superseded by a newer version):
    /// the checker counts copies behind each acknowledgement with it.
    pub seen_writes: BTreeSet<Seq>,
}

impl MemStore {
    /// Executes one operation.
    pub fn execute(&mut self, op: &StoreOp) -> StoreResult {
        match op {
            StoreOp::Apply {
                block,
                version,
                rule,
            } => {
                let stored = self.live.get(block);
                if let (crate::types::ApplyRule::IfNewer, Some(v)) = (rule, version) {
                    self.seen_writes.insert(v.seq);
                }
                let taken = rule.admits(*block, stored, version.as_ref());
                if taken {
                    match version {
                        Some(v) => self.live.insert(*block, v.clone()),
                        None => self.live.remove(block),
                    };
                    self.unsynced.push((*block, version.clone()));
                }
                StoreResult::Applied { taken }
            }
            StoreOp::Sync { watermark } => {
                // Everything applied before the sync is on the disk now.
                self.unsynced.clear();
                self.durable = self.live.clone();
                self.durable_watermark = self.durable_watermark.max(*watermark);
                StoreResult::Synced
            }
            StoreOp::PersistEpoch { epoch } => {
                self.durable_epoch = self.durable_epoch.max(*epoch);
                StoreResult::EpochPersisted
            }
            StoreOp::Read { block } => StoreResult::Read(self.live.get(block).cloned()),
            StoreOp::Scan {
                since,
                start,
                end,
                limit,
            } => {
                let mut entries = Vec::new();
                let mut next = None;
                for (b, v) in self.live.range(*start..*end) {
                    if v.seq <= *since {
                        continue;
                    }
                    if entries.len() >= usize::try_from(*limit).unwrap_or(usize::MAX) {
                        next = Some(*b);
                        break;
                    }
                    entries.push((*b, v.clone()));
                }
                StoreResult::Scanned { entries, next }
            }
        }
    }

    /// Power loss: each unsynced operation is kept or dropped at random, in order.
    pub fn crash(&mut self, rng: &mut Rng) -> Recovered {
        let mut state = self.durable.clone();
        for (b, v) in self.unsynced.drain(..) {
            if rng.chance(0.5) {
                match v {
                    Some(v) => state.insert(b, v),
                    None => state.remove(&b),
                };
            }
        }
        self.live = state.clone();
        self.durable = state;
        Recovered {
            epoch: self.durable_epoch,
            watermark: self.durable_watermark,
        }
    }

    /// Flips one bit of the stored payload of `block` (and of its durable image when
    /// that is the same version: one place on the disk).
    pub fn corrupt(&mut self, block: BlockIndex, bit: u64) -> bool {
        let Some(BlockVersion {
            seq,
            content: Content::Data(p),
        }) = self.live.get_mut(&block)
        else {
            return false;
        };
        if p.bytes.is_empty() {
            return false;
        }
        let len = u64::try_from(p.bytes.len()).unwrap_or(1);
        let i = usize::try_from(bit / 8 % len).unwrap_or(0);
        p.bytes[i] ^= 1 << (bit % 8);
        let (seq, bytes) = (*seq, p.bytes.clone());
        if let Some(BlockVersion {
            seq: s,
            content: Content::Data(d),
        }) = self.durable.get_mut(&block)
            && *s == seq
        {
            d.bytes = bytes;
        }
        true
    }

    /// Whether the stored copy of `block` fails verification.
    pub fn is_corrupt(&self, block: BlockIndex) -> bool {
        self.live.get(&block).is_some_and(|v| !v.verify(block))
            || self.durable.get(&block).is_some_and(|v| !v.verify(block))
    }
}
