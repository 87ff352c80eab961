//! The Counterweight controller: the "HA pod" of the seed, one per cluster.
//!
//! It observes pods through a watch cache, asks `counterweight-core` for the
//! weighted health verdict and the next protocol step, talks to its peer
//! controllers over mutual TLS, and writes the outcome to the
//! `counterweight-state` ConfigMap. It decides nothing on its own: every
//! decision is a call into the core.

pub mod checks;
pub mod commands;
pub mod events;
pub mod gate_access;
pub mod ha_loop;
pub mod health;
pub mod leader;
pub mod peer;
pub mod serving;
pub mod serving_lease;
pub mod state_store;
pub mod telemetry;

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

    /// Run as the HA config's witness: no pod watch, health or workload
    /// effects, only votes for the peers. Must agree with the config's
    /// `witness`, so a typo cannot turn a workload cluster into a voter.
    #[arg(long, env = "COUNTERWEIGHT_WITNESS")]
    pub witness: bool,

    /// HA group configuration (YAML or JSON): clusters with priorities, the
    /// witness, and lease timings. Without it the controller only evaluates
    /// health.
    #[arg(long, env = "COUNTERWEIGHT_HA_CONFIG")]
    pub ha_config: Option<PathBuf>,

    /// Run several replicas safely: only the holder of the Lease
    /// `--leader-election-lease` acts; the others wait, NotReady.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Name of the leader Lease in `--namespace`.
    #[arg(
        long,
        env = "COUNTERWEIGHT_LEADER_ELECTION_LEASE",
        default_value = "counterweight-controller"
    )]
    pub leader_election_lease: String,

    /// This replica's identity in the Lease; the pod name in a Deployment.
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,

    /// How long a silent leader's Lease must sit unchanged before another
    /// replica takes over.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_LEASE_DURATION", default_value = "15s", value_parser = duration_arg)]
    pub leader_lease_duration: std::time::Duration,

    /// How long the leader keeps acting without renewing; shorter than the
    /// lease duration.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_RENEW_DEADLINE", default_value = "10s", value_parser = duration_arg)]
    pub leader_renew_deadline: std::time::Duration,

    /// How often the leader renews and followers look again.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_RETRY_PERIOD", default_value = "2s", value_parser = duration_arg)]
    pub leader_retry_period: std::time::Duration,
}

fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    counterweight_core::policy::parse_duration(text)
}

/// Errors the controller reports to its binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable Kubernetes client configuration.
    #[error(
        "cannot configure the Kubernetes client: {0}; pass --kubeconfig or run in a pod with a service account"
    )]
    Kubeconfig(String),
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

/// The HA side of a controller: its configuration and its links to peers.
pub struct HaWiring {
    /// Group configuration.
    pub config: counterweight_core::ha::HaConfig,
    /// Where outgoing messages go.
    pub outbox: std::sync::Arc<dyn ha_loop::Outbox>,
    /// Authenticated incoming messages.
    pub inbox: tokio::sync::mpsc::Receiver<counterweight_core::ha::Envelope>,
    /// Operator commands.
    pub commands: tokio::sync::mpsc::Receiver<counterweight_core::ha::Command>,
    /// Changed versions of the HA configuration file, if it is watched.
    pub config_updates: Option<tokio::sync::mpsc::Receiver<counterweight_core::ha::HaConfig>>,
}

