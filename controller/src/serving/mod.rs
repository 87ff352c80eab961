//! Workload effects of the HA state: which service pods serve (FIG. 3, 6).
//!
//! [`PodServing`] is the [`Serving`] implementation that acts on pods. A
//! *service pod* is a pod in a namespace labelled
//! `counterweight.dev/inject=enabled`, whose role label is `service` or
//! absent, and which carries the `counterweight.dev/serving` readiness gate
//! (the webhook injected it). Synchronization pods (roles `ha`, `database`,
//! `file-replication`) and pods of unknown roles are never touched.
//!
//! - **Active** (`set_serving(true)`): the condition `counterweight.dev/serving`
//!   turns True on every Running service pod, so the kubelet marks it Ready and
//!   it joins its Service's endpoints. A background loop over a pod watcher
//!   keeps doing so for new pods while the desired state stays active.
//! - **Standby / demotion** (`set_serving(false)`): the condition turns False
//!   on every service pod at once (bounded concurrency). This is the fence:
//!   the call returns only when no service pod still has the condition True.
//!   The pods that *were* serving are then restarted in the background with
//!   the Eviction API (which respects PodDisruptionBudgets; 429s are retried
//!   with backoff), falling back to a plain delete after
//!   [`PodServingConfig::delete_after`], so they come back blocked at the gate.
//!
//! The only memory of "this pod was serving and still needs a restart" is on
//! the pod itself: the fence writes the condition False with reason
//! [`STOPPED_REASON`], while pods that never served get
//! [`STANDBY_REASON`](counterweight_core::workload::STANDBY_REASON).
//! A controller restarted mid-demotion therefore finds the unfinished
//! restarts on the pods and finishes them; a finished restart leaves a new
//! pod without the condition, so nothing is restarted twice. All decisions
//! are made by pure functions: which pods and what each needs are
//! `counterweight_core::workload`'s ([`is_service_pod`], [`decide`]), how to
//! treat an eviction's answer is [`evict_step`] and [`backoff`] here; the
//! rest only reads the cluster and carries them out.
//!
//! ## Disruption budgets
//!
//! After the fence every service pod is NotReady (its readiness gate is
//! False). A PodDisruptionBudget with the default `unhealthyPodEvictionPolicy`
//! (`IfHealthyBudget`) then refuses every eviction, since the application is
//! already below its budget, and the restart falls back to a delete after
//! [`PodServingConfig::delete_after`]. Budgets that should let demotions go
//! through at once set `unhealthyPodEvictionPolicy: AlwaysAllow`. A refused
//! eviction rarely surfaces as a 429 here: kube's default client retries
//! 429s itself, honouring the server's `Retry-After`, so each eviction call
//! is bounded by a timeout and counted as refused when it runs out.
//!
//! The `serving` key of the state ConfigMap is kept as before, for `cwctl`,
//! written beside the effects by one writer.
//!
//! ## Where things are
//!
//! The rules (which pods, what each needs) are `counterweight_core::workload`'s.
//! Here: `effect.rs` is the [`Serving`] contract with the HA loop and its
//! typed error; this file the [`PodServing`] facade (promotion, demotion,
//! the flag); `fence.rs` the fence; `restart.rs` the restarts (eviction,
//! backoff, the delete fallback, escaped pods); `reconcile.rs` the loop that
//! keeps pods in line with the desired state; `pods.rs` the pod LIST and
//! the condition patches. The submodules share this file's imports.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use counterweight_core::state::{Part, ServingFlag};
use counterweight_core::workload::{
    ACTIVE_REASON, PodAction, STOPPED_REASON, ServingState, condition_patch, decide,
    has_serving_gate, is_service_pod, opted_in, opted_in_selector, service_pod_selector,
    serving_state,
};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::events::EventSink;
use crate::state_store::{StateStore, StoreError};

mod effect;
mod fence;
mod pods;
mod reconcile;
mod restart;

