//! Crash test: a child process (this test binary, re-run with an environment switch)
//! writes deterministic blocks and syncs every few writes, reporting each completed
//! sync on stdout; the parent kills it with SIGKILL at a random moment, reopens the
//! store and checks that every write completed before the last reported sync is there
//! with exactly its content and version, and that no block is torn or fails its CRC.
//! Discards of long runs are mixed in, so freed slots are reused, punched and truncated
//! while the child dies. Several rounds run on the same store, so reopened stores are
//! written to and killed again.
//!
//! In the snapshot variant the child also creates and deletes snapshots after its
//! syncs (so a kill lands in the middle of either now and then): every snapshot the
//! store lists after the kill must read exactly the volume as it was when it was taken,
//! and snapshots reported deleted must be gone.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use common::{consistent, open, write};
use trireme_replica::{BlockWrite, SnapId, Store};

/// Set in the child: the store directory.
const CHILD_DIR: &str = "TRIREME_CRASH_CHILD_DIR";
/// Set in the child: first sequence number of its round.
const CHILD_BASE: &str = "TRIREME_CRASH_CHILD_BASE";
/// Set in the child: create and delete snapshots after syncs.
const CHILD_SNAPSHOTS: &str = "TRIREME_CRASH_CHILD_SNAPSHOTS";
/// Most snapshots the child keeps before it deletes the oldest.
const CHILD_KEEPS: usize = 4;

const VOLUME: u64 = 0xc0ffee;
/// Blocks written to: few enough that they are overwritten often (slot reuse, holes,
/// truncation all happen).
const BLOCKS: u64 = 384;
/// Writes between syncs.
const SYNC_EVERY: u64 = 40;
/// Sequence numbers of round r start at r * ROUND_SPAN.
const ROUND_SPAN: u64 = 1 << 32;
/// The child stops by itself after this long (the parent kills it well before).
const CHILD_LIMIT: Duration = Duration::from_secs(60);

fn mix(seq: u64) -> u64 {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// Block written by sequence number `seq` (its version is `seq`).
fn block_of(seq: u64) -> u64 {
    mix(seq) % BLOCKS
}

/// Blocks one discard removes: enough for the freed run to be punched.
const DISCARD_LEN: u64 = 96;

/// One operation of the child, starting at sequence number `seq`.
enum Op {
    /// Writes sequence numbers `seq..seq + n` (block `block_of(s)`, version `s`): 1 to
    /// 8 of them in one call, so batches and single writes mix.
    Write(u64),
    /// Discards `DISCARD_LEN` blocks from `start` (clipped to the volume); uses one
    /// sequence number.
    Discard(u64),
}

impl Op {
    fn at(seq: u64) -> Op {
        if mix(seq ^ 0xd15c).is_multiple_of(61) {
            Op::Discard(mix(seq) % BLOCKS)
        } else {
            Op::Write(1 + (mix(seq ^ 0x5555) % 8))
        }
    }

    /// Sequence numbers the operation uses.
    fn len(&self) -> u64 {
        match self {
            Op::Write(n) => *n,
            Op::Discard(_) => 1,
        }
    }
}

/// Version held by each block of the volume (`None`: unallocated).
type Model = Vec<Option<u64>>;

/// Applies the operation starting at `seq` to `model`.
fn apply(model: &mut Model, seq: u64, op: &Op) {
    let mut set = |block: u64, version: Option<u64>| {
        if let Some(entry) = usize::try_from(block).ok().and_then(|b| model.get_mut(b)) {
            *entry = version;
        }
    };
    match *op {
        // In a batch that hits a block twice the later (higher) version wins.
        Op::Write(n) => (seq..seq + n).for_each(|s| set(block_of(s), Some(s))),
        Op::Discard(start) => (start..(start + DISCARD_LEN).min(BLOCKS)).for_each(|b| set(b, None)),
    }
}

/// The child's side: writes forever (until killed), printing `synced N` after each
/// sync, where every sequence number up to N was written before that sync began.
///
/// Run by the parent as `<test binary> child_writer --exact`; a no-op otherwise.
#[test]
fn child_writer() {
    let (Ok(dir), Ok(base)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_BASE)) else {
        return;
    };
    let base: u64 = base.parse().unwrap_or_else(|e| panic!("bad base: {e}"));
    let snapshots = std::env::var(CHILD_SNAPSHOTS).is_ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(async move {
        let store = open(Path::new(&dir));
        if !store.volumes().contains(&VOLUME) {
            store
                .create_volume(VOLUME)
                .unwrap_or_else(|e| panic!("create: {e}"));
        }
        let started = Instant::now();
        let mut seq = base;
        let mut since_sync = 0;
        while started.elapsed() < CHILD_LIMIT {
            let op = Op::at(seq);
            let len = op.len();
            match op {
                Op::Write(n) => {
                    let writes: Vec<BlockWrite> =
                        (seq..seq + n).map(|s| write(block_of(s), s)).collect();
                    store
                        .write_blocks(VOLUME, writes)
                        .await
                        .unwrap_or_else(|e| panic!("write: {e}"));
                }
                Op::Discard(start) => store
                    .discard_blocks(VOLUME, start..(start + DISCARD_LEN).min(BLOCKS))
                    .await
                    .unwrap_or_else(|e| panic!("discard: {e}")),
            }
            seq += len;
            since_sync += len;
            if since_sync >= SYNC_EVERY {
                store.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
                println!("synced {}", seq - 1);
                since_sync = 0;
                if snapshots {
                    snapshot_step(&store, seq).await;
                }
            }
        }
    });
}

