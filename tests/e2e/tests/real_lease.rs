//! The serving lease on a real kubelet (issue 13): a service pod as the
//! webhook injects it, with the real gate and the real lease sidecar in
//! real containers, leaves its Service when the serving lease ends, with no
//! controller anywhere to say so. That is the fence a dead controller
//! cannot run, held by the kubelet's readiness probe.
//!
//! The test plays the controller's part by hand: it writes the state
//! record, the Role the controller keeps for the gates, the serving
//! condition, and one last lease, and then stops, as a killed controller
//! does. The gate binary is this build's, mounted from the host with the
//! C library it links (the project's images are issue 14). Needs root; see
//! `real_node.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use counterweight_core::clock::unix_ms;
use counterweight_core::inject::{
    Decision, GATE_CONTAINER, InjectorConfig, LEASE_CONTAINER, inject,
};
use counterweight_core::names;
use counterweight_core::workload::released_epoch;
use counterweight_e2e::fixtures::{
    condition_true, create_namespaces, gate_access_and_service, meta, serve, write_serving_lease,
};
use counterweight_e2e::ha::workspace_bin;
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::realnode::BUSYBOX_IMAGE;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, HostPathVolumeSource, Pod, PodSpec, Volume, VolumeMount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};

const SYSTEM: &str = names::SYSTEM_NAMESPACE;
const APP_NS: &str = "shop";
const CLUSTER: &str = "r0";

fn ready(p: &Pod) -> bool {
    condition_true(p, "Ready")
}

/// Ready endpoints of the app namespace's Services.
async fn ready_endpoints(slices: &Api<EndpointSlice>) -> Result<usize, String> {
    let list = slices
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(counterweight_e2e::workload::ready_endpoints(&list.items))
}

/// The pod `web` as the webhook injects it (`counterweight_core::inject`),
/// with the gate's image replaced by busybox plus this build's gate binary
/// and the host's C library, mounted read-only.
fn injected_web(gate_bin: &Path) -> Pod {
    let mut m = meta("web");
    m.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
    let pod = Pod {
        metadata: m,
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some(BUSYBOX_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "exec sleep 2147483647".into(),
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let config = InjectorConfig {
        image: BUSYBOX_IMAGE.into(),
        image_pull_policy: Some("Never".into()),
        cluster_name: CLUSTER.into(),
        ..InjectorConfig::default()
    };
    let labels = BTreeMap::from([(
        names::INJECT_LABEL.to_owned(),
        names::INJECT_ENABLED.to_owned(),
    )]);
    let Decision::Inject(patch) = inject(&pod, &labels, APP_NS, &config) else {
        panic!("the pod must be injected");
    };
    let mut value = serde_json::to_value(&pod).expect("pod json");
    json_patch::patch(&mut value, &patch).expect("the injector's patch applies");
    let mut pod: Pod = serde_json::from_value(value).expect("patched pod");
    let bin_dir = gate_bin.parent().expect("bin dir");
    let bin_name = gate_bin.file_name().expect("bin name").to_string_lossy();
    let host = |name: &str, path: &str| Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    };
    let spec = pod.spec.as_mut().expect("spec");
    spec.volumes.get_or_insert_with(Vec::new).extend([
        host("cw-bin", &bin_dir.display().to_string()),
        host("host-lib", "/lib/x86_64-linux-gnu"),
        host("host-lib64", "/lib64"),
    ]);
    for c in spec.init_containers.iter_mut().flatten() {
        c.command = Some(vec![format!("/cw/bin/{bin_name}")]);
        // A debug build's TLS handshake needs more than the 100m default.
        if let Some(r) = c.resources.as_mut() {
            r.limits = None;
        }
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        for (name, path) in [
            ("cw-bin", "/cw/bin"),
            ("host-lib", "/lib/x86_64-linux-gnu"),
            ("host-lib64", "/lib64"),
        ] {
            mounts.push(VolumeMount {
                name: name.into(),
                mount_path: path.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
    pod
}

async fn write_lease(cms: &Api<ConfigMap>, until_unix_ms: u64) {
    write_serving_lease(cms, CLUSTER, 1, until_unix_ms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_real_kubelet_a_pod_leaves_its_service_when_the_serving_lease_ends() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let gate_bin = workspace_bin("counterweight-gate", "COUNTERWEIGHT_GATE_BIN");
    let (_lan, clusters) = counterweight_harness::start_real_named(&[CLUSTER])
        .await
        .expect("a real-node cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();

    // What the controller would have made: namespaces, the state record
    // (active, epoch 1), the gates' Role and binding, a first lease.
    create_namespaces(&client, &[SYSTEM, APP_NS]).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta(names::STATE_CONFIGMAP),
            data: Some(BTreeMap::from([
                ("state".to_owned(), "active".to_owned()),
                ("epoch".to_owned(), "1".to_owned()),
            ])),
            ..Default::default()
        },
    )
    .await
    .expect("state record");
    write_lease(&cms, unix_ms() + 120_000).await;
    gate_access_and_service(&client, APP_NS, "web").await;

    // The injected pod: the gate releases it (active, epoch 1), the lease
    // sidecar starts, and once the controller's serving condition is True
    // it is Ready and in its Service.
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP_NS);
    let created = Instant::now();
    pods.create(&PostParams::default(), &injected_web(&gate_bin))
        .await
        .expect("injected pod created");
    let released = eventually(
        "the gate to release the pod with its epoch as termination message",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            let p = pods.get("web").await.map_err(|e| e.to_string())?;
            Ok(released_epoch(&p).map(|e| (e, p)))
        },
    )
    .await;
    assert_eq!(released.0, 1, "released in the state's epoch");
    let names: Vec<String> = released
        .1
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, [GATE_CONTAINER, LEASE_CONTAINER]);
    serve(&pods, &released.1).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), APP_NS);
    eventually(
        "the pod Ready and a ready endpoint of its Service",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let p = pods.get("web").await.map_err(|e| e.to_string())?;
            Ok((ready(&p) && ready_endpoints(&slices).await == Ok(1)).then_some(()))
        },
    )
    .await;
    let serving_after = created.elapsed();

    // The last renewal of a controller that then dies: nothing writes
    // again. The condition stays True; only the lease can stop the pod.
    let until = unix_ms() + 4_000;
    write_lease(&cms, until).await;
    let out = eventually(
        "the kubelet to take the pod out of its Service",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let p = pods.get("web").await.map_err(|e| e.to_string())?;
            Ok((!ready(&p) && ready_endpoints(&slices).await == Ok(0)).then(unix_ms))
        },
    )
    .await;
    let p = pods.get("web").await.expect("pod");
    let condition = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == names::SERVING_CONDITION))
        .map(|c| c.status.clone());
    assert_eq!(
        condition.as_deref(),
        Some("True"),
        "nobody turned the condition off"
    );
    assert!(
        out >= until,
        "out of service {} ms before the lease ended",
        until - out
    );
    let late = out - until;
    // One probe period (1 s), the kubelet's status update and the
    // EndpointSlice controller, on a busy two-core machine.
    assert!(
        late <= 5_000,
        "out of service {late} ms after the lease ended"
    );
    println!(
        "real kubelet: injected pod serving {serving_after:?} after creation; out of its Service {late} ms after the lease ended, its condition still True"
    );
}
