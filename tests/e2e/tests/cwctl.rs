//! `cwctl` end to end on two real control planes (issue 7, part 2).
//!
//! Each cluster runs the controller's health and HA loops in-process, with
//! peers linked by an in-memory router (the mTLS transport has its own
//! tests) and operator commands served by `commands::run` from the
//! `counterweight-command` ConfigMap. `cwctl` runs as a library call against
//! a kubeconfig with one context per cluster, exactly as the binary would.
//! Checked: `status -o json` matches the ConfigMaps; `pause`/`resume` reach
//! every controller; a bad request is rejected by the controller with a
//! reason; `switchover --to west` makes west active through the controllers;
//! `explain` tells the story; `check` fails with a readable hint on a
//! garbage caBundle and passes once it is fixed; an operator holding only
//! the Roles of `manifests/base/cwctl-rbac.yaml` can check and switch over.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use counterweight_cli::Outcome;
use counterweight_cli::status::Status;
use counterweight_controller::HaWiring;
use counterweight_controller::commands;
use counterweight_core::ha::HaConfig;
use counterweight_core::names;
use counterweight_e2e::fixtures::{
    EMS_POLICY, Router, create_namespaces, cwctl, deployment, fast_ha_config, install_policy,
};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::Cluster;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;

const SYSTEM: &str = "counterweight-system";
const APP: &str = "ems";

async fn prepare(cluster: &Cluster) {
    let client = cluster.client();
    create_namespaces(&client, &[SYSTEM, APP]).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), APP);
    for (name, role) in [("web", "service"), ("api", "service"), ("db", "database")] {
        deploys
            .create(
                &PostParams::default(),
                &deployment(name, 1, &[(names::ROLE_LABEL, role)]),
            )
            .await
            .expect("deployment");
    }
    install_policy(&client, SYSTEM, EMS_POLICY).await;
}

fn ha_config(names: &[&str]) -> HaConfig {
    fast_ha_config(names, None)
}

/// A controller with its command watcher, running in-process.
struct Running {
    // Dropping it stops the controller and the command watcher.
    _stop: tokio::sync::oneshot::Sender<()>,
    _task: tokio::task::JoinHandle<Result<(), counterweight_controller::Error>>,
    commands: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.commands.abort();
    }
}

async fn start_controller(
    cluster: &Cluster,
    name: &str,
    config: HaConfig,
    router: &Arc<Router>,
) -> Running {
    let inbox = router.connect(name);
    let (commands_tx, commands_rx) = mpsc::channel(8);
    let commands = tokio::spawn(commands::run(
        cluster.client(),
        SYSTEM.to_owned(),
        commands_tx,
        std::future::pending(),
    ));
    let wiring = HaWiring {
        config,
        outbox: router.outbox(),
        inbox,
        commands: commands_rx,
        config_updates: None,
        pods: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let settings = counterweight_controller::health::HealthSettings::new(name, SYSTEM);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(counterweight_controller::run_with(
        cluster.client(),
        settings,
        listener,
        Some(wiring),
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        _stop: stop,
        _task: task,
        commands,
    }
}

async fn state(cms: &Api<ConfigMap>) -> BTreeMap<String, String> {
    cms.get(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .ok()
        .and_then(|cm| cm.data)
        .unwrap_or_default()
}

fn webhook_configs(
    port: u16,
    ca_bundle: &[u8],
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    // Registered by URL on a port where nothing answers admission requests
    // (a bare listener, so the reachability check connects) and scoped to
    // a namespace label nobody has: nothing ever calls them.
    let mut m: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "counterweight-inject"},
        "webhooks": [{
            "name": "inject.counterweight.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate-pods")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"counterweight.dev/test-never": "x"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Ignore",
        }]
    }))
    .expect("mutating config");
    let mut v: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "counterweight-policy"},
        "webhooks": [{
            "name": "policy.counterweight.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate-policy")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["configmaps"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"counterweight.dev/test-never": "x"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Ignore",
        }]
    }))
    .expect("validating config");
    for h in m.webhooks.iter_mut().flatten() {
        h.client_config.ca_bundle = Some(ByteString(ca_bundle.to_vec()));
    }
    for h in v.webhooks.iter_mut().flatten() {
        h.client_config.ca_bundle = Some(ByteString(ca_bundle.to_vec()));
    }
    (m, v)
}

