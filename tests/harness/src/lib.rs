//! Real local Kubernetes control planes for Counterweight's end-to-end tests.
//!
//! A [`Cluster`] is one independent Kubernetes control plane on loopback: its
//! own etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a KWOK
//! that plays a fake node, so that Deployments get pods that become Running
//! and Ready. Each cluster has its own CA, serving and admin certificates,
//! free ports, an admin kubeconfig and a [`kube::Client`]. Every process is
//! killed when the cluster value is dropped, including when a test panics.
//!
//! The flags follow what controller-runtime's envtest gives kube-apiserver:
//! bind and advertise 127.0.0.1, RBAC, a service-account issuer and keys, and
//! a cert dir. A cluster can be stopped and started again with its etcd data
//! kept, which is how tests inject "API server down".
//!
//! A cluster's node is a [`NodeKind`]: KWOK (fast, thousands of pods, containers that do not
//! run) or a real one ([`Cluster::start_real`]): containerd, kubelet and kube-proxy
//! ([`realnode`]). A real-node cluster runs all its processes, control plane included, in
//! network and mount namespaces of its own ([`netns`]), linked to the other clusters and to
//! the test process by a host bridge ([`lan`]) whose links a test can cut. Its API server
//! binds the cluster's LAN address instead of 127.0.0.1.

mod binaries;
pub mod bulk;
pub mod install;
pub mod lan;
pub mod netns;
mod postgres;
mod process;
mod proxy;
pub mod realnode;
pub mod sample_data;
pub mod undo;
mod webhook;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use binaries::{BIN_DIR_ENV, Binaries, NODE_BIN_DIR_ENV, NodeBinaries};
pub use lan::{Lan, Link};
pub use postgres::{PG_USER, PgOptions, Postgres, ServerTls};
pub use process::{Process, tail};
pub use proxy::{Mode, TcpProxy};
pub use realnode::{BUSYBOX_IMAGE, REAL_NODE_NAME, RealNode};
pub use webhook::{loopback_webhook_configs, webhook_configs};

/// Name of the fake node every cluster gets.
pub const NODE_NAME: &str = "kwok-node-0";

