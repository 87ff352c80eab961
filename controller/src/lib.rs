//! The Counterweight controller: the "HA pod" of the seed, one per cluster.
//!
//! It observes pods through a watch cache, asks `counterweight-core` for the
//! weighted health verdict and the next protocol step, talks to its peer
//! controllers over mutual TLS, and writes the outcome to the
//! `counterweight-state` ConfigMap. It decides nothing on its own: every
//! decision is a call into the core.
//!
//! The binary parses its flags into a [`Config`] and calls
//! [`Controller::run`]. From there: [`wiring`] joins the HA group (peers,
//! commands, the HA-config file of [`ha_config`]), [`run`] starts the
//! witness or a member, and each member's loops live in [`health`],
//! [`ha_loop`] and [`serving`].

pub mod checks;
pub mod commands;
pub mod config;
pub mod events;
pub mod gate_access;
pub mod ha_config;
pub mod ha_loop;
pub mod health;
pub mod leader;
pub mod peer;
pub mod run;
pub mod serving;
pub mod serving_lease;
pub mod state_store;
pub mod telemetry;
pub mod wiring;

use std::future::Future;
use std::net::SocketAddr;

use futures::FutureExt;

pub use config::{Config, HaSettings};
pub use run::run_with;
pub use wiring::HaWiring;

/// Errors the controller reports to its binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable Kubernetes client configuration.
    #[error(transparent)]
    Client(#[from] counterweight_runtime::ClientError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free port or address")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The probe and metrics server failed.
    #[error("metrics server failed: {0}")]
    Metrics(#[source] std::io::Error),
    /// The health loop stopped.
    #[error(transparent)]
    Health(#[from] health::HealthError),
    /// The HA loop stopped.
    #[error(transparent)]
    Ha(#[from] ha_loop::HaError),
    /// The HA loop ended without being asked to; the controller exits.
    #[error("the HA loop stopped ({0}); exiting so that Kubernetes restarts this controller")]
    HaStopped(String),
    /// The peer transport could not be set up.
    #[error("peer transport: {0}")]
    Peer(#[source] Box<peer::PeerError>),
    /// Leader election failed or leadership was lost.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// The HA configuration file is unusable.
    #[error("cannot use HA config {path}: {message}")]
    HaConfigFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A file the controller follows could not be read.
    #[error(transparent)]
    ReadFile(#[from] counterweight_reload::ReadError),
}

/// The peer transport's errors are large: boxed, so that `Error` stays small.
impl From<peer::PeerError> for Error {
    fn from(e: peer::PeerError) -> Self {
        Error::Peer(Box::new(e))
    }
}

/// A controller process, from its [`Config`] to shutdown.
pub struct Controller {
    config: Config,
}

impl Controller {
    /// A controller that will run `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Runs until `shutdown` resolves: builds the client, serves the admin
    /// endpoints, waits for leadership if elected, joins the HA group, and
    /// runs the witness or a member. With leader election, losing the Lease
    /// stops everything at once, and the Lease is handed back only after
    /// everything has stopped acting.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let config = self.config;
        let client =
            counterweight_runtime::kube_client::client(config.kubeconfig.as_deref()).await?;
        let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.metrics_listen,
                source,
            })?;
        let settings = health::HealthSettings::new(&config.cluster, &config.namespace);
        let shutdown = shutdown.boxed().shared();
        // Created here so the peer transport counts into the same registry
        // that `/metrics` serves, and the probes answer while waiting for
        // the Lease.
        let telemetry::AdminServer {
            metrics,
            probes,
            task: server,
        } = telemetry::start(metrics_listener, shutdown.clone());
        let (stop, leadership) = match config.leader.clone() {
            Some(leader) => {
                probes.set_follower(true);
                let Some(leading) =
                    leader::acquire(client.clone(), leader, shutdown.clone()).await?
                else {
                    return run::finish_server(server).await;
                };
                probes.set_follower(false);
                // The Lease is handed back only once everything has stopped
                // acting (after `run_started` returns), never while the HA
                // loop may still write; until then it keeps being renewed.
                // Losing it stops everything at once.
                let kept = leading.keep();
                let (shutdown, lost) = (shutdown.clone(), kept.lost());
                let stop = async move {
                    tokio::select! {
                        () = shutdown => {}
                        () = lost => {}
                    }
                };
                (stop.boxed().shared(), Some(kept))
            }
            None => (shutdown.clone(), None),
        };
        metrics.leader.set(1);
        let ha = match &config.ha {
            Some(ha) => Some(
                wiring::peer_wiring(
                    ha,
                    &config.cluster,
                    &config.namespace,
                    &client,
                    metrics.peer.clone(),
                    stop.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let parts = run::Parts {
            client,
            settings,
            metrics: metrics.clone(),
            probes,
        };
        let result = run::run_started(parts, ha, stop).await;
        metrics.leader.set(0);
        if let Some(kept) = leadership {
            kept.release().await?;
        }
        result?;
        run::finish_server(server).await
    }
}
