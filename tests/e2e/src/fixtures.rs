//! Objects and plumbing the end-to-end tests share: namespaces, KWOK-run
//! Deployments, and an in-process router between controllers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use counterweight_controller::ha_loop::Outbox;
use counterweight_core::ha::Envelope;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, Namespace, Pod, PodSpec, PodTemplateSpec, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::mpsc;

use crate::eventually;

/// Metadata with just a name.
pub fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A Deployment of `replicas` pods selected by `app=<name>`, carrying
/// `extra_labels` too, with one container that KWOK "runs".
pub fn deployment(name: &str, replicas: i32, extra_labels: &[(&str, &str)]) -> Deployment {
    let selector = BTreeMap::from([("app".to_owned(), name.to_owned())]);
    let mut labels = selector.clone();
    labels.extend(
        extra_labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Deployment {
        metadata: meta(name),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "main".into(),
                        image: Some(format!("registry.invalid/{name}:1")),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `pod` has the condition `type_` True.
pub fn condition_true(pod: &k8s_openapi::api::core::v1::Pod, type_: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// The state of `pod`'s first init container (`init`) or first app container.
fn first_state(pod: &Pod, init: bool) -> Option<&ContainerState> {
    let status = pod.status.as_ref()?;
    let all = if init {
        status.init_container_statuses.as_ref()
    } else {
        status.container_statuses.as_ref()
    };
    all?.first()?.state.as_ref()
}

/// Whether `pod`'s first init container is running (a gate holding it).
pub fn init_running(pod: &Pod) -> bool {
    first_state(pod, true).is_some_and(|s| s.running.is_some())
}

/// Whether `pod`'s first app container is running.
pub fn app_running(pod: &Pod) -> bool {
    first_state(pod, false).is_some_and(|s| s.running.is_some())
}

/// Why `pod`'s first app container waits (`PodInitializing` while an init
/// container holds it), if it does.
pub fn app_waiting_reason(pod: &Pod) -> Option<String> {
    first_state(pod, false)?.waiting.as_ref()?.reason.clone()
}

/// Sets `pod`'s serving condition True with the controller's own patch
/// (`counterweight_core::workload::condition_patch`), as an active
/// cluster's controller does.
pub async fn serve(pods: &Api<Pod>, pod: &Pod) {
    use counterweight_core::workload::condition_patch;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::{Patch, PatchParams};
    let name = pod.metadata.name.as_deref().expect("pod name");
    let uid = pod.metadata.uid.as_deref().expect("pod uid");
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Strategic(condition_patch(uid, true, "Active", &now)),
    )
    .await
    .expect("serving condition");
}

/// What the controller keeps for the gates of `app_ns` (the gates' Role in
/// the system namespace and its binding for `app_ns`), and a Service
/// `service` in `app_ns` (see [`service`]).
pub async fn gate_access_and_service(client: &kube::Client, app_ns: &str, service_name: &str) {
    use counterweight_controller::gate_access::{binding_for, gate_role};
    use counterweight_core::names::SYSTEM_NAMESPACE;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    Api::<Role>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create(&PostParams::default(), &gate_role(SYSTEM_NAMESPACE))
        .await
        .expect("gate Role");
    Api::<RoleBinding>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create(
            &PostParams::default(),
            &binding_for(SYSTEM_NAMESPACE, app_ns),
        )
        .await
        .expect("gate RoleBinding");
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), app_ns)
        .create(&PostParams::default(), &service(service_name))
        .await
        .expect("Service");
}

/// Writes the serving lease of `cluster` in `epoch` until `until_unix_ms`
/// into `cms` (the system namespace's ConfigMaps) as the controller does;
/// the injected lease sidecars read it.
pub async fn write_serving_lease(
    cms: &Api<ConfigMap>,
    cluster: &str,
    epoch: u64,
    until_unix_ms: u64,
) {
    use counterweight_core::serving::{SERVING_CONFIGMAP, ServingLease};
    use kube::api::{Patch, PatchParams};
    let lease = ServingLease {
        cluster: cluster.into(),
        epoch,
        until_unix_ms,
    };
    cms.patch(
        SERVING_CONFIGMAP,
        &PatchParams::apply("counterweight-e2e").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": SERVING_CONFIGMAP},
            "data": lease.to_data(),
        })),
    )
    .await
    .expect("serving lease");
}

/// A Service `name` on port 80 in front of the pods labelled `app=<name>`.
pub fn service(name: &str) -> k8s_openapi::api::core::v1::Service {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    k8s_openapi::api::core::v1::Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            selector: Some([("app".to_owned(), name.to_owned())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Opts `ns` in to injection (the namespace label).
pub async fn opt_in(client: &kube::Client, ns: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {counterweight_core::names::INJECT_LABEL: counterweight_core::names::INJECT_ENABLED}}}),
            ),
        )
        .await
        .expect("opt the namespace in");
}

/// The names of `pod`'s init containers, in the order of their statuses.
pub fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.status
        .iter()
        .flat_map(|s| s.init_container_statuses.iter().flatten())
        .map(|c| c.name.clone())
        .collect()
}

