//! VMDK reader against qemu: images made by `qemu-img` / `qemu-io` from random raw
//! disks must read back as `qemu-img convert -O raw` gives them, and their segments
//! must agree with `qemu-img map`. Plus hand-built layouts (streamOptimized with the
//! footer), refusals, resource bombs, and real images from other tools (samples).

mod vmdk_fixture;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use trireme_image::vmdk::Vmdk;
use trireme_image::{DiskImage, Format, ImageError, Limits, OpenOptions, SegmentKind, raw::Raw};
use vmdk_fixture::{Layout, pseudo_random};

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 << 10;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn us(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw disk of `size` bytes: random data runs, explicit zero runs and holes, in
/// grain-sized and odd-sized pieces. `spots` limits the writes to a few places (for
/// large, mostly sparse disks); None fills the disk in a pattern.
fn random_raw(path: &Path, size: u64, seed: u64, spots: Option<&[u64]>) {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let write_piece = |at: u64, len: u64, kind: u64| {
        let len = len.min(size - at);
        match kind {
            0 => {} // hole
            1 => file.write_all_at(&vec![0u8; us(len)], at).unwrap(),
            _ => file
                .write_all_at(&pseudo_random(us(len), at ^ seed), at)
                .unwrap(),
        }
    };
    match spots {
        Some(spots) => {
            for &at in spots {
                write_piece(at, 3 * GRAIN + 4096, 2);
            }
        }
        None => {
            let mut at = 0;
            while at < size {
                let r = next();
                let len = match r % 4 {
                    0 => GRAIN,
                    1 => 4096 * (1 + r % 40),
                    2 => GRAIN * (1 + (r >> 8) % 8),
                    _ => 512 * (1 + (r >> 16) % 300),
                };
                write_piece(at, len, (r >> 24) % 3);
                at += len;
            }
        }
    }
}

fn options(allow: Option<&Path>) -> OpenOptions {
    OpenOptions {
        allow_references: allow.map(Path::to_owned),
        ..OpenOptions::default()
    }
}

/// Reads the whole disk through `read_at` and compares it with `raw` (from `qemu-img
/// convert -O raw`), skipping only stretches both sides call holes.
fn assert_same_bytes(image: &mut dyn DiskImage, raw_path: &Path) {
    let mut raw = Raw::open(raw_path, &OpenOptions::default()).unwrap();
    assert_eq!(image.virtual_size(), raw.virtual_size(), "virtual size");
    let size = image.virtual_size();
    let mut pos = 0;
    let mut ours = vec![0u8; 4 << 20];
    let mut theirs = vec![0u8; 4 << 20];
    while pos < size {
        let a = image.segment(pos, 4 << 20).unwrap();
        let b = raw.segment(pos, 4 << 20).unwrap();
        assert_eq!(a.offset, pos);
        assert!(a.length > 0 && pos + a.length <= size);
        let len = a.length.min(b.length);
        let n = us(len);
        if a.kind == SegmentKind::Zero && b.kind == SegmentKind::Zero {
            // Both holes: a sample of ours must read as zeros.
            let m = n.min(128 << 10);
            image.read_at(pos, &mut ours[..m]).unwrap();
            assert!(
                ours[..m].iter().all(|&b| b == 0),
                "hole at {pos} reads data"
            );
        } else {
            image.read_at(pos, &mut ours[..n]).unwrap();
            raw.read_at(pos, &mut theirs[..n]).unwrap();
            if ours[..n] != theirs[..n] {
                let first = (0..n).find(|&i| ours[i] != theirs[i]).unwrap();
                panic!("bytes differ at {} ({:?})", pos + first as u64, a.kind);
            }
            if a.kind == SegmentKind::Zero {
                assert!(
                    theirs[..n].iter().all(|&b| b == 0),
                    "Zero segment at {pos} holds data"
                );
            }
        }
        pos += len;
    }
    // Odd-sized reads across grain and extent edges.
    for &(at, len) in &[
        (0, 1),
        (GRAIN - 7, 4099),
        (size - 513, 513),
        (size / 2 - 3, 70000),
    ] {
        let len = us(len.min(size - at));
        image.read_at(at, &mut ours[..len]).unwrap();
        raw.read_at(at, &mut theirs[..len]).unwrap();
        assert_eq!(ours[..len], theirs[..len], "read of {len} at {at}");
    }
    assert!(image.read_at(size - 1, &mut [0u8; 2]).is_err());
}

/// `qemu-img map --output=json` as (start, length, data, zero).
fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let json = run("qemu-img", &["map", "--output=json", "-f", "vmdk", s(path)]);
    let field = |obj: &str, key: &str| -> String {
        let at = obj.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        obj[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect()
    };
    json.split('{')
        .skip(1)
        .map(|obj| {
            (
                field(obj, "start").parse().unwrap(),
                field(obj, "length").parse().unwrap(),
                field(obj, "data") == "true",
                field(obj, "zero") == "true",
            )
        })
        .collect()
}

/// Our segments agree with qemu's map: data there is Data, no data is Zero (data that
/// qemu also calls zero — holes in a flat file — may be either).
fn assert_same_map(image: &mut dyn DiskImage, path: &Path) {
    let map = qemu_map(path);
    assert_eq!(map.iter().map(|m| m.1).sum::<u64>(), image.virtual_size());
    for (start, length, data, zero) in map {
        let mut pos = start;
        while pos < start + length {
            let seg = image.segment(pos, start + length - pos).unwrap();
            let want = match (data, zero) {
                (true, false) => Some(SegmentKind::Data),
                (false, _) => Some(SegmentKind::Zero),
                (true, true) => None,
            };
            if let Some(want) = want {
                assert_eq!(
                    seg.kind, want,
                    "at {pos} (qemu: {start}+{length} data={data})"
                );
            }
            pos += seg.length;
        }
    }
    // Segments are long: a whole-disk walk takes few calls.
}

/// Converts `raw` to a VMDK of `subformat`, checks bytes and map, returns the image.
fn check_subformat(dir: &Path, name: &str, raw: &Path, opts: &str, needs_refs: bool) {
    let vmdk = dir.join(format!("{name}.vmdk"));
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            opts,
            s(raw),
            s(&vmdk),
        ],
    );
    let back = dir.join(format!("{name}.back.raw"));
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&back)],
    );
    if needs_refs {
        let err = trireme_image::open(&vmdk, Format::Vmdk, &options(None)).unwrap_err();
        assert!(
            matches!(err, ImageError::ReferenceNotAllowed { .. }),
            "{name} without allow_references: {err}"
        );
    }
    assert_eq!(Format::detect(&vmdk).unwrap(), Format::Vmdk);
    let mut image = trireme_image::open(&vmdk, Format::Vmdk, &options(Some(dir)))
        .unwrap_or_else(|e| panic!("opening {name}: {e}"));
    assert_same_bytes(image.as_mut(), &back);
    assert_same_map(image.as_mut(), &vmdk);
    fs::remove_file(&back).unwrap();
}

