//! The [`Serving`] contract between the HA loop and the workload: what a
//! step's `SetServing` action calls, with its typed error, and the small
//! implementations that wrap or stand in for [`PodServing`]: the one that
//! keeps the health loop's stance current, and the flag-only one used
//! without pod effects. The serving lease wraps it too
//! (`crate::serving_lease::LeasedServing`).

use super::*;
use crate::state_store::StoreError;

/// Why `set_serving` could not confirm what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum SetServingError {
    /// The service pods could not all be brought to the stance.
    #[error("service pods: {0}")]
    Pods(#[from] ServingError),
    /// The state ConfigMap could not be written.
    #[error("the state ConfigMap: {0}")]
    Store(#[from] StoreError),
}

/// Whatever makes service pods serve or stop. `set_serving(false)` must
/// return only once nothing serves any more (the fence).
pub trait Serving: Send + Sync + 'static {
    /// Makes this cluster's service pods serve, or stop serving.
    /// `epoch` is the node's epoch: the one the cluster serves in when
    /// `serving`, so that pods released in another are restarted.
    fn set_serving(
        &self,
        serving: bool,
        epoch: u64,
    ) -> impl std::future::Future<Output = Result<(), SetServingError>> + Send;
}

/// A [`Serving`] that also keeps the health loop's [`ServingStance`]
/// current, so health is judged by what the pods are meant to do.
///
/// [`ServingStance`]: crate::health::ServingStance
pub struct StanceNoting<S> {
    inner: Arc<S>,
    stance: Arc<crate::health::ServingStance>,
}

impl<S: Serving> StanceNoting<S> {
    /// Wraps `inner`, noting each switch in `stance` first.
    pub fn new(inner: Arc<S>, stance: Arc<crate::health::ServingStance>) -> Self {
        Self { inner, stance }
    }
}

impl<S: Serving> Serving for StanceNoting<S> {
    async fn set_serving(&self, serving: bool, epoch: u64) -> Result<(), SetServingError> {
        self.stance.set(serving);
        self.inner.set_serving(serving, epoch).await
    }
}

/// Serving recorded in the state ConfigMap (key `serving`): the minimal
/// effect, until pod-level effects take over.
pub struct ConfigMapServing {
    store: StateStore,
}

impl ConfigMapServing {
    /// Serving flag stored through `store`.
    pub fn new(store: StateStore) -> Self {
        Self { store }
    }
}

impl Serving for ConfigMapServing {
    async fn set_serving(&self, serving: bool, _epoch: u64) -> Result<(), SetServingError> {
        write_flag(&self.store, serving)
            .await
            .map_err(SetServingError::from)
    }
}
