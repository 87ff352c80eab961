//! The clusters `cwctl` talks to: one kubeconfig context each.
//!
//! A context whose client cannot even be built (missing credentials file,
//! bad server URL) becomes a [`Target`] with an error instead of failing the
//! whole command, so that one broken cluster never hides the others.
//! Timeouts are short: an operator looking at a failover needs the
//! reachable clusters now, not after a TCP timeout to the dead one.

use std::path::Path;
use std::time::Duration;

use counterweight_runtime::kube_client::{self, Timeouts};
use kube::config::Kubeconfig;

use crate::Error;

/// How long to wait for a TCP and TLS connection to an API server, at
/// most (a shorter `--request-timeout` shortens it too).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The default of `--request-timeout`: how long to wait for one cluster's
/// answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One cluster: its name (the context name) and a client, or why there is none.
#[derive(Clone)]
pub struct Target {
    /// Cluster name, the kubeconfig context.
    pub name: String,
    /// A client for it, or why it could not be configured.
    pub client: Result<kube::Client, String>,
    /// The longest a read of this cluster may take, connection included:
    /// past it the cluster is shown as unreachable.
    pub deadline: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("client", &self.client.as_ref().map(|_| "configured"))
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Reads the kubeconfig (`path`, a `:`-separated list, or the default
/// locations) and builds a client per selected context, in the order given,
/// or in kubeconfig order when `contexts` is empty. Each read of a cluster
/// is bounded by `deadline`.
pub async fn targets(
    path: Option<&Path>,
    contexts: &[String],
    deadline: Duration,
) -> Result<Vec<Target>, Error> {
    let kc = kube_client::read_kubeconfig(path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let available: Vec<String> = kc.contexts.iter().map(|c| c.name.clone()).collect();
    let selected: Vec<String> = if contexts.is_empty() {
        available.clone()
    } else {
        for c in contexts {
            if !available.contains(c) {
                return Err(Error::Kubeconfig(format!(
                    "no context {c:?}; the kubeconfig has {}",
                    available.join(", ")
                )));
            }
        }
        contexts.to_vec()
    };
    if selected.is_empty() {
        return Err(Error::Kubeconfig(
            "the kubeconfig has no contexts; add one context per cluster".to_owned(),
        ));
    }
    let mut out = Vec::with_capacity(selected.len());
    for name in selected {
        let client = client_for(&kc, &name, deadline).await;
        out.push(Target {
            name,
            client,
            deadline,
        });
    }
    Ok(out)
}

/// A client for `context` whose connection and reads are bounded by
/// `deadline` (the connection also by [`CONNECT_TIMEOUT`]); the message
/// says why there is none.
async fn client_for(
    kc: &Kubeconfig,
    context: &str,
    deadline: Duration,
) -> Result<kube::Client, String> {
    let timeouts = Timeouts {
        connect: Some(CONNECT_TIMEOUT.min(deadline)),
        read: Some(deadline),
    };
    kube_client::for_context(kc, Some(context), timeouts)
        .await
        .map_err(|e| e.to_string())
}
