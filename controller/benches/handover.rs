//! Handover time on real control planes: from the abnormal verdict on the
//! active cluster to the standby's state ConfigMap showing `active`.
//!
//! Two local clusters, each with a `counterweight-controller` process; the
//! controllers talk over loopback mutual TLS. Each round makes the active
//! cluster's only component unready; its controller turns abnormal after
//! (K+1)·interval and hands over (FIG. 9). The verdict time is when the old
//! active's controller logged `cluster abnormal` (just before it tells its HA
//! loop); the end is when a watch on the standby's ConfigMap sees `state:
//! active`. Both clocks are this machine's. The `eventTime` of the
//! `ClusterAbnormal` Event is printed beside it, and stands in for a round
//! whose log line is missing: it is stamped after the verdict, by the
//! Event's writer, which runs beside the fence and falls behind it when the
//! fence patches many pods, so it errs low.
//!
//! Run: `cargo bench -p counterweight-controller --bench handover`
//! (`ROUNDS=n` to change the number of handovers per binary; default 20).
//! `BASELINE_CONTROLLER_BIN=/path/to/counterweight-controller` measures
//! another build side by side: the two alternate in blocks of
//! `BLOCK` handovers (default 10), each block on fresh clusters, so both
//! see the same load on a noisy machine.
//!
//! Where the time goes: each round also reads both controllers' logs (one
//! machine, one clock) for the verdict (`cluster abnormal`) and the FIG. 9
//! transitions, each logged by the HA loop as it executes the step, and
//! prints the segments between them: verdict → `prepare` sent → `ready`
//! answered → fenced and `change` sent → the target's election started →
//! promoted (its record written) → the bench's watch sees `active`.
//!
//! `SERVICE_PODS=n` (default 0) puts `n` KWOK service pods (opted-in
//! namespace, role `service`, the serving readiness gate) in each cluster,
//! owned by a ReplicaSet, so that the fence stops `n` pods and the
//! promotion makes `n` serve. A round starts only once all `n` of the
//! active's pods serve (the replacements of those the last fence on it
//! restarted), and the standby's have settled (all `n` Running, none
//! being deleted, none still marked for restart): a round whose fence had
//! nothing to stop would measure nothing, and one beside the last one's
//! restarts measures both. (Without the restart mark the check passed
//! between two eviction batches, and every west → east round ran beside
//! east's restarts: its fence took 1.5–2 times east's.) (Bare pods, as the bench had before, were gone after their
//! first fence, and later rounds then ran at the speed of no pods.)
//!
//! Each round also counts the requests both API servers answered from the
//! drop of health to the watch seeing `active` (`apiserver_request_total`,
//! every client: the controllers, KWOK, the ReplicaSet controller and the
//! bench), printed a second; each block reads both controllers' peak RSS
//! (`VmHWM`) at its end.
//!
//! `LOGS=dir` keeps both controllers' logs of every block there
//! (`{build}-{block}-{cluster}.log`), to read a slow round afterwards (or
//! a start that elected nobody); the clusters' own directories are removed
//! with them.
//!
//! `HA_TIMINGS=manifest` runs the controllers on the shipped manifest's
//! `ha.yaml` (`manifests/base/controller/ha-config.yaml`: 6 s lease, 2 s
//! margin, 1 s probes) instead of the bench's short timings (1.5 s,
//! 300 ms, 100 ms).
//!
//! **API floor.** After each block the bench times `FLOOR_WRITES` (default
//! 200) bare ConfigMap writes, one after another, on the same API server
//! (each a merge PATCH of one key, as a state write is). A handover makes
//! [`PATH_WRITES`] such writes one after another, so the sum of that many
//! consecutive bare writes is the least any handover can take on this API
//! server: the floor is printed beside the handover's own figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_core::{names, workload};
use counterweight_harness::bulk::{
    apiserver_metric, create_namespace, kwok_pod, peak_rss_mib, wait_running,
};
use counterweight_harness::{Cluster, Process, free_port};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

const SYSTEM: &str = "counterweight-system";
/// The opted-in namespace of the service pods (`SERVICE_PODS`).
const APP: &str = "ems";
/// State writes a handover makes one after another, each waiting for the
/// last: the old active's serving lease withdrawn (beside its pods' stops),
/// its `standby` record, then the target's own vote and its `active`
/// record. (The messages between them cost about 3 ms in all.)
const PATH_WRITES: usize = 4;
const INTERVAL_MS: u64 = 200;
const RETRIES: u64 = 0;

