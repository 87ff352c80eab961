//! Publishes the serving lease, the workload's dead-man switch, and fences
//! through it (see `counterweight_core::serving` for the contract and the
//! timing argument).
//!
//! The HA loop hands every step's lease end to [`LeasePublisher::offer`]
//! without waiting: a task beside the loop writes the ConfigMap
//! `counterweight-serving` when the core says a write is due, each write
//! bounded by a timeout. A hung or failed write therefore never holds up the
//! loop's renewals, and costs at most the freshness of the published end
//! (older is earlier, hence safe).
//!
//! [`LeasedServing`] wraps the pod-level [`Serving`] so that stopping is a
//! fence that holds whatever the API server does: the lease is withdrawn and
//! the pods' conditions turned False side by side, and the fence is in place
//! when both are confirmed, or when every lease end that may have reached a
//! pod has passed (plus the clock-skew bound), whichever comes first.
//! Starting to serve is only noted and carried out beside the loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use counterweight_core::clock::unix_ms;

use counterweight_core::serving::{SERVING_CONFIGMAP, ServingLease, publish_due, publish_until};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ha_loop::BESIDE_RETRY;
use crate::serving::{Serving, SetServingError};

/// Timings of the publisher, from the HA configuration.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimings {
    /// `leaseMs`: renewals are written a quarter of it apart.
    pub lease_ms: u64,
    /// `maxClockSkewMs`: taken off every published end, and waited out
    /// after the last one before a fence counts as in place.
    pub max_skew_ms: u64,
    /// Longest wait for one write ([`crate::ha_loop::beside_timeout`]).
    pub write_timeout: Duration,
}

/// A lease with the sequence number of the request that wanted it.
type Wanted = Option<(u64, ServingLease)>;

struct Inner {
    // The newest lease the HA loop wants published, numbered.
    wanted: watch::Sender<Wanted>,
    // The latest end (Unix ms) any write may have carried to the API
    // server, including writes whose answer never came: until it has passed
    // (plus the skew), a pod may serve.
    max_sent_until: Mutex<u64>,
    // After each confirmed write: the sequence number written. Writes are
    // sequential, so every request numbered up to it has been superseded
    // in the store.
    written: watch::Sender<u64>,
    timings: LeaseTimings,
}

/// The serving lease publisher of one cluster. Cheap to clone.
#[derive(Clone)]
pub struct LeasePublisher {
    inner: Arc<Inner>,
    cluster: String,
}

impl LeasePublisher {
    /// Starts the writer task for `cluster`'s lease in `namespace`. It stops
    /// when every handle is dropped.
    ///
    /// A predecessor (a crashed controller, another replica) may have
    /// published a lease that still runs, and none can reach further than a
    /// lease from now: until a withdrawal is confirmed, the fence counts
    /// with that.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        cluster: &str,
        timings: LeaseTimings,
    ) -> Self {
        let (wanted, rx) = watch::channel(None);
        let (written, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            wanted,
            max_sent_until: Mutex::new(unix_ms().saturating_add(timings.lease_ms)),
            written,
            timings,
        });
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        tokio::spawn(write_loop(api, Arc::downgrade(&inner), rx));
        Self {
            inner,
            cluster: cluster.to_owned(),
        }
    }

    /// Offers the node's serving lease end after a step: `until_ms` on the
    /// loop's monotonic clock read as `now_ms` (`None`: not serving).
    /// Returns at once.
    pub fn offer(&self, epoch: u64, until_ms: Option<u64>, now_ms: u64) {
        let until_unix_ms = until_ms.map_or(0, |u| {
            publish_until(u, now_ms, unix_ms(), self.inner.timings.max_skew_ms)
        });
        let lease = ServingLease {
            cluster: self.cluster.clone(),
            epoch,
            until_unix_ms,
        };
        self.want(lease);
    }

    /// Makes `lease` the wanted one; returns its sequence number.
    fn want(&self, lease: ServingLease) -> u64 {
        let mut seq = 0;
        self.inner.wanted.send_if_modified(|w| {
            let last = w.as_ref().map_or(0, |(n, _)| *n);
            if w.as_ref().is_some_and(|(_, l)| *l == lease) {
                seq = last;
                return false;
            }
            seq = last + 1;
            *w = Some((seq, lease));
            true
        });
        seq
    }

    /// Withdraws the lease and waits until the withdrawal (or anything
    /// wanted after it) is confirmed written.
    async fn withdraw(&self) {
        let mut written = self.inner.written.subscribe();
        let epoch = self
            .inner
            .wanted
            .borrow()
            .as_ref()
            .map_or(0, |(_, l)| l.epoch);
        let seq = self.want(ServingLease::withdrawn(&self.cluster, epoch));
        let _ = written.wait_for(|n| *n >= seq).await;
    }

    /// The wall-clock instant (Unix ms) after which no pod of this cluster
    /// can serve under any lease this controller ever sent.
    pub fn lapse_unix_ms(&self) -> u64 {
        let sent = self
            .inner
            .max_sent_until
            .lock()
            .map(|g| *g)
            .unwrap_or(u64::MAX);
        if sent == 0 {
            0
        } else {
            sent.saturating_add(self.inner.timings.max_skew_ms)
        }
    }
}

