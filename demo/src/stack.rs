//! The processes of the demo: two harness clusters and, per cluster, the
//! admission webhook, the controller and one init-gate, all on 127.0.0.1
//! with development certificates made in this process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_core::ha::{ClusterSpec, HaConfig};
use counterweight_core::names;
use counterweight_harness::{Cluster, Process, free_port};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, PostParams};

use crate::ems;
use crate::say;

/// The clusters, most preferred first: `east` starts active.
pub const CLUSTERS: [&str; 2] = ["east", "west"];

/// How long one start-up step may take on a busy two-core machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll period of the start-up waits.
const POLL: Duration = Duration::from_millis(100);

/// A real `counterweight-gate` process standing in for the init container
/// of one new service pod: KWOK runs no containers, so this is where the
/// FIG. 6 wait loop really runs.
pub struct Gate {
    /// The cluster it waits on.
    pub cluster: String,
    /// The process; its log holds the `waiting:` and `released:` lines.
    pub process: Process,
}

/// Everything the demo started. Dropping it stops every process and removes
/// every directory; the field order is the drop order, so our own processes
/// stop before the clusters they talk to.
pub struct Stack {
    /// One gate per cluster.
    pub gates: Vec<Gate>,
    controllers: Vec<Process>,
    webhooks: Vec<Process>,
    /// The clusters, in [`CLUSTERS`] order.
    pub clusters: Vec<Cluster>,
    /// Certificates, the HA config and the merged kubeconfig.
    pub work: tempfile::TempDir,
    /// A kubeconfig with one context per cluster, for `cwctl` and kubectl.
    pub kubeconfig: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Our processes first (each Process kills its group on drop), then
        // the clusters in parallel: each waits up to 5 s for its API server
        // to shut down gracefully, and one after the other doubles that.
        self.gates.clear();
        self.controllers.clear();
        self.webhooks.clear();
        let clusters = std::mem::take(&mut self.clusters);
        std::thread::scope(|s| {
            for c in clusters {
                s.spawn(move || drop(c));
            }
        });
    }
}

/// Where the workspace's binaries are: `$env`, else next to this binary
/// (`cargo build` puts every binary of the workspace in one directory).
fn workspace_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the demo binary")?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("the demo binary has no parent directory")?;
    if !path.exists() {
        bail!(
            "{} not found. Run the demo with tools/demo.sh, or build it first: \
             cargo build -p counterweight-controller -p counterweight-webhook -p counterweight-gate \
             (or set {env})",
            path.display()
        );
    }
    Ok(path)
}

impl Stack {
    /// Starts the clusters, webhooks and controllers and installs the EMS.
    pub async fn start(t0: Instant) -> Result<Self> {
        let controller_bin =
            workspace_bin("counterweight-controller", "COUNTERWEIGHT_CONTROLLER_BIN")?;
        let webhook_bin = workspace_bin("counterweight-webhook", "COUNTERWEIGHT_WEBHOOK_BIN")?;
        let gate_bin = workspace_bin("counterweight-gate", "COUNTERWEIGHT_GATE_BIN")?;

        say(
            t0,
            "starting clusters east and west (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK)",
        );
        let clusters = counterweight_harness::start_named(&CLUSTERS)
            .await
            .context("starting the local clusters")?;
        let work = tempfile::Builder::new()
            .prefix("counterweight-demo-")
            .tempdir()
            .context("creating the demo's directory")?;
        let kubeconfig = work.path().join("demo.kubeconfig");
        counterweight_harness::write_merged_kubeconfig(&clusters, &kubeconfig)?;
        for c in &clusters {
            say(
                t0,
                &format!(
                    "  {} is up at {} (logs in {})",
                    c.name(),
                    c.server_url(),
                    c.dir().join("logs").display()
                ),
            );
        }

        let ca_pem = write_certs(work.path())?;
        let ha_file = write_ha_config(work.path())?;
        let mut stack = Self {
            gates: Vec::new(),
            controllers: Vec::new(),
            webhooks: Vec::new(),
            clusters,
            work,
            kubeconfig,
        };

        for i in 0..CLUSTERS.len() {
            ems::namespaces(&stack.clusters[i].client()).await?;
        }
        say(
            t0,
            "starting a webhook per cluster (HTTPS on 127.0.0.1, registered by url: + caBundle)",
        );
        for i in 0..CLUSTERS.len() {
            let p = stack.start_webhook(i, &webhook_bin, &ca_pem).await?;
            stack.webhooks.push(p);
        }
        for c in &stack.clusters {
            ems::policy(&c.client()).await?;
        }

        let peer_ports: Vec<u16> = CLUSTERS
            .iter()
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        say(
            t0,
            "starting a controller per cluster (peers over mutual TLS on 127.0.0.1)",
        );
        for i in 0..CLUSTERS.len() {
            let p = stack.start_controller(i, &controller_bin, &ha_file, &peer_ports)?;
            stack.controllers.push(p);
        }

        say(
            t0,
            "deploying the sample EMS in namespace ems of both clusters",
        );
        for c in &stack.clusters {
            ems::deploy(&c.client()).await?;
        }
        for i in 0..CLUSTERS.len() {
            stack.wait_gate_access(i).await?;
            let g = stack.start_gate(i, &gate_bin)?;
            stack.gates.push(g);
        }
        Ok(stack)
    }

