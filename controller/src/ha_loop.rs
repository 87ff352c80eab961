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
//!
//! Nothing that talks to the API server may hang the loop: every call it
//! awaits is bounded by `marginMs` (a `Persist` that runs out counts as
//! failed), and what need not hold up a step (the HA view, the last
//! transition, Events, making pods serve, publishing the serving lease) is
//! handed to tasks beside it. So the loop keeps renewing its lease and
//! answering its peers while the API server is slow or away, and the
//! serving lease stops the workload on its own if the loop cannot.
//!
//! The loop owns its record: it watches the state ConfigMap, and a write
//! that is not its own (an edit by hand, a restore from a backup) is put back
//! at once to what the node believes, with a Warning Event showing both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::ha::{
    Action, Command, Envelope, Event, EventKind, HaConfig, HaConfigError, HealthVerdict, Node,
    Persisted, Reason,
};
use counterweight_core::health::{HealthReport, Verdict, below_threshold};
use counterweight_core::state::{self, HaView, Part, PeerView, Transition};
use kube::runtime::events::EventType;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::events::EventSink;
use crate::serving::Serving;
use crate::serving_lease::LeasePublisher;
use crate::state_store::{StateStore, StoreError, Written};

/// Where HA messages go. Implementations must not block: loss is fine,
/// the state machine retries.
pub trait Outbox: Send + Sync + 'static {
    /// Hands a message to the transport.
    fn send(&self, envelope: Envelope);
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
    /// A call to the API server did not answer in time.
    #[error(
        "the API server did not answer within {0:?} while reading the state ConfigMap; check that it is up and reachable"
    )]
    Timeout(Duration),
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
    /// The state ConfigMap's data as the API server has it (a watch), so
    /// that foreign writes are put back; `None` disables the check.
    pub observed: Option<watch::Receiver<Option<BTreeMap<String, String>>>>,
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
    lease: Option<LeasePublisher>,
    keys: KeyWriter,
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
        let keys = KeyWriter::start(
            store.clone(),
            beside_timeout(&config),
            Duration::from_millis(config.probe_interval_ms),
        );
        Self {
            me: me.to_owned(),
            config,
            store,
            events,
            outbox,
            serving,
            started: Instant::now(),
            lease: None,
            keys,
        }
    }

    /// Publishes the node's serving lease through `lease` after every step.
    pub fn with_serving_lease(mut self, lease: LeasePublisher) -> Self {
        self.lease = Some(lease);
        self
    }

    fn timeout(&self) -> Duration {
        api_timeout(&self.config)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads the persisted record and starts a node from it. Also says
    /// whether there was no record at all: what that means is only known
    /// once a peer is heard ([`missing_record_event`]).
    async fn boot(&self) -> Result<(Node, Vec<Action>, bool), HaError> {
        let cm = tokio::time::timeout(self.timeout(), self.store.get())
            .await
            .map_err(|_| HaError::Timeout(self.timeout()))??;
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

    /// Boots again after a failed write, retrying while the API server does
    /// not answer: the node is gone meanwhile, so nothing serves past the
    /// serving lease already published. Only a bad configuration ends it.
    async fn reboot(&self) -> Result<(Node, Vec<Action>, bool), HaError> {
        let mut attempt: u32 = 0;
        loop {
            match self.boot().await {
                Ok(booted) => return Ok(booted),
                Err(HaError::Config(e)) => return Err(HaError::Config(e)),
                Err(e) => {
                    let wait = Duration::from_millis(100)
                        .saturating_mul(1u32 << attempt.min(5))
                        .min(Duration::from_secs(3));
                    warn!(error = %e, retry_ms = wait.as_millis(), "cannot restart the HA node from its record yet");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs until `shutdown` resolves. It returns only then, or with an
    /// error the caller must treat as fatal (fail-stop): the process exits
    /// so that Kubernetes restarts it or another replica takes over.
    pub async fn run(
        self,
        inputs: HaInputs,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), HaError> {
        tokio::select! {
            result = self.run_steps(inputs) => result,
            () = shutdown => {
                info!("HA loop stopping");
                Ok(())
            }
        }
    }

    async fn run_steps(&self, mut inputs: HaInputs) -> Result<(), HaError> {
        let (mut node, actions, mut record_missing) = self.reboot().await?;
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
                () = tokio::time::sleep_until(wake) => Event::Tick,
                Ok(()) = async {
                    match inputs.observed.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let data = inputs.observed.as_ref().and_then(|rx| rx.borrow().clone());
                    self.own_record(&node, data).await;
                    continue;
                }
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
                Some((v, at)) => view.differs_in_substance(v) || at.elapsed() >= probe,
            };
            if due && last_view.as_ref().map(|(v, _)| v) != Some(&view) {
                self.keys.write(&view);
                last_view = Some((view, Instant::now()));
            }
        }
    }

    /// Puts the node's record back if what is stored differs from it: a
    /// write that is not the node's (its own writes only ever store what it
    /// believes, and a stale event of one finds the store current).
    async fn own_record(&self, node: &Node, observed: Option<BTreeMap<String, String>>) {
        let believed = node.persisted().clone();
        if observed
            .as_ref()
            .is_some_and(|d| Persisted::from_data(Some(d)).as_ref() == Ok(&believed))
        {
            return;
        }
        let mut before = None;
        let write = tokio::time::timeout(
            self.timeout(),
            self.store.update(|data| {
                before = Some(owned_keys(data));
                believed.write_to(data);
            }),
        )
        .await;
        match write {
            Ok(Ok((cm, Written::Updated | Written::Created))) => {
                let after = owned_keys(cm.data.as_ref().unwrap_or(&BTreeMap::new()));
                let before = before.unwrap_or_default();
                warn!(
                    ?before,
                    ?after,
                    "the state record was written by someone else; put back"
                );
                self.events.record_transition(
                    EventType::Warning,
                    "StateCorrected",
                    "Own",
                    &format!(
                        "the state ConfigMap was changed outside the controller ({}); put back to what this member holds ({}). Use cwctl switchover, pause or resume instead of editing it",
                        show(&before),
                        show(&after)
                    ),
                );
            }
            Ok(Ok((_, Written::Unchanged))) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "could not put the state record back; will retry on the next change")
            }
            Err(_) => {
                warn!("putting the state record back timed out; will retry on the next change")
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
                    let write = tokio::time::timeout(
                        self.timeout(),
                        self.store.update(|data| rec.write_to(data)),
                    )
                    .await;
                    let failed = match write {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some(format!("no answer within {:?}", self.timeout())),
                    };
                    if let Some(e) = failed {
                        warn!(error = %e, "persisting the HA record failed; restarting from the stored record");
                        let (fresh, actions, missing) = self.reboot().await?;
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
                    if let Err(e) = self.serving.set_serving(on, node.epoch()).await {
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
                    let reason = r.reason.as_str();
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
                        self.keys.write(&Transition {
                            reason: reason.to_owned(),
                            message: message.clone(),
                            role: node.role(),
                            epoch: node.epoch(),
                            at: now_rfc3339(),
                        });
                    }
                    self.events
                        .record_transition(type_, reason, "HandOver", &message);
                }
            }
        }
        self.publish(node);
        Ok(())
    }

    /// Offers the node's serving lease to the publisher (never waits).
    fn publish(&self, node: &Node) {
        if let Some(lease) = &self.lease {
            lease.offer(node.epoch(), node.serving_until_ms(), self.now_ms());
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
                        PeerView {
                            role: p.status.role,
                            serving: p.status.serving,
                            eligible: p.status.eligible,
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

/// The longest the HA loop waits for one API call: `marginMs`, the slack
/// the lease keeps for exactly such delays (at least 100 ms).
pub fn api_timeout(config: &HaConfig) -> Duration {
    Duration::from_millis(config.margin_ms.max(100))
}

/// The longest a writer beside the HA loop (the informational keys, the
/// serving lease) waits for one write: half a lease, never less than
/// [`api_timeout`]. Nothing waits on these writes, so the loop's margin is
/// no reason to give up on them: on an API server that answers in 400 ms,
/// a 300 ms bound abandoned every write (which the server may still carry
/// out) and sent the next at once, so nothing ever got through and the
/// load only grew. Half a lease still lets a newer value follow before the
/// published one runs out.
pub fn beside_timeout(config: &HaConfig) -> Duration {
    Duration::from_millis(config.lease_ms / 2).max(api_timeout(config))
}

/// Pause after a failed or timed-out write beside the loop, before the
/// next: a struggling API server is not sent the next request at once.
pub const BESIDE_RETRY: Duration = Duration::from_millis(100);

/// The keys of the state record the HA node owns, for a correction's Event.
fn owned_keys(data: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    [
        state::STATE_KEY,
        state::EPOCH_KEY,
        state::VOTE_KEY,
        state::PAUSED_KEY,
    ]
    .into_iter()
    .map(|k| {
        (
            k.to_owned(),
            data.get(k)
                .cloned()
                .unwrap_or_else(|| "<absent>".to_owned()),
        )
    })
    .collect()
}

fn show(keys: &BTreeMap<String, String>) -> String {
    keys.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the informational keys of the state record (the HA view, the
/// last transition) from a task beside the HA loop, newest value per key,
/// so that a slow API server never holds up a step. Writes are at least
/// `spacing` apart: each one changes the record's `resourceVersion`, and a
/// `Persist` of the loop that read the record before it must read and write
/// again, so writing the view at every step would slow the writes that
/// matter.
struct KeyWriter {
    tx: watch::Sender<BTreeMap<&'static str, String>>,
}

impl KeyWriter {
    fn start(store: StateStore, timeout: Duration, spacing: Duration) -> Self {
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
    fn write<P: Part>(&self, part: &P) {
        let value = part.encode();
        self.tx.send_modify(|m| {
            m.insert(P::KEY, value);
        });
    }
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