/// Applies the operator RBAC of manifests/base/cwctl-rbac.yaml and binds
/// it to `user`.
async fn grant_operator(cluster: &Cluster, user: &str) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base/cwctl-rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("cwctl-rbac.yaml");
    let client = cluster.client();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).expect("manifest document");
        let pp = PostParams::default();
        match value["kind"].as_str() {
            Some("Role") => {
                let role: Role = serde_json::from_value(value).expect("Role");
                Api::<Role>::namespaced(client.clone(), SYSTEM)
                    .create(&pp, &role)
                    .await
                    .expect("create Role");
            }
            Some("ClusterRole") => {
                let role: ClusterRole = serde_json::from_value(value).expect("ClusterRole");
                Api::<ClusterRole>::all(client.clone())
                    .create(&pp, &role)
                    .await
                    .expect("create ClusterRole");
            }
            // The controller's own binding needs its ServiceAccount; the
            // in-process controllers run as admin.
            _ => {}
        }
    }
    let subject = serde_json::json!([{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]);
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{user}-cwctl"), "namespace": SYSTEM},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "counterweight-operator"},
        "subjects": subject,
    }))
    .expect("RoleBinding");
    Api::<RoleBinding>::namespaced(client.clone(), SYSTEM)
        .create(&PostParams::default(), &rb)
        .await
        .expect("create RoleBinding");
    let crb: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{user}-cwctl-check")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "counterweight-operator-check"},
        "subjects": subject,
    }))
    .expect("ClusterRoleBinding");
    Api::<ClusterRoleBinding>::all(client)
        .create(&PostParams::default(), &crb)
        .await
        .expect("create ClusterRoleBinding");
}

