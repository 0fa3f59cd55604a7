//! The `trireme` CLI against a real dev cluster: the exact command forms users' scripts
//! rely on, and one clear error line for each kind of mistake.

use std::process::Command;

use trireme_tests::{DevCluster, ok, run, trireme_bin};

#[test]
fn dev_cluster_lifecycle_and_status_json() {
    let c = DevCluster::start();
    let status: serde_json::Value =
        serde_json::from_str(&c.ok(&["dev", "status", "--json"])).unwrap();
    let node = &status["nodes"][0];
    assert_eq!(node["name"], "node1");
    assert_eq!(node["datacenter"], "dc1");
    assert_eq!(node["nbd"], format!("127.0.0.1:{}", c.port));
    let pid = node["pid"].as_u64().expect("running node has a pid");

    // `dev up` again leaves a running node alone.
    let again = c.ok(&["dev", "up"]);
    assert!(again.contains("already running"), "{again}");
    assert_eq!(c.node_pid(), Some(u32::try_from(pid).unwrap()));

    // A killed node is restarted by `dev up`, and keeps its volumes.
    c.create_volume("keep", "64M");
    c.kill9();
    c.ok(&["dev", "up"]);
    assert_ne!(c.node_pid(), Some(u32::try_from(pid).unwrap()));
    assert_eq!(c.volume_info("keep")["size"], 64 << 20);

    let down = c.ok(&["dev", "down"]);
    assert!(down.contains("node1 stopped"), "{down}");
    let text = c.ok(&["dev", "status"]);
    assert!(text.contains("stopped"), "{text}");
    let err = c.fails(&["volume", "list"]);
    assert!(err.contains("node not running"), "{err}");
}

#[test]
fn volume_and_tenant_commands() {
    let c = DevCluster::start();
    let out = c.ok(&["volume", "create", "vol1", "--size", "1G"]);
    assert!(out.contains("created volume vol1"), "{out}");
    let info = c.volume_info("vol1");
    assert_eq!(info["size"], 1u64 << 30);
    assert_eq!(info["class"], "local");
    assert_eq!(info["tenant"], "default");
    assert_eq!(info["allocated_bytes"], 0);
    assert_eq!(info["chunk_size"], 4 << 20);
    assert_eq!(info["nbd_uri"], c.uri("vol1"));

    c.ok(&["tenant", "create", "acme"]);
    c.ok(&[
        "volume",
        "create",
        "acme-disk",
        "--size",
        "10M",
        "--tenant",
        "acme",
        "--class",
        "local",
    ]);
    let list: serde_json::Value =
        serde_json::from_str(&c.ok(&["volume", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme-disk", "vol1"]);
    let table = c.ok(&["volume", "list"]);
    assert!(
        table.contains("acme-disk") && table.contains("1.0 GiB"),
        "{table}"
    );

    c.ok(&["volume", "resize", "vol1", "--size", "2G"]);
    assert_eq!(c.volume_info("vol1")["size"], 2u64 << 30);
    // Online: new connections see the new size, and the grown space is writable.
    let info: serde_json::Value =
        serde_json::from_str(&ok(std::process::Command::new("qemu-img").args([
            "info",
            "--output=json",
            &c.uri("vol1"),
        ])))
        .unwrap();
    assert_eq!(info["virtual-size"], 2u64 << 30);
    ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &c.uri("vol1"),
        "-c",
        "write -P 0x3c 1536M 64k",
        "-c",
        "read -P 0x3c 1536M 64k",
    ]));
    let err = c.fails(&["volume", "resize", "vol1", "--size", "1G"]);
    assert!(
        err.contains("shrinking") && err.lines().count() == 1,
        "{err}"
    );

    for (args, needle) in [
        (
            &["volume", "create", "vol1", "--size", "1G"][..],
            "already exists",
        ),
        (&["volume", "create", "v2", "--size", "lots"], "bad size"),
        (
            &["volume", "create", "v2", "--size", "1000"],
            "multiple of 512",
        ),
        (
            &[
                "volume", "create", "v2", "--size", "1G", "--tenant", "nobody",
            ],
            "no such tenant",
        ),
        (
            &["volume", "create", "v2", "--size", "1G", "--class", "gold"],
            "unknown storage class",
        ),
        (&["volume", "info", "nope"], "no such volume"),
        (&["volume", "delete", "nope"], "no such volume"),
        (&["tenant", "create", "acme"], "already exists"),
        (&["tenant", "delete", "nobody"], "no such tenant"),
    ] {
        let err = c.fails(args);
        assert!(
            err.contains(needle),
            "trireme {args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line for {args:?}: {err:?}"
        );
    }

    let out = c.ok(&["tenant", "delete", "acme"]);
    assert!(out.contains("acme-disk"), "{out}");
    c.fails(&["volume", "info", "acme-disk"]);
    let tenants = c.ok(&["tenant", "list"]);
    assert!(!tenants.contains("acme"), "{tenants}");
    c.ok(&["volume", "delete", "vol1"]);
    c.fails(&["volume", "info", "vol1"]);
}

