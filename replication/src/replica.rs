//! The storage-node side of one volume copy, sans-I/O.
//!
//! Events in ([`ReplicaEvent`]): requests from writers, completions of store operations.
//! Actions out ([`ReplicaAction`]): replies, store operations. The store is the
//! durable block store (rocksdb index + data files in production, an in-memory model in
//! the simulator). Its contract: operations complete in the order they were issued; an
//! `Apply` evaluates [`ApplyRule::admits`] and updates its index atomically; a `Sync`
//! makes everything applied before it durable, together with the watermark it carries;
//! `PersistEpoch` is durable when it completes.
//!
//! Invariants kept here:
//! - the epoch only grows, is persisted before any request of that epoch is served, and
//!   requests of older epochs get [`ReplyBody::Fenced`] with the current one;
//! - a write is acknowledged only after the store reports it applied (or superseded);
//!   FUA and FLUSH only after a store sync;
//! - the watermark `W` is a proof: every write the writer issued with seq `<= W` is
//!   applied here (the writer chains each write to the one issued before it), or the
//!   writer vouched for it after a resync.

use std::collections::{BTreeMap, VecDeque};

use crate::msg::{ANY_INCARNATION, MAX_SCAN_ENTRIES, Reply, ReplyBody, Request, RequestBody};
use crate::types::{ApplyRule, BlockIndex, BlockVersion, Epoch, ReplicaId, Seq};

/// Most store operations in flight; requests beyond it are dropped (the writer retries).
pub const MAX_PENDING: usize = 1024;
/// Most requests parked while a new epoch is being persisted.
pub const MAX_PARKED: usize = 256;
/// Most out-of-order links kept for the watermark chain; beyond it the watermark stalls,
/// which is safe (a later resync copies more).
pub const MAX_CHAIN: usize = 4096;

/// Who sent a request: an opaque handle of the transport, echoed in [`ReplicaAction::Send`].
pub type Peer = u32;

/// An operation on the block store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Set a block to `version` (`None`: remove) if `rule` admits it.
    Apply {
        block: BlockIndex,
        version: Option<BlockVersion>,
        rule: ApplyRule,
    },
    /// Make all applied operations durable, and record `watermark` durably with them.
    Sync {
        watermark: Seq,
    },
    /// Durably record the highest epoch seen.
    PersistEpoch {
        epoch: Epoch,
    },
    Read {
        block: BlockIndex,
    },
    /// Stored versions in `[start, end)` with seq above `since`, at most `limit`.
    Scan {
        since: Seq,
        start: BlockIndex,
        end: BlockIndex,
        limit: u32,
    },
}

/// The outcome of a store operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreResult {
    /// Apply done; `taken` says whether the rule admitted the version.
    Applied {
        taken: bool,
    },
    Synced,
    EpochPersisted,
    Read(Option<BlockVersion>),
    /// `next`: where to resume when `limit` stopped the scan.
    Scanned {
        entries: Vec<(BlockIndex, BlockVersion)>,
        next: Option<BlockIndex>,
    },
}

/// What happens to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    Request { from: Peer, request: Request },
    StoreDone { token: u64, result: StoreResult },
}

/// What a replica asks its host to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAction {
    Send { to: Peer, reply: Reply },
    Store { token: u64, op: StoreOp },
}

/// What a replica finds durable on its store when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    pub epoch: Epoch,
    pub watermark: Seq,
}

#[derive(Debug)]
enum Pending {
    Write {
        from: Peer,
        op: u64,
        seq: Seq,
        prev: Seq,
        fua: bool,
    },
    /// The sync of a FUA write: reply when done.
    Reply {
        from: Peer,
        op: u64,
        body: ReplyBody,
    },
    Read {
        from: Peer,
        op: u64,
    },
    Scan {
        from: Peer,
        op: u64,
    },
    Epoch {
        epoch: Epoch,
    },
}

/// One copy of one volume.
#[derive(Debug)]
pub struct Replica {
    id: ReplicaId,
    incarnation: u64,
    /// Highest epoch persisted.
    epoch: Epoch,
    /// An epoch being persisted, and the requests that wait for it.
    persisting: Option<Epoch>,
    parked: VecDeque<(Peer, Request)>,
    watermark: Seq,
    /// Applied writes above the watermark: prev -> seq.
    chain: BTreeMap<Seq, Seq>,
    pending: BTreeMap<u64, Pending>,
    next_token: u64,
}

