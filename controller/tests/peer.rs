//! The peer transport over real mutual TLS on 127.0.0.1: delivery both ways,
//! every way a peer is refused, body limits, certificate rotation, and a
//! partition through the harness proxy.

// Test helpers outside #[test] functions unwrap too: a failure is a test
// failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_controller::peer::{
    ClientOptions, PeerClient, PeerEndpoint, PeerError, PeerIdentity, PeerMetrics, PeerSet,
    PeerTls, ServerOptions, TlsPaths, serve_with,
};
use counterweight_core::ha::{Body, Envelope, PROTOCOL_VERSION};
use counterweight_harness::{Mode, TcpProxy};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

/// Upper bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
}

/// A CA and a directory of PEM files issued by it.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::new(name).unwrap();
        counterweight_certs::write_file(&dir.path().join("ca.crt"), &ca.pem().cert_pem).unwrap();
        Self { dir, ca }
    }

    /// Writes `<stem>.crt/.key` for identity `name` (as `cw-certs dev` does)
    /// and returns the paths, with this CA as the bundle.
    fn peer(&self, stem: &str, name: &str) -> TlsPaths {
        self.write_leaf(self.dir.path(), stem, name);
        self.paths(stem)
    }

    fn write_leaf(&self, dir: &Path, stem: &str, name: &str) {
        self.ca
            .issue(&LeafSpec::new(name, Usage::Peer).sans([
                format!("{name}.peers.counterweight.dev"),
                "localhost".into(),
                "127.0.0.1".into(),
            ]))
            .unwrap()
            .write(dir, stem)
            .unwrap();
    }

    fn paths(&self, stem: &str) -> TlsPaths {
        TlsPaths {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
            ca: self.dir.path().join("ca.crt"),
        }
    }
}

