//! Health evaluation at scale: 10,000 pods in one real cluster.
//!
//! Starts a local control plane, creates 10,000 KWOK pods across three
//! policy components, runs the real `counterweight-controller` binary against
//! it, and reports once the watch cache has synced:
//! - CPU time per evaluation (the controller's own histogram),
//! - the controller's peak RSS (VmHWM),
//! - Kubernetes API requests made by the health loop per interval tick.
//!
//! Also times the pure core parts in-process: an evaluation, and a full
//! recount of 10,000 pods (what a policy change costs).
//!
//! Run: `cargo bench -p counterweight-controller --bench health_scale`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use counterweight_core::health::{Observation, PodFacts, Tally, evaluate};
use counterweight_core::policy::Policy;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec};
use kube::api::{Api, ObjectMeta, PostParams};

const PODS: usize = 10_000;
const APP: &str = "ems";
const SYSTEM: &str = "counterweight-system";

fn policy_yaml() -> String {
    format!(
        "interval: 1s\nthreshold: 0.6\nretries: 2\ncomponents:\n{}",
        [("web", 0.5), ("api", 0.3), ("worker", 0.2)]
            .iter()
            .map(|(n, w)| format!(
                "  - {{name: {n}, namespaces: [{APP}], selector: {{matchLabels: {{app: {n}}}}}, weight: {w}, minReady: 100}}\n"
            ))
            .collect::<String>()
    )
}

fn app_of(i: usize) -> &'static str {
    ["web", "api", "worker"][i % 3]
}

fn core_benchmarks() {
    let policy = Policy::from_yaml(&policy_yaml()).expect("bench policy is valid");
    let facts: Vec<(String, PodFacts)> = (0..PODS)
        .map(|i| {
            (
                format!("{APP}/pod-{i}"),
                PodFacts {
                    namespace: APP.into(),
                    labels: BTreeMap::from([("app".to_owned(), app_of(i).to_owned())]),
                    running_ready: true,
                    at_gate: false,
                    released: false,
                    ip: Some(format!("10.0.{}.{}", i / 256, i % 256)),
                },
            )
        })
        .collect();
    let rounds = 20;
    let started = Instant::now();
    let mut tally = Tally::new(&policy);
    for _ in 0..rounds {
        tally = Tally::new(&policy);
        for (k, f) in &facts {
            tally.upsert(k, f);
        }
    }
    let recount = started.elapsed() / rounds;
    let evals = 100_000u32;
    let started = Instant::now();
    let mut sink = 0.0;
    for _ in 0..evals {
        let obs: Vec<Observation> = (0..policy.components.len())
            .map(|i| {
                let (selected, ready) = tally.counts(i);
                Observation {
                    selected,
                    ready,
                    checks: vec![],
                }
            })
            .collect();
        sink += evaluate(&policy, &obs).score;
    }
    let per_eval = started.elapsed() / evals;
    assert!(sink > 0.0);
    println!(
        "core: evaluation over {PODS} tallied pods: {per_eval:?} per evaluation ({evals} runs)"
    );
    println!("core: full recount of {PODS} pods (policy change): {recount:?}");
}

async fn metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn cluster_benchmark() {
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in [SYSTEM, APP] {
        nss.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    }
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), APP);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sas.get_opt("default").await.ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "default ServiceAccount never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), APP);
    let started = Instant::now();
    let created = futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod = Pod {
                    metadata: ObjectMeta {
                        name: Some(format!("pod-{i}")),
                        labels: Some(BTreeMap::from([("app".to_owned(), app_of(i).to_owned())])),
                        ..Default::default()
                    },
                    spec: Some(PodSpec {
                        node_name: Some(counterweight_harness::NODE_NAME.into()),
                        containers: vec![Container {
                            name: "main".into(),
                            image: Some("registry.invalid/bench:1".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                pods.create(&PostParams::default(), &pod).await.is_ok()
            }
        })
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(created, PODS, "every pod must be created");
    println!(
        "cluster: created {PODS} pods in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some("counterweight-policy".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("policy.yaml".to_owned(), policy_yaml())])),
            ..Default::default()
        },
    )
    .await
    .expect("policy");

    let metrics_port = counterweight_harness::free_port().expect("port");
    let peer_port = counterweight_harness::free_port().expect("port");
    let addr = format!("127.0.0.1:{metrics_port}");
    let log = cluster.dir().join("logs/controller.log");
    let mut controller = counterweight_harness::Process::spawn(
        "counterweight-controller",
        std::path::Path::new(env!("CARGO_BIN_EXE_counterweight-controller")),
        &[
            "--cluster=bench".into(),
            format!("--kubeconfig={}", cluster.kubeconfig().display()),
            format!("--metrics-listen={addr}"),
            format!("--peer-listen=127.0.0.1:{peer_port}"),
        ],
        &log,
    )
    .expect("controller starts");
    let pid = controller.pid().expect("controller pid");

    // Synced when every pod is Running and Ready in the explanation.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    loop {
        controller.check_alive().expect("controller keeps running");
        let ready = cms
            .get_opt(counterweight_core::names::STATE_CONFIGMAP)
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(counterweight_core::state::HEALTH_KEY).cloned())
            .and_then(|h| serde_json::from_str::<serde_json::Value>(&h).ok())
            .map(|h| {
                h["components"]
                    .as_array()
                    .map(|cs| {
                        cs.iter()
                            .map(|c| c["ready"].as_u64().unwrap_or(0))
                            .sum::<u64>()
                    })
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        if ready == PODS as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "controller never saw {PODS} ready pods (last {ready})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "cluster: controller saw all {PODS} pods Running and Ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let before = metrics(&addr).await;
    let ticks = 10u64;
    let evals_before = metric(&before, "counterweight_health_evaluations_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let m = metrics(&addr).await;
        if metric(&m, "counterweight_health_evaluations_total") >= evals_before + ticks as f64 {
            break m;
        }
        assert!(Instant::now() < deadline, "the controller stopped ticking");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let api = metric(&after, "counterweight_health_api_requests_total")
        - metric(&before, "counterweight_health_api_requests_total");
    let evals = metric(&after, "counterweight_health_evaluations_total") - evals_before;
    let sum = metric(&after, "counterweight_health_evaluation_seconds_sum");
    let count = metric(&after, "counterweight_health_evaluation_seconds_count");
    println!(
        "cluster: {evals} interval ticks after sync: {api} API requests from the health loop ({:.2} per tick)",
        api / evals
    );
    println!(
        "cluster: evaluation CPU time: {:.1} µs mean over {count} evaluations",
        sum / count * 1e6
    );
    match vm_hwm_kib(pid) {
        Some(kib) => println!(
            "cluster: controller peak RSS (VmHWM) with {PODS} pods: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("cluster: could not read controller RSS"),
    }
    controller.stop(Duration::from_secs(5));
}

#[tokio::main]
async fn main() {
    counterweight_harness::install_crypto_provider();
    core_benchmarks();
    if std::env::args().any(|a| a == "--core-only") {
        return;
    }
    cluster_benchmark().await;
}
