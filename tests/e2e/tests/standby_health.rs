//! What "up" means for a standby's service pods, end to end through a real
//! apiserver and the controller's pod cache (issue 7's health fix): a pod
//! blocked in the init-gate is up on a standby, and a pod whose containers
//! are not ready is not. KWOK finishes init containers at once, so these
//! pods sit on a Node KWOK does not manage, and the test writes their status
//! as a kubelet would.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_core::inject::GATE_CONTAINER;
use counterweight_e2e::fixtures::{create_namespaces, install_policy, meta};
use counterweight_e2e::ha::SYSTEM;
use counterweight_e2e::{eventually, init_tracing};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, PodSpec};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const APP: &str = "ems";
const POLICY: &str = "interval: 300ms\nthreshold: 0.5\nretries: 0\ncomponents:\n  - {name: web, namespaces: [ems], selector: {matchLabels: {app: web}}, weight: 1, minReady: 2}\n";

/// A pod of `web` with the injected gate first, bound to the unmanaged node.
fn gated_pod(name: &str) -> Pod {
    let container = |n: &str| Container {
        name: n.into(),
        image: Some("registry.invalid/web:1".into()),
        ..Default::default()
    };
    let mut metadata = meta(name);
    metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
    Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some("ghost".into()),
            init_containers: Some(vec![container(GATE_CONTAINER)]),
            containers: vec![container("main")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pending, blocked in the gate: what a kubelet reports while the gate waits.
fn at_gate() -> Value {
    json!({"status": {
        "phase": "Pending",
        "conditions": [{"type": "Initialized", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
        "initContainerStatuses": [{"name": GATE_CONTAINER, "image": "registry.invalid/web:1", "imageID": "", "ready": false, "restartCount": 0, "state": {"running": {}}}],
        "containerStatuses": [{"name": "main", "image": "registry.invalid/web:1", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]
    }})
}

/// Released and Running, its containers ready or not.
fn running(ready: bool) -> Value {
    let r = if ready { "True" } else { "False" };
    json!({"status": {
        "phase": "Running",
        "conditions": [{"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": r}],
        "initContainerStatuses": [{"name": GATE_CONTAINER, "image": "registry.invalid/web:1", "imageID": "", "ready": true, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}],
        "containerStatuses": [{"name": "main", "image": "registry.invalid/web:1", "imageID": "", "ready": ready, "restartCount": 0, "state": {"running": {}}}]
    }})
}

/// `(ready, score)` of the `web` component in the controller's explanation.
async fn web(cms: &Api<ConfigMap>) -> Result<Option<(u64, f64)>, String> {
    let Some(text) = cms
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(counterweight_core::state::HEALTH_KEY).cloned())
    else {
        return Ok(None);
    };
    let h: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let ready = h["components"][0]["ready"].as_u64();
    let score = h["score"].as_f64();
    Ok(ready.zip(score))
}

async fn wait_web(cms: &Api<ConfigMap>, what: &str, ready: u64, score: f64) {
    eventually(
        what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match web(cms).await? {
                Some((r, s)) if r == ready && (s - score).abs() < 1e-9 => Ok(Some(())),
                other => Err(format!("web (ready, S) = {other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_counts_pods_waiting_at_the_gate_and_not_pods_whose_containers_fail() {
    init_tracing();
    let clusters = counterweight_harness::start_named(&["east"])
        .await
        .expect("cluster");
    let client = clusters[0].client();
    create_namespaces(&client, &[SYSTEM, APP]).await;
    install_policy(&client, SYSTEM, POLICY).await;
    // A node KWOK leaves alone (it manages only annotated nodes), so nothing
    // but this test writes the status of pods bound to it.
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: meta("ghost"),
                ..Default::default()
            },
        )
        .await
        .expect("node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP);
    for name in ["web-0", "web-1"] {
        pods.create(&PostParams::default(), &gated_pod(name))
            .await
            .expect("pod");
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(at_gate()))
            .await
            .expect("status: at the gate");
    }

    // The controller without HA wiring stands by: nothing serves.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(counterweight_controller::run_with(
        client.clone(),
        counterweight_controller::health::HealthSettings::new("east", SYSTEM),
        listener,
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    wait_web(&cms, "both pods at the gate to count as up", 2, 1.0).await;

    // One is released but its container fails: down, and minReady 2 fails.
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(running(false)),
    )
    .await
    .expect("status: failing");
    wait_web(&cms, "a failing pod to count as down", 1, 0.0).await;

    // Its container becomes ready: up again.
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(running(true)),
    )
    .await
    .expect("status: ready");
    wait_web(&cms, "a ready pod to count as up", 2, 1.0).await;

    drop(stop);
    controller
        .await
        .expect("controller task")
        .expect("controller stops cleanly");
}
