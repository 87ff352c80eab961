//! `hold` mode: the lease sidecar that keeps a released pod's right to serve
//! bound to its cluster's serving lease (`counterweight_core::serving`).
//!
//! It runs as a Kubernetes native sidecar (an init container with
//! `restartPolicy: Always`) after the gate has released the pod, and needs
//! nothing from the controller but the published lease. It:
//!
//! - reads the epoch the gate released the pod in (the epoch file);
//! - watches the ConfigMap `counterweight-serving` (one object, by name);
//! - keeps the **lease file** current for the application: one line,
//!   `<epoch> <untilUnixMs> <cluster>`; the application serves only while
//!   the file's epoch is its release epoch and `untilUnixMs` is ahead of
//!   its clock (`0` means: do not serve);
//! - answers `GET /ready` (any path) with 200 only while
//!   [`allowance`](counterweight_core::serving::allowance) says *serve*,
//!   decided at the moment of the request, so the kubelet's readiness probe
//!   takes the pod out of its Service the moment the lease ends, whether or
//!   not anything was heard since.
//!
//! Every failure (no lease yet, API server down, garbage) means: do not
//! serve. The lease ends on its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use counterweight_core::clock::unix_ms;
use counterweight_core::serving::{Allowance, ServingLease, allowance};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::watcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the sidecar knows: the pod's cluster and release epoch, and the
/// newest lease read.
#[derive(Debug)]
pub struct Holder {
    cluster: String,
    released: u64,
    lease: Mutex<Option<ServingLease>>,
    lease_file: PathBuf,
}

/// Why `hold` mode could not run.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The epoch file the gate writes on release is missing or garbage.
    #[error(
        "cannot read the release epoch from {path}: {reason}; the lease sidecar must run after the gate released the pod"
    )]
    NoRelease {
        /// The epoch file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The readiness port could not be bound.
    #[error(
        "cannot listen on {addr} for readiness probes: {source}; choose a free port with --ready-listen"
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The lease file could not be written.
    #[error("cannot write the lease file {path}: {source}")]
    LeaseFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the release epoch the gate wrote.
pub fn read_release_epoch(path: &Path) -> Result<u64, HoldError> {
    let err = |reason: String| HoldError::NoRelease {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.trim()
        .parse()
        .map_err(|_| err(format!("{:?} is not an epoch", text.trim())))
}

impl Holder {
    /// A holder for a pod of `cluster` released in `released`.
    pub fn new(cluster: &str, released: u64, lease_file: PathBuf) -> Self {
        Self {
            cluster: cluster.to_owned(),
            released,
            lease: Mutex::new(None),
            lease_file,
        }
    }

    /// The decision at this instant.
    pub fn allowance(&self) -> Allowance {
        let lease = self.lease.lock().ok().and_then(|l| l.clone());
        allowance(lease.as_ref(), &self.cluster, self.released, unix_ms())
    }

    /// Takes a newly read lease (`None`: gone or unreadable) and rewrites
    /// the lease file. A lease of another epoch or cluster is written as
    /// `until 0`, so the application never reads someone else's right.
    pub fn observe(&self, lease: Option<ServingLease>) -> Result<(), HoldError> {
        let file = match &lease {
            Some(l) if l.cluster == self.cluster && l.epoch == self.released => l.clone(),
            _ => ServingLease::withdrawn(&self.cluster, self.released),
        };
        if let Ok(mut cur) = self.lease.lock() {
            *cur = lease;
        }
        write_atomically(&self.lease_file, &file.to_file()).map_err(|source| HoldError::LeaseFile {
            path: self.lease_file.clone(),
            source,
        })
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// First delay before the lease watch is re-established after an error.
pub const WATCH_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Longest delay between attempts to re-establish the lease watch.
///
/// kube's default watcher backoff grows to 30 s: after an API server was
/// down for 11 s, the sidecar waited up to 13 s more before it read the
/// renewed lease, and the active served nothing for 18 s after its API
/// server was back. Every second of delay here is a second of outage once
/// the API server returns, so the cap is short. Its cost is the retry load
/// on a down API server: with equal jitter, 10,000 sidecars retry about
/// 13,000 times a second, each a refused or rejected connection (priority
/// and fairness answer 429 to an overloaded server, which is retried the
/// same way).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Follows the lease ConfigMap `namespace/name` into `holder` until the
/// watch stream ends (never, in practice: errors are retried with backoff).
/// A deleted or unreadable record counts as no lease.
pub async fn follow(api: Api<ConfigMap>, name: &str, holder: Arc<Holder>) -> Result<(), HoldError> {
    use kube::runtime::WatchStreamExt;
    let stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .backoff(Backoff::with_random_seed(
        WATCH_BACKOFF_INITIAL,
        WATCH_BACKOFF_MAX,
    ));
    let mut stream = std::pin::pin!(stream);
    let mut last_error: Option<String> = None;
    while let Some(item) = stream.next().await {
        let lease = match item {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                match ServingLease::from_data(&cm.data.unwrap_or_default()) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable serving lease: not serving");
                        None
                    }
                }
            }
            Ok(watcher::Event::Delete(_)) => None,
            Ok(_) => continue,
            Err(e) => {
                // The lease runs out on its own; just say why nothing new comes.
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot watch the serving lease; the last one read runs out on its own");
                    last_error = Some(text);
                }
                continue;
            }
        };
        last_error = None;
        holder.observe(lease)?;
        match holder.allowance() {
            Allowance::Serve {
                epoch,
                until_unix_ms,
            } => {
                tracing::debug!(epoch, until_unix_ms, "serving lease renewed");
            }
            Allowance::Hold(why) => tracing::info!(reason = %why, "not serving"),
        }
    }
    Ok(())
}

