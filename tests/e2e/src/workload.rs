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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use counterweight_core::names;
use counterweight_core::serving::{Allowance, SERVING_CONFIGMAP, ServingLease, allowance};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::ha::SYSTEM;

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
        }
    }

    /// Registers a lease sidecar process answering on `port`.
    pub fn set_sidecar(&self, port: u16) {
        *self.sidecar.lock().expect("lock") = Some(port);
    }

    /// Why the workload serves now, or `None`.
    pub async fn serving(&self) -> Option<String> {
        let mut why = Vec::new();
        let sidecar = *self.sidecar.lock().expect("lock");
        if let Some(port) = sidecar
            && let Ok((200, body)) = counterweight_harness::http_get(port, "/ready").await
        {
            why.push(format!("sidecar: {}", body.trim()));
        }
        let mut pods_serve = Vec::new();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = pods
            .list(&ListParams::default().labels(&format!("{}=service", names::ROLE_LABEL)))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for p in list {
            let conds = p.status.and_then(|s| s.conditions).unwrap_or_default();
            let is = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
            if is(names::SERVING_CONDITION) && is("Ready") {
                pods_serve.push(p.metadata.name.unwrap_or_default());
            }
        }
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let ready_endpoints = slices
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        if !pods_serve.is_empty() || ready_endpoints > 0 {
            let allowed = if self.lease_bound {
                let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), SYSTEM);
                let lease = cms
                    .get_opt(SERVING_CONFIGMAP)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|cm| ServingLease::from_data(&cm.data.unwrap_or_default()).ok());
                let released = lease.as_ref().map_or(0, |l| l.epoch);
                match allowance(lease.as_ref(), &self.name, released, unix_ms()) {
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
                    "pods {pods_serve:?} serving and Ready, {ready_endpoints} ready endpoint(s), {lease}"
                ));
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

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

    /// The clusters seen serving so far.
    pub fn served(&self) -> Vec<String> {
        self.served.lock().expect("lock").iter().cloned().collect()
    }

    /// Stops sampling; panics on any violation or if it barely sampled.
    pub fn finish(self) {
        self.task.abort();
        let rounds = self.rounds.load(Ordering::Relaxed);
        assert!(
            rounds > 10,
            "the workload monitor must have sampled ({rounds})"
        );
        let v = self.violations.lock().expect("lock");
        assert!(
            v.is_empty(),
            "two clusters' workloads served at once ({} samples):\n{}",
            v.len(),
            v.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}
