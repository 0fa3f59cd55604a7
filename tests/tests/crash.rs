//! Kill the node with SIGKILL while a client writes and flushes; after a restart every
//! flushed write must read back exactly, and no block may be torn.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trireme_tests::{DevCluster, ok, tool};

const BLOCKS: u64 = 2048; // 8 MiB volume
const BS: usize = 4096;

/// Content of write number `k`: its number in the first 8 bytes, then a fill byte.
fn content(k: u64) -> Vec<u8> {
    let mut b = vec![u8::try_from(k % 251).unwrap() + 1; BS];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

fn target(k: u64) -> u64 {
    (k * 7919) % BLOCKS
}

#[test]
fn flushed_writes_survive_kill_9() {
    let c = DevCluster::start();
    c.create_volume("crash", "8M");
    for round in 0..3 {
        // The writer: write k to block target(k); every 8 writes FLUSH and report the
        // last k the flush covered. Runs until the node dies under it.
        let script = format!(
            r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri("{uri}")
k = {start}
while True:
    b = bytearray([(k % 251) + 1]) * 4096
    b[0:8] = k.to_bytes(8, "little")
    h.pwrite(bytes(b), ((k * 7919) % {blocks}) * 4096)
    if k % 8 == 7:
        h.flush()
        print("flushed", k, flush=True)
    k += 1
"#,
            uri = c.uri("crash"),
            start = round * 1_000_000,
            blocks = BLOCKS
        );
        let mut writer = tool("nbdsh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdsh");
        let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
        let mut last_flushed = None;
        let deadline = Instant::now() + Duration::from_millis(1500 + 700 * round);
        while Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) => {
                    last_flushed = l
                        .strip_prefix("flushed ")
                        .and_then(|n| n.parse::<u64>().ok())
                }
                _ => break,
            }
        }
        c.kill9();
        // Lines already printed (flushes that completed before the kill) count too.
        for l in lines.map_while(Result::ok) {
            if let Some(n) = l
                .strip_prefix("flushed ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                last_flushed = Some(n);
            }
        }
        let _ = writer.wait();
        let last_flushed = last_flushed.expect("the writer flushed at least once before the kill");
        c.ok(&["dev", "up"]);

        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("after.raw");
        ok(Command::new("qemu-img").args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &c.uri("crash"),
            raw.to_str().unwrap(),
        ]));
        let data = std::fs::read(&raw).unwrap();
        let start = round * 1_000_000;
        let mut checked = 0;
        for block in 0..BLOCKS {
            let got = &data[usize::try_from(block).unwrap() * BS..][..BS];
            // The last flushed write to this block in this round, if any.
            let flushed = (start..=last_flushed).rev().find(|&k| target(k) == block);
            let Some(want) = flushed else { continue };
            let got_k = u64::from_le_bytes(got[..8].try_into().unwrap());
            // A later, unflushed write may have landed too, but whole: never torn,
            // never older than the flushed one.
            assert!(
                got_k >= want && got_k < start + 1_000_000,
                "block {block}: holds write {got_k}, flushed {want}"
            );
            assert_eq!(
                got,
                &content(got_k)[..],
                "block {block}: torn or altered write {got_k}"
            );
            checked += 1;
        }
        assert!(checked > 0, "round {round}: nothing flushed to check");
        eprintln!("round {round}: last flushed write {last_flushed}, {checked} blocks verified");
    }
}
