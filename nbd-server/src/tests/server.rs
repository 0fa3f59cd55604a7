//! The driver over real sockets: I/O, limits, timeouts, disconnects, shutdown with
//! hostile clients, and TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::support::*;
use crate::config::{ServerConfig, Tls};
use crate::server::{serve_tcp, serve_unix};
use crate::shutdown::Shutdown;
use crate::testing::MemExport;
use crate::wire;

struct Running {
    addr: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<std::io::Result<()>>,
    vol: Arc<MemExport>,
}

impl Running {
    /// Triggers shutdown and returns how long the server took to stop.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

async fn start(config: ServerConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cat, vol) = catalog();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve_tcp(listener, cat, Arc::new(config), shutdown.clone()));
    Running {
        addr,
        shutdown,
        task,
        vol,
    }
}

/// Waits for the peer to close: EOF or a reset, never data.
async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected close, got {:?}", &buf[..n]),
        Err(_) => panic!("connection still open after {within:?}"),
    }
}

async fn write_and_read_back(s: &mut TcpStream, cookie: u64, offset: u64) {
    let mut msg = req(0, wire::CMD_WRITE, cookie, offset, 4096);
    msg.extend(vec![0x42; 4096]);
    s.write_all(&msg).await.unwrap();
    assert_eq!(read_simple(s).await, (0, cookie));
    s.write_all(&req(0, wire::CMD_READ, cookie + 1, offset, 4096))
        .await
        .unwrap();
    assert_eq!(read_simple(s).await, (0, cookie + 1));
    assert_eq!(read_n(s, 4096).await, vec![0x42; 4096]);
}

#[tokio::test]
async fn simple_and_structured_io_over_tcp() {
    let server = start(ServerConfig::default()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    write_and_read_back(&mut s, 1, 8192).await;
    s.write_all(&req(0, wire::CMD_FLUSH, 9, 0, 0))
        .await
        .unwrap();
    assert_eq!(read_simple(&mut s).await, (0, 9));
    assert!(server.vol.is_durable(8192, 4096));
    s.write_all(&req(0, wire::CMD_DISC, 10, 0, 0))
        .await
        .unwrap();
    expect_closed(&mut s, Duration::from_secs(5)).await;

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", true).await;
    s.write_all(&req(0, wire::CMD_READ, 20, 4096, 8192))
        .await
        .unwrap();
    let hole = read_chunk(&mut s).await;
    assert_eq!((hole.ty, hole.cookie), (wire::REPLY_TYPE_OFFSET_HOLE, 20));
    let data = read_chunk(&mut s).await;
    assert_eq!(
        (data.ty, data.flags),
        (wire::REPLY_TYPE_OFFSET_DATA, wire::REPLY_FLAG_DONE)
    );
    assert_eq!(&data.payload[8..], &[0x42; 4096][..]);
    s.write_all(&req(
        wire::CMD_FLAG_REQ_ONE,
        wire::CMD_BLOCK_STATUS,
        21,
        0,
        65536,
    ))
    .await
    .unwrap();
    let status = read_chunk(&mut s).await;
    assert_eq!(status.ty, wire::REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(status.payload.len(), 12, "REQ_ONE gives exactly one extent");
    assert_eq!(status.payload[4..8], 8192u32.to_be_bytes());
    // An invalid request is answered and the connection stays usable.
    s.write_all(&req(0, wire::CMD_READ, 22, VOL_SIZE, 1))
        .await
        .unwrap();
    let err = read_chunk(&mut s).await;
    assert_eq!(err.ty, wire::REPLY_TYPE_ERROR);
    assert_eq!(err.payload[..4], wire::EINVAL.to_be_bytes());
    s.write_all(&req(0, wire::CMD_DISC, 23, 0, 0))
        .await
        .unwrap();
    expect_closed(&mut s, Duration::from_secs(5)).await;
    assert!(server.stop().await < Duration::from_secs(2));
}

#[tokio::test]
async fn unix_socket_serves_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (cat, _) = catalog();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve_unix(
        listener,
        cat,
        Arc::new(ServerConfig::default()),
        shutdown.clone(),
    ));
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    s.write_all(&req(0, wire::CMD_READ, 1, 0, 16))
        .await
        .unwrap();
    assert_eq!(read_simple(&mut s).await, (0, 1));
    assert_eq!(read_n(&mut s, 16).await, vec![0; 16]);
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn fifty_idle_clients_do_not_stop_another_from_being_served() {
    let server = start(ServerConfig::default()).await;
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        match i % 3 {
            0 => {}                                      // connected, silent
            1 => greet(&mut s).await,                    // stuck before any option
            _ => s.write_all(&[0, 0, 0]).await.unwrap(), // partial client flags
        }
        idle.push(s);
    }
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        connect_go(&mut s, "vol", false).await;
        for i in 0..20 {
            write_and_read_back(&mut s, 100 + 2 * i, i * 4096).await;
        }
    })
    .await;
    assert!(served.is_ok(), "the active client was starved");
    let took = server.stop().await;
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