/// A running peer server; shuts down when dropped.
struct Server {
    addr: SocketAddr,
    inbox: mpsc::Receiver<Envelope>,
    tls: Arc<PeerTls>,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start(tls: TlsPaths, peers: &[&str], inbox_capacity: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = PeerTls::load(tls, PeerMetrics::default()).unwrap();
        let (tx, inbox) = mpsc::channel(inbox_capacity);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            tls.clone(),
            PeerSet::new(peers).unwrap(),
            tx,
            ServerOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            inbox,
            tls,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    async fn next(&mut self) -> Envelope {
        timeout(WAIT, self.inbox.recv())
            .await
            .expect("no message within the deadline")
            .expect("inbox closed")
    }
}

fn endpoint(name: &str, url: &str) -> PeerEndpoint {
    format!("{name}={url}").parse().unwrap()
}

fn client(tls: &TlsPaths, peers: &[(&str, String)], options: ClientOptions) -> PeerClient {
    let tls = PeerTls::load(tls.clone(), PeerMetrics::default()).unwrap();
    PeerClient::new(
        peers.iter().map(|(name, url)| endpoint(name, url)),
        tls,
        options,
    )
    .unwrap()
}

fn envelope(from: &str, to: &str, epoch: u64) -> Envelope {
    Envelope {
        version: PROTOCOL_VERSION,
        from: from.into(),
        to: to.into(),
        epoch,
        body: Body::Ready { epoch },
    }
}

fn rejected(result: Result<(), PeerError>) -> (StatusCode, String) {
    match result {
        Err(PeerError::Rejected {
            status, message, ..
        }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Asserts nothing reached the inbox. The server handles a request before
/// answering it, so by the time the caller got its answer any delivery
/// would already be queued.
fn assert_empty(server: &mut Server) {
    assert!(
        server.inbox.try_recv().is_err(),
        "a refused message was delivered"
    );
}

/// The certificate the server at `addr` presents, fetched over a fresh
/// connection that expects identity `name`.
async fn served_cert(client_tls: &PeerTls, addr: SocketAddr, name: &str) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(client_tls.client_config())
        .connect(PeerIdentity::new(name).unwrap().server_name(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

fn cert_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .unwrap()
        .as_ref()
        .to_vec()
}

/// POSTs raw bytes over mutual TLS, for what `PeerClient` never sends.
async fn raw_post(
    tls: &PeerTls,
    addr: SocketAddr,
    to: &str,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.client_config())
        .connect(PeerIdentity::new(to).unwrap().server_name(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("https://127.0.0.1:{}/v1/messages", addr.port()))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = timeout(WAIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn two_peers_exchange_envelopes_both_ways() {
    init_tracing();
    let pki = Pki::new("peers");
    let (a_tls, b_tls) = (pki.peer("peer-a", "a"), pki.peer("peer-b", "b"));
    let mut a = Server::start(a_tls.clone(), &["b"], 16).await;
    let mut b = Server::start(b_tls.clone(), &["a"], 16).await;

    let mut registry = Registry::default();
    let metrics = PeerMetrics::register(registry.sub_registry_with_prefix("peer"));
    let a_client = client(
        &a_tls,
        &[("b", b.url())],
        ClientOptions {
            metrics: metrics.clone(),
            ..ClientOptions::default()
        },
    );
    let b_client = client(&b_tls, &[("a", a.url())], ClientOptions::default());

    let probe = Envelope {
        version: PROTOCOL_VERSION,
        from: "a".into(),
        to: "b".into(),
        epoch: 7,
        body: Body::Prepare {
            epoch: 7,
            reason: counterweight_core::ha::HandoverReason::Switchover,
        },
    };
    a_client.send(&probe).await.unwrap();
    assert_eq!(b.next().await, probe);
    let answer = envelope("b", "a", 7);
    b_client.send(&answer).await.unwrap();
    assert_eq!(a.next().await, answer);

    // Several at once share one connection and all arrive.
    let sends = (0..10).map(|i| {
        let c = a_client.clone();
        async move { c.send(&envelope("a", "b", i)).await }
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    let mut epochs: Vec<u64> = Vec::new();
    for _ in 0..10 {
        epochs.push(b.next().await.epoch);
    }
    epochs.sort();
    assert_eq!(epochs, (0..10).collect::<Vec<_>>());

    // Detached: returns at once, arrives later.
    assert!(a_client.send_detached(envelope("a", "b", 99)));
    assert_eq!(b.next().await.epoch, 99);

    // No URL for a name: an error naming it, nothing sent.
    let e = a_client.send(&envelope("a", "zed", 1)).await.unwrap_err();
    assert!(matches!(e, PeerError::UnknownPeer { .. }), "{e}");
    assert!(e.to_string().contains("--peer zed="), "{e}");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    // The detached send is counted once its task ends; poll for it.
    let deadline = Instant::now() + WAIT;
    while !text.contains(r#"peer_messages_sent_total{peer="b"} 12"#) {
        assert!(Instant::now() < deadline, "{text}");
        tokio::task::yield_now().await;
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    }
}

#[tokio::test]
async fn client_certificate_from_another_ca_fails_the_handshake() {
    init_tracing();
    let pki = Pki::new("peers");
    let rogue = Pki::new("rogue");
    let mut b = Server::start(pki.peer("peer-b", "b"), &["a"], 16).await;
    // Right name, wrong issuer; it trusts b's CA so only b can refuse.
    let mut a_tls = rogue.peer("peer-a", "a");
    a_tls.ca = pki.paths("peer-b").ca;
    let a = client(&a_tls, &[("b", b.url())], ClientOptions::default());
    let e = a.send(&envelope("a", "b", 1)).await.unwrap_err();
    assert!(matches!(e, PeerError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("--tls-ca"), "{e}");
    assert_empty(&mut b);
}

#[tokio::test]
async fn a_peer_certificate_cannot_speak_for_another_peer() {
    init_tracing();
    let pki = Pki::new("peers");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b", "c"], 16).await;
    let c = client(
        &pki.peer("peer-c", "c"),
        &[("a", a.url())],
        ClientOptions::default(),
    );
    let (status, message) = rejected(c.send(&envelope("b", "a", 1)).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("identity mismatch"), "{message}");
    assert!(
        message.contains("\"b\"") && message.contains('c'),
        "{message}"
    );
    assert_empty(&mut a);
    // The same connection speaking for itself is fine.
    c.send(&envelope("c", "a", 2)).await.unwrap();
    assert_eq!(a.next().await.from, "c");
}

#[tokio::test]
async fn unknown_peers_are_refused() {
    init_tracing();
    let pki = Pki::new("peers");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b"], 16).await;
    // A valid certificate of this CA, for a name that is not a peer.
    let mallory = client(
        &pki.peer("peer-mallory", "mallory"),
        &[("a", a.url())],
        ClientOptions::default(),
    );
    let (status, message) = rejected(mallory.send(&envelope("mallory", "a", 1)).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("unknown peer"), "{message}");
    // A real peer claiming a sender that is not configured.
    let b = client(
        &pki.peer("peer-b", "b"),
        &[("a", a.url())],
        ClientOptions::default(),
    );
    let (status, message) = rejected(b.send(&envelope("zed", "a", 1)).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("unknown peer \"zed\""), "{message}");
    assert_empty(&mut a);
}

#[tokio::test]
async fn oversized_malformed_and_wrong_version_messages_are_refused() {
    init_tracing();
    let pki = Pki::new("peers");
    let b_tls = pki.peer("peer-b", "b");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b"], 16).await;
    let b = client(&b_tls, &[("a", a.url())], ClientOptions::default());

    let mut big = envelope("b", "a", 1);
    big.body = Body::Refuse {
        epoch: 1,
        reason: "x".repeat(100 * 1024),
    };
    let (status, message) = rejected(b.send(&big).await);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(message.contains("65536"), "{message}");

    let mut future = envelope("b", "a", 1);
    future.version = PROTOCOL_VERSION + 1;
    let (status, message) = rejected(b.send(&future).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("protocol version"), "{message}");

    let raw_tls = PeerTls::load(b_tls, PeerMetrics::default()).unwrap();
    let (status, message) = raw_post(&raw_tls, a.addr, "a", b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("malformed"), "{message}");
    assert_empty(&mut a);

    // The connection is still good for a proper message.
    b.send(&envelope("b", "a", 2)).await.unwrap();
    assert_eq!(a.next().await.epoch, 2);
}

#[tokio::test]
async fn a_full_inbox_answers_503() {
    init_tracing();
    let pki = Pki::new("peers");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b"], 1).await;
    let b = client(
        &pki.peer("peer-b", "b"),
        &[("a", a.url())],
        ClientOptions::default(),
    );
    b.send(&envelope("b", "a", 1)).await.unwrap();
    let e = b.send(&envelope("b", "a", 2)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let (status, _) = rejected(Err(e));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.next().await.epoch, 1);
    b.send(&envelope("b", "a", 3)).await.unwrap();
    assert_eq!(a.next().await.epoch, 3);
}

#[tokio::test]
async fn server_certificate_for_another_identity_is_refused_by_the_client() {
    init_tracing();
    let pki = Pki::new("peers");
    // "a" serves with c's certificate: a misrouted URL or a stolen address.
    let mut a = Server::start(pki.peer("peer-c", "c"), &["b"], 16).await;
    let b = client(
        &pki.peer("peer-b", "b"),
        &[("a", a.url())],
        ClientOptions::default(),
    );
    let e = b.send(&envelope("b", "a", 1)).await.unwrap_err();
    assert!(matches!(e, PeerError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("a.peers.counterweight.dev"), "{e}");
    assert!(!e.is_retryable());
    assert_empty(&mut a);
}

#[tokio::test]
async fn server_certificate_rotation_while_sending() {
    init_tracing();
    let pki = Pki::new("peers");
    let b_tls = pki.peer("peer-b", "b");
    let a_paths = pki.peer("peer-a", "a");
    let Server {
        addr,
        mut inbox,
        tls,
        _stop,
    } = Server::start(a_paths.clone(), &["b"], 1024).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let probe_tls = PeerTls::load(b_tls.clone(), PeerMetrics::default()).unwrap();
    let first = cert_der(&a_paths.cert);
    assert_eq!(served_cert(&probe_tls, addr, "a").await, first);

    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while inbox.recv().await.is_some() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    // b sends all through the rotation, on a kept-alive connection and on a
    // fresh client (so a fresh connection) every 20 messages.
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut b = client(&b_tls, &[("a", url.clone())], ClientOptions::default());
        while !stopping.load(Ordering::SeqCst) && sent < 100_000 {
            if sent % 20 == 19 {
                b = client(&b_tls, &[("a", url.clone())], ClientOptions::default());
            }
            b.send(&envelope("b", "a", sent)).await?;
            sent += 1;
        }
        Ok::<u64, PeerError>(sent)
    });

    // A rotation caught half written (new certificate, old key) keeps the
    // old pair.
    let staging = tempfile::tempdir().unwrap();
    pki.write_leaf(staging.path(), "new", "a");
    std::fs::copy(staging.path().join("new.crt"), &a_paths.cert).unwrap();
    assert!(!tls.reload_if_changed());
    assert_eq!(served_cert(&probe_tls, addr, "a").await, first);
    // Completed: new connections get the new certificate.
    std::fs::copy(staging.path().join("new.key"), &a_paths.key).unwrap();
    assert!(tls.reload_if_changed());
    let second = cert_der(&a_paths.cert);
    assert_ne!(first, second);
    assert_eq!(served_cert(&probe_tls, addr, "a").await, second);

    // The watcher picks up the next rotation on its own.
    let (_stop_watch, watch_stopped) = oneshot::channel::<()>();
    tokio::spawn(tls.clone().watch(Duration::from_millis(20), async move {
        let _ = watch_stopped.await;
    }));
    pki.write_leaf(a_paths.cert.parent().unwrap(), "peer-a", "a");
    let third = cert_der(&a_paths.cert);
    let deadline = Instant::now() + WAIT;
    while served_cert(&probe_tls, addr, "a").await != third {
        assert!(Instant::now() < deadline, "the watcher did not reload");
    }

    stop.store(true, Ordering::SeqCst);
    let sent = timeout(WAIT, sender)
        .await
        .unwrap()
        .unwrap()
        .expect("a send failed during the rotation");
    assert!(sent > 0);
    let deadline = Instant::now() + WAIT;
    while received.load(Ordering::SeqCst) != sent {
        assert!(
            Instant::now() < deadline,
            "sent {sent}, received {received:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_partition_times_out_within_the_deadline_and_heals() {
    init_tracing();
    let pki = Pki::new("peers");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b"], 64).await;
    let proxy = TcpProxy::start(a.addr).await.unwrap();
    let mut registry = Registry::default();
    let metrics = PeerMetrics::register(&mut registry);
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_millis(200),
        deadline: Duration::from_millis(500),
        max_in_flight: 2,
        metrics,
        ..ClientOptions::default()
    };
    let b = client(
        &pki.peer("peer-b", "b"),
        &[("a", format!("https://127.0.0.1:{}", proxy.addr().port()))],
        options,
    );
    b.send(&envelope("b", "a", 1)).await.unwrap();
    assert_eq!(a.next().await.epoch, 1);

    // Black hole: the kept-alive connection stalls; the send gives up
    // within its deadline instead of hanging.
    proxy.set_mode(Mode::Drop);
    let started = Instant::now();
    let e = b.send(&envelope("b", "a", 2)).await.unwrap_err();
    assert!(matches!(e, PeerError::Timeout { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Detached sends do not pile up: two in flight, the rest dropped.
    let queued: Vec<bool> = (0..5)
        .map(|i| b.send_detached(envelope("b", "a", 10 + i)))
        .collect();
    assert_eq!(queued, [true, true, false, false, false]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"messages_dropped_total{peer="a"} 3"#),
        "{text}"
    );

    // Healed: messages flow again without any action by the caller. What
    // was held in the proxy may arrive too, so look for epoch 3 itself.
    proxy.set_mode(Mode::Pass);
    let deadline = Instant::now() + WAIT;
    loop {
        if b.send(&envelope("b", "a", 3)).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no delivery after healing");
    }
    let deadline = Instant::now() + WAIT;
    while a.next().await.epoch != 3 {
        assert!(Instant::now() < deadline);
    }

    // Refused (peer gone): fails fast as a connection error.
    proxy.set_mode_and_kill(Mode::Refuse);
    let e = b.send(&envelope("b", "a", 4)).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
}

#[tokio::test]
async fn a_reloaded_client_certificate_applies_to_open_connections() {
    init_tracing();
    let pki = Pki::new("peers");
    let mut a = Server::start(pki.peer("peer-a", "a"), &["b", "c"], 16).await;
    let b_paths = pki.peer("peer-b", "b");
    let b_tls = PeerTls::load(b_paths.clone(), PeerMetrics::default()).unwrap();
    let b = PeerClient::new(
        [endpoint("a", &a.url())],
        b_tls.clone(),
        ClientOptions::default(),
    )
    .unwrap();
    b.send(&envelope("b", "a", 1)).await.unwrap();
    assert_eq!(a.next().await.epoch, 1);

    // Swap in a certificate for another identity: if the open connection
    // were kept, "from b" would still pass; a new one is refused.
    pki.write_leaf(b_paths.cert.parent().unwrap(), "peer-b", "c");
    assert!(b_tls.reload_if_changed());
    assert_eq!(b_tls.generation(), 1);
    let (status, message) = rejected(b.send(&envelope("b", "a", 2)).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("identity mismatch"), "{message}");
    b.send(&envelope("c", "a", 3)).await.unwrap();
    assert_eq!(a.next().await.epoch, 3);
}