async fn write_loop(
    api: Api<ConfigMap>,
    inner: std::sync::Weak<Inner>,
    mut wanted: watch::Receiver<Wanted>,
) {
    let mut published: Option<ServingLease> = None;
    loop {
        let next = wanted.borrow_and_update().clone();
        if let Some((seq, next)) = next {
            let Some(inner) = inner.upgrade() else { return };
            // A withdrawal is always written, even over a stored one: its
            // caller waits for the confirmation.
            let due = next.until_unix_ms == 0
                || publish_due(published.as_ref(), &next, inner.timings.lease_ms);
            if due {
                if let Ok(mut m) = inner.max_sent_until.lock() {
                    *m = (*m).max(next.until_unix_ms);
                }
                let timeout = inner.timings.write_timeout;
                match tokio::time::timeout(timeout, write(&api, &next)).await {
                    Ok(Ok(())) => {
                        if published.as_ref().map(|p| p.until_unix_ms) != Some(next.until_unix_ms)
                            && next.until_unix_ms == 0
                        {
                            info!(epoch = next.epoch, "serving lease withdrawn");
                        }
                        published = Some(next);
                        inner.written.send_replace(seq);
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "could not publish the serving lease; the pods keep the last one, which runs out on its own");
                        // Try again soon, even if nothing new is wanted.
                        drop(inner);
                        tokio::time::sleep(BESIDE_RETRY).await;
                        continue;
                    }
                    Err(_) => {
                        warn!(
                            timeout_ms = timeout.as_millis(),
                            "publishing the serving lease timed out; the pods keep the last one, which runs out on its own"
                        );
                        drop(inner);
                        tokio::time::sleep(BESIDE_RETRY).await;
                        continue;
                    }
                }
            }
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

/// Writes `lease` over whatever is stored: the controller is the only
/// writer, so there is nothing to merge with.
async fn write(api: &Api<ConfigMap>, lease: &ServingLease) -> Result<(), kube::Error> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(SERVING_CONFIGMAP.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "counterweight-controller".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(lease.to_data()),
        ..Default::default()
    };
    match api
        .replace(SERVING_CONFIGMAP, &PostParams::default(), &cm)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            api.create(&PostParams::default(), &cm).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

/// A [`Serving`] whose stop is a fence through the serving lease as well as
/// through the pods (see the module documentation).
pub struct LeasedServing<S> {
    inner: Arc<S>,
    lease: LeasePublisher,
}

impl<S: Serving> LeasedServing<S> {
    /// Wraps `inner`, fencing through `lease` as well.
    pub fn new(inner: Arc<S>, lease: LeasePublisher) -> Self {
        Self { inner, lease }
    }
}

impl<S: Serving> Serving for LeasedServing<S> {
    async fn set_serving(&self, serving: bool, epoch: u64) -> Result<(), SetServingError> {
        if serving {
            return self.inner.set_serving(true, epoch).await;
        }
        let lapse = self.lease.lapse_unix_ms();
        let confirmed = async {
            let (_, pods) =
                tokio::join!(self.lease.withdraw(), self.inner.set_serving(false, epoch));
            pods
        };
        let wait_ms = lapse.saturating_sub(unix_ms());
        tokio::select! {
            result = confirmed => match result {
                Ok(()) => Ok(()),
                Err(e) => {
                    // Not confirmed: the lease is the fence. Wait it out.
                    let left = self.lease.lapse_unix_ms().saturating_sub(unix_ms());
                    warn!(error = %e, wait_ms = left, "fence not confirmed through the pods; waiting for the serving lease to run out");
                    tokio::time::sleep(Duration::from_millis(left)).await;
                    Ok(())
                }
            },
            () = tokio::time::sleep(Duration::from_millis(wait_ms)) => {
                warn!(
                    waited_ms = wait_ms,
                    "fence not confirmed in time; every serving lease sent has run out, so no pod serves"
                );
                Ok(())
            }
        }
    }
}