impl Replica {
    /// Starts a copy from what its store holds durably. `incarnation` must differ from
    /// every earlier start of this copy (a persisted boot counter), and is never
    /// [`ANY_INCARNATION`].
    pub fn new(id: ReplicaId, incarnation: u64, recovered: Recovered) -> Replica {
        assert_ne!(incarnation, ANY_INCARNATION);
        Replica {
            id,
            incarnation,
            epoch: recovered.epoch,
            persisting: None,
            parked: VecDeque::new(),
            watermark: recovered.watermark,
            chain: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_token: 1,
        }
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn watermark(&self) -> Seq {
        self.watermark
    }

    /// Handles one event; returns what to do.
    pub fn handle(&mut self, event: ReplicaEvent) -> Vec<ReplicaAction> {
        let mut out = Vec::new();
        match event {
            ReplicaEvent::Request { from, request } => self.on_request(from, request, &mut out),
            ReplicaEvent::StoreDone { token, result } => {
                self.on_store_done(token, result, &mut out)
            }
        }
        out
    }

    fn reply(&self, to: Peer, op: u64, body: ReplyBody, out: &mut Vec<ReplicaAction>) {
        out.push(ReplicaAction::Send {
            to,
            reply: Reply {
                op,
                incarnation: self.incarnation,
                body,
            },
        });
    }

    fn store(&mut self, pending: Pending, op: StoreOp, out: &mut Vec<ReplicaAction>) {
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, pending);
        out.push(ReplicaAction::Store { token, op });
    }

    fn on_request(&mut self, from: Peer, req: Request, out: &mut Vec<ReplicaAction>) {
        if req.epoch < self.epoch {
            self.reply(from, req.op, ReplyBody::Fenced { epoch: self.epoch }, out);
            return;
        }
        if req.incarnation != ANY_INCARNATION && req.incarnation != self.incarnation {
            self.reply(from, req.op, ReplyBody::Restarted, out);
            return;
        }
        if req.epoch > self.epoch {
            // Persist the new epoch before serving it, so a restart cannot forget that
            // older writers are fenced.
            if self.parked.len() < MAX_PARKED {
                self.parked.push_back((from, req.clone()));
            }
            if self.persisting.is_none_or(|e| e < req.epoch) && self.pending.len() < MAX_PENDING {
                self.persisting = Some(req.epoch);
                self.store(
                    Pending::Epoch { epoch: req.epoch },
                    StoreOp::PersistEpoch { epoch: req.epoch },
                    out,
                );
            }
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            return;
        }
        let op = req.op;
        match req.body {
            RequestBody::Status => {
                self.reply(
                    from,
                    op,
                    ReplyBody::Status {
                        epoch: self.epoch,
                        watermark: self.watermark,
                    },
                    out,
                );
            }
            RequestBody::Write {
                block,
                version,
                prev,
                fua,
            } => {
                let seq = version.seq;
                self.store(
                    Pending::Write {
                        from,
                        op,
                        seq,
                        prev,
                        fua,
                    },
                    StoreOp::Apply {
                        block,
                        version: Some(version),
                        rule: ApplyRule::IfNewer,
                    },
                    out,
                );
            }
            RequestBody::Flush => {
                let watermark = self.watermark;
                self.store(
                    Pending::Reply {
                        from,
                        op,
                        body: ReplyBody::Flushed,
                    },
                    StoreOp::Sync { watermark },
                    out,
                );
            }
            RequestBody::Read { block } => {
                self.store(Pending::Read { from, op }, StoreOp::Read { block }, out)
            }
            RequestBody::Scan {
                since,
                start,
                end,
                limit,
            } => {
                let limit = limit.clamp(1, MAX_SCAN_ENTRIES);
                self.store(
                    Pending::Scan { from, op },
                    StoreOp::Scan {
                        since,
                        start,
                        end,
                        limit,
                    },
                    out,
                );
            }
            RequestBody::Install {
                block,
                version,
                keep_from,
            } => self.store(
                Pending::Reply {
                    from,
                    op,
                    body: ReplyBody::Applied,
                },
                StoreOp::Apply {
                    block,
                    version,
                    rule: ApplyRule::Install { keep_from },
                },
                out,
            ),
            RequestBody::Repair { block, version } => self.store(
                Pending::Reply {
                    from,
                    op,
                    body: ReplyBody::Applied,
                },
                StoreOp::Apply {
                    block,
                    version: Some(version),
                    rule: ApplyRule::Repair,
                },
                out,
            ),
            RequestBody::SetWatermark { seq } => {
                self.watermark = self.watermark.max(seq);
                self.drain_chain();
                // Sync before answering: what the resync installed must be durable before
                // this copy counts as in sync (it may become the only one).
                let watermark = self.watermark;
                self.store(
                    Pending::Reply {
                        from,
                        op,
                        body: ReplyBody::WatermarkSet { watermark },
                    },
                    StoreOp::Sync { watermark },
                    out,
                );
            }
        }
    }

