//! `trireme volume import` and `volume export` end to end: images made here by qemu-img
//! (with random content) and real images from other tools, imported into a running
//! node and read back over NBD by qemu-img and nbdcopy; exports checked by qemu-img.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use trireme_tests::{DevCluster, ok, run, samples_dir, tool};

/// A deterministic pseudo-random fill (xorshift), so a failure reproduces.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// A sparse raw file of `size` bytes: random data runs, zero-filled runs written as
/// data, and holes.
fn random_raw(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut at = 0u64;
    let mut i = 0u64;
    while at < size {
        let len = (4096 * (1 + (seed + i * 7919) % 97)).min(size - at);
        match (seed + i) % 4 {
            0 | 1 => f
                .write_all_at(&noise(seed * 1000 + i, usize::try_from(len).unwrap()), at)
                .unwrap(),
            // Zeros written as data (allocated in the source).
            2 => f
                .write_all_at(&vec![0u8; usize::try_from(len).unwrap()], at)
                .unwrap(),
            _ => {}
        }
        at += len + 4096 * ((seed + i) % 13);
        i += 1;
    }
}

fn qemu_img(args: &[&str]) -> String {
    ok(Command::new("qemu-img").args(args))
}

/// The 4 KiB blocks `qemu-img map` reports as data, for an image or an NBD export.
fn data_blocks(args: &[&str]) -> BTreeSet<u64> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["map", "--output=json"]).args(args);
    let map: serde_json::Value = serde_json::from_str(&ok(&mut cmd)).unwrap();
    let mut blocks = BTreeSet::new();
    for e in map.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            let start = e["start"].as_u64().unwrap();
            let end = start + e["length"].as_u64().unwrap();
            blocks.extend(start / 4096..end.div_ceil(4096));
        }
    }
    blocks
}

fn import(c: &DevCluster, file: &Path, name: &str, format: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "volume",
        "import",
        file.to_str().unwrap(),
        name,
        "--format",
        format,
    ];
    args.extend_from_slice(extra);
    c.ok(&args)
}

/// Imports `image` and checks the volume equals it byte for byte (qemu-img compare)
/// and agrees with `qemu-img map` on what is data.
fn import_and_check(c: &DevCluster, image: &Path, fmt: &str, name: &str) {
    let out = import(c, image, name, fmt, &[]);
    assert!(out.contains(&format!("into volume {name}")), "{out}");
    assert!(out.contains("skipped"), "{out}");
    let uri = c.uri(name);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        fmt,
        "-F",
        "raw",
        image.to_str().unwrap(),
        &uri,
    ]);
    assert!(cmp.contains("Images are identical"), "{fmt}: {cmp}");
    let want = data_blocks(&["-f", fmt, image.to_str().unwrap()]);
    let got = data_blocks(&["-f", "raw", &uri]);
    assert_eq!(
        want.symmetric_difference(&got).count(),
        0,
        "{fmt}: data blocks differ: image-only {:?}, volume-only {:?}",
        want.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&want).take(5).collect::<Vec<_>>()
    );
}

