//! The Kubernetes client, built the same way by every binary: from a
//! kubeconfig named on the command line (or by `KUBECONFIG`, which may
//! list several files, merged in order as kubectl does), else from the
//! pod's service account, else from the default kubeconfig.

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Why no client could be built. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A kubeconfig file could not be read or merged.
    #[error("cannot read kubeconfig {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What was wrong with it.
        message: String,
    },
    /// The kubeconfig path (a `KUBECONFIG`-style list) names no file.
    #[error(
        "kubeconfig path {0:?} names no file; name one kubeconfig, or several separated by ':'"
    )]
    NoFile(String),
    /// Neither a service account nor a default kubeconfig was found.
    #[error(
        "no Kubernetes configuration: {0}; pass --kubeconfig, set KUBECONFIG, or run in a pod with a service account"
    )]
    Infer(String),
    /// The kubeconfig has no usable context of that name, or its
    /// credentials cannot be loaded.
    #[error("kubeconfig context {context}: {message}")]
    Context {
        /// The context asked for (`current-context` if none was).
        context: String,
        /// What was wrong with it.
        message: String,
    },
    /// The configuration was read but the client could not be made (a
    /// TLS setting the client cannot use).
    #[error("cannot build a Kubernetes client: {0}")]
    Build(String),
}

/// Timeouts a client applies to each request; `None` keeps kube's
/// defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    /// Establishing the connection.
    pub connect: Option<Duration>,
    /// Waiting for a response.
    pub read: Option<Duration>,
}

/// Reads the kubeconfig `path` names: the file, if it is one (even when its
/// name holds a ':'), else a list separated by ':', as `KUBECONFIG` allows,
/// merged in order (the first file wins on a conflict, as in kubectl); or
/// the default one (`KUBECONFIG`, then `~/.kube/config`) if `path` is
/// `None`.
///
/// # Errors
///
/// A file is unreadable or not a kubeconfig, or the list names no file.
pub fn read_kubeconfig(path: Option<&Path>) -> Result<Kubeconfig, ClientError> {
    let Some(path) = path else {
        return Kubeconfig::read().map_err(|e| ClientError::Read {
            path: "(KUBECONFIG or ~/.kube/config)".into(),
            message: e.to_string(),
        });
    };
    // A file is one kubeconfig, whatever its name holds: a path with a ':'
    // (the e2e tests name them after service accounts) is not a list.
    if path.is_file() {
        return Kubeconfig::read_from(path).map_err(|e| ClientError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        });
    }
    let mut merged: Option<Kubeconfig> = None;
    for p in std::env::split_paths(path.as_os_str()) {
        if p.as_os_str().is_empty() {
            continue;
        }
        let read_error = |e: &dyn std::fmt::Display| ClientError::Read {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        let kc = Kubeconfig::read_from(&p).map_err(|e| read_error(&e))?;
        merged = Some(match merged {
            None => kc,
            Some(m) => m.merge(kc).map_err(|e| read_error(&e))?,
        });
    }
    merged.ok_or_else(|| ClientError::NoFile(path.display().to_string()))
}

/// A client for `context` of `kubeconfig` (its `current-context` if
/// `None`), with `timeouts`.
///
/// # Errors
///
/// No such context, credentials that cannot be loaded, or a configuration
/// the client cannot use.
pub async fn for_context(
    kubeconfig: &Kubeconfig,
    context: Option<&str>,
    timeouts: Timeouts,
) -> Result<kube::Client, ClientError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &options)
        .await
        .map_err(|e| ClientError::Context {
            context: context.unwrap_or("(current-context)").to_owned(),
            message: e.to_string(),
        })?;
    if timeouts.connect.is_some() {
        config.connect_timeout = timeouts.connect;
    }
    if timeouts.read.is_some() {
        config.read_timeout = timeouts.read;
    }
    kube::Client::try_from(config).map_err(|e| ClientError::Build(e.to_string()))
}

/// The client of a server binary: the current context of the kubeconfig
/// `kubeconfig` names if it is given, else the pod's service account, else
/// the default kubeconfig.
///
/// # Errors
///
/// As [`read_kubeconfig`] and [`for_context`]; or, without `kubeconfig`,
/// neither a service account nor a default kubeconfig.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    match kubeconfig {
        Some(path) => {
            let kc = read_kubeconfig(Some(path))?;
            for_context(&kc, None, Timeouts::default()).await
        }
        None => {
            let config = kube::Config::infer()
                .await
                .map_err(|e| ClientError::Infer(e.to_string()))?;
            kube::Client::try_from(config).map_err(|e| ClientError::Build(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\ncurrent-context: a\nclusters:\n- name: a\n  cluster: {server: 'https://127.0.0.1:1'}\ncontexts:\n- name: a\n  context: {cluster: a, user: a}\nusers:\n- name: a\n  user: {token: t}\n";

    #[test]
    fn a_list_of_files_is_merged_and_an_empty_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, KUBECONFIG).unwrap();
        let b = dir.path().join("b");
        std::fs::write(
            &b,
            KUBECONFIG
                .replace("name: a", "name: b")
                .replace(": a,", ": b,"),
        )
        .unwrap();
        let list = std::env::join_paths([&a, &b]).unwrap();
        let kc = read_kubeconfig(Some(Path::new(&list))).unwrap();
        let names: Vec<_> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);

        // A file whose name holds ':' is that file, not a list of two.
        let colon = dir.path().join("system:serviceaccounts:ems");
        std::fs::write(&colon, KUBECONFIG).unwrap();
        let kc = read_kubeconfig(Some(&colon)).unwrap();
        assert_eq!(kc.contexts.len(), 1);

        let err = read_kubeconfig(Some(Path::new(":"))).err();
        assert!(matches!(err, Some(ClientError::NoFile(_))), "{err:?}");
        let missing = dir.path().join("missing");
        let err = read_kubeconfig(Some(&missing)).err();
        assert!(
            matches!(&err, Some(ClientError::Read { path, .. }) if path.ends_with("missing")),
            "{err:?}"
        );
    }
}