/// Answers readiness probes on `listener`: 200 while the holder allows
/// serving at the moment of the request, else 503 with the reason.
pub async fn serve_readiness(listener: TcpListener, holder: Arc<Holder>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let holder = holder.clone();
        tokio::spawn(async move {
            // The request itself does not matter; read what has arrived.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(1), sock.read(&mut buf)).await;
            let (status, body) = match holder.allowance() {
                Allowance::Serve {
                    epoch,
                    until_unix_ms,
                } => (
                    "200 OK",
                    format!("serving in epoch {epoch} until {until_unix_ms} ms (Unix)\n"),
                ),
                Allowance::Hold(why) => ("503 Service Unavailable", format!("{why}\n")),
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(answer.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Where `hold` mode reads and writes.
#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// The pod's cluster.
    pub cluster: String,
    /// Namespace of the serving lease ConfigMap.
    pub namespace: String,
    /// Name of the serving lease ConfigMap.
    pub name: String,
    /// The gate's epoch file.
    pub epoch_file: PathBuf,
    /// The lease file for the application.
    pub lease_file: PathBuf,
    /// The readiness address.
    pub ready_listen: SocketAddr,
}

/// Runs `hold` mode until `shutdown`: binds the readiness port, writes the
/// lease file as "not serving", then follows the lease.
pub async fn run(
    client: kube::Client,
    cfg: HoldConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), HoldError> {
    let HoldConfig {
        cluster,
        namespace,
        name,
        epoch_file,
        lease_file,
        ready_listen,
    } = cfg;
    let (cluster, namespace, name) = (cluster.as_str(), namespace.as_str(), name.as_str());
    let released = read_release_epoch(&epoch_file)?;
    let holder = Arc::new(Holder::new(cluster, released, lease_file));
    holder.observe(None)?;
    let listener = TcpListener::bind(ready_listen)
        .await
        .map_err(|source| HoldError::Listen {
            addr: ready_listen,
            source,
        })?;
    tracing::info!(cluster, released, configmap = %format!("{namespace}/{name}"), listen = %ready_listen, "holding: serving follows the serving lease");
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    tokio::select! {
        () = shutdown => Ok(()),
        () = serve_readiness(listener, holder.clone()) => Ok(()),
        r = follow(api, name, holder) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_file_carries_only_this_pods_right() {
        let dir = std::env::temp_dir().join(format!("cw-hold-{}", std::process::id()));
        let file = dir.join("lease");
        let h = Holder::new("east", 4, file.clone());
        h.observe(None).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "4 0 east\n");
        let far = unix_ms() + 60_000;
        let lease = ServingLease {
            cluster: "east".into(),
            epoch: 4,
            until_unix_ms: far,
        };
        h.observe(Some(lease.clone())).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), lease.to_file());
        assert!(matches!(h.allowance(), Allowance::Serve { .. }));
        // A later epoch (the pod was released by a transient active) is
        // never this pod's right.
        h.observe(Some(ServingLease { epoch: 5, ..lease })).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "4 0 east\n");
        assert!(matches!(h.allowance(), Allowance::Hold(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_or_garbage_epoch_file_is_named() {
        let e = read_release_epoch(Path::new("/nonexistent/epoch")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/epoch"), "{e}");
    }
}
