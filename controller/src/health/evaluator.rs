//! The health loop's state apart from its I/O: the policy in force, the
//! incremental pod tally fed by the watch, Table 1's retry counter and the
//! last check outcomes; and what a pod is stripped to before it enters the
//! cache.

use std::collections::HashMap;
use std::sync::Arc;

use counterweight_core::health::{CheckOutcome, PodFacts, RetryCounter, Tally, Verdict};
use counterweight_core::policy::Policy;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::Event as WEvent;

use crate::checks::PgCredentials;

/// Mutable state of the loop, apart from its I/O handles.
pub(super) struct Evaluator {
    pub(super) policy: Option<Arc<Policy>>,
    pub(super) policy_version: String,
    pub(super) tally: Option<Tally>,
    // Pods seen during a relist, swapped in at InitDone.
    pub(super) relist: Option<Vec<(String, PodFacts)>>,
    pub(super) synced: bool,
    pub(super) counter: RetryCounter,
    pub(super) last_verdict: Verdict,
    pub(super) checks: Vec<Vec<Option<CheckOutcome>>>,
    pub(super) credentials: HashMap<String, PgCredentials>,
    pub(super) published_health: Option<String>,
    pub(super) published_policy: Option<String>,
}

impl Evaluator {
    /// No policy yet, nothing synced, healthy until told otherwise.
    pub(super) fn new() -> Self {
        Self {
            policy: None,
            policy_version: String::new(),
            tally: None,
            relist: None,
            synced: false,
            counter: RetryCounter::default(),
            last_verdict: Verdict::Healthy,
            checks: Vec::new(),
            credentials: HashMap::new(),
            published_health: None,
            published_policy: None,
        }
    }

    /// Applies one pod watch event; returns whether health may have changed.
    pub(super) fn on_pod_event(&mut self, event: WEvent<Pod>) -> bool {
        match event {
            WEvent::Init => {
                self.relist = Some(Vec::new());
                false
            }
            WEvent::InitApply(pod) => {
                if let Some(buf) = &mut self.relist {
                    buf.push((pod_key(&pod), PodFacts::of(&pod)));
                }
                false
            }
            WEvent::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                if let Some(policy) = &self.policy {
                    let mut tally = Tally::new(policy);
                    for (key, facts) in &pods {
                        tally.upsert(key, facts);
                    }
                    self.tally = Some(tally);
                }
                self.synced = true;
                true
            }
            WEvent::Apply(pod) => {
                if let Some(t) = &mut self.tally {
                    t.upsert(&pod_key(&pod), &PodFacts::of(&pod));
                }
                self.synced
            }
            WEvent::Delete(pod) => {
                if let Some(t) = &mut self.tally {
                    t.remove(&pod_key(&pod));
                }
                self.synced
            }
        }
    }

    /// Puts a validated policy in force, recounting pods from the cache.
    pub(super) fn install(&mut self, policy: Arc<Policy>, version: String, pod_store: &Store<Pod>) {
        let mut tally = Tally::new(&policy);
        for pod in pod_store.state() {
            tally.upsert(&pod_key(&pod), &PodFacts::of(&pod));
        }
        // Keep check results of components whose checks did not change.
        let old = self.policy.as_ref();
        self.checks = policy
            .components
            .iter()
            .map(|c| {
                let same = old
                    .and_then(|o| o.component(&c.name))
                    .is_some_and(|o| o.checks == c.checks);
                let old_index =
                    old.and_then(|o| o.components.iter().position(|x| x.name == c.name));
                match (same, old_index) {
                    (true, Some(i)) => self.checks.get(i).cloned().unwrap_or_default(),
                    _ => vec![None; c.checks.len()],
                }
            })
            .collect();
        self.tally = Some(tally);
        self.policy = Some(policy);
        self.policy_version = version;
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Drops everything health does not read, before the pod enters the cache:
/// at 10,000 pods the full objects would cost hundreds of megabytes.
pub(super) fn strip_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    pod.spec = None;
    if let Some(status) = &mut pod.status {
        // Only what `PodFacts::of` reads: ContainersReady, and whether the
        // init-gate is running or exited (and its exit code).
        let conditions = status.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "ContainersReady")
                .collect()
        });
        let gate = status.init_container_statuses.take().map(|ics| {
            ics.into_iter()
                .filter(|c| c.name == counterweight_core::inject::GATE_CONTAINER)
                .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                    name: c.name,
                    state: c
                        .state
                        .map(|st| k8s_openapi::api::core::v1::ContainerState {
                            running: st.running,
                            terminated: st.terminated.map(|t| {
                                k8s_openapi::api::core::v1::ContainerStateTerminated {
                                    exit_code: t.exit_code,
                                    ..Default::default()
                                }
                            }),
                            ..Default::default()
                        }),
                    ..Default::default()
                })
                .collect()
        });
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            conditions,
            init_container_statuses: gate,
            ..Default::default()
        };
    }
}
