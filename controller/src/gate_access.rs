//! RBAC that lets the init-gates of opted-in namespaces read the state ConfigMap.
//!
//! The init-gate runs under its pod's own service account, in the
//! application's namespace, and must read exactly one object: the state
//! ConfigMap in the controller namespace. The controller therefore keeps:
//!
//! - one Role, [`GATE_ROLE`], in the controller namespace, granting `get`,
//!   `list` and `watch` on configmaps restricted by `resourceNames` to the
//!   state ConfigMap. `resourceNames` does restrict `list` and `watch` here:
//!   kube-apiserver attributes a list or watch whose field selector is
//!   `metadata.name=<name>` to that object name (`RequestInfo` in
//!   k8s.io/apiserver), so the gate's single-object watcher is allowed while
//!   listing or watching all ConfigMaps is refused. `list` is needed because
//!   kube-runtime's watcher starts with a list (with that field selector)
//!   before it watches; `get` serves the gate's FIG. 6 polling fallback.
//! - one RoleBinding per opted-in namespace (label
//!   `counterweight.dev/inject=enabled`), in the controller namespace, from
//!   that Role to the group `system:serviceaccounts:<ns>`, i.e. every service
//!   account of that namespace, since the webhook injects the gate into pods
//!   whatever account they run under. Bindings of namespaces that lose the
//!   label (or are being deleted) are removed.
//!
//! Keeping the grant per namespace (rather than one binding to all service
//! accounts in the cluster) means a namespace that has not opted in cannot
//! even see whether its cluster is active. The desired set is computed by
//! pure functions (`counterweight_core::workload::opted_in`, [`plan`]); [`reconcile_gate_access`] only
//! reads the cluster and applies the plan, idempotently, with server-side
//! apply.

use std::collections::{BTreeMap, BTreeSet};

use counterweight_core::names::{self, GATE_ROLE, gate_binding_name, gate_binding_namespace};
use counterweight_core::workload::{opted_in, opted_in_selector};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};

/// Standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on the objects this module manages.
pub const MANAGED_BY: &str = "counterweight-controller";
/// Label on a RoleBinding naming the namespace it grants access to.
pub const FOR_NAMESPACE_LABEL: &str = "counterweight.dev/gate-access-for";
/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "counterweight-controller";
/// The verbs the gate needs on the state ConfigMap (see the module docs).
pub const GATE_VERBS: [&str; 3] = ["get", "list", "watch"];

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// What went wrong while reconciling gate access.
#[derive(Debug, thiserror::Error)]
pub enum GateAccessError {
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// The call that failed.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

/// What one reconciliation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Namespaces whose binding was created or corrected.
    pub bound: Vec<String>,
    /// Namespaces whose binding was removed.
    pub unbound: Vec<String>,
}

/// The changes that bring the bindings to the desired set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Bindings to delete first, by name: namespaces no longer opted in, and
    /// bindings whose immutable `roleRef` differs (they are re-created).
    pub delete: Vec<String>,
    /// Bindings to create or correct with server-side apply.
    pub apply: Vec<RoleBinding>,
}

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

/// The Role granting read access to exactly the state ConfigMap.
pub fn gate_role(controller_ns: &str) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(GATE_ROLE.to_owned()),
            namespace: Some(controller_ns.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            resource_names: Some(vec![
                names::STATE_CONFIGMAP.to_owned(),
                counterweight_core::serving::SERVING_CONFIGMAP.to_owned(),
            ]),
            verbs: GATE_VERBS.iter().map(|v| (*v).to_owned()).collect(),
            ..Default::default()
        }]),
    }
}

/// The RoleBinding that lets every service account of `ns` use the gate Role.
pub fn binding_for(controller_ns: &str, ns: &str) -> RoleBinding {
    let mut labels = managed_labels();
    labels.insert(FOR_NAMESPACE_LABEL.to_owned(), ns.to_owned());
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(gate_binding_name(ns)),
            namespace: Some(controller_ns.to_owned()),
            labels: Some(labels),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some(RBAC_GROUP.to_owned()),
            kind: "Role".to_owned(),
            name: GATE_ROLE.to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some(RBAC_GROUP.to_owned()),
            kind: "Group".to_owned(),
            name: format!("system:serviceaccounts:{ns}"),
            namespace: None,
        }]),
    }
}

