//! Weighted cluster health: Table 1 and FIG. 8 of the seed.
//!
//! Three pieces, all pure:
//! - [`Tally`] keeps, per policy component, how many selected pods exist and
//!   how many are up (containers ready, or waiting at the init-gate). It is updated one pod event at a time,
//!   so an evaluation costs O(components), not O(pods), however large the
//!   cluster.
//! - [`evaluate`] turns counts and active-check outcomes into s_j ∈ {0, 1}
//!   and S = Σ s_j · w_j, with an explanation of every term.
//! - [`RetryCounter`] is Table 1's loop body: S < D increments retryCount,
//!   S ≥ D resets it, and retryCount > K is the abnormal verdict (after which
//!   the counter starts again, as in Table 1).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Role, WEIGHT_SUM_TOLERANCE};

/// What health needs to know about one pod; small, so that a watch cache of
/// ten thousand pods stays cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Namespace of the pod.
    pub namespace: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Phase Running, condition ContainersReady True, and not being
    /// deleted. ContainersReady, not Ready: Ready also folds in the
    /// `counterweight.dev/serving` readiness gate, which is the controller's
    /// own output and False on every standby pod by design.
    pub running_ready: bool,
    /// Blocked in the init-gate (its init container is running) and not
    /// being deleted: the standby's way of being up (FIG. 3, "running but
    /// not in service").
    pub at_gate: bool,
    /// Released by the init-gate (it exited 0) and still starting: its
    /// containers not ready yet, not being deleted. A fresh active's pods
    /// pass through this for as long as the kubelet takes to start the
    /// lease sidecar and the app and to see them ready (seconds on a real
    /// node); it counts as up within the policy's `gateReleaseGrace`.
    pub released: bool,
    /// Pod IP, once assigned.
    pub ip: Option<String>,
}

impl PodFacts {
    /// Extracts the facts from a pod object.
    pub fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let alive = pod.metadata.deletion_timestamp.is_none();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "ContainersReady" && c.status == "True")
            });
        let gate = status
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|ics| {
                ics.iter()
                    .find(|c| c.name == crate::inject::GATE_CONTAINER)
                    .and_then(|c| c.state.as_ref())
            });
        let at_gate = gate.is_some_and(|st| st.running.is_some());
        let released = gate
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0);
        let up = running && ready;
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            running_ready: up && alive,
            at_gate: at_gate && alive && !up,
            released: released && alive && !up,
            ip: status.and_then(|s| s.pod_ip.clone()),
        }
    }
}

/// Whether the cluster's service pods are meant to serve, which decides
/// what "up" means for a pod held at the init-gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stance {
    /// Standby: a pod waiting at the gate is exactly what should be there.
    Standby,
    /// Serving (active) for this long: a pod still at the gate, or released
    /// by it and still starting, counts only within the policy's
    /// `gateReleaseGrace`.
    Serving {
        /// Milliseconds since serving began.
        for_ms: u64,
    },
}

/// Whether a component's active checks are run and judged under `stance`.
/// A service component's checks dial one of its Ready pods; none serves
/// while the cluster stands by (its pods are up by waiting at the gate,
/// [`pods_up`]), nor within the release grace of a fresh active before the
/// first is Ready. Judged then, a check with nothing to dial failed, the
/// component counted as down, and a standby whose service had a check
/// (the sample's `web`) never reached D: nobody was ever elected.
/// Synchronization components serve in every state: always judged.
pub fn runs_checks(role: Role, stance: Stance, grace_ms: u64, ready: u32) -> bool {
    match (role, stance) {
        (Role::Service, Stance::Standby) => false,
        (Role::Service, Stance::Serving { for_ms }) => for_ms >= grace_ms || ready > 0,
        _ => true,
    }
}

/// Pods of a component that count as up: the ready ones, plus those
/// waiting at the gate while standing by, plus, within the release grace
/// of an active, those at the gate and those it released that are still
/// starting. A released pod that is not ready is not up on a standby: a
/// standby's pods are up by waiting at the gate.
pub fn pods_up(ready: u32, at_gate: u32, released: u32, stance: Stance, grace_ms: u64) -> u32 {
    match stance {
        Stance::Standby => ready + at_gate,
        Stance::Serving { for_ms } if for_ms < grace_ms => ready + at_gate + released,
        Stance::Serving { .. } => ready,
    }
}

/// Per-component pod counts, maintained incrementally from pod events.
#[derive(Debug, Clone)]
pub struct Tally {
    // Selector and namespaces of each component, in policy order.
    components: Vec<(Vec<String>, crate::policy::Selector)>,
    counts: Vec<Counts>,
    // Each pod's current contribution, so an update can undo it exactly.
    pods: HashMap<String, Contribution>,
}

