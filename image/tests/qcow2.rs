//! The QCOW2 reader against qemu: images made by `qemu-img` / `qemu-io` with random
//! content, read through `DiskImage`, must give the bytes of `qemu-img convert -O raw`
//! and the data/zero map of `qemu-img map`. Hostile images must fail fast with a
//! clear error. Real images from other tools are checked against MANIFEST.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use trireme_image::qcow2::Qcow2;
use trireme_image::{DiskImage, ImageError, Limits, OpenOptions, SegmentKind};

const MIB: u64 = 1 << 20;

/// xorshift64*: deterministic random content and offsets, seeded per test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
    /// Bytes that compress well (a small alphabet in runs).
    fn compressible(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let b = b"abcdefgh"[usize::try_from(self.below(8)).unwrap()];
            let run = usize::try_from(1 + self.below(40)).unwrap();
            v.extend(std::iter::repeat_n(b, run));
        }
        v.truncate(len);
        v
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs `commands` with qemu-io on the image (format qcow2).
fn qemu_io(image: &Path, commands: &[String]) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    run("qemu-io", &args);
}

/// qemu-io commands that write random data (each write its own bytes), zeros and
/// discards at scattered offsets, in units of `granule` bytes.
fn scatter_commands(
    dir: &Path,
    rng: &mut Rng,
    size: u64,
    granule: u64,
    count: usize,
) -> Vec<String> {
    let mut commands = Vec::new();
    let units = size / granule;
    for i in 0..count {
        let off = rng.below(units) * granule;
        let len = (granule * (1 + rng.below(12))).min(size - off);
        let command = match rng.below(10) {
            0..=5 => {
                let file = dir.join(format!("w{}-{i}.bin", rng.next()));
                fs::write(&file, rng.bytes(usize::try_from(len).unwrap())).unwrap();
                format!("write -s {} {off} {len}", p(&file))
            }
            6 => format!("write -P {} {off} {len}", 1 + rng.below(255)),
            7 | 8 => format!("write -z {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        commands.push(command);
    }
    commands
}

/// A raw file of `size` bytes with random and compressible data in scattered places
/// and zeros elsewhere.
fn raw_source(path: &Path, rng: &mut Rng, size: u64, pieces: usize) {
    let mut disk = vec![0u8; usize::try_from(size).unwrap()];
    for _ in 0..pieces {
        let off = usize::try_from(rng.below(size / 4096) * 4096).unwrap();
        let len = usize::try_from(4096 * (1 + rng.below(64)))
            .unwrap()
            .min(disk.len() - off);
        let data = if rng.below(2) == 0 {
            rng.bytes(len)
        } else {
            rng.compressible(len)
        };
        disk[off..off + len].copy_from_slice(&data);
    }
    fs::write(path, disk).unwrap();
}

/// The bytes qemu reads from the image (with extra `qemu-img convert` options).
fn qemu_raw(image: &Path, extra: &[&str]) -> Vec<u8> {
    let out = image.with_extension("expected.raw");
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-O", "raw", p(image), p(&out)]);
    qemu_img(&args);
    let bytes = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    bytes
}

/// Merged (start, length, data) runs from `qemu-img map --output=json`.
fn qemu_map(image: &Path) -> Vec<(u64, u64, bool)> {
    let json = qemu_img(&["map", "--output=json", p(image)]);
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut runs = Vec::new();
    for e in entries.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        push_run(&mut runs, start, length, data);
    }
    runs
}

fn push_run(runs: &mut Vec<(u64, u64, bool)>, start: u64, length: u64, data: bool) {
    if let Some(last) = runs.last_mut() {
        assert_eq!(last.0 + last.1, start, "runs must be contiguous");
        if last.2 == data {
            last.1 += length;
            return;
        }
    }
    runs.push((start, length, data));
}

/// Merged runs from `segment`, asking for at most `max_len` bytes at a time.
fn our_map(image: &mut dyn DiskImage, max_len: u64) -> Vec<(u64, u64, bool)> {
    let mut runs = Vec::new();
    let mut offset = 0;
    while offset < image.virtual_size() {
        let s = image.segment(offset, max_len).unwrap();
        assert_eq!(s.offset, offset);
        assert!(s.length > 0 && s.length <= max_len);
        push_run(&mut runs, offset, s.length, s.kind == SegmentKind::Data);
        offset += s.length;
    }
    assert_eq!(offset, image.virtual_size());
    runs
}

fn options(allow: Option<&Path>) -> OpenOptions {
    OpenOptions {
        allow_references: allow.map(Path::to_owned),
        ..OpenOptions::default()
    }
}

/// Reads the whole disk in uneven chunks and at random places; every byte must
/// equal `expected`. Zero segments must read as zeros.
fn check_bytes(image: &mut dyn DiskImage, expected: &[u8], rng: &mut Rng) {
    let size = image.virtual_size();
    assert_eq!(size, expected.len() as u64);
    let chunks = [MIB, 3 * MIB + 512, 4096 + 512, 100_003, 8 * MIB, 65536];
    let mut offset = 0u64;
    let mut i = 0;
    let mut buf = Vec::new();
    while offset < size {
        let len = chunks[i % chunks.len()].min(size - offset);
        buf.resize(usize::try_from(len).unwrap(), 0xee);
        image.read_at(offset, &mut buf).unwrap();
        let at = usize::try_from(offset).unwrap();
        if buf[..] != expected[at..at + buf.len()] {
            let bad = buf
                .iter()
                .zip(&expected[at..])
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "bytes differ at {} (read of {len} at {offset})",
                offset + bad as u64
            );
        }
        offset += len;
        i += 1;
    }
    for _ in 0..64 {
        let off = rng.below(size);
        let len = (1 + rng.below(300_000)).min(size - off);
        buf.resize(usize::try_from(len).unwrap(), 0xee);
        image.read_at(off, &mut buf).unwrap();
        let at = usize::try_from(off).unwrap();
        assert!(
            buf[..] == expected[at..at + buf.len()],
            "read of {len} at {off}"
        );
    }
    // Zero segments are zeros.
    let mut offset = 0;
    while offset < size {
        let s = image.segment(offset, u64::MAX).unwrap();
        if s.kind == SegmentKind::Zero {
            let at = usize::try_from(offset).unwrap();
            let len = usize::try_from(s.length).unwrap();
            assert!(
                expected[at..at + len].iter().all(|&b| b == 0),
                "zero segment {s:?} holds data"
            );
        }
        offset += s.length;
    }
    let mut end = [0u8; 1];
    assert!(image.read_at(size, &mut end).is_err());
}

