//! The whole group on a real kubelet: the real `counterweight-controller`
//! drives a real-node cluster (`west`) beside a KWOK peer (`east`), and the
//! real webhook injects the gate, from the project's gate image, into
//! `west`'s service pods (issue 14, items 4 and 5).
//!
//! The controllers and the webhook run as processes on this machine, as in
//! the KWOK HA tests (`ha::Controller`): the real-node cluster's API server
//! listens on its LAN address, which the host reaches through the bridge,
//! so a host process talks to it exactly as it talks to a KWOK cluster on
//! 127.0.0.1, and the peers meet through the loopback proxy mesh. The pods
//! are real: the gate and the lease sidecar run from the gate image in
//! containerd, the app is busybox.
//!
//! Why the KWOK peer: the test is about what the controller does to *its
//! own* pods on a real kubelet (gate, readiness gate, eviction); the peer
//! only has to be a healthy member of the HA group. A second real node
//! would double the start-up time and the two cores' load for nothing the
//! peer's side shows.
//!
//! Shared by `tests/real_gate.rs`, `tests/real_controller.rs` and the
//! `real_promotion` bench.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_core::inject::{GATE_CONTAINER, RUN_MOUNT_PATH, RUN_VOLUME};
use counterweight_core::names;
use counterweight_harness::{
    BUSYBOX_IMAGE, Binaries, Cluster, Lan, Process, free_port, http_get, webhook_configs,
};
use counterweight_sync::files::Watermark;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    Pod, PodSecurityContext, PodSpec, Probe, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, LogParams, PostParams};
use kube::runtime::watcher;

use crate::eventually;
use crate::fixtures::{condition_true, cwctl, deployment, fast_ha_config, meta, opt_in, service};
use crate::ha::{Controller, Mesh, SYSTEM, sample, wait_active, workspace_bin};

/// The gate image as `tools/images.sh` names it (docker.io/ once normalized).
pub const GATE_IMAGE: &str = "counterweight/gate:dev";
/// Non-root user of the app container (busybox has no such user: numeric only).
pub const APP_UID: i64 = 1000;
/// The HA member on KWOK (preferred: elected first).
pub const KWOK: &str = "east";
/// The HA member on the real node.
pub const REAL: &str = "west";
/// The app namespace on both clusters (the sample EMS's on the KWOK one).
pub const APP_NS: &str = crate::ems::APP;

/// The real-node cluster's policy: the gated service `web` and the
/// synchronization Deployment `files` (role `file-replication`, never
/// gated); every 300 ms, D = 0.6, K = 1, as the KWOK side's sample policy.
pub const REAL_POLICY: &str = r#"
interval: 300ms
threshold: 0.6
retries: 1
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0.7
  - name: files
    namespaces: [ems]
    selector: {matchLabels: {app: files}}
    weight: 0.3
    role: file-replication
"#;

/// The file-replication image as `tools/images.sh` names it.
pub const SYNC_IMAGE: &str = "counterweight/sync-rsync:dev";
/// The sync container's HTTP port (`/watermark`, `/ready`), as in
/// `manifests/sample/files.yaml`.
pub const SYNC_PORT: i32 = 8081;
/// The images the real-node tests import into containerd: the gate, and
/// the file-replication sidecar of the synchronization pod.
pub const IMAGES: [&str; 2] = ["gate", "sync-rsync"];

