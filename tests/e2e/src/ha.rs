//! What the HA end-to-end tests share: reading a cluster's state record, the
//! two-actives monitor, and real `counterweight-controller` processes joined
//! by mutual TLS through a mesh of TCP proxies that can cut any link.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_core::ha::HaConfig;
use counterweight_harness::{Cluster, Mode, Process, TcpProxy, free_port};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};

use crate::eventually;

/// Namespace of the controller's ConfigMaps in every test cluster.
pub const SYSTEM: &str = "counterweight-system";

/// One reading of a cluster's `counterweight-state` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// `state` is `active`.
    pub active: bool,
    /// `epoch`.
    pub epoch: u64,
}

/// Reads the state record; `None` while it is missing or unreadable.
pub async fn sample(cms: &Api<ConfigMap>) -> Option<Sample> {
    let d = cms
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .ok()??
        .data?;
    Some(Sample {
        active: d.get("state").map(String::as_str) == Some("active"),
        epoch: d.get("epoch")?.parse().ok()?,
    })
}

/// The whole state record (empty while it is missing).
pub async fn record(cms: &Api<ConfigMap>) -> BTreeMap<String, String> {
    cms.get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
        .unwrap_or_default()
}

/// Who holds the leader-election Lease (the controller's default name,
/// which the tests keep) in `leases` (`None` while it is missing, unheld
/// or unreadable).
pub async fn leader_lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(counterweight_controller::leader::DEFAULT_LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Waits until the record says active in at least `min_epoch`. Generous:
/// on a loaded two-core machine several control planes, their Deployments
/// and the first health intervals take a while.
pub async fn wait_active(cms: &Api<ConfigMap>, what: &str, min_epoch: u64) -> Sample {
    eventually(
        what,
        Duration::from_secs(90),
        Duration::from_millis(20),
        || async {
            Ok(sample(cms)
                .await
                .filter(|s| s.active && s.epoch >= min_epoch))
        },
    )
    .await
}

/// Asserts for `d`, sampling every 50 ms, that none of `cms` is active.
pub async fn nobody_active_for(cms: &[Api<ConfigMap>], d: Duration, why: &str) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        for api in cms {
            let s = sample(api).await;
            assert!(!s.is_some_and(|s| s.active), "{why}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Events in the controller's namespace of `cluster`, oldest first
/// (none when they cannot be listed).
async fn events_in_order(cluster: &Cluster) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(cluster.client(), SYSTEM);
    let mut events = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    events.sort_by(|a, b| a.event_time.cmp(&b.event_time));
    events
}

/// Reasons of the Events in the controller's namespace, oldest first.
pub async fn event_reasons(cluster: &Cluster) -> Vec<String> {
    events_in_order(cluster)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

/// `cluster`'s Events as `reason: note`, oldest first: what a failed
/// test prints to say where the protocol stopped.
pub async fn event_log(cluster: &Cluster) -> Vec<String> {
    events_in_order(cluster)
        .await
        .into_iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default()
            )
        })
        .collect()
}

