//! Weighted health (issue 3) end to end: a real control plane, KWOK-run
//! Deployments, a real PostgreSQL, and the controller's health loop.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_e2e::fixtures::{deployment, meta};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::{PG_USER, Postgres};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const SYSTEM: &str = "counterweight-system";
const APP: &str = "ems";

fn policy(threshold: f64, retries: u32, pg_port: u16, web_weight: f64, api_weight: f64) -> String {
    format!(
        r#"
interval: 1s
threshold: {threshold}
retries: {retries}
components:
  - name: web
    namespaces: [{APP}]
    selector: {{matchLabels: {{app: web}}}}
    weight: {web_weight}
    minReady: 2
  - name: api
    namespaces: [{APP}]
    selector: {{matchLabels: {{app: api}}}}
    weight: {api_weight}
  - name: db
    namespaces: [{APP}]
    selector: {{matchLabels: {{app: db}}}}
    weight: 0.3
    role: database
    checks:
      - postgres: {{host: 127.0.0.1, port: {pg_port}, secretRef: {{name: db-cred}}}}
"#
    )
}

async fn health(cms: &Api<ConfigMap>) -> Result<Option<Value>, String> {
    let Some(cm) = cms
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let Some(text) = cm
        .data
        .as_ref()
        .and_then(|d| d.get(counterweight_core::state::HEALTH_KEY))
    else {
        return Ok(None);
    };
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| e.to_string())
}

async fn policy_status(cms: &Api<ConfigMap>) -> Result<Option<String>, String> {
    Ok(cms
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(counterweight_core::state::POLICY_STATUS_KEY).cloned()))
}

fn component<'a>(h: &'a Value, name: &str) -> &'a Value {
    h["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

async fn set_ready(pods: &Api<Pod>, app: &str, ready: bool) {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list pods");
    let status = if ready { "True" } else { "False" };
    for p in list.items {
        let name = p.metadata.name.expect("pod name");
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ]}})),
        )
        .await
        .expect("patch pod status");
    }
}

