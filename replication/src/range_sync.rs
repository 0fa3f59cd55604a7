//! A range-by-range sync job: makes target copies agree with the chosen version of the
//! source copies, for every block changed since a sequence number. It serves both the
//! resync of a returning copy (sources: the in-sync copies; targets: those plus the
//! returning one) and the reconciliation at attach (sources = targets = the reachable
//! in-sync copies). Sparse (only changed blocks travel) and resumable (range by range).
//!
//! Per range: scan every participant for blocks above `since`; if a block of interest is
//! missing from a source's list (it is older there, or absent), rescan the sources from
//! zero ("deep") so every source's version of those blocks is known; choose, per block,
//! the highest-seq version that verifies (ignoring corrupt copies; none when a source
//! has no version and no valid one exists); install it on every target that differs.

use std::collections::{BTreeMap, BTreeSet};

use crate::msg::{ReplyBody, RequestBody};
use crate::types::{BlockIndex, BlockVersion, ReplicaId, Seq};

/// What a job asks the writer to send.
pub(crate) type Send = (ReplicaId, RequestBody);

#[derive(Debug)]
enum Phase {
    Scanning {
        deep: bool,
        waiting: BTreeSet<ReplicaId>,
    },
    Installing {
        waiting: usize,
    },
    Done,
}

#[derive(Debug)]
pub(crate) struct RangeSync {
    pub sources: Vec<ReplicaId>,
    pub targets: Vec<ReplicaId>,
    since: Seq,
    keep_from: Seq,
    range_len: u64,
    end: u64,
    cursor: u64,
    phase: Phase,
    lists: BTreeMap<ReplicaId, BTreeMap<BlockIndex, BlockVersion>>,
    /// A block had no verifiable copy of its newest version: it was copied as it is.
    pub incomplete: bool,
}

impl RangeSync {
    /// A job over blocks `[0, end)`; `range_len` blocks per round.
    pub fn new(
        sources: Vec<ReplicaId>,
        targets: Vec<ReplicaId>,
        since: Seq,
        keep_from: Seq,
        range_len: u64,
        end: u64,
    ) -> RangeSync {
        assert!(!sources.is_empty());
        assert!(range_len > 0 && range_len <= u64::from(crate::msg::MAX_SCAN_ENTRIES));
        RangeSync {
            sources,
            targets,
            since,
            keep_from,
            range_len,
            end,
            cursor: 0,
            phase: Phase::Done,
            lists: BTreeMap::new(),
            incomplete: false,
        }
    }

    pub fn involves(&self, r: ReplicaId) -> bool {
        self.sources.contains(&r) || self.targets.contains(&r)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.cursor >= self.end
    }

    fn participants(&self) -> BTreeSet<ReplicaId> {
        self.sources
            .iter()
            .chain(self.targets.iter())
            .copied()
            .collect()
    }

    fn scan(&self, since: Seq) -> RequestBody {
        let end = (self.cursor + self.range_len).min(self.end);
        RequestBody::Scan {
            since,
            start: BlockIndex(self.cursor),
            end: BlockIndex(end),
            // range_len <= MAX_SCAN_ENTRIES (asserted in new), so one page covers a range.
            limit: u32::try_from(self.range_len).unwrap_or(crate::msg::MAX_SCAN_ENTRIES),
        }
    }

    /// Starts the next range (or the first). Returns what to send.
    pub fn start(&mut self) -> Vec<Send> {
        if self.cursor >= self.end {
            self.phase = Phase::Done;
            return Vec::new();
        }
        self.lists.clear();
        let waiting = self.participants();
        let body = self.scan(self.since);
        let sends = waiting.iter().map(|r| (*r, body.clone())).collect();
        self.phase = Phase::Scanning {
            deep: false,
            waiting,
        };
        sends
    }