/// After the sync that covered every sequence number below `seq`: creates a snapshot
/// (printing `snapshot <id> <seq - 1>`), or deletes the oldest one (printing
/// `deleted <id>`), or neither.
async fn snapshot_step(store: &Store, seq: u64) {
    match mix(seq ^ 0x5a5a) % 3 {
        0 => {
            let id = store
                .create_snapshot(VOLUME)
                .await
                .unwrap_or_else(|e| panic!("create snapshot: {e}"));
            println!("snapshot {id} {}", seq - 1);
        }
        1 => {
            let list = store
                .snapshots(VOLUME)
                .unwrap_or_else(|e| panic!("list snapshots: {e}"));
            if list.len() >= CHILD_KEEPS
                && let Some(oldest) = list.first()
            {
                // A kill between this line and `deleted` may leave it either way.
                println!("deleting {}", oldest.id);
                store
                    .delete_snapshot(VOLUME, oldest.id)
                    .await
                    .unwrap_or_else(|e| panic!("delete snapshot: {e}"));
                println!("deleted {}", oldest.id);
            }
        }
        _ => {}
    }
}

/// Small xorshift for the kill timing; the seed is printed for replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What a child reported before it was killed.
#[derive(Debug, Default)]
struct Report {
    /// Last sequence number reported synced.
    synced: u64,
    /// Snapshots reported created: id and the last sequence number they hold.
    created: Vec<(SnapId, u64)>,
    /// Snapshots reported deleted.
    deleted: Vec<SnapId>,
    /// A snapshot whose deletion was reported begun and not finished: the kill may
    /// have come before or after its record was removed.
    deleting: Option<SnapId>,
}

