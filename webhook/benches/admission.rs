//! Throughput and latency of the admission endpoint over TLS keep-alive,
//! side by side with a bare axum + rustls endpoint on the same stack that
//! returns a fixed allowed AdmissionReview without reading the request, as
//! the issue specifies ([`fixed_review`]). `BENCH_BASELINE=echo` swaps in a
//! baseline that also reads and parses the review and echoes its uid
//! ([`bare_review`]): the least any correct webhook does.
//! `BENCH_BASELINE=answer` returns, unread request and all, the very bytes
//! the webhook answers to the benchmark's review (about 2 KB, the patch
//! included): what is left between it and the webhook is the webhook's own
//! work, without the cost of sending a bigger answer.
//!
//! Closed loop: N kept-alive HTTPS/1.1 connections (N = 2..64) each send a
//! pod-CREATE AdmissionReview as fast as answers come back, for a fixed time.
//! Open loop: 1,000 requests/s spread over 8 connections, to read p99 at a
//! steady rate. Client and servers share this machine's cores (and one tokio
//! runtime), so absolute numbers are a floor; the ratio to the baseline is
//! the point. Both sides run in alternating turns (see [`compare`]), in a
//! process with the webhook binary's allocator.
//!
//! Run: `cargo bench -p counterweight-webhook --bench admission`
//! (`BENCH_SECONDS` sets the time per side and point, default 2;
//! `BENCH_ROUNDS` the number of alternating turns, default 4; `BENCH_LOG`
//! turns the webhook's logging on, see [`install_log_subscriber`];
//! `BENCH_ONLY=webhook|bare` loads one side alone, for a profiler;
//! `BENCH_HTTP=2` sends over one HTTP/2 connection, a stream per request
//! loop, as the API server does).

#![allow(clippy::unwrap_used, missing_docs)]

/// The binary's allocator (see `src/main.rs`), for both sides.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use counterweight_certs::CertificateAuthority;
use counterweight_webhook::metrics::Endpoint;
use counterweight_webhook::{MUTATE_PATH, ServeOptions};
use http::{StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The `BENCH_BASELINE=echo` handler: reads the body, parses it and echoes an allowed
/// AdmissionReview with its uid (`common::bare_echo`), without injecting;
/// same status, content type and body limit as the webhook's.
async fn bare_review(body: Bytes) -> Response {
    match common::bare_echo(&body) {
        Some(answer) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer,
        )
            .into_response(),
        None => (StatusCode::BAD_REQUEST, "not an AdmissionReview").into_response(),
    }
}

/// The issue's baseline, the default: a fixed allowed AdmissionReview of
/// about 100 bytes, whatever was sent.
const FIXED_REVIEW: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"fixed","allowed":true}}"#;

