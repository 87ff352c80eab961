//! The workload monitor: are the service pods of two clusters serving at
//! once? It looks at what users see, not at the controllers' records, and
//! never stops looking at a cluster because its controller is dead.
//!
//! A cluster's workload serves when any of these holds:
//! - one of its service pods has the `counterweight.dev/serving` condition
//!   True and is Ready, or an EndpointSlice of its namespace has a ready
//!   endpoint, **and** (for pods bound to the serving lease) the cluster's
//!   published serving lease allows serving at that instant, by the same
//!   rule the lease sidecar's readiness answers with
//!   (`counterweight_core::serving::allowance`; the pod is taken as released
//!   in the lease's own epoch, the most permissive reading). KWOK runs no
//!   sidecar, so no kubelet turns Ready off when the lease ends: the real-node
//!   tests check Ready itself;
//! - a real lease sidecar process (`counterweight-gate --hold`) registered
//!   for the cluster answers its readiness probe with 200.
//!
//! Each round reads cluster A, then every other, then A again; a violation
//! is A serving at both reads with another serving in between, so the read
//! order cannot produce a false alarm.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use counterweight_core::clock::unix_ms;
use counterweight_core::names;
use counterweight_core::serving::{Allowance, SERVING_CONFIGMAP, ServingLease, allowance};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use counterweight_harness::{Cluster, Process, free_port};

use crate::eventually;
use crate::fixtures::condition_true;
use crate::ha::{SYSTEM, workspace_bin};

/// How long one read of a cluster may take before the monitor falls back to
/// what it saw last: a frozen or stopped API server must not stall the
/// rounds, and nothing can change the pods while nobody can write them.
const READ_TIMEOUT: Duration = Duration::from_millis(300);

/// The last observation of a cluster's objects.
#[derive(Clone, Default)]
struct Seen {
    /// Service pods with the serving condition True and Ready.
    pods: Vec<String>,
    /// Ready endpoints in the namespace's EndpointSlices.
    endpoints: usize,
    /// The published serving lease.
    lease: Option<ServingLease>,
}

/// One cluster as the monitor sees it.
#[derive(Clone)]
pub struct Watched {
    /// The cluster's name (also the lease's cluster).
    pub name: String,
    /// A client of its API server.
    pub client: kube::Client,
    /// Namespace of the service pods.
    pub namespace: String,
    /// The pods are bound to the serving lease (they carry the sidecar).
    pub lease_bound: bool,
    /// Readiness port of a real lease sidecar process, once one runs.
    pub sidecar: Arc<Mutex<Option<u16>>>,
    seen: Arc<Mutex<Seen>>,
}

impl Watched {
    /// A cluster whose service pods in `namespace` are bound to the lease.
    pub fn new(name: &str, client: kube::Client, namespace: &str) -> Self {
        Self {
            name: name.to_owned(),
            client,
            namespace: namespace.to_owned(),
            lease_bound: true,
            sidecar: Arc::new(Mutex::new(None)),
            seen: Arc::new(Mutex::new(Seen::default())),
        }
    }

    /// The same cluster judged by the serving condition alone, as the
    /// design before the serving lease did: nothing takes a pod out of
    /// service unless a controller writes its condition.
    pub fn unbound(&self) -> Self {
        Self {
            lease_bound: false,
            sidecar: Arc::new(Mutex::new(None)),
            seen: Arc::new(Mutex::new(Seen::default())),
            ..self.clone()
        }
    }

    /// Registers a lease sidecar process answering on `port`.
    pub fn set_sidecar(&self, port: u16) {
        *self.sidecar.lock().expect("lock") = Some(port);
    }