/// Runs one child round and returns what it reported.
fn run_child(dir: &Path, base: u64, kill_after: Duration, snapshots: bool) -> Report {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut command = Command::new(exe);
    if snapshots {
        command.env(CHILD_SNAPSHOTS, "1");
    }
    let mut child = command
        .args([
            "child_writer",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_BASE, base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn child: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("child stdout"));
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            let event = match (words.first().copied(), number(1), number(2)) {
                (Some("synced"), Some(n), _) => Some(Event::Synced(n)),
                (Some("snapshot"), Some(id), Some(seq)) => Some(Event::Created(id, seq)),
                (Some("deleting"), Some(id), _) => Some(Event::Deleting(id)),
                (Some("deleted"), Some(id), _) => Some(Event::Deleted(id)),
                _ => None,
            };
            if let Some(event) = event {
                let _ = tx.send(event);
            }
        }
    });
    // Wait for the first sync, then let it run a random while and kill it.
    let first = rx.recv_timeout(Duration::from_secs(30));
    let mut report = Report::default();
    if let Ok(event) = first {
        report.add(event);
    } else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("child reported no sync within 30 s");
    }
    std::thread::sleep(kill_after);
    child.kill().unwrap_or_else(|e| panic!("kill: {e}")); // SIGKILL
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(!status.success(), "child exited by itself: {status}");
    let _ = reader.join();
    while let Ok(event) = rx.try_recv() {
        report.add(event);
    }
    report
}

/// One line of a child's report.
#[derive(Debug)]
enum Event {
    Synced(u64),
    Created(SnapId, u64),
    Deleting(SnapId),
    Deleted(SnapId),
}

impl Report {
    fn add(&mut self, event: Event) {
        match event {
            Event::Synced(n) => self.synced = self.synced.max(n),
            Event::Created(id, seq) => self.created.push((id, seq)),
            Event::Deleting(id) => self.deleting = Some(id),
            Event::Deleted(id) => {
                self.deleted.push(id);
                self.deleting = None;
            }
        }
    }
}

/// The model after every operation from `base` up to sequence number `upto`, applied to
/// `start`.
fn replay(start: &Model, base: u64, upto: u64) -> Model {
    let mut model = start.clone();
    let mut seq = base;
    while seq <= upto {
        let op = Op::at(seq);
        apply(&mut model, seq, &op);
        seq += op.len();
    }
    model
}

/// Each round kills the child and checks that the volume is exactly the result of a
/// prefix of the child's operations: every operation up to the last reported sync, and
/// possibly some after it (a killed process loses nothing it completed). Operations
/// are atomic (one index batch each), so nothing in between is allowed.
#[test]
fn killed_writer_loses_nothing_synced() {
    killed_rounds(false);
}

/// The same, with snapshots created and deleted after syncs.
#[test]
fn killed_writer_keeps_every_snapshot_exact() {
    killed_rounds(true);
}

fn killed_rounds(snapshots: bool) {
    let dir = common::tempdir();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) ^ d.as_secs().rotate_left(32))
        .unwrap_or(1)
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let blocks_len = usize::try_from(BLOCKS).unwrap_or(0);
    let mut model: Model = vec![None; blocks_len];
    // Content of every snapshot the store may hold, by id.
    let mut expected: BTreeMap<SnapId, Model> = BTreeMap::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    for round in 1..=4u64 {
        let base = round * ROUND_SPAN;
        let kill_after = Duration::from_millis(20 + rng.next() % 400);
        let report = run_child(dir.path(), base, kill_after, snapshots);
        let synced = report.synced;
        assert!(synced >= base, "round {round}: nothing synced");
        let round_start = model.clone();
        let mut seq = base;
        while seq <= synced {
            let op = Op::at(seq);
            apply(&mut model, seq, &op);
            seq += op.len();
        }

        let store = open(dir.path());
        let blocks = runtime
            .block_on(store.read_blocks(VOLUME, 0..BLOCKS))
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): read after kill: {e}"));
        let mut actual: Model = vec![None; blocks_len];
        for ((block, found), version) in (0u64..).zip(&blocks).zip(actual.iter_mut()) {
            if let Some((meta, data)) = found {
                assert!(
                    consistent(block, meta, data),
                    "round {round} (seed {seed}): block {block} data is not its version {}",
                    meta.version
                );
                *version = Some(meta.version);
            }
        }
        // The operations the child may have completed after its last reported sync:
        // fewer than SYNC_EVERY sequence numbers, plus one batch, before the next sync.
        let mut after = 0;
        let mut candidate = model.clone();
        while candidate != actual && seq <= synced + SYNC_EVERY + 8 {
            let op = Op::at(seq);
            apply(&mut candidate, seq, &op);
            seq += op.len();
            after += 1;
        }
        if candidate != actual {
            let diffs: Vec<String> = (0u64..)
                .zip(model.iter().zip(&actual))
                .filter(|(_, (m, a))| m != a)
                .take(8)
                .map(|(b, (m, a))| format!("block {b}: synced {m:?}, found {a:?}"))
                .collect();
            panic!(
                "round {round} (seed {seed}): volume is no prefix of the operations from the \
                 last sync on (synced +{}); {diffs:?}",
                synced - base
            );
        }
        let allocated = u64::try_from(actual.iter().flatten().count()).unwrap_or(0);
        assert_eq!(
            store.allocated_blocks(VOLUME).unwrap_or(0),
            allocated,
            "round {round} (seed {seed}): live count"
        );
        if snapshots {
            check_snapshots(&store, &runtime, &report, &mut expected, &round_start, base);
            println!(
                "round {round}: {} snapshots created, {} deleted, {} listed and verified",
                report.created.len(),
                report.deleted.len(),
                expected.len()
            );
        }
        model = actual;
        println!(
            "round {round}: killed after {kill_after:?}, synced up to +{}, {after} more \
             operations landed, {allocated} blocks verified",
            synced - base
        );
    }
}

