//! The workload rules: which namespaces opted in, which pods are service
//! pods, and what a service pod needs for the cluster's stance.
//!
//! One definition for every part that asks: the webhook's injector
//! ([`crate::inject`]) reads the opt-in rule and the roles from here; the
//! controller's serving effects, its gate access (RBAC for the gates of
//! opted-in namespaces) and its pod watch use the rules and the label
//! selectors below. Plain functions over `k8s-openapi` types, no client:
//! the controller lists and patches, and asks these what to do.
//!
//! - A namespace opts in with the label `counterweight.dev/inject=enabled`
//!   ([`namespace_opted_in`], [`opted_in`], [`opted_in_selector`]).
//! - A *service pod* is a pod of an opted-in namespace whose role label is
//!   `service` or absent and which carries the `counterweight.dev/serving`
//!   readiness gate, or which [`escaped`] the gate. Synchronization pods
//!   ([`SYNC_ROLES`]) are never touched ([`service_pod_selector`]).
//! - [`decide`] says what a service pod needs when the cluster serves or
//!   not; [`condition_patch`] is the status patch that carries it out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use crate::inject::GATE_CONTAINER;
use crate::names;

/// Pod role values that mark a synchronization pod (`counterweight.dev/role`;
/// never gated, never fenced, claims 6-7): they run on every cluster.
pub const SYNC_ROLES: [&str; 3] = ["ha", "database", "file-replication"];
/// Role value of an ordinary, gated service pod (also the default).
pub const SERVICE_ROLE: &str = "service";

/// Condition reason of a pod that serves because its cluster is active.
pub const ACTIVE_REASON: &str = "ClusterActive";
/// Condition reason of a pod that was serving and was stopped by a demotion;
/// it still has to be restarted. Survives controller restarts on the pod.
pub const STOPPED_REASON: &str = "ServingStopped";
/// Condition reason of a pod that is not serving because its cluster is
/// standby, and never served (nothing to restart).
pub const STANDBY_REASON: &str = "ClusterStandby";

/// Whether a namespace with `labels` opted in to the gate.
pub fn namespace_opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(names::INJECT_LABEL))
        .is_some_and(|v| v == names::INJECT_ENABLED)
}

/// The label selector of the opted-in namespaces.
pub fn opted_in_selector() -> String {
    format!("{}={}", names::INJECT_LABEL, names::INJECT_ENABLED)
}

/// Names of the opted-in namespaces among `namespaces`, leaving out those
/// being deleted.
pub fn opted_in(namespaces: &[Namespace]) -> BTreeSet<String> {
    namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter(|ns| namespace_opted_in(ns.metadata.labels.as_ref()))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect()
}

/// The label selector of the controller's pod watch and lists: every pod
/// but the synchronization pods (`notin` also matches pods without the
/// label, which are service pods).
pub fn service_pod_selector() -> String {
    format!("{} notin ({})", names::ROLE_LABEL, SYNC_ROLES.join(","))
}

/// The serving condition as found on a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingState {
    /// No condition yet.
    Absent,
    /// The pod serves.
    True,
    /// The pod does not serve; `restart_pending` if a demotion stopped it
    /// and it has not been restarted yet (reason [`STOPPED_REASON`]).
    False {
        /// The pod served before and still has to be restarted.
        restart_pending: bool,
    },
}

/// What to do with one pod for a desired serving state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAction {
    /// Nothing.
    Keep,
    /// Set the condition True.
    Serve,
    /// Set the condition False with the given reason.
    Stop(&'static str),
    /// Restart the pod (evict, then delete).
    Restart,
}

/// The serving condition of `pod`.
pub fn serving_state(pod: &Pod) -> ServingState {
    let cond = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == names::SERVING_CONDITION));
    match cond {
        None => ServingState::Absent,
        Some(c) if c.status == "True" => ServingState::True,
        Some(c) => ServingState::False {
            restart_pending: c.reason.as_deref() == Some(STOPPED_REASON),
        },
    }
}