#[test]
fn every_command_has_help() {
    let bin = trireme_bin();
    for args in [
        &["--help"][..],
        &["dev", "--help"],
        &["dev", "up", "--help"],
        &["dev", "status", "--help"],
        &["dev", "down", "--help"],
        &["node", "run", "--help"],
        &["volume", "--help"],
        &["volume", "create", "--help"],
        &["volume", "list", "--help"],
        &["volume", "info", "--help"],
        &["volume", "resize", "--help"],
        &["volume", "set", "--help"],
        &["volume", "delete", "--help"],
        &["tenant", "create", "--help"],
        &["tenant", "list", "--help"],
        &["tenant", "delete", "--help"],
    ] {
        let out = ok(std::process::Command::new(&bin).args(args));
        assert!(out.contains("Usage:"), "{args:?}: {out}");
    }
}

#[test]
fn commands_without_a_cluster_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(trireme_bin())
        .arg("--cluster")
        .arg(dir.path().join("none"))
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cluster at"), "{err}");
}

#[test]
fn read_only_volumes() {
    let c = DevCluster::start();
    c.create_volume("golden", "16M");
    let uri = c.uri("golden");
    ok(std::process::Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x47 0 1M"]));
    let out = c.ok(&["volume", "set", "golden", "--read-only", "true"]);
    assert!(out.contains("read-only"), "{out}");
    assert_eq!(c.volume_info("golden")["read_only"], true);

    // The export now says so, reads work, writes are refused.
    ok(trireme_tests::tool("nbdinfo").args(["--is", "read-only", &uri]));
    ok(std::process::Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0x47 0 1M",
    ]));
    let script = format!(
        r#"
import nbd, errno
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert h.is_read_only()
try:
    h.pwrite(b"x" * 4096, 0)
    raise AssertionError("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert h.pread(4096, 0) == b"\x47" * 4096
print("read-only ok")
"#
    );
    assert!(ok(trireme_tests::tool("nbdsh").args(["-c", &script])).contains("read-only ok"));

    c.ok(&["volume", "set", "golden", "--read-only", "false"]);
    ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x48 0 4k",
        "-c",
        "read -P 0x48 0 4k",
    ]));
}

/// `cluster init` and `cluster issue-cert`: the CA and master key with private modes, a
/// node certificate that openssl verifies against the CA and that names the node, and
/// one-line refusals (a second init, a bad node name, no CA yet).
#[test]
fn cluster_init_and_node_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("c");
    let cli = |args: &[&str]| {
        let mut c = Command::new(trireme_bin());
        c.arg("--cluster").arg(&cluster).args(args);
        run(&mut c)
    };
    let no_ca = cli(&["cluster", "issue-cert", "node1"]);
    assert!(!no_ca.status.success());
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("cluster init"));
    let init = cli(&["cluster", "init"]);
    assert!(init.status.success(), "{init:?}");
    let mode = |p: &str| {
        std::fs::metadata(cluster.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("master.key"), 0o600);
    let again = cli(&["cluster", "init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a CA"));
    let issued = cli(&["cluster", "issue-cert", "node1"]);
    assert!(issued.status.success(), "{issued:?}");
    assert_eq!(mode("node1/tls/node1.key"), 0o600);
    let verify = ok(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(cluster.join("ca.crt"))
        .arg(cluster.join("node1/tls/node1.crt")));
    assert!(verify.contains(": OK"), "{verify}");
    let san = ok(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(cluster.join("node1/tls/node1.crt")));
    assert!(san.contains("DNS:node1.node.trireme"), "{san}");
    let bad = cli(&["cluster", "issue-cert", "Bad_Name"]);
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );
}
