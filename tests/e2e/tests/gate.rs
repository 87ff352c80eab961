//! End-to-end tests of the init-gate (issue 6) against real local control
//! planes: the `counterweight-gate` binary runs as a real process, the state
//! ConfigMap is flipped with an admin client, and the RBAC the controller
//! grants (`gate_access`) is checked with the identity of a pod's service
//! account.
//!
//! The gate binary is taken from `COUNTERWEIGHT_GATE_BIN` if set, else built
//! with `cargo build -p counterweight-gate` into the current target directory
//! (cargo cannot hand another package's binary to an integration test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use counterweight_controller::gate_access;
use counterweight_core::names;
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::Cluster;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

const SYSTEM_NS: &str = names::SYSTEM_NAMESPACE;
const STATE: &str = names::STATE_CONFIGMAP;
/// Generous for a busy two-core machine; every wait ends as soon as its
/// condition holds.
const WAIT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(20);

/// Path of the gate binary, built once per test process.
fn gate_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("COUNTERWEIGHT_GATE_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "counterweight-gate",
                "--bin",
                "counterweight-gate",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build -p counterweight-gate");
        assert!(out.status.success(), "building counterweight-gate failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("executable")?.as_str().map(PathBuf::from))
            .find(|p| p.file_name().is_some_and(|n| n == "counterweight-gate"))
            .expect("cargo reported the counterweight-gate executable")
    })
    .clone()
}

/// A running gate process with its output collected line by line.
struct Gate {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    // The tasks copying stdout and stderr into `lines`; they end at EOF.
    readers: Vec<tokio::task::JoinHandle<()>>,
    epoch_file: PathBuf,
}

impl Gate {
    fn start(kubeconfig: &Path, dir: &Path, extra: &[&str]) -> Self {
        let epoch_file = dir.join(format!("epoch-{}", unique()));
        let mut child = tokio::process::Command::new(gate_binary())
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--epoch-file={}", epoch_file.display()))
            .args(["--cluster=c0", "--poll-interval=1s"])
            .args(extra)
            // Keep the environment from choosing a different ConfigMap.
            .env_remove("COUNTERWEIGHT_STATE_NAMESPACE")
            .env_remove("COUNTERWEIGHT_STATE_NAME")
            .env_remove("COUNTERWEIGHT_GATE_TIMEOUT")
            .env("COUNTERWEIGHT_LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn counterweight-gate");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = Arc::clone(&lines);
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    eprintln!("gate| {line}");
                    lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            }));
        }
        Self {
            child,
            lines,
            readers,
            epoch_file,
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .join("\n")
    }

    /// Waits until a log line contains `needle`; the gate must still run.
    async fn wait_line(&mut self, needle: &str) {
        eventually(&format!("gate log line {needle:?}"), WAIT, TICK, || async {
            Ok((self.count(needle) > 0).then_some(()))
        })
        .await;
        self.assert_running();
    }

    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("poll the gate process");
        assert!(
            status.is_none(),
            "the gate exited ({status:?}) but must keep blocking; log:\n{}",
            self.log()
        );
    }

    /// Waits for the gate to exit and for its last log lines to be read:
    /// lines still in the pipe at exit would otherwise be missed.
    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for the gate"),
            Err(_) => panic!(
                "the gate did not exit within {within:?}; log:\n{}",
                self.log()
            ),
        };
        for reader in self.readers.drain(..) {
            tokio::time::timeout(within, reader)
                .await
                .expect("the gate's output ends after it exits")
                .expect("log reader task");
        }
        status
    }

    fn pid(&self) -> nix::unistd::Pid {
        let id = self.child.id().expect("gate still running");
        nix::unistd::Pid::from_raw(i32::try_from(id).expect("pid fits i32"))
    }
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn state(role: &str, epoch: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("state".to_owned(), role.to_owned()),
        ("epoch".to_owned(), epoch.to_string()),
    ])
}

/// Sets the state ConfigMap's data to exactly `data`, creating it if needed.
async fn set_state(client: &kube::Client, data: BTreeMap<String, String>) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NS);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(STATE.to_owned()),
            namespace: Some(SYSTEM_NS.to_owned()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    cms.patch(
        STATE,
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&cm),
    )
    .await
    .expect("apply the state ConfigMap");
}