    /// Fails with the log tail of any of our processes that has exited
    /// (gates excepted: they exit 0 when released).
    pub fn check_alive(&mut self) -> Result<()> {
        for p in self.controllers.iter_mut().chain(self.webhooks.iter_mut()) {
            p.check_alive()?;
        }
        for c in &mut self.clusters {
            c.check_alive()?;
        }
        Ok(())
    }

    async fn start_webhook(&mut self, i: usize, bin: &Path, ca_pem: &[u8]) -> Result<Process> {
        let cluster = &self.clusters[i];
        let (port, ops) = (free_port()?, free_port()?);
        let certs = self.work.path();
        let args = vec![
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen=127.0.0.1:{ops}"),
            format!("--cluster-name={}", CLUSTERS[i]),
            format!("--tls-cert={}", certs.join("webhook.crt").display()),
            format!("--tls-key={}", certs.join("webhook.key").display()),
        ];
        let mut p = Process::spawn(
            "counterweight-webhook",
            bin,
            &args,
            &cluster.dir().join("logs/webhook.log"),
        )?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !matches!(http_get(ops, "/readyz").await, Ok((200, _))) {
            p.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} webhook: /readyz not OK after {STEP_TIMEOUT:?}",
                    CLUSTERS[i]
                );
            }
            tokio::time::sleep(POLL).await;
        }
        let client = cluster.client();
        let (m, v) = counterweight_harness::loopback_webhook_configs(port, ca_pem)?;
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &m)
            .await
            .context("registering the mutating webhook")?;
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &v)
            .await
            .context("registering the validating webhook")?;
        // The API server picks registrations up asynchronously: ask it to
        // admit a pod in dry-run until the answer comes back injected.
        let pods: Api<Pod> = Api::namespaced(client, ems::NAMESPACE);
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let probe = ems::probe_pod();
        loop {
            if let Ok(admitted) = pods.create(&dry, &probe).await
                && ems::is_injected(&admitted)
            {
                return Ok(p);
            }
            p.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: the API server did not call the webhook within {STEP_TIMEOUT:?}",
                    CLUSTERS[i]
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn start_controller(
        &self,
        i: usize,
        bin: &Path,
        ha_file: &Path,
        peer_ports: &[u16],
    ) -> Result<Process> {
        let name = CLUSTERS[i];
        let cluster = &self.clusters[i];
        let certs = self.work.path();
        let mut args = cluster.controller_args(name, ha_file, peer_ports[i], free_port()?, certs);
        for (j, peer) in CLUSTERS.iter().enumerate().filter(|(j, _)| *j != i) {
            args.push(format!("--peer={peer}=https://127.0.0.1:{}", peer_ports[j]));
        }
        Ok(Process::spawn(
            "counterweight-controller",
            bin,
            &args,
            &cluster.dir().join("logs/controller.log"),
        )?)
    }

    /// Waits until the controller has granted the gate of `ems` pods read
    /// access to the state (its RoleBinding exists); until then a gate
    /// only logs 403s, which is correct but noise in a demo.
    async fn wait_gate_access(&mut self, i: usize) -> Result<()> {
        let name = counterweight_core::names::gate_binding_name(ems::NAMESPACE);
        let api: Api<RoleBinding> =
            Api::namespaced(self.clusters[i].client(), names::SYSTEM_NAMESPACE);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while api.get_opt(&name).await?.is_none() {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: the controller did not create RoleBinding {name} within {STEP_TIMEOUT:?}",
                    CLUSTERS[i]
                );
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    fn start_gate(&self, i: usize, bin: &Path) -> Result<Gate> {
        let name = CLUSTERS[i];
        let cluster = &self.clusters[i];
        // The identity a gate has in a pod of namespace ems: that
        // namespace's service accounts. The controller grants them read
        // access to the state ConfigMap only (gate_access), so this also
        // shows that RBAC at work.
        let sa = format!("system:serviceaccount:{}:default", ems::NAMESPACE);
        let group = format!("system:serviceaccounts:{}", ems::NAMESPACE);
        // Only the namespace's group: the gate's RoleBinding names it.
        let kubeconfig = cluster.user_kubeconfig(&sa, &[&group])?;
        let args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--cluster={name}"),
            format!("--pod-name={}", ems::GATE_POD),
            format!("--pod-namespace={}", ems::NAMESPACE),
            format!(
                "--epoch-file={}",
                self.work
                    .path()
                    .join(format!("gate-{name}.epoch"))
                    .display()
            ),
            "--log-level=info".to_owned(),
        ];
        let process = Process::spawn(
            "counterweight-gate",
            bin,
            &args,
            &cluster.dir().join("logs/gate.log"),
        )?;
        Ok(Gate {
            cluster: name.to_owned(),
            process,
        })
    }
}

