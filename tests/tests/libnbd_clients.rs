//! libnbd's tools (nbdinfo, nbdcopy, nbdsh) and fio against a real node.

use std::process::Command;

use trireme_tests::{DevCluster, ok, run, tool};

#[test]
fn nbdinfo_list_map_and_can() {
    let c = DevCluster::start();
    c.create_volume("vol1", "16M");
    c.create_volume("vol2", "4M");
    let uri = c.uri("vol1");
    let list = ok(tool("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", c.port)]));
    assert!(
        list.contains("export=\"vol1\"") && list.contains("export=\"vol2\""),
        "{list}"
    );

    let info = ok(tool("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 16 << 20);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_fast_zero"], true);
    assert_eq!(e["can_df"], true);
    assert_eq!(e["can_cache"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert!(info.contains("base:allocation"), "{info}");

    for can in [
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "df",
        "cache",
        "structured-reply",
    ] {
        let out = run(tool("nbdinfo").args(["--can", can, &uri]));
        assert!(
            out.status.success(),
            "nbdinfo --can {can}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        !run(tool("nbdinfo").args(["--is", "read-only", &uri]))
            .status
            .success()
    );

    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 1 1M 1M",
        "-c",
        "write -P 2 8M 4k",
    ]));
    let map = ok(tool("nbdinfo").args(["--map", "--json", &uri]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 0)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(1 << 20, 1 << 20), (8 << 20, 4096)], "{map}");
    let total: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 16 << 20);
}

#[test]
fn nbdcopy_with_several_connections_round_trips() {
    let c = DevCluster::start();
    c.create_volume("copy", "64M");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Pseudo-random content with holes.
    let mut data = vec![0u8; 64 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
    }
    std::fs::write(&src, &data).unwrap();
    let uri = c.uri("copy");
    ok(tool("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        src.to_str().unwrap(),
        &uri,
    ]));
    let back = dir.path().join("back.raw");
    ok(tool("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        &uri,
        back.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data differs after nbdcopy round trip"
    );
}

#[test]
fn nbdsh_handshake_options_and_error_replies() {
    let c = DevCluster::start();
    c.create_volume("sh", "1M");
    let script = format!(
        r#"
import nbd, errno
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri("nbd://127.0.0.1:{port}/sh")
# Listing meta contexts offers base:allocation.
seen = []
h.opt_list_meta_context(lambda name: seen.append(name))
assert "base:allocation" in seen, seen
# NBD_OPT_INFO on an unknown export fails, the connection goes on.
h.set_export_name("no-such-volume")
try:
    h.opt_info()
    raise AssertionError("opt_info on an unknown export succeeded")
except nbd.Error:
    pass
h.set_export_name("sh")
h.opt_info()
assert h.get_size() == 1048576
h.opt_go()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
# Requests past the end get an error reply from the server, not a disconnect
# (libnbd's own bounds check is turned off so the requests are sent).
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
for op in (lambda: h.pread(4096, 1048576 - 1024), lambda: h.pwrite(b"x" * 4096, 1048576 - 1024)):
    try:
        op()
        raise AssertionError("request past the end succeeded")
    except nbd.Error as e:
        assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
h.pwrite(b"\xaa" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b"\xaa" * 4096
h.zero(4096, 4096)
assert h.pread(4096, 4096) == bytes(4096)
# BLOCK_STATUS with REQ_ONE returns exactly one extent.
h.pwrite(b"\xbb" * 8192, 65536)
ext = []
h.block_status(65536, 65536, lambda ctx, off, entries, err: ext.extend(entries), nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 2 and ext[0] == 8192 and ext[1] == 0, ext
h.flush()
h.shutdown()
print("nbdsh ok")
"#,
        port = c.port
    );
    let out = ok(tool("nbdsh").args(["-c", &script]));
    assert!(out.contains("nbdsh ok"), "{out}");
}

#[test]
fn fio_random_read_write_verifies() {
    let c = DevCluster::start();
    c.create_volume("fio", "256M");
    let out = ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", c.uri("fio")),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0);
    // fio with bs ranges crossing blocks: unaligned I/O, verified.
    ok(Command::new("fio").args([
        "--name=unaligned",
        "--ioengine=nbd",
        &format!("--uri={}", c.uri("fio")),
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--blockalign=512",
        "--iodepth=8",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ]));
}