/// Checks the snapshots listed after a kill: those reported created are there and read
/// as the volume after the operations they were taken after; one taken but not reported
/// reads as the volume at the last reported sync (it is taken right after a sync); those
/// reported deleted are gone, and one whose deletion was cut short by the kill is either
/// gone or intact. Updates `expected` to the listed snapshots.
fn check_snapshots(
    store: &Store,
    runtime: &tokio::runtime::Runtime,
    report: &Report,
    expected: &mut BTreeMap<SnapId, Model>,
    round_start: &Model,
    base: u64,
) {
    for &(id, seq) in &report.created {
        expected.insert(id, replay(round_start, base, seq));
    }
    for id in &report.deleted {
        expected.remove(id);
    }
    let listed: Vec<SnapId> = store
        .snapshots(VOLUME)
        .unwrap_or_else(|e| panic!("list snapshots: {e}"))
        .iter()
        .map(|s| s.id)
        .collect();
    for id in &report.deleted {
        assert!(
            !listed.contains(id),
            "snapshot {id} was reported deleted and is still listed"
        );
    }
    if let Some(id) = report.deleting {
        let kept = listed.contains(&id);
        println!(
            "the kill cut the deletion of snapshot {id} short: {}",
            if kept { "still listed" } else { "gone" }
        );
        if !kept {
            expected.remove(&id);
        }
    }
    for (&id, _) in expected.iter() {
        assert!(
            listed.contains(&id),
            "snapshot {id} was reported created and is gone"
        );
    }
    let mut kept = BTreeMap::new();
    for id in listed {
        let want = match expected.get(&id) {
            Some(model) => model.clone(),
            // Created, killed before it was reported: taken after the last sync.
            None => replay(round_start, base, report.synced),
        };
        let found = runtime
            .block_on(store.read_blocks_at(VOLUME, Some(id), 0..BLOCKS))
            .unwrap_or_else(|e| panic!("read snapshot {id}: {e}"));
        let mut actual: Model = vec![None; want.len()];
        for ((block, found), version) in (0u64..).zip(&found).zip(actual.iter_mut()) {
            if let Some(found) = found {
                assert!(
                    consistent(block, &found.meta, &found.data),
                    "snapshot {id}: block {block} data is not its version"
                );
                *version = Some(found.meta.version);
            }
        }
        if actual != want {
            let diffs: Vec<String> = (0u64..)
                .zip(want.iter().zip(&actual))
                .filter(|(_, (w, a))| w != a)
                .take(8)
                .map(|(b, (w, a))| format!("block {b}: expected {w:?}, found {a:?}"))
                .collect();
            panic!("snapshot {id} differs: {diffs:?}");
        }
        kept.insert(id, actual);
    }
    *expected = kept;
}
