//! The Kustomize tree under `manifests/` against a real kube-apiserver.
//!
//! - `kubectl kustomize` (the kubectl built at the apiserver's version by
//!   `tools/controlplane/build.sh`) renders `base`, `overlays/east` and
//!   `overlays/west`; the overlays must differ exactly where a cluster
//!   differs (its name, its peers, its certificate Secrets, who runs
//!   initdb), and the sample policy and HA config must pass the core's own
//!   validation.
//! - Every rendered object is applied to a real apiserver with server-side
//!   dry-run (`kubectl apply --server-side --dry-run=server`): schema,
//!   defaulting, validation and admission all run; only the write to etcd
//!   is skipped. Namespaces are created for real first, since a dry-run
//!   Namespace does not make its objects admissible. Objects of API groups
//!   the test apiserver does not serve (cert-manager's Issuer and
//!   Certificate: no cert-manager CRDs here) are skipped, and the test says
//!   which.
//! - The controller's RBAC is applied for real and the apiserver is asked
//!   (`kubectl auth can-i --as=<the controller's ServiceAccount>`) about
//!   every request the controller makes, and a few it must not be able to
//!   make; then the requests whose RBAC is subtle (server-side apply that
//!   creates the gate Role, binding it under the escalation rules, Events
//!   with series, the leader-election Lease, the state record) are made for
//!   real as that identity.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use counterweight_controller::gate_access;
use counterweight_controller::state_store::StateStore;
use counterweight_core::ha::HaConfig;
use counterweight_core::policy::{Check, Policy};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::{Binaries, Cluster, start_clusters};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const SYSTEM_NS: &str = "counterweight-system";
const CONTROLLER_SA: &str = "system:serviceaccount:counterweight-system:counterweight-controller";
/// Upper bound of one kubectl invocation (it also gets --request-timeout).
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(200);

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests")
}

/// Runs kubectl with `args` (and `stdin`), bounded by [`KUBECTL_TIMEOUT`].
async fn kubectl(bin: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn kubectl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("kubectl stdin");
        pipe.write_all(input.as_bytes())
            .await
            .expect("write kubectl stdin");
        drop(pipe);
    }
    tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {KUBECTL_TIMEOUT:?}"))
        .expect("kubectl output")
}