    fn on_store_done(&mut self, token: u64, result: StoreResult, out: &mut Vec<ReplicaAction>) {
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        match (pending, result) {
            (
                Pending::Write {
                    from,
                    op,
                    seq,
                    prev,
                    fua,
                },
                StoreResult::Applied { .. },
            ) => {
                // Applied or superseded by a newer version: either way this write's
                // effect is in the store, so it counts for the chain and the ack.
                self.link(prev, seq);
                if fua {
                    let watermark = self.watermark;
                    self.store(
                        Pending::Reply {
                            from,
                            op,
                            body: ReplyBody::Applied,
                        },
                        StoreOp::Sync { watermark },
                        out,
                    );
                } else {
                    self.reply(from, op, ReplyBody::Applied, out);
                }
            }
            (
                Pending::Reply { from, op, body },
                StoreResult::Applied { .. } | StoreResult::Synced,
            ) => {
                self.reply(from, op, body, out);
            }
            (Pending::Read { from, op }, StoreResult::Read(version)) => {
                self.reply(from, op, ReplyBody::Read { version }, out);
            }
            (Pending::Scan { from, op }, StoreResult::Scanned { entries, next }) => {
                self.reply(from, op, ReplyBody::Scanned { entries, next }, out);
            }
            (Pending::Epoch { epoch }, StoreResult::EpochPersisted) => {
                assert!(epoch > self.epoch || self.persisting != Some(epoch));
                self.epoch = self.epoch.max(epoch);
                if self.persisting == Some(epoch) {
                    self.persisting = None;
                }
                // Serve what waited for this epoch; older ones get fenced.
                let parked: Vec<_> = self.parked.drain(..).collect();
                for (from, req) in parked {
                    self.on_request(from, req, out);
                }
            }
            (p, r) => panic!(
                "replica {:?}: store result {r:?} does not match {p:?}",
                self.id
            ),
        }
    }

    /// Records that the write `prev -> seq` is applied and advances the watermark.
    fn link(&mut self, prev: Seq, seq: Seq) {
        if seq <= self.watermark {
            return;
        }
        if prev <= self.watermark {
            // Nothing was issued between prev and seq: all up to seq is here.
            self.watermark = seq;
        } else if self.chain.len() < MAX_CHAIN {
            self.chain.insert(prev, seq);
        }
        self.drain_chain();
    }

    fn drain_chain(&mut self) {
        while let Some((&prev, &seq)) = self.chain.first_key_value() {
            if prev > self.watermark {
                break;
            }
            self.chain.pop_first();
            self.watermark = self.watermark.max(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Content, Payload};

    fn write(epoch: u32, op: u64, seq: u64, prev: u64) -> ReplicaEvent {
        let b = BlockIndex(1);
        ReplicaEvent::Request {
            from: 9,
            request: Request {
                epoch: Epoch(epoch),
                incarnation: ANY_INCARNATION,
                op,
                body: RequestBody::Write {
                    block: b,
                    version: BlockVersion {
                        seq: Seq(seq),
                        content: Content::Data(Payload::seal(b, Seq(seq), vec![1])),
                    },
                    prev: Seq(prev),
                    fua: false,
                },
            },
        }
    }

    fn tokens(actions: &[ReplicaAction]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                ReplicaAction::Store { token, .. } => Some(*token),
                ReplicaAction::Send { .. } => None,
            })
            .collect()
    }

    #[test]
    fn fences_older_epochs_and_persists_new_ones_first() {
        let mut r = Replica::new(
            ReplicaId(0),
            1,
            Recovered {
                epoch: Epoch(2),
                watermark: Seq(0),
            },
        );
        let a = r.handle(write(1, 1, 5, 0));
        assert!(matches!(
            &a[..],
            [ReplicaAction::Send {
                reply: Reply {
                    body: ReplyBody::Fenced { epoch: Epoch(2) },
                    ..
                },
                ..
            }]
        ));
        let a = r.handle(write(3, 2, 5, 0));
        assert!(matches!(
            &a[..],
            [ReplicaAction::Store {
                op: StoreOp::PersistEpoch { epoch: Epoch(3) },
                ..
            }]
        ));
        let t = tokens(&a)[0];
        let a = r.handle(ReplicaEvent::StoreDone {
            token: t,
            result: StoreResult::EpochPersisted,
        });
        assert_eq!(r.epoch(), Epoch(3));
        assert!(matches!(
            &a[..],
            [ReplicaAction::Store {
                op: StoreOp::Apply { .. },
                ..
            }]
        ));
    }

    #[test]
    fn acks_after_apply_and_proves_a_contiguous_watermark() {
        let mut r = Replica::new(ReplicaId(0), 1, Recovered::default());
        let t2 = tokens(&r.handle(write(0, 2, 2, 1)))[0];
        let t1 = tokens(&r.handle(write(0, 1, 1, 0)))[0];
        let a = r.handle(ReplicaEvent::StoreDone {
            token: t2,
            result: StoreResult::Applied { taken: true },
        });
        assert!(matches!(
            &a[..],
            [ReplicaAction::Send {
                reply: Reply {
                    op: 2,
                    body: ReplyBody::Applied,
                    ..
                },
                ..
            }]
        ));
        assert_eq!(r.watermark(), Seq(0), "seq 1 is not applied yet");
        r.handle(ReplicaEvent::StoreDone {
            token: t1,
            result: StoreResult::Applied { taken: true },
        });
        assert_eq!(r.watermark(), Seq(2));
    }
}