pub use effect::{ConfigMapServing, Serving, SetServingError, StanceNoting};
pub use pods::PodRef;
pub use reconcile::{CONDITION_MEMO, ConditionMemo};
pub use restart::{
    ESCAPE_RETRY, EscapeMemo, EscapeVerdict, EvictStep, RestartReport, backoff, evict_step,
};

use fence::*;
use pods::*;
use reconcile::*;
use restart::*;

/// Field manager name on the status patches.
const FIELD_MANAGER: &str = "counterweight-controller";

/// Tunables of [`PodServing`].
#[derive(Debug, Clone)]
pub struct PodServingConfig {
    /// Pods patched or evicted at the same time.
    pub concurrency: usize,
    /// How long eviction is tried (e.g. while a PodDisruptionBudget refuses
    /// it) before the pod is deleted outright.
    pub delete_after: Duration,
    /// First retry delay of a refused eviction; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay of a refused eviction.
    pub backoff_max: Duration,
    /// Full reconciliation interval, besides the watch events.
    pub resync: Duration,
    /// Wait between the fence and the first eviction. The pods are already
    /// fenced (not Ready) meanwhile; if the cluster turns active again within
    /// it (e.g. the HA loop's `set_serving(false)` at boot, followed by the
    /// lease being regained), they serve again without a restart. Zero
    /// restarts at once.
    pub restart_delay: Duration,
}

/// Default of [`PodServingConfig::concurrency`] (`--pod-concurrency`).
/// Past 32 the API server's status writes a second bound the fence and the
/// promotion, not the controller (README, the `serving_scale` bench).
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// Default of [`PodServingConfig::delete_after`] (`--force-delete-after`).
pub const DEFAULT_DELETE_AFTER: Duration = Duration::from_secs(30);

impl Default for PodServingConfig {
    fn default() -> Self {
        Self {
            concurrency: usize::from(DEFAULT_CONCURRENCY),
            delete_after: DEFAULT_DELETE_AFTER,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            resync: Duration::from_secs(10),
            restart_delay: Duration::ZERO,
        }
    }
}

/// Errors of [`PodServing`].
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Listing pods or namespaces failed.
    #[error("listing {what}: {source}")]
    List {
        /// What was listed.
        what: &'static str,
        /// The client error (boxed: it is large).
        #[source]
        source: Box<kube::Error>,
    },
    /// Some service pods still had the condition True after every attempt:
    /// the fence is not in place.
    #[error("{0} service pod(s) still serving after repeated attempts to stop them: {1}")]
    FenceIncomplete(usize, String),
}

/// What a demotion did by the time the fence was in place.
#[derive(Debug)]
pub struct Demotion {
    /// Service pods whose condition this call turned from True to False (the
    /// watch loop, told the new state too, may have stopped some first; they
    /// are counted in `restarting` all the same).
    pub stopped: usize,
    /// Service pods that got the condition False without having served.
    pub standby: usize,
    /// Time from the call until no service pod served.
    pub fence_took: Duration,
    /// Service pods stopped from the pod watch's cache, beside the quorum
    /// LIST (see the `fence` module).
    pub from_cache: usize,
    /// How long the fence's quorum LIST of namespaces and pods took; it
    /// runs beside the stops of the pods the cache shows serving.
    pub read_took: Duration,
    /// Pods handed to the background restart (stopped now or by an earlier,
    /// unfinished demotion).
    pub restarting: usize,
    /// Resolves with the restart report once every restart of this demotion
    /// finished; `None` if there was nothing to restart.
    pub restarts: Option<oneshot::Receiver<RestartReport>>,
}

