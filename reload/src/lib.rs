//! Files that are replaced while a process runs, and the value built from
//! them.
//!
//! Certificates and keys arrive in Secret volumes and configuration in
//! ConfigMap volumes, and both change under a running pod: kubelet writes the
//! new version into a fresh directory and swaps a `..data` symlink, and
//! cert-manager may write the same bytes again. This crate owns the one way
//! Counterweight follows such files. [`Watched`] reads a fixed set of paths,
//! builds a value from their bytes with the caller's function (a rustls
//! configuration, a parsed config), and hands the current value to readers.
//! A poll notices a change by comparing *contents*, not mtimes or inodes,
//! reading through the symlinks, so both kinds of update are seen and a
//! rewrite of identical bytes is not. A new version that does not build (a
//! rotation caught half written, a typo) is reported once and the last good
//! value stays in force; the next change is tried again.
//!
//! Polling rather than inotify, because a watch on the path does not fire on
//! kubelet's swap of a parent symlink. Logging and metrics stay with the
//! callers, who know what the files are: a poll returns a [`Reload`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}; check that the volume is mounted and the file exists", path.display())]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// What one poll found.
#[derive(Debug)]
pub enum Reload<E> {
    /// The files hold the bytes last tried.
    Unchanged,
    /// A file could not be read; the current value stays. Normal for an
    /// instant during a symlink swap, so callers log it quietly.
    Unreadable(ReadError),
    /// New bytes built a new value, which is now current.
    Swapped,
    /// New bytes did not build; the last good value stays. Reported once
    /// per version of the files.
    Rejected(E),
}

impl<E: std::fmt::Display> Reload<E> {
    /// Logs this outcome for `what` (say, "serving certificate") read from
    /// `path`, the same way for every user: unreadable at debug (normal for
    /// an instant during kubelet's swap; the next poll sees the new files),
    /// swapped at info, rejected at warn. Returns what a reload counter
    /// counts: `Some(true)` for a swap, `Some(false)` for a rejected
    /// version, `None` otherwise.
    pub fn log(&self, what: &str, path: &Path) -> Option<bool> {
        let path = path.display();
        match self {
            Reload::Unchanged => None,
            Reload::Unreadable(e) => {
                tracing::debug!(%path, error = %e, "{what} unreadable; keeping the current one");
                None
            }
            Reload::Swapped => {
                tracing::info!(%path, "{what} reloaded");
                Some(true)
            }
            Reload::Rejected(e) => {
                tracing::warn!(%path, error = %e, "new {what} is unusable; keeping the last good one");
                Some(false)
            }
        }
    }
}

type Build<T, E> = dyn Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync;

/// A value built from files, rebuilt when their contents change.
pub struct Watched<T, E> {
    paths: Vec<PathBuf>,
    build: Box<Build<T, E>>,
    current: RwLock<Arc<T>>,
    swaps: AtomicU64,
    // The bytes last *tried*, good or bad: a broken version is reported
    // once, not on every poll, and any change to any file differs.
    last_seen: Mutex<Vec<Vec<u8>>>,
}

impl<T, E> std::fmt::Debug for Watched<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("paths", &self.paths)
            .field("swaps", &self.swaps)
            .finish_non_exhaustive()
    }
}

impl<T, E: From<ReadError>> Watched<T, E> {
    /// Reads `paths` and builds the first value with `build`, which gets the
    /// files' bytes in the order of `paths`. Fails if a file is missing or
    /// does not build: a process must not start on material it cannot use.
    pub fn load(
        paths: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let files = read_all(&paths)?;
        let value = build(&files)?;
        Ok(Self {
            paths,
            build: Box::new(build),
            current: RwLock::new(Arc::new(value)),
            swaps: AtomicU64::new(0),
            last_seen: Mutex::new(files),
        })
    }
}

impl<T, E> Watched<T, E> {
    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        // A poisoned lock still holds a complete Arc; keep serving it.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many times a new value was swapped in since [`Watched::load`].
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::SeqCst)
    }

    /// The first path, to name the files in log lines.
    pub fn path(&self) -> &Path {
        self.paths.first().map_or(Path::new(""), PathBuf::as_path)
    }

    /// Reads the files once and swaps in a new value if they changed and it
    /// builds. Blocks on file I/O: call it from a blocking context, as
    /// [`Watched::poll`] does.
    pub fn reload_if_changed(&self) -> Reload<E> {
        let files = match read_all(&self.paths) {
            Ok(f) => f,
            Err(e) => return Reload::Unreadable(e),
        };
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == files {
                return Reload::Unchanged;
            }
            seen.clone_from(&files);
        }
        match (self.build)(&files) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                self.swaps.fetch_add(1, Ordering::SeqCst);
                Reload::Swapped
            }
            Err(e) => Reload::Rejected(e),
        }
    }
}