/// The directory of the image archives: `$COUNTERWEIGHT_IMAGES` (which
/// `tools/test.sh` sets), or what `tools/images.sh` prints, as
/// `tools/test.sh` runs it: every image, built only where its inputs
/// changed (`real_install.rs` needs them all; the group here imports
/// [`IMAGES`]).
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COUNTERWEIGHT_IMAGES") {
        return PathBuf::from(dir);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/images.sh");
    // Without the variables cargo sets for a test: under them the script's own
    // cargo build found the musl artifacts stale and rebuilt them (minutes).
    let keep = |k: &str| !k.starts_with("CARGO_") || matches!(k, "CARGO_HOME" | "CARGO_TARGET_DIR");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| keep(k) && k != "CARGO" && k != "LD_LIBRARY_PATH"))
        .output()
        .expect("run tools/images.sh");
    assert!(
        out.status.success(),
        "tools/images.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The gate image archive, checked to exist.
pub fn gate_archive() -> PathBuf {
    archive("gate")
}

/// The archive of image `name` (one of [`IMAGES`]), checked to exist.
pub fn archive(name: &str) -> PathBuf {
    let archive = images_dir().join(format!("{name}.tar"));
    assert!(archive.is_file(), "{} missing", archive.display());
    archive
}

/// The app's pod: busybox, non-root with a read-only root filesystem, no
/// service-account token, the whole pod `runAsNonRoot`. The app mounts the
/// gate's scratch volume read-only, as the application's contract says
/// (the pod declares it, an `emptyDir`), and prints the epoch file the gate
/// wrote before it sleeps: its log shows the epoch the app was released in.
pub fn app_pod_spec() -> PodSpec {
    PodSpec {
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        containers: vec![Container {
            name: "app".into(),
            image: Some(BUSYBOX_IMAGE.into()),
            image_pull_policy: Some("Never".into()),
            command: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat {RUN_MOUNT_PATH}/epoch; exec sleep 2147483647"),
            ]),
            security_context: Some(SecurityContext {
                run_as_user: Some(APP_UID),
                run_as_group: Some(APP_UID),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                ..Default::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: RUN_VOLUME.into(),
                mount_path: RUN_MOUNT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }],
        // Declared here, as a Deployment must for what its containers mount;
        // the webhook then uses it instead of adding its own (see
        // `counterweight_core::inject::RUN_VOLUME`).
        volumes: Some(vec![Volume {
            name: RUN_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }]),
        termination_grace_period_seconds: Some(1),
        ..Default::default()
    }
}

/// The synchronization pod's spec: the project's `sync-rsync` image running
/// `counterweight-sync files`, with the container security of
/// `manifests/sample/files.yaml` (non-root 65532, read-only root
/// filesystem, no capabilities, RuntimeDefault seccomp) and its readiness
/// probe on `/watermark`. It reads the state record through the API server
/// with its service-account token, as in production, and while its cluster
/// is active pushes `/data` to a local destination (`/mirror`, an
/// `emptyDir`): the pod flips with the state and is never restarted for it.
pub fn sync_pod_spec() -> PodSpec {
    let empty = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    };
    let env = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    PodSpec {
        automount_service_account_token: Some(true),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        containers: vec![Container {
            name: "sync".into(),
            image: Some(SYNC_IMAGE.into()),
            image_pull_policy: Some("Never".into()),
            args: Some(vec!["files".into()]),
            env: Some(vec![
                env(
                    "COUNTERWEIGHT_SYNC_STATE_CONFIGMAP",
                    format!("{SYSTEM}/{}", names::STATE_CONFIGMAP),
                ),
                env("COUNTERWEIGHT_SYNC_DIR", "/data".into()),
                env("COUNTERWEIGHT_SYNC_DESTS", "/mirror/".into()),
                env(
                    "COUNTERWEIGHT_SYNC_WATERMARK",
                    "/var/run/counterweight/watermark.json".into(),
                ),
                env("COUNTERWEIGHT_SYNC_LISTEN", format!("0.0.0.0:{SYNC_PORT}")),
                env("COUNTERWEIGHT_SYNC_HEARTBEAT_MS", "500".into()),
                env("COUNTERWEIGHT_SYNC_INTERVAL_MS", "200".into()),
                env("RUST_LOG", "info".into()),
            ]),
            ports: Some(vec![ContainerPort {
                name: Some("sync-http".into()),
                container_port: SYNC_PORT,
                ..Default::default()
            }]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/watermark".into()),
                    port: IntOrString::String("sync-http".into()),
                    ..Default::default()
                }),
                period_seconds: Some(1),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(vec![
                mount("data", "/data"),
                mount("mirror", "/mirror"),
                mount("run", "/var/run/counterweight"),
            ]),
            ..Default::default()
        }],
        volumes: Some(vec![empty("data"), empty("mirror"), empty("run")]),
        termination_grace_period_seconds: Some(5),
        ..Default::default()
    }
}

/// The injected gate container of `pod`, if any.
pub fn gate_of(pod: &Pod) -> Option<&Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == GATE_CONTAINER)
}

