//! `counterweight-sync`: the synchronization pods' process.
//!
//! - `db`: supervises the local PostgreSQL server (through `pg_ctl`) so that
//!   it is the primary while the cluster is active and a streaming standby
//!   of the active's primary otherwise.
//! - `files`: replicates a directory to the peers with `rsync` while active.
//! - `lag`, `ready`: one-shot reads for probes, operators and the prepare
//!   step.
//!
//! Role and epoch are read from the state ConfigMap, through the API
//! (`--state-configmap namespace/name`, the way for pods in the workload's
//! namespace) or mounted as a volume (`--state-dir`). Credentials come from files (a mounted Secret) or the
//! environment, never from flags shown by `ps`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use counterweight_sync::db::{
    self, ConnParams, DbConfig, DbSupervisor, Lsn, Peer, Tools, supervisor::PgCtl,
};
use counterweight_sync::files::{self, FilesConfig, FilesSupervisor, http::Endpoint};
use counterweight_sync::role::StateSource;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(name = "counterweight-sync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Keep the local PostgreSQL server primary or standby as the state says.
    Db(DbArgs),
    /// Replicate a directory to the peers while active.
    Files(FilesArgs),
    /// Print the local server's replication lag as JSON.
    Lag(LocalArgs),
    /// Exit 0 if the local standby may take over, 3 with the reason if not.
    Ready(ReadyArgs),
}

#[derive(Args, Debug)]
struct LocalArgs {
    /// Local server host.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_HOST", default_value = "127.0.0.1")]
    pg_host: String,
    /// Local server port.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    /// Role for the sidecar's queries and for replication (needs
    /// REPLICATION, and pg_rewind's function grants or superuser).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_USER", default_value = "postgres")]
    pg_user: String,
    /// File holding the password (a mounted Secret key).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_PASSWORD_FILE")]
    pg_password_file: Option<PathBuf>,
    /// sslmode for connections to peers (e.g. verify-full): libpq's for
    /// replication and tools, the same rules for the sidecar's own SQL
    /// probes (rustls). Not used for the local server on loopback.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_SSLMODE")]
    sslmode: Option<String>,
    /// CA bundle for verify-ca / verify-full.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_SSLROOTCERT")]
    sslrootcert: Option<String>,
    /// Bound on every connection attempt.
    #[arg(
        long,
        env = "COUNTERWEIGHT_SYNC_CONNECT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    connect_timeout_ms: u64,
}

impl LocalArgs {
    fn password(&self) -> Result<Option<String>> {
        if let Ok(pw) = std::env::var("COUNTERWEIGHT_SYNC_PG_PASSWORD") {
            return Ok(Some(pw));
        }
        self.pg_password_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                    .with_context(|| format!("reading the password file {}", p.display()))
            })
            .transpose()
    }

    fn params(&self, host: &str, port: u16) -> Result<ConnParams> {
        let mut p = ConnParams::new(host, port, &self.pg_user);
        p.password = self.password()?;
        p.sslmode = self.sslmode.clone();
        p.sslrootcert = self.sslrootcert.clone();
        Ok(p)
    }

    /// The local server, without the peers' TLS settings: it is reached on
    /// loopback in the same pod, where a verify-full check of the peers'
    /// host name could not pass (pg_hba lets 127.0.0.1 in without TLS).
    fn local(&self) -> Result<ConnParams> {
        let mut p = self.params(&self.pg_host, self.pg_port)?;
        p.sslmode = None;
        p.sslrootcert = None;
        Ok(p)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// Where role and epoch come from: exactly one of the two.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct StateArgs {
    /// Directory with the state ConfigMap's keys as files (`state`,
    /// `epoch`): a ConfigMap volume, only possible in the controller's
    /// namespace.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The state ConfigMap as `namespace/name`, read through the API (in
    /// cluster, or with KUBECONFIG): works from the workload's namespace.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_STATE_CONFIGMAP")]
    state_configmap: Option<String>,
}