#[derive(Debug, Clone, Default)]
struct Counts {
    selected: u32,
    ready: u32,
    at_gate: u32,
    released: u32,
    // Ready pods with an IP, for active checks that dial a pod.
    ready_ips: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Contribution {
    components: Vec<usize>,
    ready: bool,
    at_gate: bool,
    released: bool,
    ip: Option<String>,
}

impl Tally {
    /// An empty tally for the components of `policy`.
    pub fn new(policy: &Policy) -> Self {
        Self {
            components: policy
                .components
                .iter()
                .map(|c| (c.namespaces.clone(), c.selector.clone()))
                .collect(),
            counts: vec![Counts::default(); policy.components.len()],
            pods: HashMap::new(),
        }
    }

    /// Records the current facts of the pod `key` (`namespace/name`),
    /// replacing what was known of it.
    pub fn upsert(&mut self, key: &str, facts: &PodFacts) {
        self.remove(key);
        let components: Vec<usize> = self
            .components
            .iter()
            .enumerate()
            .filter(|(_, (nss, sel))| nss.contains(&facts.namespace) && sel.matches(&facts.labels))
            .map(|(i, _)| i)
            .collect();
        if components.is_empty() {
            return;
        }
        for &i in &components {
            let c = &mut self.counts[i];
            c.selected += 1;
            if facts.running_ready {
                c.ready += 1;
                if let Some(ip) = &facts.ip {
                    c.ready_ips.insert(key.to_owned(), ip.clone());
                }
            } else if facts.at_gate {
                c.at_gate += 1;
            } else if facts.released {
                c.released += 1;
            }
        }
        self.pods.insert(
            key.to_owned(),
            Contribution {
                components,
                ready: facts.running_ready,
                at_gate: facts.at_gate && !facts.running_ready,
                released: facts.released && !facts.running_ready && !facts.at_gate,
                ip: facts.ip.clone(),
            },
        );
    }

    /// Forgets the pod `key`.
    pub fn remove(&mut self, key: &str) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        for i in old.components {
            let c = &mut self.counts[i];
            c.selected -= 1;
            if old.ready {
                c.ready -= 1;
                if old.ip.is_some() {
                    c.ready_ips.remove(key);
                }
            } else if old.at_gate {
                c.at_gate -= 1;
            } else if old.released {
                c.released -= 1;
            }
        }
    }

    /// Number of pods that count towards any component.
    pub fn tracked_pods(&self) -> usize {
        self.pods.len()
    }

    /// `(selected, ready)` of the component at `index` in policy order.
    pub fn counts(&self, index: usize) -> (u32, u32) {
        self.counts
            .get(index)
            .map(|c| (c.selected, c.ready))
            .unwrap_or((0, 0))
    }

    /// Pods of the component at `index` waiting at the init-gate (and not
    /// ready).
    pub fn at_gate(&self, index: usize) -> u32 {
        self.counts.get(index).map_or(0, |c| c.at_gate)
    }

    /// Pods of the component at `index` that the init-gate released and
    /// that are still starting (not ready, not at the gate).
    pub fn released(&self, index: usize) -> u32 {
        self.counts.get(index).map_or(0, |c| c.released)
    }

    /// The IP of some Running and Ready pod of the component, for checks
    /// without a fixed host. The choice is stable (lowest pod key).
    pub fn ready_ip(&self, index: usize) -> Option<&str> {
        self.counts
            .get(index)
            .and_then(|c| c.ready_ips.values().next())
            .map(String::as_str)
    }
}

/// Outcome of one active check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOutcome {
    /// What was checked, e.g. `tcp 10.0.0.5:8080`.
    pub check: String,
    /// `None` if it passed, else why it failed.
    pub error: Option<String>,
}

/// What was observed of one component, in policy order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Pods selected by the component.
    pub selected: u32,
    /// Of those, Running and Ready.
    pub ready: u32,
    /// Outcomes of the component's checks, one per check; `None` for a
    /// check that has not run yet.
    pub checks: Vec<Option<CheckOutcome>>,
}

/// Why a term of S is what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentHealth {
    /// Component name.
    pub name: String,
    /// w_j.
    pub weight: f64,
    /// s_j.
    pub up: bool,
    /// Running and Ready pods.
    pub ready: u32,
    /// minReady.
    pub required: u32,
    /// Pods selected.
    pub selected: u32,
    /// The first reason s_j is 0, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
    /// Active checks that passed, as they describe themselves (a
    /// replication check includes its lag).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<String>,
}

/// S and its terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Score {
    /// S = Σ s_j · w_j, in [0, 1].
    pub score: f64,
    /// Each term, in policy order.
    pub components: Vec<ComponentHealth>,
}

impl Score {
    /// Names of the components that are down, heaviest first: the ones that
    /// pulled S under D.
    pub fn down(&self) -> Vec<&ComponentHealth> {
        let mut down: Vec<&ComponentHealth> = self.components.iter().filter(|c| !c.up).collect();
        down.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.name.cmp(&b.name)));
        down
    }
}

