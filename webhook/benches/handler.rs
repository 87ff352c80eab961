//! Time of the admission handler alone (no HTTP, no TLS) per review, next to
//! the baseline endpoint's per-request work (`common::bare_echo`), so a
//! regression in parsing, injection or serialization shows up without the
//! noise of sockets.
//!
//! Run: `cargo bench -p counterweight-webhook --bench handler`
//! (`BENCH_ITERATIONS` sets the calls per measurement, default 200,000).

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use counterweight_webhook::metrics::Endpoint;

/// Mean time per call of `f` over `n` calls, after a warm-up of `n / 10`.
fn per_call<R>(n: u32, mut f: impl FnMut() -> R) -> f64 {
    for _ in 0..n / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let n: u32 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let h = common::handler();
    let inject = common::pod_review("bench", "shop");
    let skip = common::pod_review("bench", "kube-system");
    // Sanity: the cases do what their names say.
    let injected = h.handle(Endpoint::Mutate, &inject);
    assert!(common::response_of(&injected.body).get("patch").is_some());
    assert!(
        common::response_of(&h.handle(Endpoint::Mutate, &skip).body)
            .get("patch")
            .is_none()
    );
    assert!(common::bare_echo(&inject).is_some());

    println!(
        "{n} calls each; review {} bytes, injected answer {} bytes",
        inject.len(),
        injected.body.len()
    );
    let line = |name: &str, micros: f64| println!("{name:42} {micros:7.2} µs");
    line(
        "handle: pod CREATE, injected",
        per_call(n, || h.handle(Endpoint::Mutate, &inject)),
    );
    line(
        "handle: pod CREATE, skipped (kube-system)",
        per_call(n, || h.handle(Endpoint::Mutate, &skip)),
    );
    // The binary's subscriber at `info`, writing to /dev/null (one write(2)
    // per line, as to stdout): what the span per request and the "injected"
    // line cost in production.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let subscriber = counterweight_webhook::log_subscriber(
        tracing_subscriber::EnvFilter::new("info"),
        std::sync::Mutex::new(null),
        false,
    );
    tracing::subscriber::with_default(subscriber, || {
        line(
            "handle: injected, logging at info",
            per_call(n, || h.handle(Endpoint::Mutate, &inject)),
        );
        line(
            "handle: skipped, logging at info",
            per_call(n, || h.handle(Endpoint::Mutate, &skip)),
        );
    });
    line(
        "baseline: parse, echo uid",
        per_call(n, || common::bare_echo(&inject)),
    );
}