/// How long a cluster may take to come up on a busy two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything that can go wrong while running a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The control-plane binaries are missing or could not be built.
    #[error("control-plane binaries unavailable: {0}")]
    Binaries(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Making certificates failed.
    #[error(transparent)]
    Certs(#[from] counterweight_certs::CertError),
    /// A control-plane process exited while it should be running.
    #[error("{name} exited ({status}); last log lines:\n{log_tail}")]
    Exited {
        /// Which process.
        name: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A condition was not reached in time.
    #[error("cluster {cluster}: timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The cluster.
        cluster: String,
        /// What did not happen.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A command the harness ran (ip, nsenter, ctr, ...) failed.
    #[error("{what}: {status}: {stderr}")]
    Command {
        /// What was being done.
        what: String,
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// Building the Kubernetes client failed.
    #[error("kube client for cluster {cluster}: {message}")]
    Client {
        /// The cluster.
        cluster: String,
        /// What went wrong.
        message: String,
    },
    /// A Kubernetes API call made by the harness itself failed.
    #[error("cluster {cluster}: {what}: {source}")]
    Api {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

impl HarnessError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Loopback ports of one cluster; they stay the same across restarts so the
/// kubeconfig stays valid.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// etcd client port.
    pub etcd_client: u16,
    /// etcd peer port (bound, never used by another member).
    pub etcd_peer: u16,
    /// kube-apiserver secure port.
    pub apiserver: u16,
    /// kube-controller-manager secure port (health only).
    pub controller_manager: u16,
    /// kube-scheduler secure port (health only).
    pub scheduler: u16,
}

/// What plays a cluster's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A KWOK fake node on loopback: pods turn Running at once, no container runs.
    Kwok,
    /// A real kubelet with containerd, in namespaces of the cluster's own.
    Real,
}

/// One local Kubernetes control plane. Dropping it kills its processes and
/// removes its directory (and, for a real node, its namespaces, cgroups and links).
pub struct Cluster {
    name: String,
    /// Where the API server listens: 127.0.0.1, or the real node's LAN address.
    host: Ipv4Addr,
    // Before `dir`: the node's teardown runs before the directory goes.
    real: Option<RealNode>,
    dir: tempfile::TempDir,
    bins: Binaries,
    ports: Ports,
    kubeconfig: PathBuf,
    client: kube::Client,
    // In start order; stopped in reverse.
    procs: Vec<Process>,
    // kube-controller-manager's and kube-scheduler's client rate
    // (`--kube-api-qps`; burst twice that), `None` for their defaults (20
    // and 50 a second).
    client_qps: Option<u32>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("dir", &self.dir.path())
            .field("ports", &self.ports)
            .field("host", &self.host)
            .field("real", &self.real.is_some())
            .finish_non_exhaustive()
    }
}

/// Installs the ring crypto provider for rustls once; harmless if the
/// process already installed one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts `n` clusters named `c0`, `c1`, ... in parallel.
pub async fn start_clusters(n: usize) -> Result<Vec<Cluster>, HarnessError> {
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    start_named(&names).await
}

/// Starts one cluster per name, in parallel.
pub async fn start_named<S: AsRef<str>>(names: &[S]) -> Result<Vec<Cluster>, HarnessError> {
    start_each(names, None).await
}

/// One cluster per name, in parallel, kube-controller-manager and
/// kube-scheduler at `client_qps` requests a second (`None`: their
/// defaults).
async fn start_each<S: AsRef<str>>(
    names: &[S],
    client_qps: Option<u32>,
) -> Result<Vec<Cluster>, HarnessError> {
    let bins = Binaries::locate()?;
    let starts = names
        .iter()
        .map(|name| Cluster::start_node(bins.clone(), name.as_ref(), None, client_qps));
    futures::future::try_join_all(starts).await
}

/// Like [`start_named`], with kube-controller-manager and kube-scheduler
/// allowed `qps` requests a second each. Their defaults (20 and 50) make a
/// ReplicaSet of 10,000 pods take over 8 minutes to fill and over 3 to
/// schedule, which only a scale benchmark needs to avoid.
pub async fn start_named_with_client_qps<S: AsRef<str>>(
    names: &[S],
    qps: u32,
) -> Result<Vec<Cluster>, HarnessError> {
    start_each(names, Some(qps)).await
}

/// Starts one real-node cluster per name, in parallel, all on one new [`Lan`] (returned: it
/// goes when the last of them does).
pub async fn start_real_named<S: AsRef<str>>(
    names: &[S],
) -> Result<(Arc<Lan>, Vec<Cluster>), HarnessError> {
    let bins = Binaries::locate()?;
    let node_bins = NodeBinaries::locate()?;
    realnode::group_the_harness_cpu()?;
    let lan = Arc::new(Lan::new()?);
    let starts = names.iter().map(|name| {
        Cluster::start_real(bins.clone(), node_bins.clone(), name.as_ref(), lan.clone())
    });
    let clusters = futures::future::try_join_all(starts).await?;
    Ok((lan, clusters))
}

impl Cluster {
    /// Creates a fresh cluster named `name` and waits until it schedules pods.
    pub async fn start(bins: Binaries, name: &str) -> Result<Self, HarnessError> {
        Self::start_node(bins, name, None, None).await
    }

    /// Creates a fresh cluster named `name` with a real node linked to `lan`, and waits until
    /// the node is Ready.
    pub async fn start_real(
        bins: Binaries,
        node_bins: NodeBinaries,
        name: &str,
        lan: Arc<Lan>,
    ) -> Result<Self, HarnessError> {
        Self::start_node(bins, name, Some((node_bins, lan)), None).await
    }

    async fn start_node(
        bins: Binaries,
        name: &str,
        real: Option<(NodeBinaries, Arc<Lan>)>,
        client_qps: Option<u32>,
    ) -> Result<Self, HarnessError> {
        install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix(&format!("counterweight-{name}-"))
            .tempdir()
            .map_err(|e| HarnessError::io("creating the cluster directory", e))?;
        let ports = Ports {
            etcd_client: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
        };
        // The node's address must be known for the certificates; the namespaces come first.
        let (host, real) = match real {
            None => (Ipv4Addr::LOCALHOST, None),
            Some((node_bins, lan)) => {
                // The CA and the admin kubeconfig are written first: the node's files need them.
                let node = RealNode::create(name, dir.path(), lan, node_bins, |addr| {
                    write_pki_and_kubeconfig(dir.path(), name, addr, ports.apiserver).map(drop)
                })?;
                (node.addr(), Some(node))
            }
        };
        let kubeconfig = if real.is_some() {
            dir.path().join("admin.kubeconfig")
        } else {
            write_pki_and_kubeconfig(dir.path(), name, host, ports.apiserver)?
        };
        let client = client_for(&kubeconfig, name).await?;
        let mut cluster = Self {
            name: name.to_owned(),
            host,
            real,
            dir,
            bins,
            ports,
            kubeconfig,
            client,
            procs: Vec::new(),
            client_qps,
        };
        cluster.boot().await?;
        Ok(cluster)
    }

    /// The cluster's name (also its kubeconfig context name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An admin client (group `system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Flags of a `counterweight-controller` process for HA member `name`
    /// on this cluster: its kubeconfig, the HA config file, peer and metrics
    /// ports on 127.0.0.1, and the mTLS files as `cw-certs dev` writes them
    /// into `certs` (`peer-<name>.crt`, `peer-<name>.key`, `ca.crt`). The
    /// `--peer` flags are the caller's: where peers listen is its choice.
    pub fn controller_args(
        &self,
        name: &str,
        ha_file: &Path,
        peer_port: u16,
        metrics_port: u16,
        certs: &Path,
    ) -> Vec<String> {
        vec![
            format!("--cluster={name}"),
            format!("--kubeconfig={}", self.kubeconfig().display()),
            format!("--ha-config={}", ha_file.display()),
            format!("--peer-listen=127.0.0.1:{peer_port}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            format!(
                "--tls-cert={}",
                certs.join(format!("peer-{name}.crt")).display()
            ),
            format!(
                "--tls-key={}",
                certs.join(format!("peer-{name}.key")).display()
            ),
            format!("--tls-ca={}", certs.join("ca.crt").display()),
        ]
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's working directory (certs, etcd data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The loopback ports in use.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The binaries this cluster runs, e.g. for [`Binaries::kubectl`].
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// Path of kubectl (same version as the apiserver); use it with
    /// `--kubeconfig` [`Cluster::kubeconfig`].
    pub fn kubectl(&self) -> PathBuf {
        self.bins.kubectl()
    }

    /// The API server URL.
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.host, self.ports.apiserver)
    }

    /// What plays this cluster's node.
    pub fn node_kind(&self) -> NodeKind {
        if self.real.is_some() {
            NodeKind::Real
        } else {
            NodeKind::Kwok
        }
    }

    /// The name of the cluster's node.
    pub fn node_name(&self) -> &'static str {
        if self.real.is_some() {
            REAL_NODE_NAME
        } else {
            NODE_NAME
        }
    }

    /// The real node, if the cluster has one (namespaces, link, cgroups).
    pub fn real_node(&self) -> Option<&RealNode> {
        self.real.as_ref()
    }

    /// Where the API server listens.
    pub fn host(&self) -> Ipv4Addr {
        self.host
    }

    /// Path of the cluster CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// Issues a client certificate for `user` in `groups` (at most one: a
    /// certificate made here carries one organization) and writes a
    /// kubeconfig for it, for tests that need a non-admin identity.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf, HarnessError> {
        let pki = self.dir.path().join("pki");
        let ca = load_ca(&pki)?;
        let mut spec = LeafSpec::new(user, Usage::Client);
        for g in groups {
            spec = spec.organization(*g);
        }
        let cert = ca.issue(&spec)?;
        let path = self.dir.path().join(format!("{user}.kubeconfig"));
        let kc = kubeconfig_json(
            &self.name,
            &self.server_url(),
            &ca.pem().cert_pem,
            &cert.cert_pem,
            &cert.key_pem,
        );
        write(&path, &kc)?;
        Ok(path)
    }

    /// Stops every process (API server down); etcd data is kept.
    pub fn stop(&mut self) {
        // Signal all first, so the graceful shutdowns overlap.
        for p in self.procs.iter().rev() {
            p.terminate();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(mut p) = self.procs.pop() {
            p.reap(deadline);
        }
    }

    /// Stops every process and, for a real node, runs its teardown (every
    /// container, namespace, cgroup, link and mount goes); what dropping
    /// the cluster does, less removing the directory, so that several
    /// clusters can be torn down in parallel. Idempotent.
    pub fn teardown(&mut self) {
        self.stop();
        if let Some(node) = self.real.as_mut() {
            node.teardown();
        }
    }

    /// Starts the processes again after [`Cluster::stop`] and waits until
    /// the API server is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.boot().await
    }

    /// Stops only kube-apiserver, leaving etcd and the others running.
    pub fn stop_apiserver(&mut self) {
        if let Some(i) = self.procs.iter().position(|p| p.name() == "kube-apiserver") {
            let mut p = self.procs.remove(i);
            p.stop(Duration::from_secs(5));
        }
    }

    /// The OS process id of the control-plane process `name` (e.g.
    /// `kube-apiserver`, `etcd`), while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name() == name)?.pid()
    }

    /// Freezes kube-apiserver (SIGSTOP): connections stay open and every
    /// request hangs, as with a stalled host, until [`Cluster::thaw_apiserver`].
    pub fn freeze_apiserver(&self) {
        if let Some(p) = self.procs.iter().find(|p| p.name() == "kube-apiserver") {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Lets a frozen kube-apiserver go on (SIGCONT).
    pub fn thaw_apiserver(&self) {
        if let Some(p) = self.procs.iter().find(|p| p.name() == "kube-apiserver") {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Starts kube-apiserver again after [`Cluster::stop_apiserver`].
    pub async fn start_apiserver(&mut self) -> Result<(), HarnessError> {
        let p = self.spawn("kube-apiserver", self.apiserver_args())?;
        self.procs.push(p);
        self.wait_ready().await
    }

    /// Checks that every process is still running.
    pub fn check_alive(&mut self) -> Result<(), HarnessError> {
        self.procs.iter_mut().try_for_each(Process::check_alive)
    }

    async fn boot(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let etcd = self.spawn("etcd", self.etcd_args())?;
        self.procs.push(etcd);
        let apiserver = self.spawn("kube-apiserver", self.apiserver_args())?;
        self.procs.push(apiserver);
        self.wait_ready().await?;
        for (name, args) in [
            ("kube-controller-manager", self.controller_manager_args()),
            ("kube-scheduler", self.scheduler_args()),
        ] {
            let p = self.spawn(name, args)?;
            self.procs.push(p);
        }
        let node = self
            .real
            .as_ref()
            .map(|n| (n.containerd(), n.kubelet(), n.kube_proxy()));
        match node {
            None => {
                let p = self.spawn("kwok", self.kwok_args())?;
                self.procs.push(p);
                self.ensure_node().await?;
            }
            Some(((ctd, ctd_args), kubelet, proxy)) => {
                let p = self.spawn_program("containerd", &ctd, ctd_args)?;
                self.procs.push(p);
                if let Some(node) = &self.real {
                    node.load_images().await?;
                }
                for (name, (prog, args)) in [("kubelet", kubelet), ("kube-proxy", proxy)] {
                    let p = self.spawn_program(name, &prog, args)?;
                    self.procs.push(p);
                }
            }
        }
        // Polled by hand rather than with `wait_for`: a process that exits
        // meanwhile (its port taken, a bad flag) fails the boot at once with
        // its log, instead of a timeout that names neither.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            let (node, sa) = (self.node_ready().await?, self.default_sa_exists().await?);
            if node && sa {
                break;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    cluster: self.name.clone(),
                    what: format!(
                        "node {} Ready ({node}) and the default ServiceAccount ({sa})",
                        self.node_name()
                    ),
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(cluster = %self.name, elapsed = ?started.elapsed(), "cluster up");
        Ok(())
    }

    fn spawn(&self, name: &str, args: Vec<String>) -> Result<Process, HarnessError> {
        self.spawn_program(name, &self.bins.path(name), args)
    }

    /// Starts `program` as process `name`, inside the real node's namespaces if there is one.
    fn spawn_program(
        &self,
        name: &str,
        program: &Path,
        args: Vec<String>,
    ) -> Result<Process, HarnessError> {
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| HarnessError::io("creating logs dir", e))?;
        let (program, args) = match &self.real {
            Some(node) => node.namespaces().wrap(program, &args),
            None => (program.to_owned(), args),
        };
        Process::spawn(name, &program, &args, &logs.join(format!("{name}.log")))
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn etcd_args(&self) -> Vec<String> {
        let p = self.ports;
        vec![
            "--name=default".into(),
            format!("--data-dir={}", self.path("etcd")),
            format!("--listen-client-urls=http://127.0.0.1:{}", p.etcd_client),
            format!("--advertise-client-urls=http://127.0.0.1:{}", p.etcd_client),
            format!("--listen-peer-urls=http://127.0.0.1:{}", p.etcd_peer),
            format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                p.etcd_peer
            ),
            format!("--initial-cluster=default=http://127.0.0.1:{}", p.etcd_peer),
            // Tests lose nothing they care about on a host crash; fsync costs seconds here.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ]
    }

    fn apiserver_args(&self) -> Vec<String> {
        let p = self.ports;
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", p.etcd_client),
            format!("--bind-address={}", self.host),
            format!("--advertise-address={}", self.host),
            format!("--secure-port={}", p.apiserver),
            format!("--cert-dir={}", self.path("apiserver-certs")),
            format!("--tls-cert-file={}", self.path("pki/apiserver.crt")),
            format!("--tls-private-key-file={}", self.path("pki/apiserver.key")),
            format!("--client-ca-file={}", self.path("pki/ca.crt")),
            format!(
                "--service-account-issuer=https://{}:{}",
                self.host, p.apiserver
            ),
            format!("--service-account-key-file={}", self.path("pki/sa.pub")),
            format!(
                "--service-account-signing-key-file={}",
                self.path("pki/sa.key")
            ),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--v=1".into(),
        ];
        match &self.real {
            None => args.push("--authorization-mode=RBAC".into()),
            Some(node) => {
                // The kubelet's identity is checked as a node's.
                args.push("--authorization-mode=Node,RBAC".into());
                args.extend(node.apiserver_args());
            }
        }
        args
    }

    /// `--kube-api-qps` and `--kube-api-burst` for the control plane's
    /// clients, if the cluster was started with a rate.
    fn client_rate_args(&self) -> Vec<String> {
        self.client_qps
            .map(|qps| {
                vec![
                    format!("--kube-api-qps={qps}"),
                    format!("--kube-api-burst={}", qps.saturating_mul(2)),
                ]
            })
            .unwrap_or_default()
    }

    fn controller_manager_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.controller_manager),
            "--leader-elect=false".into(),
            format!(
                "--service-account-private-key-file={}",
                self.path("pki/sa.key")
            ),
            format!("--root-ca-file={}", self.path("pki/ca.crt")),
            "--use-service-account-credentials=false".into(),
            "--v=1".into(),
        ];
        args.extend(self.client_rate_args());
        args
    }

    fn scheduler_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.scheduler),
            "--leader-elect=false".into(),
            "--v=1".into(),
        ];
        args.extend(self.client_rate_args());
        args
    }

    fn kwok_args(&self) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--config={}", self.path("kwok-stages.yaml")),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            // Pod IPs are labels on fake pods; nothing routes to them.
            "--cidr=10.244.0.0/16".into(),
            "--node-ip=127.0.0.1".into(),
            "--node-lease-duration-seconds=40".into(),
        ]
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| HarnessError::Client {
                    cluster: self.name.clone(),
                    message: e.to_string(),
                })?;
            if let Ok(body) = self.client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    cluster: self.name.clone(),
                    what: "kube-apiserver /readyz".into(),
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ensure_node(&self) -> Result<(), HarnessError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(NODE_NAME.into()),
                annotations: Some(BTreeMap::from([(
                    "kwok.x-k8s.io/node".to_owned(),
                    "fake".to_owned(),
                )])),
                labels: Some(BTreeMap::from([
                    ("type".to_owned(), "kwok".to_owned()),
                    ("kubernetes.io/hostname".to_owned(), NODE_NAME.to_owned()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(source) => Err(HarnessError::Api {
                cluster: self.name.clone(),
                what: "creating the fake node".into(),
                source,
            }),
        }
    }

    async fn node_ready(&self) -> Result<bool, HarnessError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get_opt(self.node_name())
            .await
            .map_err(|source| HarnessError::Api {
                cluster: self.name.clone(),
                what: "reading the fake node".into(),
                source,
            })?;
        Ok(node
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
    }

    async fn default_sa_exists(&self) -> Result<bool, HarnessError> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "default");
        sas.get_opt("default")
            .await
            .map(|o| o.is_some())
            .map_err(|source| HarnessError::Api {
                cluster: self.name.clone(),
                what: "reading the default ServiceAccount".into(),
                source,
            })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("COUNTERWEIGHT_KEEP_CLUSTER_DIRS").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                // An empty stand-in so TempDir's drop has something to remove.
                match tempfile::tempdir() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            );
            eprintln!("kept cluster dir {}", dir.keep().display());
        }
    }
}