impl StateArgs {
    async fn source(&self) -> Result<StateSource> {
        if let Some(dir) = &self.state_dir {
            return Ok(StateSource::Dir(dir.clone()));
        }
        let text = self.state_configmap.as_deref().unwrap_or_default();
        let (namespace, name) = text
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
            .with_context(|| {
                format!("--state-configmap {text:?}: expected namespace/name, e.g. counterweight-system/counterweight-state")
            })?;
        let client = kube::Client::try_default().await.context(
            "no Kubernetes client for --state-configmap: run in a pod or set KUBECONFIG",
        )?;
        Ok(StateSource::ConfigMap {
            api: Box::new(kube::Api::namespaced(client, namespace)),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[derive(Args, Debug)]
struct DbArgs {
    #[command(flatten)]
    local: LocalArgs,
    #[command(flatten)]
    state: StateArgs,
    /// PostgreSQL data directory.
    #[arg(long, env = "PGDATA")]
    data_dir: PathBuf,
    /// Server log file for pg_ctl.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_LOG", default_value = "/dev/stderr")]
    pg_log: PathBuf,
    /// Extra postgres options passed by pg_ctl (-o).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_PG_OPTIONS", default_value = "")]
    pg_options: String,
    /// Directory of pg_ctl, pg_rewind, pg_basebackup.
    #[arg(
        long,
        env = "COUNTERWEIGHT_SYNC_PG_BIN",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pg_bin: PathBuf,
    /// This cluster's name (its application_name as a standby).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_NAME")]
    name: String,
    /// Peer databases, `name=host:port`, repeatable or comma-separated.
    #[arg(long = "peer", env = "COUNTERWEIGHT_SYNC_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// synchronous_standby_names to keep while primary (empty: async).
    #[arg(
        long,
        env = "COUNTERWEIGHT_SYNC_SYNCHRONOUS_STANDBY_NAMES",
        default_value = ""
    )]
    synchronous_standby_names: String,
    /// Time between steps.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_INTERVAL_MS", default_value_t = 1000)]
    interval_ms: u64,
}

#[derive(Args, Debug)]
struct FilesArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Directory to replicate.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_DIR")]
    dir: PathBuf,
    /// rsync destinations (paths or rsync:// URLs), repeatable or comma-separated.
    #[arg(long = "dest", env = "COUNTERWEIGHT_SYNC_DESTS", value_delimiter = ',')]
    destinations: Vec<String>,
    /// Watermark file (JSON).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_WATERMARK")]
    watermark: PathBuf,
    /// Quiet period ending a batch.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_QUIET_MS", default_value_t = 200)]
    quiet_ms: u64,
    /// Longest a change waits.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_MAX_DELAY_MS", default_value_t = 2000)]
    max_delay_ms: u64,
    /// Extra rsync arguments (e.g. --password-file=/secret/rsync), comma-separated.
    #[arg(
        long = "rsync-arg",
        env = "COUNTERWEIGHT_SYNC_RSYNC_ARGS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    rsync_args: Vec<String>,
    /// How often the state directory is re-read.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_INTERVAL_MS", default_value_t = 1000)]
    interval_ms: u64,
    /// Serve `GET /watermark` and `GET /ready[?maxAgeMs=N]` on this
    /// address (e.g. 0.0.0.0:8081) for the policy's http check.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// `/ready`'s limit when the request gives no maxAgeMs.
    #[arg(
        long,
        env = "COUNTERWEIGHT_SYNC_MAX_WATERMARK_AGE_MS",
        default_value_t = 10_000
    )]
    max_watermark_age_ms: u64,
    /// Longest time between two markers pushed to the standbys while
    /// active (keep well under the max watermark age).
    #[arg(long, env = "COUNTERWEIGHT_SYNC_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,
}

#[derive(Args, Debug)]
struct ReadyArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// The policy's maxLagBytes.
    #[arg(long, env = "COUNTERWEIGHT_SYNC_MAX_LAG_BYTES")]
    max_lag_bytes: u64,
    /// The primary's current WAL position, if the prepare carried it.
    #[arg(long)]
    primary_lsn: Option<String>,
}

