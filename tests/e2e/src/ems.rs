//! The sample EMS of the HA end-to-end tests, on KWOK: service Deployments
//! `web` and `api` gated by the serving readiness gate, a `db`
//! synchronization Deployment, a Service in front of `web`, the policy, and
//! the reads the tests make of them.

use std::time::Duration;

use counterweight_core::health::{HealthReport, below_threshold};
use counterweight_core::names;
use counterweight_harness::Cluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodReadinessGate, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::fixtures::{EMS_POLICY, create_namespaces, deployment, install_policy, opt_in, service};
use crate::ha::{SYSTEM, record};
use crate::workload::{Watched, WorkloadMonitor};
use crate::{eventually, eventually_explained};

/// The sample EMS's namespace.
pub const APP: &str = "ems";

/// Namespaces, and with `with_workload` the sample EMS in an opted-in
/// namespace: service Deployments `web` and `api` whose pods carry the
/// serving readiness gate (as the webhook would inject it), a `database`
/// synchronization Deployment, and the policy.
pub async fn prepare(cluster: &Cluster, with_workload: bool) {
    let client = cluster.client();
    if !with_workload {
        create_namespaces(&client, &[SYSTEM, APP]).await;
        return;
    }
    create_namespaces(&client, &[SYSTEM]).await;
    workload(cluster).await;
    install_policy(&client, SYSTEM, EMS_POLICY).await;
}

/// The sample EMS's workload without its policy, for tests whose policy is
/// about something else but whose service pods must be watched: the
/// opted-in namespace, the service and synchronization Deployments, and the
/// Service in front of `web`.
pub async fn workload(cluster: &Cluster) {
    let client = cluster.client();
    opted_in_namespace(cluster, APP).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), APP);
    for (name, role) in [("web", "service"), ("api", "service"), ("db", "database")] {
        let mut d = deployment(name, 1, &[(names::ROLE_LABEL, role)]);
        if role == "service"
            && let Some(spec) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut())
        {
            spec.readiness_gates = Some(vec![PodReadinessGate {
                condition_type: names::SERVING_CONDITION.into(),
            }]);
        }
        deploys
            .create(&PostParams::default(), &d)
            .await
            .expect("deployment");
    }
    // A Service in front of web, so that its EndpointSlice shows who serves.
    let services: Api<Service> = Api::namespaced(client.clone(), APP);
    services
        .create(&PostParams::default(), &service("web"))
        .await
        .expect("web Service");
}

/// Creates namespace `ns` in `cluster`, opted in to the gate: its service
/// pods are the controller's to fence and make serve.
pub async fn opted_in_namespace(cluster: &Cluster, ns: &str) {
    let client = cluster.client();
    create_namespaces(&client, &[ns]).await;
    opt_in(&client, ns).await;
}

/// The workload monitor over the sample EMS's service pods of `clusters`,
/// named by `names` in the same order.
pub fn monitor(names: &[&str], clusters: &[Cluster]) -> WorkloadMonitor {
    WorkloadMonitor::start(
        names
            .iter()
            .zip(clusters)
            .map(|(n, c)| Watched::new(n, c.client(), APP))
            .collect(),
    )
}

/// `(name, uid, serving condition)` of the `app` pods in `cluster`.
pub async fn pods_of(cluster: &Cluster, app: &str) -> Vec<(String, String, Option<String>)> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), APP);
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let serving = p
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == names::SERVING_CONDITION)
                .map(|c| c.status);
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
                serving,
            )
        })
        .collect()
}

/// Waits until every `web` and `api` pod of `cluster` serves (condition
/// True); returns their uids.
pub async fn all_serving(cluster: &Cluster, what: &str) -> Vec<String> {
    eventually(
        what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let mut uids = Vec::new();
            for app in ["web", "api"] {
                let pods = pods_of(cluster, app).await;
                if pods.is_empty() || pods.iter().any(|p| p.2.as_deref() != Some("True")) {
                    return Err(format!("{app}: {pods:?}"));
                }
                uids.extend(pods.into_iter().map(|p| p.1));
            }
            Ok(Some(uids))
        },
    )
    .await
}

/// Waits until every service pod that served in `cluster` (`served`) is
/// gone, replaced by pods that do not serve.
pub async fn restarted_blocked(cluster: &Cluster, served: &[String], what: &str) {
    eventually(
        what,
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            for app in ["web", "api"] {
                let pods = pods_of(cluster, app).await;
                let ok = !pods.is_empty()
                    && pods
                        .iter()
                        .all(|p| !served.contains(&p.1) && p.2.as_deref() != Some("True"));
                if !ok {
                    return Err(format!("{app}: {pods:?}"));
                }
            }
            Ok(Some(()))
        },
    )
    .await;
}

/// Waits until the controller of `cluster` records a health score at or
/// above its threshold, read through core's [`HealthReport`]: the state a
/// test needs before it asks that cluster to take over. A timeout shows
/// the last report and the `web` pods' conditions.
pub async fn healthy(cluster: &Cluster, cms: &Api<ConfigMap>, what: &str) {
    let report = || async {
        record(cms)
            .await
            .get(counterweight_core::state::HEALTH_KEY)
            .map(|h| serde_json::from_str::<HealthReport>(h).map_err(|e| e.to_string()))
    };
    eventually_explained(
        what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            Ok(match report().await {
                Some(Ok(h)) => (!below_threshold(h.score, h.threshold)).then_some(()),
                Some(Err(e)) => return Err(format!("unreadable health record: {e}")),
                None => None,
            })
        },
        || async {
            let pods: Api<Pod> = Api::namespaced(cluster.client(), APP);
            let web: Vec<_> = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.metadata.name, p.metadata.deletion_timestamp, p.status))
                .collect();
            format!("\nlast report: {:?}\nweb pods: {web:?}", report().await)
        },
    )
    .await;
}

/// Uids of the `db` (synchronization) pods of `cluster`.
pub async fn db_uids(cluster: &Cluster) -> Vec<String> {
    pods_of(cluster, "db")
        .await
        .into_iter()
        .map(|p| p.1)
        .collect()
}

/// Marks every `web` pod of `cluster` Ready (or not), as a failing
/// readiness probe would: S falls by web's weight.
///
/// A pod deleted between the LIST and its patch is skipped: a demoted
/// cluster's controller evicts its service pods, so one can vanish at
/// any moment, and its replacement starts with a fresh status.
pub async fn set_web_ready(cluster: &Cluster, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), APP);
    let status = if ready { "True" } else { "False" };
    for p in pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("pods")
        .items
    {
        let name = p.metadata.name.expect("name");
        match pods
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(
                    json!({"status": {"conditions": [{"type": "Ready", "status": status}, {"type": "ContainersReady", "status": status}]}}),
                ),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::info!(pod = %name, "web pod gone before its status patch; skipped");
            }
            Err(e) => panic!("patch status of web pod {name}: {e}"),
        }
    }
}