/// The full check of one image against qemu: bytes and map.
fn check_image(image_path: &Path, opts: &OpenOptions, rng: &mut Rng) {
    let mut image = Qcow2::open(image_path, opts).unwrap_or_else(|e| panic!("{image_path:?}: {e}"));
    let expected = qemu_raw(image_path, &[]);
    check_bytes(&mut image, &expected, rng);
    let qemu = qemu_map(image_path);
    let ours = our_map(&mut image, u64::MAX);
    assert_eq!(
        ours, qemu,
        "segments of {image_path:?} differ from qemu-img map"
    );
    // Shorter requests give the same map once merged.
    let small = our_map(&mut image, 4096 * (1 + rng.below(100)));
    assert_eq!(small, qemu);
}

#[test]
fn v2_and_v3_every_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for compat in ["0.10", "1.1"] {
        for cluster in [512u64, 4096, 65536, 2 * MIB] {
            let size = if cluster == 512 { 8 * MIB } else { 48 * MIB };
            let image = dir.path().join(format!("c{compat}-{cluster}.qcow2"));
            let o = format!("compat={compat},cluster_size={cluster}");
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                p(&image),
                &size.to_string(),
            ]);
            let granule = if cluster == 512 { 512 } else { 4096 };
            qemu_io(
                &image,
                &scatter_commands(dir.path(), &mut rng, size, granule, 40),
            );
            // Zero and discard over whole clusters too.
            qemu_io(
                &image,
                &[
                    format!("write -z {} {}", 4 * cluster, 4 * cluster),
                    format!("write -z -u {} {}", 16 * cluster, 2 * cluster),
                    format!("discard {} {}", 8 * cluster, 2 * cluster),
                ],
            );
            check_image(&image, &OpenOptions::default(), &mut rng);
            // A cache of two L2 tables still reads everything right.
            let mut tight = OpenOptions::default();
            tight.limits.max_cache_bytes = 2 * cluster;
            let mut small_cache = Qcow2::open(&image, &tight).unwrap();
            check_bytes(&mut small_cache, &qemu_raw(&image, &[]), &mut rng);
        }
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for (kind, cluster) in [
        ("zlib", 65536u64),
        ("zstd", 65536),
        ("zlib", 512),
        ("zstd", 4096),
        ("zlib", 2 * MIB),
        ("zstd", 2 * MIB),
    ] {
        let size = if cluster == 512 { 4 * MIB } else { 32 * MIB };
        let source = dir.path().join(format!("{kind}-{cluster}.raw"));
        raw_source(&source, &mut rng, size, 60);
        let image = dir.path().join(format!("{kind}-{cluster}.qcow2"));
        let o = format!("compression_type={kind},cluster_size={cluster}");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            p(&source),
            p(&image),
        ]);
        let map = qemu_img(&["map", "--output=json", p(&image)]);
        assert!(
            map.contains("\"compressed\": true"),
            "no compressed cluster in {kind}-{cluster}"
        );
        check_image(&image, &OpenOptions::default(), &mut rng);
        // Partial overwrites turn compressed clusters into plain ones.
        let granule = if cluster == 512 { 512 } else { 4096 };
        qemu_io(
            &image,
            &scatter_commands(dir.path(), &mut rng, size, granule, 20),
        );
        check_image(&image, &OpenOptions::default(), &mut rng);
    }
}

