//! The informational keys of the state record (the HA view, the last
//! transition), written from a task beside the HA loop.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_core::state::Part;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::BESIDE_RETRY;
use crate::state_store::StateStore;

/// Writes the informational keys of the state record (the HA view, the
/// last transition) from a task beside the HA loop, newest value per key,
/// so that a slow API server never holds up a step. Writes are at least
/// `spacing` apart: each one changes the record's `resourceVersion`, and a
/// `Persist` of the loop that read the record before it must read and write
/// again, so writing the view at every step would slow the writes that
/// matter.
pub(super) struct KeyWriter {
    tx: watch::Sender<BTreeMap<&'static str, String>>,
}

impl KeyWriter {
    /// Starts the writer task; it ends when the `KeyWriter` is dropped.
    pub(super) fn start(store: StateStore, timeout: Duration, spacing: Duration) -> Self {
        let (tx, mut rx) = watch::channel(BTreeMap::<&'static str, String>::new());
        tokio::spawn(async move {
            let mut written: BTreeMap<&'static str, String> = BTreeMap::new();
            let mut last_write: Option<Instant> = None;
            loop {
                if let Some(at) = last_write {
                    tokio::time::sleep_until(at + spacing).await;
                }
                let wanted = rx.borrow_and_update().clone();
                let todo: Vec<(&'static str, String)> = wanted
                    .into_iter()
                    .filter(|(k, v)| written.get(k) != Some(v))
                    .collect();
                if !todo.is_empty() {
                    last_write = Some(Instant::now());
                    let write = tokio::time::timeout(
                        timeout,
                        store.update(|data| {
                            for (k, v) in &todo {
                                data.insert((*k).to_owned(), v.clone());
                            }
                        }),
                    )
                    .await;
                    match write {
                        Ok(Ok(_)) => written.extend(todo),
                        Ok(Err(e)) => {
                            warn!(error = %e, "could not write the HA view to the state ConfigMap");
                            tokio::time::sleep(BESIDE_RETRY).await;
                            continue;
                        }
                        Err(_) => {
                            warn!(
                                timeout_ms = timeout.as_millis(),
                                "writing the HA view to the state ConfigMap timed out"
                            );
                            tokio::time::sleep(BESIDE_RETRY).await;
                            continue;
                        }
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Self { tx }
    }

    /// Wants `part` stored (replacing any value of its key not yet written).
    pub(super) fn write<P: Part>(&self, part: &P) {
        let value = part.encode();
        self.tx.send_modify(|m| {
            m.insert(P::KEY, value);
        });
    }
}