/// Writes a kubeconfig with one context per cluster (named after it) to
/// `path`, for humans and for `cwctl`.
pub fn write_merged_kubeconfig(clusters: &[Cluster], path: &Path) -> Result<(), HarnessError> {
    write_kubeconfig_of(&clusters.iter().collect::<Vec<_>>(), path)
}

/// [`write_merged_kubeconfig`] for clusters held apart (a KWOK one and a
/// real-node one, say), not in one slice.
pub fn write_kubeconfig_of(clusters: &[&Cluster], path: &Path) -> Result<(), HarnessError> {
    let mut merged = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [], "users": [], "contexts": [],
        "current-context": clusters.first().map(|c| c.name.clone()).unwrap_or_default(),
    });
    for c in clusters {
        let text = std::fs::read_to_string(&c.kubeconfig)
            .map_err(|e| HarnessError::io(format!("reading {}", c.kubeconfig.display()), e))?;
        let one: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            HarnessError::io(
                "parsing a harness kubeconfig",
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        for key in ["clusters", "users", "contexts"] {
            if let (Some(dst), Some(src)) = (merged[key].as_array_mut(), one[key].as_array()) {
                dst.extend(src.iter().cloned());
            }
        }
    }
    write(path, &merged.to_string())
}

fn write_pki_and_kubeconfig(
    dir: &Path,
    name: &str,
    host: Ipv4Addr,
    port: u16,
) -> Result<PathBuf, HarnessError> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| HarnessError::io("creating pki dir", e))?;
    let ca = CertificateAuthority::new(&format!("counterweight-test-{name}-ca"))?;
    ca.pem().write(&pki, "ca")?;
    let mut sans = vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "10.96.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ];
    if !host.is_loopback() {
        sans.push(host.to_string());
    }
    ca.issue(&LeafSpec::new("kube-apiserver", Usage::Server).sans(sans))?
        .write(&pki, "apiserver")?;
    let admin = ca.issue(
        &LeafSpec::new("counterweight-admin", Usage::Client).organization("system:masters"),
    )?;
    admin.write(&pki, "admin")?;
    let sa = counterweight_certs::key_pair("service-account-signing")?;
    counterweight_certs::write_file(&pki.join("sa.key"), &sa.private_pem)?;
    counterweight_certs::write_file(&pki.join("sa.pub"), &sa.public_pem)?;
    write(
        &dir.join("kwok-stages.yaml"),
        include_str!("kwok-stages.yaml"),
    )?;
    let path = dir.join("admin.kubeconfig");
    let kc = kubeconfig_json(
        name,
        &format!("https://{host}:{port}"),
        &ca.pem().cert_pem,
        &admin.cert_pem,
        &admin.key_pem,
    );
    write(&path, &kc)?;
    Ok(path)
}