/// A fixed answer, whatever was sent. It reads no body and parses
/// nothing, which no webhook can do, so it is the floor of the stack's cost.
async fn fixed_review(body: Bytes) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Which bare endpoint the webhook is compared with (`BENCH_BASELINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Baseline {
    /// [`FIXED_REVIEW`], request not read (the default).
    Fixed,
    /// [`bare_review`]: parse and echo the uid (`echo`).
    Echo,
    /// The webhook's own answer to the review, request not read (`answer`).
    Answer,
}

impl Baseline {
    fn from_env() -> Self {
        match std::env::var("BENCH_BASELINE").as_deref() {
            Ok("echo") => Baseline::Echo,
            Ok("answer") => Baseline::Answer,
            _ => Baseline::Fixed,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Baseline::Fixed => "fixed body (about 100 bytes), request not read",
            Baseline::Echo => "reads and parses the review, echoes the uid (BENCH_BASELINE=echo)",
            Baseline::Answer => {
                "fixed body: the webhook's own answer to the review, request not read (BENCH_BASELINE=answer)"
            }
        }
    }
}

/// The baseline endpoint: the webhook's TLS and HTTP stack (rustls with ring,
/// ALPN h2 and http/1.1, hyper-util's auto builder, TCP_NODELAY) around
/// the [`Baseline`] `BENCH_BASELINE` picks.
async fn start_bare(ca: &CertificateAuthority) -> SocketAddr {
    let pair = common::serving_pair(ca);
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let route = match Baseline::from_env() {
        Baseline::Echo => post(bare_review),
        fixed => {
            let body = match fixed {
                Baseline::Answer => {
                    let answer = common::handler()
                        .handle(Endpoint::Mutate, &common::pod_review("bench", "shop"));
                    assert_eq!(answer.status, 200, "the webhook's answer");
                    Bytes::from(answer.body)
                }
                _ => Bytes::from_static(FIXED_REVIEW.as_bytes()),
            };
            if http2() {
                // A stream answered before its body was received is reset,
                // and the client sees an error instead of the answer: over
                // HTTP/2 the body is collected and dropped.
                post(move |_request: Bytes| fixed_review(body.clone()))
            } else {
                post(move || fixed_review(body.clone()))
            }
        }
    };
    let router = Router::new()
        .route(MUTATE_PATH, route)
        .layer(DefaultBodyLimit::max(
            ServeOptions::default().max_body_bytes,
        ));
    let service = TowerToHyperService::new(router);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, service) = (acceptor.clone(), service.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                }
            });
        }
    });
    addr
}

struct Sample {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
    /// CPU time (user + system) this process used during the runs.
    cpu: Duration,
}

/// CPU time (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (fields 14 and 15, in USER_HZ ticks, 100 per second on
/// Linux). Client and server are in this process, so CPU per request covers
/// both; on a machine shared with other work it is a steadier comparison
/// than throughput, which also measures how much CPU the neighbours left.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The command name (field 2) may hold spaces; fields after it do not.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

impl Sample {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    /// Microseconds of CPU (client and server) per request.
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
    fn pct(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

/// Whether `BENCH_HTTP=2` asks for HTTP/2.
fn http2() -> bool {
    std::env::var("BENCH_HTTP").is_ok_and(|v| v == "2")
}

/// One request loop's way to a server: its own kept-alive HTTP/1.1
/// connection, or (`BENCH_HTTP=2`) a stream on one HTTP/2 connection that
/// all loops share, the way the API server's webhook client multiplexes.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2 {
        sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        uri: http::Uri,
    },
}

impl Sender {
    /// Posts `body` to the mutating endpoint; the status once the whole
    /// answer is read.
    async fn post(&mut self, body: Bytes) -> Result<u16, String> {
        match self {
            Sender::H1(s) => common::send(s, "POST", MUTATE_PATH, body)
                .await
                .map(|(status, _)| status),
            Sender::H2 { sender, uri } => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::post(uri.clone())
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body))
                    .map_err(|e| e.to_string())?;
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                resp.into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(status)
            }
        }
    }
}

/// `conns` request loops' senders to `addr`: as many HTTP/1.1 connections,
/// or one HTTP/2 connection shared by all.
async fn senders(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, conns: usize) -> Vec<Sender> {
    if !http2() {
        let mut senders = Vec::new();
        for _ in 0..conns {
            senders.push(Sender::H1(
                common::connect(addr, Some(tls)).await.unwrap().0,
            ));
        }
        return senders;
    }
    let mut config = (**tls).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = format!("https://{addr}{MUTATE_PATH}").parse().unwrap();
    (0..conns)
        .map(|_| Sender::H2 {
            sender: sender.clone(),
            uri: uri.clone(),
        })
        .collect()
}

/// `conns` request loops; each sends back to back (interval None) or at a
/// fixed interval, for `run`.
async fn load(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
    run: Duration,
    interval: Option<Duration>,
) -> Sample {
    let body = common::pod_review("bench", "shop");
    let senders = senders(addr, tls, conns).await;
    let start = Instant::now();
    let cpu_start = process_cpu();
    let deadline = start + run;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut s| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut failures = 0;
                let mut tick = interval.map(|i| {
                    let mut t = tokio::time::interval(i);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    t
                });
                while Instant::now() < deadline {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    let t0 = Instant::now();
                    match s.post(body.clone()).await {
                        Ok(200) => lat.push(t0.elapsed()),
                        other => {
                            if failures == 0 {
                                eprintln!("first failed request: {other:?}");
                            }
                            failures += 1;
                        }
                    }
                }
                (lat, failures)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await.unwrap();
        latencies.extend(l);
        failures += f;
    }
    Sample {
        requests: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
        failures,
        cpu: process_cpu() - cpu_start,
    }
}

impl Sample {
    /// Pools two runs of the same side: requests and time add up, latencies merge.
    fn merge(&mut self, other: Sample) {
        self.requests += other.requests;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.failures += other.failures;
        self.cpu += other.cpu;
    }
}

/// Loads the webhook and the baseline in `rounds` alternating turns of
/// `run / rounds` each, swapping who goes first every round, and pools each
/// side's turns. Alternation makes both sides see the same machine: a
/// neighbour's burst of CPU, allocator warm-up or the first connections'
/// costs would otherwise fall on whichever side ran at that moment.
async fn compare(
    webhook: SocketAddr,
    bare: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
    run: Duration,
    rounds: u32,
    interval: Option<Duration>,
) -> (Sample, Sample) {
    let turn = run / rounds;
    let empty = || Sample {
        requests: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        failures: 0,
        cpu: Duration::ZERO,
    };
    let (mut w, mut b) = (empty(), empty());
    // `BENCH_ONLY=webhook|bare` loads one side only, for profiling it alone.
    let only = std::env::var("BENCH_ONLY").ok();
    if let Some(side) = only.as_deref() {
        let addr = if side == "bare" { bare } else { webhook };
        let s = load(addr, tls, conns, run, interval).await;
        if side == "bare" {
            b.merge(s)
        } else {
            w.merge(s)
        }
        return (w, b);
    }
    for round in 0..rounds {
        if round % 2 == 0 {
            w.merge(load(webhook, tls, conns, turn, interval).await);
            b.merge(load(bare, tls, conns, turn, interval).await);
        } else {
            b.merge(load(bare, tls, conns, turn, interval).await);
            w.merge(load(webhook, tls, conns, turn, interval).await);
        }
    }
    (w, b)
}

/// With `BENCH_LOG` set (e.g. `info`), installs the binary's log subscriber
/// ([`counterweight_runtime::logging::subscriber`] with that filter, no ANSI as
/// in a pod) writing to `/dev/null`: the
/// webhook then pays for its span per request and its log lines, formatting
/// and one `write(2)` per line, as in production (where the lines go to
/// stdout). Unset, nothing is logged, as in earlier runs of this benchmark.
fn install_log_subscriber() -> Option<String> {
    let filter = std::env::var("BENCH_LOG").ok()?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    tracing::subscriber::set_global_default(counterweight_runtime::logging::subscriber(
        tracing_subscriber::EnvFilter::new(&filter),
        std::sync::Mutex::new(null),
        false,
    ))
    .unwrap();
    Some(filter)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let log = install_log_subscriber();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
        let secs = env("BENCH_SECONDS", 2);
        let rounds = env("BENCH_ROUNDS", 4).max(1) as u32;
        let run = Duration::from_secs(secs);
        let webhook = common::start(ServeOptions::default()).await;
        let tls = common::client_config(&webhook.ca_pem());
        let bare = start_bare(&webhook.ca).await;
        println!(
            "closed loop, {secs}s per side and point in {rounds} alternating turns, {}, pod CREATE review ({} bytes), webhook logging: {}",
            if http2() { "HTTP/2 over TLS, one connection, a stream per request loop (BENCH_HTTP=2)" } else { "keep-alive HTTPS/1.1, a connection per request loop" },
            common::pod_review("bench", "shop").len(),
            log.as_deref().unwrap_or("off (set BENCH_LOG=info for the binary's level)")
        );
        println!("baseline: {}", Baseline::from_env().describe());
        println!("ratio = webhook/s over bare/s; cpu = CPU µs per request, client and server together; cpu ratio = bare's over the webhook's");
        println!("{:>5} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} {:>6} | {:>6} {:>9}", "conns", "webhook/s", "p50 ms", "p99 ms", "cpu", "bare/s", "p50 ms", "p99 ms", "cpu", "ratio", "cpu ratio");
        for conns in [2, 4, 8, 16, 32, 64] {
            let (mut w, mut b) = compare(webhook.admission, bare, &tls, conns, run, rounds, None).await;
            assert_eq!(w.failures + b.failures, 0, "failed requests");
            println!(
                "{conns:>5} | {:>10.0} {:>8} {:>8} {:>6.1} | {:>10.0} {:>8} {:>8} {:>6.1} | {:>5.0}% {:>8.0}%",
                w.rps(), ms(w.pct(0.5)), ms(w.pct(0.99)), w.cpu_us(),
                b.rps(), ms(b.pct(0.5)), ms(b.pct(0.99)), b.cpu_us(),
                100.0 * w.rps() / b.rps(), 100.0 * b.cpu_us() / w.cpu_us()
            );
        }
        // 1,000 requests/s: 8 connections at one request per 8 ms each.
        let (mut w, mut b) = compare(webhook.admission, bare, &tls, 8, run, rounds, Some(Duration::from_millis(8))).await;
        assert_eq!(w.failures + b.failures, 0, "failed requests");
        println!(
            "open loop 1000 req/s (8 conns): webhook {:.0}/s p50 {} ms p99 {} ms | bare {:.0}/s p50 {} ms p99 {} ms",
            w.rps(), ms(w.pct(0.5)), ms(w.pct(0.99)), b.rps(), ms(b.pct(0.5)), ms(b.pct(0.99))
        );
        webhook.shutdown().await.unwrap();
    });
}
