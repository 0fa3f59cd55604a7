//! The simulated cluster: three replica nodes (a [`Replica`] core over a [`MemStore`]
//! each), writers on those nodes, a metadata store with compare-and-swap epochs, a
//! faulty network, a workload and a fault schedule, driven by one event queue in virtual
//! time (milliseconds). Messages travel encoded, so the codec is exercised too.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use super::checker::Checker;
use super::rng::Rng;
use super::store::MemStore;
use crate::codec::{decode, encode};
use crate::msg::{Message, RequestBody};
use crate::replica::{Recovered, Replica, ReplicaAction, ReplicaEvent, StoreOp};
use crate::types::{BlockIndex, Epoch, REPLICAS, ReplicaId, VolumeMeta};
use crate::writer::{OpId, Writer, WriterAction, WriterConfig, WriterEvent};

/// Blocks of the simulated volume: small, so writes collide.
const BLOCKS: u64 = 24;
/// Writers are ticked this often.
const TICK_MS: u64 = 5;
/// The workload and the faults run this long; then the cluster heals and converges.
const RUN_MS: u64 = 1500;
/// Most user operations a workload keeps in flight per writer.
const MAX_INFLIGHT: usize = 8;
/// Latency of the metadata store, each way (etcd over a WAN: milliseconds to tens).
const META_DELAY_MS: u64 = 25;
/// The final reconciliation must finish within this long.
const CONVERGE_MS: u64 = 6000;

/// The result of one seed.
#[derive(Debug)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub summary: String,
}