/// Computes s_j for every component and S (FIG. 8 and Equation 1).
///
/// `observations` is in policy order; a missing entry counts as a component
/// with no pods. The sum runs in name order, so S is bit-for-bit the same
/// however the components are listed.
pub fn evaluate(policy: &Policy, observations: &[Observation]) -> Score {
    let empty = Observation::default();
    let components: Vec<ComponentHealth> = policy
        .components
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let obs = observations.get(i).unwrap_or(&empty);
            let failing = if obs.ready < c.min_ready {
                Some(if obs.selected == 0 {
                    "no pod matches the selector".to_owned()
                } else {
                    format!(
                        "{} of {} pods up, {} required",
                        obs.ready, obs.selected, c.min_ready
                    )
                })
            } else {
                c.checks.iter().enumerate().find_map(|(k, check)| {
                    match obs.checks.get(k).and_then(Option::as_ref) {
                        None => Some(format!("{} has not run yet", check.describe())),
                        Some(CheckOutcome { error: None, .. }) => None,
                        Some(CheckOutcome {
                            check,
                            error: Some(e),
                        }) => Some(format!("{check}: {e}")),
                    }
                })
            };
            ComponentHealth {
                name: c.name.clone(),
                weight: c.weight,
                up: failing.is_none(),
                ready: obs.ready,
                required: c.min_ready,
                selected: obs.selected,
                failing,
                passed: obs
                    .checks
                    .iter()
                    .flatten()
                    .filter(|o| o.error.is_none())
                    .map(|o| o.check.clone())
                    .collect(),
            }
        })
        .collect();
    let mut terms: Vec<(&str, f64)> = components
        .iter()
        .filter(|c| c.up)
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    terms.sort_by(|a, b| a.0.cmp(b.0));
    let score = if components.iter().all(|c| c.up) {
        // Weights sum to 1 only within rounding; a fully healthy cluster is 1.
        1.0
    } else {
        // A fold from +0.0, not `sum`: the empty f64 sum is -0.0, which
        // `clamp` keeps and which prints as "-0" when every component is
        // down.
        terms
            .iter()
            .fold(0.0_f64, |s, (_, w)| s + w)
            .clamp(0.0, 1.0)
    };
    Score { score, components }
}

/// Whether S is under D. Rounding of the weights must not turn S == D into
/// S < D, so the comparison allows the same tolerance as Equation 2.
pub fn below_threshold(score: f64, threshold: f64) -> bool {
    score + WEIGHT_SUM_TOLERANCE < threshold
}

/// Table 1's verdict for one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Verdict {
    /// S ≥ D.
    Healthy,
    /// S < D for `retry_count` ≤ K consecutive intervals.
    Degraded {
        /// Consecutive intervals below D so far.
        retry_count: u32,
    },
    /// S < D for K + 1 consecutive intervals: hand over.
    Abnormal {
        /// K + 1, the count that crossed K.
        retry_count: u32,
    },
}

impl Verdict {
    /// The retry count to show for this verdict.
    pub fn retry_count(self) -> u32 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Degraded { retry_count } | Verdict::Abnormal { retry_count } => retry_count,
        }
    }
}

/// Table 1's global `retryCount`.
///
/// A policy change keeps the count: a streak of bad intervals is still a
/// streak, and the new D and K apply from the next interval on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryCounter {
    count: u32,
}

impl RetryCounter {
    /// The current count.
    pub fn count(self) -> u32 {
        self.count
    }

    /// One pass of Table 1's loop, at the end of an interval.
    pub fn tick(&mut self, score: f64, threshold: f64, retries: u32) -> Verdict {
        if below_threshold(score, threshold) {
            self.count = self.count.saturating_add(1);
        } else {
            self.count = 0;
        }
        if self.count > retries {
            let crossed = self.count;
            self.count = 0;
            Verdict::Abnormal {
                retry_count: crossed,
            }
        } else if self.count > 0 {
            Verdict::Degraded {
                retry_count: self.count,
            }
        } else {
            Verdict::Healthy
        }
    }
}

/// The explanation the controller publishes in its state ConfigMap: every
/// number behind the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// S.
    pub score: f64,
    /// D.
    pub threshold: f64,
    /// K.
    pub retries: u32,
    /// Table 1's retryCount after this interval (K + 1 on the abnormal one).
    pub retry_count: u32,
    /// The verdict.
    pub verdict: Verdict,
    /// The terms of S.
    pub components: Vec<ComponentHealth>,
    /// Synchronization components (roles `database`, `file-replication`)
    /// that are down, with why: while any is, the data here is not current
    /// and this cluster must not take over, whatever S says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_behind: Vec<String>,
    /// How each synchronization component stands (its checks, with lag), for
    /// the data-loss estimate recorded with a transition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
}

