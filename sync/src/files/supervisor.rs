//! The file replication supervisor: inotify events in, debounced batches
//! out, watermark file updated as the destinations report; while active, a
//! [`Marker`] pushed into every destination after each sync and every
//! heartbeat, so that the standby knows how current its copy is.
//!
//! Each destination has two tasks of its own, one pushing the directory and
//! one pushing markers, so that nothing one destination does delays
//! another, and a directory push never holds back a heartbeat. (They were
//! once one loop: under load, four `rsync` runs in a row kept a standby's
//! marker 1.7 s old with a 200 ms heartbeat, and a hung destination would
//! have stopped every marker for up to a minute.) The supervisor owns the
//! batching, the [`ChangeLog`] and the watermark; the tasks report to it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use counterweight_core::clock::unix_ms;
use counterweight_core::state::{Role, RoleEpoch};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::{ChangeLog, Debouncer, MARKER_NAME, Marker, Watermark};
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
    // new active never pushes the stale one it received as a standby. So
    // is the marker push's temporary file (`.<name>.XXXXXX`), since that
    // push runs beside this one and --delete would remove it mid-rename.
    cmd.args(["-a", "--delete", "--delay-updates", "--timeout=60"])
        .arg(format!("--exclude=/{MARKER_NAME}"))
        .arg(format!("--exclude=/.{MARKER_NAME}.*"))
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

/// What every destination is asked to have: all changes up to `seq`, the
/// last batch taken, in `epoch`. `None` while this side does not push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    epoch: u64,
    seq: u64,
}

/// What a destination's tasks tell the supervisor.
#[derive(Debug)]
enum Report {
    /// Destination `dest` has every change up to `seq` of `epoch`.
    Synced { dest: usize, epoch: u64, seq: u64 },
    /// A directory push to `dest` failed; it is retried.
    SyncFailed {
        dest: usize,
        epoch: u64,
        error: String,
    },
    /// A marker push to `dest` ended, with `error` if it failed.
    Marker {
        dest: usize,
        epoch: u64,
        error: Option<String>,
    },
}

/// One destination as the supervisor knows it, in the current epoch.
#[derive(Debug, Clone, Default)]
struct DestStatus {
    synced_seq: u64,
    sync_error: Option<String>,
    marker_error: Option<String>,
}

/// Shared by the supervisor (which writes it) and the marker tasks (which
/// date their markers with it). Held only for a few instructions, never
/// across an await.
type SharedLog = Arc<Mutex<ChangeLog>>;

fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, ChangeLog> {
    // The log holds plain numbers; a panic elsewhere cannot leave it torn.
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Watches, batches and pushes while the local role is active.
#[derive(Debug)]
pub struct FilesSupervisor {
    cfg: Arc<FilesConfig>,
    debouncer: Debouncer,
    watermark: Watermark,
    role: Option<RoleEpoch>,
    log: SharedLog,
    dests: Vec<DestStatus>,
    target: watch::Sender<Option<Target>>,
    published: watch::Sender<Watermark>,
}

impl FilesSupervisor {
    /// A supervisor that has not seen a role yet (it pushes nothing until
    /// it does).
    pub fn new(cfg: FilesConfig) -> Self {
        Self {
            debouncer: Debouncer::new(cfg.quiet, cfg.max_delay),
            dests: vec![DestStatus::default(); cfg.destinations.len()],
            cfg: Arc::new(cfg),
            watermark: Watermark::default(),
            role: None,
            log: SharedLog::default(),
            target: watch::Sender::new(None),
            published: watch::Sender::new(Watermark::default()),
        }
    }

    /// The watermark as it changes, for the HTTP endpoint (it lives as long
    /// as the receiver, also after the supervisor stopped).
    pub fn subscribe(&self) -> watch::Receiver<Watermark> {
        self.published.subscribe()
    }

    fn active(&self) -> bool {
        self.role.is_some_and(|r| r.role == Role::Active)
    }

    fn epoch(&self) -> u64 {
        self.role.map_or(0, |r| r.epoch)
    }

    /// Recomputes what holds for every destination, publishes it and
    /// writes the watermark file.
    fn write_watermark(&mut self) {
        if self.active() {
            // No destination at all: nothing waits for a push.
            let all = self
                .dests
                .iter()
                .map(|d| d.synced_seq)
                .min()
                .unwrap_or(self.watermark.seen_seq);
            if all > self.watermark.synced_seq {
                self.watermark.synced_seq = all;
                self.watermark.synced_at_unix_ms = Some(unix_ms());
            }
            let mut log = lock(&self.log);
            log.forget_through(all);
            self.watermark.oldest_unsynced_unix_ms = log.oldest_after(all);
        }
        self.watermark.last_error = self
            .dests
            .iter()
            .find_map(|d| d.sync_error.clone())
            .or_else(|| self.dests.iter().find_map(|d| d.marker_error.clone()));
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
        if self.active() {
            lock(&self.log).record(seq, unix_ms());
            if self.watermark.oldest_unsynced_unix_ms.is_none() {
                self.watermark.oldest_unsynced_unix_ms = Some(unix_ms());
            }
        }
    }

    fn on_role(&mut self, new: Option<RoleEpoch>) {
        let was = self.role;
        self.role = new;
        self.watermark.role = new.map(|r| r.role);
        self.watermark.epoch = new.map_or(0, |r| r.epoch);
        if was != new {
            // Whatever the destinations had, they had it in another epoch:
            // a new active proves each copy again with a whole push, and a
            // standby's old push errors say nothing about it any more.
            self.target.send_replace(None);
            self.dests.fill(DestStatus::default());
            lock(&self.log).clear();
            self.watermark.synced_seq = 0;
            self.watermark.oldest_unsynced_unix_ms = None;
            self.debouncer.clear();
            if new.is_some_and(|r| r.role == Role::Active) {
                // The first marker follows the first push, so that a
                // standby never reads "complete as of now" before it is.
                tracing::info!(
                    epoch = self.epoch(),
                    "files: active, pushing the whole directory"
                );
                self.on_change();
            }
        }
        self.write_watermark();
    }

    /// Takes the batch that is due and asks every destination for it.
    fn take_batch(&mut self) {
        if let Some(seq) = self.debouncer.take(Instant::now()) {
            lock(&self.log).taken(seq);
            let target = Target {
                epoch: self.epoch(),
                seq,
            };
            self.target.send_replace(Some(target));
            tracing::debug!(seq, "files: batch taken");
        }
    }

    fn on_report(&mut self, report: Report) {
        let epoch = self.epoch();
        match report {
            Report::Synced {
                dest,
                epoch: e,
                seq,
            } if e == epoch && self.active() => {
                if let Some(d) = self.dests.get_mut(dest) {
                    d.synced_seq = d.synced_seq.max(seq);
                    d.sync_error = None;
                }
                tracing::debug!(seq, dest = %self.cfg.destinations[dest], "files synced");
            }
            Report::SyncFailed {
                dest,
                epoch: e,
                error,
            } if e == epoch && self.active() => {
                tracing::warn!(error = %error, "file sync failed; retrying");
                if let Some(d) = self.dests.get_mut(dest) {
                    d.sync_error = Some(error);
                }
            }
            Report::Marker {
                dest,
                epoch: e,
                error,
            } if e == epoch && self.active() => {
                if let Some(e) = &error {
                    tracing::warn!(error = %e, "pushing the marker failed");
                }
                match self.dests.get_mut(dest) {
                    Some(d) if d.marker_error != error => d.marker_error = error,
                    _ => return,
                }
            }
            // From an epoch or role this side has left: stale.
            _ => return,
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
        // Dropping the set (on any return) aborts the tasks, and with them
        // their rsync runs (kill_on_drop).
        let mut tasks = JoinSet::new();
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        for dest in 0..self.cfg.destinations.len() {
            let (synced_tx, synced_rx) = watch::channel(None);
            tasks.spawn(push_directory(
                self.cfg.clone(),
                dest,
                self.target.subscribe(),
                synced_tx,
                report_tx.clone(),
            ));
            tasks.spawn(push_markers(
                self.cfg.clone(),
                dest,
                synced_rx,
                self.log.clone(),
                report_tx.clone(),
            ));
        }
        drop(report_tx);
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
                } => self.take_batch(),
                Some(report) = reports.recv() => self.on_report(report),
                res = shutdown.changed() => {
                    if res.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        tasks.shutdown().await;
        drop(watcher);
        Ok(())
    }

    /// The current watermark.
    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }
}

/// Destination `dest`'s directory pusher: whenever the target is ahead of
/// what the destination has, one `rsync` run; a failure is retried after
/// `retry`, with whatever the target is by then. Publishes what the
/// destination has on `synced` for its marker task.
async fn push_directory(
    cfg: Arc<FilesConfig>,
    dest: usize,
    mut target: watch::Receiver<Option<Target>>,
    synced: watch::Sender<Option<Target>>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let url = &cfg.destinations[dest];
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let want = *target.borrow_and_update();
        let have = *synced.borrow();
        let behind = want.filter(|w| have.is_none_or(|h| h.epoch != w.epoch || h.seq < w.seq));
        if want.is_none() || want.map(|w| w.epoch) != have.map(|h| h.epoch) {
            // Another epoch (or none): nothing this copy had counts.
            synced.send_if_modified(|s| s.take().is_some());
        }
        match behind {
            Some(w) if retry_at.is_none_or(|at| at <= tokio::time::Instant::now()) => {
                let result = rsync_once(&cfg, url).await;
                let report = match result {
                    Ok(()) => {
                        retry_at = None;
                        synced.send_replace(Some(w));
                        Report::Synced {
                            dest,
                            epoch: w.epoch,
                            seq: w.seq,
                        }
                    }
                    Err(e) => {
                        retry_at = Some(tokio::time::Instant::now() + cfg.retry);
                        Report::SyncFailed {
                            dest,
                            epoch: w.epoch,
                            error: e.to_string(),
                        }
                    }
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
            _ => {
                let wake = behind.and(retry_at);
                tokio::select! {
                    changed = target.changed() => if changed.is_err() { return },
                    _ = async {
                        match wake {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        }
    }
}

/// Destination `dest`'s marker pusher: once the destination has its first
/// batch of an epoch, a [`Marker`] at once after each sync and every
/// `heartbeat` in between, dated by the shared [`ChangeLog`].
async fn push_markers(
    cfg: Arc<FilesConfig>,
    dest: usize,
    mut synced: watch::Receiver<Option<Target>>,
    log: SharedLog,
    reports: mpsc::UnboundedSender<Report>,
) {
    let url = &cfg.destinations[dest];
    let staged = staged_marker(&cfg, dest);
    let mut next: Option<tokio::time::Instant> = None;
    loop {
        let wake = next;
        tokio::select! {
            changed = synced.changed() => {
                if changed.is_err() {
                    return;
                }
                // Tell the standby at once rather than a heartbeat later.
                next = synced
                    .borrow_and_update()
                    .map(|_| tokio::time::Instant::now());
                continue;
            }
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let Some(have) = *synced.borrow() else {
            next = None;
            continue;
        };
        next = Some(tokio::time::Instant::now() + cfg.heartbeat);
        let marker = {
            let log = lock(&log);
            Marker::for_destination(have.epoch, have.seq, &log, unix_ms())
        };
        let result = match serde_json::to_vec(&marker) {
            Ok(json) => write_atomic(&staged, &json),
            Err(e) => Err(SyncError::Parse {
                what: "an encodable marker",
                value: e.to_string(),
            }),
        };
        let result = match result {
            Ok(()) => push_marker(&cfg, &staged, url).await,
            Err(e) => Err(e),
        };
        let report = Report::Marker {
            dest,
            epoch: have.epoch,
            error: result.err().map(|e| e.to_string()),
        };
        if reports.send(report).is_err() {
            return;
        }
    }
}

/// Where destination `dest`'s marker is staged before it is pushed: next to
/// the watermark file, outside the watched directory, one per destination
/// since their tasks run at once.
fn staged_marker(cfg: &FilesConfig, dest: usize) -> PathBuf {
    // Distinct before the last dot: write_atomic's temporary file replaces
    // the extension, and the tasks must not share one.
    let mut name = cfg.watermark_file.as_os_str().to_owned();
    name.push(format!(".marker-{dest}.json"));
    PathBuf::from(name)
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
