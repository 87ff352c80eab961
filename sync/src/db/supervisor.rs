//! The database supervisor: observe the local server and the peers, ask
//! [`decide`] for the next step, perform it. One step per call, so the
//! caller's loop (or a test) controls pacing and every step is logged.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use counterweight_core::state::RoleEpoch;

use super::conninfo::{ConnParams, target_of};
use super::decide::{Action, Observation, Upstream, decide};
use super::lag::{Lag, ReplicaLag};
use super::pg::{self, ManagedSetting};
use super::tools::Tools;
use crate::SyncError;

/// The file in the data directory that marks a fenced former primary's
/// data while it runs read-only ([`Observation::former_primary`]). Written
/// before `standby.signal`, removed only by a rewind from a peer primary or
/// by this server's own promotion. A copy that `pg_basebackup` carries to a
/// new standby costs that standby one no-op rewind, nothing else.
pub const FORMER_PRIMARY_MARKER: &str = "counterweight.former-primary";

/// Starts and stops the local server. The binary uses [`PgCtl`]; tests use
/// their harness.
pub trait ServerControl {
    /// Whether the server process runs.
    fn running(&mut self) -> impl Future<Output = bool> + Send;
    /// Starts it and waits until it accepts connections.
    fn start(&mut self) -> impl Future<Output = Result<(), SyncError>> + Send;
    /// Clean fast shutdown, waiting for the process to exit.
    fn stop(&mut self) -> impl Future<Output = Result<(), SyncError>> + Send;
}

/// [`ServerControl`] through `pg_ctl`, for a sidecar that owns the server
/// process (the database pod's entrypoint).
#[derive(Debug, Clone)]
pub struct PgCtl {
    /// The tools.
    pub tools: Tools,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Server log file.
    pub log: PathBuf,
    /// Extra `postgres` options (`-o`), e.g. `-c listen_addresses=*`.
    pub options: String,
}

impl ServerControl for PgCtl {
    async fn running(&mut self) -> bool {
        self.tools.pg_ctl_running(&self.data_dir).await
    }
    async fn start(&mut self) -> Result<(), SyncError> {
        self.tools
            .pg_ctl_start(&self.data_dir, &self.log, &self.options)
            .await
    }
    async fn stop(&mut self) -> Result<(), SyncError> {
        self.tools.pg_ctl_stop(&self.data_dir).await
    }
}

/// A peer cluster's database.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Cluster name (matches the HA configuration's member name).
    pub name: String,
    /// How to reach it, for both SQL probes and replication. The
    /// application name is replaced by [`DbConfig::application_name`].
    pub params: ConnParams,
}

/// Everything the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// SQL connection to the local server.
    pub local: ConnParams,
    /// Local data directory.
    pub data_dir: PathBuf,
    /// The other clusters' databases.
    pub peers: Vec<Peer>,
    /// This cluster's name as a standby (`application_name` in
    /// `primary_conninfo`; what `synchronous_standby_names` refers to).
    pub application_name: String,
    /// `synchronous_standby_names` to keep on the local primary; empty for
    /// asynchronous replication. E.g. `ANY 1 (west, north)` for zero loss
    /// on planned switchover as long as one standby acknowledges.
    pub synchronous_standby_names: String,
    /// The PostgreSQL tools.
    pub tools: Tools,
    /// Bound on every connection attempt.
    pub connect_timeout: Duration,
    /// How long `pg_promote` waits for the promotion to finish.
    pub promote_wait_seconds: i32,
}

impl DbConfig {
    fn peer(&self, name: &str) -> Option<ConnParams> {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.params.with_application_name(Some(&self.application_name)))
    }
}

/// Observes, decides and acts on the local server.
#[derive(Debug)]
pub struct DbSupervisor<S> {
    cfg: DbConfig,
    server: S,
    applied_epoch: u64,
}

impl<S: ServerControl> DbSupervisor<S> {
    /// A supervisor that has acted on epochs up to `applied_epoch` (0 when
    /// unknown; the binary persists it next to the data).
    pub fn new(cfg: DbConfig, server: S, applied_epoch: u64) -> Self {
        Self {
            cfg,
            server,
            applied_epoch,
        }
    }

    /// The server control, e.g. for a test to crash it.
    pub fn server_mut(&mut self) -> &mut S {
        &mut self.server
    }

    /// The configuration.
    pub fn config(&self) -> &DbConfig {
        &self.cfg
    }