#[test]
fn request_schema_is_shared_by_cwctl_and_the_controller() {
    use counterweight_cli::request as cli;
    // What cwctl files, the controller forwards: both use core's codec.
    let r = cli::new_request(counterweight_core::ha::Command::Switchover {
        target: "west".into(),
    });
    assert!(matches!(
        counterweight_core::request::decide(&r.to_data(), k8s_openapi::jiff::Timestamp::now()),
        counterweight_core::request::Decision::Forward { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cwctl_status_switchover_explain_and_check() {
    init_tracing();
    counterweight_harness::install_crypto_provider();
    let clusters = counterweight_harness::start_named(&["east", "west"])
        .await
        .expect("clusters");
    for c in &clusters {
        prepare(c).await;
    }
    let kubeconfig = clusters[0].dir().join("cwctl.kubeconfig");
    counterweight_harness::write_merged_kubeconfig(&clusters, &kubeconfig).expect("kubeconfig");
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    let router = Arc::new(Router::default());
    let config = ha_config(&["east", "west"]);
    let _east = start_controller(&clusters[0], "east", config.clone(), &router).await;
    let _west = start_controller(&clusters[1], "west", config, &router).await;

    // east (preferred) is elected; both publish health and the HA view.
    eventually(
        "east active, both healthy with an HA view",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let e = state(&cms[0]).await;
            let w = state(&cms[1]).await;
            let ready = e.get("state").map(String::as_str) == Some("active")
                && w.get("state").map(String::as_str) == Some("standby")
                && [&e, &w].iter().all(|d| {
                    d.get(counterweight_core::state::HEALTH_KEY)
                        .is_some_and(|h| h.contains("\"verdict\":\"healthy\""))
                        && d.contains_key("ha")
                })
                // The HA view trails the role by up to a probe interval.
                && e.get(counterweight_core::state::HA_KEY).is_some_and(|h| {
                    h.contains("\"serving\":true") && h.contains("\"west\"")
                });
            if ready {
                Ok(Some(()))
            } else {
                Err(format!("east {e:?}, west {w:?}"))
            }
        },
    )
    .await;

    // ── status -o json matches the ConfigMaps ──────────────────────────
    let status = eventually(
        "status -o json to match the ConfigMaps",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let (r, out) = cwctl(&kubeconfig, &["status", "-o", "json"]).await;
            assert_eq!(r, Ok(Outcome::Ok), "{out}");
            let status: Status = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            for (i, name) in ["east", "west"].iter().enumerate() {
                let data = state(&cms[i]).await;
                let c = status.cluster(name).ok_or(format!("{name} missing"))?;
                let direct = counterweight_cli::status::from_data(name, Some(&data));
                // Fields that do not move while nothing happens must agree
                // exactly; the HA view's lease countdown moves every write.
                let same = c.role.map(|r| r.to_string()) == data.get("state").cloned()
                    && c.epoch.map(|e| e.to_string()) == data.get("epoch").cloned()
                    && c.paused == direct.paused
                    && c.health == direct.health
                    && c.last_transition == direct.last_transition
                    && c.policy
                        == data
                            .get(counterweight_core::state::POLICY_STATUS_KEY)
                            .cloned()
                    && c.serving == direct.serving
                    && c.unreachable.is_none();
                if !same {
                    return Err(format!("{name}: cwctl {c:?} vs ConfigMap {data:?}"));
                }
            }
            Ok(Some(status))
        },
    )
    .await;
    assert_eq!(status.namespace, SYSTEM);
    assert_eq!(status.actives().len(), 1);
    let east_epoch = status.cluster("east").and_then(|c| c.epoch).expect("epoch");
    let health = status
        .cluster("east")
        .and_then(|c| c.health.as_ref())
        .expect("health");
    assert_eq!(health.components.len(), 3);
    // The HA view is read too (cwctl mirrors the controller's JSON; a
    // renamed field would silently drop it).
    let ha = status
        .cluster("east")
        .and_then(|c| c.ha.as_ref())
        .expect("east's HA view");
    assert!(ha.serving, "{ha:?}");
    assert!(ha.lease_expires_in_ms.is_some(), "{ha:?}");
    assert!(ha.peers.contains_key("west"), "{ha:?}");
    assert!((health.threshold - 0.6).abs() < 1e-9);

    let (r, table) = cwctl(&kubeconfig, &["status"]).await;
    assert_eq!(r, Ok(Outcome::Ok));
    println!("cwctl status:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("east") && l.contains("active")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("west") && l.contains("standby")),
        "{table}"
    );
    assert!(table.contains("web") && table.contains("0.60"), "{table}");

    // ── pause / resume reach every controller ──────────────────────────
    let (r, out) = cwctl(&kubeconfig, &["pause", "--timeout", "20s"]).await;
    println!("cwctl pause:\n{out}");
    assert_eq!(r, Ok(Outcome::Ok), "{out}");
    for c in &cms {
        assert_eq!(
            state(c)
                .await
                .get(counterweight_core::state::PAUSED_KEY)
                .map(String::as_str),
            Some("true")
        );
    }
    let (r, out) = cwctl(&kubeconfig, &["resume", "--timeout", "20s"]).await;
    assert_eq!(r, Ok(Outcome::Ok), "{out}");
    for c in &cms {
        assert_eq!(
            state(c)
                .await
                .get(counterweight_core::state::PAUSED_KEY)
                .map(String::as_str),
            Some("false")
        );
    }

    // ── a bad request is answered with a reason, never executed ────────
    cms[0]
        .patch(
            counterweight_core::request::COMMAND_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {
                "command": "reboot", "id": "bad-1",
                "requestedAt": k8s_openapi::jiff::Timestamp::now().to_string(),
            }})),
        )
        .await
        .expect("file a bad request");
    let result = eventually(
        "the controller to reject the bad request",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let cm = cms[0]
                .get(counterweight_core::request::COMMAND_CONFIGMAP)
                .await
                .map_err(|e| e.to_string())?;
            let d = cm.data.unwrap_or_default();
            Ok((d.get("handledId").map(String::as_str) == Some("bad-1"))
                .then(|| d.get("result").cloned().unwrap_or_default()))
        },
    )
    .await;
    assert!(
        result.starts_with("rejected: ") && result.contains("reboot"),
        "{result}"
    );
    assert_eq!(
        state(&cms[0]).await.get("state").map(String::as_str),
        Some("active")
    );

    // ── switchover through the controllers ─────────────────────────────
    let (r, out) = cwctl(&kubeconfig, &["switchover", "--to", "nowhere"]).await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("not one of the clusters")),
        "{r:?} {out}"
    );
    let (r, out) = cwctl(
        &kubeconfig,
        &["switchover", "--to", "west", "--timeout", "30s"],
    )
    .await;
    println!("cwctl switchover:\n{out}");
    assert_eq!(r, Ok(Outcome::Ok), "{out}");
    assert!(
        out.contains("accepted") && out.contains("✓ west is active"),
        "{out}"
    );
    let w = state(&cms[1]).await;
    assert_eq!(w.get("state").map(String::as_str), Some("active"));
    let west_epoch: u64 = w.get("epoch").and_then(|e| e.parse().ok()).expect("epoch");
    assert!(west_epoch > east_epoch, "a new active takes a higher epoch");
    eventually(
        "east to record standby",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            Ok(
                (state(&cms[0]).await.get("state").map(String::as_str) == Some("standby"))
                    .then_some(()),
            )
        },
    )
    .await;
    // The request went to the old active and was answered there.
    let req = cms[0]
        .get(counterweight_core::request::COMMAND_CONFIGMAP)
        .await
        .expect("request")
        .data
        .unwrap_or_default();
    assert_eq!(req.get("command").map(String::as_str), Some("switchover"));
    assert_eq!(req.get("target").map(String::as_str), Some("west"));
    assert_eq!(req.get("result").map(String::as_str), Some("accepted"));
    assert_eq!(req.get("handledId"), req.get("id"));

    // ── explain tells the story ─────────────────────────────────────────
    let explained = eventually(
        "explain to show the handover",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || async {
            let (r, out) = cwctl(&kubeconfig, &["explain"]).await;
            assert_eq!(r, Ok(Outcome::Ok), "{out}");
            Ok((out.contains("Last transition: ")
                && out.contains("HandedOver")
                && out.contains("Promoted"))
            .then_some(out))
        },
    )
    .await;
    println!("cwctl explain:\n{explained}");

    // ── check: a garbage caBundle fails with a hint; fixed, all pass ───
    let ca = counterweight_certs::CertificateAuthority::new("cwctl-e2e-ca").expect("ca");
    let good = ca.pem().cert_pem.as_bytes().to_vec();
    // Stands in for the webhook's listener: `check` connects to it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    for (i, c) in clusters.iter().enumerate() {
        let bundle: &[u8] = if i == 0 { b"not a certificate" } else { &good };
        let (mutating, _) = webhook_configs(port, bundle);
        let (_, validating) = webhook_configs(port, &good);
        Api::<MutatingWebhookConfiguration>::all(c.client())
            .create(&PostParams::default(), &mutating)
            .await
            .expect("mutating");
        Api::<ValidatingWebhookConfiguration>::all(c.client())
            .create(&PostParams::default(), &validating)
            .await
            .expect("validating");
    }
    let (r, out) = cwctl(&kubeconfig, &["check"]).await;
    println!("cwctl check (garbage caBundle on east):\n{out}");
    assert_eq!(r, Ok(Outcome::ChecksFailed), "{out}");
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with('✗')).collect();
    assert_eq!(
        failed,
        [
            "✗ webhook counterweight-inject: inject.counterweight.dev: caBundle holds no PEM certificate"
        ],
        "{out}"
    );
    let hint = out
        .lines()
        .skip_while(|l| !l.starts_with('✗'))
        .nth(1)
        .unwrap_or_default();
    assert!(
        hint.trim_start()
            .starts_with("hint: set clientConfig.caBundle"),
        "{out}"
    );
    // The JSON form carries the same verdict.
    let (_, json) = cwctl(&kubeconfig, &["check", "-o", "json"]).await;
    let report: counterweight_cli::check::Report = serde_json::from_str(&json).expect("json");
    assert!(report.checks.iter().any(|c| !c.ok
        && c.cluster.as_deref() == Some("east")
        && c.name == "webhook counterweight-inject"));

    let mwcs = Api::<MutatingWebhookConfiguration>::all(clusters[0].client());
    let mut fixed = mwcs.get("counterweight-inject").await.expect("get");
    for h in fixed.webhooks.iter_mut().flatten() {
        h.client_config.ca_bundle = Some(ByteString(good.clone()));
    }
    mwcs.replace("counterweight-inject", &PostParams::default(), &fixed)
        .await
        .expect("fix caBundle");
    let (r, out) = cwctl(&kubeconfig, &["check"]).await;
    println!("cwctl check (fixed):\n{out}");
    assert_eq!(r, Ok(Outcome::Ok), "{out}");
    assert!(
        out.contains("✓ peers: 2 clusters, one active: west"),
        "{out}"
    );
    assert!(
        out.contains("✓ webhook counterweight-inject reachable"),
        "{out}"
    );

    // ── an operator with only manifests/base/cwctl-rbac.yaml ────────────
    // Two per-cluster kubeconfigs, merged from a `:`-separated list.
    let olga: Vec<String> = clusters
        .iter()
        .map(|c| {
            c.user_kubeconfig("olga", &[])
                .expect("user kubeconfig")
                .display()
                .to_string()
        })
        .collect();
    let olga = std::path::PathBuf::from(olga.join(":"));
    let (r, out) = cwctl(&olga, &["check", "--context", "east"]).await;
    assert_eq!(r, Ok(Outcome::ChecksFailed), "{out}");
    assert!(
        out.lines()
            .any(|l| l
                .starts_with("✗ operator RBAC: you may not get configmaps/counterweight-state")),
        "{out}"
    );
    for c in &clusters {
        grant_operator(c, "olga").await;
    }
    // RBAC changes reach the authorizer through an informer: poll.
    let out = eventually(
        "olga's check to pass with the operator Roles",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            let (r, out) = cwctl(&olga, &["check"]).await;
            let granted = out
                .lines()
                .filter(|l| l.starts_with("✓ operator RBAC"))
                .count()
                == 2;
            if granted && r == Ok(Outcome::Ok) {
                Ok(Some(out))
            } else {
                Err(format!("{r:?}\n{out}"))
            }
        },
    )
    .await;
    println!("cwctl check as olga:\n{out}");
    let (r, out) = cwctl(&olga, &["switchover", "--to", "east", "--timeout", "30s"]).await;
    println!("cwctl switchover as olga:\n{out}");
    assert_eq!(r, Ok(Outcome::Ok), "{out}");
    assert_eq!(
        state(&cms[0]).await.get("state").map(String::as_str),
        Some("active")
    );

    // The webhook stops: the reachability check says so.
    drop(listener);
    let (r, out) = cwctl(&kubeconfig, &["check", "--context", "west"]).await;
    assert_eq!(r, Ok(Outcome::ChecksFailed), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("✗ webhook counterweight-inject reachable")),
        "{out}"
    );
}

