//! The file replication supervisor: inotify events in, debounced `rsync`
//! runs out, watermark file updated after each.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use counterweight_core::state::{Role, RoleEpoch};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::{Debouncer, Watermark};
use crate::SyncError;
use crate::role::write_atomic;

/// What to replicate, where, and how.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The local directory (the PV mount).
    pub dir: PathBuf,
    /// `rsync` destinations pushed to while active: local paths or
    /// `rsync://[user@]host:port/module/` URLs of the peers' daemons.
    pub destinations: Vec<String>,
    /// Where the [`Watermark`] is written (JSON); keep it outside `dir`.
    pub watermark_file: PathBuf,
    /// Quiet period that ends a batch.
    pub quiet: Duration,
    /// Longest a change waits for its batch.
    pub max_delay: Duration,
    /// Wait before retrying a failed sync.
    pub retry: Duration,
    /// The `rsync` program.
    pub rsync: PathBuf,
    /// Extra `rsync` arguments (e.g. `--password-file=...`, `--bwlimit`).
    pub rsync_args: Vec<String>,
}

impl FilesConfig {
    /// Defaults for `dir` → `destinations`: 200 ms quiet, 2 s maximum
    /// delay, 2 s retry, `rsync` from `PATH`.
    pub fn new(dir: PathBuf, destinations: Vec<String>, watermark_file: PathBuf) -> Self {
        Self {
            dir,
            destinations,
            watermark_file,
            quiet: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            retry: Duration::from_secs(2),
            rsync: PathBuf::from("rsync"),
            rsync_args: Vec::new(),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs `rsync` for one destination; the source ends in `/` so the
/// directory's contents, not the directory, are copied.
async fn rsync_once(cfg: &FilesConfig, dest: &str) -> Result<(), SyncError> {
    let mut source = cfg.dir.display().to_string();
    if !source.ends_with('/') {
        source.push('/');
    }
    let mut cmd = tokio::process::Command::new(&cfg.rsync);
    // -a: permissions, times, links; --delete: deletions replicate too;
    // --delay-updates: files switch in together at the end of the run, so
    // a reader at the standby sees a batch, not half of it.
    cmd.args(["-a", "--delete", "--delay-updates", "--timeout=60"])
        .args(&cfg.rsync_args)
        .arg(&source)
        .arg(dest)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| SyncError::Tool {
        tool: "rsync".into(),
        status: format!("could not start {}: {e}", cfg.rsync.display()),
        stderr: String::new(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SyncError::Tool {
            tool: format!("rsync to {dest}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Watches, batches and pushes while the local role is active.
#[derive(Debug)]
pub struct FilesSupervisor {
    cfg: FilesConfig,
    debouncer: Debouncer,
    watermark: Watermark,
    role: Option<RoleEpoch>,
}

impl FilesSupervisor {
    /// A supervisor that has not seen a role yet (it pushes nothing until
    /// it does).
    pub fn new(cfg: FilesConfig) -> Self {
        Self {
            debouncer: Debouncer::new(cfg.quiet, cfg.max_delay),
            cfg,
            watermark: Watermark::default(),
            role: None,
        }
    }

    fn active(&self) -> bool {
        self.role.is_some_and(|r| r.role == Role::Active)
    }

    fn write_watermark(&self) {
        match serde_json::to_vec_pretty(&self.watermark) {
            Ok(json) => {
                if let Err(e) = write_atomic(&self.cfg.watermark_file, &json) {
                    tracing::warn!(error = %e, "writing the watermark");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding the watermark"),
        }
    }

    fn on_change(&mut self) {
        let seq = self.debouncer.record(Instant::now());
        self.watermark.seen_seq = seq;
        if self.active() && self.watermark.oldest_unsynced_unix_ms.is_none() {
            self.watermark.oldest_unsynced_unix_ms = Some(unix_ms());
        }
    }

    fn on_role(&mut self, new: Option<RoleEpoch>) {
        let was = self.role;
        self.role = new;
        self.watermark.role = new.map(|r| r.role);
        self.watermark.epoch = new.map_or(0, |r| r.epoch);
        match new {
            Some(r) if r.role == Role::Active => {
                if was != new {
                    // A new active pushes everything it has once, whatever
                    // the watcher saw.
                    tracing::info!(
                        epoch = r.epoch,
                        "files: active, pushing the whole directory"
                    );
                    self.on_change();
                }
            }
            _ => {
                self.debouncer.clear();
                self.watermark.oldest_unsynced_unix_ms = None;
            }
        }
        self.write_watermark();
    }

    async fn sync(&mut self) {
        let Some(seq) = self.debouncer.take(Instant::now()) else {
            return;
        };
        let started = unix_ms();
        let mut error = None;
        for dest in &self.cfg.destinations {
            if let Err(e) = rsync_once(&self.cfg, dest).await {
                error = Some(e.to_string());
                break;
            }
        }
        match error {
            None => {
                self.watermark.synced_seq = seq;
                self.watermark.synced_at_unix_ms = Some(unix_ms());
                self.watermark.last_error = None;
                // Changes seen during the run are newer than its start.
                self.watermark.oldest_unsynced_unix_ms =
                    self.debouncer.pending().then_some(started);
                tracing::debug!(seq, "files synced");
            }
            Some(e) => {
                tracing::warn!(error = %e, "file sync failed; retrying");
                self.watermark.last_error = Some(e);
                self.debouncer.retry(Instant::now() + self.cfg.retry);
            }
        }
        self.write_watermark();
    }

    /// Runs until `shutdown` turns true (or its sender is dropped). The role
    /// comes from `role` (`None`: unknown, push nothing).
    pub async fn run(
        mut self,
        mut role: watch::Receiver<Option<RoleEpoch>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SyncError> {
        let (tx, mut events) = mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads (rsync reading the source) are not changes; an
            // error (e.g. queue overflow) might hide one, so counts.
            let change = match res {
                Ok(ev) => !matches!(ev.kind, EventKind::Access(_)),
                Err(_) => true,
            };
            if change {
                let _ = tx.send(());
            }
        })
        .map_err(|source| SyncError::Watch {
            path: self.cfg.dir.clone(),
            source,
        })?;
        watcher
            .watch(&self.cfg.dir, RecursiveMode::Recursive)
            .map_err(|source| SyncError::Watch {
                path: self.cfg.dir.clone(),
                source,
            })?;
        let initial = *role.borrow_and_update();
        self.on_role(initial);
        loop {
            let due = self
                .debouncer
                .due_at()
                .filter(|_| self.active())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(()) => self.on_change(),
                    None => break,
                },
                changed = role.changed() => match changed {
                    Ok(()) => {
                        let r = *role.borrow_and_update();
                        self.on_role(r);
                    }
                    Err(_) => break,
                },
                _ = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.sync().await,
                res = shutdown.changed() => {
                    if res.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        drop(watcher);
        Ok(())
    }

    /// The current watermark.
    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }
}

/// Reads a watermark file written by a supervisor.
pub fn read_watermark(path: &std::path::Path) -> Result<Watermark, SyncError> {
    let bytes = std::fs::read(path).map_err(|e| SyncError::io("reading the watermark", path, e))?;
    serde_json::from_slice(&bytes).map_err(|_| SyncError::Parse {
        what: "a watermark (JSON)",
        value: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
