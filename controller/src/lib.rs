//! The Counterweight controller: the "HA pod" of the seed, one per cluster.
//!
//! It observes pods through a watch cache, asks `counterweight-core` for the
//! weighted health verdict and the next protocol step, talks to its peer
//! controllers over mutual TLS, and writes the outcome to the
//! `counterweight-state` ConfigMap. It decides nothing on its own: every
//! decision is a call into the core.

pub mod gate_access;

use std::net::SocketAddr;
use std::path::PathBuf;

use counterweight_core::names;

/// Command-line and environment configuration of the controller.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "counterweight-controller", version, about, long_about = None)]
pub struct Args {
    /// Name of the cluster this controller runs in; peers know it by this name.
    #[arg(long, env = "COUNTERWEIGHT_CLUSTER")]
    pub cluster: String,

    /// Namespace that holds the state and policy ConfigMaps.
    #[arg(long, env = "COUNTERWEIGHT_NAMESPACE", default_value = names::SYSTEM_NAMESPACE)]
    pub namespace: String,

    /// Kubeconfig to use instead of the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address the peer protocol (HTTPS, mutual TLS) listens on.
    #[arg(
        long,
        env = "COUNTERWEIGHT_PEER_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    pub peer_listen: SocketAddr,

    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(
        long,
        env = "COUNTERWEIGHT_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// A peer controller as `name=https://host:port`; repeat for each peer.
    #[arg(long = "peer", env = "COUNTERWEIGHT_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// PEM certificate chain this controller presents to its peers.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "COUNTERWEIGHT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle that peer certificates must chain to.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Run as a witness: no workloads, only votes for the peers.
    #[arg(long, env = "COUNTERWEIGHT_WITNESS")]
    pub witness: bool,
}

/// Errors the controller reports to its binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A part of the controller that is not built yet was asked for.
    #[error("{0} is not implemented yet; see the open issues")]
    NotImplemented(&'static str),
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    tracing::info!(cluster = %args.cluster, namespace = %args.namespace, "starting controller");
    drop(shutdown);
    Err(Error::NotImplemented("the controller loop"))
}