/// Compares the desired namespaces with the managed bindings that exist.
///
/// `existing` should be the bindings carrying the managed-by label; a binding
/// is kept only if it matches [`binding_for`] in name, role, subjects and
/// namespace label.
pub fn plan(controller_ns: &str, desired: &BTreeSet<String>, existing: &[RoleBinding]) -> Plan {
    let mut out = Plan::default();
    let mut current: BTreeMap<&str, &RoleBinding> = BTreeMap::new();
    for rb in existing {
        let Some(name) = rb.metadata.name.as_deref() else {
            continue;
        };
        let wanted_ns = gate_binding_namespace(name).filter(|ns| desired.contains(*ns));
        match wanted_ns {
            Some(_) => {
                current.insert(name, rb);
            }
            None => out.delete.push(name.to_owned()),
        }
    }
    for ns in desired {
        let want = binding_for(controller_ns, ns);
        let name = gate_binding_name(ns);
        match current.get(name.as_str()) {
            Some(have) if have.role_ref != want.role_ref => {
                // roleRef is immutable: delete, then create anew.
                out.delete.push(name);
                out.apply.push(want);
            }
            Some(have) if matches_binding(have, &want) => {}
            _ => out.apply.push(want),
        }
    }
    out
}

fn matches_binding(have: &RoleBinding, want: &RoleBinding) -> bool {
    let label = |rb: &RoleBinding| {
        rb.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(FOR_NAMESPACE_LABEL).cloned())
    };
    have.subjects == want.subjects && label(have) == label(want)
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> GateAccessError {
    let what = what.into();
    move |source| GateAccessError::Kube { what, source }
}

/// Brings the gate Role and the per-namespace RoleBindings in
/// `controller_ns` in line with the namespaces' opt-in labels.
///
/// Idempotent; call it whenever a namespace changes and periodically. The
/// controller's identity needs: `list` on namespaces (cluster scope; [`run`]
/// also `watch`es them); `patch` and `create` (server-side apply of a Role
/// that does not exist yet is authorized as both) on the Role [`GATE_ROLE`]
/// in `controller_ns`; `list`, `create`, `patch`, `delete` on rolebindings
/// there; and (so that RBAC lets it grant them) `get`, `list`, `watch` on
/// the state ConfigMap itself. See `manifests/base/gate/`.
pub async fn reconcile_gate_access(
    client: kube::Client,
    controller_ns: &str,
) -> Result<Summary, GateAccessError> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let roles: Api<Role> = Api::namespaced(client.clone(), controller_ns);
    roles
        .patch(GATE_ROLE, &apply, &Patch::Apply(gate_role(controller_ns)))
        .await
        .map_err(kube_err(format!(
            "applying Role {controller_ns}/{GATE_ROLE}"
        )))?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = opted_in_selector();
    let opted = namespaces
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("listing opted-in namespaces"))?;
    let desired = opted_in(&opted.items);

    let bindings: Api<RoleBinding> = Api::namespaced(client, controller_ns);
    let existing = bindings
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await
        .map_err(kube_err(format!("listing RoleBindings in {controller_ns}")))?;
    let plan = plan(controller_ns, &desired, &existing.items);

    let mut summary = Summary::default();
    for name in &plan.delete {
        match bindings.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            // Someone else removed it first; that is the goal anyway.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting RoleBinding {name}"))(e)),
        }
        if let Some(ns) = gate_binding_namespace(name)
            && !desired.contains(ns)
        {
            tracing::info!(namespace = ns, "revoked gate access");
            summary.unbound.push(ns.to_owned());
        }
    }
    for rb in plan.apply {
        let name = rb.metadata.name.clone().unwrap_or_default();
        bindings
            .patch(&name, &apply, &Patch::Apply(&rb))
            .await
            .map_err(kube_err(format!("applying RoleBinding {name}")))?;
        if let Some(ns) = gate_binding_namespace(&name) {
            tracing::info!(namespace = ns, "granted gate access");
            summary.bound.push(ns.to_owned());
        }
    }
    Ok(summary)
}

/// How often gate access is reconciled even without namespace events, to
/// repair bindings changed by hand.
const RESYNC: std::time::Duration = std::time::Duration::from_secs(300);

