//! The file replication supervisor: inotify events in, debounced `rsync`
//! runs out, watermark file updated after each; while active, a [`Marker`]
//! pushed into every destination after each sync and every heartbeat, so
//! that the standby knows how current its copy is.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use counterweight_core::clock::unix_ms;
use counterweight_core::state::{Role, RoleEpoch};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::{Debouncer, MARKER_NAME, Marker, Watermark};
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
    /// Longest time between two [`Marker`] pushes while active: without
    /// changes the standby still learns that its copy is current.
    pub heartbeat: Duration,
    /// Bound on one marker push (a small file; a hung connection must not
    /// stall the loop).
    pub marker_timeout: Duration,
}

impl FilesConfig {
    /// Defaults for `dir` → `destinations`: 200 ms quiet, 2 s maximum
    /// delay, 2 s retry, 2 s heartbeat, `rsync` from `PATH`.
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
            heartbeat: Duration::from_secs(2),
            marker_timeout: Duration::from_secs(10),
        }
    }
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
    // a reader at the standby sees a batch, not half of it. The marker is
    // excluded on both ends: the destination's survives --delete, and a
    // new active never pushes the stale one it received as a standby.
    cmd.args(["-a", "--delete", "--delay-updates", "--timeout=60"])
        .arg(format!("--exclude=/{MARKER_NAME}"))
        .args(&cfg.rsync_args)
        .arg(&source)
        .arg(dest);
    run_rsync(cfg, cmd, &format!("rsync to {dest}"), None).await
}

/// Copies the marker file `staged` to `dest`'s root as [`MARKER_NAME`].
/// `--ignore-times`: two markers written within a second may have the same
/// size and mtime, and rsync's quick check would skip the newer one.
async fn push_marker(cfg: &FilesConfig, staged: &Path, dest: &str) -> Result<(), SyncError> {
    let target = format!("{}/{MARKER_NAME}", dest.trim_end_matches('/'));
    let mut cmd = tokio::process::Command::new(&cfg.rsync);
    cmd.args(["--ignore-times", "--timeout=10"])
        .args(&cfg.rsync_args)
        .arg(staged)
        .arg(&target);
    let what = format!("rsync of the marker to {dest}");
    run_rsync(cfg, cmd, &what, Some(cfg.marker_timeout)).await
}

