//! The sample EMS the demo deploys in both clusters, and what its pods say.
//!
//! Two service Deployments (`web`, `api`; gated by the webhook) and two
//! synchronization Deployments (`ems-db` with role `database`, `ems-files`
//! with role `file-replication`; never gated), weighed by one policy. KWOK
//! runs the pods: a gated pod is Running at once and turns Ready only when
//! the controller sets its `counterweight.dev/serving` condition True. With
//! `--real-nodes` the sample is `manifests/sample` instead, installed by
//! README.md's guide, and this module also reads what the kubelet reports
//! of each service pod's containers ([`Sample`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use counterweight_core::names;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// The EMS namespace, opted in to injection.
pub const NAMESPACE: &str = "ems";
/// The pod name the demo's gate process reports (it stands for a new `web` pod).
pub const GATE_POD: &str = "web-new";

/// The weighted-health policy (Table 1): losing `web` (w = 0.5) takes S
/// from 1.0 to 0.5 < D = 0.6; after K + 1 = 3 intervals of 1 s below D the
/// cluster is abnormal and hands over.
pub const POLICY: &str = "\
interval: 1s
threshold: 0.6
retries: 2
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0.5
    minReady: 2
  - name: api
    namespaces: [ems]
    selector: {matchLabels: {app: api}}
    weight: 0.2
  - name: db
    namespaces: [ems]
    selector: {matchLabels: {app: ems-db}}
    role: database
    weight: 0.2
  - name: files
    namespaces: [ems]
    selector: {matchLabels: {app: ems-files}}
    role: file-replication
    weight: 0.1
";

/// (Deployment, replicas, role label); `None` is a service.
pub const WORKLOADS: [(&str, i32, Option<&str>); 4] = [
    ("web", 2, None),
    ("api", 1, None),
    ("ems-db", 1, Some("database")),
    ("ems-files", 1, Some("file-replication")),
];

/// Creates `counterweight-system` and the opted-in `ems`, and waits for
/// `ems`'s default ServiceAccount (no pod is admitted before it exists).
pub async fn namespaces(client: &kube::Client) -> Result<()> {
    let nss: Api<Namespace> = Api::all(client.clone());
    for (name, opt_in) in [(names::SYSTEM_NAMESPACE, false), (NAMESPACE, true)] {
        let labels = opt_in.then(|| {
            BTreeMap::from([(
                names::INJECT_LABEL.to_owned(),
                names::INJECT_ENABLED.to_owned(),
            )])
        });
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels,
                ..Default::default()
            },
            ..Default::default()
        };
        nss.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sas.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            bail!("namespace {NAMESPACE} got no default ServiceAccount within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Creates the policy ConfigMap (the validating webhook checks it).
pub async fn policy(client: &kube::Client) -> Result<()> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::POLICY_CONFIGMAP.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            names::POLICY_KEY.to_owned(),
            POLICY.to_owned(),
        )])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), names::SYSTEM_NAMESPACE)
        .create(&PostParams::default(), &cm)
        .await
        .context("creating the policy ConfigMap")?;
    Ok(())
}

/// Creates the EMS Deployments.
pub async fn deploy(client: &kube::Client) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, replicas, role) in WORKLOADS {
        api.create(&PostParams::default(), &deployment(name, replicas, role)?)
            .await
            .with_context(|| format!("creating Deployment {name}"))?;
    }
    Ok(())
}

/// Scales `name` in `client`'s cluster to `replicas`.
pub async fn scale(client: &kube::Client, name: &str, replicas: i32) -> Result<()> {
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .with_context(|| format!("scaling {name}"))?;
    Ok(())
}

fn deployment(name: &str, replicas: i32, role: Option<&str>) -> Result<Deployment> {
    let mut labels = json!({"app": name, "app.kubernetes.io/part-of": "ems"});
    if let Some(role) = role {
        labels[names::ROLE_LABEL] = json!(role);
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "main", "image": format!("registry.invalid/ems-{name}:1")}],
                    // KWOK removes deleted pods at once; nothing to drain.
                    "terminationGracePeriodSeconds": 0,
                },
            },
        },
    }))?)
}

/// A pod the demo asks the API server to admit in dry-run, to see whether
/// the webhook is called yet.
pub fn probe_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("webhook-probe".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "main".into(),
                image: Some("registry.invalid/probe:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the webhook injected the gate into `pod`.
pub fn is_injected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(names::STATUS_ANNOTATION))
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|ics| {
                ics.iter()
                    .any(|c| c.name == counterweight_core::inject::GATE_CONTAINER)
            })
}

/// Which sample EMS the pods are: the demo's own on KWOK clusters, or
/// `manifests/sample` as README.md's install guide applies it on real nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// [`WORKLOADS`], labelled `app`; KWOK runs no containers.
    Kwok,
    /// `manifests/sample` (`web`, `ems-db`, `ems-files`), labelled
    /// `app.kubernetes.io/name`; the kubelet reports real containers.
    Manifests,
}