#[test]
fn qemu_subformats_small() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    // Not a multiple of the grain: the last grain is partial.
    random_raw(&raw, 48 * MIB + 3 * 512, 7, None);
    for (name, opts, refs) in [
        ("mono-sparse", "subformat=monolithicSparse", false),
        ("mono-flat", "subformat=monolithicFlat", true),
        ("two-gb-flat", "subformat=twoGbMaxExtentFlat", true),
        ("stream", "subformat=streamOptimized", false),
        (
            "lsi-hw6",
            "subformat=monolithicSparse,adapter_type=lsilogic,hwversion=6",
            false,
        ),
        (
            "compat6",
            "subformat=monolithicSparse,compat6=on,adapter_type=buslogic",
            false,
        ),
        (
            "stream-pvscsi",
            "subformat=streamOptimized,adapter_type=ide,hwversion=4",
            false,
        ),
    ] {
        check_subformat(dir.path(), name, &raw, opts, refs);
    }
}

#[test]
fn qemu_two_gb_sparse_over_2gib() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    let size = 5 * (1 << 30) + 5 * MIB;
    let two_gb = 2047 * MIB; // qemu's extent size
    let spots = [
        0,
        700 * MIB + 4096,
        two_gb - GRAIN,
        2 * two_gb - 512 * 3,
        size - 4 * GRAIN,
    ];
    random_raw(&raw, size, 11, Some(&spots));
    check_subformat(
        dir.path(),
        "two-gb-sparse",
        &raw,
        "subformat=twoGbMaxExtentSparse",
        true,
    );
    // The extent files are opened only from the allowed folder.
    let elsewhere = tempfile::tempdir().unwrap();
    let err = Vmdk::open(
        &dir.path().join("two-gb-sparse.vmdk"),
        &options(Some(elsewhere.path())),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::ReferenceOutside { .. }), "{err}");
}

#[test]
fn qemu_zeroed_grains() {
    let dir = tempfile::tempdir().unwrap();
    let vmdk = dir.path().join("zeroed.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            s(&vmdk),
            "16M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0xa5 0 4M",
            "-c",
            "write -z 1M 512k",
            "-c",
            "write -z 6M 1M",
            "-c",
            "write -P 0x3c 7M 64k",
            "-c",
            "write -z 15M 1M",
            s(&vmdk),
        ],
    );
    let back = dir.path().join("zeroed.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&back)],
    );
    let mut image = trireme_image::open(&vmdk, Format::Vmdk, &options(None)).unwrap();
    assert_same_bytes(image.as_mut(), &back);
    assert_same_map(image.as_mut(), &vmdk);
    let zeroed = image.segment(MIB, 4 * MIB).unwrap();
    assert_eq!((zeroed.kind, zeroed.length), (SegmentKind::Zero, MIB / 2));
}

/// A standalone descriptor (with CRLF line ends when `crlf`) next to `files`.
fn write_descriptor(path: &Path, create_type: &str, extents: &[String], crlf: bool) {
    let mut text = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\n\
parentCID=ffffffff\ncreateType=\"{create_type}\"\n\n# Extent description\n"
    );
    for e in extents {
        text.push_str(e);
        text.push('\n');
    }
    text.push_str("\n# The Disk Data Base\n#DDB\nddb.adapterType = \"lsilogic\"\n");
    if crlf {
        text = text.replace('\n', "\r\n");
    }
    fs::write(path, text).unwrap();
}