/// Runs a prepared rsync command, within `limit` if one is given; a failure
/// is an error naming `what`, with rsync's exit status and stderr.
async fn run_rsync(
    cfg: &FilesConfig,
    mut cmd: tokio::process::Command,
    what: &str,
    limit: Option<Duration>,
) -> Result<(), SyncError> {
    let failed = |status: String, stderr: String| SyncError::Tool {
        tool: what.to_owned(),
        status,
        stderr,
    };
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = cmd.output();
    let out = match limit {
        Some(limit) => tokio::time::timeout(limit, output)
            .await
            .map_err(|_| failed(format!("no answer within {limit:?}"), String::new()))?,
        None => output.await,
    }
    .map_err(|e| SyncError::Tool {
        tool: "rsync".into(),
        status: format!("could not start {}: {e}", cfg.rsync.display()),
        stderr: String::new(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            out.status.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Whether an inotify event concerns only the marker (or rsync's temporary
/// copy of it, `.<name>.XXXXXX`): not a change of the application's data.
fn only_marker(ev: &notify::Event) -> bool {
    !ev.paths.is_empty()
        && ev.paths.iter().all(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(MARKER_NAME))
        })
}

/// Watches, batches and pushes while the local role is active.
#[derive(Debug)]
pub struct FilesSupervisor {
    cfg: FilesConfig,
    debouncer: Debouncer,
    watermark: Watermark,
    role: Option<RoleEpoch>,
    /// Error of the last directory push; cleared by a successful one.
    sync_error: Option<String>,
    /// Error of the last marker push; cleared by a successful one.
    marker_error: Option<String>,
    /// When the next marker is due (only while active).
    marker_due: Option<Instant>,
    published: watch::Sender<Watermark>,
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
            sync_error: None,
            marker_error: None,
            marker_due: None,
            published: watch::Sender::new(Watermark::default()),
        }
    }

    /// The watermark as it changes, for the HTTP endpoint (it lives as long
    /// as the receiver, also after the supervisor stopped).
    pub fn subscribe(&self) -> watch::Receiver<Watermark> {
        self.published.subscribe()
    }

    /// Where the marker is staged before it is pushed: next to the
    /// watermark file, outside the watched directory.
    fn staged_marker(&self) -> PathBuf {
        let mut name = self.cfg.watermark_file.as_os_str().to_owned();
        name.push(".marker");
        PathBuf::from(name)
    }

    fn active(&self) -> bool {
        self.role.is_some_and(|r| r.role == Role::Active)
    }

    fn write_watermark(&mut self) {
        self.watermark.last_error = self
            .sync_error
            .clone()
            .or_else(|| self.marker_error.clone());
        self.published.send_replace(self.watermark.clone());
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
                // The first marker follows the first push, so that a standby
                // never reads "complete as of now" before it is.
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
                // A standby pushes nothing, so its old push errors say
                // nothing about it any more.
                self.sync_error = None;
                self.marker_error = None;
                self.marker_due = None;
            }
        }
        self.write_watermark();
    }

    /// Pushes a [`Marker`] of the current watermark to every destination
    /// and schedules the next one a heartbeat later.
    async fn heartbeat(&mut self) {
        self.marker_due = Some(Instant::now() + self.cfg.heartbeat);
        let marker = Marker::from_watermark(&self.watermark, unix_ms());
        let staged = self.staged_marker();
        let result = match serde_json::to_vec(&marker) {
            Ok(json) => write_atomic(&staged, &json),
            Err(e) => Err(SyncError::Parse {
                what: "an encodable marker",
                value: e.to_string(),
            }),
        };
        let mut error = result.err().map(|e| e.to_string());
        if error.is_none() {
            for dest in &self.cfg.destinations {
                if let Err(e) = push_marker(&self.cfg, &staged, dest).await {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(e) = &error {
            tracing::warn!(error = %e, "pushing the marker failed");
        }
        if error != self.marker_error {
            self.marker_error = error;
            self.write_watermark();
        }
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
                self.sync_error = None;
                // Tell the standbys at once rather than a heartbeat later.
                self.marker_due = Some(Instant::now());
                // Changes seen during the run are newer than its start.
                self.watermark.oldest_unsynced_unix_ms =
                    self.debouncer.pending().then_some(started);
                tracing::debug!(seq, "files synced");
            }
            Some(e) => {
                tracing::warn!(error = %e, "file sync failed; retrying");
                self.sync_error = Some(e);
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
            // The marker a standby receives is not the application's data.
            let change = match res {
                Ok(ev) => !matches!(ev.kind, EventKind::Access(_)) && !only_marker(&ev),
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
            let marker_due = self
                .marker_due
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
                _ = async {
                    match marker_due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.heartbeat().await,
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

/// Reads the [`Marker`] an active pushed into `dir`; `None` if there is
/// none yet.
pub fn read_marker(dir: &Path) -> Result<Option<Marker>, SyncError> {
    let path = dir.join(MARKER_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SyncError::io("reading the marker", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| SyncError::Parse {
            what: "a marker (JSON)",
            value: String::from_utf8_lossy(&bytes).into_owned(),
        })
}

/// Reads a watermark file written by a supervisor.
pub fn read_watermark(path: &std::path::Path) -> Result<Watermark, SyncError> {
    let bytes = std::fs::read(path).map_err(|e| SyncError::io("reading the watermark", path, e))?;
    serde_json::from_slice(&bytes).map_err(|_| SyncError::Parse {
        what: "a watermark (JSON)",
        value: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