/// Keeps gate access in step with namespace labels until `shutdown`:
/// reconciles at start, after each batch of Namespace watch events, and
/// every five minutes. Failures are logged and retried; they never stop the
/// controller.
pub async fn run(
    client: kube::Client,
    controller_ns: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::runtime::{WatchStreamExt, watcher};

    let events = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let mut events = std::pin::pin!(events);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = resync.tick() => {}
            event = events.next() => match event {
                // Reconcile once per relist, and on every change after it.
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)) => {}
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "namespace watch failed; retrying");
                    continue;
                }
                None => return,
            },
        }
        match reconcile_gate_access(client.clone(), &controller_ns).await {
            Ok(summary) if !summary.bound.is_empty() || !summary.unbound.is_empty() => {
                tracing::info!(bound = ?summary.bound, unbound = ?summary.unbound, "gate access updated");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not reconcile gate access; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CNS: &str = "counterweight-system";

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn role_grants_read_on_exactly_the_state_and_serving_configmaps() {
        let role = gate_role(CNS);
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        let r = &rules[0];
        assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(r.resources.as_deref(), Some(&["configmaps".to_owned()][..]));
        assert_eq!(
            r.resource_names.as_deref(),
            Some(
                &[
                    counterweight_core::names::STATE_CONFIGMAP.to_owned(),
                    "counterweight-serving".to_owned()
                ][..]
            )
        );
        assert_eq!(r.verbs, ["get", "list", "watch"]);
    }

    #[test]
    fn binding_targets_the_namespace_service_account_group() {
        let rb = binding_for(CNS, "shop");
        assert_eq!(rb.metadata.name.as_deref(), Some("counterweight-gate-shop"));
        assert_eq!(rb.metadata.namespace.as_deref(), Some(CNS));
        assert_eq!(rb.role_ref.kind, "Role");
        assert_eq!(rb.role_ref.name, GATE_ROLE);
        let subjects = rb.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "Group");
        assert_eq!(subjects[0].name, "system:serviceaccounts:shop");
    }

    #[test]
    fn plan_creates_missing_and_deletes_unwanted() {
        let existing = [binding_for(CNS, "old"), binding_for(CNS, "keep")];
        let p = plan(CNS, &set(&["keep", "new"]), &existing);
        assert_eq!(p.delete, ["counterweight-gate-old"]);
        let applied: Vec<_> = p
            .apply
            .iter()
            .filter_map(|b| b.metadata.name.clone())
            .collect();
        assert_eq!(applied, ["counterweight-gate-new"]);
    }

    #[test]
    fn plan_is_empty_when_in_sync() {
        let existing = [binding_for(CNS, "a"), binding_for(CNS, "b")];
        assert_eq!(plan(CNS, &set(&["a", "b"]), &existing), Plan::default());
        assert_eq!(plan(CNS, &BTreeSet::new(), &[]), Plan::default());
    }

    #[test]
    fn plan_corrects_drift_and_recreates_on_role_change() {
        let mut widened = binding_for(CNS, "a");
        widened.subjects = Some(vec![Subject {
            api_group: Some(RBAC_GROUP.to_owned()),
            kind: "Group".to_owned(),
            name: "system:authenticated".to_owned(),
            namespace: None,
        }]);
        let mut rerouted = binding_for(CNS, "b");
        rerouted.role_ref.name = "cluster-admin".to_owned();
        let p = plan(CNS, &set(&["a", "b"]), &[widened, rerouted]);
        assert_eq!(p.delete, ["counterweight-gate-b"]);
        let applied: Vec<_> = p
            .apply
            .iter()
            .filter_map(|b| b.metadata.name.clone())
            .collect();
        assert_eq!(applied, ["counterweight-gate-a", "counterweight-gate-b"]);
        assert_eq!(p.apply[0], binding_for(CNS, "a"));
    }

    #[test]
    fn plan_ignores_unnamed_and_removes_foreign_managed_names() {
        let mut unnamed = binding_for(CNS, "x");
        unnamed.metadata.name = None;
        let mut stray = binding_for(CNS, "x");
        stray.metadata.name = Some("something-else".to_owned());
        let p = plan(CNS, &BTreeSet::new(), &[unnamed, stray]);
        assert_eq!(p.delete, ["something-else"]);
        assert!(p.apply.is_empty());
    }
}