struct Shared {
    client: kube::Client,
    events: Option<EventSink>,
    config: PodServingConfig,
    /// `None` until the HA loop first says; nothing is touched before.
    desired: watch::Sender<Option<bool>>,
    /// The epoch the cluster serves in while `desired` is `Some(true)`
    /// (0: not known): pods released in another one are restarted.
    epoch: std::sync::atomic::AtomicU64,
    /// Held while condition patches are being sent, so a fence never runs
    /// beside a pass that could still set a condition True.
    effects: tokio::sync::Mutex<()>,
    /// Uids being restarted by a running batch.
    restarting: Mutex<HashSet<String>>,
    /// Pods whose condition this controller set moments ago (see
    /// [`ConditionMemo`]).
    memo: Mutex<ConditionMemo>,
    /// Restarts of pods that escaped their gate (see [`EscapeMemo`]).
    escapes: Mutex<EscapeMemo>,
    /// The effect to record in the state record's `serving` flag, written
    /// by [`flag_writer`] beside the effects.
    flag: watch::Sender<Option<bool>>,
    /// The pod watch's cache (service pods by label; filled by the
    /// reconcile loop's watcher). It lags the API server: the fence starts
    /// from it, but never ends on it.
    pods: reflector::Store<Pod>,
    /// The opted-in namespaces' watch cache, beside `pods`.
    nss: reflector::Store<Namespace>,
}