impl<T, E> Watched<T, E>
where
    T: Send + Sync + 'static,
    E: Send + 'static,
{
    /// [`Watched::reload_if_changed`] off the async workers.
    pub async fn poll(self: &Arc<Self>) -> Reload<E> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.reload_if_changed())
            .await
            // The closure does not panic; were the runtime shutting down,
            // nothing changed.
            .unwrap_or(Reload::Unchanged)
    }

    /// Polls every `every` until `shutdown` resolves, handing each outcome
    /// to `on` (to log and count it).
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl Future<Output = ()>,
        mut on: impl FnMut(Reload<E>),
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => on(self.poll().await),
            }
        }
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ReadError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| ReadError {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Bad {
        Read(String),
        NotANumber(String),
    }

    impl From<ReadError> for Bad {
        fn from(e: ReadError) -> Self {
            Bad::Read(e.to_string())
        }
    }

    /// The sum of the numbers in the files.
    fn sum(files: &[Vec<u8>]) -> Result<u64, Bad> {
        files
            .iter()
            .map(|f| {
                let text = String::from_utf8_lossy(f);
                text.trim()
                    .parse::<u64>()
                    .map_err(|_| Bad::NotANumber(text.into_owned()))
            })
            .sum()
    }

    fn two_files(a: &str, b: &str) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a"), dir.path().join("b")];
        std::fs::write(&paths[0], a).unwrap();
        std::fs::write(&paths[1], b).unwrap();
        (dir, paths)
    }

    #[test]
    fn builds_from_all_files_and_swaps_on_a_change() {
        let (_dir, paths) = two_files("1", "2");
        let w = Watched::load(paths.clone(), sum).unwrap();
        assert_eq!(*w.current(), 3);
        assert!(matches!(w.reload_if_changed(), Reload::Unchanged));
        std::fs::write(&paths[1], "5").unwrap();
        assert!(matches!(w.reload_if_changed(), Reload::Swapped));
        assert_eq!((*w.current(), w.swaps()), (6, 1));
    }

    #[test]
    fn a_rewrite_of_the_same_bytes_is_no_change() {
        let (_dir, paths) = two_files("1", "2");
        let w = Watched::load(paths.clone(), sum).unwrap();
        std::fs::write(&paths[0], "1").unwrap();
        assert!(matches!(w.reload_if_changed(), Reload::Unchanged));
        assert_eq!(w.swaps(), 0);
    }

    #[test]
    fn a_bad_version_is_reported_once_and_the_last_good_value_stays() {
        let (_dir, paths) = two_files("1", "2");
        let w = Watched::load(paths.clone(), sum).unwrap();
        std::fs::write(&paths[0], "one").unwrap();
        assert!(matches!(
            w.reload_if_changed(),
            Reload::Rejected(Bad::NotANumber(t)) if t == "one"
        ));
        assert!(matches!(w.reload_if_changed(), Reload::Unchanged));
        assert_eq!(*w.current(), 3);
        // Going back to what is in force is a change from what was tried.
        std::fs::write(&paths[0], "1").unwrap();
        assert!(matches!(w.reload_if_changed(), Reload::Swapped));
        assert_eq!(*w.current(), 3);
    }

    #[test]
    fn a_missing_file_keeps_the_value_and_is_retried() {
        let (_dir, paths) = two_files("1", "2");
        let w = Watched::load(paths.clone(), sum).unwrap();
        std::fs::remove_file(&paths[1]).unwrap();
        match w.reload_if_changed() {
            Reload::Unreadable(e) => assert_eq!(e.path, paths[1]),
            other => panic!("{other:?}"),
        }
        assert_eq!(*w.current(), 3);
        std::fs::write(&paths[1], "4").unwrap();
        assert!(matches!(w.reload_if_changed(), Reload::Swapped));
        assert_eq!(*w.current(), 5);
    }

    #[test]
    fn load_fails_on_a_missing_or_bad_file() {
        let (_dir, paths) = two_files("1", "x");
        assert_eq!(
            Watched::load(paths.clone(), sum).unwrap_err(),
            Bad::NotANumber("x".into())
        );
        std::fs::remove_file(&paths[0]).unwrap();
        match Watched::load(paths, sum).unwrap_err() {
            Bad::Read(message) => assert!(message.contains("cannot read"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn follows_a_kubelet_style_symlink_swap() {
        // <dir>/..v1/n, <dir>/..data -> ..v1, <dir>/n -> ..data/n
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/n"), "7").unwrap();
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/n", root.join("n")).unwrap();
        let w = Watched::load(vec![root.join("n")], sum).unwrap();
        assert_eq!(*w.current(), 7);
        std::fs::create_dir(root.join("..v2")).unwrap();
        std::fs::write(root.join("..v2/n"), "8").unwrap();
        std::os::unix::fs::symlink("..v2", root.join("..data.tmp")).unwrap();
        std::fs::rename(root.join("..data.tmp"), root.join("..data")).unwrap();
        assert!(matches!(w.reload_if_changed(), Reload::Swapped));
        assert_eq!(*w.current(), 8);
    }

    #[test]
    fn log_returns_what_a_reload_counter_counts() {
        let path = Path::new("/etc/tls/tls.crt");
        assert_eq!(Reload::<&str>::Unchanged.log("x", path), None);
        let unreadable = ReadError {
            path: path.to_owned(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(Reload::<&str>::Unreadable(unreadable).log("x", path), None);
        assert_eq!(Reload::<&str>::Swapped.log("x", path), Some(true));
        assert_eq!(Reload::Rejected("half written").log("x", path), Some(false));
    }

    #[tokio::test]
    async fn watch_reports_each_poll_until_shutdown() {
        let (_dir, paths) = two_files("1", "2");
        let w = Arc::new(Watched::load(paths.clone(), sum).unwrap());
        std::fs::write(&paths[0], "10").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(w.clone().watch(
            Duration::from_millis(10),
            async {
                let _ = stopped.await;
            },
            move |r| {
                let _ = tx.send(matches!(r, Reload::Swapped));
            },
        ));
        let swapped = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if rx.recv().await == Some(true) {
                    return;
                }
            }
        })
        .await;
        assert!(swapped.is_ok(), "no swap reported within 10 s");
        assert_eq!(*w.current(), 12);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watch ends at shutdown")
            .unwrap();
    }
}