async fn prepare(cluster: &Cluster, service_pods: usize) {
    let client = cluster.client();
    for (ns, opted) in [(SYSTEM, false), (APP, true)] {
        create_namespace(&client, ns, opted)
            .await
            .expect("namespace");
    }
    if service_pods > 0 {
        // A ReplicaSet, as a Deployment would make: the fence restarts the
        // pods that served (evicts them), and their replacements wait as
        // standby pods until the cluster is active again.
        let labels = [("app", "web"), (names::ROLE_LABEL, "service")];
        let template = kwok_pod("web", &labels, &[names::SERVING_CONDITION]);
        let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), APP);
        sets.create(
            &PostParams::default(),
            &ReplicaSet {
                metadata: ObjectMeta {
                    name: Some("web".into()),
                    ..Default::default()
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(i32::try_from(service_pods).expect("SERVICE_PODS fits an i32")),
                    selector: LabelSelector {
                        match_labels: template.metadata.labels.clone(),
                        ..Default::default()
                    },
                    template: Some(PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: template.metadata.labels,
                            ..Default::default()
                        }),
                        spec: template.spec,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("service pods' ReplicaSet");
        let pods: Api<Pod> = Api::namespaced(client.clone(), APP);
        wait_running(&pods, "app=web", service_pods, Duration::from_secs(300))
            .await
            .expect("service pods Running");
    }
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), SYSTEM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sas.get_opt("default").await.ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "no default ServiceAccount");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    pods.create(
        &PostParams::default(),
        &Pod {
            metadata: ObjectMeta {
                name: Some("app".into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "app".to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(counterweight_harness::NODE_NAME.into()),
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("registry.invalid/app:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .expect("pod");
    let cms: Api<ConfigMap> = Api::namespaced(client, SYSTEM);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta { name: Some("counterweight-policy".into()), ..Default::default() },
            data: Some(BTreeMap::from([(
                "policy.yaml".to_owned(),
                format!("interval: {INTERVAL_MS}ms\nthreshold: 0.5\nretries: {RETRIES}\ncomponents:\n  - {{name: app, namespaces: [{SYSTEM}], selector: {{matchLabels: {{app: app}}}}, weight: 1}}\n"),
            )])),
            ..Default::default()
        },
    )
    .await
    .expect("policy");
}

fn start(
    cluster: &Cluster,
    name: &str,
    peer: &str,
    peer_port: u16,
    own_port: u16,
    dir: &Path,
    bin: &Path,
) -> Process {
    let mut args = cluster.controller_args(
        name,
        &dir.join("ha.yaml"),
        own_port,
        free_port().expect("port"),
        dir,
    );
    args.push(format!("--peer={peer}=https://127.0.0.1:{peer_port}"));
    Process::spawn(name, bin, &args, &cluster.dir().join("logs/controller.log"))
        .expect("controller starts")
}

async fn state(cms: &Api<ConfigMap>) -> Option<(bool, u64)> {
    let d = cms.get_opt(names::STATE_CONFIGMAP).await.ok()??.data?;
    Some((
        d.get("state").map(String::as_str) == Some("active"),
        d.get("epoch")?.parse().ok()?,
    ))
}

/// What a round waits for in one cluster's service pods.
#[derive(Clone, Copy)]
enum Settled {
    /// All `n` serve (condition True, not being deleted): the active's,
    /// so that the fence has every pod to stop.
    Serving,
    /// Exactly `n`, all Running, none being deleted and none still marked
    /// for restart: the standby's, the last fence's restarts done.
    Running,
}

/// `each` times `n` pods: the part of a wait that grows with the pod count.
fn per_pod(each: Duration, n: usize) -> Duration {
    each * u32::try_from(n).unwrap_or(u32::MAX)
}

/// Waits until `cluster`'s service pods are [`Settled`] as `want`, for at
/// most 30 s (serving) or 60 s (running, which includes restarts), plus
/// 20 ms a pod.
async fn wait_pods(cluster: &Cluster, n: usize, want: Settled, what: &str) {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), APP);
    // Thousands of pods take the API server's write rate to serve (one
    // write a pod: 20 ms a pod on top, as this one takes 250-480 writes a
    // second) or to restart (an eviction, KWOK's delete, a new pod, its
    // binding and its status: 100 ms a pod, as 10,000 restarts beside the
    // other cluster's activation took 290 s to evict and 460 s were not
    // enough for KWOK to finish).
    let (limit, word) = match want {
        Settled::Serving => (
            Duration::from_secs(30) + per_pod(Duration::from_millis(20), n),
            "serve",
        ),
        Settled::Running => (
            Duration::from_secs(60) + per_pod(Duration::from_millis(100), n),
            "Running",
        ),
    };
    let deadline = Instant::now() + limit;
    // A LIST of 10,000 pods is itself a load: poll at most every 0.1 ms a
    // pod, and take a failed LIST (a busy API server) as "not yet".
    let poll = Duration::from_millis(50).max(per_pod(Duration::from_micros(100), n));
    loop {
        let list = match pods.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: listing the service pods failed until the deadline: {e}"
                );
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        let live = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none());
        let good = match want {
            Settled::Serving => live
                .filter(|p| workload::serving_state(p) == workload::ServingState::True)
                .count(),
            // A pod still marked for restart counts as not settled: the
            // restarts go in batches, and between two of them the count
            // and the phases look settled while the next batch waits.
            Settled::Running => live
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter(|p| {
                    workload::serving_state(p)
                        != (workload::ServingState::False {
                            restart_pending: true,
                        })
                })
                .count(),
        };
        let all = list.items.len();
        if good == n && (matches!(want, Settled::Serving) || all == n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {good} of {n} service pods {word} ({all} in all) after {} s",
            limit.as_secs()
        );
        tokio::time::sleep(poll).await;
    }
}