#[test]
fn compressed_cluster_runs_past_the_end_of_the_file() {
    // qemu appends a compressed cluster without padding the file to its last sector,
    // so the descriptor names bytes past the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    for kind in ["zlib", "zstd"] {
        let image = dir.path().join(format!("tail-{kind}.qcow2"));
        let o = format!("compression_type={kind}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p(&image), "1M"]);
        let data = dir.path().join("tail.bin");
        fs::write(&data, rng.compressible(65536)).unwrap();
        qemu_io(&image, &[format!("write -c -s {} 65536 65536", p(&data))]);
        let bytes = fs::read(&image).unwrap();
        let l1 = usize::try_from(be_u64(&bytes, 40)).unwrap();
        let l2 = usize::try_from(be_u64(&bytes, l1) & 0x00ff_ffff_ffff_fe00).unwrap();
        let entry = be_u64(&bytes, l2 + 8);
        assert!(entry & (1 << 62) != 0);
        let offset = entry & ((1u64 << 54) - 1);
        let end = (offset | 511) + 1 + ((entry >> 54) & 0xff) * 512;
        assert!(end > bytes.len() as u64, "the cluster ends inside the file");
        check_image(&image, &OpenOptions::default(), &mut rng);
    }
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x0bad_cafe_dead_beef);
    for cluster in [16384u64, 131072, 2 * MIB] {
        let size = 32 * MIB;
        let image = dir.path().join(format!("ext-{cluster}.qcow2"));
        let o = format!("extended_l2=on,cluster_size={cluster}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            p(&image),
            &size.to_string(),
        ]);
        let granule = cluster / 32;
        qemu_io(
            &image,
            &scatter_commands(dir.path(), &mut rng, size, granule, 60),
        );
        check_image(&image, &OpenOptions::default(), &mut rng);
    }
    // Over a backing file: unallocated subclusters read the backing file.
    let base = dir.path().join("ext-base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "16M"]);
    qemu_io(
        &base,
        &scatter_commands(dir.path(), &mut rng, 16 * MIB, 4096, 30),
    );
    let top = dir.path().join("ext-top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&top),
        "16M",
    ]);
    qemu_io(
        &top,
        &scatter_commands(dir.path(), &mut rng, 16 * MIB, 4096, 60),
    );
    check_image(&top, &options(Some(dir.path())), &mut rng);
}

#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5555_aaaa_1234_4321);
    for raw in ["off", "on"] {
        let image = dir.path().join(format!("df-{raw}.qcow2"));
        let data = dir.path().join(format!("df-{raw}.data"));
        let o = format!("data_file={},data_file_raw={raw}", p(&data));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p(&image), "32M"]);
        qemu_io(
            &image,
            &scatter_commands(dir.path(), &mut rng, 32 * MIB, 4096, 40),
        );
        check_image(&image, &options(Some(dir.path())), &mut rng);
        let e = Qcow2::open(&image, &OpenOptions::default()).unwrap_err();
        assert!(matches!(e, ImageError::ReferenceNotAllowed { .. }), "{e}");
    }
}

