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
//! The `serving` key of the state ConfigMap is kept as before, for `cwctl`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use counterweight_core::names;
use counterweight_core::state::{Part, ServingFlag};
use counterweight_core::workload::{
    ACTIVE_REASON, PodAction, STOPPED_REASON, ServingState, condition_patch, decide,
    has_serving_gate, is_service_pod, opted_in, service_pod_selector, serving_state,
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
use crate::ha_loop::Serving;
use crate::state_store::{StateStore, StoreError};

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

impl Default for PodServingConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            delete_after: Duration::from_secs(30),
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

/// What to do after an eviction answer with HTTP status `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictStep {
    /// The pod is gone or replaced: nothing more to do.
    Gone,
    /// Refused for now (429: a PodDisruptionBudget; others: transient); retry.
    Retry,
}

/// Classifies an eviction or delete error by HTTP status.
pub fn evict_step(code: u16) -> EvictStep {
    match code {
        // 404: already gone; 409: the uid precondition failed, i.e. the pod
        // we meant was replaced already.
        404 | 409 => EvictStep::Gone,
        _ => EvictStep::Retry,
    }
}

/// Delay before eviction retry number `attempt` (0-based): doubling from
/// `min`, capped at `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// A pod to restart: its coordinates and the incarnation meant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid of the incarnation that served.
    pub uid: String,
}

impl PodRef {
    fn of(pod: &Pod) -> Option<Self> {
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone()?,
        })
    }
}

/// How one pod's restart ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Evicted,
    Deleted,
    Gone,
    Cancelled,
}

/// The result of restarting the pods a demotion stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartReport {
    /// Pods the batch was asked to restart.
    pub pods: usize,
    /// Pods restarted through the Eviction API.
    pub evicted: usize,
    /// Pods deleted after eviction was refused for
    /// [`PodServingConfig::delete_after`].
    pub deleted: usize,
    /// Pods already gone or replaced by the time we got to them.
    pub gone: usize,
    /// Pods left alone because the cluster turned active again (or the pod
    /// serves again).
    pub cancelled: usize,
    /// Wall time of the whole batch.
    pub took: Duration,
}

impl RestartReport {
    /// Pods actually restarted (evicted or deleted).
    pub fn restarted(&self) -> usize {
        self.evicted + self.deleted
    }
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
    /// Pods this controller made serve moments ago (see [`ServeMemo`]).
    served: Mutex<ServeMemo>,
    /// Restarts of pods that escaped their gate (see [`EscapeMemo`]).
    escapes: Mutex<EscapeMemo>,
    /// The effect to record in the state record's `serving` flag, written
    /// by [`flag_writer`] beside the effects.
    flag: watch::Sender<Option<bool>>,
}

/// How long after restarting an [`escaped`] pod its owner's next escaped
/// pod is left alone: a replacement that came back without its gate says
/// a restart does not gate this owner's pods (no webhook registered, or
/// one configured to skip them), and restarting it again would only crash
/// the application in a loop.
pub const ESCAPE_RETRY: Duration = Duration::from_secs(600);

/// What to do with an [`escaped`] pod that [`decide`] would restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeVerdict {
    /// Restart it: its controller will make a gated replacement.
    Restart,
    /// Leave it serving, and warn (once per pod) for this reason.
    Leave(&'static str),
    /// Leave it; already warned about.
    LeaveQuietly,
}

/// The memory that keeps restarts of [`escaped`] pods from looping: for
/// each owner whose escaped pods were restarted, the newest creation time
/// among them and when; and which pods were warned about.
///
/// A pod of that owner created *later* and still without its gate is a
/// replacement that the webhook did not gate either, so it is left alone
/// (with a warning) for [`ESCAPE_RETRY`]. Pods as old as the ones restarted
/// are escapees of the same cause (all replicas made before the webhook)
/// and are restarted too; the same pod asked about again (the next pass,
/// while its eviction runs) gets the same answer.
#[derive(Debug, Default)]
pub struct EscapeMemo {
    owners: HashMap<String, (Option<Timestamp>, Instant)>,
    warned: HashMap<String, Instant>,
}

