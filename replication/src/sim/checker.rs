//! Checkers over the whole simulated cluster (design/DURABILITY.md, S1): they see every
//! write as it leaves a writer, every completion, and the replicas' stores.
//!
//! - reads: a read returns the last write acknowledged before it started, or a write
//!   concurrent with it (issued and not superseded by an acknowledged one), byte for
//!   byte; never a fenced writer's write;
//! - durability: every block covered by a completed FLUSH or FUA keeps that version or a
//!   newer one (reads, and every copy at the end);
//! - the acknowledgement rule: a write is acknowledged only after at least 2 copies
//!   applied it; a fenced writer acknowledges nothing it sent after the new writer
//!   attached;
//! - convergence: after healing and a final reconciliation every copy holds the same
//!   versions, and nothing a fenced writer sent.
//!
//! Acknowledged writes that were never flushed may be lost when every in-sync copy that
//! held them crashed (the contract allows it): [`Checker::relax`] lowers the floor of
//! that block to its durable floor.

use std::collections::BTreeMap;

use crate::types::{BlockIndex, BlockVersion, Seq};
use crate::writer::{IoError, OpId, OpOutput};

#[derive(Debug, Default, Clone, Copy)]
struct BlockHistory {
    /// Highest acknowledged seq (lowered only by [`Checker::relax`]).
    acked: Seq,
    /// Highest seq covered by a completed flush or FUA.
    durable: Seq,
}

#[derive(Debug)]
struct WriteInfo {
    block: BlockIndex,
    version: BlockVersion,
    /// Sent by a writer after a newer writer finished attaching.
    stale: bool,
}

#[derive(Debug)]
enum Submitted {
    Write,
    /// Floors when the read started: later writes are concurrent with it.
    Read {
        block: BlockIndex,
        floor: Seq,
        durable: Seq,
    },
    Flush {
        snapshot: BTreeMap<BlockIndex, Seq>,
    },
}

/// The history of one run and what went wrong in it.
#[derive(Debug, Default)]
pub struct Checker {
    blocks: BTreeMap<BlockIndex, BlockHistory>,
    writes: BTreeMap<Seq, WriteInfo>,
    submitted: BTreeMap<(usize, OpId), Submitted>,
    /// Highest seq each writer acknowledged per block: what its flushes cover.
    acked_by: BTreeMap<(usize, BlockIndex), Seq>,
    pub violations: Vec<String>,
    pub acked_writes: u64,
    pub reads_checked: u64,
    pub flushes: u64,
    pub eio: u64,
    pub fenced: u64,
}

impl Checker {
    fn block(&mut self, b: BlockIndex) -> &mut BlockHistory {
        self.blocks.entry(b).or_default()
    }

    pub fn violation(&mut self, now: u64, what: String) {
        self.violations.push(format!("t={now}ms: {what}"));
    }

    /// A write request left a writer (first time for this seq).
    pub fn on_write_sent(
        &mut self,
        now: u64,
        block: BlockIndex,
        version: &BlockVersion,
        stale: bool,
    ) {
        if let Some(w) = self.writes.get(&version.seq) {
            if w.block != block || w.version != *version {
                self.violation(
                    now,
                    format!("seq {} reused for another write (nonce reuse)", version.seq),
                );
            }
            return;
        }
        self.writes.insert(
            version.seq,
            WriteInfo {
                block,
                version: version.clone(),
                stale,
            },
        );
    }

    pub fn on_write_submitted(&mut self, writer: usize, op: OpId) {
        self.submitted.insert((writer, op), Submitted::Write);
    }

    pub fn on_read_submitted(&mut self, writer: usize, op: OpId, block: BlockIndex) {
        let h = *self.block(block);
        self.submitted.insert(
            (writer, op),
            Submitted::Read {
                block,
                floor: h.acked,
                durable: h.durable,
            },
        );
    }

    /// A flush covers what its writer acknowledged before it was issued. (After a
    /// writer crash, the new attachment starts from the reconciled copies: unflushed
    /// writes of the old one are in the state of a power cut.)
    pub fn on_flush_submitted(&mut self, writer: usize, op: OpId) {
        let snapshot = self
            .acked_by
            .range((writer, BlockIndex(0))..=(writer, BlockIndex(u64::MAX)))
            .map(|((_, b), s)| (*b, *s))
            .collect();
        self.submitted
            .insert((writer, op), Submitted::Flush { snapshot });
    }

