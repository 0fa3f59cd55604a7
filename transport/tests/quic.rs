//! Two endpoints on 127.0.0.1: concurrent request/response in both directions, the X1
//! refusals (no certificate, self-signed, other cluster, unregistered node, server of
//! another cluster, wrong node), the frame cap, and bounded failure when a connection
//! dies mid-request or a peer goes silent.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use trireme_transport::frame::{FrameError, code};
use trireme_transport::{
    CaCertificate, ClusterCa, Direction, Endpoint, EndpointConfig, FaultAction, FaultPlan,
    FaultRule, NodeIdentity, NodeRegistry, TransportError,
};

const LOCALHOST: &str = "127.0.0.1:0";

fn registry(nodes: &[&str]) -> Arc<dyn NodeRegistry> {
    let set: HashSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
    Arc::new(move |n: &str| set.contains(n))
}

fn fast_config() -> EndpointConfig {
    EndpointConfig {
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(500),
        handshake_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(2),
        ..EndpointConfig::default()
    }
}

fn bind(
    identity: &NodeIdentity,
    ca: &CaCertificate,
    registry: Arc<dyn NodeRegistry>,
    config: EndpointConfig,
) -> Endpoint {
    Endpoint::bind_with(
        LOCALHOST.parse().expect("address"),
        identity,
        ca,
        registry,
        config,
    )
    .expect("bind endpoint")
}

/// What the serving application saw.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    requests: AtomicU64,
}

/// Serve every accepted connection: answer `b"echo:" + payload`; on `b"close"` close
/// the connection without answering; on `b"drop"` drop the responder; on `b"hang"`
/// never answer.
fn serve(endpoint: Arc<Endpoint>) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let counters = seen.clone();
    tokio::spawn(async move {
        while let Ok((_peer, conn)) = endpoint.accept().await {
            counters.connections.fetch_add(1, Ordering::SeqCst);
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Ok((payload, responder)) = conn.next_request().await {
                    counters.requests.fetch_add(1, Ordering::SeqCst);
                    match payload.as_slice() {
                        b"close" => conn.close(),
                        b"drop" => drop(responder),
                        b"hang" => {
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                drop(responder);
                            });
                        }
                        _ => {
                            let mut response = b"echo:".to_vec();
                            response.extend_from_slice(&payload);
                            let _ = responder.respond(&response).await;
                        }
                    }
                }
            });
        }
    });
    seen
}

struct Cluster {
    ca: ClusterCa,
    server: Arc<Endpoint>,
    addr: SocketAddr,
    seen: Arc<Seen>,
}

/// Node `a` serving, in a cluster where `registered` are the registered nodes.
fn cluster(registered: &[&str], server_config: EndpointConfig) -> Cluster {
    let ca = ClusterCa::create().expect("create CA");
    let a = ca.issue_node("a").expect("issue a");
    let server = Arc::new(bind(
        &a,
        ca.certificate(),
        registry(registered),
        server_config,
    ));
    let addr = server.local_addr().expect("local addr");
    let seen = serve(server.clone());
    Cluster {
        ca,
        server,
        addr,
        seen,
    }
}