impl HealthReport {
    /// Combines a score and a verdict under `policy`.
    pub fn new(policy: &Policy, score: Score, verdict: Verdict) -> Self {
        Self {
            score: score.score,
            threshold: policy.threshold,
            retries: policy.retries,
            retry_count: verdict.retry_count(),
            verdict,
            data: score
                .components
                .iter()
                .zip(&policy.components)
                .filter(|(_, c)| matches!(c.role, Role::Database | Role::FileReplication))
                .map(|(h, _)| match (&h.failing, h.passed.is_empty()) {
                    (Some(why), _) => format!("{}: {why}", h.name),
                    (None, true) => format!("{}: {} of {} pods up", h.name, h.ready, h.selected),
                    (None, false) => format!("{}: {}", h.name, h.passed.join("; ")),
                })
                .collect(),
            data_behind: score
                .components
                .iter()
                .zip(&policy.components)
                .filter(|(h, c)| matches!(c.role, Role::Database | Role::FileReplication) && !h.up)
                .map(|(h, _)| format!("{}: {}", h.name, h.failing.as_deref().unwrap_or("down")))
                .collect(),
            components: score.components,
        }
    }

    /// One line for an Event: S against D and the components pulling it down.
    pub fn summary(&self) -> String {
        let down: Vec<String> = {
            let score = Score {
                score: self.score,
                components: self.components.clone(),
            };
            score
                .down()
                .iter()
                .map(|c| {
                    format!(
                        "{} (w={}: {})",
                        c.name,
                        c.weight,
                        c.failing.as_deref().unwrap_or("down")
                    )
                })
                .collect()
        };
        let mut s = format!(
            "S={:.3} vs D={:.3}, retryCount {}/{}",
            self.score, self.threshold, self.retry_count, self.retries
        );
        if !down.is_empty() {
            s.push_str("; down: ");
            s.push_str(&down.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A policy of components `(name, weight)`, each selecting `app=<name>`
    /// in namespace `ems`, minReady 1, no checks.
    fn policy(threshold: f64, retries: u32, comps: &[(&str, f64)]) -> Policy {
        let mut yaml =
            format!("interval: 1s\nthreshold: {threshold}\nretries: {retries}\ncomponents:\n");
        for (name, w) in comps {
            yaml.push_str(&format!(
                "  - {{name: {name}, namespaces: [ems], selector: {{matchLabels: {{app: {name}}}}}, weight: {w}}}\n"
            ));
        }
        Policy::from_yaml(&yaml).unwrap()
    }

    /// A pod in `ems` with `app=web` and the given status parts.
    fn pod(
        phase: &str,
        conditions: &[(&str, &str)],
        gate_running: Option<bool>,
        deleting: bool,
    ) -> Pod {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
            PodCondition, PodStatus,
        };
        let mut p = Pod::default();
        p.metadata.namespace = Some("ems".into());
        p.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        let gate = gate_running.map(|running| ContainerStatus {
            name: crate::inject::GATE_CONTAINER.into(),
            state: Some(if running {
                ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }
            } else {
                ContainerState {
                    terminated: Some(ContainerStateTerminated::default()),
                    ..Default::default()
                }
            }),
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, st)| PodCondition {
                        type_: (*t).into(),
                        status: (*st).into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            init_container_statuses: gate.map(|g| vec![g]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn service_checks_run_only_where_a_service_pod_is_meant_to_serve() {
        let serving = |for_ms| Stance::Serving { for_ms };
        assert!(!runs_checks(Role::Service, Stance::Standby, 1000, 2));
        assert!(!runs_checks(Role::Service, serving(999), 1000, 0));
        assert!(runs_checks(Role::Service, serving(999), 1000, 1));
        assert!(runs_checks(Role::Service, serving(1000), 1000, 0));
        for role in [Role::Database, Role::FileReplication, Role::Ha] {
            assert!(runs_checks(role, Stance::Standby, 1000, 0));
            assert!(runs_checks(role, serving(0), 1000, 0));
        }
    }

    #[test]
    fn pod_facts_table() {
        // (phase, conditions, gate running?, deleting) -> (running_ready, at_gate)
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<bool>,
            bool,
            bool,
            bool,
        );
        let cases: &[Case] = &[
            // Serving pod on the active side.
            (
                "Running",
                &[("Ready", "True"), ("ContainersReady", "True")],
                Some(false),
                false,
                true,
                false,
            ),
            // Standby pod whose gate released earlier, serving condition
            // False: Ready is False by our own readiness gate, still up.
            (
                "Running",
                &[("Ready", "False"), ("ContainersReady", "True")],
                Some(false),
                false,
                true,
                false,
            ),
            // A crashed container: not up.
            (
                "Running",
                &[("Ready", "False"), ("ContainersReady", "False")],
                None,
                false,
                false,
                false,
            ),
            // Blocked in the gate on a standby: at the gate.
            (
                "Pending",
                &[("Initialized", "False")],
                Some(true),
                false,
                false,
                true,
            ),
            // Being deleted: neither.
            ("Pending", &[], Some(true), true, false, false),
            (
                "Running",
                &[("ContainersReady", "True")],
                None,
                true,
                false,
                false,
            ),
            // Pending without the gate (image pull, say): neither.
            ("Pending", &[], None, false, false, false),
        ];
        for (i, (phase, conds, gate, deleting, ready, at_gate)) in cases.iter().enumerate() {
            let f = PodFacts::of(&pod(phase, conds, *gate, *deleting));
            assert_eq!((f.running_ready, f.at_gate), (*ready, *at_gate), "case {i}");
        }
    }

    #[test]
    fn synchronization_components_that_are_down_make_the_data_behind() {
        let p = Policy::from_yaml(
            "interval: 1s\nthreshold: 0.5\nretries: 0\ncomponents:\n  - {name: web, namespaces: [ems], selector: {matchLabels: {app: web}}, weight: 0.8}\n  - {name: db, namespaces: [ems], selector: {matchLabels: {app: db}}, weight: 0.2, role: database}\n",
        )
        .unwrap();
        // S = 0.8 >= D, yet the database is down: eligible by score, not
        // by data.
        let r = HealthReport::new(&p, evaluate(&p, &obs(&[true, false])), Verdict::Healthy);
        assert_eq!(r.data_behind.len(), 1, "{r:?}");
        assert!(r.data_behind[0].starts_with("db: "), "{r:?}");
        assert_eq!(r.data.len(), 1);
        let r = HealthReport::new(&p, evaluate(&p, &obs(&[true, true])), Verdict::Healthy);
        assert!(r.data_behind.is_empty());
        assert_eq!(r.data, vec!["db: 1 of 1 pods up".to_owned()]);
    }

    #[test]
    fn pods_at_the_gate_count_on_standby_and_within_the_release_grace() {
        assert_eq!(pods_up(1, 2, 0, Stance::Standby, 1000), 3);
        assert_eq!(pods_up(1, 2, 0, Stance::Serving { for_ms: 999 }, 1000), 3);
        assert_eq!(pods_up(1, 2, 0, Stance::Serving { for_ms: 1000 }, 1000), 1);
        assert_eq!(pods_up(0, 0, 0, Stance::Standby, 0), 0);
    }

    #[test]
    fn pods_the_gate_released_count_while_they_start_within_the_release_grace() {
        // On a real kubelet the gate exits, then the lease sidecar and the
        // app start and turn ready: seconds in which a fresh active's pod
        // is neither at the gate nor ready. Counted as down, the new active
        // was abnormal within (K+1) intervals and handed back
        // (tests/e2e/tests/real_controller.rs).
        let starting = PodFacts::of(&pod(
            "Running",
            &[("ContainersReady", "False")],
            Some(false),
            false,
        ));
        assert!(starting.released && !starting.at_gate && !starting.running_ready);
        // Still Pending while the sidecar starts: released too.
        assert!(PodFacts::of(&pod("Pending", &[], Some(false), false)).released);
        // Ready, or going away: not starting.
        let ready = PodFacts::of(&pod(
            "Running",
            &[("ContainersReady", "True")],
            Some(false),
            false,
        ));
        assert!(!ready.released && ready.running_ready);
        assert!(!PodFacts::of(&pod("Running", &[], Some(false), true)).released);
        // A gate that failed released nothing.
        let mut failed = pod("Pending", &[], Some(false), false);
        if let Some(t) = failed
            .status
            .as_mut()
            .and_then(|s| s.init_container_statuses.as_mut())
            .and_then(|ics| ics[0].state.as_mut())
            .and_then(|st| st.terminated.as_mut())
        {
            t.exit_code = 75;
        }
        assert!(!PodFacts::of(&failed).released);

        let p = policy(0.5, 0, &[("web", 1.0)]);
        let mut t = Tally::new(&p);
        t.upsert("ems/web-1", &starting);
        assert_eq!((t.counts(0), t.at_gate(0), t.released(0)), ((1, 0), 0, 1));
        let up = |stance| pods_up(t.counts(0).1, t.at_gate(0), t.released(0), stance, 1000);
        assert_eq!(up(Stance::Serving { for_ms: 999 }), 1, "within the grace");
        assert_eq!(up(Stance::Serving { for_ms: 1000 }), 0, "after it");
        assert_eq!(up(Stance::Standby), 0, "a standby's pods wait at the gate");
        t.upsert("ems/web-1", &ready);
        assert_eq!((t.counts(0), t.released(0)), ((1, 1), 0));
        t.upsert("ems/web-1", &starting);
        t.remove("ems/web-1");
        assert_eq!((t.counts(0), t.released(0)), ((0, 0), 0));
    }

    #[test]
    fn tally_counts_pods_at_the_gate_and_forgets_them() {
        let p = policy(0.5, 0, &[("web", 1.0)]);
        let mut t = Tally::new(&p);
        let waiting = PodFacts::of(&pod("Pending", &[], Some(true), false));
        t.upsert("ems/web-1", &waiting);
        t.upsert("ems/web-2", &waiting);
        assert_eq!((t.counts(0), t.at_gate(0)), ((2, 0), 2));
        // Released and ready: moves from the gate to ready, not both.
        let ready = PodFacts::of(&pod(
            "Running",
            &[("ContainersReady", "True")],
            Some(false),
            false,
        ));
        t.upsert("ems/web-1", &ready);
        assert_eq!((t.counts(0), t.at_gate(0)), ((2, 1), 1));
        t.remove("ems/web-2");
        t.remove("ems/web-1");
        assert_eq!((t.counts(0), t.at_gate(0)), ((0, 0), 0));
    }

    fn obs(up: &[bool]) -> Vec<Observation> {
        up.iter()
            .map(|&u| Observation {
                selected: 1,
                ready: u32::from(u),
                checks: vec![],
            })
            .collect()
    }

    /// Table 1, step by step. Components web 0.5, db 0.3, files 0.2;
    /// D = 0.6, K = 2. Each row: which components are up, the expected S,
    /// and the verdict after the tick.
    #[test]
    fn table_1_step_by_step() {
        let p = policy(0.6, 2, &[("web", 0.5), ("db", 0.3), ("files", 0.2)]);
        let mut counter = RetryCounter::default();
        let rows: &[(&[bool], f64, Verdict)] = &[
            (&[true, true, true], 1.0, Verdict::Healthy),
            // web down: S = 0.5 < 0.6, counter 1 ≤ K.
            (
                &[false, true, true],
                0.5,
                Verdict::Degraded { retry_count: 1 },
            ),
            (
                &[false, true, true],
                0.5,
                Verdict::Degraded { retry_count: 2 },
            ),
            // A good interval resets the streak.
            (&[true, false, true], 0.7, Verdict::Healthy),
            (
                &[false, true, true],
                0.5,
                Verdict::Degraded { retry_count: 1 },
            ),
            (
                &[false, false, true],
                0.2,
                Verdict::Degraded { retry_count: 2 },
            ),
            // Third consecutive interval below D: retryCount 3 > K = 2.
            (
                &[false, false, true],
                0.2,
                Verdict::Abnormal { retry_count: 3 },
            ),
            // Table 1 resets the counter after the abnormal verdict.
            (
                &[false, false, true],
                0.2,
                Verdict::Degraded { retry_count: 1 },
            ),
        ];
        for (step, (up, s, verdict)) in rows.iter().enumerate() {
            let score = evaluate(&p, &obs(up));
            assert!(
                (score.score - s).abs() < 1e-12,
                "step {step}: S = {}",
                score.score
            );
            assert_eq!(
                counter.tick(score.score, p.threshold, p.retries),
                *verdict,
                "step {step}"
            );
        }
    }

    #[test]
    fn everything_down_is_zero_not_minus_zero() {
        // The empty f64 sum is -0.0, and S printed as "-0".
        let p = policy(0.8, 0, &[("web", 0.5), ("db", 0.3), ("files", 0.2)]);
        let s = evaluate(&p, &obs(&[false, false, false])).score;
        assert!(s == 0.0 && s.is_sign_positive(), "{s:?}");
        assert_eq!(format!("{s}"), "0");
    }

    #[test]
    fn s_equal_to_d_is_healthy() {
        // web + db = 0.5 + 0.3 = 0.8 in binary is 0.8000000000000000444;
        // the threshold 0.8 must be met, not missed by rounding.
        let p = policy(0.8, 0, &[("web", 0.5), ("db", 0.3), ("files", 0.2)]);
        let score = evaluate(&p, &obs(&[true, true, false]));
        let mut c = RetryCounter::default();
        assert_eq!(
            c.tick(score.score, p.threshold, p.retries),
            Verdict::Healthy
        );
        // And 0.1 + 0.2 (= 0.30000000000000004) against D = 0.3.
        let p = policy(0.3, 0, &[("a", 0.1), ("b", 0.2), ("c", 0.7)]);
        let score = evaluate(&p, &obs(&[true, true, false]));
        assert_eq!(
            c.tick(score.score, p.threshold, p.retries),
            Verdict::Healthy
        );
        // Threshold 1 is met by a fully healthy cluster whose weights round.
        let p = policy(1.0, 0, &[("a", 0.1), ("b", 0.2), ("c", 0.7)]);
        let score = evaluate(&p, &obs(&[true, true, true]));
        assert_eq!(score.score, 1.0);
        assert_eq!(
            c.tick(score.score, p.threshold, p.retries),
            Verdict::Healthy
        );
    }

    #[test]
    fn k_zero_means_the_first_bad_interval_is_abnormal() {
        let p = policy(0.6, 0, &[("web", 0.5), ("db", 0.5)]);
        let mut c = RetryCounter::default();
        let s = evaluate(&p, &obs(&[false, true])).score;
        assert_eq!(
            c.tick(s, p.threshold, p.retries),
            Verdict::Abnormal { retry_count: 1 }
        );
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn a_policy_change_mid_streak_keeps_the_count_and_applies_new_d_and_k() {
        let old = policy(0.6, 5, &[("web", 0.5), ("db", 0.5)]);
        let mut c = RetryCounter::default();
        let s = evaluate(&old, &obs(&[false, true])).score;
        assert_eq!(
            c.tick(s, old.threshold, old.retries),
            Verdict::Degraded { retry_count: 1 }
        );
        assert_eq!(
            c.tick(s, old.threshold, old.retries),
            Verdict::Degraded { retry_count: 2 }
        );
        // K lowered to 1 while the count is 2: the next bad interval is abnormal.
        let lower_k = policy(0.6, 1, &[("web", 0.5), ("db", 0.5)]);
        assert_eq!(
            c.tick(s, lower_k.threshold, lower_k.retries),
            Verdict::Abnormal { retry_count: 3 }
        );
        // D lowered under S: the streak ends at once.
        let mut c = RetryCounter::default();
        c.tick(s, old.threshold, old.retries);
        let lower_d = policy(0.4, 5, &[("web", 0.5), ("db", 0.5)]);
        assert_eq!(
            c.tick(s, lower_d.threshold, lower_d.retries),
            Verdict::Healthy
        );
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn a_component_that_selects_no_pods_is_down_and_says_why() {
        let p = policy(0.6, 0, &[("web", 0.5), ("db", 0.5)]);
        let score = evaluate(
            &p,
            &[
                Observation::default(),
                Observation {
                    selected: 1,
                    ready: 1,
                    checks: vec![],
                },
            ],
        );
        assert_eq!(score.score, 0.5);
        assert_eq!(
            score.components[0].failing.as_deref(),
            Some("no pod matches the selector")
        );
        // Missing observations count as no pods too.
        assert_eq!(evaluate(&p, &[]).score, 0.0);
    }

    #[test]
    fn failing_or_pending_checks_take_a_component_down() {
        let yaml = r#"
interval: 1s
threshold: 0.5
retries: 0
components:
  - name: db
    namespaces: [ems]
    selector: {matchLabels: {app: db}}
    weight: 1
    checks:
      - tcp: {port: 5432}
      - postgres: {host: 127.0.0.1, secretRef: {name: cred}}
"#;
        let p = Policy::from_yaml(yaml).unwrap();
        let ok = |c: &str| {
            Some(CheckOutcome {
                check: c.into(),
                error: None,
            })
        };
        let with = |checks| {
            vec![Observation {
                selected: 2,
                ready: 2,
                checks,
            }]
        };
        assert!(evaluate(&p, &with(vec![ok("tcp"), ok("pg")])).components[0].up);
        let pending = evaluate(&p, &with(vec![ok("tcp")]));
        assert!(
            pending.components[0]
                .failing
                .as_deref()
                .unwrap()
                .contains("has not run yet")
        );
        let failed = evaluate(
            &p,
            &with(vec![
                ok("tcp"),
                Some(CheckOutcome {
                    check: "pg".into(),
                    error: Some("connection refused".into()),
                }),
            ]),
        );
        assert_eq!(failed.score, 0.0);
        assert_eq!(
            failed.components[0].failing.as_deref(),
            Some("pg: connection refused")
        );
    }

    #[test]
    fn min_ready_counts_running_and_ready_pods() {
        let yaml = "interval: 1s\nthreshold: 0.5\nretries: 0\ncomponents:\n  - {name: web, namespaces: [ems], selector: {matchLabels: {app: web}}, weight: 1, minReady: 2}\n";
        let p = Policy::from_yaml(yaml).unwrap();
        let one = evaluate(
            &p,
            &[Observation {
                selected: 3,
                ready: 1,
                checks: vec![],
            }],
        );
        assert_eq!(
            one.components[0].failing.as_deref(),
            Some("1 of 3 pods up, 2 required")
        );
        assert!(
            evaluate(
                &p,
                &[Observation {
                    selected: 3,
                    ready: 2,
                    checks: vec![]
                }]
            )
            .components[0]
                .up
        );
    }

    #[test]
    fn report_summary_names_the_components_that_pulled_s_down() {
        let p = policy(0.6, 2, &[("web", 0.5), ("db", 0.3), ("files", 0.2)]);
        let score = evaluate(&p, &obs(&[false, true, false]));
        let report = HealthReport::new(&p, score, Verdict::Abnormal { retry_count: 3 });
        let s = report.summary();
        assert!(
            s.starts_with("S=0.300 vs D=0.600, retryCount 3/2; down: web (w=0.5"),
            "{s}"
        );
        assert!(
            s.find("web").unwrap() < s.find("files").unwrap(),
            "heaviest first: {s}"
        );
    }

    fn facts(ns: &str, app: &str, ready: bool, ip: &str) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            running_ready: ready,
            at_gate: false,
            released: false,
            ip: Some(ip.into()),
        }
    }

    #[test]
    fn tally_follows_pod_events() {
        let p = policy(0.5, 0, &[("web", 0.5), ("db", 0.5)]);
        let mut t = Tally::new(&p);
        t.upsert("ems/web-1", &facts("ems", "web", true, "10.0.0.1"));
        t.upsert("ems/web-2", &facts("ems", "web", false, "10.0.0.2"));
        t.upsert("other/web-3", &facts("other", "web", true, "10.0.0.3"));
        t.upsert("ems/cache-1", &facts("ems", "cache", true, "10.0.0.4"));
        assert_eq!(t.counts(0), (2, 1));
        assert_eq!(t.counts(1), (0, 0));
        assert_eq!(t.ready_ip(0), Some("10.0.0.1"));
        assert_eq!(t.tracked_pods(), 2);
        // Readiness flips and label changes move the pod between counts.
        t.upsert("ems/web-1", &facts("ems", "web", false, "10.0.0.1"));
        assert_eq!(t.counts(0), (2, 0));
        assert_eq!(t.ready_ip(0), None);
        t.upsert("ems/web-2", &facts("ems", "db", true, "10.0.0.2"));
        assert_eq!(t.counts(0), (1, 0));
        assert_eq!(t.counts(1), (1, 1));
        t.remove("ems/web-2");
        t.remove("ems/web-2");
        assert_eq!(t.counts(1), (0, 0));
        assert_eq!(t.counts(7), (0, 0));
    }

    /// Random policies: 1..6 components with weights normalised to sum 1.
    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            prop::collection::vec(1u32..100, 1..6),
            0.0f64..=1.0,
            0u32..4,
        )
            .prop_map(|(raw, d, k)| {
                let total: u32 = raw.iter().sum();
                let mut comps: Vec<(String, f64)> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("c{i}"), f64::from(*r) / f64::from(total)))
                    .collect();
                // Make the sum exactly representable-close by fixing the last weight.
                let rest: f64 = comps[..comps.len() - 1].iter().map(|c| c.1).sum();
                if let Some(last) = comps.last_mut() {
                    last.1 = (1.0 - rest).max(f64::MIN_POSITIVE);
                }
                let named: Vec<(&str, f64)> = comps.iter().map(|(n, w)| (n.as_str(), *w)).collect();
                policy(d, k, &named)
            })
    }

