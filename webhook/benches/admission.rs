//! Throughput and latency of the admission endpoint over TLS keep-alive,
//! side by side with a bare axum + rustls endpoint that returns a fixed body.
//!
//! Closed loop: N kept-alive HTTPS/1.1 connections (N = 2..64) each send a
//! pod-CREATE AdmissionReview as fast as answers come back, for a fixed time.
//! Open loop: 1,000 requests/s spread over 8 connections, to read p99 at a
//! steady rate. Client and servers share this machine's cores, so absolute
//! numbers are a floor; the ratio to the bare endpoint is the point.
//!
//! Run: `cargo bench -p counterweight-webhook --bench admission`
//! (`BENCH_SECONDS` sets the time per point, default 2).

#![allow(clippy::unwrap_used, missing_docs)]

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
use counterweight_webhook::{MUTATE_PATH, ServeOptions};
use http::{StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The baseline handler: reads the body, parses it and echoes an allowed
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

/// The baseline endpoint: the webhook's TLS and HTTP stack (rustls with ring,
/// ALPN h2 and http/1.1, hyper-util's auto builder, TCP_NODELAY) around
/// [`bare_review`].
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
    let router = Router::new()
        .route(MUTATE_PATH, post(bare_review))
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
}

impl Sample {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
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

/// `conns` connections; each sends back to back (interval None) or at a fixed
/// interval, for `run`.
async fn load(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
    run: Duration,
    interval: Option<Duration>,
) -> Sample {
    let body = common::pod_review("bench", "shop");
    let mut senders = Vec::new();
    for _ in 0..conns {
        senders.push(common::connect(addr, Some(tls)).await.unwrap().0);
    }
    let start = Instant::now();
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
                    match common::send(&mut s, "POST", MUTATE_PATH, body.clone()).await {
                        Ok((200, _)) => lat.push(t0.elapsed()),
                        _ => failures += 1,
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
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let secs: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
        let run = Duration::from_secs(secs);
        let webhook = common::start(ServeOptions::default()).await;
        let tls = common::client_config(&webhook.ca_pem());
        let bare = start_bare(&webhook.ca).await;
        println!("closed loop, {secs}s per point, keep-alive HTTPS/1.1, pod CREATE review ({} bytes)", common::pod_review("bench", "shop").len());
        println!("{:>5} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6}", "conns", "webhook/s", "p50 ms", "p99 ms", "bare/s", "p50 ms", "p99 ms", "ratio");
        for conns in [2, 4, 8, 16, 32, 64] {
            let mut w = load(webhook.admission, &tls, conns, run, None).await;
            let mut b = load(bare, &tls, conns, run, None).await;
            assert_eq!(w.failures + b.failures, 0, "failed requests");
            println!(
                "{conns:>5} | {:>10.0} {:>8} {:>8} | {:>10.0} {:>8} {:>8} | {:>5.0}%",
                w.rps(), ms(w.pct(0.5)), ms(w.pct(0.99)),
                b.rps(), ms(b.pct(0.5)), ms(b.pct(0.99)),
                100.0 * w.rps() / b.rps()
            );
        }
        // 1,000 requests/s: 8 connections at one request per 8 ms each.
        let mut w = load(webhook.admission, &tls, 8, run, Some(Duration::from_millis(8))).await;
        let mut b = load(bare, &tls, 8, run, Some(Duration::from_millis(8))).await;
        println!(
            "open loop 1000 req/s (8 conns): webhook {:.0}/s p50 {} ms p99 {} ms | bare {:.0}/s p50 {} ms p99 {} ms",
            w.rps(), ms(w.pct(0.5)), ms(w.pct(0.99)), b.rps(), ms(b.pct(0.5)), ms(b.pct(0.99))
        );
        webhook.shutdown().await.unwrap();
    });
}