/// Starts the webhook on `addr` (the LAN bridge's host address, which the
/// real-node cluster's API server reaches) with a serving certificate for
/// that address and `--cluster-name=<cluster_name>`, registers it with
/// `cluster`, and waits until the API server injects a dry-run pod in
/// `app_ns`. The gate image is the project's; the kubelet never pulls.
pub async fn start_webhook(
    cluster: &Cluster,
    addr: Ipv4Addr,
    cluster_name: &str,
    app_ns: &str,
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
        format!("--cluster-name={cluster_name}"),
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
    let pods: Api<Pod> = Api::namespaced(cluster.client(), app_ns);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe = Pod {
        metadata: meta("probe"),
        spec: Some(app_pod_spec()),
        ..Default::default()
    };
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

/// Addresses of the ready endpoints in the namespace's EndpointSlices that
/// `params` selects (`kubernetes.io/service-name=<svc>` for one Service's).
pub async fn ready_addresses(
    slices: &Api<EndpointSlice>,
    params: &ListParams,
) -> Result<Vec<String>, String> {
    let list = slices.list(params).await.map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect())
}

/// When `container` of pod `pod` first logged a line containing `needle`,
/// by the container runtime's timestamp of the line: the moment the
/// process wrote it, on the node's clock, which is this machine's. The
/// kubelet's status reports come a relist later (about a second); this is
/// when it happened.
pub async fn logged_at(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    needle: &str,
) -> Result<Option<SystemTime>, String> {
    let text = pods
        .logs(
            pod,
            &LogParams {
                container: Some(container.into()),
                timestamps: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    for line in text.lines() {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        if rest.contains(needle) {
            let t: k8s_openapi::jiff::Timestamp =
                stamp.parse().map_err(|e| format!("{stamp:?}: {e}"))?;
            return Ok(Some(SystemTime::from(t)));
        }
    }
    Ok(None)
}

/// What a pod looked like in one watch event.
#[derive(Debug, Clone)]
pub struct PodSeen {
    /// When the watch delivered it.
    pub at: Instant,
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod was deleted (the watch's delete event), or is being deleted.
    pub deleting: bool,
    /// The gate container is running.
    pub gate_running: bool,
    /// The gate container's exit code, once it terminated.
    pub gate_exit: Option<i32>,
    /// The app container is running.
    pub app_running: bool,
    /// Why the app container waits, if it does.
    pub app_waiting: Option<String>,
    /// The pod is Ready.
    pub ready: bool,
    /// The serving condition's status and reason, if the pod has it.
    pub serving: Option<(String, Option<String>)>,
    /// Restarts of all its containers, init containers included.
    pub restarts: i32,
}

impl PodSeen {
    /// Reads `pod` as seen at `at`; `deleted` for a watch's delete event.
    pub fn of(pod: &Pod, at: Instant, deleted: bool) -> Self {
        let status = pod.status.as_ref();
        let inits = status
            .and_then(|s| s.init_container_statuses.clone())
            .unwrap_or_default();
        let apps = status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        let gate = inits.iter().find(|c| c.name == GATE_CONTAINER);
        let gate_state = gate.and_then(|c| c.state.as_ref());
        let app_state = apps.first().and_then(|c| c.state.as_ref());
        let serving = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == names::SERVING_CONDITION))
            .map(|c| (c.status.clone(), c.reason.clone()));
        Self {
            at,
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            deleting: deleted || pod.metadata.deletion_timestamp.is_some(),
            gate_running: gate_state.is_some_and(|s| s.running.is_some()),
            gate_exit: gate_state.and_then(|s| s.terminated.as_ref().map(|t| t.exit_code)),
            app_running: app_state.is_some_and(|s| s.running.is_some()),
            app_waiting: app_state
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone()),
            ready: condition_true(pod, "Ready"),
            serving,
            restarts: inits.iter().chain(&apps).map(|c| c.restart_count).sum(),
        }
    }

    /// Blocked at the gate: gate running, app waiting in `PodInitializing`,
    /// not Ready, not going away.
    pub fn gated(&self) -> bool {
        self.gate_running
            && self.app_waiting.as_deref() == Some("PodInitializing")
            && !self.ready
            && !self.deleting
    }
}