fn read_all(image: &mut dyn DiskImage) -> Vec<u8> {
    let mut all = vec![0u8; us(image.virtual_size())];
    image.read_at(0, &mut all).unwrap();
    all
}

#[test]
fn vmfs_descriptor_with_flat_extent_and_crlf() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(us(3 * MIB), 5);
    fs::write(dir.path().join("esx-flat.vmdk"), &data).unwrap();
    let desc = dir.path().join("esx.vmdk");
    write_descriptor(
        &desc,
        "vmfs",
        &[format!("RW {} VMFS \"esx-flat.vmdk\"", 3 * 2048)],
        false,
    );
    let mut image = Vmdk::open(&desc, &options(Some(dir.path()))).unwrap();
    assert_eq!(image.create_type(), "vmfs");
    assert_eq!(read_all(&mut image), data);
    assert!(matches!(
        Vmdk::open(&desc, &options(None)).unwrap_err(),
        ImageError::ReferenceNotAllowed { .. }
    ));

    // CRLF, a flat extent with an offset, a ZERO extent, a name with a space.
    fs::write(dir.path().join("part two.bin"), &data).unwrap();
    let crlf = dir.path().join("crlf.vmdk");
    write_descriptor(
        &crlf,
        "monolithicFlat",
        &[
            "RW 2048 FLAT \"esx-flat.vmdk\" 0".into(),
            "RW 16 ZERO".into(),
            "RDONLY 1024 FLAT \"part two.bin\" 4096".into(),
        ],
        true,
    );
    let mut image = Vmdk::open(&crlf, &options(Some(dir.path()))).unwrap();
    let all = read_all(&mut image);
    assert_eq!(all.len(), (2048 + 16 + 1024) * 512);
    assert!(all[..us(MIB)] == data[..us(MIB)]);
    assert!(all[us(MIB)..us(MIB) + 8192].iter().all(|&b| b == 0));
    assert!(all[us(MIB) + 8192..] == data[us(2 * MIB)..us(5 * MIB / 2)]);
    let zero = image.segment(MIB, 1 << 30).unwrap();
    assert_eq!((zero.kind, zero.length), (SegmentKind::Zero, 8192));
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner");
    fs::create_dir(&inner).unwrap();
    fs::write(dir.path().join("outside-flat.vmdk"), vec![1u8; 4096]).unwrap();
    let desc = inner.join("escape.vmdk");
    write_descriptor(
        &desc,
        "monolithicFlat",
        &["RW 8 FLAT \"../outside-flat.vmdk\" 0".into()],
        false,
    );
    let err = Vmdk::open(&desc, &options(Some(&inner))).unwrap_err();
    assert!(matches!(err, ImageError::ReferenceOutside { .. }), "{err}");
    let err = Vmdk::open(&desc, &options(None)).unwrap_err();
    assert!(
        matches!(err, ImageError::ReferenceNotAllowed { .. }),
        "{err}"
    );

    let rdm = dir.path().join("rdm.vmdk");
    write_descriptor(
        &rdm,
        "vmfsRawDeviceMap",
        &["RW 8 VMFSRDM \"x-rdm.vmdk\"".into()],
        false,
    );
    let err = Vmdk::open(&rdm, &options(Some(dir.path()))).unwrap_err();
    assert!(err.to_string().contains("raw device"), "{err}");
    write_descriptor(&rdm, "vmfs", &["RW 8 VMFSRAW \"x-rdm.vmdk\"".into()], false);
    let err = Vmdk::open(&rdm, &options(Some(dir.path()))).unwrap_err();
    assert!(err.to_string().contains("raw device"), "{err}");

    // A delta disk whose parent is missing, or names no parentFileNameHint.
    let delta = dir.path().join("delta.vmdk");
    fs::write(
        &delta,
        "createType=\"vmfsSparse\"\nparentCID=0badf00d\nparentFileNameHint=\"base.vmdk\"\n\
RW 8 ZERO\n",
    )
    .unwrap();
    let err = Vmdk::open(&delta, &options(Some(dir.path()))).unwrap_err();
    assert!(matches!(err, ImageError::Open { .. }), "{err}");
    let err = Vmdk::open(&delta, &options(None)).unwrap_err();
    assert!(
        matches!(err, ImageError::ReferenceNotAllowed { .. }),
        "{err}"
    );
    fs::write(
        &delta,
        "createType=\"vmfsSparse\"\nparentCID=0badf00d\nRW 8 ZERO\n",
    )
    .unwrap();
    let err = Vmdk::open(&delta, &options(Some(dir.path()))).unwrap_err();
    assert!(err.to_string().contains("parentFileNameHint"), "{err}");
    // A delta that is its own parent ends at the chain depth limit.
    fs::write(
        &delta,
        "createType=\"vmfsSparse\"\nCID=0badf00d\nparentCID=0badf00d\n\
parentFileNameHint=\"delta.vmdk\"\nRW 8 ZERO\n",
    )
    .unwrap();
    let err = Vmdk::open(&delta, &options(Some(dir.path()))).unwrap_err();
    assert!(matches!(err, ImageError::ChainTooDeep { .. }), "{err}");

    let noaccess = dir.path().join("noaccess.vmdk");
    write_descriptor(
        &noaccess,
        "monolithicFlat",
        &["NOACCESS 8 FLAT \"outside-flat.vmdk\" 0".into()],
        false,
    );
    assert!(Vmdk::open(&noaccess, &options(Some(dir.path()))).is_err());

    // A sparse extent that is itself a descriptor does not nest.
    let nested = dir.path().join("nested.vmdk");
    write_descriptor(
        &nested,
        "twoGbMaxExtentSparse",
        &["RW 8 SPARSE \"nested.vmdk\"".into()],
        false,
    );
    assert!(Vmdk::open(&nested, &options(Some(dir.path()))).is_err());
}