    /// A user operation completed. `copies_applied(seq)`: copies that processed it.
    pub fn on_complete(
        &mut self,
        now: u64,
        writer: usize,
        op: OpId,
        result: &Result<OpOutput, IoError>,
        fua: bool,
        copies_applied: impl Fn(Seq) -> usize,
    ) {
        let Some(sub) = self.submitted.remove(&(writer, op)) else {
            self.violation(now, format!("writer {writer} completed unknown op {op}"));
            return;
        };
        match (sub, result) {
            (_, Err(IoError::Eio)) => self.eio += 1,
            (_, Err(IoError::Fenced)) => self.fenced += 1,
            (Submitted::Write, Ok(OpOutput::Written { seq })) => {
                let Some(info) = self.writes.get(seq) else {
                    self.violation(
                        now,
                        format!("writer {writer} acknowledged seq {seq} it never sent"),
                    );
                    return;
                };
                let (block, stale) = (info.block, info.stale);
                if stale {
                    self.violation(
                        now,
                        format!(
                            "fenced writer {writer} acknowledged seq {seq} on block {}",
                            block.0
                        ),
                    );
                }
                let copies = copies_applied(*seq);
                if copies < 2 {
                    self.violation(
                        now,
                        format!(
                            "seq {seq} (block {}) acknowledged with {copies} copy applied",
                            block.0
                        ),
                    );
                }
                self.acked_writes += 1;
                let mine = self.acked_by.entry((writer, block)).or_default();
                *mine = (*mine).max(*seq);
                let h = self.block(block);
                h.acked = h.acked.max(*seq);
                if fua {
                    h.durable = h.durable.max(*seq);
                }
            }
            (Submitted::Flush { snapshot }, Ok(OpOutput::Flushed)) => {
                self.flushes += 1;
                for (b, s) in snapshot {
                    let h = self.block(b);
                    h.durable = h.durable.max(s);
                }
            }
            (
                Submitted::Read {
                    block,
                    floor,
                    durable,
                },
                Ok(OpOutput::Read { version }),
            ) => {
                self.reads_checked += 1;
                let h = *self.block(block);
                let floor = floor.min(h.acked);
                let what = format!("read of block {} by writer {writer}", block.0);
                self.check_version(now, &what, block, version.as_ref(), floor, durable);
            }
            (sub, r) => self.violation(
                now,
                format!("op {op} of writer {writer}: {sub:?} completed with {r:?}"),
            ),
        }
    }

    /// Checks one version found for `block` against the history: a known write of this
    /// block, byte for byte, not fenced, not older than `floor` nor the durable floor.
    fn check_version(
        &mut self,
        now: u64,
        what: &str,
        block: BlockIndex,
        version: Option<&BlockVersion>,
        floor: Seq,
        durable: Seq,
    ) {
        let seq = version.map_or(Seq::ZERO, |v| v.seq);
        if seq < durable {
            self.violation(
                now,
                format!(
                    "{what}: seq {seq} is older than the flushed seq {durable} (durable write lost)"
                ),
            );
        } else if seq < floor {
            self.violation(
                now,
                format!(
                    "{what}: seq {seq} is older than the acknowledged seq {floor} (stale read)"
                ),
            );
        }
        let Some(v) = version else {
            return;
        };
        match self.writes.get(&v.seq) {
            None => self.violation(now, format!("{what}: seq {} was never written", v.seq)),
            Some(w) if w.block != block => {
                self.violation(
                    now,
                    format!("{what}: returned block {}'s seq {}", w.block.0, v.seq),
                );
            }
            Some(w) if w.version != *v => self.violation(
                now,
                format!("{what}: seq {} content differs (corruption passed)", v.seq),
            ),
            Some(w) if w.stale => self.violation(
                now,
                format!("{what}: seq {} from a fenced writer is visible", v.seq),
            ),
            Some(_) => {}
        }
    }

    /// An acknowledged, unflushed write of `block` was lost with every copy that held it.
    pub fn relax(&mut self, block: BlockIndex) {
        let h = self.block(block);
        h.acked = h.durable;
        let durable = h.durable;
        for ((_, b), s) in self.acked_by.iter_mut() {
            if *b == block {
                *s = (*s).min(durable);
            }
        }
    }

    /// Highest acknowledged seq of each block (for the loss analysis at crashes).
    pub fn acked_above_durable(&self) -> Vec<(BlockIndex, Seq)> {
        self.blocks
            .iter()
            .filter(|(_, h)| h.acked > h.durable)
            .map(|(b, h)| (*b, h.acked))
            .collect()
    }

    /// The end: every copy holds the same version of every block, a valid one (or one
    /// whose corruption its checksum reveals), and every version passes the read rules.
    pub fn check_final(
        &mut self,
        now: u64,
        copies: &[&BTreeMap<BlockIndex, BlockVersion>],
        blocks: u64,
    ) {
        for b in (0..blocks).map(BlockIndex) {
            let versions: Vec<Option<&BlockVersion>> = copies.iter().map(|c| c.get(&b)).collect();
            let seqs: Vec<Option<Seq>> = versions.iter().map(|v| v.map(|v| v.seq)).collect();
            if seqs.windows(2).any(|w| w[0] != w[1]) {
                let shown: Vec<String> = seqs
                    .iter()
                    .map(|s| s.map_or("-".into(), |s| s.to_string()))
                    .collect();
                self.violation(
                    now,
                    format!("copies diverge on block {}: {}", b.0, shown.join(" / ")),
                );
            }
            let h = *self.block(b);
            for (i, v) in versions.iter().enumerate() {
                if v.is_some_and(|v| !v.verify(b)) {
                    continue; // a disk fault, caught by its checksum on read
                }
                self.check_version(
                    now,
                    &format!("final copy {i} of block {}", b.0),
                    b,
                    *v,
                    h.acked,
                    h.durable,
                );
            }
        }
    }
}