/// kubectl against the harness cluster, as its admin.
async fn kubectl_at(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let kubeconfig = cluster.kubeconfig().display().to_string();
    // A discovery cache per cluster, not the user's ~/.kube/cache.
    let cache = cluster.dir().join("kubectl-cache").display().to_string();
    let mut all = vec![
        "--kubeconfig",
        kubeconfig.as_str(),
        "--cache-dir",
        cache.as_str(),
        "--request-timeout=30s",
    ];
    all.extend_from_slice(args);
    kubectl(&cluster.kubectl(), &all, stdin).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kubectl kustomize manifests/<rel>`; panics with kubectl's message on failure.
async fn render(bin: &Path, rel: &str) -> String {
    let dir = manifests_dir().join(rel).display().to_string();
    let out = kubectl(bin, &["kustomize", &dir], None).await;
    assert!(
        out.status.success(),
        "kubectl kustomize {rel} failed ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn id(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or("-"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

/// The value of env `name` of container `container` (init containers too).
fn env<'a>(workload: &'a Value, container: &str, name: &str) -> &'a str {
    let spec = &workload["spec"]["template"]["spec"];
    let containers = spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten();
    containers
        .filter(|c| c["name"] == container)
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{}: no env {name} in {container}", id(workload)))
}

fn volume_secret<'a>(workload: &'a Value, volume: &str) -> &'a str {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["secret"]["secretName"].as_str())
        .unwrap_or_else(|| panic!("{}: no secret volume {volume}", id(workload)))
}

fn binaries() -> Binaries {
    Binaries::locate().expect("control-plane binaries (tools/controlplane/build.sh)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_and_overlays_render_and_differ_where_clusters_differ() {
    init_tracing();
    let bin = binaries().kubectl();
    let base = docs(&render(&bin, "base").await);
    let east = docs(&render(&bin, "overlays/east").await);
    let west = docs(&render(&bin, "overlays/west").await);

    // The base is a template: the cluster name is a placeholder until an
    // overlay sets it.
    let base_ctl = find(&base, "Deployment", "counterweight-controller");
    assert_eq!(
        env(base_ctl, "controller", "COUNTERWEIGHT_CLUSTER"),
        "CHANGE-ME"
    );

    // Both overlays hold the same objects; only values differ.
    let ids = |objs: &[Value]| objs.iter().map(id).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&east),
        ids(&west),
        "east and west render the same objects"
    );
    let base_ids = ids(&base);
    assert!(
        base_ids.is_subset(&ids(&east)),
        "the overlays keep every base object; missing: {:?}",
        base_ids.difference(&ids(&east)).collect::<Vec<_>>()
    );

    for (objs, me, peer) in [(&east, "east", "west"), (&west, "west", "east")] {
        let ctl = find(objs, "Deployment", "counterweight-controller");
        assert_eq!(env(ctl, "controller", "COUNTERWEIGHT_CLUSTER"), me);
        let peers = env(ctl, "controller", "COUNTERWEIGHT_PEERS");
        assert!(
            peers.starts_with(&format!("{peer}=https://")) && peers.contains(peer),
            "{me}: peers {peers:?} must name {peer} only"
        );
        assert!(
            !peers.contains(me),
            "{me} must not list itself as a peer: {peers}"
        );
        assert_eq!(env(ctl, "controller", "COUNTERWEIGHT_LEADER_ELECT"), "true");
        assert_eq!(
            volume_secret(ctl, "peer-tls"),
            format!("counterweight-peer-tls-{me}")
        );
        let webhook = find(objs, "Deployment", "counterweight-webhook");
        assert_eq!(env(webhook, "webhook", "COUNTERWEIGHT_CLUSTER_NAME"), me);

        let db = find(objs, "StatefulSet", "ems-db");
        assert_eq!(env(db, "sync", "COUNTERWEIGHT_SYNC_NAME"), me);
        assert!(env(db, "sync", "COUNTERWEIGHT_SYNC_PEERS").starts_with(&format!("{peer}=")));
        assert_eq!(volume_secret(db, "tls"), format!("ems-db-tls-{me}"));
        // Exactly one cluster creates the database; the other copies it.
        let initdb = env(db, "initdb", "COUNTERWEIGHT_SYNC_INITDB");
        assert_eq!(initdb, if me == "east" { "true" } else { "false" });
        let files = find(objs, "StatefulSet", "ems-files");
        assert!(env(files, "sync", "COUNTERWEIGHT_SYNC_DESTS").contains(&format!(".{peer}.")));

        for o in objs.iter() {
            let cluster = &o["metadata"]["labels"]["counterweight.dev/cluster"];
            assert_eq!(cluster, me, "{}: cluster label", id(o));
        }
        network_policies_name_declared_ports(objs);
    }
}

/// Every NetworkPolicy selects pods of a rendered workload and opens only
/// ports those pods declare by name: a renamed port would otherwise leave
/// a policy that silently admits nothing (or the wrong thing).
fn network_policies_name_declared_ports(objs: &[Value]) {
    let policies: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    assert!(
        policies
            .iter()
            .any(|p| p["metadata"]["name"] == "counterweight-webhook"),
        "the webhook has a NetworkPolicy"
    );
    for policy in policies {
        let selector = &policy["spec"]["podSelector"]["matchLabels"];
        let workload = objs
            .iter()
            .find(|o| {
                let labels = &o["spec"]["template"]["metadata"]["labels"];
                selector
                    .as_object()
                    .is_some_and(|m| m.iter().all(|(k, v)| &labels[k.as_str()] == v))
            })
            .unwrap_or_else(|| panic!("{} selects no rendered workload", id(policy)));
        let declared: BTreeSet<&str> = workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .filter_map(|p| p["name"].as_str())
            .collect();
        for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
            for port in rule["ports"].as_array().into_iter().flatten() {
                if let Some(name) = port["port"].as_str() {
                    assert!(
                        declared.contains(name),
                        "{} opens port {name}, which {} does not declare ({declared:?})",
                        id(policy),
                        id(workload)
                    );
                }
            }
        }
    }
}

/// An overlay's `images:` moves the injected gate with the other images:
/// the webhook's `COUNTERWEIGHT_GATE_IMAGE` is an env value, which kustomize
/// passes by unless told (manifests/base/webhook/kustomizeconfig.yaml).
/// Nothing else of any env changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlays_images_rewrite_the_gate_image_the_webhook_injects() {
    init_tracing();
    let bin = binaries().kubectl();
    // kustomize takes only relative paths to resources: a directory beside
    // manifests/, removed on drop.
    let dir = tempfile::Builder::new()
        .prefix(".images-test-")
        .tempdir_in(manifests_dir().join(".."))
        .expect("a directory beside manifests/");
    let overlay =
        |images: &str| format!("resources: [../manifests/overlays/east]\nimages:\n{images}");
    let render_with = |images: &str| {
        std::fs::write(dir.path().join("kustomization.yaml"), overlay(images))
            .expect("write the overlay");
        let dir = dir.path().display().to_string();
        let bin = bin.clone();
        async move {
            let out = kubectl(&bin, &["kustomize", &dir], None).await;
            assert!(out.status.success(), "kustomize: {}", text(&out.stderr));
            docs(&text(&out.stdout))
        }
    };
    let moved = render_with(
        "  - {name: counterweight/gate, newName: registry.example/cw/gate, newTag: v9}\n",
    )
    .await;
    let kept = render_with("  []\n").await;
    let webhook = find(&moved, "Deployment", "counterweight-webhook");
    assert_eq!(
        env(webhook, "webhook", "COUNTERWEIGHT_GATE_IMAGE"),
        "registry.example/cw/gate:v9",
        "the overlay's images: did not reach the gate the webhook injects"
    );
    let envs = |objs: &[Value]| -> Vec<(String, String)> {
        objs.iter()
            .flat_map(|o| {
                let spec = &o["spec"]["template"]["spec"];
                spec["containers"]
                    .as_array()
                    .into_iter()
                    .chain(spec["initContainers"].as_array())
                    .flatten()
                    .flat_map(|c| c["env"].as_array().into_iter().flatten())
                    .filter(|e| e["name"] != "COUNTERWEIGHT_GATE_IMAGE")
                    .map(move |e| (id(o), e.to_string()))
            })
            .collect()
    };
    assert_eq!(envs(&moved), envs(&kept), "other env values changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_policy_ha_config_and_roles_are_valid() {
    init_tracing();
    let objs = docs(&render(&binaries().kubectl(), "overlays/east").await);

    let policy_cm = find(&objs, "ConfigMap", "counterweight-policy");
    assert_eq!(policy_cm["metadata"]["namespace"], SYSTEM_NS);
    let policy = Policy::from_yaml(
        policy_cm["data"]["policy.yaml"]
            .as_str()
            .expect("policy.yaml"),
    )
    .unwrap_or_else(|e| panic!("sample policy is invalid: {e}"));
    let ha = find(&objs, "ConfigMap", "counterweight-ha");
    let ha: HaConfig = serde_yaml_ng::from_str(ha["data"]["ha.yaml"].as_str().expect("ha.yaml"))
        .expect("ha.yaml parses");
    ha.validate().expect("ha.yaml is valid");
    for c in ["east", "west"] {
        assert!(ha.is_cluster(c), "ha.yaml lists {c}");
    }

    // No Secret is rendered: `kubectl apply -k` would put a placeholder back
    // over the real one (README.md's install step `secrets` creates them).
    let secrets: Vec<String> = objs
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .map(id)
        .collect();
    assert!(
        secrets.is_empty(),
        "the overlay renders Secrets, which every apply -k would reset: {secrets:?}"
    );
    // The controller's Role may read every Secret a check names (and no
    // other Secret).
    let role = find(&objs, "Role", "counterweight-controller");
    let readable: BTreeSet<&str> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| {
            r["resources"]
                .as_array()
                .is_some_and(|a| a.contains(&"secrets".into()))
        })
        .flat_map(|r| r["resourceNames"].as_array().expect("secrets only by name"))
        .filter_map(Value::as_str)
        .collect();
    for c in &policy.components {
        for check in &c.checks {
            if let Check::Postgres(pg) = check {
                assert!(
                    readable.contains(pg.secret_ref.name.as_str()),
                    "the controller may not read {}",
                    pg.secret_ref.name
                );
            }
        }
    }

    // Synchronization pods carry their role (so the webhook's objectSelector
    // skips them and the controller never restarts them); the service
    // Deployment does not. Each policy component selects its pods.
    let role_of = |kind: &str, name: &str| {
        find(&objs, kind, name)["spec"]["template"]["metadata"]["labels"]["counterweight.dev/role"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(
        role_of("StatefulSet", "ems-db").as_deref(),
        Some("database")
    );
    assert_eq!(
        role_of("StatefulSet", "ems-files").as_deref(),
        Some("file-replication")
    );
    assert_eq!(role_of("Deployment", "web"), None);
    let excluded: Vec<&str> = find(
        &objs,
        "MutatingWebhookConfiguration",
        "counterweight-inject",
    )["webhooks"][0]["objectSelector"]["matchExpressions"][0]["values"]
        .as_array()
        .expect("objectSelector values")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in ["database", "file-replication", "ha"] {
        assert!(excluded.contains(&r), "the webhook must skip role {r}");
    }
    for (component, kind, workload) in [
        ("web", "Deployment", "web"),
        ("db", "StatefulSet", "ems-db"),
        ("files", "StatefulSet", "ems-files"),
    ] {
        let c = policy.component(component).expect("component");
        let labels: BTreeMap<String, String> = serde_json::from_value(
            find(&objs, kind, workload)["spec"]["template"]["metadata"]["labels"].clone(),
        )
        .expect("labels");
        assert!(
            c.selector.matches(&labels),
            "component {component} does not select {kind} {workload}"
        );
    }
}

/// API groups (and "" for core) the apiserver serves.
async fn served_groups(cluster: &Cluster) -> BTreeSet<String> {
    let client = cluster.client();
    let mut groups: BTreeSet<String> = client
        .list_api_groups()
        .await
        .expect("list API groups")
        .groups
        .into_iter()
        .map(|g| g.name)
        .collect();
    groups.insert(String::new());
    groups
}

fn group_of(o: &Value) -> String {
    let av = o["apiVersion"].as_str().unwrap_or_default();
    av.rsplit_once('/')
        .map(|(g, _)| g.to_owned())
        .unwrap_or_default()
}

/// Applies `objs` with server-side dry-run in one kubectl call; on failure,
/// applies them one by one to name each refused object with the server's
/// message. Returns the objects skipped because their group is not served.
async fn dry_run_apply(cluster: &Cluster, what: &str, objs: &[Value]) -> Vec<String> {
    let served = served_groups(cluster).await;
    let (apply, skipped): (Vec<&Value>, Vec<&Value>) =
        objs.iter().partition(|o| served.contains(&group_of(o)));
    let yaml = |objs: &[&Value]| {
        objs.iter()
            .map(|o| serde_json::to_string(o).expect("json"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let args = [
        "apply",
        "--server-side",
        "--field-manager=counterweight-e2e",
        "--dry-run=server",
        "-o",
        "name",
        "-f",
        "-",
    ];
    let out = kubectl_at(cluster, &args, Some(&yaml(&apply))).await;
    if !out.status.success() {
        let mut refused = Vec::new();
        for o in &apply {
            let one = kubectl_at(cluster, &args, Some(&yaml(&[*o]))).await;
            if !one.status.success() {
                refused.push(format!("{}: {}", id(o), text(&one.stderr).trim()));
            }
        }
        panic!(
            "{what}: the apiserver refused {} object(s):\n{}\n(kubectl said: {})",
            refused.len(),
            refused.join("\n"),
            text(&out.stderr).trim()
        );
    }
    // `-o name` prints one line per object: none was silently dropped.
    let printed = text(&out.stdout).lines().count();
    assert_eq!(
        printed,
        apply.len(),
        "{what}: kubectl applied {printed} of {} objects",
        apply.len()
    );
    skipped.iter().map(|o| id(o)).collect()
}

/// Creates the Namespaces of `objs` for real, by name only: a dry-run
/// Namespace does not make the objects in it admissible, and the rendered
/// labels differ per overlay (they are checked by the dry-run apply, which
/// would otherwise conflict with the creator's fields).
async fn create_namespaces(cluster: &Cluster, objs: &[Value]) {
    let api: Api<Namespace> = Api::all(cluster.client());
    for o in objs.iter().filter(|o| o["kind"] == "Namespace") {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: o["metadata"]["name"].as_str().map(str::to_owned),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create {}: {e}", id(o)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_object_passes_server_side_dry_run() {
    init_tracing();
    let cluster = start_clusters(1).await.expect("cluster").remove(0);
    let bin = cluster.kubectl();
    for rel in ["base", "overlays/east", "overlays/west"] {
        let objs = docs(&render(&bin, rel).await);
        create_namespaces(&cluster, &objs).await;
        let skipped = dry_run_apply(&cluster, rel, &objs).await;
        assert!(
            skipped.is_empty(),
            "{rel}: unexpectedly skipped {skipped:?}"
        );
    }

    // The cert-manager variant of the webhook certificate, as an overlay
    // would add it. Its Issuer and Certificate need cert-manager's CRDs,
    // which this apiserver does not have: they are skipped (and listed), the
    // patched webhook configurations are still checked.
    // Kustomize refuses absolute paths: link the tree into a temporary
    // kustomization root instead of writing into the checkout.
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(manifests_dir(), dir.path().join("manifests"))
        .expect("link manifests/");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources: [manifests/base]\ncomponents: [manifests/base/webhook/cert-manager]\n",
    )
    .expect("write kustomization");
    let out = kubectl(
        &bin,
        &["kustomize", &dir.path().display().to_string()],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "cert-manager variant: {}",
        text(&out.stderr)
    );
    let objs = docs(&text(&out.stdout));
    let hooked = find(
        &objs,
        "MutatingWebhookConfiguration",
        "counterweight-inject",
    );
    assert_eq!(
        hooked["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "counterweight-system/counterweight-webhook"
    );
    let skipped = dry_run_apply(&cluster, "base + cert-manager", &objs).await;
    eprintln!("skipped (cert-manager CRDs absent in the test apiserver): {skipped:?}");
    assert_eq!(
        skipped,
        [
            "Certificate counterweight-system/counterweight-webhook",
            "Issuer counterweight-system/counterweight-selfsigned"
        ]
    );
}

/// Applies the RBAC objects (and the Namespaces and the controller's
/// ServiceAccount) of the east
/// rendering for real, except the gate Role, which the controller must be
/// able to create itself.
async fn apply_controller_rbac(cluster: &Cluster) {
    let objs = docs(&render(&cluster.kubectl(), "overlays/east").await);
    create_namespaces(cluster, &objs).await;
    let rbac: Vec<String> = objs
        .iter()
        .filter(|o| {
            // Namespaces with their labels: `ems` opts in.
            group_of(o) == "rbac.authorization.k8s.io"
                || o["kind"] == "Namespace"
                || (o["kind"] == "ServiceAccount"
                    && o["metadata"]["name"] == "counterweight-controller")
        })
        .filter(|o| {
            !(o["kind"] == "Role" && o["metadata"]["name"] == counterweight_core::names::GATE_ROLE)
        })
        .map(|o| serde_json::to_string(o).expect("json"))
        .collect();
    assert!(
        rbac.len() >= 10,
        "expected the controller's RBAC objects, got {}",
        rbac.len()
    );
    apply_for_real(cluster, "RBAC", &rbac).await;
}

/// Applies `objs` (JSON documents) for real, server-side, as the test's
/// field manager; `what` names them if the apiserver refuses.
async fn apply_for_real(cluster: &Cluster, what: &str, objs: &[String]) {
    let out = kubectl_at(
        cluster,
        &[
            "apply",
            "--server-side",
            "--field-manager=counterweight-e2e",
            "-f",
            "-",
        ],
        Some(&objs.join("\n---\n")),
    )
    .await;
    assert!(out.status.success(), "apply {what}: {}", text(&out.stderr));
}

/// `kubectl auth can-i <verb> <resource> [-n ns] --as=<controller>`.
/// `resource` is `type` or `type/name`, except `pods/status` and
/// `pods/eviction`, which mean the subresource (kubectl would read them as
/// pods named "status" and "eviction").
async fn can_i(cluster: &Cluster, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let as_sa = format!("--as={CONTROLLER_SA}");
    let (resource, sub) = match resource.split_once('/') {
        Some(("pods", sub @ ("status" | "eviction"))) => {
            ("pods", Some(format!("--subresource={sub}")))
        }
        _ => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, as_sa.as_str()];
    if let Some(sub) = &sub {
        args.push(sub);
    }
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let out = kubectl_at(cluster, &args, None).await;
    // Exit 0: yes; 1: no; anything else: the question itself failed.
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "kubectl auth can-i {verb} {resource}: {}",
            text(&out.stderr)
        ),
    }
}

/// A client that is the controller's ServiceAccount, by impersonation (the
/// harness admin is in system:masters), with the groups its token carries.
async fn controller_client(cluster: &Cluster) -> kube::Client {
    service_account_client(cluster, CONTROLLER_SA).await
}

/// A client that is `user`, a ServiceAccount of the controller's namespace,
/// by impersonation, with the groups its token would carry.
async fn service_account_client(cluster: &Cluster, user: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(cluster.kubeconfig()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{SYSTEM_NS}"),
        "system:authenticated".to_owned(),
    ]);
    kube::Client::try_from(config).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_rbac_allows_what_the_controller_does_and_no_more() {
    init_tracing();
    let cluster = start_clusters(1).await.expect("cluster").remove(0);
    apply_controller_rbac(&cluster).await;
    let sys = Some(SYSTEM_NS);
    // RBAC reaches the authorizer through an informer: wait for the grants.
    eventually("the controller's RBAC in effect", WAIT, TICK, || async {
        Ok(can_i(&cluster, "watch", "pods", None).await.then_some(()))
    })
    .await;

    // (verb, resource, namespace): every request the controller makes.
    let allowed: &[(&str, &str, Option<&str>)] = &[
        // health/: cluster-wide pod watch; serving/: list, watch, get.
        ("get", "pods", None),
        ("list", "pods", None),
        ("watch", "pods", None),
        // serving/: the serving condition, restarts, the delete fallback.
        ("patch", "pods/status", Some("ems")),
        ("create", "pods/eviction", Some("ems")),
        ("delete", "pods", Some("ems")),
        // gate_access.rs and serving/: opted-in namespaces.
        ("list", "namespaces", None),
        ("watch", "namespaces", None),
        // state_store.rs: the state record (create when missing, CAS update).
        ("get", "configmaps/counterweight-state", sys),
        ("update", "configmaps/counterweight-state", sys),
        ("create", "configmaps", sys),
        // gate_access.rs: must hold what the gate Role grants.
        ("list", "configmaps/counterweight-state", sys),
        ("watch", "configmaps/counterweight-state", sys),
        // health/: the policy (watch by field selector = by name).
        ("get", "configmaps/counterweight-policy", sys),
        ("list", "configmaps/counterweight-policy", sys),
        ("watch", "configmaps/counterweight-policy", sys),
        // commands.rs: the operator request.
        ("get", "configmaps/counterweight-command", sys),
        ("list", "configmaps/counterweight-command", sys),
        ("watch", "configmaps/counterweight-command", sys),
        ("patch", "configmaps/counterweight-command", sys),
        // health/: the sample policy's PostgreSQL check credentials.
        ("get", "secrets/ems-db-monitor", sys),
        // events.rs (kube-runtime Recorder, events.k8s.io/v1).
        ("create", "events.events.k8s.io", sys),
        ("patch", "events.events.k8s.io", sys),
        // gate_access.rs: the gate Role (server-side apply) and bindings.
        (
            "patch",
            "roles.rbac.authorization.k8s.io/counterweight-gate",
            sys,
        ),
        (
            "create",
            "roles.rbac.authorization.k8s.io/counterweight-gate",
            sys,
        ),
        ("list", "rolebindings.rbac.authorization.k8s.io", sys),
        ("create", "rolebindings.rbac.authorization.k8s.io", sys),
        ("patch", "rolebindings.rbac.authorization.k8s.io", sys),
        ("delete", "rolebindings.rbac.authorization.k8s.io", sys),
        // Leader election among the replicas.
        (
            "get",
            "leases.coordination.k8s.io/counterweight-controller",
            sys,
        ),
        (
            "update",
            "leases.coordination.k8s.io/counterweight-controller",
            sys,
        ),
        ("create", "leases.coordination.k8s.io", sys),
    ];
    let mut missing = Vec::new();
    for (verb, resource, ns) in allowed {
        if !can_i(&cluster, verb, resource, *ns).await {
            missing.push(format!(
                "{verb} {resource} in {}",
                ns.unwrap_or("all namespaces")
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the controller's RBAC lacks:\n{}",
        missing.join("\n")
    );

    // Least privilege: what it must not be able to do.
    let refused: &[(&str, &str, Option<&str>)] = &[
        ("get", "secrets/counterweight-webhook-tls", sys),
        ("list", "secrets", sys),
        ("get", "secrets", Some("ems")),
        ("list", "configmaps", sys),
        ("update", "configmaps/counterweight-policy", sys),
        ("delete", "configmaps/counterweight-state", sys),
        ("create", "pods", Some("ems")),
        ("update", "pods", Some("ems")),
        (
            "delete",
            "roles.rbac.authorization.k8s.io/counterweight-gate",
            sys,
        ),
        (
            "patch",
            "roles.rbac.authorization.k8s.io/counterweight-controller",
            sys,
        ),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            Some("ems"),
        ),
        (
            "update",
            "leases.coordination.k8s.io/kube-scheduler",
            Some("kube-system"),
        ),
        ("create", "events", sys),
        (
            "bind",
            "clusterroles.rbac.authorization.k8s.io/cluster-admin",
            None,
        ),
    ];
    let mut excess = Vec::new();
    for (verb, resource, ns) in refused {
        if can_i(&cluster, verb, resource, *ns).await {
            excess.push(format!(
                "{verb} {resource} in {}",
                ns.unwrap_or("all namespaces")
            ));
        }
    }
    assert!(
        excess.is_empty(),
        "the controller's RBAC allows too much:\n{}",
        excess.join("\n")
    );

    // The requests whose authorization is more than one verb, made for real.
    let me = controller_client(&cluster).await;
    // Gate access: the gate Role does not exist, so server-side apply
    // creates it (authorized as create + patch), and binding it to `ems`
    // passes the escalation check only because the controller holds what
    // the Role grants.
    let summary = gate_access::reconcile_gate_access(me.clone(), SYSTEM_NS)
        .await
        .unwrap_or_else(|e| panic!("reconcile gate access as the controller: {e}"));
    assert_eq!(summary.bound, ["ems"]);
    // The state record: created when missing, then compare-and-swap.
    let store = StateStore::new(
        me.clone(),
        SYSTEM_NS,
        counterweight_core::names::STATE_CONFIGMAP,
    );
    store
        .update(|_| {})
        .await
        .unwrap_or_else(|e| panic!("create the state record as the controller: {e}"));
    store
        .update(|d| {
            d.insert("note".to_owned(), "rbac".to_owned());
        })
        .await
        .unwrap_or_else(|e| panic!("update the state record as the controller: {e}"));
    // Events: the first is created, the repeat patches its series.
    let recorder = Recorder::new(
        me.clone(),
        Reporter {
            controller: "counterweight-controller".into(),
            instance: Some("east".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(SYSTEM_NS.into()),
        name: Some(counterweight_core::names::STATE_CONFIGMAP.into()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "RbacCheck".into(),
        note: Some("manifests e2e".into()),
        action: "Check".into(),
        secondary: None,
    };
    for n in 1..=2 {
        recorder
            .publish(&event, &reference)
            .await
            .unwrap_or_else(|e| panic!("Event #{n} as the controller: {e}"));
    }
    // The leader-election Lease: create, read, renew.
    let leases: Api<Lease> = Api::namespaced(me.clone(), SYSTEM_NS);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("counterweight-controller".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("counterweight-controller-0".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the Lease as the controller");
    let mut current = leases
        .get("counterweight-controller")
        .await
        .expect("get the Lease as the controller");
    if let Some(spec) = current.spec.as_mut() {
        spec.holder_identity = Some("counterweight-controller-1".into());
    }
    leases
        .replace("counterweight-controller", &PostParams::default(), &current)
        .await
        .expect("update the Lease as the controller");
    // And it cannot list Leases (nothing in its code does).
    assert!(
        leases.list(&ListParams::default()).await.is_err(),
        "listing Leases must be refused"
    );
}

/// The name of the FlowSchema the API server filed `path` under when the
/// controller's ServiceAccount asked for it (its UID comes back in
/// `X-Kubernetes-PF-FlowSchema-UID` on every answer, errors included).
async fn flow_schema_of(
    cluster: &Cluster,
    as_controller: &kube::Client,
    path: &str,
) -> Result<String, String> {
    let req = http::Request::get(path)
        .body(kube::client::Body::empty())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let resp = as_controller
        .send(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let uid = resp
        .headers()
        .get("X-Kubernetes-PF-FlowSchema-UID")
        .ok_or_else(|| format!("GET {path}: no X-Kubernetes-PF-FlowSchema-UID in the answer"))?
        .to_str()
        .map_err(|e| format!("GET {path}: the FlowSchema UID is not text: {e}"))?
        .to_owned();
    let schemas: Api<FlowSchema> = Api::all(cluster.client());
    let list = schemas
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list FlowSchemas: {e}"))?;
    list.items
        .into_iter()
        .find(|f| f.metadata.uid.as_deref() == Some(uid.as_str()))
        .and_then(|f| f.metadata.name)
        .ok_or_else(|| format!("GET {path}: no FlowSchema has UID {uid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_state_writes_are_ahead_of_pod_churn() {
    init_tracing();
    let cluster = start_clusters(1).await.expect("cluster").remove(0);
    let objs = docs(&render(&cluster.kubectl(), "overlays/east").await);
    create_namespaces(&cluster, &objs).await;
    let as_controller = controller_client(&cluster).await;
    let state = format!(
        "/api/v1/namespaces/{SYSTEM_NS}/configmaps/{}",
        counterweight_core::names::STATE_CONFIGMAP
    );
    let lease = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/counterweight-controller"
    );
    let pods = "/api/v1/pods?limit=1";

    // Without the manifests' FlowSchemas the controller is a workload like
    // any other: the API server's built-in `service-accounts`.
    for path in [state.as_str(), pods] {
        assert_eq!(
            flow_schema_of(&cluster, &as_controller, path).await,
            Ok("service-accounts".to_owned()),
            "{path} before the FlowSchemas are applied"
        );
    }

    let schemas: Vec<String> = objs
        .iter()
        .filter(|o| o["kind"] == "FlowSchema")
        .map(|o| serde_json::to_string(o).expect("json"))
        .collect();
    assert_eq!(schemas.len(), 2, "the controller's two FlowSchemas");
    apply_for_real(&cluster, "FlowSchemas", &schemas).await;

    // The API server's flow-control configuration follows FlowSchemas
    // through an informer: wait for each request to be filed anew.
    for (path, want) in [
        (state.as_str(), "counterweight-state"),
        (lease.as_str(), "counterweight-state"),
        (pods, "counterweight-controller"),
    ] {
        eventually(
            &format!("{path} filed under {want}"),
            WAIT,
            TICK,
            || async {
                let got = flow_schema_of(&cluster, &as_controller, path).await?;
                if got == want {
                    Ok(Some(()))
                } else {
                    Err(format!("filed under {got}"))
                }
            },
        )
        .await;
    }
    // The levels they name exist (a FlowSchema naming a missing level
    // would be dangling), and are the ones Kubernetes keeps for its own
    // leader election and controllers.
    let levels: Api<PriorityLevelConfiguration> = Api::all(cluster.client());
    for (schema, level) in [
        ("counterweight-state", "leader-election"),
        ("counterweight-controller", "workload-high"),
    ] {
        let fs = Api::<FlowSchema>::all(cluster.client())
            .get(schema)
            .await
            .expect("FlowSchema");
        assert_eq!(
            fs.spec.map(|s| s.priority_level_configuration.name),
            Some(level.to_owned()),
            "{schema}'s priority level"
        );
        levels
            .get(level)
            .await
            .unwrap_or_else(|e| panic!("priority level {level} of {schema}: {e}"));
    }
    // Another ServiceAccount's request for the same record is not lifted.
    let other = service_account_client(
        &cluster,
        &format!("system:serviceaccount:{SYSTEM_NS}:someone-else"),
    )
    .await;
    assert_eq!(
        flow_schema_of(&cluster, &other, &state).await,
        Ok("service-accounts".to_owned()),
        "another ServiceAccount's read of the state record"
    );
}
