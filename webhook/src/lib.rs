//! The Counterweight admission webhook.
//!
//! A mutating endpoint injects the init-gate into service pods of opted-in
//! namespaces, and a validating endpoint checks the `counterweight-policy`
//! ConfigMap with the same core validation the controller uses. The patch and
//! the verdicts come from `counterweight-core`; this crate owns TLS, HTTP and
//! AdmissionReview plumbing: [`admission`] turns bytes into answers,
//! [`tls`] keeps the serving certificate fresh, [`server`] runs the sockets
//! and [`metrics`] counts what happened. [`run`] wires them from [`Args`].

pub mod admission;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::inject::{GatePosition, GateResources, InjectorConfig};
use counterweight_core::names::{STATE_CONFIGMAP, SYSTEM_NAMESPACE};

pub use admission::{Handler, NamespaceLabels, Reply};
pub use metrics::Metrics;
pub use server::{Listeners, MUTATE_PATH, ServeOptions, VALIDATE_POLICY_PATH, serve};
pub use tls::CertStore;

/// Where the gate goes among a pod's init containers (flag form of [`GatePosition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PositionArg {
    /// Before every other init container.
    First,
    /// After the pod's own init containers.
    Last,
}

/// Command-line and environment configuration of the webhook.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "counterweight-webhook", version, about, long_about = None)]
pub struct Args {
    /// Address of the HTTPS admission endpoint.
    #[arg(
        long,
        env = "COUNTERWEIGHT_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(
        long,
        env = "COUNTERWEIGHT_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// PEM serving certificate chain; reloaded when the file changes.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of `--tls-cert`; reloaded with it.
    #[arg(long, env = "COUNTERWEIGHT_TLS_KEY")]
    pub tls_key: PathBuf,

    /// How often, in milliseconds, the certificate files are checked for changes.
    #[arg(long, env = "COUNTERWEIGHT_TLS_POLL_MS", default_value_t = 2000)]
    pub tls_poll_ms: u64,

    /// Image of the init-gate container to inject.
    #[arg(
        long,
        env = "COUNTERWEIGHT_GATE_IMAGE",
        default_value = "counterweight/gate:latest"
    )]
    pub gate_image: String,

    /// Image pull policy of the injected gate (Always, IfNotPresent, Never); unset leaves the cluster default.
    #[arg(long, env = "COUNTERWEIGHT_GATE_IMAGE_PULL_POLICY")]
    pub gate_image_pull_policy: Option<String>,

    /// Where the gate goes among a pod's init containers.
    #[arg(
        long,
        env = "COUNTERWEIGHT_GATE_POSITION",
        value_enum,
        default_value = "first"
    )]
    pub gate_position: PositionArg,

    /// Name of this cluster; injected pods expect to run here.
    #[arg(long, env = "COUNTERWEIGHT_CLUSTER_NAME")]
    pub cluster_name: String,

    /// Namespace of the state ConfigMap; pods in it are never injected.
    #[arg(long, env = "COUNTERWEIGHT_STATE_NAMESPACE", default_value = SYSTEM_NAMESPACE)]
    pub state_namespace: String,

    /// Name of the state ConfigMap the gate waits on.
    #[arg(long, env = "COUNTERWEIGHT_STATE_NAME", default_value = STATE_CONFIGMAP)]
    pub state_name: String,

    /// CPU request of the gate container.
    #[arg(long, env = "COUNTERWEIGHT_GATE_CPU_REQUEST", default_value = "10m")]
    pub gate_cpu_request: String,

    /// Memory request of the gate container.
    #[arg(
        long,
        env = "COUNTERWEIGHT_GATE_MEMORY_REQUEST",
        default_value = "16Mi"
    )]
    pub gate_memory_request: String,

    /// CPU limit of the gate container.
    #[arg(long, env = "COUNTERWEIGHT_GATE_CPU_LIMIT", default_value = "100m")]
    pub gate_cpu_limit: String,

    /// Memory limit of the gate container.
    #[arg(long, env = "COUNTERWEIGHT_GATE_MEMORY_LIMIT", default_value = "64Mi")]
    pub gate_memory_limit: String,

    /// Skip hostNetwork pods (by default they are gated like any other; see the core docs).
    #[arg(long, env = "COUNTERWEIGHT_SKIP_HOST_NETWORK", default_value_t = false)]
    pub skip_host_network: bool,

    /// Inject the lease sidecar after the gate (see the core docs); turn it
    /// off only on clusters without native sidecars (before 1.29).
    #[arg(long, env = "COUNTERWEIGHT_LEASE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub lease_sidecar: bool,

    /// Port of the lease sidecar's readiness endpoint in each pod's network.
    #[arg(long, env = "COUNTERWEIGHT_READY_PORT", default_value_t = counterweight_core::inject::DEFAULT_READY_PORT)]
    pub ready_port: u16,

    /// Largest accepted admission request body, in bytes.
    #[arg(long, env = "COUNTERWEIGHT_MAX_BODY_BYTES", default_value_t = 7 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Bytes of large request bodies (over 64 KiB) held at once; must be at
    /// least --max-body-bytes. Small reviews have their own pool.
    #[arg(long, env = "COUNTERWEIGHT_MAX_INFLIGHT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_inflight_bytes: usize,

    /// Small requests (up to 64 KiB, ordinary pod reviews) held at once.
    #[arg(long, env = "COUNTERWEIGHT_MAX_SMALL_REQUESTS", default_value_t = 128)]
    pub max_small_requests: usize,

    /// Seconds in-flight requests may take to finish on shutdown.
    #[arg(long, env = "COUNTERWEIGHT_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
}