#[tokio::test]
async fn handshake_timeout_drops_idle_clients() {
    let server = start(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut s).await;
    let started = Instant::now();
    expect_closed(&mut s, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    // A client that finishes in time stays connected past the deadline.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_and_read_back(&mut s, 1, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn connection_limit_refuses_extra_clients() {
    let server = start(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut a = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut a).await;
    let mut b = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut b).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    expect_closed(&mut c, Duration::from_secs(5)).await;
    drop(a);
    // The slot is given back once the first connection is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = TcpStream::connect(server.addr).await.unwrap();
        let mut greeting = [0u8; 18];
        if d.read_exact(&mut greeting).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_the_connection() {
    let server = start(ServerConfig::default()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    s.write_all(&[0xee; 28]).await.unwrap();
    expect_closed(&mut s, Duration::from_secs(5)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    // A WRITE announcing 4 GiB: refused before any of it is read.
    s.write_all(&req(0, wire::CMD_WRITE, 1, 0, u32::MAX))
        .await
        .unwrap();
    expect_closed(&mut s, Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test]
async fn disconnect_finishes_outstanding_requests_first() {
    let server = start(ServerConfig::default()).await;
    server.vol.set_delay(Duration::from_millis(300));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    let mut msg = req(0, wire::CMD_WRITE, 5, 0, 512);
    msg.extend(vec![0x77; 512]);
    msg.extend(req(0, wire::CMD_DISC, 6, 0, 0));
    s.write_all(&msg).await.unwrap();
    assert_eq!(read_simple(&mut s).await, (0, 5));
    expect_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(server.vol.contents(0, 512), vec![0x77; 512]);
    server.stop().await;
}

#[tokio::test]
async fn in_flight_requests_are_bounded_and_all_answered() {
    let server = start(ServerConfig {
        max_inflight_requests: 3,
        ..ServerConfig::default()
    })
    .await;
    server.vol.set_delay(Duration::from_millis(30));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut s, "vol", false).await;
    let mut msg = Vec::new();
    for cookie in 0..20u64 {
        msg.extend(req(0, wire::CMD_READ, cookie, cookie * 512, 512));
    }
    s.write_all(&msg).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (err, cookie) = read_simple(&mut s).await;
        assert_eq!(err, 0);
        read_n(&mut s, 512).await;
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    assert!(
        server.vol.peak_concurrency() <= 3,
        "{}",
        server.vol.peak_concurrency()
    );
    assert!(
        server.vol.peak_concurrency() >= 2,
        "requests ran one at a time"
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_is_prompt_with_idle_slow_and_hostile_clients() {
    let server = start(ServerConfig {
        drain_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
    .await;
    // Connected but silent; halfway through the handshake; trickling an option.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let mut halfway = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut halfway).await;
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut trickle).await;
    trickle
        .write_all(&opt(wire::OPT_LIST, &[])[..5])
        .await
        .unwrap();
    // Asks for 200 MiB of reads and never reads a reply, so the writer blocks.
    let mut hostile = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut hostile, "vol", false).await;
    let mut msg = Vec::new();
    for cookie in 0..200u64 {
        msg.extend(req(0, wire::CMD_READ, cookie, 0, 1 << 20));
    }
    hostile.write_all(&msg).await.unwrap();
    // Served, then idle in transmission.
    let mut quiet = TcpStream::connect(server.addr).await.unwrap();
    connect_go(&mut quiet, "vol", false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = server.stop().await;
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    expect_closed(&mut quiet, Duration::from_secs(2)).await;
    drop((silent, halfway, trickle, hostile));
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, tokio_rustls::TlsConnector) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.key_pair.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        Arc::new(server),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

#[tokio::test]
async fn tls_required_session_over_tcp() {
    let (server_tls, connector) = tls_pair();
    let server = start(ServerConfig {
        tls: Tls::Required(server_tls),
        ..ServerConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut s).await;
    let r = ask(&mut s, wire::OPT_GO, &go_data(b"vol", &[])).await;
    assert_eq!(r[0].ty, wire::REP_ERR_TLS_REQD);
    let r = ask(&mut s, wire::OPT_STARTTLS, &[]).await;
    assert_eq!(r[0].ty, wire::REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, s).await.unwrap();
    let r = ask(&mut tls, wire::OPT_LIST, &[]).await;
    assert_eq!(r.last().unwrap().ty, wire::REP_ACK);
    let r = ask(&mut tls, wire::OPT_GO, &go_data(b"vol", &[])).await;
    assert_eq!(r.last().unwrap().ty, wire::REP_ACK);
    let mut msg = req(0, wire::CMD_WRITE, 1, 0, 4);
    msg.extend(b"tls!");
    msg.extend(req(0, wire::CMD_READ, 2, 0, 4));
    tls.write_all(&msg).await.unwrap();
    assert_eq!(read_simple(&mut tls).await, (0, 1));
    assert_eq!(read_simple(&mut tls).await, (0, 2));
    assert_eq!(read_n(&mut tls, 4).await, b"tls!");
    tls.write_all(&req(0, wire::CMD_DISC, 3, 0, 0))
        .await
        .unwrap();
    expect_closed(&mut tls, Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test]
async fn starttls_injection_over_tcp_is_refused() {
    let (server_tls, _) = tls_pair();
    let server = start(ServerConfig {
        tls: Tls::Required(server_tls),
        ..ServerConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    greet(&mut s).await;
    let mut msg = opt(wire::OPT_STARTTLS, &[]);
    msg.extend(opt(wire::OPT_GO, &go_data(b"vol", &[])));
    s.write_all(&msg).await.unwrap();
    // Usually both options arrive in one read and nothing is answered; if TCP split
    // them, the GO bytes reach the TLS handshake, which fails. Never is GO answered.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "connection still open");
    let answered = replies(&rest);
    assert!(
        answered.iter().all(|r| r.option == wire::OPT_STARTTLS),
        "{answered:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn inconsistent_config_is_refused_before_serving() {
    let (cat, _) = catalog();
    for config in [
        ServerConfig {
            max_inflight_bytes: 1024,
            ..ServerConfig::default()
        },
        ServerConfig {
            max_connections: 0,
            ..ServerConfig::default()
        },
    ] {
        let err = serve_tcp(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            cat.clone(),
            Arc::new(config),
            Shutdown::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