impl EscapeMemo {
    /// Decides for the escaped pod `uid`, created at `created`, whose
    /// controller is `owner` (its controller owner reference's uid), at
    /// `now`, and remembers it. A pod without a controller is left alone:
    /// evicting it deletes it for good.
    pub fn admit(
        &mut self,
        uid: &str,
        owner: Option<&str>,
        created: Option<Timestamp>,
        now: Instant,
    ) -> EscapeVerdict {
        self.owners
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < ESCAPE_RETRY);
        self.warned
            .retain(|_, t| now.saturating_duration_since(*t) < ESCAPE_RETRY);
        let reason = match owner {
            None => "no controller owns it, and a restart would delete it for good",
            Some(o) => match self.owners.get_mut(o) {
                Some((newest, _)) if created.is_some() && created > *newest => {
                    "a replacement of the same owner came back without its gate too: check that \
                     the webhook is registered and injects this pod (cwctl check)"
                }
                Some((newest, _)) => {
                    *newest = (*newest).max(created);
                    return EscapeVerdict::Restart;
                }
                None => {
                    self.owners.insert(o.to_owned(), (created, now));
                    return EscapeVerdict::Restart;
                }
            },
        };
        if self.warned.insert(uid.to_owned(), now).is_some() {
            EscapeVerdict::LeaveQuietly
        } else {
            EscapeVerdict::Leave(reason)
        }
    }
}

/// The uid of `pod`'s controller (the owner reference marked `controller`).
fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Whether `pod`, which [`decide`] would restart, is restarted: a gated
/// pod always; an [`escaped`] one if [`EscapeMemo::admit`] lets it, with a
/// Warning Event for a pod restarted or left serving. `escapes` is `None`
/// only if its lock was poisoned, and then every restart goes ahead.
fn admit_restart(
    shared: &Shared,
    escapes: Option<&mut EscapeMemo>,
    pod: &Pod,
    r: &PodRef,
    now: Instant,
) -> bool {
    let Some(memo) = escapes else {
        return true;
    };
    if has_serving_gate(pod) {
        return true;
    }
    let name = format!("{}/{}", r.namespace, r.name);
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    match memo.admit(&r.uid, controller_uid(pod), created, now) {
        EscapeVerdict::Restart => {
            warn!(pod = %name, "a pod without its init-gate runs on a standby; restarting it so that its replacement is gated");
            record(
                shared,
                EventType::Warning,
                "UngatedPodRestarted",
                "Restart",
                &format!(
                    "{name} ran without its init-gate on a standby (made before the webhook or before its namespace opted in); restarting it so that its replacement is gated"
                ),
            );
            true
        }
        EscapeVerdict::Leave(why) => {
            warn!(pod = %name, why, "a pod without its init-gate serves on a standby; not restarting it");
            record(
                shared,
                EventType::Warning,
                "UngatedPodServes",
                "Restart",
                &format!(
                    "{name} runs without its init-gate on a standby and is not restarted: {why}"
                ),
            );
            false
        }
        EscapeVerdict::LeaveQuietly => false,
    }
}

/// How long a successful serve patch stands for its pod in the reconcile
/// loop's eyes, while the pod watch catches up with it. A few seconds is
/// ample for a watch to deliver thousands of updates; past it the pod
/// cache decides again, so a hand edit of the condition is undone at the
/// latest this much later.
pub const SERVE_MEMO: Duration = Duration::from_secs(5);

