//! The volume client on the exporting node, sans-I/O: one writer per volume, fenced by
//! epochs.
//!
//! Entry points take `now` (milliseconds of the host's clock) and return actions
//! ([`WriterAction`]): requests to replicas, compare-and-swap requests to the metadata
//! store, completions of user operations. Events ([`WriterEvent`]) bring replies,
//! metadata-store answers and timer ticks ([`Writer::next_deadline`]).
//!
//! The rules (see `design/ARCHITECTURE.md`):
//! - attach: CAS a new epoch, probe the copies (which persists the epoch on them and
//!   fences the previous writer), CAS again to record which copies are in sync, then
//!   reconcile the reachable in-sync copies (one version per block for every block
//!   changed since their lowest watermark) before any I/O;
//! - a write is acknowledged when every copy the metadata store lists as in sync (plus
//!   copies joining) applied it, never with fewer than [`MIN_COPIES`]; FLUSH and FUA
//!   reach the same copies and complete after each synced;
//! - a copy that does not answer within `replica_timeout_ms`, or restarted, is removed
//!   from the in-sync set by a CAS (new epoch) before operations stop waiting for it;
//!   below two in-sync copies I/O waits and fails with [`IoError::Eio`] after
//!   `io_timeout_ms`;
//! - reads go to one in-sync copy (local first), are verified, fall back to another
//!   copy on failure and repair the bad one;
//! - an out-of-sync copy that answers is resynced from its watermark while I/O goes on:
//!   it receives new writes, is filled range by range, then joins (CAS).

use std::collections::BTreeMap;

use crate::msg::{ANY_INCARNATION, MAX_PAYLOAD, Reply, ReplyBody, Request, RequestBody};
use crate::range_sync::RangeSync;
use crate::types::{
    BlockIndex, BlockVersion, Content, Epoch, MIN_COPIES, Payload, REPLICAS, ReplicaId, Seq,
    VolumeMeta,
};

/// Most user operations waiting or in flight.
pub const MAX_OPS: usize = 1024;
/// Attach attempts that may lose a CAS race before the writer gives up.
pub const MAX_ATTACH_CONFLICTS: u32 = 3;

/// Tunables; all durations in milliseconds of the host's clock.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The exporting node (recorded in the metadata store).
    pub node: u32,
    /// The copy on the exporting node, read first.
    pub local: Option<ReplicaId>,
    /// Retransmit an unanswered request after this long.
    pub resend_ms: u64,
    /// A copy that does not answer a request for this long is out of sync.
    pub replica_timeout_ms: u64,
    /// A user operation that cannot complete for this long fails with EIO.
    pub io_timeout_ms: u64,
    /// Probe out-of-sync copies this often.
    pub probe_ms: u64,
    /// Volume size in blocks.
    pub volume_blocks: u64,
    /// Blocks per resync round.
    pub sync_range: u64,
    /// At attach, reconcile every block instead of those above the lowest watermark
    /// (a full scrub: also repairs corrupt copies of old blocks).
    pub full_reconcile: bool,
}

/// A user operation's id.
pub type OpId = u64;

/// Why a user operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("I/O error: not enough copies answered in time")]
    Eio,
    #[error("fenced: another writer attached the volume")]
    Fenced,
}

/// What a completed user operation returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutput {
    /// A write or trim, acknowledged; its version.
    Written {
        seq: Seq,
    },
    Flushed,
    /// A read: the version found (`None`: never written, reads as zeros).
    Read {
        version: Option<BlockVersion>,
    },
}

/// What happens to a writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterEvent {
    Reply {
        from: ReplicaId,
        reply: Reply,
    },
    EpochGranted {
        meta: VolumeMeta,
    },
    EpochConflict {
        current: VolumeMeta,
    },
    /// Time passed: check timers.
    Tick,
}

/// What a writer asks its host to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterAction {
    Send {
        to: ReplicaId,
        request: Request,
    },
    /// Compare-and-swap in the metadata store: set `proposed` if the epoch is `expected`.
    RequestEpochChange {
        expected: Epoch,
        proposed: VolumeMeta,
    },
    Complete {
        op: OpId,
        result: Result<OpOutput, IoError>,
    },
}

/// The writer's view of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    /// In sync per the metadata store and answering.
    InSync,
    /// Not used for I/O: out of sync, or being removed from the in-sync set.
    OutOfSync,
    /// Receiving new writes (those after `s0`) while a resync fills older blocks.
    CatchingUp { s0: Seq },
    /// Filled; acknowledgements now wait for it; joins when its watermark reaches
    /// `until`.
    Joining { until: Seq },
}

#[derive(Debug)]
struct Copy {
    state: CopyState,
    incarnation: u64,
    /// The in-sync set must drop this copy (CAS pending or to send).
    removing: bool,
    /// The in-sync set must take this copy (joining, watermark reached).
    adding: bool,
    last_probe: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Write(Seq),
    Flush(OpId),
    Read(OpId),
    Repair,
    Probe,
    Sync,
    SetWatermark,
    JoinPoll,
}

#[derive(Debug)]
struct Outstanding {
    to: ReplicaId,
    incarnation: u64,
    body: RequestBody,
    purpose: Purpose,
    first_sent: u64,
    last_sent: u64,
}

#[derive(Debug)]
struct WriteOp {
    id: OpId,
    block: BlockIndex,
    version: BlockVersion,
    prev: Seq,
    fua: bool,
    started: u64,
    sent: [bool; REPLICAS],
    acked: [bool; REPLICAS],
}

