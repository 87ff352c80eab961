//! What a controller is told to do, as plain data: the binary's flags
//! (`main.rs`, clap) become a [`Config`], and [`crate::Controller`] runs
//! it. Nothing here parses a command line, so tests and other front ends
//! build one directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::leader::LeaderConfig;
use crate::serving::PodServingConfig;

/// Everything a controller process needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of the cluster this controller runs in; peers know it by it.
    pub cluster: String,
    /// Namespace of the state and policy ConfigMaps (and of the leader
    /// Lease).
    pub namespace: String,
    /// Kubeconfig to use instead of the pod's service account (may list
    /// several files, as `KUBECONFIG` does).
    pub kubeconfig: Option<PathBuf>,
    /// Address of the plain-HTTP `/healthz`, `/readyz` and `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Leader election among replicas; `None` runs this process alone.
    pub leader: Option<LeaderConfig>,
    /// The HA group; `None` only evaluates health.
    pub ha: Option<HaSettings>,
}

/// How this controller joins its HA group.
#[derive(Debug, Clone)]
pub struct HaSettings {
    /// The HA configuration file (YAML or JSON): clusters with priorities,
    /// the witness, lease timings. Followed while the controller runs.
    pub config_file: PathBuf,
    /// Run as the group's witness: votes only, no workload. Must agree with
    /// the file's `witness`, so that a typo cannot turn a workload cluster
    /// into a voter.
    pub witness: bool,
    /// Address the peer protocol (HTTPS, mutual TLS) listens on.
    pub peer_listen: SocketAddr,
    /// Peers as `name=https://host:port`.
    pub peers: Vec<String>,
    /// This controller's certificate chain, its key and the CA bundle that
    /// peer certificates must chain to (PEM files); all three are needed.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle of the peers.
    pub tls_ca: Option<PathBuf>,
    /// How the service pods are driven: how many are patched or evicted at
    /// once, and how long a refused eviction is retried before a delete.
    /// Its `restart_delay` is not taken from here: the HA configuration's
    /// lease and margin set it.
    pub pods: PodServingConfig,
}