#[test]
fn backing_chain_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x7777_1111_3333_9999);
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "24M"]);
    qemu_io(
        &base,
        &scatter_commands(dir.path(), &mut rng, 24 * MIB, 4096, 40),
    );
    // Relative names, as qemu-img writes them when given relative paths.
    let rel = |path: &Path| path.file_name().unwrap().to_str().unwrap().to_owned();
    let mid_cmd = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &rel(&base),
        "-F",
        "qcow2",
        p(&mid),
        "32M",
    ];
    qemu_img(&mid_cmd);
    qemu_io(
        &mid,
        &scatter_commands(dir.path(), &mut rng, 32 * MIB, 4096, 40),
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &rel(&mid),
        "-F",
        "qcow2",
        p(&top),
        "40M",
    ]);
    qemu_io(
        &top,
        &scatter_commands(dir.path(), &mut rng, 40 * MIB, 4096, 40),
    );
    let mut allow = options(Some(dir.path()));
    allow.limits.max_chain_depth = 3;
    check_image(&top, &allow, &mut rng);

    allow.limits.max_chain_depth = 2;
    let e = Qcow2::open(&top, &allow).unwrap_err();
    assert!(matches!(e, ImageError::ChainTooDeep { limit: 2 }), "{e}");
    let e = Qcow2::open(&top, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::ReferenceNotAllowed { .. }), "{e}");

    // A raw base, named without a format: found by its magic.
    let raw = dir.path().join("base.raw");
    raw_source(&raw, &mut rng, 8 * MIB, 20);
    let over_raw = dir.path().join("over-raw.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&over_raw),
        "12M",
    ]);
    qemu_io(
        &over_raw,
        &scatter_commands(dir.path(), &mut rng, 12 * MIB, 4096, 20),
    );
    check_image(&over_raw, &options(Some(dir.path())), &mut rng);
    // Without the backing format extension the format comes from the base's magic:
    // hide the extension by giving it an unknown type.
    let mut bytes = fs::read(&over_raw).unwrap();
    let at = bytes[..65536]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    let probed = dir.path().join("probed.qcow2");
    fs::write(&probed, bytes).unwrap();
    let expected = qemu_raw(&over_raw, &[]);
    let mut image = Qcow2::open(&probed, &options(Some(dir.path()))).unwrap();
    check_bytes(&mut image, &expected, &mut rng);
}

#[test]
fn internal_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x4242_4242_1717_1717);
    let image = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "16M"]);
    qemu_io(
        &image,
        &scatter_commands(dir.path(), &mut rng, 16 * MIB, 4096, 30),
    );
    qemu_img(&["snapshot", "-c", "first", p(&image)]);
    qemu_io(
        &image,
        &scatter_commands(dir.path(), &mut rng, 16 * MIB, 4096, 30),
    );
    qemu_img(&["resize", "-q", p(&image), "24M"]);
    qemu_io(
        &image,
        &scatter_commands(dir.path(), &mut rng, 24 * MIB, 4096, 30),
    );
    qemu_img(&["snapshot", "-c", "second", p(&image)]);
    qemu_io(
        &image,
        &scatter_commands(dir.path(), &mut rng, 24 * MIB, 4096, 30),
    );

    check_image(&image, &OpenOptions::default(), &mut rng);
    assert_eq!(snapshot_names(&image), ["first", "second"]);
    for (wanted, name) in [("first", "first"), ("second", "second"), ("1", "first")] {
        let opts = OpenOptions {
            snapshot: Some(wanted.to_owned()),
            ..OpenOptions::default()
        };
        let mut snap = Qcow2::open(&image, &opts).unwrap();
        let expected = qemu_snapshot_raw(&image, name, snap.virtual_size());
        check_bytes(&mut snap, &expected, &mut rng);
    }
    let opts = OpenOptions {
        snapshot: Some("third".to_owned()),
        ..OpenOptions::default()
    };
    let e = Qcow2::open(&image, &opts).unwrap_err().to_string();
    assert!(
        e.contains("third") && e.contains("\"first\"") && e.contains("\"second\""),
        "{e}"
    );
}