#[test]
fn qemu_delta_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let (base, mid, top) = (path("base.vmdk"), path("mid.vmdk"), path("top.vmdk"));
    run("qemu-img", &["create", "-q", "-f", "vmdk", s(&base), "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x22 20M 4M",
            s(&base),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            s(&mid),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x33 4M 8M",
            "-c",
            "write -P 0 21M 1M",
            s(&mid),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            "mid.vmdk",
            "-F",
            "vmdk",
            s(&top),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x44 30M 1M",
            "-c",
            "write -z 0 1M",
            s(&top),
        ],
    );
    let back = path("top.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&top), s(&back)],
    );
    let mut image = trireme_image::open(&top, Format::Vmdk, &options(Some(dir.path()))).unwrap();
    assert_same_bytes(image.as_mut(), &back);
    assert_same_map(image.as_mut(), &top);
    // The zeroed grains hide the parent's data.
    let seg = image.segment(0, u64::MAX).unwrap();
    assert_eq!((seg.kind, seg.length), (SegmentKind::Zero, MIB));

    let err = Vmdk::open(&top, &options(None)).unwrap_err();
    assert!(
        matches!(err, ImageError::ReferenceNotAllowed { .. }),
        "{err}"
    );
    let shallow = OpenOptions {
        allow_references: Some(dir.path().to_owned()),
        limits: Limits {
            max_chain_depth: 2,
            ..Limits::default()
        },
        ..OpenOptions::default()
    };
    let err = Vmdk::open(&top, &shallow).unwrap_err();
    assert!(
        matches!(err, ImageError::ChainTooDeep { limit: 2 }),
        "{err}"
    );
    assert!(Vmdk::open(&mid, &shallow).is_ok());

    // A parent whose CID no longer matches the child's parentCID.
    let mut bytes = fs::read(&base).unwrap();
    let at = bytes.windows(5).position(|w| w == b"\nCID=").unwrap() + 5;
    let other: &[u8; 8] = if &bytes[at..at + 8] == b"00000000" {
        b"11111111"
    } else {
        b"00000000"
    };
    bytes[at..at + 8].copy_from_slice(other);
    fs::write(&base, bytes).unwrap();
    let err = Vmdk::open(&top, &options(Some(dir.path()))).unwrap_err();
    assert!(err.to_string().contains("CID"), "{err}");
}

fn stream_disk() -> Vec<u8> {
    // 40 grains of 4 KiB plus a partial one: data, zero grains, an all-zero tail.
    let mut disk = pseudo_random(41 * 4096 - 1536, 99);
    disk[8 * 4096..12 * 4096].fill(0);
    disk[30 * 4096..].fill(0);
    disk[33 * 4096 + 100] = 7;
    disk
}

#[test]
fn stream_optimized_with_footer_from_the_technote() {
    let disk = stream_disk();
    let mut layout = Layout::stream(8);
    layout.gtes_per_gt = 16; // several grain tables
    let file = vmdk_fixture::build(&disk, &layout);
    // The header at the start says the GD is at the end.
    assert_eq!(file[56..64], u64::MAX.to_le_bytes());
    let mut image = Vmdk::from_source(Box::new(file.clone()), &options(None)).unwrap();
    assert_eq!(image.create_type(), "streamOptimized");
    assert_eq!(read_all(&mut image), disk);
    let seg = image.segment(8 * 4096, u64::MAX).unwrap();
    assert_eq!((seg.kind, seg.length), (SegmentKind::Zero, 4 * 4096));
    let seg = image.segment(0, u64::MAX).unwrap();
    assert_eq!((seg.kind, seg.length), (SegmentKind::Data, 8 * 4096));

    // Same through a file, and qemu agrees with the fixture.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("footer.vmdk");
    fs::write(&path, &file).unwrap();
    let back = dir.path().join("footer.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&path), s(&back)],
    );
    assert_eq!(fs::read(&back).unwrap(), disk);
    let mut image = trireme_image::open(&path, Format::Vmdk, &options(None)).unwrap();
    assert_same_map(image.as_mut(), &path);

    // Without the footer (header holds the GD), and with zeroed grains.
    let mut layout = Layout::stream(8);
    layout.footer = false;
    layout.zeroed = vec![3];
    let file = vmdk_fixture::build(&disk, &layout);
    let mut image = Vmdk::from_source(Box::new(file), &options(None)).unwrap();
    let mut want = disk.clone();
    want[3 * 4096..4 * 4096].fill(0);
    assert_eq!(read_all(&mut image), want);

    // A broken footer is a clear error.
    let mut file = vmdk_fixture::build(&disk, &Layout::stream(8));
    let n = file.len();
    file[n - 1024] = b'X';
    let err = Vmdk::from_source(Box::new(file), &options(None)).unwrap_err();
    assert!(err.to_string().contains("footer"), "{err}");
}