#[test]
fn qcow2_vmdk_and_raw_images_import_byte_exact() {
    let c = DevCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    random_raw(&raw, 48 << 20, 7);
    let r = raw.to_str().unwrap();
    let variants: &[(&str, &str, &[&str])] = &[
        ("q-v3", "qcow2", &["-o", "compat=1.1"]),
        ("q-v2-512", "qcow2", &["-o", "compat=0.10,cluster_size=512"]),
        ("q-zstd", "qcow2", &["-c", "-o", "compression_type=zstd"]),
        (
            "q-l2ext",
            "qcow2",
            &["-o", "extended_l2=on,cluster_size=128k"],
        ),
        ("v-sparse", "vmdk", &["-o", "subformat=monolithicSparse"]),
        ("v-stream", "vmdk", &["-o", "subformat=streamOptimized"]),
    ];
    for (name, fmt, opts) in variants {
        let img = dir.path().join(format!("{name}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[r, img.to_str().unwrap()]);
        qemu_img(&args);
        import_and_check(&c, &img, fmt, name);
    }
    import_and_check(&c, &raw, "raw", "r-sparse");
    // auto reads the file's own magic.
    let out = import(&c, &dir.path().join("q-v3.qcow2"), "auto-q", "auto", &[]);
    assert!(out.contains("(qcow2,"), "{out}");
}

#[test]
fn iso_becomes_a_read_only_volume() {
    let c = DevCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cd");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), noise(3, 100_000)).unwrap();
    let iso = dir.path().join("cd.iso");
    ok(tool("genisoimage")
        .args(["-quiet", "-R", "-o"])
        .arg(&iso)
        .arg(&content));
    let out = import(&c, &iso, "cd", "auto", &[]);
    assert!(out.contains("(iso,") && out.contains("read-only"), "{out}");
    assert_eq!(c.volume_info("cd")["read_only"], true);
    let uri = c.uri("cd");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        iso.to_str().unwrap(),
        &uri,
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let w = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write 0 4k"]));
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success()
            || text.contains("Operation not permitted")
            || text.contains("read-only"),
        "a write to an ISO volume was not refused: {text}"
    );
}

#[test]
fn refused_images_leave_no_volume() {
    let c = DevCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    // Encrypted (LUKS).
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=secret",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        &p("luks.qcow2"),
        "16M",
    ]);
    let err = c.fails(&[
        "volume",
        "import",
        &p("luks.qcow2"),
        "luks",
        "--format",
        "qcow2",
    ]);
    assert!(err.to_lowercase().contains("encrypt"), "{err}");
    // A backing file, without --allow-references, then outside the allowed folder.
    qemu_img(&["create", "-f", "qcow2", &p("base.qcow2"), "16M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &p("base.qcow2"),
        &p("top.qcow2"),
    ]);
    let err = c.fails(&[
        "volume",
        "import",
        &p("top.qcow2"),
        "top",
        "--format",
        "qcow2",
    ]);
    assert!(err.contains("--allow-references"), "{err}");
    let elsewhere = tempfile::tempdir().unwrap();
    let err = c.fails(&[
        "volume",
        "import",
        &p("top.qcow2"),
        "top",
        "--format",
        "qcow2",
        "--allow-references",
        elsewhere.path().to_str().unwrap(),
    ]);
    assert!(err.contains("outside"), "{err}");
    // Allowed: the chain imports.
    let out = c.ok(&[
        "volume",
        "import",
        &p("top.qcow2"),
        "top",
        "--format",
        "qcow2",
        "--allow-references",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.contains("into volume top"), "{out}");
    // Garbage claimed to be qcow2 / vmdk, and an unknown format.
    std::fs::write(p("junk"), noise(9, 65536)).unwrap();
    for fmt in ["qcow2", "vmdk"] {
        let err = c.fails(&["volume", "import", &p("junk"), "junk", "--format", fmt]);
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
    let err = c.fails(&["volume", "import", &p("junk"), "junk", "--format", "vhdx"]);
    assert!(err.contains("unknown format"), "{err}");
    let list = c.ok(&["volume", "list"]);
    for refused in ["luks", "junk"] {
        assert!(
            !list.contains(refused),
            "volume {refused} left behind:\n{list}"
        );
    }
}

#[test]
fn export_raw_and_qcow2_round_trip() {
    let c = DevCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    random_raw(&raw, 40 << 20, 11);
    import(&c, &raw, "vol", "raw", &[]);
    let out_q = dir.path().join("out.qcow2");
    let out = c.ok(&[
        "volume",
        "export",
        "vol",
        out_q.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert!(out.contains("exported volume vol"), "{out}");
    let check = qemu_img(&["check", "-f", "qcow2", out_q.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        out_q.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let out_r = dir.path().join("out.raw");
    c.ok(&[
        "volume",
        "export",
        "vol",
        out_r.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        raw.to_str().unwrap(),
        out_r.to_str().unwrap(),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // Sparse: the raw output holds less than the volume's size.
    let used = std::fs::metadata(&out_r)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(
        used < 40 << 20,
        "raw export is not sparse: {used} bytes used"
    );
    // An existing file is never overwritten.
    let err = c.fails(&["volume", "export", "vol", out_r.to_str().unwrap()]);
    assert!(err.contains("exists"), "{err}");
}

/// SHA-256 of the whole export, read by nbdcopy.
fn export_sha256(uri: &str) -> String {
    let mut copy = tool("nbdcopy")
        .args([uri, "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sum = Command::new("sha256sum")
        .stdin(copy.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(copy.wait().unwrap().success());
    String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// (file, archive, expected raw SHA-256) rows of the samples' MANIFEST.md.
fn manifest() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(samples_dir().join("MANIFEST.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| ") && (l.contains(".qcow2") || l.contains(".vmdk")))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let file = cells.get(1)?.split_whitespace().next()?.to_owned();
            let archive = (*cells.get(2)?).to_owned();
            let sha = (*cells.get(6)?).to_owned();
            (sha.len() == 64).then_some((file, archive, sha))
        })
        .collect()
}

/// Unpacks `archive` into `into`, every file written sparse: the compactVD disks hold
/// gigabytes of zeros, and the test must fit on a machine with little free disk.
fn unpack(archive: &Path, into: &Path) {
    let name = archive.file_name().unwrap().to_str().unwrap();
    if let Some(plain) = name.strip_suffix(".zst").filter(|n| !n.ends_with(".tar")) {
        let out = into.join(plain);
        ok(Command::new("sh").arg("-c").arg(format!(
            "zstd -q -d -c '{}' | cp --sparse=always /dev/stdin '{}'",
            archive.display(),
            out.display()
        )));
        return;
    }
    ok(Command::new("tar")
        .current_dir(into)
        .arg("-xf")
        .arg(archive)
        .arg("--to-command")
        .arg(r#"sh -c 'mkdir -p "$(dirname "$TAR_FILENAME")" && cp --sparse=always /dev/stdin "$TAR_FILENAME"'"#));
}

fn find(root: &Path, name: &str) -> PathBuf {
    let out = ok(Command::new("find").arg(root).args(["-name", name]));
    PathBuf::from(
        out.lines()
            .next()
            .unwrap_or_else(|| panic!("{name} not unpacked")),
    )
}

#[test]
fn every_sample_imports_to_its_listed_sha256() {
    let samples = samples_dir();
    let c = DevCluster::start();
    let list = manifest();
    assert!(list.len() >= 10, "MANIFEST.md rows: {list:?}");
    let mut archives: Vec<&str> = list.iter().map(|(_, a, _)| a.as_str()).collect();
    archives.dedup();
    // One archive at a time, its volumes deleted after: bounded disk use.
    for archive in archives {
        let work = tempfile::tempdir().unwrap();
        unpack(&samples.join(archive), work.path());
        for (i, (file, _, sha)) in list.iter().enumerate().filter(|(_, r)| r.1 == archive) {
            let path = find(work.path(), file);
            let fmt = if file.ends_with(".qcow2") {
                "qcow2"
            } else {
                "vmdk"
            };
            let name = format!("s{i}");
            let folder = path.parent().unwrap().to_str().unwrap().to_owned();
            let out = import(&c, &path, &name, fmt, &["--allow-references", &folder]);
            let _ = std::io::stdout().write_all(out.as_bytes());
            assert_eq!(&export_sha256(&c.uri(&name)), sha, "{file}");
            c.ok(&["volume", "delete", &name]);
        }
    }
}