#[test]
fn reads_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(31337);
    let image = dir.path().join("mem.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&image),
        "2M",
    ]);
    qemu_io(
        &image,
        &scatter_commands(dir.path(), &mut rng, 2 * MIB, 512, 30),
    );
    let bytes = fs::read(&image).unwrap();
    let mut mem = Qcow2::from_source(Box::new(bytes), &OpenOptions::default()).unwrap();
    let expected = qemu_raw(&image, &[]);
    check_bytes(&mut mem, &expected, &mut rng);
}

/// The names of the image's internal snapshots, from `qemu-img info`.
fn snapshot_names(image: &Path) -> Vec<String> {
    let json = qemu_img(&["info", "--output=json", p(image)]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    info["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What qemu reads from snapshot `name`. `qemu-img convert -l` keeps the image's
/// current virtual size; the snapshot's own size (which `qemu-img snapshot -a`
/// restores, and which the reader uses) may be smaller, and qemu reads zeros past
/// the snapshot's L1 table.
fn qemu_snapshot_raw(image: &Path, name: &str, snapshot_size: u64) -> Vec<u8> {
    let mut bytes = qemu_raw(image, &["-l", &format!("snapshot.name={name}")]);
    let size = usize::try_from(snapshot_size).unwrap();
    assert!(bytes.len() >= size, "qemu read {} bytes", bytes.len());
    assert!(
        bytes[size..].iter().all(|&b| b == 0),
        "data past the snapshot's size"
    );
    bytes.truncate(size);
    bytes
}

// ---- refusals ----

/// Opening (and reading all of) `image` fails quickly; returns the error.
fn refused(image: &Path, opts: &OpenOptions) -> ImageError {
    let started = Instant::now();
    let result = Qcow2::open(image, opts).and_then(|mut img| {
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < img.virtual_size() {
            let len = (buf.len() as u64).min(img.virtual_size() - offset);
            let n = usize::try_from(len).unwrap();
            img.segment(offset, len)?;
            img.read_at(offset, &mut buf[..n])?;
            offset += len;
        }
        Ok(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{image:?} took too long"
    );
    match result {
        Ok(()) => panic!("{image:?} was accepted"),
        Err(e) => e,
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn refuses_encryption_and_unknown_features() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        p(&luks),
        "16M",
    ]);
    let e = refused(&luks, &OpenOptions::default());
    assert!(
        matches!(e, ImageError::Unsupported(_)) && e.to_string().contains("LUKS"),
        "{e}"
    );

    let image = dir.path().join("future.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&image), "16M"]);
    patch(&image, 72, &(1u64 << 20).to_be_bytes());
    let e = refused(&image, &OpenOptions::default());
    assert!(e.to_string().contains("bit 20"), "{e}");

    // Dirty and corrupt are warnings, not refusals.
    patch(&image, 72, &3u64.to_be_bytes());
    let img = Qcow2::open(&image, &OpenOptions::default()).unwrap();
    let warnings = img.warnings().join("\n");
    assert!(
        warnings.contains("dirty") && warnings.contains("corrupt"),
        "{warnings}"
    );

    let v1 = dir.path().join("v1.qcow2");
    fs::write(&v1, [b'Q', b'F', b'I', 0xfb, 0, 0, 0, 1].repeat(64)).unwrap();
    assert!(
        refused(&v1, &OpenOptions::default())
            .to_string()
            .contains("version 1")
    );
    let junk = dir.path().join("junk.qcow2");
    fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert!(matches!(
        refused(&junk, &OpenOptions::default()),
        ImageError::Invalid(_)
    ));
}

#[test]
fn refuses_references_outside_the_allowed_folder() {
    let outside = tempfile::tempdir().unwrap();
    let inside = tempfile::tempdir().unwrap();
    let base = outside.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "16M"]);
    let top = inside.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&top),
        "16M",
    ]);
    let e = refused(&top, &options(Some(inside.path())));
    assert!(matches!(e, ImageError::ReferenceOutside { .. }), "{e}");
    let e = refused(&top, &OpenOptions::default());
    assert!(matches!(e, ImageError::ReferenceNotAllowed { .. }), "{e}");
    // From memory, no reference is ever followed.
    let bytes = fs::read(&top).unwrap();
    let e = Qcow2::from_source(Box::new(bytes), &options(Some(inside.path()))).unwrap_err();
    assert!(matches!(e, ImageError::ReferenceNotAllowed { .. }), "{e}");
}