/// The notes of `cluster`'s Events with `reason`, oldest first.
pub async fn event_notes(cluster: &Cluster, reason: &str) -> Vec<String> {
    events_in_order(cluster)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

/// Samples every state ConfigMap every 10 ms. A violation is A active at t1
/// and t3 in the same epoch with B active at t2 in between: then both were
/// active at t2, whatever the read order.
pub struct Monitor {
    violations: Arc<Mutex<Vec<String>>>,
    // Members whose controller was killed: their last record stays
    // "active" in an old epoch, which is no longer a serving active.
    dead: Arc<Mutex<HashSet<String>>>,
    samples: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Starts sampling the named state ConfigMaps.
    pub fn start(apis: Vec<(String, Api<ConfigMap>)>) -> Self {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(AtomicU64::new(0));
        let dead = Arc::new(Mutex::new(HashSet::<String>::new()));
        let (v, n, d) = (violations.clone(), samples.clone(), dead.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut round = 0usize;
            loop {
                tick.tick().await;
                round += 1;
                let k = apis.len();
                for i in 0..k {
                    let a = &apis[(round + i) % k];
                    let first = sample(&a.1).await;
                    let mut others = Vec::new();
                    for b in apis.iter().filter(|b| b.0 != a.0) {
                        others.push((b.0.clone(), sample(&b.1).await));
                    }
                    let last = sample(&a.1).await;
                    n.fetch_add(1, Ordering::Relaxed);
                    let (Some(f), Some(l)) = (first, last) else {
                        continue;
                    };
                    if !(f.active && l.active && f.epoch == l.epoch) {
                        continue;
                    }
                    for (name, s) in others {
                        let stale = |who: &str, epoch: u64, other: u64| {
                            d.lock().expect("lock").contains(who) && epoch < other
                        };
                        if let Some(s) = s
                            && s.active
                            && !stale(&a.0, f.epoch, s.epoch)
                            && !stale(&name, s.epoch, f.epoch)
                        {
                            v.lock().expect("lock").push(format!(
                                "{} (epoch {}) and {name} ({s:?}) both active",
                                a.0, f.epoch
                            ));
                        }
                    }
                }
            }
        });
        Self {
            violations,
            dead,
            samples,
            task,
        }
    }

    /// Starts sampling the first `names.len()` of `cms`, named in order.
    pub fn on(names: &[&str], cms: &[Api<ConfigMap>]) -> Self {
        Self::start(
            names
                .iter()
                .zip(cms)
                .map(|(n, c)| ((*n).to_owned(), c.clone()))
                .collect(),
        )
    }

    /// Marks a member whose controller was killed: its frozen record in an
    /// older epoch than a live active's is not a second active *record*.
    /// Whether its pods still serve is another matter, which only the
    /// workload monitor (`crate::workload`) can judge: run it beside this
    /// one wherever service pods exist.
    pub fn mark_dead(&self, name: &str) {
        self.dead.lock().expect("lock").insert(name.to_owned());
    }

    /// Stops sampling; panics on any violation or if it barely sampled.
    pub fn finish(self) {
        self.task.abort();
        let samples = self.samples.load(Ordering::Relaxed);
        assert!(samples > 10, "the monitor must have sampled ({samples})");
        let v = self.violations.lock().expect("lock");
        assert!(v.is_empty(), "two actives observed: {v:?}");
    }
}

/// The built `target/<profile>/<name>` next to the test binary, or `$env`.
pub fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} not found; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The controller binary (`COUNTERWEIGHT_CONTROLLER_BIN` overrides).
pub fn controller_bin() -> PathBuf {
    workspace_bin("counterweight-controller", "COUNTERWEIGHT_CONTROLLER_BIN")
}

/// Writes a peer CA (`ca.crt`) and `peer-<name>.{crt,key}` for each name,
/// with the SAN `<name>.peers.counterweight.dev` peers are checked against.
pub fn write_peer_certs(dir: &Path, names: &[&str]) {
    write_peer_certs_from(dir, "ca", "counterweight-test-peers", names);
}

/// Like [`write_peer_certs`] under another CA: the CA goes to `<ca_file>.crt`
/// and the leaves to `peer-<name>.{crt,key}` (overwriting).
pub fn write_peer_certs_from(dir: &Path, ca_file: &str, ca_name: &str, names: &[&str]) {
    let ca = CertificateAuthority::new(ca_name).expect("CA");
    ca.pem().write(dir, ca_file).expect("write CA");
    for n in names {
        ca.issue(&LeafSpec::new(*n, Usage::Peer).sans([format!("{n}.peers.counterweight.dev")]))
            .expect("peer cert")
            .write(dir, &format!("peer-{n}"))
            .expect("write peer cert");
    }
}

/// Writes `config` where the controller's `--ha-config` can read it (JSON
/// is YAML).
pub fn write_ha_config(dir: &Path, config: &HaConfig) -> PathBuf {
    let path = dir.join("ha.json");
    std::fs::write(&path, serde_json::to_vec(config).expect("encode")).expect("write HA config");
    path
}

/// What every multi-cluster controller test starts with: the clusters, a
/// client for each state ConfigMap, peer certificates (see
/// [`write_peer_certs`]) in a temporary directory, and the proxy mesh.
pub async fn start_group(
    names: &[&str],
) -> (Vec<Cluster>, Vec<Api<ConfigMap>>, tempfile::TempDir, Mesh) {
    let dir = tempfile::tempdir().expect("dir");
    write_peer_certs(dir.path(), names);
    let clusters = counterweight_harness::start_named(names)
        .await
        .expect("clusters");
    let cms = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    (clusters, cms, dir, Mesh::new(names).await)
}