/// One CA for everything, a webhook serving certificate for 127.0.0.1, and
/// a peer certificate per cluster naming `<name>.peers.counterweight.dev`,
/// the identity the controllers check. Returns the CA (the caBundle).
fn write_certs(dir: &Path) -> Result<Vec<u8>> {
    let ca = CertificateAuthority::new("counterweight-demo-ca")?;
    ca.pem().write(dir, "ca")?;
    ca.issue(
        &LeafSpec::new("counterweight-webhook", Usage::Server).sans(["127.0.0.1", "localhost"]),
    )?
    .write(dir, "webhook")?;
    for n in CLUSTERS {
        ca.issue(&LeafSpec::new(n, Usage::Peer).sans([format!("{n}.peers.counterweight.dev")]))?
            .write(dir, &format!("peer-{n}"))?;
    }
    Ok(ca.pem().cert_pem.as_bytes().to_vec())
}

/// The HA group: east preferred. Timings are the e2e tests' (probe every
/// 200 ms, 1.5 s leases with a 300 ms margin) so the handover is quick to
/// watch; production uses seconds (manifests/base).
fn write_ha_config(dir: &Path) -> Result<PathBuf> {
    let clusters = CLUSTERS
        .iter()
        .zip((1..=CLUSTERS.len() as u32).rev())
        .map(|(name, priority)| ClusterSpec {
            name: (*name).to_owned(),
            priority,
        })
        .collect();
    let mut c = HaConfig::new(clusters, None);
    c.probe_interval_ms = 200;
    c.lease_ms = 1500;
    c.margin_ms = 300;
    c.candidate_fresh_ms = 1000;
    // One machine: the clocks of a cluster's "nodes" are one clock.
    c.max_clock_skew_ms = 100;
    let path = dir.join("ha.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&c)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A plain HTTP/1.0 GET on 127.0.0.1; status and body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    counterweight_harness::http_get(port, path)
        .await
        .map_err(anyhow::Error::msg)
}
