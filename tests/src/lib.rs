//! Harness for the end-to-end tests: a real dev cluster (the real `trireme` binary, real
//! node processes) in a temporary folder on free loopback ports, and helpers to run the
//! real NBD clients against it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// The `trireme` binary under test: `$TRIREME_BIN`, or next to the test executable
/// (`target/release/deps/..`).
pub fn trireme_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TRIREME_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile folder");
    let bin = dir.join("trireme");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --release --bin trireme` first",
        bin.display()
    );
    bin
}

/// Whether `port` and `port + 1000` (the admin port) are free on loopback.
fn ports_free(port: u16) -> bool {
    let admin = match port.checked_add(1000) {
        Some(a) => a,
        None => return false,
    };
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && TcpListener::bind(("127.0.0.1", admin)).is_ok()
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A base port whose NBD and admin ports are free, distinct across tests of this process.
pub fn free_base_port() -> u16 {
    // Spread processes apart by pid, tests within a process by a counter.
    let start = 20000 + u16::try_from(std::process::id() % 400).unwrap_or(0) * 20;
    NEXT_PORT
        .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
        .ok();
    loop {
        let p = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        if p > 29000 {
            NEXT_PORT.store(20000, Ordering::SeqCst);
            continue;
        }
        if ports_free(p) {
            return p;
        }
    }
}

/// Run a command, returning its output (not checking the status).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Run a command and require success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-node dev cluster in a temporary folder, stopped and removed when dropped.
#[derive(Debug)]
pub struct DevCluster {
    dir: tempfile::TempDir,
    /// node1's NBD port.
    pub port: u16,
}

impl DevCluster {
    /// `trireme dev up` on free ports.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trireme-e2e-")
            .tempdir()
            .expect("temp dir");
        let port = free_base_port();
        let c = DevCluster { dir, port };
        c.ok(&["dev", "up", "--base-port", &port.to_string()]);
        c
    }

    /// The cluster folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `trireme --cluster DIR …` command.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(trireme_bin());
        c.arg("--cluster").arg(self.dir.path()).args(args);
        c
    }

    /// Run `trireme` and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.cmd(args))
    }

    /// Run `trireme` and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        assert!(
            !out.status.success(),
            "trireme {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.port)
    }

    /// Create a volume.
    pub fn create_volume(&self, name: &str, size: &str) {
        self.ok(&["volume", "create", name, "--size", size]);
    }

    /// `volume info --json`.
    pub fn volume_info(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["volume", "info", name, "--json"]))
            .expect("volume info JSON")
    }

    /// node1's pid.
    pub fn node_pid(&self) -> Option<u32> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["dev", "status", "--json"])).expect("status JSON");
        v["nodes"][0]["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
    }

    /// Kill node1 with SIGKILL and wait until it is gone.
    pub fn kill9(&self) {
        let pid = self.node_pid().expect("node running");
        // SAFETY: kill(2) on a pid we just read from the node's pid file; no memory
        // is involved.
        unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.node_pid().is_some() {
            assert!(Instant::now() < deadline, "node {pid} survived SIGKILL");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's data folder.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("node1").join("store")
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = self.cmd(&["dev", "down"]).output();
    }
}

/// A command for a client tool, with /usr/bin first so Debian's python3 (with the nbd
/// module) runs nbdsh.
pub fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"));
    c
}

/// The folder of real sample images (`../shared/samples` with MANIFEST.md):
/// `$TRIREME_SAMPLES`, else `<workspace>/../shared/samples`, else `/work/shared/samples`.
/// Panics, naming where it looked, when none exists: tests never skip silently.
pub fn samples_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("TRIREME_SAMPLES") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(workspace.join("../shared/samples"));
    candidates.push(PathBuf::from("/work/shared/samples"));
    candidates
        .iter()
        .find(|p| p.join("MANIFEST.md").is_file())
        .cloned()
        .unwrap_or_else(|| panic!("sample images not found; looked in {candidates:?}"))
}

/// `qemu-io -f raw URI -c CMD…`, required to succeed with no pattern mismatch or I/O
/// error (qemu-io reports both on stdout and still exits 0); returns its stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

/// The same, opening the export read-only (`-r`), as a snapshot export needs.
pub fn qemu_io_ro(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io_with(flags: &[&str], uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(flags).args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = ok(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io {flags:?} {uri} {cmds:?}:\n{out}"
    );
    out
}