impl HaWiring {
    /// The HA loop of member `settings.cluster`, acting through `serving`,
    /// and its inputs (`health` is `None` for the witness).
    fn into_loop<S: serving::Serving>(
        self,
        settings: &health::HealthSettings,
        store: state_store::StateStore,
        events: events::EventSink,
        serving: std::sync::Arc<S>,
        health: Option<
            tokio::sync::watch::Receiver<Option<counterweight_core::health::HealthReport>>,
        >,
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
fn state_and_events(
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

/// Why the HA configuration file at `path` cannot be used.
fn ha_config_error(path: &std::path::Path, message: impl ToString) -> Error {
    Error::HaConfigFile {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Parses an HA configuration file (YAML or JSON).
fn parse_ha_config(
    path: &std::path::Path,
    text: &[u8],
) -> Result<counterweight_core::ha::HaConfig, Error> {
    counterweight_core::ha::HaConfig::from_yaml(text).map_err(|e| ha_config_error(path, e))
}

/// The HA configuration file, followed while the controller runs.
type HaConfigFile = counterweight_reload::Watched<counterweight_core::ha::HaConfig, Error>;

/// Loads the HA configuration file to follow it; the first version must
/// also validate, later ones go to the core, which decides what may change.
fn load_ha_config(
    path: &std::path::Path,
) -> Result<
    (
        std::sync::Arc<HaConfigFile>,
        counterweight_core::ha::HaConfig,
    ),
    Error,
> {
    let owned = path.to_owned();
    let file = HaConfigFile::load(vec![owned.clone()], move |files| match files {
        [text] => parse_ha_config(&owned, text),
        _ => Err(ha_config_error(&owned, "expected one file")),
    })?;
    let config = (*file.current()).clone();
    config.validate().map_err(|e| ha_config_error(path, e))?;
    Ok((std::sync::Arc::new(file), config))
}

/// Polls the HA configuration file every `every` (a mounted ConfigMap
/// changes by a symlink swap, which a poll sees and inotify on the path
/// does not) and hands each changed version that parses to the HA loop. The
/// core decides what may change at run time and records an Event either
/// way; a file that does not parse is logged, and the last good one stays.
/// Ends when the HA loop is gone.
async fn watch_ha_config(
    file: std::sync::Arc<HaConfigFile>,
    mut current: counterweight_core::ha::HaConfig,
    updates: tokio::sync::mpsc::Sender<counterweight_core::ha::HaConfig>,
    every: std::time::Duration,
) {
    use counterweight_reload::Reload;
    let path = file.path().display().to_string();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = updates.closed() => return,
            _ = tick.tick() => {}
        }
        match file.poll().await {
            Reload::Unchanged => {}
            Reload::Unreadable(e) => {
                tracing::warn!(%path, error = %e, "cannot read the HA config; keeping the one in force");
            }
            Reload::Rejected(e) => tracing::warn!(
                %path,
                error = %e,
                "the HA config file does not parse; keeping the one in force"
            ),
            Reload::Swapped => {
                let config = (*file.current()).clone();
                // A reformatted file with the same content is no change.
                if config == current {
                    continue;
                }
                tracing::info!(%path, "HA config file changed");
                current = config.clone();
                if updates.send(config).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Builds a Kubernetes client from `--kubeconfig`, or the in-cluster
/// service account and then the default kubeconfig.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Kubeconfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Kubeconfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| Error::Kubeconfig(e.to_string()))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    args: Args,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use futures::FutureExt;
    let client = client(args.kubeconfig.as_deref()).await?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.metrics_listen,
            source,
        })?;
    let settings = health::HealthSettings::new(&args.cluster, &args.namespace);
    let shutdown = shutdown.boxed().shared();
    // Created here so the peer transport counts into the same registry that
    // `/metrics` serves, and the probes answer while waiting for the Lease.
    let metrics = std::sync::Arc::new(telemetry::Metrics::new());
    let probes = std::sync::Arc::new(telemetry::Probes::default());
    let server = tokio::spawn(telemetry::serve(
        metrics_listener,
        metrics.clone(),
        probes.clone(),
        shutdown.clone(),
    ));
    let (stop, leadership) = if args.leader_elect {
        let config = leader::LeaderConfig {
            namespace: args.namespace.clone(),
            name: args.leader_election_lease.clone(),
            identity: args.leader_election_identity.clone().unwrap_or_default(),
            lease: args.leader_lease_duration,
            renew_deadline: args.leader_renew_deadline,
            retry: args.leader_retry_period,
        };
        probes.set_follower(true);
        let Some(leading) = leader::acquire(client.clone(), config, shutdown.clone()).await? else {
            return finish_server(server).await;
        };
        probes.set_follower(false);
        // The Lease is handed back only once everything has stopped acting
        // (after `run_inner` returns), never while the HA loop may still
        // write; until then it keeps being renewed. Losing it stops
        // everything at once.
        let kept = leading.keep();
        let (shutdown, lost) = (shutdown.clone(), kept.lost());
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                () = lost => {}
            }
        };
        (stop.boxed().shared(), Some(kept))
    } else {
        (shutdown.clone(), None)
    };
    metrics.leader.set(1);
    let ha = match &args.ha_config {
        Some(path) => {
            Some(peer_wiring(&args, &client, path, metrics.peer.clone(), stop.clone()).await?)
        }
        None => None,
    };
    let result = run_inner(client, settings, ha, metrics.clone(), probes, stop).await;
    metrics.leader.set(0);
    if let Some(kept) = leadership {
        kept.release().await?;
    }
    result?;
    finish_server(server).await
}

async fn finish_server(server: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<(), Error> {
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Metrics(e)),
        Err(e) => Err(Error::Metrics(std::io::Error::other(e))),
    }
}

/// Sends HA messages through the mTLS peer client without waiting.
struct PeerOutbox(peer::PeerClient);

impl ha_loop::Outbox for PeerOutbox {
    fn send(&self, envelope: counterweight_core::ha::Envelope) {
        // Dropped when the peer is slow: the protocol tolerates loss.
        let _ = self.0.send_detached(envelope);
    }
}

/// Starts the mTLS peer server and client for the HA group.
async fn peer_wiring(
    args: &Args,
    kube_client: &kube::Client,
    path: &std::path::Path,
    metrics: peer::PeerMetrics,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + 'static,
) -> Result<HaWiring, Error> {
    let (config_file, config) = load_ha_config(path)?;
    let named_witness = config.witness.as_deref() == Some(args.cluster.as_str());
    if args.witness != named_witness {
        let message = if args.witness {
            format!(
                "--witness is set but the config's witness is {:?}, not {:?}; set `witness: {}` or drop --witness",
                config.witness, args.cluster, args.cluster
            )
        } else {
            format!(
                "{:?} is the config's witness; start it with --witness (it holds no workloads)",
                args.cluster
            )
        };
        return Err(ha_config_error(path, message));
    }
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) else {
        return Err(peer::PeerError::BadPeerArg {
            arg: "--tls-cert/--tls-key/--tls-ca".into(),
            message:
                "all three are required with --ha-config: peers are authenticated by mutual TLS"
                    .into(),
        }
        .into());
    };
    let endpoints = peer::parse_peers(&args.peers)?;
    let tls = peer::PeerTls::load(
        peer::TlsPaths {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        },
        metrics.clone(),
    )?;
    let allowed = peer::PeerSet::new(config.member_names().filter(|n| *n != args.cluster))?;
    let listener = tokio::net::TcpListener::bind(args.peer_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.peer_listen,
            source,
        })?;
    tracing::info!(listen = ?listener.local_addr().ok(), peers = ?args.peers, "peer protocol (mTLS)");
    let (tx, inbox) = tokio::sync::mpsc::channel(256);
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
    tokio::spawn(
        tls.clone()
            .watch(std::time::Duration::from_secs(5), shutdown.clone()),
    );
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
    let (commands_tx, commands) = tokio::sync::mpsc::channel(8);
    tokio::spawn(commands::run(
        kube_client.clone(),
        args.namespace.clone(),
        commands_tx,
        shutdown,
    ));
    let (config_tx, config_updates) = tokio::sync::mpsc::channel(1);
    tokio::spawn(watch_ha_config(
        config_file,
        config.clone(),
        config_tx,
        std::time::Duration::from_secs(5),
    ));
    Ok(HaWiring {
        config,
        outbox: std::sync::Arc::new(PeerOutbox(client)),
        inbox,
        commands,
        config_updates: Some(config_updates),
    })
}