/// A TLS server that completes every handshake and then never answers: an
/// API server stalled behind a healthy load balancer. Returns its address
/// and the CA that signed its certificate.
async fn hung_tls_server() -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca = counterweight_certs::CertificateAuthority::new("hung CA").expect("CA");
    let leaf = ca
        .issue(
            &counterweight_certs::LeafSpec::new("hung", counterweight_certs::Usage::Server)
                .sans(["127.0.0.1"]),
        )
        .expect("leaf");
    let cert = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("cert");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        // Bounded: the test makes a handful of connections.
        for _ in 0..64 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    // Read the request and never answer; end when the
                    // client gives up.
                    let mut buf = [0u8; 4096];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, ca.pem().cert_pem.clone(), task)
}

/// Runs the `cwctl` binary; its exit code, stdout and stderr, and how long
/// it took.
async fn cwctl_bin(kubeconfig: &Path, args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let bin = counterweight_e2e::ha::workspace_bin("cwctl", "COUNTERWEIGHT_CWCTL_BIN");
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("cwctl ends within 60 s")
        .expect("run cwctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Issue 15, item 4: with a context whose API server refuses connections
/// and one that completes TLS and never answers, `status` (table and JSON)
/// and `explain` print both clusters as unreachable, with the cause, and
/// exit 3 so that a script can tell; `explain` reads the clusters and their
/// Events at once, so it costs one `--request-timeout`, not two in a row;
/// and its Event error keeps the cause ("Connection refused").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwctl_exits_3_for_unreachable_clusters_and_explain_waits_one_timeout() {
    init_tracing();
    counterweight_harness::install_crypto_provider();
    let (hung, hung_ca, _server) = hung_tls_server().await;
    // A port nothing listens on: bound, then released.
    let refused = counterweight_harness::free_port().expect("port");
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = dir.path().join("kubeconfig");
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n\
             - name: dead\n  cluster:\n    server: https://127.0.0.1:{refused}\n    certificate-authority-data: {ca}\n\
             - name: hung\n  cluster:\n    server: https://{hung}\n    certificate-authority-data: {ca}\n\
             users:\n- name: u\n  user:\n    token: t\n\
             contexts:\n- name: dead\n  context: {{cluster: dead, user: u}}\n- name: hung\n  context: {{cluster: hung, user: u}}\n\
             current-context: dead\n",
            ca = b64(&hung_ca)
        ),
    )
    .expect("kubeconfig");

    let timeout = Duration::from_secs(3);
    let t = "--request-timeout=3s";
    for output in ["table", "json"] {
        let (code, out, err, _) = cwctl_bin(&kubeconfig, &[t, "-o", output, "status"]).await;
        assert_eq!(code, Some(3), "status -o {output}: {out}\n{err}");
        if output == "json" {
            let s: Status = serde_json::from_str(&out).expect("status JSON");
            assert_eq!(s.unreachable(), ["dead", "hung"], "{out}");
            let why = |c: &str| s.cluster(c).and_then(|c| c.unreachable.clone());
            assert!(
                why("dead").is_some_and(|w| w.contains("Connection refused")),
                "{out}"
            );
            assert!(why("hung").is_some_and(|w| !w.is_empty()), "{out}");
        } else {
            assert!(
                out.contains("dead: unreachable") && out.contains("hung: unreachable"),
                "{out}"
            );
        }
    }

    let (code, out, err, took) = cwctl_bin(&kubeconfig, &[t, "-o", "json", "explain"]).await;
    assert_eq!(code, Some(3), "explain: {out}\n{err}");
    let x: counterweight_cli::explain::Explanation =
        serde_json::from_str(&out).expect("explain JSON");
    assert_eq!(x.status.unreachable(), ["dead", "hung"], "{out}");
    let dead_events = x.event_errors.iter().find(|e| e.starts_with("dead:"));
    assert!(
        dead_events.is_some_and(|e| e.contains("Connection refused")),
        "the Event error keeps its cause: {:?}",
        x.event_errors
    );
    assert!(
        x.event_errors.iter().any(|e| e.starts_with("hung:")),
        "{:?}",
        x.event_errors
    );
    // Reading the records and then the Events one after the other would
    // take two timeouts on the hung cluster (6 s); at once, one.
    assert!(
        took >= timeout && took < timeout * 2 - Duration::from_millis(500),
        "explain took {took:?} with --request-timeout 3s"
    );

    // The in-process API says the same, for callers of the library.
    let (r, _) = cwctl(&kubeconfig, &[t, "status"]).await;
    assert_eq!(
        r,
        Ok(Outcome::Unreachable(vec!["dead".into(), "hung".into()]))
    );
}