    proptest! {
        #[test]
        fn s_stays_in_unit_interval(p in arb_policy(), ups in prop::collection::vec(any::<bool>(), 6)) {
            let s = evaluate(&p, &obs(&ups[..p.components.len()])).score;
            prop_assert!((0.0..=1.0).contains(&s));
        }

        #[test]
        fn s_is_monotone_in_each_component(
            p in arb_policy(),
            ups in prop::collection::vec(any::<bool>(), 6),
            j in 0usize..6,
        ) {
            let n = p.components.len();
            let j = j % n;
            let mut down = ups[..n].to_vec();
            down[j] = false;
            let mut up = down.clone();
            up[j] = true;
            let s_down = evaluate(&p, &obs(&down)).score;
            let s_up = evaluate(&p, &obs(&up)).score;
            prop_assert!(s_up >= s_down, "s_up={s_up} s_down={s_down}");
            // And the verdicts agree: turning a component up never makes a
            // healthy interval unhealthy.
            prop_assert!(!below_threshold(s_up, p.threshold) || below_threshold(s_down, p.threshold));
        }

        #[test]
        fn s_does_not_depend_on_component_order(
            p in arb_policy(),
            ups in prop::collection::vec(any::<bool>(), 6),
            seed in any::<u64>(),
        ) {
            let n = p.components.len();
            let ups = &ups[..n];
            let mut order: Vec<usize> = (0..n).collect();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..n).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut shuffled = p.clone();
            shuffled.components = order.iter().map(|&i| p.components[i].clone()).collect();
            let shuffled_ups: Vec<bool> = order.iter().map(|&i| ups[i]).collect();
            let a = evaluate(&p, &obs(ups));
            let b = evaluate(&shuffled, &obs(&shuffled_ups));
            prop_assert_eq!(a.score.to_bits(), b.score.to_bits());
        }

        #[test]
        fn tally_matches_a_full_recount(
            events in prop::collection::vec((0usize..8, 0usize..3, any::<bool>(), any::<bool>()), 0..60),
        ) {
            let p = policy(0.5, 0, &[("web", 0.5), ("db", 0.5)]);
            let apps = ["web", "db", "cache"];
            let mut t = Tally::new(&p);
            let mut truth: BTreeMap<String, PodFacts> = BTreeMap::new();
            for (pod, app, ready, delete) in events {
                let key = format!("ems/p{pod}");
                if delete {
                    t.remove(&key);
                    truth.remove(&key);
                } else {
                    let f = facts("ems", apps[app], ready, &format!("10.0.0.{pod}"));
                    t.upsert(&key, &f);
                    truth.insert(key, f);
                }
            }
            for (i, c) in p.components.iter().enumerate() {
                let selected = truth.values().filter(|f| c.selector.matches(&f.labels)).count() as u32;
                let ready = truth.values().filter(|f| c.selector.matches(&f.labels) && f.running_ready).count() as u32;
                prop_assert_eq!(t.counts(i), (selected, ready));
            }
        }
    }
}