/// Peer listeners for each member and one TCP proxy per directed link, so a
/// test can cut any link in either direction while the processes run.
pub struct Mesh {
    names: Vec<String>,
    ports: BTreeMap<String, u16>,
    // (from, to) -> the proxy `from` dials to reach `to`.
    links: BTreeMap<(String, String), TcpProxy>,
}

impl Mesh {
    /// Picks a peer port per member and starts a proxy per directed link.
    pub async fn new(names: &[&str]) -> Self {
        let ports: BTreeMap<String, u16> = names
            .iter()
            .map(|n| ((*n).to_owned(), free_port().expect("port")))
            .collect();
        let mut links = BTreeMap::new();
        for from in names {
            for to in names.iter().filter(|to| *to != from) {
                let proxy = TcpProxy::start(([127, 0, 0, 1], ports[*to]).into())
                    .await
                    .expect("proxy");
                links.insert(((*from).to_owned(), (*to).to_owned()), proxy);
            }
        }
        Self {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            ports,
            links,
        }
    }

    /// The port `name` serves the peer protocol on.
    pub fn peer_port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    /// `--peer` arguments for `name`: every other member, through its proxy.
    pub fn peer_args(&self, name: &str) -> Vec<String> {
        self.links
            .iter()
            .filter(|((from, _), _)| from == name)
            .map(|((_, to), proxy)| format!("--peer={to}=https://{}", proxy.addr()))
            .collect()
    }

    /// Drops all traffic between `a` and `b`, both ways, open connections
    /// included.
    pub fn cut(&self, a: &str, b: &str) {
        self.set(a, b, Mode::Drop);
    }

    /// Lets traffic between `a` and `b` flow again.
    pub fn heal(&self, a: &str, b: &str) {
        self.set(a, b, Mode::Pass);
    }

    /// Cuts `name` off from every other member.
    pub fn isolate(&self, name: &str) {
        for other in self.names.iter().filter(|n| *n != name) {
            self.cut(name, other);
        }
    }

    fn set(&self, a: &str, b: &str, mode: Mode) {
        for link in [(a, b), (b, a)] {
            let proxy = &self.links[&(link.0.to_owned(), link.1.to_owned())];
            if mode == Mode::Pass {
                proxy.set_mode(mode);
            } else {
                proxy.set_mode_and_kill(mode);
            }
        }
    }
}

/// A controller process with the ports it serves.
pub struct Controller {
    /// The process; killed on drop.
    pub process: Process,
    /// Its plain-HTTP `/metrics` port on 127.0.0.1.
    pub metrics_port: u16,
}

impl Controller {
    /// Starts `counterweight-controller --cluster <name>` against `cluster`,
    /// with peer certificates from `certs` (see [`write_peer_certs`]), peers
    /// from `mesh`, and `extra` arguments (e.g. `--witness`).
    pub fn start(
        cluster: &Cluster,
        name: &str,
        mesh: &Mesh,
        certs: &Path,
        ha_file: &Path,
        extra: &[&str],
    ) -> Self {
        let metrics_port = free_port().expect("port");
        // Replicas of one member each keep their own log: a second one
        // writing to the first's file truncated it, and a failed two-replica
        // test then showed no controller log at all.
        let log = extra
            .iter()
            .find_map(|a| a.strip_prefix("--leader-election-identity="))
            .map_or_else(
                || "logs/controller.log".to_owned(),
                |id| format!("logs/controller-{id}.log"),
            );
        let mut args =
            cluster.controller_args(name, ha_file, mesh.peer_port(name), metrics_port, certs);
        args.extend(mesh.peer_args(name));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut process = Process::spawn(name, &controller_bin(), &args, &cluster.dir().join(log))
            .expect("controller starts");
        process.tail_on_panic();
        Self {
            process,
            metrics_port,
        }
    }

    /// The sum of all samples of `metric` (label sets matching every
    /// `label="value"` in `labels`), from `/metrics`; 0 when absent.
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> Result<f64, String> {
        let text = http_get(self.metrics_port, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(key, _)| {
                key.split('{').next() == Some(metric) && labels.iter().all(|p| key.contains(p))
            })
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum())
    }
}

/// GET `path` from 127.0.0.1:`port` over plain HTTP/1.0; the body on 200,
/// else an error naming the status.
pub async fn http_get(port: u16, path: &str) -> Result<String, String> {
    match counterweight_harness::http_get(port, path).await? {
        (200, body) => Ok(body),
        (status, _) => Err(format!("GET {path} on port {port}: {status}")),
    }
}