    /// A scan reply from `from`.
    pub fn on_scanned(
        &mut self,
        from: ReplicaId,
        entries: Vec<(BlockIndex, BlockVersion)>,
    ) -> Vec<Send> {
        let Phase::Scanning { deep, waiting } = &mut self.phase else {
            return Vec::new();
        };
        if !waiting.remove(&from) {
            return Vec::new();
        }
        let start = self.cursor;
        let end = (self.cursor + self.range_len).min(self.end);
        // Check just after receiving: a scan reply stays inside the range it was asked.
        let list: BTreeMap<_, _> = entries
            .into_iter()
            .filter(|(b, _)| b.0 >= start && b.0 < end)
            .collect();
        self.lists.insert(from, list);
        if !waiting.is_empty() {
            return Vec::new();
        }
        let deep = *deep;
        let interest: BTreeSet<BlockIndex> = self
            .lists
            .values()
            .flat_map(|l| l.keys().copied())
            .collect();
        if !deep && self.since > Seq::ZERO {
            let missing = interest
                .iter()
                .any(|b| self.sources.iter().any(|s| !self.lists[s].contains_key(b)));
            if missing {
                let waiting = self.participants();
                let body = self.scan(Seq::ZERO);
                let sends = waiting.iter().map(|r| (*r, body.clone())).collect();
                self.phase = Phase::Scanning {
                    deep: true,
                    waiting,
                };
                return sends;
            }
        }
        // Every source's version of every block of interest is now known (listed, or
        // older than `since` and equal to the others', or absent after a deep scan).
        let deep = deep || self.since == Seq::ZERO;
        let mut sends = Vec::new();
        for b in interest {
            let mut best: Option<&BlockVersion> = None;
            let mut any_absent = false;
            let mut corrupt_seq = None;
            for s in &self.sources {
                match self.lists[s].get(&b) {
                    Some(v) if v.verify(b) => {
                        if best.is_none_or(|x| v.seq > x.seq) {
                            best = Some(v);
                        }
                    }
                    Some(v) => corrupt_seq = corrupt_seq.max(Some(v.seq)),
                    None => any_absent = true,
                }
            }
            if best.is_none() {
                // Only a corrupt source copy: any participant's intact copy of the same
                // seq is the same write (the checksum binds block and seq).
                best = corrupt_seq.and_then(|seq| {
                    self.lists
                        .values()
                        .filter_map(|l| l.get(&b))
                        .find(|v| v.seq == seq && v.verify(b))
                });
            }
            let corrupt = || {
                // Only corrupt copies of the newest version: spread it as it is, so every
                // copy fails verification on read (EIO) instead of serving older data.
                self.sources
                    .iter()
                    .filter_map(|s| self.lists[s].get(&b))
                    .max_by_key(|v| v.seq)
            };
            let chosen = match best {
                Some(v) => Some(v.clone()),
                None if corrupt_seq.is_some() => {
                    self.incomplete = true;
                    corrupt().cloned()
                }
                None if any_absent && deep => None,
                None => continue,
            };
            for t in &self.targets {
                let theirs = self.lists[t].get(&b);
                let differs = match (theirs, &chosen) {
                    (Some(v), Some(c)) => v != c || (!v.verify(b) && c.verify(b)),
                    (Some(_), None) => true,
                    // Unlisted: older than `since` on this target, where it agrees with
                    // the history; only a newer chosen version must travel.
                    (None, Some(c)) => c.seq > self.since,
                    (None, None) => false,
                };
                if differs {
                    sends.push((
                        *t,
                        RequestBody::Install {
                            block: b,
                            version: chosen.clone(),
                            keep_from: self.keep_from,
                        },
                    ));
                }
            }
        }
        self.cursor = end;
        if sends.is_empty() {
            let next = self.start();
            return next;
        }
        self.phase = Phase::Installing {
            waiting: sends.len(),
        };
        sends
    }

    /// One install acknowledged.
    pub fn on_installed(&mut self) -> Vec<Send> {
        let Phase::Installing { waiting } = &mut self.phase else {
            return Vec::new();
        };
        *waiting -= 1;
        if *waiting > 0 {
            return Vec::new();
        }
        self.start()
    }

    /// Routes a reply to the job.
    pub fn on_reply(&mut self, from: ReplicaId, body: ReplyBody) -> Vec<Send> {
        match body {
            ReplyBody::Scanned { entries, .. } => self.on_scanned(from, entries),
            ReplyBody::Applied => self.on_installed(),
            _ => Vec::new(),
        }
    }
}