impl Args {
    /// The injector configuration these flags describe.
    pub fn injector(&self) -> InjectorConfig {
        InjectorConfig {
            image: self.gate_image.clone(),
            image_pull_policy: self.gate_image_pull_policy.clone(),
            position: match self.gate_position {
                PositionArg::First => GatePosition::First,
                PositionArg::Last => GatePosition::Last,
            },
            state_namespace: self.state_namespace.clone(),
            state_name: self.state_name.clone(),
            cluster_name: self.cluster_name.clone(),
            resources: GateResources {
                cpu_request: self.gate_cpu_request.clone(),
                memory_request: self.gate_memory_request.clone(),
                cpu_limit: self.gate_cpu_limit.clone(),
                memory_limit: self.gate_memory_limit.clone(),
            },
            skip_host_network: self.skip_host_network,
            lease_sidecar: self.lease_sidecar,
            ready_port: self.ready_port,
            ..InjectorConfig::default()
        }
    }

    /// The server tunables these flags describe.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            max_body_bytes: self.max_body_bytes,
            inflight_bytes: self.max_inflight_bytes,
            small_requests: self.max_small_requests,
            cert_poll: Duration::from_millis(self.tls_poll_ms.max(10)),
            drain_timeout: Duration::from_secs(self.drain_seconds),
            ..ServeOptions::default()
        }
    }
}

/// Errors the webhook reports to its binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file does not hold a usable PEM pair.
    #[error("unusable certificate material in {path}: {message}")]
    BadCertificate {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A server stopped with an error.
    #[error("server failed: {0}")]
    Serve(String),
}

/// Binds the configured addresses, loads the certificate and serves until
/// `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let listeners = Listeners {
        admission: bind(args.listen).await?,
        ops: bind(args.metrics_listen).await?,
    };
    let handler = Handler::new(args.injector(), NamespaceLabels::TrustSelector);
    let certs = Arc::new(CertStore::load(
        &args.tls_cert,
        &args.tls_key,
        handler.metrics.clone(),
    )?);
    tracing::info!(
        listen = %args.listen,
        metrics = %args.metrics_listen,
        cluster = %args.cluster_name,
        "starting webhook"
    );
    serve(
        listeners,
        certs,
        Arc::new(handler),
        args.serve_options(),
        shutdown,
    )
    .await
}