    /// Reads the cluster's objects; each read that fails or times out keeps
    /// its last observation.
    async fn observe(&self) -> Seen {
        let mut seen = self.seen.lock().expect("lock").clone();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default().labels(&format!("{}=service", names::ROLE_LABEL));
        if let Ok(Ok(list)) = tokio::time::timeout(READ_TIMEOUT, pods.list(&lp)).await {
            seen.pods = list
                .items
                .into_iter()
                .filter(|p| {
                    condition_true(p, names::SERVING_CONDITION) && condition_true(p, "Ready")
                })
                .map(|p| p.metadata.name.unwrap_or_default())
                .collect();
        }
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default();
        if let Ok(Ok(list)) = tokio::time::timeout(READ_TIMEOUT, slices.list(&lp)).await {
            seen.endpoints = ready_endpoints(&list.items);
        }
        if self.lease_bound {
            let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), SYSTEM);
            if let Ok(Ok(cm)) =
                tokio::time::timeout(READ_TIMEOUT, cms.get_opt(SERVING_CONFIGMAP)).await
            {
                seen.lease =
                    cm.and_then(|cm| ServingLease::from_data(&cm.data.unwrap_or_default()).ok());
            }
        }
        *self.seen.lock().expect("lock") = seen.clone();
        seen
    }

    /// Why the workload serves now, or `None`.
    pub async fn serving(&self) -> Option<String> {
        let mut why = Vec::new();
        let sidecar = *self.sidecar.lock().expect("lock");
        if let Some(port) = sidecar
            && let Ok(Ok((200, body))) = tokio::time::timeout(
                READ_TIMEOUT,
                counterweight_harness::http_get(port, "/ready"),
            )
            .await
        {
            why.push(format!("sidecar: {}", body.trim()));
        }
        let seen = self.observe().await;
        if !seen.pods.is_empty() || seen.endpoints > 0 {
            // The lease is judged at this instant, whenever it was read:
            // the sidecar's readiness does the same.
            let allowed = if self.lease_bound {
                let released = seen.lease.as_ref().map_or(0, |l| l.epoch);
                match allowance(seen.lease.as_ref(), &self.name, released, unix_ms()) {
                    Allowance::Serve { until_unix_ms, .. } => {
                        Some(format!("lease until {until_unix_ms}"))
                    }
                    Allowance::Hold(_) => None,
                }
            } else {
                Some("no lease".to_owned())
            };
            if let Some(lease) = allowed {
                why.push(format!(
                    "pods {:?} serving and Ready, {} ready endpoint(s), {lease}",
                    seen.pods, seen.endpoints
                ));
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// What the serving lease published through `client` (as the cluster's
/// lease sidecars read it) allows a pod of cluster `name` released in
/// `epoch` now; a lease that cannot be read is no lease.
pub async fn published_allowance(client: &kube::Client, name: &str, epoch: u64) -> Allowance {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    let data = cms
        .get_opt(SERVING_CONFIGMAP)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
        .unwrap_or_default();
    let lease = ServingLease::from_data(&data).ok();
    allowance(lease.as_ref(), name, epoch, unix_ms())
}

/// Ready endpoints in `slices`: the addresses their Services send traffic to.
pub fn ready_endpoints(slices: &[EndpointSlice]) -> usize {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count()
}

/// Rounds a monitor must have sampled before its verdict counts.
pub const MIN_ROUNDS: u64 = 10;

/// Samples every watched cluster's workload in rounds (every 10 ms at most).
pub struct WorkloadMonitor {
    violations: Arc<Mutex<Vec<String>>>,
    rounds: Arc<AtomicU64>,
    served: Arc<Mutex<std::collections::BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WorkloadMonitor {
    /// Starts sampling `clusters`.
    pub fn start(clusters: Vec<Watched>) -> Self {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(AtomicU64::new(0));
        let served = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (v, n, seen) = (violations.clone(), rounds.clone(), served.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round = 0usize;
            loop {
                tick.tick().await;
                round += 1;
                let k = clusters.len();
                let a = &clusters[round % k];
                let first = a.serving().await;
                let mut others = Vec::new();
                for b in clusters.iter().filter(|b| b.name != a.name) {
                    if let Some(why) = b.serving().await {
                        seen.lock().expect("lock").insert(b.name.clone());
                        others.push((b.name.clone(), why));
                    }
                }
                let last = a.serving().await;
                n.fetch_add(1, Ordering::Relaxed);
                if let (Some(f), Some(_)) = (&first, &last) {
                    seen.lock().expect("lock").insert(a.name.clone());
                    for (name, why) in others {
                        v.lock().expect("lock").push(format!(
                            "{} serving ({f}) while {name} served ({why})",
                            a.name
                        ));
                    }
                }
            }
        });
        Self {
            violations,
            rounds,
            served,
            task,
        }
    }

    /// How many samples so far showed two clusters serving.
    pub fn violations_so_far(&self) -> usize {
        self.violations.lock().expect("lock").len()
    }

    /// The clusters seen serving so far.
    pub fn served(&self) -> Vec<String> {
        self.served.lock().expect("lock").iter().cloned().collect()
    }

    /// Stops sampling and returns what it found: two clusters serving at
    /// once, one line per sample. A monitor that barely sampled proves
    /// nothing, so it first lets the rounds reach [`MIN_ROUNDS`] (rounds
    /// are slow while an API server hangs), and panics if they do not
    /// within a minute.
    pub async fn stop(self) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.rounds.load(Ordering::Relaxed) < MIN_ROUNDS
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        let rounds = self.rounds.load(Ordering::Relaxed);
        assert!(
            rounds >= MIN_ROUNDS,
            "the workload monitor must have sampled at least {MIN_ROUNDS} rounds ({rounds})"
        );
        std::mem::take(&mut *self.violations.lock().expect("lock"))
    }

    /// Stops sampling; panics on any violation or if it barely sampled.
    pub async fn finish(self) {
        let v = self.stop().await;
        assert!(
            v.is_empty(),
            "two clusters' workloads served at once ({} samples):\n{}",
            v.len(),
            v.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

impl Drop for WorkloadMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real lease sidecar: `counterweight-gate --hold` as a host process,
/// reading the cluster's serving lease through its admin kubeconfig, for a
/// pod released in `epoch`. It answers readiness on a loopback port and
/// keeps a lease file, as it does in a pod.
pub struct LeaseSidecar {
    /// The process; killed on drop.
    pub process: Process,
    /// Its readiness port on 127.0.0.1.
    pub port: u16,
    /// The lease file it keeps.
    pub lease_file: PathBuf,
}

impl LeaseSidecar {
    /// Starts it for a pod of `cluster` (named `name`) released in `epoch`,
    /// with its files under `dir`, and waits until it answers.
    pub async fn start(cluster: &Cluster, name: &str, epoch: u64, dir: &Path) -> Self {
        let dir = dir.join(format!("sidecar-{name}-{epoch}"));
        std::fs::create_dir_all(&dir).expect("sidecar dir");
        let epoch_file = dir.join("epoch");
        std::fs::write(&epoch_file, format!("{epoch}\n")).expect("epoch file");
        let lease_file = dir.join("lease");
        let port = free_port().expect("port");
        let args: Vec<String> = [
            "--hold",
            "--cluster",
            name,
            "--kubeconfig",
            &cluster.kubeconfig().display().to_string(),
            "--state-namespace",
            SYSTEM,
            "--epoch-file",
            &epoch_file.display().to_string(),
            "--lease-file",
            &lease_file.display().to_string(),
            "--ready-listen",
            &format!("127.0.0.1:{port}"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut process = Process::spawn(
            &format!("sidecar-{name}"),
            &workspace_bin("counterweight-gate", "COUNTERWEIGHT_GATE_BIN"),
            &args,
            &dir.join("sidecar.log"),
        )
        .expect("lease sidecar starts");
        process.tail_on_panic();
        let sidecar = Self {
            process,
            port,
            lease_file,
        };
        eventually(
            "the lease sidecar to answer",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async { Ok(sidecar.status().await.ok()) },
        )
        .await;
        sidecar
    }

    /// The HTTP status of its readiness endpoint.
    pub async fn status(&self) -> Result<u16, String> {
        counterweight_harness::http_get(self.port, "/ready")
            .await
            .map(|(status, _)| status)
    }

    /// Waits until its readiness answers 200 (the lease lets the pod
    /// serve); a timeout shows the lease file.
    pub async fn serving(&self, what: &str) {
        crate::eventually_explained(
            what,
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async { Ok((self.status().await == Ok(200)).then_some(())) },
            || async {
                format!(
                    "lease file: {:?}",
                    std::fs::read_to_string(&self.lease_file)
                )
            },
        )
        .await;
    }

    /// The lease file's content, parsed.
    pub fn lease(&self) -> Option<ServingLease> {
        let text = std::fs::read_to_string(&self.lease_file).ok()?;
        ServingLease::from_file(&text)
    }
}