/// The pods whose serving condition this controller set True in the last
/// [`SERVE_MEMO`], by uid.
///
/// Why: a promotion patches every service pod, and every patch comes back
/// through the pod watch. The reconcile loop's pass runs on that watch's
/// cache, which lags the patches by up to seconds under load, so without a
/// memory it patched most pods a second time (2,000 pods: 4,201 status
/// PATCHes instead of about 2,300 in `benches/serving_scale.rs`), each
/// a real write with a new `lastTransitionTime`, which doubled the time to
/// all-serving. Only serving is remembered: a stop is never skipped, and
/// the fence forgets everything, so a later promotion starts afresh.
#[derive(Debug, Default)]
pub struct ServeMemo {
    at: HashMap<String, Instant>,
}

impl ServeMemo {
    /// Whether the pod `uid` was made to serve less than [`SERVE_MEMO`]
    /// before `now`.
    pub fn fresh(&self, uid: &str, now: Instant) -> bool {
        self.at
            .get(uid)
            .is_some_and(|t| now.saturating_duration_since(*t) < SERVE_MEMO)
    }

    /// Notes that the pod `uid` was made to serve at `now`.
    pub fn record(&mut self, uid: &str, now: Instant) {
        self.at.insert(uid.to_owned(), now);
    }

    /// Forgets the pod `uid` (its condition was set False).
    pub fn forget(&mut self, uid: &str) {
        self.at.remove(uid);
    }

    /// Forgets every pod (a fence).
    pub fn clear(&mut self) {
        self.at.clear();
    }

    /// Drops the entries older than [`SERVE_MEMO`] at `now`, so that pods
    /// long gone do not accumulate.
    pub fn prune(&mut self, now: Instant) {
        self.at
            .retain(|_, t| now.saturating_duration_since(*t) < SERVE_MEMO);
    }