/// Runs the controller on a given client and metrics listener, so tests can
/// start it on port 0 against a test cluster.
pub async fn run_with(
    client: kube::Client,
    settings: health::HealthSettings,
    metrics_listener: tokio::net::TcpListener,
    ha: Option<HaWiring>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let metrics = std::sync::Arc::new(telemetry::Metrics::new());
    metrics.leader.set(1);
    let probes = std::sync::Arc::new(telemetry::Probes::default());
    let server = tokio::spawn(telemetry::serve(
        metrics_listener,
        metrics.clone(),
        probes.clone(),
        shutdown.clone(),
    ));
    run_inner(client, settings, ha, metrics, probes, shutdown).await?;
    finish_server(server).await
}

async fn run_inner(
    client: kube::Client,
    settings: health::HealthSettings,
    ha: Option<HaWiring>,
    metrics: std::sync::Arc<telemetry::Metrics>,
    probes: std::sync::Arc<telemetry::Probes>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let witness = ha
        .as_ref()
        .is_some_and(|w| w.config.witness.as_deref() == Some(settings.cluster.as_str()));
    tracing::info!(
        cluster = %settings.cluster,
        namespace = %settings.namespace,
        witness,
        "starting controller"
    );
    match ha {
        // A witness holds no workloads: no pod watch, no health, no gate
        // RBAC, no pod effects. It only votes and keeps its votes in the
        // state ConfigMap so a restart cannot forget a promise.
        Some(wiring) if witness => {
            let (store, events) = state_and_events(&client, &settings);
            let serving = std::sync::Arc::new(serving::ConfigMapServing::new(store.clone()));
            let (ha, inputs) = wiring.into_loop(&settings, store, events, serving, None);
            probes.set_ready(true);
            ha.run(inputs, shutdown).await.map_err(Error::from)
        }
        ha => run_member(client, settings, ha, metrics, probes, shutdown).await,
    }
}

