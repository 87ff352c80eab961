//! Time of the admission handler alone (no HTTP, no TLS) per review, next to
//! the baseline endpoint's per-request work (`common::bare_echo`), so a
//! regression in parsing, injection or serialization shows up without the
//! noise of sockets.
//!
//! Run: `cargo bench -p counterweight-webhook --bench handler`
//! (`BENCH_ITERATIONS` sets the calls per measurement, default 200,000).

#![allow(clippy::unwrap_used, missing_docs)]

/// The binary's allocator (see `src/main.rs`), for both sides.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use counterweight_webhook::metrics::Endpoint;

/// A pod review closer to production than `common::pod_review`: four
/// containers with twenty environment variables, probes, resources and
/// mounts each, and the annotations a Deployment's pods carry.
fn large_pod_review() -> bytes::Bytes {
    let mut review: serde_json::Value =
        serde_json::from_slice(&common::pod_review("bench", "shop")).unwrap();
    let container = |i: usize| {
        serde_json::json!({
            "name": format!("app-{i}"),
            "image": format!("registry.invalid/team/app-{i}:1.2.3"),
            "env": (0..20).map(|e| serde_json::json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}-of-container-{i}")})).collect::<Vec<_>>(),
            "ports": [{"containerPort": 8080 + i, "name": "http", "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080 + i}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/live", "port": 8080 + i}, "periodSeconds": 10},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "data", "mountPath": "/var/lib/app"}],
        })
    };
    let object = &mut review["request"]["object"];
    object["metadata"]["annotations"] = serde_json::json!({
        "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
    });
    object["spec"]["containers"] = (0..4).map(container).collect();
    object["spec"]["volumes"] = serde_json::json!([
        {"name": "config", "configMap": {"name": "app-config"}},
        {"name": "data", "emptyDir": {}},
    ]);
    bytes::Bytes::from(serde_json::to_vec(&review).unwrap())
}

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
    let large = large_pod_review();
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
        &format!("handle: large pod ({} bytes), injected", large.len()),
        per_call(n / 4, || h.handle(Endpoint::Mutate, &large)),
    );
    line(
        "baseline: large pod, parse, echo uid",
        per_call(n / 4, || common::bare_echo(&large)),
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
    let subscriber = counterweight_runtime::logging::subscriber(
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
