//! Errors of the synchronization library. Each names what was being done so
//! that a log line alone explains a failed step.

use std::path::PathBuf;

/// Anything that can go wrong while observing or acting on replication.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A file operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL query or connection failed. The message carries the
    /// driver error's causes: `tokio-postgres` prints only its kind ("db
    /// error", "error performing TLS handshake"), which alone says nothing.
    #[error("PostgreSQL: {what}: {}", with_causes(source))]
    Postgres {
        /// What was being done.
        what: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// TLS for a PostgreSQL connection cannot be set up (a bad `sslmode`,
    /// an unreadable CA bundle).
    #[error("PostgreSQL TLS: {what}: {message}")]
    Tls {
        /// What was being set up.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A PostgreSQL connection or query did not finish in time.
    #[error("PostgreSQL: {what}: timed out")]
    Timeout {
        /// What was being done.
        what: String,
    },
    /// An external tool (`pg_rewind`, `pg_basebackup`, `pg_ctl`, `rsync`)
    /// could not be started or failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The tool.
        tool: String,
        /// Exit status, or why it did not run.
        status: String,
        /// The end of its error output.
        stderr: String,
    },
    /// The state record (role and epoch) could not be read.
    #[error("state record in {dir}: {source}")]
    State {
        /// The directory the ConfigMap is mounted at.
        dir: PathBuf,
        /// What is wrong with it.
        #[source]
        source: counterweight_core::state::StateError,
    },
    /// The state ConfigMap could not be read through the API.
    #[error(
        "state ConfigMap {namespace}/{name}: {message}; the pod's ServiceAccount needs `get` on it (the controller grants it to opted-in namespaces)"
    )]
    StateApi {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// A value did not parse (an LSN, a conninfo, a setting).
    #[error("cannot parse {what} from {value:?}")]
    Parse {
        /// What was expected.
        what: &'static str,
        /// What was found.
        value: String,
    },
    /// Watching a directory failed.
    #[error("watching {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The watcher error.
        #[source]
        source: notify::Error,
    },
}

/// `error` followed by its causes, `: `-separated (at most a few levels:
/// a chain is short, and a cyclic one must not loop).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    for _ in 0..8 {
        let Some(c) = cause else { break };
        let more = c.to_string();
        // Some wrappers repeat their cause's text; keep it once.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl SyncError {
    /// An [`SyncError::Io`] for `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// A [`SyncError::Postgres`] describing `what`.
    pub fn pg(what: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Postgres {
            what: what.into(),
            source,
        }
    }
}

impl From<counterweight_core::replication::LsnError> for SyncError {
    fn from(e: counterweight_core::replication::LsnError) -> Self {
        SyncError::Parse {
            what: "a WAL position like 16/B374D848",
            value: e.0,
        }
    }
}