async fn set_ready(cluster: &Cluster, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), SYSTEM);
    let status = if ready { "True" } else { "False" };
    pods.patch_status(
        "app",
        &PatchParams::default(),
        &Patch::Strategic(
            serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": status}, {"type": "ContainersReady", "status": status}]}}),
        ),
    )
    .await
    .expect("patch pod status");
}

/// eventTime of the newest ClusterAbnormal Event after `after` (wall clock).
async fn abnormal_at(
    cluster: &Cluster,
    after: k8s_openapi::jiff::Timestamp,
) -> Option<k8s_openapi::jiff::Timestamp> {
    let events: Api<Event> = Api::namespaced(cluster.client(), SYSTEM);
    events
        .list(&ListParams::default())
        .await
        .ok()?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ClusterAbnormal"))
        // Repeats of an Event are folded into its series; the newest
        // occurrence is then the series' last observed time.
        .filter_map(|e| match e.series {
            Some(s) => Some(s.last_observed_time.0),
            None => e.event_time.map(|t| t.0),
        })
        .filter(|t| *t > after)
        .max()
}

/// The steps of one handover, in order, as the controllers log them: the
/// old active's verdict (`cluster abnormal`) and `HA transition` lines with
/// these reasons; `old` says whose log holds each.
const STEPS: [(&str, bool); 6] = [
    ("verdict", true),
    ("HandoverStarted", true),
    ("HandoverReady", false),
    ("HandedOver", true),
    ("ElectionStarted", false),
    ("Promoted", false),
];

/// Segment names: from each step to the next, and from the last to the
/// bench's watch seeing the standby's record `active`.
const SEGMENTS: [&str; 6] = [
    "verdict -> prepare sent",
    "prepare sent -> ready answered",
    "ready -> fenced, change sent",
    "change sent -> target's election",
    "election -> promoted (record written)",
    "promoted -> watch sees active",
];

/// The first time after `after` at which `log` (a controller's tracing
/// output, one line per event, its timestamp first) logged `step`: the
/// verdict, or the HA transition of that reason.
fn logged_at(
    log: &str,
    step: &str,
    after: k8s_openapi::jiff::Timestamp,
) -> Option<k8s_openapi::jiff::Timestamp> {
    let needle = if step == "verdict" {
        "cluster abnormal".to_owned()
    } else {
        format!("HA transition reason={step} ")
    };
    log.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .find(|t| *t > after)
}