// JSON is valid YAML, so kubectl and kube-rs both read this.
pub(crate) fn kubeconfig_json(name: &str, server: &str, ca: &str, cert: &str, key: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let user = format!("{name}-admin");
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(cert),
            "client-key-data": b64(key),
        }}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
    })
    .to_string()
}

async fn client_for(path: &Path, name: &str) -> Result<kube::Client, HarnessError> {
    let err = |message: String| HarnessError::Client {
        cluster: name.to_owned(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

pub(crate) fn write(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

/// The cluster CA kept in `pki` (`ca.crt`, `ca.key`), to issue more
/// certificates after the cluster was made.
pub(crate) fn load_ca(pki: &Path) -> Result<CertificateAuthority, HarnessError> {
    let read = |name: &str| {
        std::fs::read_to_string(pki.join(name))
            .map_err(|e| HarnessError::io(format!("reading {name}"), e))
    };
    Ok(CertificateAuthority::from_pem(
        &read("ca.crt")?,
        &read("ca.key")?,
    )?)
}

/// A loopback port that is free now and nobody in this process has been
/// handed yet, below the ephemeral range (see the comment inside).
///
/// A process-wide set keeps two clusters of the same test run from ever
/// getting the same one.
pub fn free_port() -> Result<u16, HarnessError> {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    // Below the kernel's ephemeral range: a port from that range, free now,
    // can be taken by any process's next outgoing connection before the
    // server it is meant for binds it (a kube-controller-manager binds its
    // port seconds after the port is chosen, while several clusters make
    // thousands of connections). A port below it is only ever taken by a
    // bind. The start is spread by process id so that concurrent test
    // processes seldom try the same ports.
    let (low, high) = (PORT_FLOOR, ephemeral_low().max(PORT_FLOOR + 1000));
    let span = u32::from(high - low);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let start = (std::process::id().wrapping_mul(7919) + handed.len() as u32) % span;
    for i in 0..span {
        let port = low + u16::try_from((start + i) % span).unwrap_or(0);
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok() {
            handed.push(port);
            return Ok(port);
        }
    }
    Err(HarnessError::io(
        "finding a free loopback port",
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("every port from {low} to {high} is taken"),
        ),
    ))
}

/// Lowest port [`free_port`] hands out.
const PORT_FLOOR: u16 = 10_000;

/// The low end of the kernel's ephemeral port range (32768 if unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A plain `GET` of `path` on 127.0.0.1:`port` over HTTP/1.0 (the server
/// closes the connection after the answer), bounded by 5 s: status and
/// body. For the plain-HTTP probe and metrics ports of the processes the
/// tests and the demo start.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e: String| format!("GET {path} on port {port}: {e}"))
}
