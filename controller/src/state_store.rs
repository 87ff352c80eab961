//! Reads and writes the `counterweight-state` ConfigMap.
//!
//! Every write is a compare-and-swap on `resourceVersion`: the caller's
//! change is applied to what is stored *now*, and on a conflict the object is
//! read again and the change re-decided, never written over blindly. A
//! missing or unreadable record is recreated as standby, epoch 0: recreating
//! a cluster as active could create a second active.

use std::collections::BTreeMap;

use counterweight_core::state::{Role, RoleEpoch};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

/// Conflicts tolerated in one update before giving up until the next round.
const MAX_CONFLICTS: usize = 5;

/// Errors of state ConfigMap access.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The API server refused or failed a request.
    #[error("{action} ConfigMap {namespace}/{name}: {source}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The client error (boxed: it is large, and errors travel far).
        #[source]
        source: Box<kube::Error>,
    },
    /// Too many concurrent writers.
    #[error(
        "ConfigMap {namespace}/{name} changed under us {MAX_CONFLICTS} times in a row; will retry next round"
    )]
    Contended {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The closure changed nothing; no request was sent.
    Unchanged,
    /// The object was updated.
    Updated,
    /// The object did not exist and was created as standby.
    Created,
}

/// Handle on one cluster's state ConfigMap.
#[derive(Clone)]
pub struct StateStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl StateStore {
    /// A store for `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn err(&self, action: &'static str, source: kube::Error) -> StoreError {
        StoreError::Api {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// Reads the ConfigMap, if it exists.
    pub async fn get(&self) -> Result<Option<ConfigMap>, StoreError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err("reading", e))
    }

    /// Applies `change` to the stored data and writes it back with
    /// compare-and-swap, re-reading and re-applying on conflict. `change`
    /// must be a pure function of the data it is given. Returns the written
    /// object (or the unchanged one) and what happened.
    pub async fn update<F>(&self, mut change: F) -> Result<(ConfigMap, Written), StoreError>
    where
        F: FnMut(&mut BTreeMap<String, String>),
    {
        for _ in 0..MAX_CONFLICTS {
            let Some(current) = self.get().await? else {
                let mut data = BTreeMap::new();
                RoleEpoch {
                    role: Role::Standby,
                    epoch: 0,
                }
                .write_to(&mut data);
                change(&mut data);
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                match self.api.create(&PostParams::default(), &cm).await {
                    Ok(created) => return Ok((created, Written::Created)),
                    // Someone else created it first: decide again on theirs.
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(self.err("creating", e)),
                }
            };
            let before = current.data.clone().unwrap_or_default();
            let mut data = before.clone();
            change(&mut data);
            if data == before {
                return Ok((current, Written::Unchanged));
            }
            let mut next = current;
            next.data = Some(data);
            // resourceVersion stays set: the API server rejects the write
            // with 409 if anyone wrote in between.
            match self
                .api
                .replace(&self.name, &PostParams::default(), &next)
                .await
            {
                Ok(written) => return Ok((written, Written::Updated)),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.err("updating", e)),
            }
        }
        Err(StoreError::Contended {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        })
    }

    /// Watches the ConfigMap and reports its data: `Some` for each version
    /// seen, `None` once it is deleted. Watch errors are retried with
    /// backoff; the task ends when the receiver is dropped.
    pub fn watch(&self) -> watch::Receiver<Option<BTreeMap<String, String>>> {
        let (tx, rx) = watch::channel(None);
        let stream = watcher(
            self.api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.name)),
        )
        .default_backoff();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let seen = tokio::select! {
                    () = tx.closed() => return,
                    item = stream.next() => match item {
                        None => return,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "state ConfigMap watch failed; retrying");
                            continue;
                        }
                        Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                            Some(cm.data.unwrap_or_default())
                        }
                        Some(Ok(watcher::Event::Delete(_))) => None,
                        Some(Ok(_)) => continue,
                    },
                };
                tx.send_replace(seen);
            }
        });
        rx
    }
}
