//! QEMU's own NBD client (qemu-img, qemu-io, qemu-nbd --list) against a real node.

use std::process::Command;

use trireme_tests::{DevCluster, ok, qemu_io, run};

#[test]
fn qemu_io_patterns_zero_discard_flush_fua_aio() {
    let c = DevCluster::start();
    c.create_volume("vol1", "64M");
    let uri = c.uri("vol1");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "discard 128k 64k",
            "read -P 0 128k 64k",
            "flush",
            "write -f -P 0x11 2M 4k",
            "read -P 0x11 2M 4k",
            // Unaligned writes do read-modify-write of the blocks they touch.
            "write -P 0x22 5000 3000",
            "read -P 0xab 0 5000",
            "read -P 0x22 5000 3000",
            "read -P 0xab 8000 57536",
            "write -P 0x33 1048575 2",
            "read -P 0x33 1048575 2",
            "read -P 0 1048577 4095",
            // Zeroing that does not free space (NO_HOLE) and that does.
            "write -P 0x44 3M 1M",
            "write -z -u 3M 512k",
            "read -P 0 3M 512k",
            "read -P 0x44 3584k 512k",
            // Many requests in flight at once.
            "aio_write -P 0x55 8M 1M",
            "aio_write -P 0x56 9M 1M",
            "aio_write -P 0x57 10M 4k",
            "aio_flush",
            "read -P 0x55 8M 1M",
            "read -P 0x56 9M 1M",
            "read -P 0x57 10M 4k",
        ],
    );
    // The same data through a new connection.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 5000",
            "read -P 0x11 2M 4k",
            "read -P 0 128k 64k",
            "read -P 0x55 8M 1M",
        ],
    );
    // Reads and writes past the end fail cleanly.
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read 64M 4k"]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("out of"),
        "{text}"
    );
}

#[test]
fn qemu_img_info_map_convert_compare() {
    let c = DevCluster::start();
    c.create_volume("img", "32M");
    let uri = c.uri("img");
    let info: serde_json::Value = serde_json::from_str(&ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &uri,
    ])))
    .unwrap();
    assert_eq!(info["virtual-size"], 32 << 20);

    // A sparse source image with data in a few places.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let src_s = src.to_str().unwrap();
    ok(Command::new("qemu-img").args(["create", "-f", "qcow2", src_s, "32M"]));
    ok(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        src_s,
        "-c",
        "write -P 0x61 0 1M",
        "-c",
        "write -P 0x62 10M 512k",
        "-c",
        "write -P 0x63 31M 1M",
    ]));
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "qcow2", "-O", "raw", src_s, &uri]));
    ok(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", src_s, &uri]));

    // The allocation map shows data only where it was written.
    let map: serde_json::Value = serde_json::from_str(&ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &uri,
    ])))
    .unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        data,
        [(0, 1 << 20), (10 << 20, 512 << 10), (31 << 20, 1 << 20)],
        "{map}"
    );
    let alloc = c.volume_info("img")["allocated_bytes"].as_u64().unwrap();
    assert_eq!(alloc, (2 << 20) + (512 << 10));

    // And back out, byte for byte.
    let out = dir.path().join("out.raw");
    ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        out.to_str().unwrap(),
    ]));
    ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        src_s,
        out.to_str().unwrap(),
    ]));
}

#[test]
fn qemu_nbd_lists_exports() {
    let c = DevCluster::start();
    c.create_volume("alpha", "16M");
    c.create_volume("beta", "8M");
    let out =
        ok(Command::new("qemu-nbd").args(["--list", "-b", "127.0.0.1", "-p", &c.port.to_string()]));
    assert!(out.contains("exports available: 2"), "{out}");
    assert!(
        out.contains("export: 'alpha'") && out.contains("export: 'beta'"),
        "{out}"
    );
    assert!(out.contains("size:  16777216"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
}