    /// How many pods are remembered.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no pod is remembered.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
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
        let shared = Arc::new(Shared {
            client,
            events,
            config,
            desired,
            epoch: std::sync::atomic::AtomicU64::new(0),
            effects: tokio::sync::Mutex::new(()),
            restarting: Mutex::new(HashSet::new()),
            served: Mutex::new(ServeMemo::default()),
            escapes: Mutex::new(EscapeMemo::default()),
            flag,
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let weak = Arc::downgrade(&tasks);
        if let Ok(mut set) = tasks.lock() {
            set.spawn(reconcile_loop(shared.clone(), weak));
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
        let (effects, stopped, standby, to_restart) = match fence(&self.shared).await {
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
    let pods = list_service_pods(&shared.client).await?;
    let served = pass(shared, &pods, tasks).await;
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
    async fn set_serving(&self, serving: bool, epoch: u64) -> Result<(), String> {
        self.set_epoch(epoch);
        if serving {
            self.activate_in_background();
            Ok(())
        } else {
            self.demote().await.map(drop).map_err(|e| e.to_string())
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

/// Service pods, read fresh from the API server (a quorum read, so the
/// fence cannot miss a pod a stale cache does not know yet).
async fn list_service_pods(client: &kube::Client) -> Result<Vec<Pod>, ServingError> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns_list = nss
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            names::INJECT_LABEL,
            names::INJECT_ENABLED
        )))
        .await
        .map_err(|e| ServingError::List {
            what: "namespaces",
            source: Box::new(e),
        })?;
    let opted = opted_in(&ns_list.items);
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default().labels(&service_pod_selector()))
        .await
        .map_err(|e| ServingError::List {
            what: "pods",
            source: Box::new(e),
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| is_service_pod(p, &opted))
        .collect())
}

/// Sets the serving condition of one pod. `Ok(false)` if the pod is gone or
/// was replaced.
async fn patch_condition(
    client: &kube::Client,
    pod: &PodRef,
    serve: bool,
    reason: &str,
) -> Result<bool, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let body = condition_patch(&pod.uid, serve, reason, &now);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api
        .patch_status(&pod.name, &params, &Patch::Strategic(body))
        .await
    {
        Ok(_) => Ok(true),
        // 404: gone; 409/422: a namesake with another uid.
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One serving-condition patch: the pod, whether it is to serve, and why.
type ConditionPatch = (PodRef, bool, &'static str);

/// Sends `patches`, at most `concurrency` at once, and returns each with its
/// outcome. `Ok(false)`: the pod is gone or replaced, or it was to serve and
/// the cluster no longer is meant to. That is checked when the patch's turn
/// comes, because a demotion may have begun while it waited, and a
/// condition must never turn True then.
async fn send_conditions(
    shared: &Shared,
    patches: Vec<ConditionPatch>,
) -> Vec<(ConditionPatch, Result<bool, kube::Error>)> {
    // Futures are built first, so the stream holds no closure over borrowed
    // data, which keeps the future `Send`.
    let futures: Vec<_> = patches
        .into_iter()
        .map(|patch| async move {
            let (r, serve, reason) = &patch;
            let res = if *serve && *shared.desired.borrow() != Some(true) {
                Ok(false)
            } else {
                patch_condition(&shared.client, r, *serve, reason).await
            };
            (patch, res)
        })
        .collect();
    let results: Vec<(ConditionPatch, Result<bool, kube::Error>)> = stream::iter(futures)
        .buffer_unordered(shared.config.concurrency.max(1))
        .collect()
        .await;
    if let Ok(mut memo) = shared.served.lock() {
        let now = Instant::now();
        for ((r, serve, _), res) in &results {
            match (serve, res) {
                (true, Ok(true)) => memo.record(&r.uid, now),
                (false, Ok(true)) => memo.forget(&r.uid),
                _ => {}
            }
        }
    }
    results
}

/// The effects lock, handed back by [`fence`] so the restarts it found are
/// registered before any reconcile pass can claim them.
type FenceGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Attempts of the fence before it reports failure.
const FENCE_ROUNDS: usize = 5;

/// Sets the condition False on every service pod; returns (the effects
/// lock, stopped, standby, pods to restart) once no service pod has it True.
async fn fence(
    shared: &Shared,
) -> Result<(FenceGuard<'_>, usize, usize, Vec<PodRef>), ServingError> {
    let effects = shared.effects.lock().await;
    // Whatever served before the fence is judged afresh by the next
    // promotion.
    if let Ok(mut memo) = shared.served.lock() {
        memo.clear();
    }
    let (mut stopped, mut standby) = (0, 0);
    let mut restart: Vec<PodRef> = Vec::new();
    let mut last_error = String::new();
    for round in 0..FENCE_ROUNDS {
        let pods = list_service_pods(&shared.client).await?;
        let mut work = Vec::new();
        {
            let now = Instant::now();
            // Held for this loop only: the guard is not `Send`.
            let mut escapes = shared.escapes.lock().ok();
            for pod in &pods {
                let Some(r) = PodRef::of(pod) else { continue };
                match decide(pod, false, 0) {
                    PodAction::Stop(reason) => work.push((r, reason)),
                    PodAction::Restart
                        if admit_restart(shared, escapes.as_deref_mut(), pod, &r, now) =>
                    {
                        restart.push(r);
                    }
                    PodAction::Restart | PodAction::Keep | PodAction::Serve => {}
                }
            }
        }
        if work.is_empty() {
            restart.sort_by(|a, b| a.uid.cmp(&b.uid));
            restart.dedup();
            return Ok((effects, stopped, standby, restart));
        }
        let stops = work.into_iter().map(|(r, reason)| (r, false, reason));
        let results = send_conditions(shared, stops.collect()).await;
        let mut failed = 0;
        for ((r, _, reason), res) in results {
            match res {
                Ok(true) if reason == STOPPED_REASON => {
                    stopped += 1;
                    restart.push(r);
                }
                Ok(true) => standby += 1,
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    last_error = format!("{}/{}: {e}", r.namespace, r.name);
                }
            }
        }
        if failed == 0 {
            restart.sort_by(|a, b| a.uid.cmp(&b.uid));
            restart.dedup();
            return Ok((effects, stopped, standby, restart));
        }
        warn!(round, failed, error = %last_error, "some service pods could not be stopped; retrying");
        tokio::time::sleep(backoff(
            u32::try_from(round).unwrap_or(u32::MAX),
            shared.config.backoff_min,
            shared.config.backoff_max,
        ))
        .await;
    }
    // Count what still serves, for the message.
    let still = list_service_pods(&shared.client)
        .await?
        .iter()
        .filter(|p| serving_state(p) == ServingState::True)
        .count();
    if still == 0 {
        return Ok((effects, stopped, standby, restart));
    }
    Err(ServingError::FenceIncomplete(still, last_error))
}

/// What one pass does to `pods` for `desired`: the condition patches to
/// send and the pods to restart. Pods made to serve in the last
/// [`SERVE_MEMO`] are left alone (see [`ServeMemo`]).
fn plan_pass(shared: &Shared, pods: &[Pod], desired: bool) -> (Vec<ConditionPatch>, Vec<PodRef>) {
    let mut patches = Vec::new();
    let mut restart = Vec::new();
    let now = Instant::now();
    let mut memo = shared.served.lock().ok();
    if let Some(m) = memo.as_mut() {
        m.prune(now);
    }
    let mut escapes = shared.escapes.lock().ok();
    let epoch = shared.epoch.load(std::sync::atomic::Ordering::SeqCst);
    for pod in pods {
        let Some(r) = PodRef::of(pod) else { continue };
        match decide(pod, desired, epoch) {
            // Made to serve moments ago; the cache has not caught up.
            PodAction::Serve if memo.as_ref().is_some_and(|m| m.fresh(&r.uid, now)) => {}
            PodAction::Serve => patches.push((r, true, ACTIVE_REASON)),
            PodAction::Stop(reason) => patches.push((r, false, reason)),
            PodAction::Restart if admit_restart(shared, escapes.as_deref_mut(), pod, &r, now) => {
                restart.push(r);
            }
            PodAction::Restart | PodAction::Keep => {}
        }
    }
    (patches, restart)
}

/// One reconciliation pass over `pods` for the current desired state: sends
/// condition patches and starts restarts. Returns how many pods were made to
/// serve.
async fn pass(shared: &Arc<Shared>, pods: &[Pod], tasks: &Arc<Mutex<JoinSet<()>>>) -> usize {
    let _effects = shared.effects.lock().await;
    let Some(desired) = *shared.desired.borrow() else {
        return 0;
    };
    let (patches, restart) = plan_pass(shared, pods, desired);
    let mut served = 0;
    for ((r, serve, _), res) in send_conditions(shared, patches).await {
        let done = res.unwrap_or_else(|e| {
            warn!(pod = %format!("{}/{}", r.namespace, r.name), error = %e, "could not set the serving condition");
            false
        });
        if !done {
            continue;
        }
        if serve {
            served += 1;
        } else if desired {
            debug!(pod = %r.name, "unexpected stop while active");
        }
    }
    // Pods stopped by this pass with STOPPED_REASON are restarted by the
    // next pass (the watch sees the new condition); pods found stopped now
    // are restarted here: this is how an interrupted demotion resumes. Pods
    // released in an epoch not served are restarted in either state.
    if !restart.is_empty() {
        drop(spawn_restarts(shared, tasks, restart).1);
    }
    served
}

/// Starts a background batch restarting `pods` not already being restarted;
/// returns how many it took on and where its report will come.
fn spawn_restarts(
    shared: &Arc<Shared>,
    tasks: &Arc<Mutex<JoinSet<()>>>,
    pods: Vec<PodRef>,
) -> (usize, Option<oneshot::Receiver<RestartReport>>) {
    let fresh: Vec<PodRef> = match shared.restarting.lock() {
        Ok(mut busy) => pods
            .into_iter()
            .filter(|p| busy.insert(p.uid.clone()))
            .collect(),
        Err(_) => return (0, None),
    };
    if fresh.is_empty() {
        return (0, None);
    }
    let count = fresh.len();
    let (tx, rx) = oneshot::channel();
    let shared = shared.clone();
    let Ok(mut set) = tasks.lock() else {
        return (0, None);
    };
    // Reap finished tasks so the set does not grow without bound.
    while set.try_join_next().is_some() {}
    set.spawn(async move {
        let report = restart_batch(&shared, fresh).await;
        // Nobody may wait for it (the HA loop does not): that is fine.
        let _ = tx.send(report);
    });
    (count, Some(rx))
}

async fn restart_batch(shared: &Shared, pods: Vec<PodRef>) -> RestartReport {
    let started = Instant::now();
    let total = pods.len();
    if !shared.config.restart_delay.is_zero() {
        // Each restart re-checks the desired state first, so a return to
        // active during the delay cancels them.
        tokio::time::sleep(shared.config.restart_delay).await;
    }
    info!(
        pods = total,
        "restarting the service pods that were serving"
    );
    let futures: Vec<_> = pods
        .into_iter()
        .map(|p| async move {
            let o = restart_one(shared, &p).await;
            (p, o)
        })
        .collect();
    let outcomes: Vec<(PodRef, Outcome)> = stream::iter(futures)
        .buffer_unordered(shared.config.concurrency.max(1))
        .collect()
        .await;
    let mut report = RestartReport {
        pods: total,
        took: started.elapsed(),
        ..Default::default()
    };
    if let Ok(mut busy) = shared.restarting.lock() {
        for (p, _) in &outcomes {
            busy.remove(&p.uid);
        }
    }
    for (_, o) in &outcomes {
        match o {
            Outcome::Evicted => report.evicted += 1,
            Outcome::Deleted => report.deleted += 1,
            Outcome::Gone => report.gone += 1,
            Outcome::Cancelled => report.cancelled += 1,
        }
    }
    info!(
        restarted = report.restarted(),
        evicted = report.evicted,
        deleted = report.deleted,
        gone = report.gone,
        cancelled = report.cancelled,
        took_ms = report.took.as_millis(),
        "service pod restarts finished"
    );
    let type_ = if report.deleted > 0 {
        EventType::Warning
    } else {
        EventType::Normal
    };
    record(
        shared,
        type_,
        "ServicePodsRestarted",
        "Restart",
        &format!(
            "restarted {} of {} service pod(s) in {} ms: {} evicted, {} deleted after eviction was refused for {} s, {} already gone, {} left serving",
            report.restarted(),
            report.pods,
            report.took.as_millis(),
            report.evicted,
            report.deleted,
            shared.config.delete_after.as_secs(),
            report.gone,
            report.cancelled
        ),
    );
    report
}

/// Longest wait for one eviction request.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest wait for one eviction request, so it can at least be answered.
const MIN_EVICT_WAIT: Duration = Duration::from_millis(500);

/// Restarts one pod: evicts it, retrying refusals with backoff, and deletes
/// it once eviction has been refused for `delete_after`.
async fn restart_one(shared: &Shared, p: &PodRef) -> Outcome {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &p.namespace);
    let started = Instant::now();
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(p.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let mut attempt: u32 = 0;
    loop {
        debug!(pod = %p.name, attempt, "restart attempt");
        let Some(desired) = *shared.desired.borrow() else {
            return Outcome::Cancelled;
        };
        let epoch = shared.epoch.load(std::sync::atomic::Ordering::SeqCst);
        // The pod itself says whether it still needs the restart.
        match api.get_opt(&p.name).await {
            Ok(None) => return Outcome::Gone,
            Ok(Some(pod)) if pod.metadata.uid.as_deref() != Some(p.uid.as_str()) => {
                return Outcome::Gone;
            }
            Ok(Some(pod)) if pod.metadata.deletion_timestamp.is_some() => return Outcome::Gone,
            // Still to be restarted for the state wanted now? A return to
            // active cancels the restart of a pod a demotion stopped.
            Ok(Some(pod)) if decide(&pod, desired, epoch) != PodAction::Restart => {
                return Outcome::Cancelled;
            }
            Ok(Some(_)) => {}
            Err(e) => warn!(pod = %p.name, error = %e, "could not read pod before restart"),
        }
        if started.elapsed() >= shared.config.delete_after {
            match api.delete(&p.name, &delete).await {
                Ok(_) => {
                    warn!(namespace = %p.namespace, pod = %p.name, "eviction refused too long; pod deleted");
                    return Outcome::Deleted;
                }
                Err(kube::Error::Api(s)) if evict_step(s.code) == EvictStep::Gone => {
                    return Outcome::Gone;
                }
                Err(e) => warn!(pod = %p.name, error = %e, "delete failed; retrying"),
            }
        } else {
            let params = EvictParams {
                delete_options: Some(delete.clone()),
                ..Default::default()
            };
            // Bounded, and never past the delete deadline: kube's default
            // client retries a 429 itself, honouring the server's
            // Retry-After (10 s for a budget) up to 15 times, so a refused
            // eviction shows up here as a call that does not return.
            let budget = API_TIMEOUT
                .min(shared.config.delete_after.saturating_sub(started.elapsed()))
                .max(MIN_EVICT_WAIT);
            let Ok(answer) = tokio::time::timeout(budget, api.evict(&p.name, &params)).await else {
                info!(namespace = %p.namespace, pod = %p.name, waited_ms = budget.as_millis(), "eviction not answered in time (refused by a disruption budget and retried by the client, or slow); trying again");
                attempt = attempt.saturating_add(1);
                continue;
            };
            match answer {
                Ok(_) => {
                    debug!(namespace = %p.namespace, pod = %p.name, "evicted");
                    return Outcome::Evicted;
                }
                Err(kube::Error::Api(s)) if evict_step(s.code) == EvictStep::Gone => {
                    return Outcome::Gone;
                }
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    debug!(pod = %p.name, message = %s.message, "eviction refused (disruption budget); retrying");
                }
                Err(e) => warn!(pod = %p.name, error = %e, "eviction failed; retrying"),
            }
        }
        let wait = backoff(
            attempt,
            shared.config.backoff_min,
            shared.config.backoff_max,
        );
        let until_delete = shared.config.delete_after.saturating_sub(started.elapsed());
        let wait = if until_delete.is_zero() {
            wait
        } else {
            wait.min(until_delete)
        };
        tokio::time::sleep(wait).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Watches pods and opted-in namespaces and reconciles on every change, on
/// a desired-state change and every `resync`.
async fn reconcile_loop(shared: Arc<Shared>, tasks: Weak<Mutex<JoinSet<()>>>) {
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (nss, nss_writer) = reflector::store::<Namespace>();
    let pod_events = watcher(
        Api::<Pod>::all(shared.client.clone()),
        watcher::Config::default().labels(&service_pod_selector()),
    )
    .default_backoff()
    .reflect(pods_writer)
    .map(|_| ());
    let ns_events = watcher(
        Api::<Namespace>::all(shared.client.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            names::INJECT_LABEL,
            names::INJECT_ENABLED
        )),
    )
    .default_backoff()
    .reflect(nss_writer)
    .map(|_| ());
    let mut changes = stream::select(pod_events, ns_events).boxed();
    // The reflectors only fill while their stream is polled, so the stream
    // is driven on its own, beside the passes, and only signals a change.
    let changed = tokio::sync::Notify::new();
    let drive = async {
        while changes.next().await.is_some() {
            changed.notify_one();
        }
    };
    let reconcile = async {
        let mut desired = shared.desired.subscribe();
        if pods.wait_until_ready().await.is_err() || nss.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = changed.notified() => {}
                r = desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(shared.config.resync) => {}
            }
            // Let a burst of events settle into one pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let opted = opted_in(
                &nss.state()
                    .iter()
                    .map(|n| n.as_ref().clone())
                    .collect::<Vec<_>>(),
            );
            let targets: Vec<Pod> = pods
                .state()
                .iter()
                .filter(|p| is_service_pod(p, &opted))
                .map(|p| p.as_ref().clone())
                .collect();
            let Some(tasks) = tasks.upgrade() else { return };
            pass(&shared, &targets, &tasks).await;
        }
    };
    tokio::select! {
        () = drive => warn!("pod watch ended; serving reconcile loop stops"),
        () = reconcile => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn escaped_pods_are_restarted_once_per_cause_never_in_a_loop() {
        let t = |s: i64| Some(Timestamp::from_second(s).expect("a time"));
        let now = Instant::now();
        let mut m = EscapeMemo::default();
        // No controller: an eviction would delete it for good.
        assert!(matches!(
            m.admit("bare", None, t(1), now),
            EscapeVerdict::Leave(_)
        ));
        assert_eq!(
            m.admit("bare", None, t(1), now),
            EscapeVerdict::LeaveQuietly
        );
        // Every replica made before the webhook, asked about in any order
        // and again on the next pass, is restarted.
        assert_eq!(m.admit("a", Some("rs"), t(10), now), EscapeVerdict::Restart);
        assert_eq!(m.admit("b", Some("rs"), t(9), now), EscapeVerdict::Restart);
        assert_eq!(m.admit("a", Some("rs"), t(10), now), EscapeVerdict::Restart);
        // A replacement made after them that is still ungated: the restart
        // did not gate it; leave it, warn once.
        assert!(matches!(
            m.admit("c", Some("rs"), t(20), now),
            EscapeVerdict::Leave(_)
        ));
        assert_eq!(
            m.admit("c", Some("rs"), t(20), now),
            EscapeVerdict::LeaveQuietly
        );
        // Another owner is judged on its own.
        assert_eq!(
            m.admit("d", Some("other"), t(20), now),
            EscapeVerdict::Restart
        );
        // After ESCAPE_RETRY the owner is tried again.
        let later = now + ESCAPE_RETRY;
        assert_eq!(
            m.admit("c", Some("rs"), t(20), later),
            EscapeVerdict::Restart
        );
    }

    #[test]
    fn eviction_answers_and_backoff() {
        assert_eq!(evict_step(404), EvictStep::Gone);
        assert_eq!(evict_step(409), EvictStep::Gone);
        assert_eq!(evict_step(429), EvictStep::Retry);
        assert_eq!(evict_step(500), EvictStep::Retry);
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        assert_eq!(backoff(0, min, max), min);
        assert_eq!(backoff(1, min, max), Duration::from_millis(400));
        assert_eq!(backoff(4, min, max), Duration::from_millis(3200));
        assert_eq!(backoff(5, min, max), max);
        assert_eq!(backoff(u32::MAX, min, max), max);
    }

    #[test]
    fn a_serve_is_remembered_for_the_memo_period_and_a_stop_or_fence_forgets_it() {
        let t0 = Instant::now();
        let mut memo = ServeMemo::default();
        assert!(!memo.fresh("a", t0));
        memo.record("a", t0);
        memo.record("b", t0);
        assert!(memo.fresh("a", t0 + SERVE_MEMO - Duration::from_millis(1)));
        assert!(
            !memo.fresh("a", t0 + SERVE_MEMO),
            "past the memo the cache decides"
        );
        memo.forget("a");
        assert!(!memo.fresh("a", t0));
        memo.prune(t0 + SERVE_MEMO);
        assert!(memo.is_empty(), "old entries are pruned");
        memo.record("c", t0);
        memo.clear();
        assert_eq!(memo.len(), 0);
    }

    #[test]
    fn restart_report_counts_restarts() {
        let r = RestartReport {
            pods: 4,
            evicted: 2,
            deleted: 1,
            gone: 1,
            ..Default::default()
        };
        assert_eq!(r.restarted(), 3);
    }
}