    /// The highest epoch acted on.
    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch
    }

    async fn local_client(&self) -> Result<tokio_postgres::Client, SyncError> {
        pg::connect(&self.cfg.local, self.cfg.connect_timeout).await
    }

    /// Observes the local server and every peer.
    pub async fn observe(&mut self) -> (Observation, Vec<Upstream>) {
        let data = &self.cfg.data_dir;
        let mut obs = Observation {
            running: self.server.running().await,
            has_data: data.join("PG_VERSION").exists(),
            former_primary: data.join(FORMER_PRIMARY_MARKER).exists(),
            ..Observation::default()
        };
        if obs.running {
            match self.observe_running().await {
                Ok((in_recovery, upstream, sync)) => {
                    obs.accepting = true;
                    obs.in_recovery = in_recovery;
                    obs.upstream = upstream;
                    obs.synchronous_standby_names = sync;
                }
                Err(e) => tracing::debug!(error = %e, "local server not answering"),
            }
        } else {
            obs.in_recovery = data.join("standby.signal").exists();
        }
        let mut peers = Vec::with_capacity(self.cfg.peers.len());
        for p in &self.cfg.peers {
            peers.push(Upstream {
                name: p.name.clone(),
                host: p.params.host.clone(),
                port: p.params.port,
                state: pg::peer_state(&p.params, self.cfg.connect_timeout).await,
            });
        }
        (obs, peers)
    }

    async fn observe_running(
        &self,
    ) -> Result<(bool, Option<(String, u16)>, Option<String>), SyncError> {
        let client = self.local_client().await?;
        let in_recovery = pg::in_recovery(&client).await?;
        if in_recovery {
            let conninfo = pg::setting(&client, ManagedSetting::PrimaryConninfo.name()).await?;
            Ok((true, target_of(&conninfo), None))
        } else {
            let names =
                pg::setting(&client, ManagedSetting::SynchronousStandbyNames.name()).await?;
            Ok((false, None, Some(names)))
        }
    }

    /// One observe-decide-act step towards `state`. Returns the action
    /// taken ([`Action::Nothing`] when converged, [`Action::Wait`] when it
    /// must not act yet).
    pub async fn step(&mut self, state: RoleEpoch) -> Result<Action, SyncError> {
        let (obs, peers) = self.observe().await;
        let action = decide(
            state,
            self.applied_epoch,
            &obs,
            &peers,
            &self.cfg.synchronous_standby_names,
        );
        tracing::info!(?state, ?obs, ?peers, ?action, "database step");
        self.act(&action).await?;
        if !matches!(action, Action::Wait { .. }) {
            self.applied_epoch = self.applied_epoch.max(state.epoch);
        }
        Ok(action)
    }

    /// Steps until converged ([`Action::Nothing`]) or told to wait, at most
    /// `max_steps` times. Returns every action taken.
    pub async fn converge(
        &mut self,
        state: RoleEpoch,
        max_steps: usize,
    ) -> Result<Vec<Action>, SyncError> {
        let mut taken = Vec::new();
        for _ in 0..max_steps {
            let action = self.step(state).await?;
            let done = matches!(action, Action::Nothing | Action::Wait { .. });
            taken.push(action);
            if done {
                break;
            }
        }
        Ok(taken)
    }

    fn peer_or_err(&self, name: &str) -> Result<ConnParams, SyncError> {
        self.cfg.peer(name).ok_or_else(|| SyncError::Parse {
            what: "a configured peer",
            value: name.to_owned(),
        })
    }

    async fn act(&mut self, action: &Action) -> Result<(), SyncError> {
        match action {
            Action::Nothing | Action::Wait { .. } => Ok(()),
            Action::Start => self.server.start().await,
            Action::StartReadOnly => {
                start_read_only_config(&self.cfg.data_dir, self.cfg.tools.run_as.as_deref())?;
                self.server.start().await
            }
            Action::Fence | Action::StopToRewind { .. } => self.server.stop().await,
            Action::BaseBackup { from } => {
                let from = self.peer_or_err(from)?;
                self.cfg.tools.base_backup(&from, &self.cfg.data_dir).await
            }
            Action::Rewind { from } => {
                let from = self.peer_or_err(from)?;
                // A freshly promoted primary records its new timeline in
                // pg_control only at its next checkpoint; until then
                // pg_rewind sees both sides on the old timeline and
                // rewinds nothing (Patroni checkpoints first too).
                let source = pg::connect(&from, self.cfg.connect_timeout).await?;
                source
                    .batch_execute("CHECKPOINT")
                    .await
                    .map_err(|e| SyncError::pg("CHECKPOINT on the rewind source", e))?;
                self.cfg.tools.rewind(&from, &self.cfg.data_dir).await?;
                // pg_rewind -R writes standby.signal and primary_conninfo;
                // make sure of both even where it found nothing to rewind.
                ensure_standby_config(&self.cfg.data_dir, &from, self.cfg.tools.run_as.as_deref())?;
                forget_former_primary(&self.cfg.data_dir)
            }
            Action::Follow { from } => {
                let from = self.peer_or_err(from)?;
                let client = self.local_client().await?;
                pg::alter_system(
                    &client,
                    ManagedSetting::PrimaryConninfo,
                    &from.conninfo_with_password(),
                )
                .await
            }
            Action::Promote { epoch } => {
                let client = self.local_client().await?;
                let done = pg::promote(&client, self.cfg.promote_wait_seconds).await?;
                tracing::info!(epoch, done, "pg_promote");
                if done {
                    forget_former_primary(&self.cfg.data_dir)
                } else {
                    Err(SyncError::Timeout {
                        what: format!("promotion for epoch {epoch}"),
                    })
                }
            }
            Action::SetSynchronousStandbyNames { value } => {
                let client = self.local_client().await?;
                pg::alter_system(&client, ManagedSetting::SynchronousStandbyNames, value).await
            }
        }
    }

    /// Lag of the local server as a standby.
    pub async fn lag(&self) -> Result<Lag, SyncError> {
        let client = self.local_client().await?;
        pg::standby_lag(&client).await
    }

    /// Standbys of the local primary.
    pub async fn replicas(&self) -> Result<Vec<ReplicaLag>, SyncError> {
        let client = self.local_client().await?;
        pg::replicas(&client).await
    }
}