#[test]
fn hand_built_sparse_matches() {
    let disk = stream_disk();
    let mut layout = Layout::sparse(8, 4);
    layout.zeroed = vec![20, 21];
    let file = vmdk_fixture::build(&disk, &layout);
    let mut image = Vmdk::from_source(Box::new(file), &options(None)).unwrap();
    let mut want = disk.clone();
    want[20 * 4096..22 * 4096].fill(0);
    assert_eq!(read_all(&mut image), want);
    // A descriptor in memory names files: refused.
    let desc = b"createType=\"monolithicFlat\"\nRW 8 FLAT \"x-flat.vmdk\" 0\n".to_vec();
    let err = Vmdk::from_source(Box::new(desc), &options(None)).unwrap_err();
    assert!(
        matches!(err, ImageError::ReferenceNotAllowed { .. }),
        "{err}"
    );
}

/// Opens `file` with default limits and expects a quick error.
fn expect_quick_error(what: &str, file: Vec<u8>) -> ImageError {
    let start = Instant::now();
    let result = Vmdk::from_source(Box::new(file), &options(None)).and_then(|mut image| {
        let mut buf = vec![0u8; 1 << 20];
        let size = image.virtual_size();
        let mut pos = 0;
        while pos < size {
            let seg = image.segment(pos, 1 << 20)?;
            image.read_at(pos, &mut buf[..us(seg.length)])?;
            pos += seg.length;
        }
        Ok(())
    });
    let err = result.expect_err(what);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        start.elapsed()
    );
    err
}

