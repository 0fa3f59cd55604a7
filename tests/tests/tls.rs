//! A node whose exports require TLS (`node run --config` with a certificate): libnbd and
//! QEMU connect with STARTTLS; plaintext clients are refused.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use trireme_tests::{DevCluster, free_base_port, ok, run, tool, trireme_bin};

fn openssl(dir: &Path, args: &[&str]) {
    ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA and a server certificate for 127.0.0.1 in `dir`, named as libnbd and QEMU
/// expect (ca-cert.pem, server-cert.pem, server-key.pem).
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=trireme test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server-cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tls_required_exports() {
    // A cluster folder with a master key and a volume, then the same node data served
    // by a node with TLS.
    let c = DevCluster::start();
    c.create_volume("tlsvol", "8M");
    c.ok(&["dev", "down"]);
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());

    let port = free_base_port();
    let node_dir = c.path().join("node1");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("node.json")).unwrap()).unwrap();
    cfg["nbd_listen"] = format!("127.0.0.1:{port}").into();
    cfg["admin_listen"] = format!("127.0.0.1:{}", port + 1000).into();
    cfg["tls_cert"] = certs
        .path()
        .join("server-cert.pem")
        .to_str()
        .unwrap()
        .into();
    cfg["tls_key"] = certs.path().join("server-key.pem").to_str().unwrap().into();
    let cfg_path = node_dir.join("node-tls.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut node = Node(
        Command::new(trireme_bin())
            .args(["node", "run", "--config"])
            .arg(&cfg_path)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port + 1000)).is_err() {
        assert!(Instant::now() < deadline, "TLS node did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let tls_uri = format!(
        "nbds://127.0.0.1:{port}/tlsvol?tls-certificates={}",
        certs.path().display()
    );
    let info = ok(tool("nbdinfo").arg(&tls_uri));
    assert!(info.contains("export-size: 8388608"), "{info}");

    // Plaintext is refused: the export requires TLS.
    let plain = run(tool("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/tlsvol")));
    assert!(!plain.status.success(), "plaintext client got in");

    // QEMU's client with x509 credentials.
    let out = ok(Command::new("qemu-io").args([
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.path().display()
        ),
        "--image-opts",
        &format!("driver=nbd,host=127.0.0.1,port={port},export=tlsvol,tls-creds=tls0"),
        "-c",
        "write -P 0x5c 0 64k",
        "-c",
        "read -P 0x5c 0 64k",
    ]));
    assert!(!out.contains("verification failed"), "{out}");

    // SIGTERM: the node stops cleanly.
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(i32::try_from(node.0.id()).unwrap(), libc::SIGTERM) };
    let status = node.0.wait().unwrap();
    assert!(status.success(), "node exited with {status}");
}
