//! The gate holds real containers (issue 14, item 4): on a real kubelet, the
//! webhook injects the gate, from the project's own gate image
//! (`tools/images.sh`, imported into the node's containerd), into a
//! Deployment's pod on a standby cluster, and the gate keeps it from serving
//! until its cluster turns active.
//!
//! The webhook runs as a process on this machine, as in `webhook.rs`, but
//! listens on the LAN bridge's host address: the real-node cluster's API
//! server lives in a network namespace of its own and reaches the webhook
//! through the bridge. The test plays the controller's part by hand, as
//! `real_lease.rs` does: the state record (standby, then active), the gates'
//! Role and binding, the serving lease and the serving condition.
//!
//! The pod is as strict as production pods get: `automountServiceAccountToken:
//! false` (the gate gets a projected token of its own), `runAsNonRoot` for the
//! whole pod (the gate image's numeric USER passes the kubelet's check), a
//! non-root app with a read-only root filesystem.
//!
//! Needs root and the node binaries (see `real_node.rs`), and the gate image:
//! `COUNTERWEIGHT_IMAGES` names the directory `tools/images.sh` printed, or the
//! test runs `tools/images.sh gate` itself (cached; the first run compiles the
//! gate for musl).

use std::time::{Duration, Instant};

use counterweight_core::clock::unix_ms;
use counterweight_core::inject::{GATE_CONTAINER, LEASE_CONTAINER};
use counterweight_core::names;
use counterweight_core::workload::released_epoch;
use counterweight_e2e::fixtures::{
    app_running, app_waiting_reason, condition_true, create_namespaces, deployment,
    gate_access_and_service, init_container_names, init_running, opt_in, serve,
    write_serving_lease,
};
use counterweight_e2e::realgroup::{
    GATE_IMAGE, app_pod_spec, gate_archive, gate_of, ready_addresses, start_webhook,
};
use counterweight_e2e::{eventually, init_tracing};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = names::SYSTEM_NAMESPACE;
const APP_NS: &str = "shop";
const CLUSTER: &str = "g0";

async fn set_state(cms: &Api<ConfigMap>, state: &str, epoch: u64) {
    cms.patch(
        names::STATE_CONFIGMAP,
        &PatchParams::apply("counterweight-e2e").force(),
        &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": names::STATE_CONFIGMAP},
            "data": {"state": state, "epoch": epoch.to_string()},
        })),
    )
    .await
    .expect("state record");
}

/// The web pod (the Deployment's only one).
async fn web_pod(pods: &Api<Pod>) -> Result<Option<Pod>, String> {
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list.items.into_iter().next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_real_kubelet_the_gate_image_holds_a_standby_pod_until_promotion() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let gate_archive = gate_archive();
    let (lan, clusters) = counterweight_harness::start_real_named(&[CLUSTER])
        .await
        .expect("a real-node cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();
    let imported = Instant::now();
    cluster
        .real_node()
        .expect("a real node")
        .import_image(&gate_archive)
        .expect("import the gate image into containerd");
    let import_took = imported.elapsed();

    // What the controller would have made on a standby: the state record,
    // the gates' Role and binding, the Service.
    create_namespaces(&client, &[SYSTEM, APP_NS]).await;
    opt_in(&client, APP_NS).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    set_state(&cms, "standby", 0).await;
    gate_access_and_service(&client, APP_NS, "web").await;
    let _webhook = start_webhook(cluster, lan.host_addr(), CLUSTER, APP_NS).await;

    // The Deployment's pod on the standby: gate Running (from the project's
    // image), app Waiting in PodInitializing, the pod not Ready.
    let mut d: Deployment = deployment("web", 1, &[]);
    if let Some(t) = d.spec.as_mut().map(|s| &mut s.template) {
        t.spec = Some(app_pod_spec());
    }
    Api::<Deployment>::namespaced(client.clone(), APP_NS)
        .create(&PostParams::default(), &d)
        .await
        .expect("Deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP_NS);
    let created = Instant::now();
    let held = eventually(
        "the gate Running from its image and the app Waiting (PodInitializing)",
        Duration::from_secs(90),
        Duration::from_millis(100),
        || async {
            let Some(p) = web_pod(&pods).await? else {
                return Ok(None);
            };
            let reason = app_waiting_reason(&p);
            Ok((init_running(&p) && reason.as_deref() == Some("PodInitializing")).then_some(p))
        },
    )
    .await;
    let gated_after = created.elapsed();
    let name = held.metadata.name.clone().expect("pod name");
    let gate = gate_of(&held).expect("the webhook injected the gate");
    assert_eq!(gate.image.as_deref(), Some(GATE_IMAGE));
    let gate_status = held
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|c| c.first())
        .expect("gate status");
    assert_eq!(gate_status.name, GATE_CONTAINER, "the gate runs first");
    assert!(
        gate_status.image.contains("counterweight/gate:dev"),
        "the gate runs from the project's image, not {}",
        gate_status.image
    );
    assert_eq!(
        held.spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token),
        Some(false),
        "the pod keeps automountServiceAccountToken: false"
    );
    // A standby keeps holding: the pod stays gated and not Ready for a while.
    let hold_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < hold_until {
        let p = pods.get(&name).await.expect("pod");
        assert!(
            init_running(&p) && !app_running(&p) && !condition_true(&p, "Ready"),
            "the gate let go on a standby: {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Promotion: the state turns active in epoch 1 and the serving lease is
    // renewed, as the controller does. The gate exits 0 with its epoch
    // (termination message; the lease sidecar starts only once it reads the
    // epoch file), then the app container starts.
    write_serving_lease(&cms, CLUSTER, 1, unix_ms() + 120_000).await;
    let promoted = Instant::now();
    set_state(&cms, "active", 1).await;
    let started = eventually(
        "the gate to release the pod and the app container to start",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let p = pods.get(&name).await.map_err(|e| e.to_string())?;
            Ok((released_epoch(&p).is_some() && app_running(&p)).then_some(p))
        },
    )
    .await;
    let app_after = promoted.elapsed();
    assert_eq!(released_epoch(&started), Some(1), "released in epoch 1");
    assert_eq!(
        init_container_names(&started),
        [GATE_CONTAINER, LEASE_CONTAINER]
    );
    assert!(
        !condition_true(&started, "Ready"),
        "Ready before the serving condition: the readiness gate is not held"
    );

    // The controller's serving condition: the kubelet turns the pod Ready
    // through the readiness gate, and its address joins the Service.
    serve(&pods, &started).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), APP_NS);
    let ip = eventually(
        "the pod Ready and its address a ready endpoint of its Service",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let p = pods.get(&name).await.map_err(|e| e.to_string())?;
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            let ready = ready_addresses(&slices, &ListParams::default()).await?;
            Ok(ip.filter(|ip| condition_true(&p, "Ready") && ready == [ip.clone()]))
        },
    )
    .await;
    let ready_after = promoted.elapsed();
    println!(
        "real kubelet, gate image: imported in {import_took:?}; pod gated {gated_after:?} after the Deployment; \
         promotion -> app container started {app_after:?}, -> Ready and endpoint {ip} {ready_after:?}"
    );
}