#[derive(Debug)]
enum Ev {
    ToReplica {
        r: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    ToWriter {
        w: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    StoreStep {
        r: usize,
        incarnation: u64,
    },
    Tick {
        w: usize,
    },
    MetaCas {
        w: usize,
        expected: Epoch,
        proposed: VolumeMeta,
    },
    MetaReply {
        w: usize,
        event: WriterEvent,
    },
    Workload,
    Fault(Fault),
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// mode 0: both ways, 1: nothing reaches the node, 2: nothing leaves it.
    Partition {
        node: usize,
        mode: u64,
    },
    Heal {
        node: usize,
    },
    CrashReplica {
        r: usize,
    },
    RestartReplica {
        r: usize,
    },
    Corrupt,
    CrashWriter,
    StartWriter {
        node: usize,
    },
    /// A new writer attaches while the current one keeps running (and gets fenced).
    StaleWriter {
        node: usize,
    },
    KillWriter {
        w: usize,
    },
    /// Workload stops, partitions heal, replicas restart, other writers die.
    HealAll,
    /// The current writer crashes; a last one attaches with a full reconciliation.
    FinalAttach,
    /// The final reconciliation took too long.
    Deadline,
}

#[derive(Debug)]
struct ReplicaNode {
    core: Option<Replica>,
    store: MemStore,
    incarnation: u64,
    queue: VecDeque<(u64, StoreOp)>,
    busy_until: u64,
}

#[derive(Debug)]
struct WriterNode {
    core: Option<Writer>,
    node: usize,
    ready_seen: bool,
    /// A newer writer finished attaching: what this one sends now is stale.
    superseded: bool,
    fua: BTreeSet<OpId>,
    inflight: usize,
}

struct World {
    now: u64,
    rng: Rng,
    trace: bool,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    replicas: Vec<ReplicaNode>,
    writers: Vec<WriterNode>,
    current: usize,
    meta: VolumeMeta,
    blocked: [[bool; REPLICAS]; REPLICAS],
    drop_p: f64,
    dup_p: f64,
    max_delay: u64,
    workload: bool,
    faults: bool,
    finishing: Option<usize>,
    final_reads: bool,
    done: bool,
    checker: Checker,
    processed: u64,
    op_bytes: u64,
}

/// Runs one seed. With `trace`, prints every event.
pub fn run(seed: u64, trace: bool) -> Outcome {
    let mut rng = Rng::new(seed);
    let drop_p = [0.0, 0.01, 0.05, 0.1][rng.index(4)];
    let dup_p = [0.0, 0.02, 0.1][rng.index(3)];
    let max_delay = rng.range(1, 15);
    let mut w = World {
        now: 0,
        rng,
        trace,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        replicas: (0..REPLICAS)
            .map(|i| ReplicaNode {
                core: Some(Replica::new(rid(i), 1, Recovered::default())),
                store: MemStore::default(),
                incarnation: 1,
                queue: VecDeque::new(),
                busy_until: 0,
            })
            .collect(),
        writers: Vec::new(),
        current: 0,
        meta: VolumeMeta::new(),
        blocked: [[false; REPLICAS]; REPLICAS],
        drop_p,
        dup_p,
        max_delay,
        workload: true,
        faults: true,
        finishing: None,
        final_reads: false,
        done: false,
        checker: Checker::default(),
        processed: 0,
        op_bytes: 0,
    };
    w.log(format!(
        "seed {seed}: drop {drop_p}, dup {dup_p}, delay 1..={max_delay}ms"
    ));
    w.start_writer(0, false);
    w.schedule(1, Ev::Workload);
    w.schedule_faults();
    w.schedule(RUN_MS, Ev::Fault(Fault::HealAll));
    w.run_loop();
    let c = &w.checker;
    let summary = format!(
        "seed {seed}: {} events, {} writes acked, {} reads checked, {} flushes, {} EIO, {} fenced, {} writers",
        w.processed,
        c.acked_writes,
        c.reads_checked,
        c.flushes,
        c.eio,
        c.fenced,
        w.writers.len()
    );
    Outcome {
        violations: w.checker.violations,
        summary,
    }
}

fn rid(i: usize) -> ReplicaId {
    ReplicaId(u8::try_from(i).unwrap_or(u8::MAX))
}

impl World {
    fn log(&self, line: String) {
        if self.trace {
            println!("t={:>5} {line}", self.now);
        }
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn schedule_faults(&mut self) {
        let mut t = 30;
        loop {
            t += self.rng.range(20, 120);
            if t >= RUN_MS - 50 {
                break;
            }
            let node = self.rng.index(REPLICAS);
            let fault = match self.rng.range(0, 99) {
                0..=24 => Fault::Partition {
                    node,
                    mode: self.rng.range(0, 2),
                },
                25..=44 => Fault::CrashReplica { r: node },
                45..=64 => Fault::Corrupt,
                65..=72 => Fault::CrashWriter,
                73..=80 => Fault::StaleWriter { node },
                _ => continue,
            };
            self.seq += 1;
            self.queue.push(Reverse((t, self.seq)));
            self.events.insert(self.seq, Ev::Fault(fault));
        }
    }

    fn run_loop(&mut self) {
        while let Some(Reverse((t, id))) = self.queue.pop() {
            let ev = self.events.remove(&id).expect("scheduled");
            assert!(t >= self.now, "time never goes back");
            self.now = t;
            self.processed += 1;
            if self.processed > 5_000_000 {
                self.checker
                    .violation(self.now, "event limit reached (livelock?)".into());
                return;
            }
            self.step(ev);
            if self.done {
                return;
            }
        }
        self.checker
            .violation(self.now, "event queue ran dry before the end".into());
    }

    /// Handles one event.
    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::ToReplica { r, from, bytes } => {
                let Ok(Message::Request(request)) = decode(&bytes) else {
                    self.checker
                        .violation(self.now, "a request did not decode".into());
                    return;
                };
                if self.replicas[r].core.is_none() {
                    return;
                }
                self.log(format!(
                    "w{from} -> r{r}: {:?}",
                    short(&Message::Request(request.clone()))
                ));
                let from_peer = u32::try_from(from).unwrap_or(u32::MAX);
                let core = self.replicas[r].core.as_mut().expect("up");
                let actions = core.handle(ReplicaEvent::Request {
                    from: from_peer,
                    request,
                });
                self.replica_actions(r, actions);
            }
            Ev::ToWriter { w, from, bytes } => {
                let Ok(Message::Reply(reply)) = decode(&bytes) else {
                    self.checker
                        .violation(self.now, "a reply did not decode".into());
                    return;
                };
                if self.writers[w].core.is_none() {
                    return;
                }
                self.log(format!(
                    "r{from} -> w{w}: {:?}",
                    short(&Message::Reply(reply.clone()))
                ));
                self.writer_event(
                    w,
                    WriterEvent::Reply {
                        from: rid(from),
                        reply,
                    },
                );
            }
            Ev::StoreStep { r, incarnation } => {
                let node = &mut self.replicas[r];
                if node.core.is_none() || node.incarnation != incarnation {
                    return;
                }
                let Some((token, op)) = node.queue.pop_front() else {
                    return;
                };
                let result = node.store.execute(&op);
                let actions = node
                    .core
                    .as_mut()
                    .expect("up")
                    .handle(ReplicaEvent::StoreDone { token, result });
                self.replica_actions(r, actions);
            }
            Ev::Tick { w } => {
                if self.writers[w].core.is_some() {
                    self.writer_event(w, WriterEvent::Tick);
                    self.schedule(TICK_MS, Ev::Tick { w });
                }
                let failed = self.writers[w].core.as_ref().is_some_and(|c| c.is_failed());
                if failed && w == self.current && self.finishing.is_none() {
                    // The session failed (its copies lost acknowledged writes): the
                    // operator attaches again, as a new session.
                    self.writers[w].core = None;
                    let node = self.writers[w].node;
                    self.start_writer(node, false);
                }
                self.check_finish();
            }
            Ev::MetaCas {
                w,
                expected,
                proposed,
            } => {
                let event = if self.meta.epoch == expected {
                    self.log(format!(
                        "meta: epoch {} -> {} by w{w}, in_sync {:?}",
                        expected.0, proposed.epoch.0, proposed.in_sync
                    ));
                    self.meta = proposed;
                    // A copy left the in-sync set: what only it held is no longer promised.
                    self.analyse_loss();
                    WriterEvent::EpochGranted {
                        meta: self.meta.clone(),
                    }
                } else {
                    self.log(format!(
                        "meta: CAS of w{w} expecting {} refused (at {})",
                        expected.0, self.meta.epoch.0
                    ));
                    WriterEvent::EpochConflict {
                        current: self.meta.clone(),
                    }
                };
                let d = self.rng.range(1, META_DELAY_MS);
                self.schedule(d, Ev::MetaReply { w, event });
            }
            Ev::MetaReply { w, event } => {
                if self.writers[w].core.is_some() {
                    self.writer_event(w, event);
                }
            }
            Ev::Workload => {
                if self.workload {
                    self.workload_step();
                    let d = self.rng.range(1, 4);
                    self.schedule(d, Ev::Workload);
                }
            }
            Ev::Fault(f) => self.fault(f),
        }
    }

    fn replica_actions(&mut self, r: usize, actions: Vec<ReplicaAction>) {
        for a in actions {
            match a {
                ReplicaAction::Send { to, reply } => {
                    let w = usize::try_from(to).unwrap_or(usize::MAX);
                    let Some(writer) = self.writers.get(w) else {
                        continue;
                    };
                    let bytes = encode(&Message::Reply(reply));
                    let dst = writer.node;
                    self.transmit(r, dst, Ev::ToWriter { w, from: r, bytes });
                }
                ReplicaAction::Store { token, op } => {
                    let node = &mut self.replicas[r];
                    node.queue.push_back((token, op));
                    let start = node.busy_until.max(self.now);
                    let done = start + self.rng.range(0, 2);
                    let node = &mut self.replicas[r];
                    node.busy_until = done;
                    let incarnation = node.incarnation;
                    let delay = done - self.now;
                    self.schedule(delay, Ev::StoreStep { r, incarnation });
                }
            }
        }
    }

    /// Puts a message on the network from node `src` to node `dst`.
    fn transmit(&mut self, src: usize, dst: usize, ev: Ev) {
        if src == dst {
            let d = self.rng.range(0, 1);
            self.schedule(d, ev);
            return;
        }
        if self.blocked[src][dst] || self.rng.chance(self.drop_p) {
            return;
        }
        let copies = if self.rng.chance(self.dup_p) { 2 } else { 1 };
        for _ in 0..copies {
            let d = self.rng.range(1, self.max_delay);
            self.schedule(d, ev_take(&ev));
        }
    }

    fn start_writer(&mut self, node: usize, full_reconcile: bool) -> usize {
        let cfg = WriterConfig {
            node: u32::try_from(node).unwrap_or(u32::MAX),
            local: Some(rid(node)),
            resend_ms: 10,
            replica_timeout_ms: 60,
            io_timeout_ms: 500,
            probe_ms: 40,
            volume_blocks: BLOCKS,
            sync_range: 8,
            full_reconcile,
        };
        let (writer, actions) = Writer::attach(cfg, self.meta.clone());
        let w = self.writers.len();
        self.writers.push(WriterNode {
            core: Some(writer),
            node,
            ready_seen: false,
            superseded: false,
            fua: BTreeSet::new(),
            inflight: 0,
        });
        self.log(format!(
            "writer w{w} starts on node {node} (attaching at epoch {})",
            self.meta.epoch.0 + 1
        ));
        self.current = w;
        self.writer_actions(w, actions);
        self.schedule(TICK_MS, Ev::Tick { w });
        w
    }

    fn writer_event(&mut self, w: usize, event: WriterEvent) {
        let Some(core) = self.writers[w].core.as_mut() else {
            return;
        };
        let actions = core.handle(self.now, event);
        self.writer_actions(w, actions);
    }

    fn writer_actions(&mut self, w: usize, actions: Vec<WriterAction>) {
        // A writer that finished attaching fences every older one.
        let ready = self.writers[w].core.as_ref().is_some_and(|c| c.is_ready());
        if ready && !self.writers[w].ready_seen {
            self.writers[w].ready_seen = true;
            let epoch = self.writers[w]
                .core
                .as_ref()
                .map_or(Epoch(0), |c| c.epoch());
            self.log(format!("writer w{w} ready at epoch {}", epoch.0));
            // Every writer below this epoch is fenced now. One still attaching may win a
            // later CAS and become ready itself: then it is current again (it sends no
            // writes before it is ready).
            for (i, other) in self.writers.iter_mut().enumerate() {
                other.superseded = i != w && other.core.as_ref().is_none_or(|c| c.epoch() < epoch);
            }
        }
        for a in actions {
            match a {
                WriterAction::Send { to, request } => {
                    if let RequestBody::Write { block, version, .. } = &request.body {
                        let stale = self.writers[w].superseded;
                        self.checker.on_write_sent(self.now, *block, version, stale);
                    }
                    let bytes = encode(&Message::Request(request));
                    let src = self.writers[w].node;
                    self.transmit(
                        src,
                        to.index(),
                        Ev::ToReplica {
                            r: to.index(),
                            from: w,
                            bytes,
                        },
                    );
                }
                WriterAction::RequestEpochChange { expected, proposed } => {
                    let d = self.rng.range(1, META_DELAY_MS);
                    self.schedule(
                        d,
                        Ev::MetaCas {
                            w,
                            expected,
                            proposed,
                        },
                    );
                }
                WriterAction::Complete { op, result } => {
                    self.log(format!("w{w} completes op {op}: {result:?}"));
                    let fua = self.writers[w].fua.remove(&op);
                    self.writers[w].inflight = self.writers[w].inflight.saturating_sub(1);
                    let stores: Vec<&MemStore> = self.replicas.iter().map(|r| &r.store).collect();
                    let applied = |seq| {
                        stores
                            .iter()
                            .filter(|s| s.seen_writes.contains(&seq))
                            .count()
                    };
                    self.checker
                        .on_complete(self.now, w, op, &result, fua, applied);
                }
            }
        }
    }

    fn workload_step(&mut self) {
        let mut w = self.current;
        // Sometimes feed a fenced-but-running writer too.
        let alive: Vec<usize> = (0..self.writers.len())
            .filter(|i| *i != w && self.writers[*i].core.is_some())
            .collect();
        if !alive.is_empty() && self.rng.chance(0.3) {
            w = alive[self.rng.index(alive.len())];
        }
        if self.writers[w].core.is_none() || self.writers[w].inflight >= MAX_INFLIGHT {
            return;
        }
        let block = BlockIndex(if self.rng.chance(0.7) {
            self.rng.range(0, 7)
        } else {
            self.rng.range(0, BLOCKS - 1)
        });
        let kind = self.rng.range(0, 99);
        self.op_bytes += 1;
        let mut bytes = self.op_bytes.to_le_bytes().to_vec();
        bytes.extend_from_slice(&self.rng.next_u64().to_le_bytes());
        let now = self.now;
        let core = self.writers[w].core.as_mut().expect("alive");
        let (op, actions) = match kind {
            0..=49 => core.write(now, block, bytes, false),
            50..=59 => core.trim(now, block),
            60..=84 => core.read(now, block),
            85..=92 => core.flush(now),
            _ => core.write(now, block, bytes, true),
        };
        self.writers[w].inflight += 1;
        match kind {
            0..=59 => self.checker.on_write_submitted(w, op),
            60..=84 => self.checker.on_read_submitted(w, op, block),
            85..=92 => self.checker.on_flush_submitted(w, op),
            _ => {
                self.checker.on_write_submitted(w, op);
                self.writers[w].fua.insert(op);
            }
        }
        self.log(format!(
            "w{w} submits op {op}: kind {kind} block {}",
            block.0
        ));
        self.writer_actions(w, actions);
    }

    fn fault(&mut self, f: Fault) {
        if !self.faults
            && !matches!(
                f,
                Fault::HealAll
                    | Fault::FinalAttach
                    | Fault::Deadline
                    | Fault::StartWriter { .. }
                    | Fault::RestartReplica { .. }
            )
        {
            return;
        }
        self.log(format!("FAULT {f:?}"));
        match f {
            Fault::Partition { node, mode } => {
                for x in 0..REPLICAS {
                    if x != node {
                        if mode != 2 {
                            self.blocked[x][node] = true;
                        }
                        if mode != 1 {
                            self.blocked[node][x] = true;
                        }
                    }
                }
                let d = self.rng.range(30, 400);
                self.schedule(d, Ev::Fault(Fault::Heal { node }));
            }
            Fault::Heal { node } => {
                for x in 0..REPLICAS {
                    self.blocked[x][node] = false;
                    self.blocked[node][x] = false;
                }
            }
            Fault::CrashReplica { r } => {
                if self.replicas[r].core.is_none() {
                    return;
                }
                let node = &mut self.replicas[r];
                node.core = None;
                node.queue.clear();
                node.store.crash(&mut self.rng);
                self.analyse_loss();
                let d = self.rng.range(10, 300);
                self.schedule(d, Ev::Fault(Fault::RestartReplica { r }));
            }
            Fault::RestartReplica { r } => {
                let node = &mut self.replicas[r];
                if node.core.is_some() {
                    return;
                }
                node.incarnation += 1;
                let rec = Recovered {
                    epoch: node.store.durable_epoch,
                    watermark: node.store.durable_watermark,
                };
                node.core = Some(Replica::new(rid(r), node.incarnation, rec));
                node.busy_until = self.now;
            }
            Fault::Corrupt => {
                let r = self.rng.index(REPLICAS);
                let b = BlockIndex(self.rng.range(0, BLOCKS - 1));
                // At most one copy of a block is bad at a time.
                if (0..REPLICAS).any(|x| self.replicas[x].store.is_corrupt(b)) {
                    return;
                }
                let bit = self.rng.next_u64();
                let flipped = self.replicas[r].store.corrupt(b, bit);
                self.log(format!("corrupt r{r} block {}: {flipped}", b.0));
            }
            Fault::CrashWriter => {
                let w = self.current;
                if self.writers[w].core.take().is_some() {
                    let node = self.rng.index(REPLICAS);
                    let d = self.rng.range(5, 100);
                    self.schedule(d, Ev::Fault(Fault::StartWriter { node }));
                }
            }
            Fault::StartWriter { node } => {
                if self.writers[self.current].core.is_none() {
                    self.start_writer(node, false);
                }
            }
            Fault::StaleWriter { node } => {
                let old = self.current;
                if self.writers[old].core.is_none() {
                    return;
                }
                let node = if node == self.writers[old].node {
                    (node + 1) % REPLICAS
                } else {
                    node
                };
                self.start_writer(node, false);
                let d = self.rng.range(100, 500);
                self.schedule(d, Ev::Fault(Fault::KillWriter { w: old }));
            }
            Fault::KillWriter { w } => {
                if w != self.current {
                    self.writers[w].core = None;
                }
            }
            Fault::HealAll => {
                self.workload = false;
                self.faults = false;
                self.drop_p = 0.0;
                self.dup_p = 0.0;
                self.blocked = [[false; REPLICAS]; REPLICAS];
                for r in 0..REPLICAS {
                    self.fault(Fault::RestartReplica { r });
                }
                for w in 0..self.writers.len() {
                    if w != self.current {
                        self.writers[w].core = None;
                    }
                }
                if self.writers[self.current].core.is_none() {
                    let node = self.rng.index(REPLICAS);
                    self.start_writer(node, false);
                }
                // Let operations in flight finish or time out, then the last attach.
                self.schedule(1000, Ev::Fault(Fault::FinalAttach));
            }
            Fault::FinalAttach => {
                self.writers[self.current].core = None;
                let w = self.start_writer(0, true);
                self.finishing = Some(w);
                self.schedule(CONVERGE_MS, Ev::Fault(Fault::Deadline));
            }
            Fault::Deadline => {
                self.checker.violation(
                    self.now,
                    format!("no convergence within {CONVERGE_MS}ms of the final attach"),
                );
                self.done = true;
            }
        }
    }

    /// After a crash: an acknowledged, unflushed write whose every in-sync holder lost
    /// it is legitimately gone (the contract promises only flushed writes).
    fn analyse_loss(&mut self) {
        for (b, acked) in self.checker.acked_above_durable() {
            let holders = (0..REPLICAS)
                .filter(|x| self.meta.in_sync[*x])
                .filter(|x| {
                    self.replicas[*x]
                        .store
                        .live
                        .get(&b)
                        .is_some_and(|v| v.seq >= acked)
                })
                .count();
            if holders == 0 {
                self.log(format!(
                    "block {} lost its unflushed acknowledged seq {acked}",
                    b.0
                ));
                self.checker.relax(b);
            }
        }
    }

    /// The final writer converged: read everything through it, then compare copies.
    fn check_finish(&mut self) {
        let Some(w) = self.finishing else {
            return;
        };
        let Some(core) = self.writers[w].core.as_ref() else {
            return;
        };
        if !(core.is_idle() && core.in_sync_copies() == REPLICAS) {
            return;
        }
        if !self.final_reads {
            self.final_reads = true;
            for b in 0..BLOCKS {
                let now = self.now;
                let core = self.writers[w].core.as_mut().expect("alive");
                let (op, actions) = core.read(now, BlockIndex(b));
                self.writers[w].inflight += 1;
                self.checker.on_read_submitted(w, op, BlockIndex(b));
                self.writer_actions(w, actions);
            }
            return;
        }
        let copies: Vec<_> = self.replicas.iter().map(|r| r.store.live.clone()).collect();
        let refs: Vec<_> = copies.iter().collect();
        self.checker.check_final(self.now, &refs, BLOCKS);
        self.log("final checks done".into());
        self.done = true;
    }
}

/// Moves an event out for scheduling (events are not Clone to keep payloads single).
fn ev_take(ev: &Ev) -> Ev {
    match ev {
        Ev::ToReplica { r, from, bytes } => Ev::ToReplica {
            r: *r,
            from: *from,
            bytes: bytes.clone(),
        },
        Ev::ToWriter { w, from, bytes } => Ev::ToWriter {
            w: *w,
            from: *from,
            bytes: bytes.clone(),
        },
        _ => unreachable!("only messages travel"),
    }
}

/// A one-line rendering of a message for traces (payload bytes elided).
fn short(m: &Message) -> String {
    let s = format!("{m:?}");
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("bytes: [") {
        out.push_str(&rest[..i]);
        out.push_str("bytes: [..]");
        rest = rest[i..].find(']').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}