/// Milliseconds of each of [`SEGMENTS`] in one handover from the
/// controller logging to `old` to the one logging to `new`, or `None` if a
/// step is missing from the logs.
fn breakdown(
    old: &Path,
    new: &Path,
    after: k8s_openapi::jiff::Timestamp,
    seen: k8s_openapi::jiff::Timestamp,
) -> Option<[f64; 6]> {
    // Each log is read once per round.
    let (old, new) = (
        std::fs::read_to_string(old).ok()?,
        std::fs::read_to_string(new).ok()?,
    );
    let mut times = Vec::with_capacity(STEPS.len() + 1);
    for (step, on_old) in STEPS {
        times.push(logged_at(if on_old { &old } else { &new }, step, after)?);
    }
    times.push(seen);
    let mut out = [0.0; 6];
    for (i, w) in times.windows(2).enumerate() {
        out[i] = (w[1] - w[0])
            .total(k8s_openapi::jiff::Unit::Millisecond)
            .ok()?;
    }
    Some(out)
}

/// Times `n` bare ConfigMap writes, one after another, on `cms`'s API
/// server: each a merge PATCH of one key of a ConfigMap of the bench's own
/// (a new value each time, so that each is a real write to etcd), in ms.
async fn write_floor(cms: &Api<ConfigMap>, n: usize) -> Vec<f64> {
    let name = "bench-write-floor";
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("floor ConfigMap");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let patch = serde_json::json!({"data": {"n": i.to_string()}});
        let t = Instant::now();
        cms.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("floor write");
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    cms.delete(name, &Default::default())
        .await
        .expect("delete floor ConfigMap");
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `HA_TIMINGS=manifest`: the controllers run the shipped manifest's
/// `ha.yaml` instead of the bench's short timings (1.5 s lease, 300 ms
/// margin, 100 ms probes), which a loaded API server may not answer within.
fn manifest_timings() -> bool {
    std::env::var("HA_TIMINGS").is_ok_and(|t| t == "manifest")
}

/// The `ha.yaml` of `manifests/base/controller/ha-config.yaml`: the group
/// the bench runs (east over west) with the timings an installation gets.
fn shipped_ha_config() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/controller/ha-config.yaml");
    let text = std::fs::read_to_string(&path).expect("read the shipped HA ConfigMap");
    let cm: ConfigMap =
        counterweight_core::bounded::from_yaml(&text, counterweight_core::bounded::Limits::CONFIG)
            .expect("the shipped HA ConfigMap parses");
    cm.data
        .and_then(|mut d| d.remove("ha.yaml"))
        .expect("the shipped HA ConfigMap has ha.yaml")
}

