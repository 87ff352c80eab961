//! The HA loop: drives the core's [`Node`] with real time, health verdicts,
//! peer messages and operator commands, and carries out its actions.
//!
//! The ordering contract of `counterweight_core::ha` is kept here: actions of
//! one step run in order, each finished before the next; a failed `Persist`
//! drops the rest of the batch, re-reads the state ConfigMap and restarts the
//! node from it, exactly as after a crash. Time is a monotonic clock counted
//! from the loop's start. The state ConfigMap is the only durable state; a
//! missing or corrupt one is recreated as standby with a Warning Event, never
//! as active.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::ha::{
    Action, Command, Envelope, Event, EventKind, HaConfig, HaConfigError, HealthVerdict, Node,
    Persisted, Reason,
};
use counterweight_core::health::{HealthReport, Verdict, below_threshold};
use kube::runtime::events::EventType;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::events::EventSink;
use crate::state_store::{StateStore, StoreError};

/// State ConfigMap key with the HA view: serving, lease, peers, handover.
pub const HA_KEY: &str = "ha";
/// State ConfigMap key with the last transition and its reason.
pub const TRANSITION_KEY: &str = "lastTransition";

/// Where HA messages go. Implementations must not block: loss is fine,
/// the state machine retries.
pub trait Outbox: Send + Sync + 'static {
    /// Hands a message to the transport.
    fn send(&self, envelope: Envelope);
}