async fn delete_state(client: &kube::Client) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NS);
    cms.delete(STATE, &DeleteParams::default())
        .await
        .expect("delete the state ConfigMap");
}

async fn create_namespace(client: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

async fn one_cluster() -> Cluster {
    init_tracing();
    let mut clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = clusters.remove(0);
    create_namespace(&cluster.client(), SYSTEM_NS, &[]).await;
    cluster
}

fn read_epoch(gate: &Gate) -> String {
    std::fs::read_to_string(&gate.epoch_file).unwrap_or_else(|e| {
        panic!(
            "epoch file {} after release: {e}",
            gate.epoch_file.display()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_blocks_while_standby_and_releases_on_active() {
    let cluster = one_cluster().await;
    let client = cluster.client();
    set_state(&client, state("standby", 3)).await;

    let mut gate = Gate::start(cluster.kubeconfig(), cluster.dir(), &[]);
    gate.wait_line("waiting: cluster c0 is standby (epoch 3) since ")
        .await;
    assert!(!gate.epoch_file.exists(), "no epoch file while blocked");

    let flipped = Instant::now();
    set_state(&client, state("active", 4)).await;
    let status = gate.wait_exit(WAIT).await;
    let latency = flipped.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", gate.log());
    assert_eq!(read_epoch(&gate), "4\n");
    assert_eq!(
        gate.count("released: cluster c0 is active (epoch 4) after "),
        1
    );
    // The watch, not the 1 s polling fallback, delivered the flip.
    assert_eq!(gate.count("state unknown"), 0, "log:\n{}", gate.log());
    assert!(latency < Duration::from_secs(1), "release took {latency:?}");

    // An already-active cluster releases a new gate at once.
    let mut again = Gate::start(cluster.kubeconfig(), cluster.dir(), &[]);
    assert_eq!(again.wait_exit(WAIT).await.code(), Some(0));
    assert_eq!(read_epoch(&again), "4\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_keeps_blocking_through_deletion_garbage_and_apiserver_restart() {
    let mut cluster = one_cluster().await;
    let client = cluster.client();
    set_state(&client, state("standby", 5)).await;
    let mut gate = Gate::start(cluster.kubeconfig(), cluster.dir(), &[]);
    gate.wait_line("is standby (epoch 5)").await;

    delete_state(&client).await;
    gate.wait_line("the state ConfigMap does not exist").await;

    let garbage = BTreeMap::from([
        ("state".to_owned(), "ACTIVE!".to_owned()),
        ("epoch".to_owned(), "-1".to_owned()),
    ]);
    set_state(&client, garbage).await;
    gate.wait_line("the state ConfigMap is malformed").await;
    // Only an `epoch` key, no `state`: still not active.
    set_state(
        &client,
        BTreeMap::from([("epoch".to_owned(), "9".to_owned())]),
    )
    .await;
    gate.wait_line("lacks key `state`").await;

    // API server down: the gate keeps retrying (watch with backoff, polling
    // fallback every second) and reports it once, not once per retry.
    set_state(&client, state("standby", 6)).await;
    gate.wait_line("is standby (epoch 6)").await;
    cluster.stop_apiserver();
    gate.wait_line("the API server is unreachable").await;
    let down_since = Instant::now();
    // Let several retries happen while the API server is down; the gate's
    // own retries are what is observed, so this is not synchronisation.
    eventually(
        "the gate retries while the API server is down",
        WAIT,
        TICK,
        || async { Ok((down_since.elapsed() > Duration::from_secs(3)).then_some(())) },
    )
    .await;
    gate.assert_running();
    assert_eq!(
        gate.count("the API server is unreachable"),
        1,
        "a persisting reason is logged once per minute; log:\n{}",
        gate.log()
    );
    cluster.start_apiserver().await.expect("apiserver restarts");
    gate.assert_running();
    assert!(!gate.epoch_file.exists(), "no epoch file while blocked");

    set_state(&client, state("active", 7)).await;
    let status = gate.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", gate.log());
    assert_eq!(read_epoch(&gate), "7\n");
    assert_eq!(gate.count("released: cluster c0 is active (epoch 7)"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_exits_promptly_on_sigterm_and_on_timeout() {
    let mut cluster = one_cluster().await;
    let client = cluster.client();
    set_state(&client, state("standby", 1)).await;

    // SIGTERM while blocked on the watch.
    let mut gate = Gate::start(cluster.kubeconfig(), cluster.dir(), &[]);
    gate.wait_line("is standby (epoch 1)").await;
    let sent = Instant::now();
    nix::sys::signal::kill(gate.pid(), nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
    let status = gate.wait_exit(Duration::from_secs(1)).await;
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Some(143), "log:\n{}", gate.log());
    assert!(!gate.epoch_file.exists());

    // --timeout: exits 75 (EX_TEMPFAIL) without an epoch file.
    let mut gate = Gate::start(cluster.kubeconfig(), cluster.dir(), &["--timeout=2s"]);
    gate.wait_line("is standby (epoch 1)").await;
    let status = gate.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(75), "log:\n{}", gate.log());
    assert!(!gate.epoch_file.exists());

    // SIGTERM while the API server is down and the gate is backing off.
    let mut gate = Gate::start(cluster.kubeconfig(), cluster.dir(), &[]);
    gate.wait_line("is standby (epoch 1)").await;
    cluster.stop_apiserver();
    gate.wait_line("the API server is unreachable").await;
    let sent = Instant::now();
    nix::sys::signal::kill(gate.pid(), nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
    let status = gate.wait_exit(Duration::from_secs(1)).await;
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Some(143), "log:\n{}", gate.log());
}

/// Asks the API server whether the caller may `verb` the resource.
async fn can_i(
    client: &kube::Client,
    verb: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
) -> bool {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_owned()),
                verb: Some(verb.to_owned()),
                resource: Some(resource.to_owned()),
                name: name.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("load kubeconfig");
    kube::Client::try_from(config).expect("client")
}

fn is_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403)
}

/// A kubeconfig with a real token of the `default` service account of
/// `ns`, obtained through the TokenRequest API: exactly the identity the
/// gate has in a pod of that namespace (user
/// `system:serviceaccount:<ns>:default`, groups `system:serviceaccounts`,
/// `system:serviceaccounts:<ns>`, `system:authenticated`).
async fn service_account_kubeconfig(cluster: &Cluster, ns: &str) -> PathBuf {
    token_kubeconfig(cluster, ns, "default").await
}

/// A kubeconfig with a real token of service account `ns/sa`.
async fn token_kubeconfig(cluster: &Cluster, ns: &str, sa: &str) -> PathBuf {
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.client(), ns);
    // kube-controller-manager creates the default account shortly after the namespace.
    eventually("the ServiceAccount", WAIT, TICK, || async {
        sas.get_opt(sa).await.map_err(|e| e.to_string())
    })
    .await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(Vec::new()),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the service account");
    let token = issued.status.expect("token status").token;
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": cluster.server_url(),
            "certificate-authority": cluster.ca_cert(),
        }}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    });
    let path = cluster.dir().join(format!("sa-{ns}-{sa}.kubeconfig"));
    std::fs::write(&path, kubeconfig.to_string()).expect("write service-account kubeconfig");
    path
}