#[derive(Debug)]
struct FlushOp {
    started: u64,
    /// `acks` when the flush started: the writes it makes durable.
    covers: u64,
    sent: [bool; REPLICAS],
    acked: [bool; REPLICAS],
}

#[derive(Debug)]
struct ReadOp {
    block: BlockIndex,
    started: u64,
    tried: [bool; REPLICAS],
    asking: Option<ReplicaId>,
    bad: Vec<ReplicaId>,
}

/// Makes a block's ciphertext for the seq it will be written under.
pub type Seal = Box<dyn FnOnce(Seq) -> Vec<u8> + Send>;

struct Sealer(Seal);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

/// A user operation waiting for the writer to be ready.
#[derive(Debug)]
enum Queued {
    /// `data: None` is a trim.
    Write {
        block: BlockIndex,
        data: Option<Sealer>,
        fua: bool,
    },
    Read {
        block: BlockIndex,
    },
    Flush,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the attach CAS.
    Granting {
        conflicts: u32,
    },
    /// Probing copies; `seen`: incarnation and watermark of those that answered.
    Probing {
        started: u64,
        seen: [Option<(u64, Seq)>; REPLICAS],
    },
    /// Waiting for the CAS that records the reachable in-sync copies.
    Recording {
        members: Vec<ReplicaId>,
        since: Seq,
    },
    Reconciling {
        members: Vec<ReplicaId>,
        job: RangeSync,
    },
    /// Reconciled; waiting for the members to take the new watermark.
    Watermarking {
        waiting: Vec<ReplicaId>,
    },
    Ready,
    Fenced,
}

#[derive(Debug)]
struct Resync {
    target: ReplicaId,
    s0: Seq,
    since: Seq,
    /// `None` until every write up to `s0` settled.
    job: Option<RangeSync>,
    /// The job finished; waiting for the watermark reply.
    watermarking: bool,
}

/// The volume client.
#[derive(Debug)]
pub struct Writer {
    cfg: WriterConfig,
    phase: Phase,
    meta: VolumeMeta,
    epoch: Epoch,
    cas_inflight: bool,
    copies: [Copy; REPLICAS],
    last_issued: Seq,
    /// Highest seq ever handed out (to a write or a seal): the next one is above it,
    /// even when a sealed write was refused and never issued.
    seq_used: Seq,
    next_req: u64,
    next_op: OpId,
    outstanding: BTreeMap<u64, Outstanding>,
    writes: BTreeMap<Seq, WriteOp>,
    flushes: BTreeMap<OpId, FlushOp>,
    reads: BTreeMap<OpId, ReadOp>,
    queued: BTreeMap<OpId, (u64, Queued)>,
    resync: Option<Resync>,
    /// Why the writer stopped (with `Phase::Fenced`): fenced, or failed (EIO).
    stopped: IoError,
    /// Non-FUA writes acknowledged so far, and how many of them completed flushes
    /// cover: when the last in-sync copy restarts with writes not covered, they may be
    /// lost, and the session must fail rather than acknowledge a later flush.
    acks: u64,
    flushed_acks: u64,
    out: Vec<WriterAction>,
}

impl Writer {
    /// A writer that attaches the volume whose metadata record is `meta`.
    pub fn attach(cfg: WriterConfig, meta: VolumeMeta) -> (Writer, Vec<WriterAction>) {
        assert!(cfg.resend_ms > 0 && cfg.resend_ms < cfg.replica_timeout_ms);
        assert!(cfg.sync_range > 0);
        let copy = || Copy {
            state: CopyState::OutOfSync,
            incarnation: ANY_INCARNATION,
            removing: false,
            adding: false,
            last_probe: 0,
        };
        let mut w = Writer {
            cfg,
            phase: Phase::Fenced,
            meta: meta.clone(),
            epoch: meta.epoch,
            cas_inflight: false,
            copies: [copy(), copy(), copy()],
            last_issued: Seq::ZERO,
            seq_used: Seq::ZERO,
            next_req: 1,
            next_op: 1,
            outstanding: BTreeMap::new(),
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            reads: BTreeMap::new(),
            queued: BTreeMap::new(),
            resync: None,
            stopped: IoError::Fenced,
            acks: 0,
            flushed_acks: 0,
            out: Vec::new(),
        };
        w.request_attach(meta, 0);
        let out = std::mem::take(&mut w.out);
        (w, out)
    }

    fn request_attach(&mut self, current: VolumeMeta, conflicts: u32) {
        let Some(epoch) = current.epoch.next() else {
            self.become_fenced();
            return;
        };
        let proposed = VolumeMeta {
            epoch,
            writer: self.cfg.node,
            ..current.clone()
        };
        self.cas_inflight = true;
        self.out.push(WriterAction::RequestEpochChange {
            expected: current.epoch,
            proposed,
        });
        self.phase = Phase::Granting { conflicts };
    }