#[tokio::main]
async fn main() {
    counterweight_harness::install_crypto_provider();
    let env_usize = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env_usize("ROUNDS", 20);
    let block = env_usize("BLOCK", 10).max(1);
    let service_pods = env_usize("SERVICE_PODS", 0);
    let floor_writes = env_usize("FLOOR_WRITES", 200);
    let keep_logs = std::env::var_os("LOGS").map(PathBuf::from);
    let mut builds = vec![(
        "this build",
        PathBuf::from(env!("CARGO_BIN_EXE_counterweight-controller")),
    )];
    if let Some(b) = std::env::var_os("BASELINE_CONTROLLER_BIN") {
        builds.push(("baseline", PathBuf::from(b)));
    }
    let mut results: Vec<Rounds> = builds.iter().map(|_| Rounds::default()).collect();
    let mut floor: Vec<f64> = Vec::new();
    let mut done = 0;
    while done < rounds {
        let n = block.min(rounds - done);
        for (i, (label, bin)) in builds.iter().enumerate() {
            println!("-- {label}: {n} handovers ({})", bin.display());
            let keep = keep_logs.as_ref().map(|dir| {
                let name = format!("{}-{}", label.replace(' ', "-"), done / block);
                (dir.clone(), name)
            });
            let (block, writes) = handovers(bin, n, service_pods, floor_writes, keep).await;
            results[i].extend(block);
            floor.extend(writes);
        }
        done += n;
    }
    for ((label, _), r) in builds.iter().zip(results) {
        let (mut s, mut stamped, p) = (r.logged, r.stamped, r.breakdowns);
        s.sort_by(f64::total_cmp);
        stamped.sort_by(f64::total_cmp);
        println!(
            "{label}: handover (logged abnormal verdict -> standby ConfigMap active) over {} rounds: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
            s.len(),
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            s.last().copied().unwrap_or(f64::NAN),
            if r.from_event > 0 {
                format!(
                    " ({} of them from the Event's stamp: no verdict line logged)",
                    r.from_event
                )
            } else {
                String::new()
            }
        );
        println!(
            "{label}: the same from the ClusterAbnormal Event's stamp (errs low): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&stamped, 0.5),
            percentile(&stamped, 0.99)
        );
        println!(
            "{label}: where it goes, from the controllers' logs ({} rounds with every step logged):",
            p.len()
        );
        let mut totals: Vec<f64> = p.iter().map(|b| b.iter().sum()).collect();
        totals.sort_by(f64::total_cmp);
        for (i, name) in SEGMENTS.iter().enumerate() {
            let mut seg: Vec<f64> = p.iter().map(|b| b[i]).collect();
            seg.sort_by(f64::total_cmp);
            if seg.is_empty() {
                continue;
            }
            println!(
                "  {name:<40} p50 {:>6.1} ms  p99 {:>6.1} ms",
                percentile(&seg, 0.5),
                percentile(&seg, 0.99)
            );
        }
        if !totals.is_empty() {
            println!(
                "  {:<40} p50 {:>6.1} ms  p99 {:>6.1} ms",
                "total (logged verdict -> watch)",
                percentile(&totals, 0.5),
                percentile(&totals, 0.99)
            );
        }
        let mut rates = r.rates;
        rates.sort_by(f64::total_cmp);
        let rss = r.rss_mib.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "{label}: API requests a second during a handover (both API servers, all clients): p50 {:.0}, max {:.0}; controllers' peak RSS (VmHWM) {rss:.1} MiB",
            percentile(&rates, 0.5),
            rates.last().copied().unwrap_or(f64::NAN),
        );
    }
    if !floor.is_empty() {
        // Disjoint groups of PATH_WRITES consecutive writes, in the order
        // they were made: what a handover's chain of writes meets.
        let mut chains: Vec<f64> = floor
            .chunks_exact(PATH_WRITES)
            .map(|c| c.iter().sum())
            .collect();
        chains.sort_by(f64::total_cmp);
        let mut one = floor;
        one.sort_by(f64::total_cmp);
        println!(
            "API floor on the same API servers: one ConfigMap write p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} writes); {PATH_WRITES} in a row (a handover's chain) p50 {:.1} ms, p99 {:.1} ms ({} chains)",
            percentile(&one, 0.5),
            percentile(&one, 0.99),
            one.last().copied().unwrap_or(f64::NAN),
            one.len(),
            percentile(&chains, 0.5),
            percentile(&chains, 0.99),
            chains.len()
        );
    }
    println!(
        "configured detection time (K+1)*interval = {} ms (K = {RETRIES}, interval = {INTERVAL_MS} ms); HA timings {}; {service_pods} service pods per cluster",
        (RETRIES + 1) * INTERVAL_MS,
        if manifest_timings() {
            "the shipped manifest's (HA_TIMINGS=manifest)"
        } else {
            "probe 100 ms, lease 1500 ms, margin 300 ms"
        }
    );
}

/// What a block of handovers measured, in ms.
#[derive(Default)]
struct Rounds {
    /// Each round from the logged verdict (the Event's stamp where the log
    /// line is missing) to the watch seeing `active`.
    logged: Vec<f64>,
    /// Each round from the `ClusterAbnormal` Event's stamp.
    stamped: Vec<f64>,
    /// Rounds of `logged` that had to use the Event's stamp.
    from_event: usize,
    /// The breakdown of the rounds whose steps were all logged.
    breakdowns: Vec<[f64; 6]>,
    /// Each round's API requests a second, both API servers together, all
    /// clients (the controllers, KWOK, the ReplicaSet controller, the
    /// bench), from the drop of health to the watch seeing `active`.
    rates: Vec<f64>,
    /// Each block's controllers' peak RSS (`VmHWM`), MiB.
    rss_mib: Vec<f64>,
}

impl Rounds {
    fn extend(&mut self, other: Rounds) {
        self.logged.extend(other.logged);
        self.stamped.extend(other.stamped);
        self.from_event += other.from_event;
        self.breakdowns.extend(other.breakdowns);
        self.rates.extend(other.rates);
        self.rss_mib.extend(other.rss_mib);
    }
}