/// Every watch event of the pods of one namespace, with the time it came:
/// what happened between two polls (a fence just before an eviction) and
/// when (the benchmark's instants) is read from it.
pub struct PodLog {
    seen: Arc<Mutex<Vec<PodSeen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodLog {
    /// Starts watching the pods of `pods` matching `labels`.
    pub fn start(pods: Api<Pod>, labels: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let config = watcher::Config::default().labels(labels);
        let task = tokio::spawn(async move {
            let mut events = watcher(pods, config).boxed();
            while let Some(ev) = events.next().await {
                let at = Instant::now();
                let entry = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        PodSeen::of(&p, at, false)
                    }
                    Ok(watcher::Event::Delete(p)) => PodSeen::of(&p, at, true),
                    // Init/InitDone frame a relist; errors are retried by the
                    // watcher's own backoff.
                    _ => continue,
                };
                log.lock().expect("pod log").push(entry);
            }
        });
        Self { seen, task }
    }

    /// Everything seen so far, oldest first.
    pub fn all(&self) -> Vec<PodSeen> {
        self.seen.lock().expect("pod log").clone()
    }

    /// What was seen of the pod `uid`, oldest first.
    pub fn of(&self, uid: &str) -> Vec<PodSeen> {
        self.all().into_iter().filter(|s| s.uid == uid).collect()
    }

    /// The first observation at or after `since` that `pred` accepts.
    pub fn first_after(&self, since: Instant, pred: impl Fn(&PodSeen) -> bool) -> Option<PodSeen> {
        self.all().into_iter().find(|s| s.at >= since && pred(s))
    }
}

impl Drop for PodLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One state record as a watch delivered it: when (monotonic, wall),
/// active or not, epoch.
type StateSeen = (Instant, SystemTime, bool, u64);

/// The state records one member went through, with the time each came (a
/// watch of its `counterweight-state`).
pub struct StateLog {
    seen: Arc<Mutex<Vec<StateSeen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StateLog {
    /// Starts watching the state record in `cms`.
    pub fn start(cms: Api<ConfigMap>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", names::STATE_CONFIGMAP));
        let task = tokio::spawn(async move {
            let mut events = watcher(cms, config).boxed();
            while let Some(ev) = events.next().await {
                let (at, wall) = (Instant::now(), SystemTime::now());
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev {
                    let d = cm.data.unwrap_or_default();
                    let active = d.get("state").map(String::as_str) == Some("active");
                    let epoch = d.get("epoch").and_then(|e| e.parse().ok()).unwrap_or(0);
                    log.lock()
                        .expect("state log")
                        .push((at, wall, active, epoch));
                }
            }
        });
        Self { seen, task }
    }

    /// When the record first said active in an epoch above `above` (by the
    /// monotonic and the wall clock), and that epoch.
    pub fn active_above(&self, above: u64) -> Option<(Instant, SystemTime, u64)> {
        self.seen
            .lock()
            .expect("state log")
            .iter()
            .find(|(_, _, active, epoch)| *active && *epoch > above)
            .map(|(at, wall, _, epoch)| (*at, *wall, *epoch))
    }
}

impl Drop for StateLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long the group's parts took to come up.
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// From nothing to the real-node cluster's node Ready (its API server,
    /// containerd, kubelet, kube-proxy).
    pub real_cluster: Duration,
    /// Importing the images ([`IMAGES`]) into the node's containerd.
    pub import: Duration,
    /// From nothing to the KWOK member elected and the real one recording
    /// standby, with both controllers and the webhook running.
    pub elected: Duration,
}

/// The KWOK peer and the real-node member with their controllers and the
/// webhook. Processes go first on drop, then the clusters.
pub struct RealGroup {
    /// The controllers, KWOK member's first.
    pub controllers: Vec<Controller>,
    /// The webhook of the real-node cluster.
    pub webhook: Process,
    /// The KWOK member (`east`), preferred.
    pub kwok: Cluster,
    /// The real-node member (`west`).
    pub real: Cluster,
    /// The LAN of the real node (kept until the cluster goes).
    pub lan: Arc<Lan>,
    /// State ConfigMaps: KWOK member's, real member's.
    pub cms: [Api<ConfigMap>; 2],
    /// A kubeconfig with both clusters, for `cwctl`.
    pub kubeconfig: PathBuf,
    /// Epoch the KWOK member was first elected in.
    pub first_epoch: u64,
    /// How long the start took.
    pub times: StartTimes,
    // Kept for the processes' lifetime: the peer proxies and the peer
    // certificates the controllers read.
    _mesh: Mesh,
    _dir: tempfile::TempDir,
}