    /// The writer's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Attached, reconciled, serving I/O.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready)
    }

    pub fn is_fenced(&self) -> bool {
        matches!(self.phase, Phase::Fenced) && self.stopped == IoError::Fenced
    }

    /// The session failed (acknowledged writes may have been lost with the last
    /// in-sync copy): every operation fails with EIO; attach a new writer.
    pub fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Fenced) && self.stopped == IoError::Eio
    }

    /// Number of copies the writer currently uses as in sync.
    pub fn in_sync_copies(&self) -> usize {
        self.copies
            .iter()
            .filter(|c| c.state == CopyState::InSync)
            .count()
    }

    /// Nothing in flight: no user operation, no resync, no CAS.
    pub fn is_idle(&self) -> bool {
        self.is_ready()
            && self.writes.is_empty()
            && self.flushes.is_empty()
            && self.reads.is_empty()
            && self.queued.is_empty()
            && self.resync.is_none()
            && !self.cas_inflight
    }

    /// When the writer next needs a [`WriterEvent::Tick`] (at most `resend_ms` away).
    pub fn next_deadline(&self, now: u64) -> u64 {
        now + self.cfg.resend_ms.min(self.cfg.probe_ms).max(1)
    }

    /// Writes `block`: `seal` makes its ciphertext for the seq the writer assigns (the
    /// engine encrypts with that seq as the AES-GCM nonce, so it can only run once the
    /// seq is known, and a seq given to `seal` is never given again).
    pub fn write_sealed(
        &mut self,
        now: u64,
        block: BlockIndex,
        seal: Seal,
        fua: bool,
    ) -> (OpId, Vec<WriterAction>) {
        self.submit(
            now,
            Queued::Write {
                block,
                data: Some(Sealer(seal)),
                fua,
            },
        )
    }

    /// Writes `bytes` as they are (a test convenience over [`Writer::write_sealed`]).
    pub fn write(
        &mut self,
        now: u64,
        block: BlockIndex,
        bytes: Vec<u8>,
        fua: bool,
    ) -> (OpId, Vec<WriterAction>) {
        self.write_sealed(now, block, Box::new(move |_| bytes), fua)
    }

    /// Trims `block` (a tombstone version; reads back as zeros).
    pub fn trim(&mut self, now: u64, block: BlockIndex) -> (OpId, Vec<WriterAction>) {
        self.submit(
            now,
            Queued::Write {
                block,
                data: None,
                fua: false,
            },
        )
    }

    pub fn read(&mut self, now: u64, block: BlockIndex) -> (OpId, Vec<WriterAction>) {
        self.submit(now, Queued::Read { block })
    }

    pub fn flush(&mut self, now: u64) -> (OpId, Vec<WriterAction>) {
        self.submit(now, Queued::Flush)
    }

    fn submit(&mut self, now: u64, op: Queued) -> (OpId, Vec<WriterAction>) {
        let id = self.next_op;
        self.next_op += 1;
        let busy = self.queued.len() + self.writes.len() + self.flushes.len() + self.reads.len();
        let bad_block = match &op {
            Queued::Write { block, .. } => block.0 >= self.cfg.volume_blocks,
            Queued::Read { block } => block.0 >= self.cfg.volume_blocks,
            Queued::Flush => false,
        };
        if matches!(self.phase, Phase::Fenced) {
            self.out.push(WriterAction::Complete {
                op: id,
                result: Err(self.stopped),
            });
        } else if busy >= MAX_OPS || bad_block {
            self.out.push(WriterAction::Complete {
                op: id,
                result: Err(IoError::Eio),
            });
        } else {
            self.queued.insert(id, (now, op));
            self.progress(now);
        }
        (id, std::mem::take(&mut self.out))
    }

    /// Handles one event.
    pub fn handle(&mut self, now: u64, event: WriterEvent) -> Vec<WriterAction> {
        match event {
            WriterEvent::Reply { from, reply } => self.on_reply(now, from, reply),
            WriterEvent::EpochGranted { meta } => self.on_granted(now, meta),
            WriterEvent::EpochConflict { current } => self.on_conflict(current),
            WriterEvent::Tick => self.on_tick(now),
        }
        self.progress(now);
        std::mem::take(&mut self.out)
    }

    // ---- sending ----

    fn send(&mut self, now: u64, to: ReplicaId, body: RequestBody, purpose: Purpose) {
        let op = self.next_req;
        self.next_req += 1;
        let incarnation = match purpose {
            Purpose::Probe => ANY_INCARNATION,
            _ => self.copies[to.index()].incarnation,
        };
        let request = Request {
            epoch: self.epoch,
            incarnation,
            op,
            body: body.clone(),
        };
        self.outstanding.insert(
            op,
            Outstanding {
                to,
                incarnation,
                body,
                purpose,
                first_sent: now,
                last_sent: now,
            },
        );
        self.out.push(WriterAction::Send { to, request });
    }

    fn forget_requests(&mut self, pred: impl Fn(&Outstanding) -> bool) {
        self.outstanding.retain(|_, o| !pred(o));
    }

    // ---- metadata store ----

    fn on_granted(&mut self, now: u64, meta: VolumeMeta) {
        assert!(meta.epoch > self.epoch, "granted epochs only grow");
        assert_eq!(meta.writer, self.cfg.node);
        self.cas_inflight = false;
        self.meta = meta.clone();
        self.epoch = meta.epoch;
        match std::mem::replace(&mut self.phase, Phase::Fenced) {
            Phase::Granting { .. } => self.start_probing(now),
            Phase::Recording { members, since } => {
                for r in ReplicaId::all() {
                    let c = &mut self.copies[r.index()];
                    c.removing = false;
                    c.adding = false;
                    c.state = if members.contains(&r) {
                        CopyState::InSync
                    } else {
                        CopyState::OutOfSync
                    };
                }
                let job = RangeSync::new(
                    members.clone(),
                    members.clone(),
                    since,
                    Seq(u64::MAX),
                    self.cfg.sync_range,
                    self.cfg.volume_blocks,
                );
                self.phase = Phase::Reconciling { members, job };
                self.drive_reconcile(now, None);
            }
            phase => {
                self.phase = phase;
                for r in ReplicaId::all() {
                    let c = &mut self.copies[r.index()];
                    if c.removing && !meta.in_sync[r.index()] {
                        c.removing = false;
                    }
                    if c.adding && meta.in_sync[r.index()] {
                        c.adding = false;
                        c.state = CopyState::InSync;
                    }
                    if meta.in_sync[r.index()] && c.state != CopyState::InSync && !c.adding {
                        // It failed while its join was in flight: drop it again.
                        c.removing = true;
                    }
                }
                self.maybe_cas();
            }
        }
    }

    fn on_conflict(&mut self, current: VolumeMeta) {
        self.cas_inflight = false;
        match &self.phase {
            Phase::Granting { conflicts, .. } if *conflicts < MAX_ATTACH_CONFLICTS => {
                let conflicts = conflicts + 1;
                self.request_attach(current, conflicts);
            }
            _ => self.become_fenced(),
        }
    }

    /// Sends the CAS that applies pending in-sync changes, if none is in flight.
    fn maybe_cas(&mut self) {
        if self.cas_inflight || !matches!(self.phase, Phase::Ready) {
            return;
        }
        let mut proposed = self.meta.clone();
        let mut change = false;
        for r in ReplicaId::all() {
            let c = &self.copies[r.index()];
            if c.removing && proposed.in_sync[r.index()] {
                proposed.in_sync[r.index()] = false;
                change = true;
            }
            if c.adding && !proposed.in_sync[r.index()] {
                proposed.in_sync[r.index()] = true;
                proposed.trusted[r.index()] = Seq(u64::MAX);
                change = true;
            }
        }
        if !change {
            return;
        }
        let Some(epoch) = self.meta.epoch.next() else {
            self.become_fenced();
            return;
        };
        assert!(
            proposed.in_sync_count() >= 1,
            "the last in-sync copy is never dropped"
        );
        proposed.epoch = epoch;
        self.cas_inflight = true;
        self.out.push(WriterAction::RequestEpochChange {
            expected: self.meta.epoch,
            proposed,
        });
    }

    fn become_fenced(&mut self) {
        self.stop(IoError::Fenced);
    }

    fn stop(&mut self, error: IoError) {
        self.phase = Phase::Fenced;
        self.stopped = error;
        self.outstanding.clear();
        self.resync = None;
        let ids: Vec<OpId> = self
            .writes
            .values()
            .map(|w| w.id)
            .chain(self.flushes.keys().copied())
            .chain(self.reads.keys().copied())
            .chain(self.queued.keys().copied())
            .collect();
        self.writes.clear();
        self.flushes.clear();
        self.reads.clear();
        self.queued.clear();
        for op in ids {
            self.out.push(WriterAction::Complete {
                op,
                result: Err(error),
            });
        }
    }

    // ---- attach ----

    fn start_probing(&mut self, now: u64) {
        self.forget_requests(|o| {
            matches!(
                o.purpose,
                Purpose::Sync | Purpose::SetWatermark | Purpose::Probe
            )
        });
        self.phase = Phase::Probing {
            started: now,
            seen: [None; REPLICAS],
        };
        for r in ReplicaId::all() {
            self.send(now, r, RequestBody::Status, Purpose::Probe);
        }
    }

    /// Moves the probing phase on when every in-sync copy answered, or when the
    /// timeout passed and at least one did.
    fn conclude_probing(&mut self, now: u64) {
        let Phase::Probing { started, seen } = &self.phase else {
            return;
        };
        if self.cas_inflight {
            return; // the record CAS must start from the latest granted record
        }
        let in_sync: Vec<ReplicaId> = ReplicaId::all()
            .filter(|r| self.meta.in_sync[r.index()])
            .collect();
        let members: Vec<ReplicaId> = in_sync
            .iter()
            .copied()
            .filter(|r| seen[r.index()].is_some())
            .collect();
        let all = members.len() == in_sync.len();
        if members.is_empty() || (!all && now < started + self.cfg.replica_timeout_ms) {
            return;
        }
        let seen = *seen;
        let restarted = members.iter().any(|r| {
            let known = self.copies[r.index()].incarnation;
            known != ANY_INCARNATION && seen[r.index()].is_some_and(|(inc, _)| inc != known)
        });
        if restarted && self.acks > self.flushed_acks {
            // Re-attaching within a session to copies that all restarted: acknowledged,
            // unflushed writes may be gone. Fail rather than acknowledge a later flush
            // that would claim them durable.
            self.stop(IoError::Eio);
            return;
        }
        let w_min = members
            .iter()
            .filter_map(|r| seen[r.index()].map(|(_, w)| w))
            .min()
            .unwrap_or(Seq::ZERO);
        for r in ReplicaId::all() {
            if let Some((inc, _)) = seen[r.index()] {
                self.copies[r.index()].incarnation = inc;
            }
        }
        // Record the members; every other copy trusts at most the members' lowest
        // watermark (it may hold writes the members lost or never saw).
        let Some(epoch) = self.meta.epoch.next() else {
            self.become_fenced();
            return;
        };
        let mut proposed = self.meta.clone();
        proposed.epoch = epoch;
        for r in ReplicaId::all() {
            let i = r.index();
            proposed.in_sync[i] = members.contains(&r);
            if !proposed.in_sync[i] {
                proposed.trusted[i] = proposed.trusted[i].min(w_min);
            }
        }
        let since = if self.cfg.full_reconcile {
            Seq::ZERO
        } else {
            w_min
        };
        self.cas_inflight = true;
        self.out.push(WriterAction::RequestEpochChange {
            expected: self.meta.epoch,
            proposed,
        });
        self.phase = Phase::Recording { members, since };
    }

    fn drive_reconcile(&mut self, now: u64, reply: Option<(ReplicaId, ReplyBody)>) {
        let Phase::Reconciling { job, members } = &mut self.phase else {
            return;
        };
        let sends = match reply {
            None => job.start(),
            Some((from, body)) => job.on_reply(from, body),
        };
        let done = job.is_done();
        let members = members.clone();
        for (to, body) in sends {
            self.send(now, to, body, Purpose::Sync);
        }
        if done {
            let base = self.last_issued.max(self.seq_used).max(self.epoch.base());
            self.last_issued = base;
            self.seq_used = base;
            for r in &members {
                self.send(
                    now,
                    *r,
                    RequestBody::SetWatermark { seq: base },
                    Purpose::SetWatermark,
                );
            }
            self.phase = Phase::Watermarking { waiting: members };
        }
    }

    // ---- replies ----

    fn on_reply(&mut self, now: u64, from: ReplicaId, reply: Reply) {
        let Some(o) = self.outstanding.get(&reply.op) else {
            return; // late or duplicated
        };
        if o.to != from {
            return;
        }
        let o = self.outstanding.remove(&reply.op).expect("just found");
        match reply.body {
            ReplyBody::Fenced { epoch } if epoch > self.epoch => {
                self.become_fenced();
                return;
            }
            ReplyBody::Fenced { .. } => {
                // Our own newer epoch reached the copy first: send again with it.
                self.send(now, o.to, o.body, o.purpose);
                return;
            }
            ReplyBody::Restarted => {
                self.copy_failed(now, from);
                return;
            }
            _ => {}
        }
        if o.incarnation != ANY_INCARNATION && reply.incarnation != o.incarnation {
            self.copy_failed(now, from);
            return;
        }
        match o.purpose {
            Purpose::Write(seq) => {
                if let Some(w) = self.writes.get_mut(&seq) {
                    w.acked[from.index()] = true;
                }
            }
            Purpose::Flush(id) => {
                if let Some(f) = self.flushes.get_mut(&id) {
                    f.acked[from.index()] = true;
                }
            }
            Purpose::Read(id) => self.on_read_reply(now, id, from, reply.body),
            Purpose::Repair => {}
            Purpose::Probe => self.on_status(now, from, reply.incarnation, reply.body),
            Purpose::Sync => {
                if matches!(self.phase, Phase::Reconciling { .. }) {
                    self.drive_reconcile(now, Some((from, reply.body)));
                } else {
                    self.drive_resync(now, Some((from, reply.body)));
                }
            }
            Purpose::SetWatermark => self.on_watermark_set(now, from, reply.body),
            Purpose::JoinPoll => {
                if let (ReplyBody::Status { watermark, .. }, CopyState::Joining { until }) =
                    (reply.body, self.copies[from.index()].state)
                    && watermark >= until
                {
                    self.copies[from.index()].adding = true;
                    self.resync = None;
                    self.maybe_cas();
                }
            }
        }
    }

    fn on_status(&mut self, now: u64, from: ReplicaId, incarnation: u64, body: ReplyBody) {
        let ReplyBody::Status { watermark, .. } = body else {
            return;
        };
        if let Phase::Probing { seen, .. } = &mut self.phase {
            seen[from.index()] = Some((incarnation, watermark));
            self.conclude_probing(now);
            return;
        }
        if !matches!(self.phase, Phase::Ready) || self.resync.is_some() {
            return;
        }
        let c = &mut self.copies[from.index()];
        if c.state != CopyState::OutOfSync || self.meta.in_sync[from.index()] {
            return;
        }
        // A returning copy: it gets every write from now on, and a resync of what
        // changed since the point where its content is known to agree.
        c.incarnation = incarnation;
        let s0 = self.last_issued;
        c.state = CopyState::CatchingUp { s0 };
        let since = watermark.min(self.meta.trusted[from.index()]);
        self.resync = Some(Resync {
            target: from,
            s0,
            since,
            job: None,
            watermarking: false,
        });
    }

    fn drive_resync(&mut self, now: u64, reply: Option<(ReplicaId, ReplyBody)>) {
        let Some(rs) = &mut self.resync else {
            return;
        };
        let target = rs.target;
        if rs.job.is_none() {
            // Wait until every in-sync copy applied each write the target may have
            // missed, so the sources' scans see all of them. (Not until those writes
            // complete: below two copies they wait for the very copy being resynced.)
            let copies = &self.copies;
            let unsettled = self.writes.range(..=rs.s0).any(|(_, w)| {
                ReplicaId::all()
                    .any(|r| copies[r.index()].state == CopyState::InSync && !w.acked[r.index()])
            });
            if unsettled {
                return;
            }
            let sources: Vec<ReplicaId> = ReplicaId::all()
                .filter(|r| self.copies[r.index()].state == CopyState::InSync)
                .collect();
            if sources.is_empty() {
                return;
            }
            let mut targets = sources.clone();
            targets.push(target);
            rs.job = Some(RangeSync::new(
                sources,
                targets,
                rs.since,
                rs.s0,
                self.cfg.sync_range,
                self.cfg.volume_blocks,
            ));
            let sends = rs.job.as_mut().map(RangeSync::start).unwrap_or_default();
            self.send_sync(now, sends);
            return self.check_resync_done(now);
        }
        if let (Some(job), Some((from, body))) = (&mut rs.job, reply) {
            let sends = job.on_reply(from, body);
            self.send_sync(now, sends);
            self.check_resync_done(now);
        }
    }

    fn send_sync(&mut self, now: u64, sends: Vec<(ReplicaId, RequestBody)>) {
        for (to, body) in sends {
            self.send(now, to, body, Purpose::Sync);
        }
    }

    fn check_resync_done(&mut self, now: u64) {
        let Some(rs) = &mut self.resync else {
            return;
        };
        let Some(job) = &rs.job else {
            return;
        };
        if !job.is_done() || rs.watermarking {
            return;
        }
        rs.watermarking = true;
        let (t, s0) = (rs.target, rs.s0);
        self.send(
            now,
            t,
            RequestBody::SetWatermark { seq: s0 },
            Purpose::SetWatermark,
        );
    }

    fn abort_resync(&mut self, target: ReplicaId) {
        self.resync = None;
        self.forget_requests(|o| {
            matches!(
                o.purpose,
                Purpose::Sync | Purpose::SetWatermark | Purpose::JoinPoll
            )
        });
        let c = &mut self.copies[target.index()];
        if matches!(
            c.state,
            CopyState::CatchingUp { .. } | CopyState::Joining { .. }
        ) {
            c.state = CopyState::OutOfSync;
            c.adding = false;
        }
    }

    fn on_watermark_set(&mut self, now: u64, from: ReplicaId, body: ReplyBody) {
        let ReplyBody::WatermarkSet { .. } = body else {
            return;
        };
        if let Phase::Watermarking { waiting } = &mut self.phase {
            waiting.retain(|r| *r != from);
            if waiting.is_empty() {
                self.phase = Phase::Ready;
                self.maybe_cas();
            }
            return;
        }
        if self
            .resync
            .as_ref()
            .is_some_and(|rs| rs.target == from && rs.watermarking)
        {
            // Filled up to s0 and receiving everything after: from now on writes wait
            // for it; it joins when it applied everything issued so far.
            let until = self.last_issued;
            self.copies[from.index()].state = CopyState::Joining { until };
            self.send(now, from, RequestBody::Status, Purpose::JoinPoll);
        }
    }

    fn on_read_reply(&mut self, now: u64, id: OpId, from: ReplicaId, body: ReplyBody) {
        let Some(r) = self.reads.get_mut(&id) else {
            return;
        };
        if r.asking != Some(from) {
            return;
        }
        r.asking = None;
        let ReplyBody::Read { version } = body else {
            return;
        };
        // Check just after reading: a corrupt or misplaced version never passes.
        if version.as_ref().is_some_and(|v| !v.verify(r.block)) {
            r.bad.push(from);
            return;
        }
        let r = self.reads.remove(&id).expect("just found");
        if let Some(good) = &version {
            for bad in r.bad {
                self.send(
                    now,
                    bad,
                    RequestBody::Repair {
                        block: r.block,
                        version: good.clone(),
                    },
                    Purpose::Repair,
                );
            }
        }
        self.out.push(WriterAction::Complete {
            op: id,
            result: Ok(OpOutput::Read { version }),
        });
    }

    // ---- failures ----

    /// A copy timed out or restarted.
    fn copy_failed(&mut self, now: u64, r: ReplicaId) {
        self.forget_requests(|o| o.to == r);
        for read in self.reads.values_mut() {
            if read.asking == Some(r) {
                read.asking = None;
            }
        }
        match self.phase {
            Phase::Probing { .. }
            | Phase::Granting { .. }
            | Phase::Recording { .. }
            | Phase::Fenced => return,
            Phase::Reconciling { .. } | Phase::Watermarking { .. } => {
                // Attach again from the probe: the record step drops the copy.
                self.start_probing(now);
                return;
            }
            Phase::Ready => {}
        }
        if self
            .resync
            .as_ref()
            .is_some_and(|rs| rs.target == r || rs.job.as_ref().is_some_and(|j| j.involves(r)))
        {
            self.abort_resync(self.resync.as_ref().map_or(r, |rs| rs.target));
        }
        let c = &mut self.copies[r.index()];
        match c.state {
            CopyState::CatchingUp { .. } | CopyState::Joining { .. } => {
                c.state = CopyState::OutOfSync;
                c.adding = false;
            }
            CopyState::OutOfSync => {}
            CopyState::InSync => {
                let others = ReplicaId::all()
                    .filter(|x| {
                        *x != r && self.meta.in_sync[x.index()] && !self.copies[x.index()].removing
                    })
                    .count();
                if others == 0 {
                    // The last in-sync copy restarted or vanished: it stays the
                    // authority; attach again (pending I/O fails, it may have landed).
                    self.fail_all_io();
                    self.start_probing(now);
                    return;
                }
                let c = &mut self.copies[r.index()];
                c.state = CopyState::OutOfSync;
                c.removing = true;
                self.maybe_cas();
            }
        }
    }

    fn fail_all_io(&mut self) {
        let ids: Vec<OpId> = self
            .writes
            .values()
            .map(|w| w.id)
            .chain(self.flushes.keys().copied())
            .chain(self.reads.keys().copied())
            .collect();
        self.writes.clear();
        self.flushes.clear();
        self.reads.clear();
        self.forget_requests(|o| {
            matches!(
                o.purpose,
                Purpose::Write(_) | Purpose::Flush(_) | Purpose::Read(_)
            )
        });
        for op in ids {
            self.out.push(WriterAction::Complete {
                op,
                result: Err(IoError::Eio),
            });
        }
        if let Some(target) = self.resync.as_ref().map(|rs| rs.target) {
            self.abort_resync(target);
        }
    }

    // ---- timers ----

    fn on_tick(&mut self, now: u64) {
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (op, o) in &self.outstanding {
            if now >= o.first_sent + self.cfg.replica_timeout_ms {
                if matches!(o.purpose, Purpose::Probe | Purpose::Repair) {
                    resend.push((*op, true));
                } else {
                    failed.push(o.to);
                }
            } else if now >= o.last_sent + self.cfg.resend_ms {
                resend.push((*op, false));
            }
        }
        for (op, drop) in resend {
            if drop {
                self.outstanding.remove(&op);
                continue;
            }
            if let Some(o) = self.outstanding.get_mut(&op) {
                o.last_sent = now;
                let request = Request {
                    epoch: self.epoch,
                    incarnation: o.incarnation,
                    op,
                    body: o.body.clone(),
                };
                self.out.push(WriterAction::Send { to: o.to, request });
            }
        }
        failed.sort();
        failed.dedup();
        for r in failed {
            self.copy_failed(now, r);
        }
        match &self.phase {
            Phase::Probing { seen, .. } => {
                let seen = *seen;
                for r in ReplicaId::all() {
                    let probing = self
                        .outstanding
                        .values()
                        .any(|o| o.to == r && o.purpose == Purpose::Probe);
                    if seen[r.index()].is_none() && !probing {
                        self.send(now, r, RequestBody::Status, Purpose::Probe);
                    }
                }
                self.conclude_probing(now);
            }
            Phase::Ready => {
                for r in ReplicaId::all() {
                    let (state, last_probe, adding) = {
                        let c = &self.copies[r.index()];
                        (c.state, c.last_probe, c.adding)
                    };
                    let due = now >= last_probe + self.cfg.probe_ms;
                    let probing = self
                        .outstanding
                        .values()
                        .any(|o| o.to == r && o.purpose == Purpose::Probe);
                    if state == CopyState::OutOfSync
                        && !self.meta.in_sync[r.index()]
                        && due
                        && !probing
                    {
                        self.copies[r.index()].last_probe = now;
                        self.send(now, r, RequestBody::Status, Purpose::Probe);
                    }
                    if let CopyState::Joining { .. } = state {
                        let polling = self
                            .outstanding
                            .values()
                            .any(|o| o.to == r && o.purpose == Purpose::JoinPoll);
                        if !polling && !adding {
                            self.send(now, r, RequestBody::Status, Purpose::JoinPoll);
                        }
                    }
                }
                self.drive_resync(now, None);
            }
            _ => {}
        }
    }

    // ---- user operations ----

    /// Copies whose acknowledgement a write or flush needs.
    fn required(&self) -> [bool; REPLICAS] {
        let mut req = [false; REPLICAS];
        for r in ReplicaId::all() {
            let i = r.index();
            req[i] =
                self.meta.in_sync[i] || matches!(self.copies[i].state, CopyState::Joining { .. });
        }
        req
    }

    /// Copies a write is sent to.
    fn receives_writes(&self, r: ReplicaId) -> bool {
        matches!(
            self.copies[r.index()].state,
            CopyState::InSync | CopyState::CatchingUp { .. } | CopyState::Joining { .. }
        )
    }

    fn next_seq(&mut self) -> Option<Seq> {
        let candidate = Seq(self
            .seq_used
            .max(self.last_issued)
            .0
            .checked_add(1)?
            .max(self.epoch.base().0 + 1));
        // The counter of this epoch is exhausted: a new epoch (attach) is needed.
        (candidate.epoch() == self.epoch).then_some(candidate)
    }

    /// Starts queued operations, completes finished ones, fails expired ones.
    fn progress(&mut self, now: u64) {
        if !matches!(self.phase, Phase::Ready) {
            self.expire_queued(now);
            return;
        }
        let queued = std::mem::take(&mut self.queued);
        for (id, (started, op)) in queued {
            self.start_op(id, started, op);
        }
        let required = self.required();
        let required_count = required.iter().filter(|x| **x).count();
        // Writes.
        let mut done = Vec::new();
        let seqs: Vec<Seq> = self.writes.keys().copied().collect();
        for seq in seqs {
            let mut to_send = Vec::new();
            {
                let w = &self.writes[&seq];
                for r in ReplicaId::all() {
                    if !w.sent[r.index()] && self.receives_writes(r) {
                        to_send.push(r);
                    }
                }
            }
            for r in to_send {
                let w = self.writes.get_mut(&seq).expect("listed");
                w.sent[r.index()] = true;
                let body = RequestBody::Write {
                    block: w.block,
                    version: w.version.clone(),
                    prev: w.prev,
                    fua: w.fua,
                };
                self.send(now, r, body, Purpose::Write(seq));
            }
            let w = &self.writes[&seq];
            let all = ReplicaId::all().all(|r| !required[r.index()] || w.acked[r.index()]);
            let acked = ReplicaId::all()
                .filter(|r| required[r.index()] && w.acked[r.index()])
                .count();
            if all && required_count >= MIN_COPIES && acked >= MIN_COPIES {
                if !w.fua {
                    self.acks += 1;
                }
                done.push((seq, Ok(OpOutput::Written { seq })));
            } else if now >= w.started + self.cfg.io_timeout_ms {
                done.push((seq, Err(IoError::Eio)));
            }
        }
        for (seq, result) in done {
            let w = self.writes.remove(&seq).expect("listed");
            self.forget_requests(|o| o.purpose == Purpose::Write(seq));
            self.out.push(WriterAction::Complete { op: w.id, result });
        }
        // Flushes.
        let ids: Vec<OpId> = self.flushes.keys().copied().collect();
        for id in ids {
            let mut to_send = Vec::new();
            {
                let f = &self.flushes[&id];
                for r in ReplicaId::all() {
                    let i = r.index();
                    let usable = matches!(
                        self.copies[i].state,
                        CopyState::InSync | CopyState::Joining { .. }
                    );
                    if required[i] && usable && !f.sent[i] {
                        to_send.push(r);
                    }
                }
            }
            for r in to_send {
                self.flushes.get_mut(&id).expect("listed").sent[r.index()] = true;
                self.send(now, r, RequestBody::Flush, Purpose::Flush(id));
            }
            let f = &self.flushes[&id];
            let all = ReplicaId::all().all(|r| !required[r.index()] || f.acked[r.index()]);
            let result = if all && required_count >= MIN_COPIES {
                self.flushed_acks = self.flushed_acks.max(f.covers);
                Some(Ok(OpOutput::Flushed))
            } else if now >= f.started + self.cfg.io_timeout_ms {
                Some(Err(IoError::Eio))
            } else {
                None
            };
            if let Some(result) = result {
                self.flushes.remove(&id);
                self.forget_requests(|o| o.purpose == Purpose::Flush(id));
                self.out.push(WriterAction::Complete { op: id, result });
            }
        }
        // Reads.
        let ids: Vec<OpId> = self.reads.keys().copied().collect();
        for id in ids {
            let r = &self.reads[&id];
            if now >= r.started + self.cfg.io_timeout_ms {
                self.reads.remove(&id);
                self.forget_requests(|o| o.purpose == Purpose::Read(id));
                self.out.push(WriterAction::Complete {
                    op: id,
                    result: Err(IoError::Eio),
                });
                continue;
            }
            if r.asking.is_some() {
                continue;
            }
            let usable = |x: ReplicaId| {
                self.copies[x.index()].state == CopyState::InSync && !r.tried[x.index()]
            };
            let pick = self
                .cfg
                .local
                .filter(|l| usable(*l))
                .or_else(|| ReplicaId::all().find(|x| usable(*x)));
            match pick {
                Some(to) => {
                    let block = r.block;
                    let r = self.reads.get_mut(&id).expect("listed");
                    r.tried[to.index()] = true;
                    r.asking = Some(to);
                    self.send(now, to, RequestBody::Read { block }, Purpose::Read(id));
                }
                None => {
                    // Every usable copy was tried: try them again later.
                    if now >= r.started + self.cfg.replica_timeout_ms {
                        self.reads.get_mut(&id).expect("listed").tried = [false; REPLICAS];
                    }
                }
            }
        }
        if self.resync.as_ref().is_some_and(|rs| rs.job.is_none()) {
            self.drive_resync(now, None);
        }
    }

    fn expire_queued(&mut self, now: u64) {
        let expired: Vec<OpId> = self
            .queued
            .iter()
            .filter(|(_, (t, _))| now >= t + self.cfg.io_timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.queued.remove(&id);
            self.out.push(WriterAction::Complete {
                op: id,
                result: Err(IoError::Eio),
            });
        }
    }

    fn start_op(&mut self, id: OpId, started: u64, op: Queued) {
        match op {
            Queued::Write { block, data, fua } => {
                let Some(seq) = self.next_seq() else {
                    self.out.push(WriterAction::Complete {
                        op: id,
                        result: Err(IoError::Eio),
                    });
                    return;
                };
                self.seq_used = seq;
                let content = match data {
                    Some(Sealer(seal)) => {
                        let bytes = seal(seq);
                        if bytes.len() > MAX_PAYLOAD {
                            self.out.push(WriterAction::Complete {
                                op: id,
                                result: Err(IoError::Eio),
                            });
                            return;
                        }
                        Content::Data(Payload::seal(block, seq, bytes))
                    }
                    None => Content::Trim,
                };
                // The chain links writes that went out: a refused seal leaves a gap in
                // seqs, not in the chain.
                let prev = self.last_issued;
                self.last_issued = seq;
                let version = BlockVersion { seq, content };
                // Check just before writing: what leaves verifies.
                assert!(version.verify(block));
                self.writes.insert(
                    seq,
                    WriteOp {
                        id,
                        block,
                        version,
                        prev,
                        fua,
                        started,
                        sent: [false; REPLICAS],
                        acked: [false; REPLICAS],
                    },
                );
            }
            Queued::Read { block } => {
                self.reads.insert(
                    id,
                    ReadOp {
                        block,
                        started,
                        tried: [false; REPLICAS],
                        asking: None,
                        bad: Vec::new(),
                    },
                );
            }
            Queued::Flush => {
                self.flushes.insert(
                    id,
                    FlushOp {
                        started,
                        covers: self.acks,
                        sent: [false; REPLICAS],
                        acked: [false; REPLICAS],
                    },
                );
            }
        }
    }
}