fn patch(file: &mut [u8], at: usize, bytes: &[u8]) {
    file[at..at + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn resource_bombs_end_in_clear_errors() {
    let disk = stream_disk();
    let sparse = vmdk_fixture::build(&disk, &Layout::sparse(8, 16));

    let mut f = sparse.clone();
    patch(&mut f, 12, &(1u64 << 60).to_le_bytes());
    let err = expect_quick_error("huge capacity", f);
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    // 64 TiB of 1-sector grains, 1 GTE per table: a 512 GiB grain directory.
    let mut f = sparse.clone();
    patch(&mut f, 12, &(1u64 << 37).to_le_bytes());
    patch(&mut f, 20, &1u64.to_le_bytes());
    patch(&mut f, 44, &1u32.to_le_bytes());
    let err = expect_quick_error("huge GD", f);
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    // A GD within the limit but past the end of the file.
    let mut f = sparse.clone();
    patch(&mut f, 12, &(1u64 << 30).to_le_bytes());
    let err = expect_quick_error("GD past the end", f);
    assert!(err.to_string().contains("grain directory"), "{err}");

    let mut f = sparse.clone();
    patch(&mut f, 44, &u32::MAX.to_le_bytes());
    let err = expect_quick_error("huge numGTEsPerGT", f);
    assert!(err.to_string().contains("numGTEsPerGT"), "{err}");

    let mut f = sparse.clone();
    patch(&mut f, 20, &(1u64 << 40).to_le_bytes());
    let err = expect_quick_error("huge grain", f);
    assert!(err.to_string().contains("grain size"), "{err}");

    // A grain marker claiming 4 GiB of compressed data.
    let stream = vmdk_fixture::build(&disk, &Layout::stream(8));
    let first_grain = 512 * (1 + 1); // header + one descriptor sector
    let mut f = stream.clone();
    assert_eq!(f[first_grain..first_grain + 8], 0u64.to_le_bytes());
    patch(&mut f, first_grain + 8, &u32::MAX.to_le_bytes());
    let err = expect_quick_error("compressed grain size", f);
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    // A grain that inflates far past its grain size (a zip bomb).
    let bomb_disk = vec![0x11u8; 4096];
    let mut f = vmdk_fixture::build(&bomb_disk, &Layout::stream(8));
    // 1 MiB of zeros deflates to about 1 KiB: under the 2-grain cap on compressed
    // size, 256 times the grain once inflated.
    let z = vmdk_fixture::zlib(&vec![0u8; 1 << 20]);
    assert!(z.len() < 8192);
    let mut grown = f[..first_grain].to_vec();
    grown.extend_from_slice(&0u64.to_le_bytes());
    grown.extend_from_slice(&u32::try_from(z.len()).unwrap().to_le_bytes());
    grown.extend_from_slice(&z);
    // Keep the tables: they point at the first grain sector only.
    let tail = f.split_off(first_grain);
    let _ = tail;
    grown.resize(grown.len().div_ceil(512) * 512, 0);
    let mut layout = Layout::stream(8);
    layout.footer = false;
    let err = expect_quick_error("zip bomb", {
        // Rebuild with the bomb as grain 0: GT and GD after it.
        let mut file = grown;
        let gt_at = u32::try_from(file.len() / 512).unwrap();
        let mut gt = vec![0u8; 512 * 4];
        gt[..4].copy_from_slice(&2u32.to_le_bytes());
        file.extend_from_slice(&gt);
        let gd_at = (file.len() / 512) as u64;
        let mut gd = vec![0u8; 512];
        gd[..4].copy_from_slice(&gt_at.to_le_bytes());
        file.extend_from_slice(&gd);
        let h = vmdk_fixture::header(&layout, 8, (1, 1), gd_at, 0, 2);
        file[..512].copy_from_slice(&h);
        file
    });
    assert!(err.to_string().contains("more than a grain"), "{err}");

    // Thousands of extents in a descriptor.
    let mut text = String::from("createType=\"monolithicFlat\"\n");
    for _ in 0..100_000 {
        text.push_str("RW 1 ZERO\n");
    }
    let err = expect_quick_error("many extents", text.into_bytes());
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    // A descriptor over 1 MiB.
    let mut big = b"createType=\"monolithicFlat\"\n".to_vec();
    big.resize(2 << 20, b'#');
    let err = expect_quick_error("huge descriptor", big);
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");

    // Tight limits: a GT cache smaller than one table, a small virtual size.
    let tight = OpenOptions {
        limits: Limits {
            max_cache_bytes: 16,
            ..Limits::default()
        },
        ..OpenOptions::default()
    };
    assert!(Vmdk::from_source(Box::new(sparse.clone()), &tight).is_err());
}

#[test]
fn hand_built_se_sparse_in_memory() {
    let a = pseudo_random(4096, 1);
    let b = pseudo_random(4096, 2);
    let file = vmdk_fixture::se_sparse(128, &[Some(a.clone()), None, Some(b.clone())]);
    let mut image = Vmdk::from_source(Box::new(file), &options(None)).unwrap();
    assert_eq!(image.create_type(), "seSparse");
    let all = read_all(&mut image);
    assert_eq!(all.len(), 128 * 512);
    assert!(all[..4096] == a[..] && all[8192..12288] == b[..]);
    assert!(all[4096..8192].iter().chain(&all[12288..]).all(|&x| x == 0));
    let seg = image.segment(4096, u64::MAX).unwrap();
    assert_eq!((seg.kind, seg.length), (SegmentKind::Zero, 4096));
}

/// An ESX sparse (`COWD`) extent: header, GD at sector 1, one 4096-entry GT, grains.
fn cowd(disk: &[u8], grain_sectors: u32) -> Vec<u8> {
    let grain = usize::try_from(grain_sectors).unwrap() * 512;
    let mut file = vec![0u8; 34 * 512];
    file[..4].copy_from_slice(b"COWD");
    let sectors = u32::try_from(disk.len() / 512).unwrap();
    for (at, v) in [
        (4, 1),
        (8, 3),
        (12, sectors),
        (16, grain_sectors),
        (20, 1),
        (24, 1),
    ] {
        file[at..at + 4].copy_from_slice(&u32::to_le_bytes(v));
    }
    file[512..516].copy_from_slice(&2u32.to_le_bytes());
    for (g, chunk) in disk.chunks(grain).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let sector = u32::try_from(file.len() / 512).unwrap();
        file[1024 + g * 4..1024 + g * 4 + 4].copy_from_slice(&sector.to_le_bytes());
        file.extend_from_slice(chunk);
        file.resize(file.len().div_ceil(grain) * grain, 0);
    }
    file
}

#[test]
fn vmfs_sparse_cowd_extent() {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = pseudo_random(64 * 1024, 8);
    disk[8192..16384].fill(0);
    fs::write(dir.path().join("vm-delta.vmdk"), cowd(&disk, 8)).unwrap();
    let desc = dir.path().join("vm.vmdk");
    write_descriptor(
        &desc,
        "vmfsSparse",
        &["RW 128 VMFSSPARSE \"vm-delta.vmdk\"".into()],
        false,
    );
    let mut image = Vmdk::open(&desc, &options(Some(dir.path()))).unwrap();
    assert!(read_all(&mut image) == disk);
    let seg = image.segment(8192, u64::MAX).unwrap();
    assert_eq!((seg.kind, seg.length), (SegmentKind::Zero, 8192));
    // qemu reads the same bytes (it opens a COWD extent only through a descriptor).
    let back = dir.path().join("cowd.raw");
    let extent = dir.path().join("vm-delta.vmdk");
    run(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", s(&desc), s(&back)],
    );
    assert!(fs::read(&back).unwrap() == disk);
    let mut direct = Vmdk::open(&extent, &options(None)).unwrap();
    assert!(read_all(&mut direct) == disk);
}

/// The fuzz seeds are these fixtures; `VMDK_WRITE_SEEDS=<dir>` writes them there
/// (image/fuzz/seeds/vmdk). Either way each must open and read.
#[test]
fn fuzz_seeds() {
    let disk = {
        let mut d = pseudo_random(6144, 3);
        d[2048..3072].fill(0);
        d
    };
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut sparse = Layout::sparse(1, 4);
    seeds.push(("sparse.vmdk", vmdk_fixture::build(&disk, &sparse)));
    sparse.zeroed = vec![5, 6];
    seeds.push(("sparse-zeroed.vmdk", vmdk_fixture::build(&disk, &sparse)));
    // Compressible contents keep the streamOptimized seeds small.
    let text: Vec<u8> = (0..6144u32)
        .map(|i| b"vmdk grain "[(i % 11) as usize])
        .collect();
    let mut stream = Layout::stream(1);
    stream.gtes_per_gt = 8;
    seeds.push(("stream-footer.vmdk", vmdk_fixture::build(&text, &stream)));
    stream.footer = false;
    seeds.push(("stream.vmdk", vmdk_fixture::build(&text, &stream)));
    seeds.push((
        "sesparse.vmdk",
        vmdk_fixture::se_sparse(64, &[None, Some(pseudo_random(4096, 4))]),
    ));
    seeds.push((
        "descriptor.vmdk",
        b"# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\n\
parentCID=ffffffff\r\ncreateType=\"monolithicFlat\"\r\nRW 16 ZERO\r\n\
RDONLY 8 FLAT \"a-flat.vmdk\" 0\r\n"
            .to_vec(),
    ));
    for (name, bytes) in &seeds {
        assert!(bytes.len() < 16 << 10, "{name} is {} bytes", bytes.len());
        match Vmdk::from_source(Box::new(bytes.clone()), &options(None)) {
            Ok(mut image) => {
                read_all(&mut image);
            }
            Err(e) => assert!(
                matches!(e, ImageError::ReferenceNotAllowed { .. }),
                "{name}: {e}"
            ),
        }
        if let Some(dir) = std::env::var_os("VMDK_WRITE_SEEDS") {
            fs::write(Path::new(&dir).join(name), bytes).unwrap();
        }
    }
}

/// A/B timing on this host: `qemu-img convert -O raw` against reading the same image
/// with this reader and writing the data to a raw file. Run by hand:
/// `cargo test --release -p trireme-image --test vmdk -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_against_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("bench.raw");
    let size = 1u64 << 30;
    {
        let file = File::create(&raw).unwrap();
        file.set_len(size).unwrap();
        let chunk = pseudo_random(4 << 20, 42);
        let mut at = 0;
        while at < size {
            // Three chunks of data, one hole.
            if (at >> 22) % 4 != 3 {
                file.write_all_at(&chunk, at).unwrap();
            }
            at += 4 << 20;
        }
    }
    for subformat in ["monolithicSparse", "streamOptimized", "twoGbMaxExtentFlat"] {
        let vmdk = dir.path().join(format!("{subformat}.vmdk"));
        let opts = format!("subformat={subformat}");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &opts,
                s(&raw),
                s(&vmdk),
            ],
        );
        let out = dir.path().join("out.raw");
        let start = Instant::now();
        run(
            "qemu-img",
            &["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&out)],
        );
        let qemu = start.elapsed();
        fs::remove_file(&out).unwrap();
        let start = Instant::now();
        let mut image =
            trireme_image::open(&vmdk, Format::Vmdk, &options(Some(dir.path()))).unwrap();
        let file = File::create(&out).unwrap();
        file.set_len(image.virtual_size()).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        let mut pos = 0;
        while pos < image.virtual_size() {
            let seg = image.segment(pos, 8 << 20).unwrap();
            if seg.kind == SegmentKind::Data {
                let n = us(seg.length);
                image.read_at(pos, &mut buf[..n]).unwrap();
                file.write_all_at(&buf[..n], pos).unwrap();
            }
            pos += seg.length;
        }
        drop(file);
        let ours = start.elapsed();
        fs::remove_file(&out).unwrap();
        // The reader alone, without writing (twice: the second from a warm cache).
        let mut read_only = Duration::ZERO;
        for _ in 0..2 {
            let start = Instant::now();
            let mut pos = 0;
            while pos < image.virtual_size() {
                let seg = image.segment(pos, 8 << 20).unwrap();
                if seg.kind == SegmentKind::Data {
                    image.read_at(pos, &mut buf[..us(seg.length)]).unwrap();
                }
                pos += seg.length;
            }
            read_only = start.elapsed();
            println!("  read pass {read_only:?}");
        }
        let start = Instant::now();
        run(
            "qemu-img",
            &["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&out)],
        );
        let qemu_again = start.elapsed();
        fs::remove_file(&out).unwrap();
        println!(
            "{subformat}: qemu-img convert {qemu:?} then {qemu_again:?}; this reader with \
             writes {ours:?}, reading only {read_only:?}"
        );
    }
}