fn client(cluster: &Cluster, node: &str, config: EndpointConfig) -> Endpoint {
    let identity = cluster.ca.issue_node(node).expect("issue client");
    bind(
        &identity,
        cluster.ca.certificate(),
        registry(&["a", node]),
        config,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_both_ways() {
    // The CA goes through PEM and back, as `cluster init` then a restart would; so
    // does a node identity.
    let created = ClusterCa::create().expect("create CA");
    let ca = ClusterCa::load(created.cert_pem().as_bytes(), created.key_pem().as_bytes())
        .expect("load CA");
    let trust = CaCertificate::from_pem(created.cert_pem().as_bytes()).expect("CA cert");
    let a = ca.issue_node("a").expect("issue a");
    let a =
        NodeIdentity::from_pem(a.cert_pem().as_bytes(), a.key_pem().as_bytes()).expect("reload a");
    let b = ca.issue_node("b").expect("issue b");
    let nodes = registry(&["a", "b"]);
    // Requests share the connection's bandwidth fairly, so they all end near the end
    // of the run: the timeout bounds the whole run on a loaded machine.
    let config = EndpointConfig {
        request_timeout: Duration::from_secs(60),
        ..fast_config()
    };
    let server = bind(&a, &trust, nodes.clone(), config.clone());
    let client = bind(&b, &trust, nodes, config);
    assert_eq!(client.node(), "b");

    let (dialled, accepted) = tokio::join!(
        client.connect(server.local_addr().expect("addr"), "a"),
        server.accept()
    );
    let b_to_a = dialled.expect("connect");
    let (peer, a_to_b) = accepted.expect("accept");
    assert_eq!((b_to_a.peer(), peer.as_str()), ("a", "b"));

    // Each side answers the other's requests with `echo:` + payload.
    for conn in [b_to_a.clone(), a_to_b.clone()] {
        tokio::spawn(async move {
            while let Ok((payload, responder)) = conn.next_request().await {
                tokio::spawn(async move {
                    let mut response = b"echo:".to_vec();
                    response.extend_from_slice(&payload);
                    let _ = responder.respond(&response).await;
                });
            }
        });
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        // Alternate directions on the one connection.
        let conn = if i % 2 == 0 {
            b_to_a.clone()
        } else {
            a_to_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            // Sizes from empty to 64 KiB, so most requests span many packets.
            let len = usize::try_from((i * 7919) % (64 << 10)).expect("len");
            let tag = i.to_le_bytes()[0];
            let payload: Vec<u8> = (0..len).map(|j| j.to_le_bytes()[0] ^ tag).collect();
            let response = conn.request(&payload).await.expect("request");
            assert_eq!(&response[..5], b"echo:");
            assert!(response[5..] == payload[..], "request {i}");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    eprintln!("400 requests in {:?}", started.elapsed());
}

/// A raw QUIC client, outside this crate's verifiers: trusts the cluster CA and presents
/// `client_auth` (or no certificate).
fn raw_client(
    trust: &CaCertificate,
    client_auth: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(trust.der().clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match client_auth {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert], key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"trireme/1".to_vec()];
    let quic = QuicClientConfig::try_from(config).expect("quic config");
    let mut endpoint = quinn::Endpoint::client(LOCALHOST.parse().expect("addr")).expect("client");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// Dial `a`, send one well-formed request and read the response.
async fn raw_request(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let conn = endpoint
        .connect(addr, "a.node.trireme")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
    send.write_all(&5u32.to_be_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.write_all(b"hello")
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    recv.read_to_end(1 << 20)
        .await
        .map_err(|e| format!("read: {e}"))
}

fn self_signed(node: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec![format!("{node}.node.trireme")]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
    (cert.der().clone(), key)
}

fn parts(identity: &NodeIdentity) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem().as_bytes()).expect("key");
    (identity.cert_der().clone(), key)
}

async fn wait_refused(server: &Endpoint, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.refused_connections() < at_least {
        assert!(
            Instant::now() < deadline,
            "server did not record the refusal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x1_clients_without_a_valid_registered_certificate_are_refused() {
    // "mallory" is registered: the self-signed and other-cluster cases are refused for
    // their issuer, not for their name.
    let cluster = cluster(&["a", "b", "mallory"], fast_config());
    let trust = cluster.ca.certificate();
    let other_cluster = ClusterCa::create().expect("other CA");

    let attempts: Vec<(&str, quinn::Endpoint)> = vec![
        ("no certificate", raw_client(trust, None)),
        (
            "self-signed",
            raw_client(trust, Some(self_signed("mallory"))),
        ),
        (
            "another cluster's CA",
            raw_client(
                trust,
                Some(parts(&other_cluster.issue_node("b").expect("issue"))),
            ),
        ),
        (
            "this cluster's CA, unregistered node",
            raw_client(
                trust,
                Some(parts(&cluster.ca.issue_node("c").expect("issue"))),
            ),
        ),
    ];
    let mut refused = 0;
    for (case, endpoint) in attempts {
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            raw_request(&endpoint, cluster.addr),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer in time"));
        assert!(outcome.is_err(), "{case}: got a response {outcome:?}");
        eprintln!("{case}: {outcome:?}");
        refused += 1;
        wait_refused(&cluster.server, refused).await;
    }

    // The same unregistered node through this crate's own endpoint.
    let c = client(&cluster, "c", fast_config());
    let outcome = match c.connect(cluster.addr, "a").await {
        Ok(conn) => conn.request(b"hello").await.map(|_| ()),
        Err(e) => Err(e),
    };
    eprintln!("unregistered c through an endpoint: {outcome:?}");
    assert!(outcome.is_err(), "unregistered c got through");
    wait_refused(&cluster.server, refused + 1).await;

    // A registered node of the cluster still gets in, so the refusals above were not
    // a broken server.
    let b = client(&cluster, "b", fast_config());
    let response = b
        .connect(cluster.addr, "a")
        .await
        .expect("connect")
        .request(b"hi")
        .await
        .expect("request");
    assert_eq!(response, b"echo:hi");
    assert_eq!(cluster.seen.connections.load(Ordering::SeqCst), 1);
    assert_eq!(cluster.seen.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x1_client_refuses_a_server_it_should_not_trust() {
    let cluster = cluster(&["a", "b"], fast_config());
    let b = client(&cluster, "b", fast_config());

    // A server of another cluster, even one calling itself "a".
    let other = ClusterCa::create().expect("other CA");
    let impostor = Arc::new(bind(
        &other.issue_node("a").expect("issue"),
        other.certificate(),
        registry(&["a", "b"]),
        fast_config(),
    ));
    let impostor_seen = serve(impostor.clone());
    let err = b
        .connect(impostor.local_addr().expect("addr"), "a")
        .await
        .expect_err("trusted another cluster's server");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err:?}");

    // A server of this cluster that is not the node dialled.
    let d_identity = cluster.ca.issue_node("d").expect("issue");
    let d = Arc::new(bind(
        &d_identity,
        cluster.ca.certificate(),
        registry(&["a", "b", "d"]),
        fast_config(),
    ));
    let d_seen = serve(d.clone());
    let err = b
        .connect(d.local_addr().expect("addr"), "a")
        .await
        .expect_err("accepted d as a");
    assert!(matches!(err, TransportError::Handshake { .. }), "{err:?}");

    // A node b's registry does not know is not even dialled.
    let err = b
        .connect(d.local_addr().expect("addr"), "d")
        .await
        .expect_err("dialled an unregistered node");
    assert!(matches!(err, TransportError::NotRegistered(_)), "{err:?}");

    // A node that is not even a valid name.
    assert!(matches!(
        b.connect(cluster.addr, "A.B").await,
        Err(TransportError::NodeName(_))
    ));

    for seen in [&impostor_seen, &d_seen] {
        assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_refuses_to_bind_with_a_certificate_of_another_cluster() {
    let ca = ClusterCa::create().expect("CA");
    let other = ClusterCa::create().expect("other CA");
    let identity = other.issue_node("a").expect("issue");
    let err = Endpoint::bind(
        LOCALHOST.parse().expect("addr"),
        &identity,
        ca.certificate(),
        registry(&["a"]),
    )
    .expect_err("bound with a foreign certificate");
    assert!(matches!(err, TransportError::Identity { .. }), "{err:?}");
}

fn frame_error(err: &TransportError) -> Option<&FrameError> {
    match err {
        TransportError::Frame { source, .. } => Some(source),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_cap_is_enforced_on_both_sides() {
    let server_config = EndpointConfig {
        max_frame_len: 1024,
        ..fast_config()
    };
    let cluster = cluster(&["a", "b"], server_config);
    let b = client(
        &cluster,
        "b",
        EndpointConfig {
            max_frame_len: 4096,
            ..fast_config()
        },
    );
    let conn = b.connect(cluster.addr, "a").await.expect("connect");

    // Over the sender's own cap: refused locally, nothing sent.
    let err = conn.request(&[0; 4097]).await.expect_err("over own cap");
    assert!(
        matches!(
            err,
            TransportError::FrameTooLarge {
                len: 4097,
                max: 4096
            }
        ),
        "{err:?}"
    );

    // Over the receiver's cap: the stream is reset with FRAME_TOO_LARGE.
    let err = conn.request(&[0; 2048]).await.expect_err("over server cap");
    assert!(
        matches!(frame_error(&err), Some(FrameError::Reset(c)) if *c == code::FRAME_TOO_LARGE),
        "{err:?}"
    );

    // A lying length prefix (4 GiB - 1) is refused at once, before any allocation, and
    // the connection stays usable.
    let (mut send, mut recv) = conn.quic_connection().open_bi().await.expect("open");
    let started = Instant::now();
    let mut lying = u32::MAX.to_be_bytes().to_vec();
    lying.extend_from_slice(&[0; 100]);
    // The server may already have stopped the stream when the write ends.
    match send.write_all(&lying).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(c)) => assert_eq!(c, code::FRAME_TOO_LARGE),
        Err(e) => panic!("write: {e}"),
    }
    let read = recv.read_to_end(1 << 20).await;
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == code::FRAME_TOO_LARGE),
        "{read:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // A truncated frame (prefix says 1000, stream ends after 10) is refused too.
    let (mut send, mut recv) = conn.quic_connection().open_bi().await.expect("open");
    send.write_all(&1000u32.to_be_bytes())
        .await
        .expect("write prefix");
    send.write_all(&[0; 10]).await.expect("write some");
    send.finish().expect("finish");
    let read = recv.read_to_end(1 << 20).await;
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == code::BAD_REQUEST),
        "{read:?}"
    );

    // The echo adds 5 bytes: a 1019-byte request gets a response right at the cap.
    assert_eq!(
        conn.request(&[7; 1019]).await.expect("at the cap").len(),
        1024
    );
    assert_eq!(
        cluster.seen.requests.load(Ordering::SeqCst),
        1,
        "only the valid request reached the application"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_silent_peer_gives_an_error_not_a_hang() {
    let cluster = cluster(&["a", "b"], fast_config());
    let b = client(&cluster, "b", fast_config());
    let conn = b.connect(cluster.addr, "a").await.expect("connect");

    // The server closes the connection while the request is in flight.
    let started = Instant::now();
    let err = conn
        .request(b"close")
        .await
        .expect_err("closed mid-request");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{err:?} after {:?}",
        started.elapsed()
    );
    assert!(
        !matches!(err, TransportError::RequestTimeout { .. }),
        "{err:?}"
    );
    // ...and every later request on it fails at once as well.
    let err = conn.request(b"again").await.expect_err("closed");
    assert!(
        matches!(
            err,
            TransportError::ConnectionClosed { .. } | TransportError::Frame { .. }
        ),
        "{err:?}"
    );
    assert!(conn.next_request().await.is_err());

    // The application drops a request unanswered: the requester learns at once.
    let conn = b.connect(cluster.addr, "a").await.expect("reconnect");
    let started = Instant::now();
    let err = conn.request(b"drop").await.expect_err("dropped");
    assert!(
        matches!(frame_error(&err), Some(FrameError::Reset(c)) if *c == code::NO_RESPONSE),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // The application never answers: bounded by the request timeout.
    let started = Instant::now();
    let err = conn.request(b"hang").await.expect_err("hung");
    assert!(
        matches!(err, TransportError::RequestTimeout { .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // The serving endpoint disappears: requests fail, bounded by the timeouts.
    cluster.server.close();
    let started = Instant::now();
    assert!(conn.request(b"x").await.is_err());
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_plan_drops_delays_and_fails_requests() {
    let server_plan = Arc::new(FaultPlan::new());
    let cluster = cluster(
        &["a", "b"],
        EndpointConfig {
            fault_plan: Some(server_plan.clone()),
            ..fast_config()
        },
    );
    let client_plan = Arc::new(FaultPlan::new());
    let b = client(
        &cluster,
        "b",
        EndpointConfig {
            request_timeout: Duration::from_millis(500),
            fault_plan: Some(client_plan.clone()),
            ..fast_config()
        },
    );
    let conn = b.connect(cluster.addr, "a").await.expect("connect");
    assert_eq!(conn.request(b"ok").await.expect("no fault"), b"echo:ok");

    let rule = |direction, action| FaultRule {
        peer: Some("a".to_owned()),
        direction: Some(direction),
        action,
    };
    client_plan.set(vec![rule(Direction::Outgoing, FaultAction::Fail)]);
    assert!(matches!(
        conn.request(b"x").await,
        Err(TransportError::FaultInjected { .. })
    ));

    client_plan.set(vec![rule(
        Direction::Outgoing,
        FaultAction::Delay(Duration::from_millis(200)),
    )]);
    let started = Instant::now();
    assert_eq!(conn.request(b"late").await.expect("delayed"), b"echo:late");
    assert!(started.elapsed() >= Duration::from_millis(200));

    client_plan.set(vec![rule(Direction::Outgoing, FaultAction::Drop)]);
    assert!(matches!(
        conn.request(b"lost").await,
        Err(TransportError::RequestTimeout { .. })
    ));
    client_plan.clear();

    // Faults on the serving side: the request is read, then lost or failed there.
    let requests_before = cluster.seen.requests.load(Ordering::SeqCst);
    server_plan.push(FaultRule {
        peer: Some("b".to_owned()),
        direction: Some(Direction::Incoming),
        action: FaultAction::Drop,
    });
    assert!(matches!(
        conn.request(b"lost").await,
        Err(TransportError::RequestTimeout { .. })
    ));
    server_plan.set(vec![FaultRule {
        peer: None,
        direction: None,
        action: FaultAction::Fail,
    }]);
    let err = conn
        .request(b"fail")
        .await
        .expect_err("failed by the server's plan");
    assert!(
        matches!(frame_error(&err), Some(FrameError::Reset(c)) if *c == code::FAULT_INJECTED),
        "{err:?}"
    );
    assert_eq!(
        cluster.seen.requests.load(Ordering::SeqCst),
        requests_before
    );
    server_plan.clear();
    assert_eq!(conn.request(b"ok").await.expect("healed"), b"echo:ok");
    assert_eq!(client_plan.applied(), 3);
    assert_eq!(server_plan.applied(), 2);
}

/// A UDP relay between one client and `server` that can silently swallow all traffic,
/// as a pulled cable or a frozen host would.
struct Relay {
    addr: SocketAddr,
    black_hole: Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(server: SocketAddr) -> Relay {
    use std::sync::atomic::AtomicBool;
    use tokio::net::UdpSocket;

    let front = Arc::new(UdpSocket::bind(LOCALHOST).await.expect("bind front"));
    let back = Arc::new(UdpSocket::bind(LOCALHOST).await.expect("bind back"));
    back.connect(server).await.expect("connect back");
    let addr = front.local_addr().expect("addr");
    let black_hole = Arc::new(AtomicBool::new(false));
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    {
        let (front, back, black_hole, client) = (
            front.clone(),
            back.clone(),
            black_hole.clone(),
            client.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().expect("lock") = Some(from);
                if !black_hole.load(Ordering::SeqCst) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
    }
    {
        let black_hole = black_hole.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().expect("lock");
                if let Some(to) = to
                    && !black_hole.load(Ordering::SeqCst)
                {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    Relay { addr, black_hole }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gone_silent_is_bounded_by_the_idle_timeout() {
    // Request timeout far away: only the idle timeout can end the wait.
    let config = EndpointConfig {
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(300),
        request_timeout: Duration::from_secs(60),
        ..fast_config()
    };
    let cluster = cluster(&["a", "b"], config.clone());
    let relay = relay(cluster.addr).await;
    let b = client(&cluster, "b", config);
    let conn = b.connect(relay.addr, "a").await.expect("connect via relay");
    assert_eq!(
        conn.request(b"before").await.expect("request"),
        b"echo:before"
    );

    // Keep-alives hold a quiet connection open past the idle timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        conn.request(b"quiet").await.expect("request"),
        b"echo:quiet"
    );

    relay.black_hole.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = conn
        .request(b"hang")
        .await
        .expect_err("through a black hole");
    let waited = started.elapsed();
    assert!(
        matches!(
            err,
            TransportError::Frame { .. } | TransportError::ConnectionClosed { .. }
        ),
        "{err:?}"
    );
    assert!(waited < Duration::from_secs(5), "{err:?} after {waited:?}");
    assert!(
        conn.next_request().await.is_err(),
        "the connection is closed"
    );
}