fn parse_peer(text: &str, local: &LocalArgs) -> Result<Peer> {
    let (name, addr) = text
        .split_once('=')
        .with_context(|| format!("peer {text:?}: expected name=host:port"))?;
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("peer {text:?}: expected name=host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("peer {text:?}: bad port"))?;
    Ok(Peer {
        name: name.to_owned(),
        params: local.params(host, port)?,
    })
}

async fn run_db(args: DbArgs) -> Result<()> {
    let tools = Tools::new(&args.pg_bin);
    let peers = args
        .peers
        .iter()
        .map(|p| parse_peer(p, &args.local))
        .collect::<Result<Vec<_>>>()?;
    let cfg = DbConfig {
        local: args.local.local()?,
        data_dir: args.data_dir.clone(),
        peers,
        application_name: args.name.clone(),
        synchronous_standby_names: args.synchronous_standby_names.clone(),
        tools: tools.clone(),
        connect_timeout: args.local.timeout(),
        promote_wait_seconds: 60,
    };
    let server = PgCtl {
        tools,
        data_dir: args.data_dir.clone(),
        log: args.pg_log.clone(),
        options: args.pg_options.clone(),
    };
    let source = args.state.source().await?;
    let mut sup = DbSupervisor::new(cfg, server, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    let mut stop = stop_on_signal()?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let state = match source.read().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "state unreadable; treating as standby-without-action");
                continue;
            }
        };
        if let Err(e) = sup.step(state).await {
            tracing::warn!(error = %e, "database step failed; retrying next interval");
        }
    }
}

async fn run_files(args: FilesArgs) -> Result<()> {
    let mut cfg = FilesConfig::new(args.dir, args.destinations, args.watermark);
    cfg.quiet = Duration::from_millis(args.quiet_ms);
    cfg.max_delay = Duration::from_millis(args.max_delay_ms);
    cfg.rsync_args = args.rsync_args;
    cfg.heartbeat = Duration::from_millis(args.heartbeat_ms);
    let dir = cfg.dir.clone();
    let supervisor = FilesSupervisor::new(cfg);
    let source = args.state.source().await?;
    let (role_tx, role_rx) = watch::channel(source.read().await.ok());
    let stop_rx = stop_on_signal()?;
    let every = Duration::from_millis(args.interval_ms);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let r = match source.read().await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "state unreadable; replication paused");
                    None
                }
            };
            role_tx.send_if_modified(|cur| {
                let changed = *cur != r;
                *cur = r;
                changed
            });
        }
    });
    if let Some(addr) = args.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--listen {addr}"))?;
        tracing::info!(%addr, "files: serving /watermark and /ready");
        let endpoint = Endpoint {
            watermark: supervisor.subscribe(),
            dir,
            default_max_age_ms: args.max_watermark_age_ms,
        };
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = files::http::serve(listener, endpoint, stop).await {
                tracing::error!(error = %e, "files endpoint stopped");
            }
        });
    }
    supervisor.run(role_rx, stop_rx).await?;
    Ok(())
}

/// Turns true on SIGTERM, which is how Kubernetes stops a container, or on
/// SIGINT (Ctrl-C). Only SIGINT was handled before: as a container's PID 1
/// the process ignored SIGTERM and was killed at the end of the grace
/// period. Installed once, up front, so a signal that arrives while the
/// caller is busy is not lost.
fn stop_on_signal() -> Result<watch::Receiver<bool>> {
    let stop = counterweight_runtime::shutdown::on_signal()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run_lag(args: LocalArgs) -> Result<()> {
    let client = db::pg::connect(&args.local()?, args.timeout()).await?;
    let lag = db::pg::standby_lag(&client).await?;
    let replicas = if lag.in_recovery {
        Vec::new()
    } else {
        db::pg::replicas(&client).await?
    };
    let out = serde_json::json!({ "local": lag, "replicas": replicas });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn run_ready(args: ReadyArgs) -> Result<i32> {
    let primary: Option<Lsn> = args.primary_lsn.as_deref().map(str::parse).transpose()?;
    let client = db::pg::connect(&args.local.local()?, args.local.timeout()).await?;
    let lag = db::pg::standby_lag(&client).await?;
    match lag.ready_to_promote(primary, args.max_lag_bytes) {
        Ok(()) => {
            println!("ready");
            Ok(0)
        }
        Err(reason) => {
            println!("refuse: {reason}");
            Ok(3)
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    counterweight_runtime::logging::init("info", counterweight_runtime::logging::Output::Stderr);
    let cli = Cli::parse();
    match cli.command {
        Command::Db(a) => run_db(a).await,
        Command::Files(a) => run_files(a).await,
        Command::Lag(a) => run_lag(a).await,
        Command::Ready(a) => {
            let code = run_ready(a).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}