async fn event_with(
    events: &Api<Event>,
    reason: &str,
    needle: &str,
) -> Result<Option<Event>, String> {
    let list = events
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list.items.into_iter().find(|e| {
        e.reason.as_deref() == Some(reason) && e.note.as_deref().is_some_and(|n| n.contains(needle))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_health_follows_pods_checks_and_policy() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let client = clusters[0].client();
    let mut pg = Postgres::start().await.expect("PostgreSQL starts");

    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in [SYSTEM, APP] {
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
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: meta("db-cred"),
                string_data: Some(BTreeMap::from([
                    ("username".to_owned(), PG_USER.to_owned()),
                    ("password".to_owned(), pg.password().to_owned()),
                ])),
                ..Default::default()
            },
        )
        .await
        .expect("create secret");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), APP);
    eventually(
        "default ServiceAccount in the app namespace",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
    )
    .await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), APP);
    for (name, replicas, role) in [
        ("web", 2, "service"),
        ("api", 1, "service"),
        ("db", 1, "database"),
    ] {
        deploys
            .create(
                &PostParams::default(),
                &deployment(name, replicas, &[("counterweight.dev/role", role)]),
            )
            .await
            .expect("create deployment");
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM);
    let mut policy_cm = ConfigMap {
        metadata: meta("counterweight-policy"),
        data: Some(BTreeMap::from([(
            "policy.yaml".to_owned(),
            policy(0.6, 2, pg.port(), 0.5, 0.2),
        )])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &policy_cm)
        .await
        .expect("create policy");

    // The controller's health loop, in-process, metrics on an ephemeral port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics_addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = counterweight_controller::health::HealthSettings::new("c0", SYSTEM);
    let controller = tokio::spawn(counterweight_controller::run_with(
        client.clone(),
        settings,
        listener,
        None,
        async {
            let _ = stopped.await;
        },
    ));

    // The controller manages the gates' read access as namespaces opt in
    // and out.
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), SYSTEM);
    nss.patch(
        APP,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"counterweight.dev/inject": "enabled"}}})),
    )
    .await
    .expect("label namespace");
    eventually(
        "a gate RoleBinding for the opted-in namespace",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            bindings
                .get_opt("counterweight-gate-ems")
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    nss.patch(
        APP,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"counterweight.dev/inject": null}}})),
    )
    .await
    .expect("unlabel namespace");
    eventually(
        "the RoleBinding to go when the namespace opts out",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let gone = bindings
                .get_opt("counterweight-gate-ems")
                .await
                .map_err(|e| e.to_string())?
                .is_none();
            Ok(gone.then_some(()))
        },
    )
    .await;

    // All three components up: S = 1.
    eventually(
        "S = 1 with every component up",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let Some(h) = health(&cms).await? else {
                return Ok(None);
            };
            Ok((h["score"] == 1.0).then_some(()))
        },
    )
    .await;

    // web (w = 0.5) loses readiness: S = 0.5 < D = 0.6; retryCount climbs
    // 1, 2, then K + 1 = 3 with the abnormal verdict.
    let pods: Api<Pod> = Api::namespaced(client.clone(), APP);
    set_ready(&pods, "web", false).await;
    let seen = std::sync::Mutex::new(Vec::<u64>::new());
    let abnormal = eventually(
        "retryCount to reach K+1 = 3",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let Some(h) = health(&cms).await? else {
                return Ok(None);
            };
            if h["score"] != 0.5 {
                return Ok(None);
            }
            let n = h["retryCount"].as_u64().unwrap_or(0);
            let mut seen = seen.lock().map_err(|e| e.to_string())?;
            if seen.last() != Some(&n) {
                seen.push(n);
            }
            Ok((n == 3).then_some(h))
        },
    )
    .await;
    let seen = seen.into_inner().expect("no poisoned lock");
    assert_eq!(abnormal["verdict"]["verdict"], "abnormal", "{abnormal}");
    assert_eq!(abnormal["threshold"], 0.6);
    assert_eq!(abnormal["retries"], 2);
    let web = component(&abnormal, "web");
    assert_eq!(web["up"], false);
    assert_eq!(web["ready"], 0);
    assert_eq!(web["required"], 2);
    assert_eq!(web["weight"], 0.5);
    let counts: Vec<u64> = seen.iter().copied().filter(|n| *n > 0).collect();
    assert_eq!(
        counts,
        [1, 2, 3],
        "retryCount must climb one interval at a time: {seen:?}"
    );

    let events: Api<Event> = Api::namespaced(client.clone(), SYSTEM);
    let ev = eventually(
        "the ClusterAbnormal Event naming web",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || event_with(&events, "ClusterAbnormal", "web"),
    )
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));

    // Metrics report the same numbers.
    let body = eventually(
        "metrics",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let mut s = tokio::net::TcpStream::connect(metrics_addr)
                .await
                .map_err(|e| e.to_string())?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(out))
        },
    )
    .await;
    assert!(body.contains("counterweight_health_score 0.5"), "{body}");
    assert!(
        body.contains("counterweight_health_threshold 0.6"),
        "{body}"
    );
    assert!(
        body.contains("counterweight_component_up{component=\"web\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("counterweight_component_up{component=\"db\"} 1"),
        "{body}"
    );

    // Recovery resets the counter.
    set_ready(&pods, "web", true).await;
    eventually(
        "recovery: S = 1 and retryCount 0",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let Some(h) = health(&cms).await? else {
                return Ok(None);
            };
            Ok(
                (h["score"] == 1.0 && h["retryCount"] == 0 && h["verdict"]["verdict"] == "healthy")
                    .then_some(()),
            )
        },
    )
    .await;

    // An invalid policy (weights sum to 0.9) is rejected with a readable
    // message; the old one stays in force.
    let good_version = cms
        .get("counterweight-policy")
        .await
        .expect("policy")
        .metadata
        .resource_version;
    policy_cm.data = Some(BTreeMap::from([(
        "policy.yaml".to_owned(),
        policy(0.9, 0, pg.port(), 0.4, 0.2),
    )]));
    cms.replace(
        "counterweight-policy",
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                resource_version: None,
                ..policy_cm.metadata.clone()
            },
            ..policy_cm.clone()
        },
    )
    .await
    .expect("replace policy");
    let status = eventually(
        "the policy to be rejected",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            Ok(policy_status(&cms)
                .await?
                .filter(|s| s.starts_with("rejected")))
        },
    )
    .await;
    assert!(status.contains("weights sum to 0.9"), "{status}");
    assert!(
        status.contains(&format!(
            "keeping the last good policy (resourceVersion {})",
            good_version.unwrap_or_default()
        )),
        "{status}"
    );
    eventually(
        "the PolicyRejected Event",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || event_with(&events, "PolicyRejected", "weights sum to 0.9"),
    )
    .await;
    let h = health(&cms).await.expect("health").expect("health present");
    assert_eq!(h["threshold"], 0.6, "the old policy stays in force: {h}");

    // The database check follows the real server.
    pg.stop();
    let down = eventually(
        "db down after PostgreSQL stops",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let Some(h) = health(&cms).await? else {
                return Ok(None);
            };
            Ok((component(&h, "db")["up"] == false).then_some(h))
        },
    )
    .await;
    let failing = component(&down, "db")["failing"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        failing.contains(&format!("postgres 127.0.0.1:{}", pg.port())),
        "{failing}"
    );
    assert_eq!(down["score"], 0.7, "{down}");
    pg.resume().await.expect("PostgreSQL restarts");
    eventually(
        "db up again",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let Some(h) = health(&cms).await? else {
                return Ok(None);
            };
            Ok((component(&h, "db")["up"] == true && h["score"] == 1.0).then_some(()))
        },
    )
    .await;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("controller stops within 10 s")
        .expect("controller task")
        .expect("controller exits cleanly");
}