/// Whatever makes service pods serve or stop. `set_serving(false)` must
/// return only once nothing serves any more (the fence).
pub trait Serving: Send + Sync + 'static {
    /// Makes this cluster's service pods serve, or stop serving.
    fn set_serving(
        &self,
        serving: bool,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
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
    async fn set_serving(&self, serving: bool) -> Result<(), String> {
        self.stance.set(serving);
        self.inner.set_serving(serving).await
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
    async fn set_serving(&self, serving: bool) -> Result<(), String> {
        self.store
            .update(|data| {
                data.insert("serving".to_owned(), serving.to_string());
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Errors that stop the HA loop.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// The HA configuration is unusable.
    #[error("invalid HA configuration: {0}; fix the --ha-config file")]
    Config(#[from] HaConfigError),
    /// The state ConfigMap could not be read at start.
    #[error("cannot read the state ConfigMap at start: {0}")]
    Store(#[from] StoreError),
}

/// What the HA loop publishes for `cwctl` and operators, besides role/epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct HaView {
    serving: bool,
    lease_expires_in_ms: Option<u64>,
    handover_target: Option<String>,
    paused: bool,
    peers: BTreeMap<String, PeerSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerSummary {
    status: String,
    epoch: u64,
    last_heard_ms_ago: u64,
}

/// Inputs of the HA loop.
pub struct HaInputs {
    /// Messages from authenticated peers.
    pub inbox: mpsc::Receiver<Envelope>,
    /// Operator commands.
    pub commands: mpsc::Receiver<Command>,
    /// Health reports (none for a witness).
    pub health: Option<watch::Receiver<Option<HealthReport>>>,
    /// New versions of the HA configuration; the core applies what may
    /// change at run time and records why it rejects the rest.
    pub config: Option<mpsc::Receiver<HaConfig>>,
}

/// One member's HA loop.
pub struct HaLoop<S: Serving> {
    me: String,
    config: HaConfig,
    store: StateStore,
    events: EventSink,
    outbox: Arc<dyn Outbox>,
    serving: Arc<S>,
    started: Instant,
}

impl<S: Serving> HaLoop<S> {
    /// Prepares the loop for member `me`.
    pub fn new(
        me: &str,
        config: HaConfig,
        store: StateStore,
        events: EventSink,
        outbox: Arc<dyn Outbox>,
        serving: Arc<S>,
    ) -> Self {
        Self {
            me: me.to_owned(),
            config,
            store,
            events,
            outbox,
            serving,
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads the persisted record and starts a node from it. Also says
    /// whether there was no record at all: what that means is only known
    /// once a peer is heard ([`missing_record_event`]).
    async fn boot(&self) -> Result<(Node, Vec<Action>, bool), HaError> {
        let cm = self.store.get().await?;
        let missing = cm.is_none();
        let stored = match cm.map(|cm| Persisted::from_data(cm.data.as_ref())) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                self.events.record(
                    EventType::Warning,
                    "StateRecreated",
                    "Start",
                    &format!("the state ConfigMap is unreadable ({e}); resetting it to standby"),
                );
                None
            }
        };
        let (node, actions) = Node::start(self.config.clone(), &self.me, stored, self.now_ms())?;
        Ok((node, actions, missing))
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        self,
        mut inputs: HaInputs,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), HaError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let (mut node, actions, mut record_missing) = self.boot().await?;
        if record_missing {
            info!(
                "no state ConfigMap: creating it as standby; a first start or a lost record, told once a peer is heard"
            );
        }
        if self.config.unsafe_promote_on_silence {
            warn!("unsafePromoteOnSilence is on: a network partition can produce two actives");
        }
        self.execute(&mut node, actions, inputs.health.as_ref())
            .await?;
        let mut abnormal = false;
        let mut last_view: Option<(HaView, Instant)> = None;
        loop {
            // The node's configuration, not the boot one: the probe interval
            // may change at run time.
            let probe_ms = node.config().probe_interval_ms;
            let probe = Duration::from_millis(probe_ms);
            let next = node.next_tick_ms().min(self.now_ms() + probe_ms);
            let wake = self.started + Duration::from_millis(next);
            let event = tokio::select! {
                () = &mut shutdown => {
                    info!("HA loop stopping");
                    return Ok(());
                }
                () = tokio::time::sleep_until(wake) => Event::Tick,
                Some(env) = inputs.inbox.recv() => Event::Message(env),
                Some(cmd) = inputs.commands.recv() => Event::Command(cmd),
                Some(cfg) = async {
                    match inputs.config.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => Event::ConfigChanged(cfg),
                Ok(()) = async {
                    match inputs.health.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let report = inputs.health.as_ref().and_then(|rx| rx.borrow().clone());
                    Event::Health(verdict(report.as_ref(), &mut abnormal))
                }
            };
            let now = self.now_ms();
            let span = info_span!("ha_step", cluster = %self.me, epoch = node.epoch(), role = %node.role());
            let actions = node.handle(now, event);
            self.execute(&mut node, actions, inputs.health.as_ref())
                .instrument(span)
                .await?;
            if record_missing {
                let quiet_ms = node.config().lease_ms + node.config().margin_ms;
                let highest = node
                    .peers()
                    .iter()
                    .map(|(name, view)| (name.as_str(), view.epoch))
                    .max_by_key(|(_, epoch)| *epoch);
                if let Some((type_, reason, message)) = missing_record_event(highest, quiet_ms) {
                    self.events
                        .record_transition(type_, reason, "Start", &message);
                    record_missing = false;
                }
            }

            // The HA view: at once on a change of what people act on, else
            // at most once per probe interval.
            let view = self.view(&node);
            let due = match &last_view {
                None => true,
                Some((v, at)) => {
                    v.serving != view.serving
                        || v.handover_target != view.handover_target
                        || v.paused != view.paused
                        || peers_changed(&v.peers, &view.peers)
                        || at.elapsed() >= probe
                }
            };
            if due
                && last_view.as_ref().map(|(v, _)| v) != Some(&view)
                && let Ok(json) = serde_json::to_string(&view)
                && self.write_key(HA_KEY, json).await
            {
                last_view = Some((view, Instant::now()));
            }
        }
    }

    /// Carries out actions in order. A failed `Persist` drops the rest and
    /// restarts the node from what is stored. `health` is read when a
    /// takeover is recorded: how the synchronization components stand at
    /// that moment is its data-loss estimate.
    async fn execute(
        &self,
        node: &mut Node,
        actions: Vec<Action>,
        health: Option<&watch::Receiver<Option<HealthReport>>>,
    ) -> Result<(), HaError> {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Persist(rec) => {
                    let write = self.store.update(|data| rec.write_to(data)).await;
                    if let Err(e) = write {
                        warn!(error = %e, "persisting the HA record failed; restarting from the stored record");
                        let (fresh, actions, missing) = self.boot().await?;
                        if missing {
                            // Gone while this member ran: no first start.
                            self.events
                                .record(
                                    EventType::Warning,
                                    "StateRecreated",
                                    "Persist",
                                    "the state ConfigMap disappeared while running; recreating it from the protocol's start",
                                );
                        }
                        *node = fresh;
                        queue = actions.into();
                    }
                }
                Action::SetServing(on) => {
                    if let Err(e) = self.serving.set_serving(on).await {
                        // Stopping must not be skipped: the protocol has
                        // already decided. Keep the error visible.
                        warn!(serving = on, error = %e, "could not change serving");
                    }
                }
                Action::Send(env) => self.outbox.send(env),
                Action::Record(r) => {
                    let type_ = match r.kind {
                        EventKind::Normal => EventType::Normal,
                        EventKind::Warning => EventType::Warning,
                    };
                    let reason = format!("{:?}", r.reason);
                    let mut message = r.message;
                    if matches!(r.reason, Reason::Promoted | Reason::HandedOver) {
                        let data = health
                            .and_then(|rx| rx.borrow().as_ref().map(|r| r.data.clone()))
                            .unwrap_or_default();
                        if !data.is_empty() {
                            message =
                                format!("{message}; data at this moment: {}", data.join("; "));
                        }
                    }
                    info!(reason = %reason, message = %message, "HA transition");
                    if is_transition(r.reason) {
                        let t = serde_json::json!({
                            "reason": reason,
                            "message": message,
                            "role": node.role(),
                            "epoch": node.epoch(),
                            "at": now_rfc3339(),
                        });
                        self.write_key(TRANSITION_KEY, t.to_string()).await;
                    }
                    self.events
                        .record_transition(type_, &reason, "HandOver", &message);
                }
            }
        }
        Ok(())
    }

    async fn write_key(&self, key: &'static str, value: String) -> bool {
        match self
            .store
            .update(|data| {
                data.insert(key.to_owned(), value.clone());
            })
            .await
        {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, key, "could not write the state ConfigMap");
                false
            }
        }
    }

    fn view(&self, node: &Node) -> HaView {
        let now = self.now_ms();
        HaView {
            serving: node.serving(),
            lease_expires_in_ms: node.lease_until_ms().map(|until| until.saturating_sub(now)),
            handover_target: node.handover_target().map(str::to_owned),
            paused: node.persisted().paused,
            peers: node
                .peers()
                .iter()
                .map(|(name, p)| {
                    (
                        name.clone(),
                        PeerSummary {
                            status: format!("{:?}", p.status),
                            epoch: p.epoch,
                            last_heard_ms_ago: now.saturating_sub(p.heard_ms),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// What to record about a state record that was missing at start, once
/// that can be told: when a peer is first heard (`highest` is the peer
/// heard at the highest epoch; `None` until then). Peers may come up minutes
/// apart on a first install, so there is no deadline: until then a log line
/// says the record was missing.
///
/// Missing is normal on a first install, where every member starts at
/// epoch 0, and worth a Warning when the group is past that: the member
/// joined late, or its record was deleted and with it any vote it promised
/// (the core grants no vote for `quiet_ms` after such a start).
fn missing_record_event(
    highest: Option<(&str, u64)>,
    quiet_ms: u64,
) -> Option<(EventType, &'static str, String)> {
    match highest? {
        (_, 0) => Some((
            EventType::Normal,
            "StateCreated",
            "no state ConfigMap, and no member has been active yet (epoch 0): a first start; \
             created it as standby"
                .to_owned(),
        )),
        (peer, epoch) => Some((
            EventType::Warning,
            "StateRecreated",
            format!(
                "no state ConfigMap, while {peer} is at epoch {epoch}: this member joined late, \
                 or its record was deleted; created it as standby, and it grants no vote for \
                 {quiet_ms} ms after its start in case it promised one before"
            ),
        )),
    }
}

/// Turns a health report into the HA machine's verdict. Table 1 reports
/// "abnormal" on one tick only (its counter then restarts); for handover the
/// cluster stays abnormal until an interval is healthy again.
pub fn verdict(report: Option<&HealthReport>, abnormal: &mut bool) -> HealthVerdict {
    let Some(r) = report else {
        // No policy, no verdict: never a candidate, never abnormal.
        *abnormal = false;
        return HealthVerdict::default();
    };
    match r.verdict {
        Verdict::Abnormal { .. } => *abnormal = true,
        Verdict::Healthy => *abnormal = false,
        Verdict::Degraded { .. } => {}
    }
    HealthVerdict {
        abnormal: *abnormal,
        meets_threshold: !below_threshold(r.score, r.threshold),
        data_behind: !r.data_behind.is_empty(),
    }
}

fn peers_changed(a: &BTreeMap<String, PeerSummary>, b: &BTreeMap<String, PeerSummary>) -> bool {
    a.len() != b.len()
        || a.iter()
            .zip(b.iter())
            .any(|((na, pa), (nb, pb))| na != nb || pa.status != pb.status || pa.epoch != pb.epoch)
}

fn is_transition(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::Promoted
            | Reason::Fenced
            | Reason::SteppedDown
            | Reason::HandedOver
            | Reason::HandoverComplete
            | Reason::Recovered
    )
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::health::HealthReport;

    #[test]
    fn a_missing_record_is_a_first_start_only_while_the_group_is_at_epoch_0() {
        // Nobody heard yet: nothing can be told.
        assert!(missing_record_event(None, 1_800).is_none());
        let (kind, reason, _) = missing_record_event(Some(("west", 0)), 1_800).unwrap();
        assert_eq!((kind, reason), (EventType::Normal, "StateCreated"));
        let (kind, reason, message) = missing_record_event(Some(("west", 7)), 1_800).unwrap();
        assert_eq!((kind, reason), (EventType::Warning, "StateRecreated"));
        assert!(message.contains("west is at epoch 7"), "{message}");
        assert!(message.contains("1800 ms"), "{message}");
    }

    fn report(score: f64, verdict: Verdict) -> HealthReport {
        HealthReport {
            score,
            threshold: 0.6,
            retries: 2,
            retry_count: verdict.retry_count(),
            verdict,
            components: vec![],
            data_behind: vec![],
            data: vec![],
        }
    }

    #[test]
    fn abnormal_sticks_until_a_healthy_interval() {
        let mut abnormal = false;
        let v = verdict(
            Some(&report(0.5, Verdict::Abnormal { retry_count: 3 })),
            &mut abnormal,
        );
        assert!(v.abnormal && !v.meets_threshold);
        // Table 1 restarts its counter: the next interval is "degraded 1".
        let v = verdict(
            Some(&report(0.5, Verdict::Degraded { retry_count: 1 })),
            &mut abnormal,
        );
        assert!(v.abnormal, "still abnormal until healthy");
        // S back above D between ticks: eligible score, still abnormal.
        let v = verdict(
            Some(&report(0.9, Verdict::Degraded { retry_count: 1 })),
            &mut abnormal,
        );
        assert!(v.abnormal && v.meets_threshold);
        let v = verdict(Some(&report(0.9, Verdict::Healthy)), &mut abnormal);
        assert!(v.eligible());
        assert_eq!(verdict(None, &mut abnormal), HealthVerdict::default());
    }
}