/// The pod-level [`Serving`]: see the module documentation.
///
/// Dropping it stops its watcher and every background restart, as a crash
/// would; a new one finishes the unfinished restarts.
pub struct PodServing {
    shared: Arc<Shared>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl PodServing {
    /// Starts the pod watcher and the reconcile loop. The desired state is
    /// unknown until the first [`Serving::set_serving`] (the HA loop always
    /// sends `false` at boot), and nothing is touched before it.
    pub fn start(
        client: kube::Client,
        store: StateStore,
        events: Option<EventSink>,
        config: PodServingConfig,
    ) -> Self {
        let (desired, _) = watch::channel(None);
        let (flag, flag_rx) = watch::channel(None);
        let flags = flag_writer(store, flag_rx);
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (nss, nss_writer) = reflector::store::<Namespace>();
        let shared = Arc::new(Shared {
            client,
            events,
            config,
            desired,
            epoch: std::sync::atomic::AtomicU64::new(0),
            effects: tokio::sync::Mutex::new(()),
            restarting: Mutex::new(HashSet::new()),
            memo: Mutex::new(ConditionMemo::default()),
            escapes: Mutex::new(EscapeMemo::default()),
            flag,
            pods,
            nss,
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let weak = Arc::downgrade(&tasks);
        if let Ok(mut set) = tasks.lock() {
            set.spawn(reconcile_loop(
                shared.clone(),
                weak,
                pods_writer,
                nss_writer,
            ));
            set.spawn(flags);
        }
        Self { shared, tasks }
    }

    /// Makes service pods serve: sets the condition True on every Running
    /// service pod, then has `serving=true` recorded. The loop keeps doing
    /// so for new pods while active.
    pub async fn activate(&self) -> Result<usize, ServingError> {
        self.shared.desired.send_replace(Some(true));
        activate_pods(&self.shared, &self.tasks).await
    }

    /// Like [`PodServing::activate`], but returns at once: the desired state
    /// is set now (so a later fence supersedes it), and the pods are made to
    /// serve by a task. This is what the HA loop uses, so that a promotion
    /// never holds up its lease renewals while thousands of pods are patched.
    pub fn activate_in_background(&self) {
        self.shared.desired.send_replace(Some(true));
        let (shared, tasks) = (self.shared.clone(), self.tasks.clone());
        if let Ok(mut set) = self.tasks.lock() {
            set.spawn(async move {
                if let Err(e) = activate_pods(&shared, &tasks).await {
                    warn!(error = %e, "could not make every service pod serve; the reconcile loop retries");
                }
            });
        }
    }

    /// Stops every service pod from serving and returns once none does (the
    /// fence), then restarts the pods that were serving in the background.
    pub async fn demote(&self) -> Result<Demotion, ServingError> {
        let started = Instant::now();
        self.shared.desired.send_replace(Some(false));
        let Fenced {
            effects,
            stopped,
            standby,
            restart: to_restart,
            from_cache,
            read_took,
        } = match fence(&self.shared).await {
            Ok(done) => done,
            Err(e) => {
                record(
                    &self.shared,
                    EventType::Warning,
                    "FenceIncomplete",
                    "Demote",
                    &format!("could not stop every service pod from serving: {e}"),
                );
                return Err(e);
            }
        };
        let fence_took = started.elapsed();
        let (restarting, restarts) = spawn_restarts(&self.shared, &self.tasks, to_restart);
        drop(effects);
        // Informational (for cwctl): written beside, so that the fence, and
        // with it the handover's `change`, never waits for it.
        self.shared.flag.send_replace(Some(false));
        info!(
            stopped,
            standby,
            fence_ms = fence_took.as_millis(),
            from_cache,
            read_ms = read_took.as_millis(),
            "fence in place: no service pod serves"
        );
        if stopped > 0 {
            record(
                &self.shared,
                EventType::Normal,
                "ServingStopped",
                "Demote",
                &format!(
                    "{stopped} service pod(s) stopped serving in {} ms; restarting them",
                    fence_took.as_millis()
                ),
            );
        }
        Ok(Demotion {
            stopped,
            standby,
            fence_took,
            from_cache,
            read_took,
            restarting,
            restarts,
        })
    }
}

impl Drop for PodServing {
    fn drop(&mut self) {
        // Abort the loop and the restarts now rather than when the last Arc
        // goes: a dropped PodServing must act like a crashed controller.
        if let Ok(mut set) = self.tasks.lock() {
            set.abort_all();
        }
    }
}

/// Sets the condition True on every Running service pod (while the desired
/// state stays active), then has `serving=true` recorded.
async fn activate_pods(
    shared: &Arc<Shared>,
    tasks: &Arc<Mutex<JoinSet<()>>>,
) -> Result<usize, ServingError> {
    let started = Instant::now();
    if *shared.desired.borrow() != Some(true) {
        // A fence came first: nothing to do.
        return Ok(0);
    }
    let pods: Vec<Arc<Pod>> = list_service_pods(&shared.client)
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let served = pass(shared, || pods, tasks).await;
    if *shared.desired.borrow() == Some(true) {
        shared.flag.send_replace(Some(true));
    }
    info!(
        served,
        took_ms = started.elapsed().as_millis(),
        "service pods set serving"
    );
    Ok(served)
}

impl PodServing {
    /// Sets the epoch the cluster serves in, before it is made active.
    pub fn set_epoch(&self, epoch: u64) {
        self.shared
            .epoch
            .store(epoch, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Serving for PodServing {
    async fn set_serving(&self, serving: bool, epoch: u64) -> Result<(), SetServingError> {
        self.set_epoch(epoch);
        if serving {
            self.activate_in_background();
            Ok(())
        } else {
            self.demote().await.map(drop).map_err(SetServingError::from)
        }
    }
}

async fn write_flag(store: &StateStore, serving: bool) -> Result<(), StoreError> {
    store
        .update(|data| ServingFlag(serving).write_to(data))
        .await
        .map(drop)
}

/// Writes the `serving` flag of the state record whenever the effect
/// applied changes, newest value first: it is informational (`cwctl`
/// shows it), so neither a fence nor a promotion waits for the write, and
/// a write that fails is retried with backoff until it lands or a newer
/// value replaces it.
async fn flag_writer(store: StateStore, mut rx: watch::Receiver<Option<bool>>) {
    const RETRY_MIN: Duration = Duration::from_millis(100);
    const RETRY_MAX: Duration = Duration::from_secs(5);
    while rx.changed().await.is_ok() {
        let Some(serving) = *rx.borrow_and_update() else {
            continue;
        };
        let mut attempt: u32 = 0;
        while let Err(e) = write_flag(&store, serving).await {
            warn!(serving, error = %e, "could not record the serving flag; retrying");
            tokio::time::sleep(backoff(attempt, RETRY_MIN, RETRY_MAX)).await;
            attempt = attempt.saturating_add(1);
            if rx.has_changed().unwrap_or(true) {
                // A newer value (or the end): the outer loop takes it.
                break;
            }
        }
    }
}

fn record(shared: &Shared, type_: EventType, reason: &str, action: &str, note: &str) {
    if let Some(events) = &shared.events {
        // Each stop or restart batch of a handover is its own Event.
        events.record_transition(type_, reason, action, note);
    }
}