#[test]
fn refuses_resource_bombs() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let path = dir.path().join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "16M"]);
        path
    };
    let image = fresh("l1.qcow2");
    patch(&image, 36, &u32::MAX.to_be_bytes());
    let e = refused(&image, &OpenOptions::default());
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");

    let image = fresh("size.qcow2");
    patch(&image, 24, &(1u64 << 62).to_be_bytes());
    let e = refused(&image, &OpenOptions::default());
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");

    // A virtual size the L1 table cannot map.
    let image = fresh("l1small.qcow2");
    patch(&image, 24, &(1u64 << 40).to_be_bytes());
    assert!(matches!(
        refused(&image, &OpenOptions::default()),
        ImageError::Invalid(_)
    ));

    let image = fresh("snaps.qcow2");
    patch(&image, 60, &u32::MAX.to_be_bytes());
    let e = refused(&image, &OpenOptions::default());
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");

    // An L2 table past the end of the file.
    let image = fresh("l2.qcow2");
    qemu_io(&image, &["write -P 1 0 64k".to_owned()]);
    let head = fs::read(&image).unwrap();
    let l1_offset = be_u64(&head, 40);
    patch(&image, l1_offset, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    assert!(
        refused(&image, &OpenOptions::default())
            .to_string()
            .contains("L2 table")
    );

    // A compressed cluster whose offset is past the end of the file.
    let source = dir.path().join("c.raw");
    fs::write(&source, Rng(5).compressible(1 << 20)).unwrap();
    let image = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        p(&source),
        p(&image),
    ]);
    let bytes = fs::read(&image).unwrap();
    let l1_offset = usize::try_from(be_u64(&bytes, 40)).unwrap();
    let l2_offset = be_u64(&bytes, l1_offset) & 0x00ff_ffff_ffff_fe00;
    let l2 = usize::try_from(l2_offset).unwrap();
    let entry = be_u64(&bytes, l2);
    assert!(
        entry & (1 << 62) != 0,
        "the first cluster is not compressed"
    );
    // 64 KiB clusters: the offset is bits 0..=53.
    let bomb = (entry & !((1u64 << 54) - 1)) | (1u64 << 40);
    patch(&image, l2_offset, &bomb.to_be_bytes());
    let e = refused(&image, &OpenOptions::default());
    assert!(e.to_string().contains("past the end"), "{e}");
    // A compressed size above the limit.
    let mut tight = OpenOptions::default();
    tight.limits.max_compressed_bytes = 1024;
    patch(&image, l2_offset, &(entry | (0xffu64 << 54)).to_be_bytes());
    let e = refused(&image, &tight);
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");

    // A backing chain that loops: a -> b -> a.
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&b), "16M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&a),
        "16M",
    ]);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        p(&b),
    ]);
    let e = refused(&a, &options(Some(dir.path())));
    assert!(e.to_string().contains("loops"), "{e}");
    // A chain deeper than the limit.
    let mut deep_opts = options(Some(dir.path()));
    deep_opts.limits = Limits {
        max_chain_depth: 4,
        ..Limits::default()
    };
    let mut prev = fresh("d0.qcow2");
    for i in 1..6 {
        let next = dir.path().join(format!("d{i}.qcow2"));
        let name = prev.file_name().unwrap().to_str().unwrap().to_owned();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &name,
            "-F",
            "qcow2",
            p(&next),
            "16M",
        ]);
        prev = next;
    }
    let e = refused(&prev, &deep_opts);
    assert!(matches!(e, ImageError::ChainTooDeep { limit: 4 }), "{e}");
}

// ---- real images from other tools ----

fn samples_dir() -> PathBuf {
    let mut looked = Vec::new();
    if let Some(dir) = std::env::var_os("TRIREME_SAMPLES") {
        let dir = PathBuf::from(dir);
        if dir.join("dissect-images.tar.zst").is_file() {
            return dir;
        }
        looked.push(dir);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in [
        workspace.join("../shared/samples"),
        PathBuf::from("/work/shared/samples"),
    ] {
        if dir.join("dissect-images.tar.zst").is_file() {
            return dir;
        }
        looked.push(dir);
    }
    panic!("no sample images: set TRIREME_SAMPLES; looked in {looked:?}");
}

/// The raw SHA-256 of each file, from MANIFEST.md's table.
fn manifest(dir: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(dir.join("MANIFEST.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| file"))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            let file = cols.get(1)?.split_whitespace().next()?.to_owned();
            let sha = cols.get(cols.len().checked_sub(2)?)?.to_string();
            (sha.len() == 64).then_some((file, sha))
        })
        .collect()
}