/// Creates the objects of the static gate manifests
/// (`manifests/base/gate/*.yaml`) and returns the gate Role found there.
async fn apply_gate_manifests(client: &kube::Client) -> Role {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base/gate");
    let mut gate_role = None;
    for file in ["gate-role.yaml", "controller-gate-access.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read manifest");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).expect("manifest YAML");
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let pp = PostParams::default();
            match kind.as_str() {
                "Role" => {
                    let role: Role = serde_json::from_value(value).expect("Role");
                    let ns = role.metadata.namespace.clone().expect("namespaced");
                    if role.metadata.name.as_deref() == Some(counterweight_core::names::GATE_ROLE) {
                        gate_role = Some(role.clone());
                    }
                    Api::<Role>::namespaced(client.clone(), &ns)
                        .create(&pp, &role)
                        .await
                        .expect("create Role");
                }
                "RoleBinding" => {
                    let rb: RoleBinding = serde_json::from_value(value).expect("RoleBinding");
                    let ns = rb.metadata.namespace.clone().expect("namespaced");
                    Api::<RoleBinding>::namespaced(client.clone(), &ns)
                        .create(&pp, &rb)
                        .await
                        .expect("create RoleBinding");
                }
                "ClusterRole" => {
                    let cr: ClusterRole = serde_json::from_value(value).expect("ClusterRole");
                    Api::<ClusterRole>::all(client.clone())
                        .create(&pp, &cr)
                        .await
                        .expect("create ClusterRole");
                }
                "ClusterRoleBinding" => {
                    let crb: ClusterRoleBinding =
                        serde_json::from_value(value).expect("ClusterRoleBinding");
                    Api::<ClusterRoleBinding>::all(client.clone())
                        .create(&pp, &crb)
                        .await
                        .expect("create ClusterRoleBinding");
                }
                other => panic!("unexpected kind {other:?} in {file}"),
            }
        }
    }
    gate_role.expect("gate-role.yaml holds the gate Role")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_of_opted_in_namespaces_read_only_the_state() {
    let cluster = one_cluster().await;
    let admin = cluster.client();
    set_state(&admin, state("standby", 2)).await;
    let policy: Api<ConfigMap> = Api::namespaced(admin.clone(), SYSTEM_NS);
    policy
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some(names::POLICY_CONFIGMAP.to_owned()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create the policy ConfigMap");
    create_namespace(
        &admin,
        "shop",
        &[(names::INJECT_LABEL, names::INJECT_ENABLED)],
    )
    .await;
    create_namespace(&admin, "other", &[]).await;

    // The controller runs with only the static manifests' permissions: they
    // must suffice to apply the Role and bind it (RBAC escalation checks).
    let manifest_role = apply_gate_manifests(&admin).await;
    let code_role = gate_access::gate_role(SYSTEM_NS);
    assert_eq!(
        manifest_role.rules, code_role.rules,
        "manifest and controller agree"
    );
    assert_eq!(manifest_role.metadata.labels, code_role.metadata.labels);
    Api::<ServiceAccount>::namespaced(admin.clone(), SYSTEM_NS)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("counterweight-controller".to_owned()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create the controller ServiceAccount");
    let controller =
        client_for(&token_kubeconfig(&cluster, SYSTEM_NS, "counterweight-controller").await).await;
    let summary = eventually("reconcile as the controller", WAIT, TICK, || async {
        // RBAC reaches the authorizer through an informer: retry until the
        // manifests' grants are in effect.
        match gate_access::reconcile_gate_access(controller.clone(), SYSTEM_NS).await {
            Ok(summary) => Ok(Some(summary)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert_eq!(summary.bound, ["shop"]);
    let again = gate_access::reconcile_gate_access(controller.clone(), SYSTEM_NS)
        .await
        .expect("reconcile again");
    assert_eq!(
        again,
        gate_access::Summary::default(),
        "reconcile is idempotent"
    );

    let shop_kc = service_account_kubeconfig(&cluster, "shop").await;
    let shop = client_for(&shop_kc).await;
    // RBAC reaches the authorizer through an informer; wait for the binding.
    eventually(
        "the shop service account to be allowed",
        WAIT,
        TICK,
        || async {
            Ok(can_i(&shop, "get", "configmaps", SYSTEM_NS, Some(STATE))
                .await
                .then_some(()))
        },
    )
    .await;

    // Allowed: get, list and watch of exactly the state ConfigMap.
    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(&shop, verb, "configmaps", SYSTEM_NS, Some(STATE)).await,
            "{verb}"
        );
    }
    // Denied: everything else.
    for (verb, resource, ns, name) in [
        ("list", "configmaps", SYSTEM_NS, None),
        ("watch", "configmaps", SYSTEM_NS, None),
        (
            "get",
            "configmaps",
            SYSTEM_NS,
            Some(names::POLICY_CONFIGMAP),
        ),
        ("update", "configmaps", SYSTEM_NS, Some(STATE)),
        ("patch", "configmaps", SYSTEM_NS, Some(STATE)),
        ("delete", "configmaps", SYSTEM_NS, Some(STATE)),
        ("create", "configmaps", SYSTEM_NS, None),
        ("get", "secrets", SYSTEM_NS, None),
        ("list", "pods", SYSTEM_NS, None),
        ("get", "configmaps", "shop", None),
        ("list", "rolebindings", SYSTEM_NS, None),
    ] {
        assert!(
            !can_i(&shop, verb, resource, ns, name).await,
            "{verb} {resource} {ns}/{name:?} must be denied"
        );
    }

    // The same, with real requests.
    let shop_cms: Api<ConfigMap> = Api::namespaced(shop.clone(), SYSTEM_NS);
    let by_name = ListParams::default().fields(&format!("metadata.name={STATE}"));
    assert!(shop_cms.get(STATE).await.is_ok());
    assert_eq!(
        shop_cms
            .list(&by_name)
            .await
            .expect("list by name")
            .items
            .len(),
        1
    );
    let mut events = shop_cms
        .watch(
            &WatchParams::default().fields(&format!("metadata.name={STATE}")),
            "0",
        )
        .await
        .expect("watch by name")
        .boxed();
    let first = tokio::time::timeout(WAIT, events.try_next())
        .await
        .expect("a watch event")
        .expect("watch event ok");
    assert!(matches!(first, Some(WatchEvent::Added(_))), "{first:?}");
    drop(events);
    assert!(is_forbidden(shop_cms.list(&ListParams::default()).await));
    assert!(is_forbidden(shop_cms.get(names::POLICY_CONFIGMAP).await));
    assert!(is_forbidden(
        shop_cms
            .patch(
                STATE,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": {"state": "active"}}))
            )
            .await
    ));
    let own: Api<ConfigMap> = Api::namespaced(shop.clone(), "shop");
    assert!(is_forbidden(own.list(&ListParams::default()).await));

    // A namespace that has not opted in sees nothing.
    let other = client_for(&service_account_kubeconfig(&cluster, "other").await).await;
    let other_cms: Api<ConfigMap> = Api::namespaced(other.clone(), SYSTEM_NS);
    assert!(is_forbidden(other_cms.get(STATE).await));
    assert!(!can_i(&other, "get", "configmaps", SYSTEM_NS, Some(STATE)).await);

    // The gate itself works with exactly this access: its watch is
    // established (no "refused access" line) and it releases on active.
    let mut gate = Gate::start(&shop_kc, cluster.dir(), &[]);
    gate.wait_line("is standby (epoch 2)").await;
    set_state(&admin, state("active", 3)).await;
    assert_eq!(
        gate.wait_exit(WAIT).await.code(),
        Some(0),
        "log:\n{}",
        gate.log()
    );
    assert_eq!(gate.count("refused access"), 0, "log:\n{}", gate.log());
    assert_eq!(read_epoch(&gate), "3\n");

    // Opting out revokes the access.
    let nss: Api<Namespace> = Api::all(admin.clone());
    nss.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {names::INJECT_LABEL: null}}})),
    )
    .await
    .expect("remove the opt-in label");
    let summary = gate_access::reconcile_gate_access(controller.clone(), SYSTEM_NS)
        .await
        .expect("reconcile after opt-out");
    assert_eq!(summary.unbound, ["shop"]);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), SYSTEM_NS);
    assert!(
        bindings
            .get_opt(&counterweight_core::names::gate_binding_name("shop"))
            .await
            .expect("get")
            .is_none()
    );
    eventually(
        "the shop service account to be denied",
        WAIT,
        TICK,
        || async { Ok(is_forbidden(shop_cms.get(STATE).await).then_some(())) },
    )
    .await;

    // A gate without access keeps waiting and says why, once.
    let mut denied = Gate::start(&shop_kc, cluster.dir(), &[]);
    denied
        .wait_line("the API server refused access (403)")
        .await;
    assert!(!denied.epoch_file.exists());
}