/// Whether `pod` is a service pod Counterweight acts on: in an opted-in
/// namespace, role `service` or none, and either injected (it has the
/// readiness gate) or [`escaped`] (the webhook would gate it, but it was
/// created without passing it).
pub fn is_service_pod(pod: &Pod, opted_in: &BTreeSet<String>) -> bool {
    is_gated_service_pod(pod, opted_in) || escaped(pod, opted_in)
}

/// Whether `pod` carries the `counterweight.dev/serving` readiness gate:
/// the webhook injected it, so the condition decides whether it is Ready.
pub fn has_serving_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|gs| {
            gs.iter()
                .any(|g| g.condition_type == names::SERVING_CONDITION)
        })
}

/// Whether `pod` escaped its gate: a service pod of an opted-in namespace
/// without the readiness gate, which the webhook would inject if the pod
/// were created now ([`crate::inject::inject`] decides).
///
/// How it happens: the pod was made before the webhook was registered (an
/// install in one pass, found by the real-node install walk), before its
/// namespace was labelled, or while the webhook was briefly bypassed. Such
/// a pod starts its application at once and is Ready whatever the
/// cluster's state: on a standby it serves. Restarting it through its
/// controller (a ReplicaSet, a StatefulSet) brings it back through the
/// webhook, gated.
///
/// Read with the injector's default configuration, except that hostNetwork
/// pods never count: the webhook may be configured to skip them
/// (`--skip-host-network`), and a pod the webhook skips on purpose would
/// come back ungated at every restart. Pods the webhook skips for a reason
/// of the pod's own (opted out, a name conflict, a mirror pod) do not count
/// either.
pub fn escaped(pod: &Pod, opted_in: &BTreeSet<String>) -> bool {
    use crate::inject::{Decision, InjectorConfig, inject};
    let Some(ns) = pod.metadata.namespace.as_deref() else {
        return false;
    };
    if !opted_in.contains(ns) || has_serving_gate(pod) {
        return false;
    }
    let labels = BTreeMap::from([(
        names::INJECT_LABEL.to_owned(),
        names::INJECT_ENABLED.to_owned(),
    )]);
    let config = InjectorConfig {
        skip_host_network: true,
        ..InjectorConfig::default()
    };
    matches!(inject(pod, &labels, ns, &config), Decision::Inject(_))
}

/// [`is_service_pod`] for injected pods only.
fn is_gated_service_pod(pod: &Pod, opted_in: &BTreeSet<String>) -> bool {
    let in_opted_ns = pod
        .metadata
        .namespace
        .as_ref()
        .is_some_and(|ns| opted_in.contains(ns));
    let role = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::ROLE_LABEL));
    let service_role = match role {
        None => true,
        Some(r) => r == SERVICE_ROLE && !SYNC_ROLES.contains(&r.as_str()),
    };
    in_opted_ns && service_role && has_serving_gate(pod)
}

/// The epoch `pod`'s gate released it in, from the gate's termination
/// message (`crate::serving::release_message`) in its init
/// container status; `None` while the gate has not released it, or when
/// the message is not the gate's (an older gate, a fake node).
pub fn released_epoch(pod: &Pod) -> Option<u64> {
    pod.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == GATE_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .filter(|t| t.exit_code == 0)?
        .message
        .as_deref()
        .and_then(crate::serving::release_epoch)
}