impl Sample {
    /// The label naming a pod's app.
    fn label(self) -> &'static str {
        match self {
            Self::Kwok => "app",
            Self::Manifests => "app.kubernetes.io/name",
        }
    }

    /// The apps, services first.
    fn apps(self) -> &'static [&'static str] {
        match self {
            Self::Kwok => &["web", "api", "ems-db", "ems-files"],
            Self::Manifests => &["web", "ems-db", "ems-files"],
        }
    }
}

/// What the pods of one Deployment look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppPods {
    /// Pods not being deleted.
    pub total: usize,
    /// Of those, carrying the injected gate.
    pub gated: usize,
    /// Of those, with `counterweight.dev/serving` True.
    pub serving: usize,
    /// Of those, Ready.
    pub ready: usize,
    /// Of those, held at the gate by the kubelet's account: the gate's init
    /// container running and every app container waiting (real nodes only).
    pub at_gate: usize,
    /// Per pod (real nodes only), its containers as the kubelet reports
    /// them, in one line: `(pod name, line)`.
    pub containers: Vec<(String, String)>,
}

/// Per app (in the sample's order), the state of its pods.
pub async fn pods(client: &kube::Client, sample: Sample) -> Result<Vec<(&'static str, AppPods)>> {
    let list = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .context("listing EMS pods")?;
    let label = sample.label();
    Ok(sample
        .apps()
        .iter()
        .map(|app| {
            let mut a = AppPods::default();
            for p in list.items.iter().filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(label))
                        .is_some_and(|v| v == app)
            }) {
                a.total += 1;
                a.gated += usize::from(is_injected(p));
                a.serving += usize::from(condition(p, names::SERVING_CONDITION));
                a.ready += usize::from(condition(p, "Ready"));
                if sample == Sample::Manifests && is_service(app) {
                    let c = Containers::of(p);
                    a.at_gate += usize::from(c.held_at_gate());
                    a.containers.push((
                        p.metadata.name.clone().unwrap_or_default(),
                        c.line(condition(p, "Ready")),
                    ));
                }
            }
            (*app, a)
        })
        .collect())
}

/// A container's state as the kubelet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContainerState {
    /// No status yet.
    Unknown,
    /// Waiting, with the kubelet's reason (`PodInitializing`, ...).
    Waiting(String),
    Running,
    /// Exited with this code.
    Exited(i32),
}

impl ContainerState {
    fn of(s: &k8s_openapi::api::core::v1::ContainerStatus) -> Self {
        let Some(st) = s.state.as_ref() else {
            return Self::Unknown;
        };
        if st.running.is_some() {
            Self::Running
        } else if let Some(t) = &st.terminated {
            Self::Exited(t.exit_code)
        } else if let Some(w) = &st.waiting {
            Self::Waiting(w.reason.clone().unwrap_or_default())
        } else {
            Self::Unknown
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Unknown => "not reported yet".into(),
            Self::Waiting(r) if r.is_empty() => "waiting".into(),
            Self::Waiting(r) => format!("waiting ({r})"),
            Self::Running => "running".into(),
            Self::Exited(c) => format!("exited {c}"),
        }
    }
}

/// A pod's gate init container and app containers, from its status.
#[derive(Debug, Clone)]
struct Containers {
    gate: Option<ContainerState>,
    apps: Vec<(String, ContainerState)>,
}

impl Containers {
    fn of(p: &Pod) -> Self {
        let status = p.status.as_ref();
        let gate = status
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.name == counterweight_core::inject::GATE_CONTAINER)
            })
            .map(ContainerState::of);
        let reported = status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        let apps = p
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|name| {
                let st = reported
                    .iter()
                    .find(|c| c.name == name)
                    .map_or(ContainerState::Unknown, ContainerState::of);
                (name, st)
            })
            .collect();
        Self { gate, apps }
    }

    /// The gate runs and no app container has started: the init container
    /// holds the pod.
    fn held_at_gate(&self) -> bool {
        self.gate == Some(ContainerState::Running)
            && !self.apps.is_empty()
            && self
                .apps
                .iter()
                .all(|(_, s)| matches!(s, ContainerState::Waiting(_)))
    }

    /// `init container counterweight-gate running; app container web
    /// waiting (PodInitializing); not Ready`.
    fn line(&self, ready: bool) -> String {
        let gate = self.gate.as_ref().map_or("no gate".to_owned(), |g| {
            format!(
                "init container {} {}",
                counterweight_core::inject::GATE_CONTAINER,
                g.text()
            )
        });
        let apps: Vec<String> = self
            .apps
            .iter()
            .map(|(n, s)| format!("app container {n} {}", s.text()))
            .collect();
        format!(
            "{gate}; {}; {}",
            apps.join(", "),
            if ready { "Ready" } else { "not Ready" }
        )
    }
}

fn condition(p: &Pod, ty: &str) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == ty && c.status == "True"))
}

/// Whether `app` is a service (gated) Deployment.
pub fn is_service(app: &str) -> bool {
    WORKLOADS
        .iter()
        .any(|(name, _, role)| *name == app && role.is_none())
}