/// A cluster member: health, gate RBAC and, with HA wiring, the HA loop
/// driving the service pods.
async fn run_member(
    client: kube::Client,
    settings: health::HealthSettings,
    ha: Option<HaWiring>,
    metrics: std::sync::Arc<telemetry::Metrics>,
    probes: std::sync::Arc<telemetry::Probes>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let gate_access = tokio::spawn(gate_access::run(
        client.clone(),
        settings.namespace.clone(),
        shutdown.clone(),
    ));
    let health = health::HealthLoop::new(client.clone(), settings.clone(), metrics, probes.clone());
    let ha_task = ha.map(|wiring| {
        let (store, events) = state_and_events(&client, &settings);
        // The workload's dead-man switch: the serving lease, published
        // beside the HA loop and part of every fence.
        let lease = serving_lease::LeasePublisher::start(
            client.clone(),
            &settings.namespace,
            &settings.cluster,
            serving_lease::LeaseTimings {
                lease_ms: wiring.config.lease_ms,
                max_skew_ms: wiring.config.max_clock_skew_ms,
                write_timeout: ha_loop::beside_timeout(&wiring.config),
            },
        );
        // Pod-level effects: the serving condition, the demotion fence and
        // the restarts; the `serving` key of the state ConfigMap is kept too.
        let serving = std::sync::Arc::new(serving::PodServing::start(
            client.clone(),
            store.clone(),
            Some(events.clone()),
            serving::PodServingConfig {
                // Every start fences (nothing serves before a lease), so a
                // restarted active controller would otherwise restart all
                // of its serving pods; a lease regained within this window
                // cancels those restarts.
                restart_delay: std::time::Duration::from_millis(
                    wiring.config.lease_ms + wiring.config.margin_ms,
                ),
                ..Default::default()
            },
        ));
        let serving =
            std::sync::Arc::new(serving_lease::LeasedServing::new(serving, lease.clone()));
        let serving = std::sync::Arc::new(serving::StanceNoting::new(serving, health.stance()));
        let (ha, inputs) =
            wiring.into_loop(&settings, store, events, serving, Some(health.subscribe()));
        tokio::spawn(ha.with_serving_lease(lease).run(inputs, shutdown.clone()))
    });
    let Some(mut ha_task) = ha_task else {
        let result = health.run(shutdown).await;
        let _ = gate_access.await;
        return result.map_err(Error::from);
    };
    // Fail-stop: the HA loop returns only at shutdown. If it ends any other
    // way (an error, a panic), the process must not go on without it, its
    // pods fenced only by their lease: it reports not ready and exits, so
    // that Kubernetes restarts it or another replica takes over.
    let health = health.run(shutdown);
    let mut health = std::pin::pin!(health);
    tokio::select! {
        result = &mut health => {
            let _ = gate_access.await;
            match ha_task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(Error::HaStopped(e.to_string())),
            }
            result.map_err(Error::from)
        }
        ended = &mut ha_task => {
            let why = match ended {
                Ok(Ok(())) => "it returned before shutdown".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("it panicked: {e}"),
            };
            probes.set_failed(format!("the HA loop stopped: {why}"));
            tracing::error!(reason = %why, "the HA loop stopped; exiting so that this controller is restarted");
            gate_access.abort();
            Err(Error::HaStopped(why))
        }
    }
}
