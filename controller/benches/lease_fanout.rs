//! What the serving lease costs at scale: one real API server (with etcd),
//! `WATCHERS` watches on the `counterweight-serving` ConfigMap, one per
//! service pod's lease sidecar (default 10,000), and the controller's own
//! [`LeasePublisher`] renewing a `LEASE_MS` lease (default 5,000, the HA
//! default) as the HA loop does, offered every probe interval.
//!
//! It prints the writes per second the publisher makes, how long each write
//! takes to fan out from the first watcher that sees it to every other
//! (p50/p99/max over watchers and writes), and the CPU the API server and
//! etcd spend per second: publishing with no watches, with the watches open
//! and no writes, and publishing to the watches, all in the same run.
//!
//! Run: `cargo bench -p counterweight-controller --bench lease_fanout`
//! (`WATCHERS=n`, `LEASE_MS=n`, `SECONDS=n`; each watch is one HTTP/1.1
//! connection, so the open-file limit must exceed `WATCHERS` twice over).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use counterweight_controller::serving_lease::{LeasePublisher, LeaseTimings};
use counterweight_core::serving::SERVING_CONFIGMAP;
use counterweight_harness::Cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams, WatchEvent, WatchParams};
use tokio::sync::Mutex;

const SYSTEM: &str = "counterweight-system";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) `pid` has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resource version each watcher has seen last, and when, per watcher.
type Seen = Arc<Mutex<Vec<BTreeMap<u64, Instant>>>>;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Publishes for `seconds` and returns (writes, [when each resource version
/// was first read back, within 100 ms of its write]).
async fn publish(
    cluster: &Cluster,
    lease_ms: u64,
    seconds: u64,
) -> (usize, BTreeMap<u64, Instant>) {
    let publisher = LeasePublisher::start(
        cluster.client(),
        SYSTEM,
        "east",
        LeaseTimings {
            lease_ms,
            max_skew_ms: 500,
            write_timeout: Duration::from_secs(2),
        },
    );
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), SYSTEM);
    let mut writes = BTreeMap::new();
    let mut last_rv = 0;
    let start = Instant::now();
    let mono = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds) {
        // What the HA loop does after each step: offer the lease end.
        let now_ms = u64::try_from(mono.elapsed().as_millis()).unwrap_or(u64::MAX);
        publisher.offer(1, Some(now_ms + lease_ms), now_ms);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(cm)) = cms.get_opt(SERVING_CONFIGMAP).await {
            let rv: u64 = cm
                .metadata
                .resource_version
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if rv != last_rv {
                // Seen within 100 ms of the write; the fan-out latency below
                // is measured from here, so it errs low by at most that.
                writes.insert(rv, Instant::now());
                last_rv = rv;
            }
        }
    }
    (writes.len(), writes)
}

#[tokio::main]
async fn main() {
    counterweight_harness::install_crypto_provider();
    let watchers = env_u64("WATCHERS", 10_000) as usize;
    let lease_ms = env_u64("LEASE_MS", 5_000);
    let seconds = env_u64("SECONDS", 30);
    let clusters = counterweight_harness::start_named(&["east"])
        .await
        .expect("cluster");
    let cluster = &clusters[0];
    let nss: Api<Namespace> = Api::all(cluster.client());
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(SYSTEM.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("namespace");
    let apiserver = cluster.pid("kube-apiserver").expect("apiserver pid");
    let etcd = cluster.pid("etcd").expect("etcd pid");

    // Idle and publishing, no watches: the baseline of this run.
    let (c0, e0) = (cpu_seconds(apiserver), cpu_seconds(etcd));
    let (writes0, _) = publish(cluster, lease_ms, seconds).await;
    let base = (
        (cpu_seconds(apiserver) - c0) / seconds as f64,
        (cpu_seconds(etcd) - e0) / seconds as f64,
    );

    // Open the watches, a client (connection pool) per 500.
    let seen: Seen = Arc::new(Mutex::new(vec![BTreeMap::new(); watchers]));
    let open = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let mut tasks = Vec::new();
    let mut client = cluster.client();
    for i in 0..watchers {
        if i % 500 == 0 {
            client = cluster.client();
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
        let (seen, open) = (seen.clone(), open.clone());
        tasks.push(tokio::spawn(async move {
            let wp = WatchParams::default().fields(&format!("metadata.name={SERVING_CONFIGMAP}"));
            // The sidecar's watcher re-watches when a watch ends; so does this.
            let mut first = true;
            loop {
                let Ok(stream) = api.watch(&wp, "0").await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if first {
                    open.fetch_add(1, Ordering::Relaxed);
                    first = false;
                }
                let mut stream = stream.boxed();
                while let Some(ev) = stream.next().await {
                    if let Ok(WatchEvent::Added(cm) | WatchEvent::Modified(cm)) = ev {
                        let rv: u64 = cm
                            .metadata
                            .resource_version
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        seen.lock().await[i].entry(rv).or_insert_with(Instant::now);
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while open.load(Ordering::Relaxed) < watchers {
        assert!(
            Instant::now() < deadline,
            "only {} of {watchers} watches opened",
            open.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{watchers} watches open in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    // Let the opening settle, then the watches alone, without writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ci, ei) = (cpu_seconds(apiserver), cpu_seconds(etcd));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let idle = (
        (cpu_seconds(apiserver) - ci) / seconds as f64,
        (cpu_seconds(etcd) - ei) / seconds as f64,
    );

    let (c1, e1) = (cpu_seconds(apiserver), cpu_seconds(etcd));
    let (writes, rvs) = publish(cluster, lease_ms, seconds).await;
    let with = (
        (cpu_seconds(apiserver) - c1) / seconds as f64,
        (cpu_seconds(etcd) - e1) / seconds as f64,
    );
    // Give the last write time to reach everyone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = seen.lock().await;
    // From the first watcher that saw a write to each of the others: how
    // long the API server takes to fan one write out to every watch.
    let mut lat = Vec::new();
    let mut missed = 0usize;
    for rv in rvs.keys() {
        let got: Vec<Instant> = seen.iter().filter_map(|w| w.get(rv).copied()).collect();
        missed += watchers - got.len();
        if let Some(first) = got.iter().min() {
            lat.extend(
                got.iter()
                    .map(|t| t.duration_since(*first).as_secs_f64() * 1e3),
            );
        }
    }
    lat.sort_by(f64::total_cmp);
    for t in &tasks {
        t.abort();
    }
    println!(
        "lease {lease_ms} ms over {seconds} s: {writes} writes ({:.2}/s; {writes0} without watchers)",
        writes as f64 / seconds as f64
    );
    println!(
        "fan-out of a write, from the first watcher to each of {watchers}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {missed} deliveries not seen",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "CPU seconds per second, publishing: kube-apiserver {:.3} with the watches, {:.3} without; etcd {:.3} with, {:.3} without",
        with.0, base.0, with.1, base.1
    );
    println!(
        "CPU seconds per second, watches open and no writes: kube-apiserver {:.3}, etcd {:.3}",
        idle.0, idle.1
    );
}
