//! Gates at scale: flip → every gate released, for 200, 500 and 1,000
//! gates waiting on one API server (issue 16, item 3).
//!
//! Each gate is the real wait code (`counterweight_gate::wait::wait_active`:
//! the watch of the one state ConfigMap, with its polling fallback) run as
//! a task in this process, each with **its own client** (its own TLS
//! connection, as a gate process has), so that the machine measures the
//! API server's watch fan-out and the watch path, not a thousand process
//! exits. Per size:
//!
//! 1. the state record says `standby`; N gates start and open their watches
//!    (the API server's `apiserver_longrunning_requests` gauge of
//!    ConfigMap WATCHes reaches N);
//! 2. the record flips to `active`; each gate's release is timed from the
//!    flip's write returning;
//! 3. reported: p50, p99 and max release latency; how many released within
//!    200 ms; the CPU the API server and this process (the gates) spent
//!    from the flip until the last release.
//!
//! Run: `COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
//! cargo bench -p counterweight-gate --bench gates_at_scale`
//! (`GATES=200,500,1000` by default).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use counterweight_gate::wait::{Target, wait_active};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

const NS: &str = "counterweight-system";
const NAME: &str = "counterweight-state";

async fn set(cms: &Api<ConfigMap>, role: &str, epoch: u64) {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("state".to_owned(), role.to_owned()),
            ("epoch".to_owned(), epoch.to_string()),
        ])),
        ..Default::default()
    };
    cms.patch(
        NAME,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(cm),
    )
    .await
    .expect("apply the state ConfigMap");
}

/// ConfigMap WATCHes the API server holds open now.
async fn configmap_watches(client: &kube::Client) -> u64 {
    counterweight_harness::bulk::apiserver_metric(
        client,
        "apiserver_longrunning_requests",
        &[("resource", "configmaps"), ("verb", "WATCH")],
    )
    .await
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    counterweight_harness::install_crypto_provider();
    let sizes: Vec<usize> = std::env::var("GATES")
        .unwrap_or_else(|_| "200,500,1000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("GATES: comma-separated numbers"))
        .collect();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &clusters[0];
    let admin = cluster.client();
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let apiserver = cluster
        .pid("kube-apiserver")
        .expect("the API server runs")
        .to_string();
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("kubeconfig");
    let target = Target {
        cluster: "bench".into(),
        namespace: NS.into(),
        name: NAME.into(),
        poll_interval: Duration::from_secs(1),
    };
    let mut epoch = 0;
    for &n in &sizes {
        epoch += 1;
        set(&cms, "standby", epoch).await;
        let base = configmap_watches(&admin).await;
        let mut gates = Vec::with_capacity(n);
        for _ in 0..n {
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &Default::default())
                    .await
                    .expect("client config");
            let client = kube::Client::try_from(config).expect("client");
            let target = target.clone();
            gates.push(tokio::spawn(async move {
                wait_active(client, &target).await;
                Instant::now()
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let open = configmap_watches(&admin).await.saturating_sub(base);
            if open >= n as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} of {n} gate watches open after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (api_cpu, own_cpu) = (cpu_seconds(&apiserver), cpu_seconds("self"));
        set(&cms, "active", epoch).await;
        let flipped = Instant::now();
        let mut latencies = Vec::with_capacity(n);
        for g in gates {
            let released = tokio::time::timeout(Duration::from_secs(60), g)
                .await
                .expect("every gate released within 60 s")
                .expect("gate task");
            latencies.push(released.saturating_duration_since(flipped));
        }
        let (api_cpu, own_cpu) = (
            cpu_seconds(&apiserver) - api_cpu,
            cpu_seconds("self") - own_cpu,
        );
        latencies.sort();
        let within = latencies
            .iter()
            .filter(|l| **l <= Duration::from_millis(200))
            .count();
        println!(
            "{n:>5} gates (in-process watches, one connection each): release p50 {:>7.1} ms, p99 {:>7.1} ms, max {:>7.1} ms; {within} of {n} within 200 ms; CPU from the flip to the last release: API server {api_cpu:.2} s, gates {own_cpu:.2} s ({:.2} ms a gate)",
            pct(&latencies, 0.5).as_secs_f64() * 1e3,
            pct(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().map_or(0.0, |l| l.as_secs_f64() * 1e3),
            own_cpu * 1e3 / n as f64,
        );
    }
}
