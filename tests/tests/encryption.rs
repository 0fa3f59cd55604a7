//! Data at rest is ciphertext: a pattern written through NBD appears nowhere in the
//! node's files.

use std::process::Command;

use trireme_tests::{DevCluster, ok};

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn raw_files_hold_no_plaintext() {
    let c = DevCluster::start();
    c.create_volume("secret", "16M");
    let marker = b"TRIREME-PLAINTEXT-MARKER-7f3a91";
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("pattern.raw");
    let block: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
    std::fs::write(&src, &block).unwrap();
    ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &c.uri("secret"),
    ]));
    ok(Command::new("qemu-io").args(["-f", "raw", &c.uri("secret"), "-c", "flush"]));
    assert_eq!(c.volume_info("secret")["allocated_bytes"], 1 << 20);
    c.ok(&["dev", "down"]); // everything on disk, rocksdb memtables flushed or in the WAL

    let mut files = Vec::new();
    files_under(&c.store_dir(), &mut files);
    let mut scanned = 0usize;
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        scanned += bytes.len();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext found in {}",
            f.display()
        );
    }
    assert!(
        scanned >= 1 << 20,
        "the data files hold at least the written megabyte ({scanned} bytes scanned)"
    );

    // And the data is still there, readable through the node.
    c.ok(&["dev", "up"]);
    let out = dir.path().join("back.raw");
    ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &c.uri("secret"),
        out.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&out).unwrap()[..1 << 20] == block[..]);
}
