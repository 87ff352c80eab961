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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_controller::serving::released_epoch;
use counterweight_core::clock::unix_ms;
use counterweight_core::inject::{GATE_CONTAINER, LEASE_CONTAINER};
use counterweight_core::names;
use counterweight_e2e::fixtures::{
    app_running, app_waiting_reason, condition_true, create_namespaces, deployment,
    gate_access_and_service, init_running, meta, serve, write_serving_lease,
};
use counterweight_e2e::ha::workspace_bin;
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::{BUSYBOX_IMAGE, Process, free_port, http_get, webhook_configs};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSecurityContext, SecurityContext,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = names::SYSTEM_NAMESPACE;
const APP_NS: &str = "shop";
const CLUSTER: &str = "g0";
/// The gate image as `tools/images.sh` names it (docker.io/ once normalized).
const GATE_IMAGE: &str = "counterweight/gate:dev";
/// Non-root user of the app container (busybox has no such user: numeric only).
const APP_UID: i64 = 1000;

/// The directory of the image archives: `$COUNTERWEIGHT_IMAGES`, or what
/// `tools/images.sh gate` prints (it builds only what changed).
fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COUNTERWEIGHT_IMAGES") {
        return PathBuf::from(dir);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/images.sh");
    // Without the variables cargo sets for a test: under them the script's own
    // cargo build found the musl artifacts stale and rebuilt them (minutes).
    let keep = |k: &str| !k.starts_with("CARGO_") || matches!(k, "CARGO_HOME" | "CARGO_TARGET_DIR");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("gate")
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| keep(k) && k != "CARGO" && k != "LD_LIBRARY_PATH"))
        .output()
        .expect("run tools/images.sh");
    assert!(
        out.status.success(),
        "tools/images.sh gate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Starts the webhook on `addr` with a serving certificate for that address,
/// registers it with the cluster, and waits until the API server injects a
/// dry-run pod. The gate image is the project's; the kubelet never pulls.
async fn start_webhook(
    cluster: &counterweight_harness::Cluster,
    addr: std::net::Ipv4Addr,
) -> Process {
    let dir = cluster.dir().join("webhook");
    std::fs::create_dir_all(&dir).expect("webhook dir");
    let ca = CertificateAuthority::new("counterweight-e2e webhook CA").expect("CA");
    ca.issue(&LeafSpec::new("counterweight-webhook", Usage::Server).sans([addr.to_string()]))
        .expect("serving certificate")
        .write(&dir, "tls")
        .expect("write certificate");
    let port = free_port().expect("port");
    let ops = free_port().expect("port");
    let listen = SocketAddr::from((addr, port));
    let args = vec![
        format!("--listen={listen}"),
        format!("--metrics-listen=127.0.0.1:{ops}"),
        format!("--cluster-name={CLUSTER}"),
        format!("--gate-image={GATE_IMAGE}"),
        "--gate-image-pull-policy=Never".into(),
        format!("--tls-cert={}", dir.join("tls.crt").display()),
        format!("--tls-key={}", dir.join("tls.key").display()),
    ];
    let bin = workspace_bin("counterweight-webhook", "COUNTERWEIGHT_WEBHOOK_BIN");
    let mut webhook = Process::spawn("counterweight-webhook", &bin, &args, &dir.join("log"))
        .expect("start the webhook");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(ops, "/readyz").await, Ok((200, _))) {
        webhook.check_alive().expect("the webhook runs");
        assert!(
            Instant::now() < deadline,
            "webhook /readyz not OK within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (m, _) = webhook_configs(listen, ca.pem().cert_pem.as_bytes()).expect("configs");
    Api::<MutatingWebhookConfiguration>::all(cluster.client())
        .create(&PostParams::default(), &m)
        .await
        .expect("register the mutating webhook");
    // The API server picks a registration up asynchronously.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), APP_NS);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe = web_pod_template("probe");
    eventually(
        "the API server to call the webhook",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let p = pods.create(&dry, &probe).await.map_err(|e| e.to_string())?;
            Ok(gate_of(&p).is_some().then_some(()))
        },
    )
    .await;
    webhook
}

/// The app's pod: busybox, non-root with a read-only root filesystem, no
/// service-account token, the whole pod `runAsNonRoot`.
fn app_pod_spec() -> k8s_openapi::api::core::v1::PodSpec {
    k8s_openapi::api::core::v1::PodSpec {
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        containers: vec![Container {
            name: "app".into(),
            image: Some(BUSYBOX_IMAGE.into()),
            image_pull_policy: Some("Never".into()),
            command: Some(vec!["/bin/sleep".into(), "2147483647".into()]),
            security_context: Some(SecurityContext {
                run_as_user: Some(APP_UID),
                run_as_group: Some(APP_UID),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }],
        termination_grace_period_seconds: Some(1),
        ..Default::default()
    }
}

/// A bare pod like the Deployment's, for the dry-run probe.
fn web_pod_template(name: &str) -> Pod {
    Pod {
        metadata: meta(name),
        spec: Some(app_pod_spec()),
        ..Default::default()
    }
}

/// The injected gate container of `pod`, if any.
fn gate_of(pod: &Pod) -> Option<&Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == GATE_CONTAINER)
}

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

/// Addresses of the ready endpoints in the app namespace's EndpointSlices.
async fn ready_addresses(slices: &Api<EndpointSlice>) -> Result<Vec<String>, String> {
    let list = slices
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_real_kubelet_the_gate_image_holds_a_standby_pod_until_promotion() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let gate_archive = images_dir().join("gate.tar");
    assert!(gate_archive.is_file(), "{} missing", gate_archive.display());
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
    Api::<Namespace>::all(client.clone())
        .patch(
            APP_NS,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {names::INJECT_LABEL: names::INJECT_ENABLED}}}),
            ),
        )
        .await
        .expect("opt the namespace in");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    set_state(&cms, "standby", 0).await;
    gate_access_and_service(&client, APP_NS, "web").await;
    let _webhook = start_webhook(cluster, lan.host_addr()).await;

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
    let inits: Vec<String> = started
        .status
        .iter()
        .flat_map(|s| s.init_container_statuses.iter().flatten())
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(inits, [GATE_CONTAINER, LEASE_CONTAINER]);
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
            let ready = ready_addresses(&slices).await?;
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