/// What to do with a service pod when the cluster should serve (`desired`)
/// in `epoch` (0: not known), or not.
///
/// Active: Running pods (their gate has released) that do not serve yet are
/// made to serve; pending and terminating pods wait. Standby: a serving pod
/// is stopped with [`STOPPED_REASON`] (even a terminating one: it may still
/// take traffic until it is gone), a stopped one is restarted unless already
/// terminating, and a pod without the condition gets it False with
/// [`STANDBY_REASON`], so "not serving" is explicit.
///
/// A pod past its gate runs its application, so a pod released in an epoch
/// the cluster does not serve is restarted, back to its gate: on a standby
/// (a gate released by an active state that lasted milliseconds), and on an
/// active of a later epoch (its lease sidecar would hold it out of service
/// for good). [`crate::serving::must_restart`] is that rule.
pub fn decide(pod: &Pod, desired: bool, epoch: u64) -> PodAction {
    let state = serving_state(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    if !has_serving_gate(pod) {
        // An [`escaped`] pod: no condition holds it out of service, so on
        // a standby only a restart (back through the webhook) stops it.
        return if desired || terminating {
            PodAction::Keep
        } else {
            PodAction::Restart
        };
    }
    let active_epoch = desired.then_some(epoch).filter(|e| *e > 0);
    let stale_release = match released_epoch(pod) {
        None => false,
        // Active in an epoch not known: nothing to compare with.
        Some(_) if desired && active_epoch.is_none() => false,
        released => crate::serving::must_restart(released, active_epoch),
    };
    if desired {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        return if stale_release && !terminating {
            PodAction::Restart
        } else if running && !terminating && state != ServingState::True {
            PodAction::Serve
        } else {
            PodAction::Keep
        };
    }
    match state {
        ServingState::True => PodAction::Stop(STOPPED_REASON),
        ServingState::False {
            restart_pending: true,
        } if !terminating => PodAction::Restart,
        _ if stale_release && !terminating => PodAction::Restart,
        ServingState::Absent if !terminating => PodAction::Stop(STANDBY_REASON),
        _ => PodAction::Keep,
    }
}

/// The strategic-merge status patch that sets the serving condition. Pod
/// conditions merge by `type`, so other conditions are left alone; the uid
/// makes the patch fail on a namesake that replaced the pod.
pub fn condition_patch(uid: &str, serve: bool, reason: &str, now: &Time) -> Value {
    let message = if serve {
        "this cluster is active"
    } else if reason == STOPPED_REASON {
        "this cluster was demoted; the pod will be restarted to block at its gate"
    } else {
        "this cluster is standby"
    };
    json!({
        "metadata": {"uid": uid},
        "status": {"conditions": [{
            "type": names::SERVING_CONDITION,
            "status": if serve { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }]}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodReadinessGate, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn the_pod_selector_leaves_out_every_sync_role() {
        assert_eq!(
            service_pod_selector(),
            "counterweight.dev/role notin (ha,database,file-replication)"
        );
    }

    #[test]
    fn only_enabled_live_namespaces_opt_in() {
        let ns = |name: &str, label: Option<&str>, deleting: bool| Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: label
                    .map(|v| BTreeMap::from([(names::INJECT_LABEL.to_owned(), v.to_owned())])),
                deletion_timestamp: deleting
                    .then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            ..Default::default()
        };
        let all = [
            ns("a", Some("enabled"), false),
            ns("b", Some("disabled"), false),
            ns("c", None, false),
            ns("d", Some("enabled"), true),
            ns("e", Some("Enabled"), false),
        ];
        assert_eq!(opted_in(&all), BTreeSet::from(["a".to_owned()]));
        assert_eq!(opted_in_selector(), "counterweight.dev/inject=enabled");
    }

    fn pod(
        ns: &str,
        role: Option<&str>,
        gated: bool,
        phase: &str,
        cond: Option<(&str, &str)>,
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                uid: Some("u1".into()),
                labels: role
                    .map(|r| BTreeMap::from([(names::ROLE_LABEL.to_owned(), r.to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                readiness_gates: gated.then(|| {
                    vec![PodReadinessGate {
                        condition_type: names::SERVING_CONDITION.into(),
                    }]
                }),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: cond.map(|(status, reason)| {
                    vec![PodCondition {
                        type_: names::SERVING_CONDITION.into(),
                        status: status.into(),
                        reason: Some(reason.into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    /// `p` with its gate terminated: exit code and termination message.
    fn released(mut p: Pod, exit_code: i32, message: &str) -> Pod {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateTerminated, ContainerStatus,
        };
        if let Some(st) = p.status.as_mut() {
            st.init_container_statuses = Some(vec![ContainerStatus {
                name: GATE_CONTAINER.into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code,
                        message: Some(message.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        p
    }

    #[test]
    fn the_release_epoch_is_read_from_the_gates_termination_message() {
        let base = || pod("app", None, true, "Running", None);
        assert_eq!(released_epoch(&base()), None, "not released");
        let msg = crate::serving::release_message(4);
        assert_eq!(released_epoch(&released(base(), 0, &msg)), Some(4));
        assert_eq!(released_epoch(&released(base(), 1, &msg)), None, "failed");
        assert_eq!(released_epoch(&released(base(), 0, "log tail")), None);
    }

    #[test]
    fn a_pod_released_in_an_epoch_not_served_is_restarted() {
        let msg = crate::serving::release_message(2);
        let in_2 = |cond| released(pod("app", None, true, "Running", cond), 0, &msg);
        // Finding 7: the gate released it in a transient active epoch 2;
        // the cluster is standby now. It never served, yet its app runs.
        assert_eq!(decide(&in_2(None), false, 0), PodAction::Restart);
        assert_eq!(
            decide(&in_2(Some(("False", STANDBY_REASON))), false, 0),
            PodAction::Restart
        );
        // Still serving: the fence comes first, the restart after.
        assert_eq!(
            decide(&in_2(Some(("True", ACTIVE_REASON))), false, 0),
            PodAction::Stop(STOPPED_REASON)
        );
        // Active again, but in epoch 4: its sidecar would hold it for good.
        assert_eq!(decide(&in_2(None), true, 4), PodAction::Restart);
        // Active in its own epoch, or in an epoch not known: it serves.
        assert_eq!(decide(&in_2(None), true, 2), PodAction::Serve);
        assert_eq!(decide(&in_2(None), true, 0), PodAction::Serve);
        // A terminating one is left to finish.
        let mut gone = in_2(None);
        gone.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&gone, false, 0), PodAction::Keep);
    }

    fn opted() -> BTreeSet<String> {
        BTreeSet::from(["app".to_owned()])
    }

    #[test]
    fn only_injected_service_pods_in_opted_in_namespaces_are_touched() {
        let o = opted();
        assert!(is_service_pod(&pod("app", None, true, "Running", None), &o));
        assert!(is_service_pod(
            &pod("app", Some("service"), true, "Running", None),
            &o
        ));
        for sync in SYNC_ROLES {
            assert!(
                !is_service_pod(&pod("app", Some(sync), true, "Running", None), &o),
                "{sync}"
            );
        }
        assert!(!is_service_pod(
            &pod("app", Some("batch"), true, "Running", None),
            &o
        ));
        assert!(
            is_service_pod(&pod("app", None, false, "Running", None), &o),
            "not injected, but the webhook would: escaped"
        );
        assert!(
            !is_service_pod(&pod("other", None, true, "Running", None), &o),
            "not opted in"
        );
        assert!(
            !is_service_pod(&pod("other", None, false, "Running", None), &o),
            "not opted in"
        );
    }

    #[test]
    fn a_pod_escaped_its_gate_only_if_the_webhook_would_gate_it_now() {
        let o = opted();
        let bare = || pod("app", None, false, "Running", None);
        assert!(escaped(&bare(), &o));
        assert!(escaped(
            &pod("app", Some("service"), false, "Running", None),
            &o
        ));
        assert!(
            !escaped(&pod("app", None, true, "Running", None), &o),
            "gated"
        );
        assert!(
            !escaped(&pod("other", None, false, "Running", None), &o),
            "namespace not opted in"
        );
        for sync in SYNC_ROLES {
            assert!(
                !escaped(&pod("app", Some(sync), false, "Running", None), &o),
                "{sync}"
            );
        }
        let mut opted_out = bare();
        opted_out.metadata.annotations = Some(BTreeMap::from([(
            names::INJECT_ANNOTATION.to_owned(),
            names::INJECT_DISABLED.to_owned(),
        )]));
        assert!(!escaped(&opted_out, &o), "opted out");
        let mut host = bare();
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        assert!(
            !escaped(&host, &o),
            "hostNetwork: the webhook may skip those on purpose"
        );
        let mut has_gate = bare();
        if let Some(spec) = has_gate.spec.as_mut() {
            spec.init_containers = Some(vec![k8s_openapi::api::core::v1::Container {
                name: GATE_CONTAINER.into(),
                ..Default::default()
            }]);
        }
        assert!(!escaped(&has_gate, &o), "already injected");
    }

    #[test]
    fn an_escaped_pod_is_restarted_on_a_standby_and_left_serving_on_an_active() {
        let p = pod("app", None, false, "Running", None);
        assert_eq!(decide(&p, false, 0), PodAction::Restart);
        assert_eq!(decide(&p, true, 3), PodAction::Keep);
        let mut terminating = p.clone();
        terminating.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&terminating, false, 0), PodAction::Keep);
    }

    #[test]
    fn active_serves_running_pods_only() {
        assert_eq!(
            decide(&pod("app", None, true, "Running", None), true, 5),
            PodAction::Serve
        );
        assert_eq!(
            decide(
                &pod(
                    "app",
                    None,
                    true,
                    "Running",
                    Some(("False", STANDBY_REASON))
                ),
                true,
                5
            ),
            PodAction::Serve
        );
        assert_eq!(
            decide(
                &pod(
                    "app",
                    None,
                    true,
                    "Running",
                    Some(("False", STOPPED_REASON))
                ),
                true,
                5
            ),
            PodAction::Serve,
            "a stopped pod not yet restarted may serve again after a quick re-promotion"
        );
        assert_eq!(
            decide(
                &pod("app", None, true, "Running", Some(("True", ACTIVE_REASON))),
                true,
                5
            ),
            PodAction::Keep
        );
        assert_eq!(
            decide(&pod("app", None, true, "Pending", None), true, 5),
            PodAction::Keep,
            "still at the gate"
        );
        let mut terminating = pod("app", None, true, "Running", None);
        terminating.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&terminating, true, 5), PodAction::Keep);
    }

    #[test]
    fn standby_never_serves_and_restarts_what_served() {
        for phase in ["Pending", "Running"] {
            assert_eq!(
                decide(
                    &pod("app", None, true, phase, Some(("True", ACTIVE_REASON))),
                    false,
                    0
                ),
                PodAction::Stop(STOPPED_REASON)
            );
            assert_eq!(
                decide(&pod("app", None, true, phase, None), false, 0),
                PodAction::Stop(STANDBY_REASON)
            );
            assert_eq!(
                decide(
                    &pod("app", None, true, phase, Some(("False", STOPPED_REASON))),
                    false,
                    0
                ),
                PodAction::Restart,
                "a pod stopped by an interrupted demotion is restarted"
            );
            assert_eq!(
                decide(
                    &pod("app", None, true, phase, Some(("False", STANDBY_REASON))),
                    false,
                    0
                ),
                PodAction::Keep
            );
        }
        let mut terminating = pod("app", None, true, "Running", Some(("True", ACTIVE_REASON)));
        terminating.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(
            decide(&terminating, false, 0),
            PodAction::Stop(STOPPED_REASON),
            "a terminating pod may still take traffic: fence it too"
        );
        terminating.status = pod(
            "app",
            None,
            true,
            "Running",
            Some(("False", STOPPED_REASON)),
        )
        .status;
        assert_eq!(
            decide(&terminating, false, 0),
            PodAction::Keep,
            "already going away"
        );
    }

    #[test]
    fn condition_states_are_read_by_reason() {
        assert_eq!(
            serving_state(&pod("app", None, true, "Running", None)),
            ServingState::Absent
        );
        assert_eq!(
            serving_state(&pod(
                "app",
                None,
                true,
                "Running",
                Some(("True", ACTIVE_REASON))
            )),
            ServingState::True
        );
        assert_eq!(
            serving_state(&pod(
                "app",
                None,
                true,
                "Running",
                Some(("False", STOPPED_REASON))
            )),
            ServingState::False {
                restart_pending: true
            }
        );
        assert_eq!(
            serving_state(&pod(
                "app",
                None,
                true,
                "Running",
                Some(("False", STANDBY_REASON))
            )),
            ServingState::False {
                restart_pending: false
            }
        );
    }

    #[test]
    fn condition_patch_merges_by_type_and_pins_the_uid() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let p = condition_patch("u1", false, STOPPED_REASON, &now);
        assert_eq!(p["metadata"]["uid"], "u1");
        let c = &p["status"]["conditions"][0];
        assert_eq!(c["type"], names::SERVING_CONDITION);
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], STOPPED_REASON);
        assert_eq!(c["lastTransitionTime"], "1970-01-01T00:00:00Z");
        assert_eq!(
            condition_patch("u1", true, ACTIVE_REASON, &now)["status"]["conditions"][0]["status"],
            "True"
        );
    }
}
