//! Reads and writes the `counterweight-state` ConfigMap.
//!
//! Every write is a compare-and-swap on `resourceVersion`: the caller's
//! change is applied to what is stored *now*, and on a conflict the object is
//! read again and the change re-decided, never written over blindly. A
//! missing or unreadable record is recreated as standby, epoch 0: recreating
//! a cluster as active could create a second active.
//!
//! A store remembers the object its last write returned (shared by its
//! clones) and applies the next change to that instead of reading first:
//! the HA loop's `Persist` is on the handover's critical path, and a read
//! before every write doubled its round trips. The compare-and-swap keeps
//! that safe: if anyone wrote since, the API server refuses the write with a
//! conflict, and the store reads and decides again. A change that makes no
//! difference to the remembered object is checked against a fresh read, so
//! a stale memory never skips a write that is needed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    /// The object as the last successful write returned it, for the next
    /// write's compare-and-swap (see the module documentation).
    last_written: Arc<Mutex<Option<ConfigMap>>>,
}

impl StateStore {
    /// A store for `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            last_written: Arc::default(),
        }
    }

    /// The object the last write returned, if any (taken: a write that
    /// fails must not leave it behind).
    fn take_remembered(&self) -> Option<ConfigMap> {
        self.last_written.lock().ok().and_then(|mut m| m.take())
    }

    fn remember(&self, written: &ConfigMap) {
        if let Ok(mut m) = self.last_written.lock() {
            *m = Some(written.clone());
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
        let mut remembered = self.take_remembered();
        for _ in 0..MAX_CONFLICTS {
            let from_memory = remembered.is_some();
            let current = match remembered.take() {
                Some(cm) => Some(cm),
                None => self.get().await?,
            };
            let Some(current) = current else {
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
                    Ok(created) => {
                        self.remember(&created);
                        return Ok((created, Written::Created));
                    }
                    // Someone else created it first: decide again on theirs.
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(self.err("creating", e)),
                }
            };
            let before = current.data.clone().unwrap_or_default();
            let mut data = before.clone();
            change(&mut data);
            if data == before {
                if from_memory {
                    // Nothing to do by the memory; what is stored may
                    // differ. Decide on a fresh read.
                    continue;
                }
                self.remember(&current);
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
                Ok(written) => {
                    self.remember(&written);
                    return Ok((written, Written::Updated));
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                // Deleted since the remembered write: read, and recreate.
                Err(kube::Error::Api(s)) if s.code == 404 && from_memory => continue,
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