/// Makes the fenced former primary in `data_dir` start read-only: the
/// [`FORMER_PRIMARY_MARKER`] first (so that a crash half-way still knows
/// what the directory holds), then `standby.signal` and an empty
/// `primary_conninfo` (the last value in `postgresql.auto.conf` wins; a
/// conninfo left from an earlier life as a standby must not be followed
/// without a rewind). Files are handed to `owner` when running as root.
fn start_read_only_config(data_dir: &Path, owner: Option<&str>) -> Result<(), SyncError> {
    let marker = data_dir.join(FORMER_PRIMARY_MARKER);
    std::fs::write(
        &marker,
        b"fenced former primary; rewound before it follows a peer\n",
    )
    .map_err(|e| SyncError::io("writing", &marker, e))?;
    write_standby_config(data_dir, "", owner)?;
    give_to(owner, data_dir, &[FORMER_PRIMARY_MARKER])
}

/// Removes the [`FORMER_PRIMARY_MARKER`], once its data is a primary's
/// again or was rewound from one.
fn forget_former_primary(data_dir: &Path) -> Result<(), SyncError> {
    let marker = data_dir.join(FORMER_PRIMARY_MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SyncError::io("removing", &marker, e)),
    }
}

/// Makes `data_dir` start as a standby of `from`: `standby.signal` present
/// and `primary_conninfo` (with `from`'s password and application name)
/// appended to `postgresql.auto.conf`, where the last value of a setting
/// wins. Files are handed to `owner` when running as root.
pub fn ensure_standby_config(
    data_dir: &Path,
    from: &ConnParams,
    owner: Option<&str>,
) -> Result<(), SyncError> {
    write_standby_config(data_dir, &from.conninfo_with_password(), owner)
}

/// `standby.signal` present and `primary_conninfo = conninfo` appended to
/// `postgresql.auto.conf`, both handed to `owner`.
fn write_standby_config(
    data_dir: &Path,
    conninfo: &str,
    owner: Option<&str>,
) -> Result<(), SyncError> {
    use std::io::Write;
    let signal = data_dir.join("standby.signal");
    if !signal.exists() {
        std::fs::write(&signal, b"").map_err(|e| SyncError::io("writing", &signal, e))?;
    }
    let auto = data_dir.join("postgresql.auto.conf");
    let line = format!("primary_conninfo = {}\n", pg::literal(conninfo));
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| SyncError::io("appending primary_conninfo", &auto, e))?;
    give_to(owner, data_dir, &["standby.signal", "postgresql.auto.conf"])
}

/// Hands the files in `data_dir` to `owner` (`chown`), when running as
/// root for it.
fn give_to(owner: Option<&str>, data_dir: &Path, files: &[&str]) -> Result<(), SyncError> {
    let Some(user) = owner else {
        return Ok(());
    };
    let status = std::process::Command::new("chown")
        .arg(format!("{user}:"))
        .args(files.iter().map(|f| data_dir.join(f)))
        .status()
        .map_err(|e| SyncError::io("chown", data_dir, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(SyncError::Tool {
            tool: "chown".into(),
            status: status.to_string(),
            stderr: String::new(),
        })
    }
}