/// Reads the whole VMDK named by `$VMDK_READ` twice (for profiling by hand).
#[test]
#[ignore]
fn read_named_image() {
    let Some(path) = std::env::var_os("VMDK_READ") else {
        return;
    };
    let path = PathBuf::from(path);
    let mut image = trireme_image::open(&path, Format::Vmdk, &options(path.parent())).unwrap();
    let mut backing = vec![0u8; (8 << 20) + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + (8 << 20)];
    for _ in 0..2 {
        let start = Instant::now();
        let mut pos = 0;
        while pos < image.virtual_size() {
            let seg = image.segment(pos, 8 << 20).unwrap();
            if seg.kind == SegmentKind::Data {
                image.read_at(pos, &mut buf[..us(seg.length)]).unwrap();
            }
            pos += seg.length;
        }
        println!("read {} in {:?}", path.display(), start.elapsed());
    }
}

// ---- samples made by other tools -------------------------------------------------

fn samples_dir() -> PathBuf {
    let mut tried = Vec::new();
    let candidates = [
        std::env::var_os("TRIREME_SAMPLES").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/samples")),
        Some(PathBuf::from("/work/shared/samples")),
    ];
    for dir in candidates.into_iter().flatten() {
        if dir.join("MANIFEST.md").is_file() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!("no VMDK samples found; looked in $TRIREME_SAMPLES and {tried:?}");
}

/// Unpacks `member` from `archive` (tar.bz2 / tar.zst / .zst) into `dir`, writing
/// zero blocks as holes (the compactVD images expand to 8-12 GB of mostly zeros).
fn unpack(archive: &Path, member: &str, dir: &Path) -> PathBuf {
    let name = archive.file_name().unwrap().to_str().unwrap();
    let mut cmd = if name.ends_with(".tar.bz2") {
        let mut c = Command::new("tar");
        c.args(["-xjOf", s(archive), member]);
        c
    } else if name.ends_with(".tar.zst") {
        let mut c = Command::new("tar");
        c.args(["--zstd", "-xOf", s(archive), member]);
        c
    } else {
        let mut c = Command::new("zstd");
        c.args(["-dc", s(archive)]);
        c
    };
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let path = dir.join(member);
    let file = File::create(&path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = out.read(&mut buf[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for (i, block) in buf[..filled].chunks(64 << 10).enumerate() {
            if block.iter().any(|&b| b != 0) {
                file.write_all_at(block, at + (i as u64) * (64 << 10))
                    .unwrap();
            }
        }
        at += filled as u64;
    }
    file.set_len(at).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "unpacking {member} from {name}"
    );
    path
}

/// SHA-256 of the whole virtual disk; zero segments are hashed without reading.
fn disk_sha256(image: &mut dyn DiskImage) -> String {
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; 4 << 20];
    let mut buf = vec![0u8; 4 << 20];
    let size = image.virtual_size();
    let mut pos = 0;
    while pos < size {
        let seg = image.segment(pos, 4 << 20).unwrap();
        let n = us(seg.length);
        if seg.kind == SegmentKind::Zero {
            hasher.update(&zeros[..n]);
        } else {
            image.read_at(pos, &mut buf[..n]).unwrap();
            hasher.update(&buf[..n]);
        }
        pos += seg.length;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_sample(archive: &str, member: &str, descriptor: Option<&str>, size: u64, sha: &str) {
    let samples = samples_dir();
    let dir = tempfile::tempdir().unwrap();
    let archive = samples.join(archive);
    assert!(archive.is_file(), "missing sample {}", archive.display());
    let mut path = unpack(&archive, member, dir.path());
    if let Some(desc) = descriptor {
        path = unpack(&archive, desc, dir.path());
    }
    assert_eq!(
        Format::detect(&dir.path().join(member)).unwrap(),
        Format::Vmdk
    );
    let mut image = trireme_image::open(&path, Format::Vmdk, &options(Some(dir.path())))
        .unwrap_or_else(|e| panic!("opening {member}: {e}"));
    assert_eq!(image.virtual_size(), size, "{member}");
    assert_eq!(disk_sha256(image.as_mut()), sha, "{member}");
    if descriptor.is_some() {
        // The extent opens on its own too (no descriptor, nothing referenced).
        let mut alone = Vmdk::open(&dir.path().join(member), &options(None)).unwrap();
        assert_eq!(disk_sha256(&mut alone), sha, "{member} alone");
    }
}

#[test]
fn sample_3ext() {
    check_sample(
        "3ext.vmdk.tar.bz2",
        "3ext.vmdk",
        None,
        8589934592,
        "72d5822d98e4085e2e46b8b8423142144792269fd6437dc9f0d295875721d843",
    );
}

#[test]
fn sample_3ntfs() {
    check_sample(
        "3ntfs.vmdk.tar.bz2",
        "3ntfs.vmdk",
        None,
        8589934592,
        "1aa934d77ad50bfd0ac26fdc8058683ef1f79525d9ef0550362ec1624e806c11",
    );
}

#[test]
fn sample_apfs() {
    check_sample(
        "apfs.vmdk.tar.bz2",
        "apfs.vmdk",
        None,
        8589934592,
        "d3204e8a87306a510f0c0d97e3ab0fa18aa98ab849ff197a7b8de244b31430f2",
    );
}

#[test]
fn sample_open_vmdk_stream() {
    check_sample(
        "ovmdk-stream.vmdk.zst",
        "ovmdk-stream.vmdk",
        None,
        67108864,
        "295b0ad9192a0781e50dbc665da380748c7f2f47ee0bcaf9b7b32d9bf0e9d9e9",
    );
}

#[test]
fn sample_sesparse() {
    check_sample(
        "dissect-images.tar.zst",
        "sesparse.vmdk",
        Some("sesparse-desc.vmdk"),
        536870912,
        "3afa48010241335528fe402f083fc9f3a1013a49485221443a78d9a8604e2f90",
    );
}