/// GETs of ConfigMaps the API server has answered so far: how tests tell
/// that a writer does not read before each write.
pub async fn configmap_gets(client: &kube::Client) -> u64 {
    counterweight_harness::bulk::apiserver_metric(
        client,
        "apiserver_request_total",
        &[("verb", "GET"), ("resource", "configmaps")],
    )
    .await
}

/// Creates the namespaces and waits until each has its `default`
/// ServiceAccount, without which no pod is admitted there.
pub async fn create_namespaces(client: &kube::Client, names: &[&str]) {
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in names {
        nss.create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(ns),
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
    }
    for ns in names {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        eventually(
            "the default ServiceAccount",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
        )
        .await;
    }
}

/// Routes HA envelopes between in-process controllers; links can be cut.
#[derive(Default)]
pub struct Router {
    inboxes: Mutex<HashMap<String, mpsc::Sender<Envelope>>>,
    cut: Mutex<HashSet<(String, String)>>,
}

impl Router {
    /// Registers member `name` and returns its inbox.
    pub fn connect(&self, name: &str) -> mpsc::Receiver<Envelope> {
        let (tx, rx) = mpsc::channel(256);
        self.inboxes
            .lock()
            .expect("router lock")
            .insert(name.into(), tx);
        rx
    }

    /// Drops every message between `a` and `b`, both ways, from now on.
    pub fn cut(&self, a: &str, b: &str) {
        let mut cut = self.cut.lock().expect("router lock");
        cut.insert((a.into(), b.into()));
        cut.insert((b.into(), a.into()));
    }

    /// An outbox that sends through this router.
    pub fn outbox(self: &Arc<Self>) -> Arc<dyn Outbox> {
        Arc::new(RouterOutbox(self.clone()))
    }
}

struct RouterOutbox(Arc<Router>);

impl Outbox for RouterOutbox {
    fn send(&self, env: Envelope) {
        let link = (env.from.clone(), env.to.clone());
        if self.0.cut.lock().expect("router lock").contains(&link) {
            return;
        }
        if let Some(tx) = self.0.inboxes.lock().expect("router lock").get(&env.to) {
            // A full inbox is a lost message, which the protocol tolerates.
            let _ = tx.try_send(env);
        }
    }
}

/// An HA group of `names` (earlier names preferred) with test timings:
/// probes every 200 ms, 1.5 s leases with a 300 ms margin.
pub fn fast_ha_config(names: &[&str], witness: Option<&str>) -> counterweight_core::ha::HaConfig {
    let clusters = names
        .iter()
        .enumerate()
        .map(|(i, n)| counterweight_core::ha::ClusterSpec {
            name: (*n).into(),
            priority: u32::try_from(names.len() - i).expect("few clusters"),
        })
        .collect();
    let mut c = counterweight_core::ha::HaConfig::new(clusters, witness.map(str::to_owned));
    c.probe_interval_ms = 200;
    c.lease_ms = 1500;
    c.margin_ms = 300;
    c.candidate_fresh_ms = 1000;
    // One machine: the clocks of a cluster's "nodes" are one clock.
    c.max_clock_skew_ms = 100;
    c
}

/// Creates the `counterweight-policy` ConfigMap in `namespace`.
pub async fn install_policy(client: &kube::Client, namespace: &str, yaml: &str) {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), namespace);
    cms.create(
        &PostParams::default(),
        &k8s_openapi::api::core::v1::ConfigMap {
            metadata: meta("counterweight-policy"),
            data: Some(BTreeMap::from([(
                "policy.yaml".to_owned(),
                yaml.to_owned(),
            )])),
            ..Default::default()
        },
    )
    .await
    .expect("create the policy ConfigMap");
}

/// The sample EMS policy of the HA tests, in namespace `ems`: the services
/// `web` (0.5) and `api` (0.3), and the database `db` (0.2) as a
/// synchronization component, whose state each takeover records as its
/// data-loss estimate; D = 0.6 (web down alone puts S below it), K = 1,
/// every 300 ms. Pods are selected by `app=<name>`, as [`deployment`] labels
/// them.
pub const EMS_POLICY: &str = r#"
interval: 300ms
threshold: 0.6
retries: 1
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0.5
  - name: api
    namespaces: [ems]
    selector: {matchLabels: {app: api}}
    weight: 0.3
  - name: db
    namespaces: [ems]
    selector: {matchLabels: {app: db}}
    weight: 0.2
    role: database
"#;

/// Runs `cwctl` (the library behind the binary, exactly as `main` does)
/// with `args` after the program name; its outcome and output.
pub async fn cwctl(
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> (Result<counterweight_cli::Outcome, String>, String) {
    use clap::Parser;
    let mut argv = vec![
        "cwctl".to_owned(),
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    let args = counterweight_cli::Args::try_parse_from(argv).expect("arguments");
    let mut out = Vec::new();
    let result = counterweight_cli::run(&args, &mut out)
        .await
        .map_err(|e| e.to_string());
    (result, String::from_utf8_lossy(&out).into_owned())
}