/// Requests both API servers have answered so far
/// (`apiserver_request_total`, every series).
async fn api_requests(clusters: &[Cluster]) -> u64 {
    let mut total = 0;
    for c in clusters {
        total += apiserver_metric(&c.client(), "apiserver_request_total", &[]).await;
    }
    total
}

/// A process's peak resident set (`VmHWM`), MiB.
fn process_peak_rss_mib(process: &Process) -> Option<f64> {
    peak_rss_mib(&process.pid()?.to_string())
}

/// `rounds` handovers back and forth between two fresh clusters whose
/// controllers run `bin`, with `service_pods` service pods in each: what
/// they measured, and then `floor_writes` bare ConfigMap writes' times on
/// the first cluster's API server, in ms.
async fn handovers(
    bin: &Path,
    rounds: usize,
    service_pods: usize,
    floor_writes: usize,
    keep_logs: Option<(PathBuf, String)>,
) -> (Rounds, Vec<f64>) {
    let dir = tempfile::tempdir().expect("dir");
    let ca = CertificateAuthority::new("bench-peers").expect("CA");
    ca.pem().write(dir.path(), "ca").expect("write");
    for n in ["east", "west"] {
        ca.issue(&LeafSpec::new(n, Usage::Peer).sans([format!("{n}.peers.counterweight.dev")]))
            .expect("cert")
            .write(dir.path(), &format!("peer-{n}"))
            .expect("write");
    }
    let ha = if manifest_timings() {
        shipped_ha_config()
    } else {
        "clusters:\n  - {name: east, priority: 2}\n  - {name: west, priority: 1}\nprobeIntervalMs: 100\nleaseMs: 1500\nmarginMs: 300\ncandidateFreshMs: 1000\n".to_owned()
    };
    std::fs::write(dir.path().join("ha.yaml"), ha).expect("ha config");
    // From 1,000 pods on, kube-controller-manager's and kube-scheduler's
    // default rates (20 and 50 requests a second) would take minutes to
    // fill, schedule and refill the ReplicaSets.
    let clusters = if service_pods >= 1000 {
        counterweight_harness::start_named_with_client_qps(&["east", "west"], 500).await
    } else {
        counterweight_harness::start_named(&["east", "west"]).await
    }
    .expect("clusters");
    for c in &clusters {
        prepare(c, service_pods).await;
    }
    let (pe, pw) = (free_port().expect("port"), free_port().expect("port"));
    let mut east = start(&clusters[0], "east", "west", pw, pe, dir.path(), bin);
    let mut west = start(&clusters[1], "west", "east", pe, pw, dir.path(), bin);
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();

    let log = |i: usize| clusters[i].dir().join("logs/controller.log");
    let _keep = keep_logs.map(|(dir, name)| KeptLogs {
        from: vec![log(0), log(1)],
        dir,
        name,
    });

    // Wait for the first election. Both controllers start as standbys and
    // first fence every pod: 10 ms a pod on top.
    let started = Instant::now();
    let deadline =
        started + Duration::from_secs(60) + per_pod(Duration::from_millis(10), service_pods);
    let mut active = loop {
        if let Some(i) = futures::future::join_all(cms.iter().map(state))
            .await
            .iter()
            .position(|s| s.is_some_and(|s| s.0))
        {
            break i;
        }
        // A controller that exited (a refused configuration) elects
        // nobody: say so, not "no active".
        if let Err(e) = east.check_alive().and(west.check_alive()) {
            panic!("a controller exited before the first election: {e}");
        }
        assert!(
            Instant::now() < deadline,
            "no active elected within {:?}",
            deadline - started
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "first election: {} active {} ms after the controllers started",
        ["east", "west"][active],
        started.elapsed().as_millis()
    );
    let mut out = Rounds::default();
    for round in 0..rounds {
        east.check_alive().expect("east runs");
        west.check_alive().expect("west runs");
        let standby = 1 - active;
        let (_, epoch) = state(&cms[active]).await.expect("state");
        // The active's pods must all serve, so that the fence stops them.
        wait_pods(
            &clusters[active],
            service_pods,
            Settled::Serving,
            &format!("round {round}: {}, active", ["east", "west"][active]),
        )
        .await;
        // And the standby's pods settled: the last fence's restarts done,
        // so that a round measures a handover, not the last one's wake.
        wait_pods(
            &clusters[standby],
            service_pods,
            Settled::Running,
            &format!("round {round}: {}, standby", ["east", "west"][standby]),
        )
        .await;
        // The standby must be a fresh, healthy candidate before the drop.
        set_ready(&clusters[standby], true).await;
        tokio::time::sleep(Duration::from_millis(4 * INTERVAL_MS)).await;
        let mut watch = watcher(
            cms[standby].clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", names::STATE_CONFIGMAP)),
        )
        .boxed();
        let requests_before = api_requests(&clusters).await;
        let started = Instant::now();
        let before = k8s_openapi::jiff::Timestamp::now();
        set_ready(&clusters[active], false).await;
        // The fence stops every pod first: 10 ms a pod on top.
        let deadline = Instant::now()
            + Duration::from_secs(30)
            + per_pod(Duration::from_millis(10), service_pods);
        let promoted = loop {
            let ev = tokio::time::timeout_at(deadline.into(), watch.next())
                .await
                .expect("standby promoted in time");
            if let Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) = ev {
                let d = cm.data.unwrap_or_default();
                if d.get("state").map(String::as_str) == Some("active")
                    && d.get("epoch")
                        .and_then(|e| e.parse::<u64>().ok())
                        .is_some_and(|e| e > epoch)
                {
                    break k8s_openapi::jiff::Timestamp::now();
                }
            }
        };
        let stamped = loop {
            if let Some(t) = abnormal_at(&clusters[active], before).await {
                break t;
            }
            assert!(Instant::now() < deadline, "no ClusterAbnormal Event");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // After the Event's lookup, which must come first: the Event's
        // series moves on while the old active stays abnormal.
        let rate = (api_requests(&clusters).await - requests_before) as f64
            / started.elapsed().as_secs_f64();
        let logged = std::fs::read_to_string(log(active))
            .ok()
            .and_then(|l| logged_at(&l, "verdict", before));
        let since = |from: k8s_openapi::jiff::Timestamp| {
            (promoted - from)
                .total(k8s_openapi::jiff::Unit::Millisecond)
                .expect("span")
        };
        let ms = since(logged.unwrap_or(stamped));
        let parts = breakdown(&log(active), &log(standby), before, promoted);
        println!(
            "round {round}: {} -> {}: {ms:.1} ms{} (Event-stamped {:.1} ms); {rate:.0} API requests a second; logged steps {}",
            ["east", "west"][active],
            ["east", "west"][standby],
            if logged.is_none() {
                " from the Event"
            } else {
                ""
            },
            since(stamped),
            parts.map_or("(incomplete)".to_owned(), |p| format!("{p:.1?}"))
        );
        out.logged.push(ms);
        out.stamped.push(since(stamped));
        out.from_event += usize::from(logged.is_none());
        out.breakdowns.extend(parts);
        out.rates.push(rate);
        active = standby;
    }
    out.rss_mib.extend(process_peak_rss_mib(&east));
    out.rss_mib.extend(process_peak_rss_mib(&west));
    // The controllers keep running, as they did during the handovers.
    let writes = write_floor(&cms[0], floor_writes).await;
    (out, writes)
}

/// `LOGS`: copies both controllers' logs out of the clusters' directories
/// when dropped, before those are removed: at a block's end, and when the
/// bench panics mid-block, whose logs are the ones worth reading.
struct KeptLogs {
    /// East's and west's log files.
    from: Vec<PathBuf>,
    /// Where to copy them.
    dir: PathBuf,
    /// The block's name, the copies' prefix.
    name: String,
}

impl Drop for KeptLogs {
    fn drop(&mut self) {
        // No panic here: this may run while the bench unwinds.
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            eprintln!("LOGS: cannot make {}: {e}", self.dir.display());
            return;
        }
        for (from, cluster) in self.from.iter().zip(["east", "west"]) {
            let to = self.dir.join(format!("{}-{cluster}.log", self.name));
            if let Err(e) = std::fs::copy(from, &to) {
                eprintln!(
                    "LOGS: cannot copy {} to {}: {e}",
                    from.display(),
                    to.display()
                );
            }
        }
    }
}
