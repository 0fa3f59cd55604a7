//! Crash test: a child process (this test binary, re-run with an environment switch)
//! writes deterministic blocks and syncs every few writes, reporting each completed
//! sync on stdout; the parent kills it with SIGKILL at a random moment, reopens the
//! store and checks that every write completed before the last reported sync is there
//! with exactly its content and version, and that no block is torn or fails its CRC.
//! Discards of long runs are mixed in, so freed slots are reused, punched and truncated
//! while the child dies. Several rounds run on the same store, so reopened stores are
//! written to and killed again.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{consistent, open, write};
use trireme_replica::BlockWrite;

/// Set in the child: the store directory.
const CHILD_DIR: &str = "TRIREME_CRASH_CHILD_DIR";
/// Set in the child: first sequence number of its round.
const CHILD_BASE: &str = "TRIREME_CRASH_CHILD_BASE";

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

/// What a block must hold after a crash: at least `version`, or nothing at all when
/// `may_be_absent` (it was last discarded, and versions from `version` on are writes
/// that came after the discard).
#[derive(Debug, Clone, Copy)]
struct Floor {
    version: u64,
    may_be_absent: bool,
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
            }
        }
    });
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

/// Runs one child round and returns the last sequence number it reported synced.
fn run_child(dir: &Path, base: u64, kill_after: Duration) -> u64 {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut child = Command::new(exe)
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
            if let Some(n) = line.strip_prefix("synced ")
                && let Ok(n) = n.trim().parse::<u64>()
            {
                let _ = tx.send(n);
            }
        }
    });
    // Wait for the first sync, then let it run a random while and kill it.
    let first = rx.recv_timeout(Duration::from_secs(30));
    if first.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("child reported no sync within 30 s");
    }
    std::thread::sleep(kill_after);
    child.kill().unwrap_or_else(|e| panic!("kill: {e}")); // SIGKILL
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(!status.success(), "child exited by itself: {status}");
    let _ = reader.join();
    let mut last = first.unwrap_or(0);
    while let Ok(n) = rx.try_recv() {
        last = last.max(n);
    }
    last
}

#[test]
fn killed_writer_loses_nothing_synced() {
    let dir = common::tempdir();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) ^ d.as_secs().rotate_left(32))
        .unwrap_or(1)
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    // What each block must hold: from the last write or discard known durable.
    let mut durable: HashMap<u64, Floor> = HashMap::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    for round in 1..=4u64 {
        let base = round * ROUND_SPAN;
        let kill_after = Duration::from_millis(20 + rng.next() % 400);
        let synced = run_child(dir.path(), base, kill_after);
        assert!(synced >= base, "round {round}: nothing synced");

        // Every operation up to `synced` is durable; later ones may or may not be.
        let mut seq = base;
        while seq <= synced {
            let op = Op::at(seq);
            match op {
                Op::Write(n) => {
                    for s in seq..seq + n {
                        let floor = Floor {
                            version: s,
                            may_be_absent: false,
                        };
                        durable.insert(block_of(s), floor);
                    }
                }
                Op::Discard(start) => {
                    for block in start..(start + DISCARD_LEN).min(BLOCKS) {
                        let floor = Floor {
                            version: seq + 1,
                            may_be_absent: true,
                        };
                        durable.insert(block, floor);
                    }
                }
            }
            seq += op.len();
        }
        let store = open(dir.path());
        let blocks = runtime
            .block_on(store.read_blocks(VOLUME, 0..BLOCKS))
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): read after kill: {e}"));
        let mut allocated = 0;
        for (block, found) in (0u64..).zip(&blocks) {
            let expected = durable.get(&block).copied();
            match (found, expected) {
                (None, None) => {}
                (None, Some(floor)) => assert!(
                    floor.may_be_absent,
                    "round {round} (seed {seed}): block {block} lost version {}",
                    floor.version
                ),
                (Some((meta, data)), expected) => {
                    allocated += 1;
                    let v = meta.version;
                    assert!(
                        expected.is_none_or(|floor| v >= floor.version),
                        "round {round} (seed {seed}): block {block} has version {v}, older than the synced {expected:?}"
                    );
                    assert_eq!(
                        block_of(v),
                        block,
                        "round {round} (seed {seed}): block {block} holds a version written elsewhere"
                    );
                    assert!(
                        consistent(block, meta, data),
                        "round {round} (seed {seed}): block {block} data is not version {v}"
                    );
                    // A later version that survived is now the floor.
                    let floor = Floor {
                        version: v,
                        may_be_absent: false,
                    };
                    durable.insert(block, floor);
                }
            }
        }
        assert_eq!(
            store.allocated_blocks(VOLUME).unwrap_or(0),
            allocated,
            "round {round} (seed {seed}): live count"
        );
        println!(
            "round {round}: killed after {kill_after:?}, synced up to +{}, {allocated} blocks verified",
            synced - base
        );
    }
}
