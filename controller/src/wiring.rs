//! How a controller joins its HA group: the mTLS peer server and client,
//! the operator-command reader, the HA-config follower, and the channels
//! that bring all of them to the HA loop ([`HaWiring`]).

use std::sync::Arc;
use std::time::Duration;

use counterweight_core::ha::{Command, Envelope, HaConfig};
use counterweight_core::health::HealthReport;
use tokio::sync::{mpsc, watch};

use crate::config::HaSettings;
use crate::{Error, commands, events, ha_config, ha_loop, health, peer, serving, state_store};

/// The HA side of a controller: its configuration and its links to peers.
pub struct HaWiring {
    /// Group configuration.
    pub config: HaConfig,
    /// Where outgoing messages go.
    pub outbox: Arc<dyn ha_loop::Outbox>,
    /// Authenticated incoming messages.
    pub inbox: mpsc::Receiver<Envelope>,
    /// Operator commands.
    pub commands: mpsc::Receiver<Command>,
    /// Changed versions of the HA configuration file, if it is watched.
    pub config_updates: Option<mpsc::Receiver<HaConfig>>,
    /// How the service pods are driven ([`crate::HaSettings::pods`]).
    pub pods: serving::PodServingConfig,
}

impl HaWiring {
    /// Whether this wiring makes cluster `cluster` the group's witness.
    pub(crate) fn is_witness(&self, cluster: &str) -> bool {
        self.config.is_witness(cluster)
    }

    /// The HA loop of member `settings.cluster`, acting through `serving`,
    /// and its inputs (`health` is `None` for the witness).
    pub(crate) fn into_loop<S: serving::Serving>(
        self,
        settings: &health::HealthSettings,
        store: state_store::StateStore,
        events: events::EventSink,
        serving: Arc<S>,
        health: Option<watch::Receiver<Option<HealthReport>>>,
    ) -> (ha_loop::HaLoop<S>, ha_loop::HaInputs) {
        let observed = Some(store.watch());
        let ha = ha_loop::HaLoop::new(
            &settings.cluster,
            self.config,
            store,
            events,
            self.outbox,
            serving,
        );
        let inputs = ha_loop::HaInputs {
            inbox: self.inbox,
            commands: self.commands,
            health,
            config: self.config_updates,
            observed,
        };
        (ha, inputs)
    }
}

/// The state ConfigMap store and the Event sink regarding it.
pub(crate) fn state_and_events(
    client: &kube::Client,
    settings: &health::HealthSettings,
) -> (state_store::StateStore, events::EventSink) {
    let store =
        state_store::StateStore::new(client.clone(), &settings.namespace, &settings.state_name);
    let events = events::EventSink::new(
        client.clone(),
        &settings.cluster,
        &settings.namespace,
        &settings.state_name,
    );
    (store, events)
}

/// Sends HA messages through the mTLS peer client without waiting.
struct PeerOutbox(peer::PeerClient);

impl ha_loop::Outbox for PeerOutbox {
    fn send(&self, envelope: Envelope) {
        // Dropped when the peer is slow: the protocol tolerates loss.
        let _ = self.0.send_detached(envelope);
    }
}

/// The witness flag and the file must agree: a typo must not turn a
/// workload cluster into a voter, nor a witness into a workload cluster.
fn check_witness(ha: &HaSettings, cluster: &str, config: &HaConfig) -> Result<(), Error> {
    let named_witness = config.is_witness(cluster);
    if ha.witness == named_witness {
        return Ok(());
    }
    let message = if ha.witness {
        format!(
            "--witness is set but the config's witness is {:?}, not {cluster:?}; set `witness: {cluster}` or drop --witness",
            config.witness
        )
    } else {
        format!(
            "{cluster:?} is the config's witness; start it with --witness (it holds no workloads)"
        )
    };
    Err(ha_config::error(&ha.config_file, message))
}

/// Starts the mTLS peer server and client of cluster `cluster`, the command
/// reader of `namespace` and the HA-config follower; all stop at
/// `shutdown`.
pub(crate) async fn peer_wiring(
    ha: &HaSettings,
    cluster: &str,
    namespace: &str,
    kube_client: &kube::Client,
    metrics: peer::PeerMetrics,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + 'static,
) -> Result<HaWiring, Error> {
    let (config_file, config) = ha_config::load(&ha.config_file)?;
    check_witness(ha, cluster, &config)?;
    let (Some(cert), Some(key), Some(ca)) = (&ha.tls_cert, &ha.tls_key, &ha.tls_ca) else {
        return Err(peer::PeerError::BadPeerArg {
            arg: "--tls-cert/--tls-key/--tls-ca".into(),
            message:
                "all three are required with --ha-config: peers are authenticated by mutual TLS"
                    .into(),
        }
        .into());
    };
    let endpoints = peer::parse_peers(&ha.peers)?;
    let tls = peer::PeerTls::load(
        peer::TlsPaths {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        },
        metrics.clone(),
    )?;
    let allowed = peer::PeerSet::new(config.member_names().filter(|n| *n != cluster))?;
    let listener = tokio::net::TcpListener::bind(ha.peer_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: ha.peer_listen,
            source,
        })?;
    tracing::info!(listen = ?listener.local_addr().ok(), peers = ?ha.peers, "peer protocol (mTLS)");
    let (tx, inbox) = mpsc::channel(256);
    tokio::spawn(peer::serve_with(
        listener,
        tls.clone(),
        allowed,
        tx,
        peer::ServerOptions {
            metrics: metrics.clone(),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    tokio::spawn(tls.clone().watch(Duration::from_secs(5), shutdown.clone()));
    let client = peer::PeerClient::new(
        endpoints,
        tls,
        peer::ClientOptions {
            metrics,
            ..Default::default()
        },
    )?;
    // Operator commands (cwctl switchover, pause, resume) arrive as requests
    // the controller validates and answers.
    let (commands_tx, commands) = mpsc::channel(8);
    tokio::spawn(commands::run(
        kube_client.clone(),
        namespace.to_owned(),
        commands_tx,
        shutdown,
    ));
    let (config_tx, config_updates) = mpsc::channel(1);
    tokio::spawn(ha_config::follow(
        config_file,
        config.clone(),
        config_tx,
        Duration::from_secs(5),
    ));
    Ok(HaWiring {
        config,
        outbox: Arc::new(PeerOutbox(client)),
        inbox,
        commands,
        config_updates: Some(config_updates),
        pods: ha.pods.clone(),
    })
}