fn sha256_of(image: &mut dyn DiskImage) -> String {
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; 4 << 20];
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < image.virtual_size() {
        let s = image.segment(offset, zeros.len() as u64).unwrap();
        let n = usize::try_from(s.length).unwrap();
        if s.kind == SegmentKind::Zero {
            hasher.update(&zeros[..n]);
        } else {
            image.read_at(offset, &mut buf[..n]).unwrap();
            hasher.update(&buf[..n]);
        }
        offset += s.length;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn sample_images_match_the_manifest() {
    let samples = samples_dir();
    let dir = tempfile::tempdir().unwrap();
    run(
        "tar",
        &[
            "--zstd",
            "-xf",
            p(&samples.join("dissect-images.tar.zst")),
            "-C",
            p(dir.path()),
        ],
    );
    let expected = manifest(&samples);
    let mut checked = 0;
    for (file, sha) in &expected {
        if !file.ends_with(".qcow2") {
            continue;
        }
        let path = dir.path().join(file);
        let mut image = Qcow2::open(&path, &options(Some(dir.path())))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(&sha256_of(&mut image), sha, "{file}");
        checked += 1;
    }
    assert_eq!(checked, 5, "MANIFEST.md lists {expected:?}");
    // The snapshots inside snapshot.qcow2 read as qemu reads them.
    let path = dir.path().join("snapshot.qcow2");
    let names = snapshot_names(&path);
    assert_eq!(names.len(), 2, "{names:?}");
    for name in names {
        let opts = OpenOptions {
            snapshot: Some(name.clone()),
            ..OpenOptions::default()
        };
        let mut image = Qcow2::open(&path, &opts).unwrap();
        let expected = qemu_snapshot_raw(&path, &name, image.virtual_size());
        let mut hasher = Sha256::new();
        hasher.update(&expected);
        let want: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha256_of(&mut image), want, "snapshot {name}");
    }
}

// ---- speed, against qemu-img on the same host ----

/// Times reading a 1 GiB image (plain and zstd-compressed) against
/// `qemu-img convert -O raw`. Run by hand:
/// `cargo test --release -p trireme-image --test qcow2 -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark, run by hand"]
fn read_speed_against_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let size = 1024 * MIB;
    let source = dir.path().join("bench.raw");
    {
        let mut disk = vec![0u8; usize::try_from(size).unwrap()];
        for chunk in disk.chunks_mut(usize::try_from(4 * MIB).unwrap()) {
            if rng.below(10) < 7 {
                let data = if rng.below(2) == 0 {
                    rng.bytes(chunk.len())
                } else {
                    rng.compressible(chunk.len())
                };
                chunk.copy_from_slice(&data);
            }
        }
        fs::write(&source, disk).unwrap();
    }
    for (name, extra) in [
        ("plain", &[][..]),
        ("zlib", &["-c", "-o", "compression_type=zlib"][..]),
        ("zstd", &["-c", "-o", "compression_type=zstd"][..]),
    ] {
        let image = dir.path().join(format!("bench-{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[p(&source), p(&image)]);
        qemu_img(&args);
        let mut ours = Duration::MAX;
        let mut data = 0u64;
        for _ in 0..2 {
            let started = Instant::now();
            let mut img = Qcow2::open(&image, &OpenOptions::default()).unwrap();
            let mut buf = vec![0u8; 4 << 20];
            let mut offset = 0;
            data = 0;
            while offset < img.virtual_size() {
                let s = img.segment(offset, buf.len() as u64).unwrap();
                if s.kind == SegmentKind::Data {
                    let n = usize::try_from(s.length).unwrap();
                    img.read_at(offset, &mut buf[..n]).unwrap();
                    data += s.length;
                }
                offset += s.length;
            }
            ours = ours.min(started.elapsed());
        }
        let out = dir.path().join("out.raw");
        let mut qemu = Duration::MAX;
        for _ in 0..2 {
            let started = Instant::now();
            qemu_img(&["convert", "-O", "raw", p(&image), p(&out)]);
            qemu = qemu.min(started.elapsed());
            fs::remove_file(&out).unwrap();
        }
        println!("{name}: qemu-img convert {qemu:?}, reader {ours:?} ({data} data bytes)");
    }
}
