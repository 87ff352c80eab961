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

mod keys;
mod rules;
mod timing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::ha::{
    Action, Command, Envelope, Event, EventKind, HaConfig, HaConfigError, Node, Persisted, Reason,
};
use counterweight_core::health::HealthReport;
use counterweight_core::state::{HaView, PeerView, Transition};
use kube::runtime::events::EventType;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use keys::KeyWriter;
pub use rules::verdict;
use rules::{is_transition, missing_record_event, now_rfc3339, owned_keys, show};
pub use timing::{BESIDE_RETRY, api_timeout, beside_timeout};

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