impl RealGroup {
    /// Starts both clusters (in parallel, or with `alone_first` the
    /// real-node one first, so its start-up time is its own), prepares
    /// their workloads and policies, starts the webhook on the real one and
    /// a controller per member, and waits until the KWOK member is active
    /// and the real one standby. The real member's Deployments are not
    /// created yet: see [`RealGroup::deploy`].
    pub async fn start(alone_first: bool) -> Self {
        counterweight_harness::install_crypto_provider();
        let archives = IMAGES.map(archive);
        let names = [KWOK, REAL];
        let dir = tempfile::tempdir().expect("dir");
        crate::ha::write_peer_certs(dir.path(), &names);
        let bins = Binaries::locate().expect("control-plane binaries");
        let begun = Instant::now();
        let real_start = async {
            let t = Instant::now();
            let (lan, mut clusters) = counterweight_harness::start_real_named(&[REAL])
                .await
                .expect("the real-node cluster starts");
            (lan, clusters.remove(0), t.elapsed())
        };
        let ((lan, real, real_took), kwok) = if alone_first {
            let r = real_start.await;
            (r, Cluster::start(bins, KWOK).await)
        } else {
            tokio::join!(real_start, Cluster::start(bins, KWOK))
        };
        let kwok = kwok.expect("the KWOK cluster starts");
        let t = Instant::now();
        for archive in &archives {
            real.real_node()
                .expect("a real node")
                .import_image(archive)
                .expect("import the images into containerd");
        }
        let import = t.elapsed();

        crate::ems::prepare(&kwok, true).await;
        let client = real.client();
        crate::fixtures::create_namespaces(&client, &[SYSTEM, APP_NS]).await;
        opt_in(&client, APP_NS).await;
        crate::fixtures::install_policy(&client, SYSTEM, REAL_POLICY).await;
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), APP_NS)
            .create(&PostParams::default(), &service("web"))
            .await
            .expect("web Service");
        let webhook = start_webhook(&real, lan.host_addr(), REAL, APP_NS).await;

        let config = fast_ha_config(&names, None);
        let ha_file = crate::ha::write_ha_config(dir.path(), &config);
        let mesh = Mesh::new(&names).await;
        let controllers = vec![
            Controller::start(&kwok, KWOK, &mesh, dir.path(), &ha_file, &[]),
            Controller::start(&real, REAL, &mesh, dir.path(), &ha_file, &[]),
        ];
        let cms = [
            Api::namespaced(kwok.client(), SYSTEM),
            Api::namespaced(real.client(), SYSTEM),
        ];
        let first = wait_active(&cms[0], "the KWOK member to be elected", 1).await;
        eventually(
            "the real member to record standby",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { Ok(sample(&cms[1]).await.filter(|s| !s.active)) },
        )
        .await;
        let elected = begun.elapsed();
        let kubeconfig = dir.path().join("cwctl.kubeconfig");
        counterweight_harness::write_kubeconfig_of(&[&kwok, &real], &kubeconfig)
            .expect("kubeconfig");
        Self {
            controllers,
            webhook,
            kwok,
            real,
            lan,
            cms,
            kubeconfig,
            first_epoch: first.epoch,
            times: StartTimes {
                real_cluster: real_took,
                import,
                elected,
            },
            _mesh: mesh,
            _dir: dir,
        }
    }

    /// Creates the real member's Deployments: `web`, one gated service pod
    /// (the app of [`app_pod_spec`], labelled `counterweight.dev/role:
    /// service`, in front of which the Service `web` stands), and `files`,
    /// one synchronization pod (role `file-replication`, [`sync_pod_spec`]).
    pub async fn deploy(&self) {
        let deploys: Api<Deployment> = Api::namespaced(self.real.client(), APP_NS);
        for (name, role, spec) in [
            ("web", "service", app_pod_spec()),
            ("files", "file-replication", sync_pod_spec()),
        ] {
            let mut d = deployment(name, 1, &[(names::ROLE_LABEL, role)]);
            if let Some(t) = d.spec.as_mut().map(|s| &mut s.template) {
                t.spec = Some(spec);
            }
            deploys
                .create(&PostParams::default(), &d)
                .await
                .expect("Deployment");
        }
    }

    /// The real member's pods.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.real.client(), APP_NS)
    }

    /// The `/watermark` of the synchronization pod `pod`, read through the
    /// API server's pod proxy (the pod's address exists only inside the
    /// real node's network namespace, where the API server runs).
    pub async fn sync_watermark(&self, pod: &str) -> Result<Watermark, String> {
        let path = format!("/api/v1/namespaces/{APP_NS}/pods/{pod}:{SYNC_PORT}/proxy/watermark");
        let req = http::Request::get(&path)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let text = self
            .real
            .client()
            .request_text(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))
    }

    /// The real member's EndpointSlices of the app namespace.
    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.real.client(), APP_NS)
    }

    /// The one `app=<app>` pod of the real member that is not going away,
    /// if there is exactly one.
    pub async fn one_pod(&self, app: &str) -> Result<Option<Pod>, String> {
        let list = self
            .pods()
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .map_err(|e| e.to_string())?;
        let mut live: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        Ok((live.len() == 1).then(|| live.remove(0)))
    }

    /// Waits until the real member's `web` pod is a new one (its uid not in
    /// `not`) blocked at the gate: gate running, app Waiting in
    /// `PodInitializing`, not Ready, and no ready endpoint in the Service.
    pub async fn gated_web(&self, not: &[String], what: &str) -> Pod {
        let slices = self.slices();
        eventually(
            what,
            Duration::from_secs(90),
            Duration::from_millis(50),
            || async {
                let Some(p) = self.one_pod("web").await? else {
                    return Ok(None);
                };
                let uid = p.metadata.uid.clone().unwrap_or_default();
                let seen = PodSeen::of(&p, Instant::now(), false);
                if not.contains(&uid) || !seen.gated() {
                    return Err(format!("{seen:?}"));
                }
                let ready = ready_addresses(&slices, &ListParams::default()).await?;
                if !ready.is_empty() {
                    return Err(format!("ready endpoints {ready:?} beside a gated pod"));
                }
                Ok(Some(p))
            },
        )
        .await
    }

    /// Asks for a switchover to `to` with `cwctl` (the path operators use:
    /// the command ConfigMap, the controllers run the handshake) and waits
    /// until `to`'s record is active in an epoch above `above`; its epoch.
    pub async fn switchover(&self, to: &str, above: u64) -> u64 {
        let i = usize::from(to == REAL);
        let other = 1 - i;
        // The active hands over only to a standby that answered its recent
        // probes as healthy (`candidateFreshMs`). A member just demoted
        // turns healthy again once its replacement pods wait at the gate,
        // and its next probe answer says so: wait for the active's view
        // (the record's `ha` key, as cwctl shows it) to have heard that.
        eventually(
            "the active to hear the target as an eligible standby",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async {
                counterweight_harness::install::hears_eligible(&self.cms[other], to, 500)
                    .await
                    .map(Some)
            },
        )
        .await;
        let (r, out) = cwctl(
            &self.kubeconfig,
            &["switchover", "--to", to, "--timeout", "60s"],
        )
        .await;
        assert_eq!(r, Ok(counterweight_cli::Outcome::Ok), "{out}");
        let now = wait_active(
            &self.cms[i],
            "the switchover's target to be active",
            above + 1,
        )
        .await;
        eventually(
            "the former active to record standby",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async { Ok(sample(&self.cms[other]).await.filter(|s| !s.active)) },
        )
        .await;
        now.epoch
    }

    /// Checks that both controllers and the webhook still run.
    pub fn check_alive(&mut self) {
        for c in &mut self.controllers {
            c.process
                .check_alive()
                .expect("the controllers keep running");
        }
        self.webhook
            .check_alive()
            .expect("the webhook keeps running");
    }
}
