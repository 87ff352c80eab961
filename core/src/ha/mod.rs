//! The active/standby state machine: who serves, when to hand over, and how
//! never to end up with two actives.
//!
//! This module owns every HA decision of a member of the group (a cluster's
//! controller, or the witness). [`Node::handle`] is a deterministic
//! `(state, event) -> (state, actions)` step: the controller feeds it health
//! verdicts, peer messages, ticks, configuration and operator commands, with
//! the current monotonic time in milliseconds, and carries out the returned
//! [`Action`]s. Nothing here performs I/O or reads a clock.
//!
//! # Protocol
//!
//! The seed's flows are kept: FIG. 10 probes (the active probes every member
//! each `probeIntervalMs` and keeps the standbys that answered recently and
//! healthy as handover candidates, para 0160), the FIG. 9 handshake
//! (`prepare` → `ready`/`refuse` → `change` → `changed`), and para 0088
//! (two actives: the higher epoch, then the preferred cluster, stays; no
//! active: the most preferred healthy standby is elected first).
//!
//! Safety comes from **leases granted by a majority of voters**. Voters are
//! all clusters plus the optional witness. A vote for `(epoch, holder)` binds
//! the voter, on its own monotonic clock, for `leaseMs` from receipt: until
//! then it votes for nobody else, and it never votes for another holder in an
//! epoch at or below one it already voted in. The holder measures its lease
//! from the moment it *sent* the request and subtracts `marginMs`, so its
//! lease ends before any of the votes it rests on. Any two majorities share a
//! voter, hence two live leases cannot coexist, and epochs of successive
//! actives strictly increase. An active whose lease runs out (it cannot reach
//! a majority: neither peer nor witness in a pair) fences itself: it stops
//! serving and persists `standby` before its voters are free again.
//!
//! The handshake is the fast path: the old active fences, persists a vote
//! for the target in the next epoch, and only then sends `change`; the
//! target then asks all voters for the new epoch with a [`Transfer`] naming
//! the fenced active, which releases voters still bound to it.
//!
//! # Ordering contract for the controller
//!
//! The controller executes the actions of one [`Node::handle`] call **in
//! order, each completed before the next starts**:
//! - [`Action::Persist`] completes when the state ConfigMap write succeeded
//!   (compare-and-swap). If it fails, the controller must not execute the rest
//!   of the batch; it re-reads the record and restarts the node with
//!   [`Node::start`] (exactly as after a crash).
//! - [`Action::SetServing`]`(false)` completes when no service pod serves any
//!   more. It always comes before the `Persist` and the `Send` that depend on
//!   it, so a fence is effective before anyone else can act on it.
//! - [`Action::SetServing`]`(true)` always comes after the `Persist` of the
//!   active role it rests on.
//! - [`Action::Send`] is fire-and-forget: loss, delay, duplication and
//!   reordering are tolerated; retries come from the state machine.
//!
//! The controller must also call [`Node::handle`] with [`Event::Tick`] at
//! least every `probeIntervalMs` and at [`Node::next_tick_ms`], promptly:
//! `marginMs` must cover tick lateness, clock-rate drift over one lease, and
//! the time a fence takes.
//!
//! Only [`Persisted`] survives a restart. A node restarted from an `active`
//! record does not serve until a majority renews its lease in the same
//! epoch, and fences if that fails within one lease. A restarted voter
//! keeps its persisted vote binding for one more lease (its volatile expiry
//! is gone); one whose record was lost votes for nobody during one lease.

mod config;
mod protocol;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use config::{ClusterSpec, HaConfig, HaConfigError};
pub use protocol::{
    Body, Envelope, HandoverReason, LeaseAnswer, LeaseRequest, PROTOCOL_VERSION, ProtocolError,
    Status, Transfer,
};

use crate::state::{PAUSED_KEY, Role, RoleEpoch, StateError, VOTE_KEY};

/// A health verdict from the Table 1 loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthVerdict {
    /// retryCount > K: the cluster is abnormal.
    pub abnormal: bool,
    /// The latest score S is at or above the threshold D.
    pub meets_threshold: bool,
    /// A synchronization component (database, file replication) is down or
    /// lagging: this cluster's data is not current.
    pub data_behind: bool,
}

impl HealthVerdict {
    /// Fit to take over: S ≥ D now, not abnormal, and its data current.
    pub fn eligible(self) -> bool {
        self.meets_threshold && !self.abnormal && !self.data_behind
    }
}

/// The latest vote a member gave.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// Epoch voted in.
    pub epoch: u64,
    /// Member voted for.
    pub to: String,
}

/// What a member persists (the state ConfigMap) and restarts from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persisted {
    /// Active or standby (the witness is always standby).
    pub role: Role,
    /// For an active, the epoch it is active in; for a standby, the highest
    /// epoch it knows an active was in.
    pub epoch: u64,
    /// The latest vote given; keeps a restarted voter from voting twice in
    /// one epoch.
    pub vote: Option<Vote>,
    /// Automatic failover is paused by an operator.
    pub paused: bool,
}

impl Persisted {
    /// The record a member starts from when it has none: standby, epoch 0.
    pub fn initial() -> Self {
        Self {
            role: Role::Standby,
            epoch: 0,
            vote: None,
            paused: false,
        }
    }

    /// Role and epoch, as the init-gate and `cwctl` read them.
    pub fn role_epoch(&self) -> RoleEpoch {
        RoleEpoch {
            role: self.role,
            epoch: self.epoch,
        }
    }

    /// Reads the record from state ConfigMap data. Any malformed key is an
    /// error: the caller then restarts as if the record were lost (standby,
    /// and no vote for one lease), never as active.
    pub fn from_data(
        data: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<Self, StateError> {
        let re = RoleEpoch::from_data(data)?;
        let data = data.ok_or(StateError::NoData)?;
        let vote = match data.get(VOTE_KEY).map(|v| v.trim()) {
            None | Some("") => None,
            Some(text) => Some(
                serde_json::from_str(text).map_err(|_| StateError::BadValue {
                    key: VOTE_KEY,
                    value: text.to_owned(),
                    expected: r#"JSON like {"epoch":3,"to":"east"}"#,
                })?,
            ),
        };
        let paused = match data.get(PAUSED_KEY).map(|v| v.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(StateError::BadValue {
                    key: PAUSED_KEY,
                    value: other.to_owned(),
                    expected: "`true` or `false`",
                });
            }
        };
        Ok(Self {
            role: re.role,
            epoch: re.epoch,
            vote,
            paused,
        })
    }

    /// Writes the record into state ConfigMap data, leaving other keys alone.
    pub fn write_to(&self, data: &mut std::collections::BTreeMap<String, String>) {
        self.role_epoch().write_to(data);
        match &self.vote {
            Some(v) => {
                // A two-field struct of a string and an integer always serializes.
                let json = serde_json::to_string(v).unwrap_or_default();
                data.insert(VOTE_KEY.to_owned(), json);
            }
            None => {
                data.remove(VOTE_KEY);
            }
        }
        data.insert(PAUSED_KEY.to_owned(), self.paused.to_string());
    }
}

/// An operator command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "command")]
pub enum Command {
    /// Planned handover to the named cluster (sent to the active).
    Switchover {
        /// The cluster to become active.
        target: String,
    },
    /// Stop automatic handovers and elections on this member.
    Pause,
    /// Resume them.
    Resume,
}

/// Input to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new verdict from the health loop.
    Health(HealthVerdict),
    /// A message from a peer, already authenticated as `from`.
    Message(Envelope),
    /// Time passed.
    Tick,
    /// A new configuration.
    ConfigChanged(HaConfig),
    /// An operator command.
    Command(Command),
}

/// Kubernetes Event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Expected transition.
    Normal,
    /// Something an operator should look at.
    Warning,
}

/// Machine-readable reason of a recorded event (the Kubernetes Event reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The node started or restarted.
    Started,
    /// The unsafe promote-on-silence option is on.
    UnsafeConfiguration,
    /// This cluster became active.
    Promoted,
    /// This cluster stopped serving because its lease ran out.
    Fenced,
    /// This cluster stepped down because a newer or preferred active exists.
    SteppedDown,
    /// A restarted active re-established its lease.
    Recovered,
    /// A standby asked the voters for a new epoch.
    ElectionStarted,
    /// The election did not reach a majority in time.
    ElectionFailed,
    /// `prepare` sent (FIG. 9 S903).
    HandoverStarted,
    /// Answered `ready` to a `prepare`.
    HandoverReady,
    /// The target refused, or did not answer.
    HandoverAborted,
    /// Fenced and sent `change` (FIG. 9 S907).
    HandedOver,
    /// The target confirmed with `changed` (FIG. 9 S909).
    HandoverComplete,
    /// The active is abnormal but has no fresh candidate (para 0160).
    NoCandidate,
    /// An operator command was refused.
    CommandRefused,
    /// Automatic failover paused.
    Paused,
    /// Automatic failover resumed.
    Resumed,
    /// A new configuration was applied.
    ConfigApplied,
    /// A new configuration was rejected.
    ConfigRejected,
}

impl Reason {
    /// The reason's stable name, as Events and the state record's
    /// `lastTransition` carry it: the variant's name, spelled out here so
    /// that renaming a variant cannot change stored data.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Started => "Started",
            Reason::UnsafeConfiguration => "UnsafeConfiguration",
            Reason::Promoted => "Promoted",
            Reason::Fenced => "Fenced",
            Reason::SteppedDown => "SteppedDown",
            Reason::Recovered => "Recovered",
            Reason::ElectionStarted => "ElectionStarted",
            Reason::ElectionFailed => "ElectionFailed",
            Reason::HandoverStarted => "HandoverStarted",
            Reason::HandoverReady => "HandoverReady",
            Reason::HandoverAborted => "HandoverAborted",
            Reason::HandedOver => "HandedOver",
            Reason::HandoverComplete => "HandoverComplete",
            Reason::NoCandidate => "NoCandidate",
            Reason::CommandRefused => "CommandRefused",
            Reason::Paused => "Paused",
            Reason::Resumed => "Resumed",
            Reason::ConfigApplied => "ConfigApplied",
            Reason::ConfigRejected => "ConfigRejected",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something for the operator to see: a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// Normal or Warning.
    pub kind: EventKind,
    /// Short machine-readable reason.
    pub reason: Reason,
    /// Human-readable message.
    pub message: String,
}

/// Output of the state machine, to be executed in order (see the module
/// documentation for the ordering contract).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Durably write the state record before executing later actions.
    Persist(Persisted),
    /// Make service pods serve (true) or stop serving (false).
    SetServing(bool),
    /// Send a message to a peer.
    Send(Envelope),
    /// Record an Event.
    Record(Record),
}

/// A lease held or sought: votes collected for one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Claim {
    epoch: u64,
    transfer: Option<Transfer>,
    started_ms: u64,
    // Voter -> send time (own clock) of the latest request it granted.
    grants: BTreeMap<String, u64>,
    // Voters that voted in this epoch or a later one for someone else: a
    // vote only moves to higher epochs, so they never grant this claim.
    refused: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    Preparing,
    Changing { new_epoch: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Handover {
    target: String,
    reason: HandoverReason,
    epoch: u64,
    started_ms: u64,
    phase: Phase,
}

/// What this node last learned about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerView {
    /// The peer's status as last reported.
    pub status: Status,
    /// The peer's epoch as last reported.
    pub epoch: u64,
    /// Own-clock send time of the newest probe the peer answered.
    pub answered_probe_ms: Option<u64>,
    /// Own-clock time the peer was last heard from.
    pub heard_ms: u64,
}

/// One member's HA state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    cfg: Arc<HaConfig>,
    me: String,
    rec: Persisted,
    health: HealthVerdict,
    // "Data behind", as judged against a live active: a "behind" verdict
    // counts only once an active is heard after it (`data_behind_pending`
    // until then). When the active dies its replication stops by
    // necessity, and a "behind" that no live active confirms says nothing
    // about what a takeover would lose.
    data_behind_judged: bool,
    data_behind_pending: bool,
    eligible_since: Option<u64>,
    serving: bool,
    // The lease held (role active) or sought (candidacy, role standby).
    claim: Option<Claim>,
    // A restarted active must re-establish its lease by then, or fence.
    recover_until: Option<u64>,
    // Voter side: the vote in `rec.vote` binds until then (own clock).
    promise_until: u64,
    // After a restart, earlier promises are unknown until then.
    voter_quiet_until: u64,
    // Last evidence of a live active (or start, or a failed election): the
    // base of the election timer.
    quiet_since: u64,
    // Whether an active was heard, or this member was one, since start: it
    // sets how elections are staggered (see `election_at`).
    heard_active: bool,
    highest_seen: u64,
    handover: Option<Handover>,
    peers: BTreeMap<String, PeerView>,
    // Voter side: the highest epoch in which each member is known to have
    // fenced (it said so as a non-serving standby, or it sent `change`).
    // A transfer releases a vote only from an active known to have fenced.
    fenced: BTreeMap<String, u64>,
    next_probe_ms: u64,
    warned_no_candidate: bool,
}

impl Node {
    /// Starts (or restarts) member `me` from its persisted record, or from
    /// [`Persisted::initial`] when there is none. Returns the node and the
    /// actions to execute first (a `Persist` when the record was missing,
    /// `SetServing(false)` always, since nothing may serve before a lease).
    pub fn start(
        config: HaConfig,
        me: &str,
        stored: Option<Persisted>,
        now_ms: u64,
    ) -> Result<(Self, Vec<Action>), HaConfigError> {
        config.validate()?;
        if !config.is_member(me) {
            return Err(HaConfigError::UnknownSelf(me.to_owned()));
        }
        let mut out = Vec::new();
        let rec = match stored.clone() {
            Some(mut rec) => {
                if !config.is_cluster(me) {
                    rec.role = Role::Standby;
                }
                rec
            }
            None => {
                let rec = Persisted::initial();
                out.push(Action::Persist(rec.clone()));
                rec
            }
        };
        let quiet = now_ms + config.lease_ms + config.margin_ms;
        // A voter only moves its vote once the previous promise expired or
        // was released, and persists a vote before granting it, so the
        // persisted vote is the only promise that may still bind: honour it
        // for a full lease. Without a record, any promise may exist.
        let lost = stored.is_none();
        let mut node = Self {
            me: me.to_owned(),
            health: HealthVerdict::default(),
            data_behind_judged: false,
            data_behind_pending: false,
            eligible_since: None,
            serving: false,
            claim: None,
            recover_until: None,
            promise_until: quiet,
            voter_quiet_until: if lost { quiet } else { 0 },
            quiet_since: now_ms,
            heard_active: false,
            highest_seen: rec.epoch.max(rec.vote.as_ref().map_or(0, |v| v.epoch)),
            handover: None,
            peers: BTreeMap::new(),
            fenced: BTreeMap::new(),
            next_probe_ms: now_ms,
            warned_no_candidate: false,
            rec,
            cfg: Arc::new(config),
        };
        out.push(Action::SetServing(false));
        if node.cfg.unsafe_promote_on_silence {
            out.push(record(
                EventKind::Warning,
                Reason::UnsafeConfiguration,
                "unsafePromoteOnSilence is on: a standby promotes when the active is silent, \
                 without a majority; a network partition can produce two actives"
                    .to_owned(),
            ));
        }
        let message = if node.rec.role == Role::Active {
            node.claim = Some(Claim {
                epoch: node.rec.epoch,
                transfer: None,
                started_ms: now_ms,
                grants: BTreeMap::new(),
                refused: BTreeSet::new(),
            });
            node.recover_until = Some(quiet);
            format!(
                "restarted as active in epoch {}; not serving until a majority renews the lease",
                node.rec.epoch
            )
        } else {
            format!("started as standby, epoch {}", node.rec.epoch)
        };
        out.push(record(EventKind::Normal, Reason::Started, message));
        Ok((node, out))
    }

    /// Feeds one event at monotonic time `now_ms` and returns what to do.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let now = now_ms;
        let mut out = Vec::new();
        // Lease expiry is checked before anything else, so no event is ever
        // processed by an active whose lease has run out.
        self.check_lease(now, &mut out);
        match event {
            Event::Health(v) => self.on_health(now, v),
            Event::Message(env) => self.on_message(now, env, &mut out),
            Event::Tick => self.on_tick(now, &mut out),
            Event::ConfigChanged(cfg) => self.on_config(cfg, &mut out),
            Event::Command(cmd) => self.on_command(now, cmd, &mut out),
        }
        self.progress(now, &mut out);
        out
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// The configuration in force.
    pub fn config(&self) -> &HaConfig {
        &self.cfg
    }

    /// The record as last handed out in [`Action::Persist`].
    pub fn persisted(&self) -> &Persisted {
        &self.rec
    }

    /// Persisted role.
    pub fn role(&self) -> Role {
        self.rec.role
    }

    /// Persisted epoch.
    pub fn epoch(&self) -> u64 {
        self.rec.epoch
    }

    /// Whether the node has told the controller to serve.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Whether this is the witness.
    pub fn is_witness(&self) -> bool {
        !self.cfg.is_cluster(&self.me)
    }

    /// The latest health verdict.
    pub fn health(&self) -> HealthVerdict {
        self.health
    }

    /// End of the lease held as active (own clock), if any majority backs it.
    pub fn lease_until_ms(&self) -> Option<u64> {
        if self.rec.role != Role::Active {
            return None;
        }
        self.claim.as_ref().and_then(|c| self.claim_until(c))
    }

    /// End of this member's right to serve (own clock): the lease's end
    /// while the node has told the controller to serve, else `None`. This
    /// is what the controller publishes to the workload as its serving
    /// lease (see [`crate::serving`]); it never reaches past the lease.
    pub fn serving_until_ms(&self) -> Option<u64> {
        if self.serving {
            self.lease_until_ms()
        } else {
            None
        }
    }

    /// Active with a lease still running at `now_ms`.
    pub fn holds_lease(&self, now_ms: u64) -> bool {
        self.lease_until_ms().is_some_and(|u| u > now_ms)
    }

    /// What this node knows of its peers.
    pub fn peers(&self) -> &BTreeMap<String, PeerView> {
        &self.peers
    }

    /// Handover candidates at `now_ms`: standbys that answered a probe sent
    /// within `candidateFreshMs` and said they were healthy, best first.
    pub fn candidates(&self, now_ms: u64) -> Vec<&str> {
        let mut c: Vec<&str> = self
            .peers
            .iter()
            .filter(|(name, v)| {
                self.cfg.is_cluster(name)
                    && v.status.role == Role::Standby
                    && v.status.eligible
                    && v.answered_probe_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) <= self.cfg.candidate_fresh_ms)
            })
            .map(|(name, _)| name.as_str())
            .collect();
        c.sort_by(|a, b| {
            if self.cfg.prefers(a, b) {
                std::cmp::Ordering::Less
            } else if self.cfg.prefers(b, a) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        c
    }

    /// The target of a handover in progress.
    pub fn handover_target(&self) -> Option<&str> {
        self.handover.as_ref().map(|h| h.target.as_str())
    }

    /// The latest time by which the controller must deliver the next
    /// [`Event::Tick`]: the next probe of a claim, or a lease, recovery or
    /// election deadline, whichever is first; `u64::MAX` when none is
    /// pending (the controller ticks every probe interval anyway, which is
    /// also how `change` is resent and handovers time out).
    ///
    /// Only deadlines the next tick acts on count: the controller sleeps
    /// until this time, so one already past that a tick does not clear
    /// wakes it at once, again and again. Before, the probe time counted
    /// without a claim (it moves only during one) and the election time
    /// counted while no election could start: a standby's HA loop spun, and
    /// an old active waiting for `changed` sent a `change` per spin.
    pub fn next_tick_ms(&self) -> u64 {
        let mut t = u64::MAX;
        if self.claim.is_some() {
            t = self.next_probe_ms;
        }
        if let Some(u) = self.lease_until_ms() {
            t = t.min(u);
        }
        if let Some(r) = self.recover_until {
            t = t.min(r);
        }
        if self.may_start_election() {
            t = t.min(self.election_at());
        }
        t
    }

    /// Whether a tick at [`Node::election_at`] starts an election.
    fn may_start_election(&self) -> bool {
        self.rec.role == Role::Standby
            && self.claim.is_none()
            && self.handover.is_none()
            && !self.is_witness()
            && !self.rec.paused
            && self.health.eligible()
            && self.next_epoch().is_some()
    }

    /// The epoch a new election or handover takes: one above every epoch
    /// this member knows of. `None` once that is `u64::MAX`, which no
    /// election reaches by counting (one a millisecond would take 584
    /// million years) but a hand-edited state record or a peer's message
    /// can claim: then there is no later epoch to take, and the member
    /// starts no election and no handover rather than overflow (a panic
    /// with overflow checks, and without them a wrap to epoch 0 that no
    /// voter grants again). An operator resets the records to recover.
    fn next_epoch(&self) -> Option<u64> {
        self.highest_seen
            .max(self.rec.epoch)
            .max(self.rec.vote.as_ref().map_or(0, |v| v.epoch))
            .checked_add(1)
    }

    fn status(&self, now: u64) -> Status {
        let eligible = !self.is_witness() && self.health.eligible();
        let preempt_ready = eligible
            && self.cfg.preempt_after_ms.is_some_and(|p| {
                self.eligible_since
                    .is_some_and(|s| now.saturating_sub(s) >= p)
            });
        Status {
            role: self.rec.role,
            serving: self.serving,
            eligible,
            preempt_ready,
        }
    }

    fn envelope(&self, to: &str, body: Body) -> Action {
        Action::Send(Envelope {
            version: PROTOCOL_VERSION,
            from: self.me.clone(),
            to: to.to_owned(),
            epoch: self.rec.epoch,
            body,
        })
    }

    fn others(&self) -> Vec<String> {
        self.cfg
            .member_names()
            .filter(|n| *n != self.me)
            .map(str::to_owned)
            .collect()
    }

    fn claim_until(&self, c: &Claim) -> Option<u64> {
        let q = self.cfg.quorum();
        let mut sent: Vec<u64> = c.grants.values().copied().collect();
        if sent.len() < q {
            return None;
        }
        sent.sort_unstable_by(|a, b| b.cmp(a));
        Some(sent[q - 1] + self.cfg.lease_ms - self.cfg.margin_ms)
    }

    fn claim_live(&self, now: u64) -> bool {
        self.claim
            .as_ref()
            .and_then(|c| self.claim_until(c))
            .is_some_and(|u| u > now)
    }

    /// When this standby's election timer fires: a lease (and the margin)
    /// after the last sign of an active, later the less preferred it is.
    ///
    /// Once an active was heard, every standby's timer runs from that
    /// active's last probes, which reach them all within a probe interval,
    /// so a probe interval per rank lets the preferred one ask first. Before
    /// (a fresh install, or every member restarted), each timer runs from its
    /// own start, and starts differ by more than that: a slow API server
    /// delays one controller's first step by a second or more. There a lease
    /// per rank keeps para 0088's "then priority" unless the preferred
    /// cluster starts a whole lease after the others, at the cost of a lease
    /// per rank when it does not start at all.
    fn election_at(&self) -> u64 {
        let stagger = if self.heard_active {
            self.cfg.probe_interval_ms
        } else {
            self.cfg.lease_ms
        };
        self.quiet_since
            + self.cfg.lease_ms
            + self.cfg.margin_ms
            + self.cfg.rank(&self.me) as u64 * stagger
    }

    fn persist(&self, out: &mut Vec<Action>) {
        out.push(Action::Persist(self.rec.clone()));
    }

    // ---- lease holder side ----

    fn check_lease(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rec.role != Role::Active {
            return;
        }
        if self.claim_live(now) {
            return;
        }
        if self.serving {
            if self.cfg.fencing_disabled_for_tests {
                return;
            }
            self.fence(
                now,
                Reason::Fenced,
                format!(
                    "lease for epoch {} ran out: no majority of voters renewed it; stopped serving",
                    self.rec.epoch
                ),
                out,
            );
        } else if self.recover_until.is_none_or(|r| now >= r) {
            self.fence(
                now,
                Reason::Fenced,
                format!(
                    "could not re-establish the lease for epoch {} after restart",
                    self.rec.epoch
                ),
                out,
            );
        }
    }

    /// Stop serving, then persist standby. Stopping first keeps the fence
    /// effective even if the write fails.
    fn fence(&mut self, now: u64, reason: Reason, message: String, out: &mut Vec<Action>) {
        if self.serving {
            self.serving = false;
            out.push(Action::SetServing(false));
        }
        self.rec.role = Role::Standby;
        self.claim = None;
        self.recover_until = None;
        self.handover = None;
        self.quiet_since = now;
        self.heard_active = true;
        // A vote for ourselves only protected our own lease, now given up.
        if self.rec.vote.as_ref().is_some_and(|v| v.to == self.me) {
            self.promise_until = now;
        }
        self.persist(out);
        out.push(record(EventKind::Warning, reason, message));
    }

    fn send_probes(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(c) = &self.claim else { return };
        let req = LeaseRequest {
            epoch: c.epoch,
            transfer: c.transfer.clone(),
        };
        let me = self.me.clone();
        if self.vote(now, &me, &req, out).is_ok()
            && let Some(c) = &mut self.claim
        {
            c.grants.insert(me, now);
        }
        let status = self.status(now);
        for peer in self.others() {
            out.push(self.envelope(
                &peer,
                Body::Probe {
                    sent_ms: now,
                    status,
                    lease: Some(req.clone()),
                },
            ));
        }
        self.next_probe_ms = now + self.cfg.probe_interval_ms;
    }

    fn start_candidacy(
        &mut self,
        now: u64,
        epoch: u64,
        transfer: Option<Transfer>,
        out: &mut Vec<Action>,
    ) {
        let message = match &transfer {
            Some(t) => format!(
                "{} handed over in epoch {}; asking voters for epoch {epoch}",
                t.from, t.epoch
            ),
            None => format!("no live active; asking voters for epoch {epoch}"),
        };
        self.claim = Some(Claim {
            epoch,
            transfer,
            started_ms: now,
            grants: BTreeMap::new(),
            refused: BTreeSet::new(),
        });
        out.push(record(EventKind::Normal, Reason::ElectionStarted, message));
        self.send_probes(now, out);
    }

    fn promote(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(c) = &self.claim else { return };
        let epoch = c.epoch;
        let transfer = c.transfer.clone();
        self.rec.role = Role::Active;
        self.rec.epoch = epoch;
        self.highest_seen = self.highest_seen.max(epoch);
        self.heard_active = true;
        self.persist(out);
        self.serving = true;
        out.push(Action::SetServing(true));
        out.push(record(
            EventKind::Normal,
            Reason::Promoted,
            format!("active in epoch {epoch}, lease backed by a majority of voters"),
        ));
        if let Some(t) = &transfer {
            out.push(self.envelope(&t.from, Body::Changed { new_epoch: epoch }));
        }
        self.handover = None;
        self.warned_no_candidate = false;
        // Tell everyone at once, so the old active and the other standbys
        // learn the new epoch without waiting a probe interval.
        self.send_probes(now, out);
    }

    // ---- voter side ----

    /// Decides a vote and, if it changes the persisted vote, persists it
    /// before the caller sends the answer. `Err` carries the epoch this
    /// voter is bound to.
    fn vote(
        &mut self,
        now: u64,
        requester: &str,
        req: &LeaseRequest,
        out: &mut Vec<Action>,
    ) -> Result<(), u64> {
        let voted_epoch = self.rec.vote.as_ref().map_or(0, |v| v.epoch);
        let same = self
            .rec
            .vote
            .as_ref()
            .is_some_and(|v| v.epoch == req.epoch && v.to == requester);
        if !same {
            if req.epoch <= voted_epoch {
                return Err(voted_epoch);
            }
            // A transfer frees a vote bound to the old active only once
            // that active is known to have fenced in the epoch it hands over
            // (defence in depth: the candidate relays the transfer, and a
            // candidate's word alone must not free votes).
            let released = match (&self.rec.vote, &req.transfer) {
                (Some(v), Some(t)) => {
                    v.to == t.from
                        && v.epoch == t.epoch
                        && self.fenced.get(&t.from).is_some_and(|e| *e >= t.epoch)
                }
                _ => false,
            };
            let bound_to_other = match &self.rec.vote {
                Some(v) => v.to != requester && now < self.promise_until,
                None => false,
            };
            let quiet = now < self.voter_quiet_until
                && self.rec.vote.as_ref().is_none_or(|v| v.to != requester);
            if (bound_to_other || quiet) && !released {
                return Err(voted_epoch);
            }
            self.rec.vote = Some(Vote {
                epoch: req.epoch,
                to: requester.to_owned(),
            });
            self.highest_seen = self.highest_seen.max(req.epoch);
            self.persist(out);
        }
        self.promise_until = self.promise_until.max(now + self.cfg.lease_ms);
        Ok(())
    }

    // ---- events ----

    fn on_health(&mut self, now: u64, mut v: HealthVerdict) {
        if self.is_witness() {
            return;
        }
        // Data found current is believed at once; "behind" waits for a
        // live active to confirm it (see `confirm_data_behind`), since the
        // death of the active also stops replication (a WAL receiver no
        // longer streams, a marker ages) and must not keep every standby
        // from taking over.
        if v.data_behind {
            self.data_behind_pending |= !self.data_behind_judged;
        } else {
            self.data_behind_judged = false;
            self.data_behind_pending = false;
        }
        v.data_behind = self.data_behind_judged;
        if v.eligible() {
            self.eligible_since.get_or_insert(now);
        } else {
            self.eligible_since = None;
        }
        if !v.abnormal {
            self.warned_no_candidate = false;
        }
        self.health = v;
    }

    fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.claim.is_some() && now >= self.next_probe_ms {
            self.send_probes(now, out);
        }
        if let Some(h) = &self.handover
            && let Phase::Changing { new_epoch } = h.phase
        {
            let (target, epoch) = (h.target.clone(), h.epoch);
            out.push(self.envelope(&target, Body::Change { epoch, new_epoch }));
        }
        if self.may_start_election()
            && now >= self.election_at()
            && let Some(epoch) = self.next_epoch()
        {
            self.start_candidacy(now, epoch, None, out);
        }
    }

    fn on_config(&mut self, cfg: HaConfig, out: &mut Vec<Action>) {
        let verdict = cfg.validate().and_then(|()| {
            if cfg.is_member(&self.me) && cfg.is_cluster(&self.me) == self.cfg.is_cluster(&self.me)
            {
                Ok(())
            } else {
                Err(HaConfigError::UnknownSelf(self.me.clone()))
            }
        });
        match verdict {
            Err(e) => out.push(record(
                EventKind::Warning,
                Reason::ConfigRejected,
                format!("new HA configuration rejected, keeping the previous one: {e}"),
            )),
            Ok(()) if !self.cfg.runtime_compatible(&cfg) => out.push(record(
                EventKind::Warning,
                Reason::ConfigRejected,
                "members, witness, leaseMs, marginMs and unsafePromoteOnSilence cannot change \
                 while running; restart every member to apply"
                    .to_owned(),
            )),
            Ok(()) => {
                self.cfg = Arc::new(cfg);
                out.push(record(
                    EventKind::Normal,
                    Reason::ConfigApplied,
                    "new HA configuration applied".to_owned(),
                ));
            }
        }
    }

    fn on_command(&mut self, now: u64, cmd: Command, out: &mut Vec<Action>) {
        match cmd {
            Command::Pause | Command::Resume => {
                let pause = cmd == Command::Pause;
                if self.rec.paused != pause {
                    self.rec.paused = pause;
                    self.persist(out);
                }
                let (reason, what) = if pause {
                    (Reason::Paused, "paused")
                } else {
                    (Reason::Resumed, "resumed")
                };
                out.push(record(
                    EventKind::Normal,
                    reason,
                    format!("automatic failover {what} by operator"),
                ));
            }
            Command::Switchover { target } => {
                let refusal = if self.rec.role != Role::Active || !self.serving {
                    Some(format!(
                        "{} is not the serving active; send the switchover to the active",
                        self.me
                    ))
                } else if target == self.me {
                    Some(format!("{target} is already active"))
                } else if !self.cfg.is_cluster(&target) {
                    Some(format!("{target} is not a cluster of this group"))
                } else if let Some(h) = &self.handover {
                    Some(format!("a handover to {} is already in progress", h.target))
                } else if !self.candidates(now).contains(&target.as_str()) {
                    Some(format!(
                        "{target} is not a fresh healthy candidate (it has not answered a recent \
                         probe as a healthy standby)"
                    ))
                } else {
                    None
                };
                match refusal {
                    Some(message) => {
                        out.push(record(EventKind::Warning, Reason::CommandRefused, message));
                    }
                    None => self.begin_handover(now, target, HandoverReason::Switchover, out),
                }
            }
        }
    }

    fn on_message(&mut self, now: u64, env: Envelope, out: &mut Vec<Action>) {
        if env.version != PROTOCOL_VERSION
            || env.to != self.me
            || env.from == self.me
            || !self.cfg.is_member(&env.from)
        {
            return;
        }
        let from = env.from.clone();
        self.highest_seen = self.highest_seen.max(env.epoch);
        // A lease holder yields to a later epoch only when the sender claims
        // a live lease in it (it serves as active). While this lease lives,
        // no majority can have backed anyone else, so any other claim of a
        // later epoch is stale or false (a record edited by hand, a peer
        // restarted from one): it must not stop the one live active.
        let yields =
            self.rec.role != Role::Active || !self.claim_live(now) || claims_live_lease(&env.body);
        if env.epoch > self.rec.epoch && yields {
            // Someone was active in a later epoch; an active here has lost
            // its lease already (majorities intersect), so it steps down.
            if self.rec.role == Role::Active {
                self.fence(
                    now,
                    Reason::SteppedDown,
                    format!("{from} reports epoch {} > {}", env.epoch, self.rec.epoch),
                    out,
                );
            }
            self.rec.epoch = env.epoch;
            self.persist(out);
            if self.claim.as_ref().is_some_and(|c| c.epoch <= env.epoch) {
                self.claim = None;
            }
        }
        match env.body {
            Body::Probe {
                sent_ms,
                status,
                lease,
            } => {
                self.observe(now, &from, env.epoch, status, None, out);
                if lease.is_none() {
                    // An announcement (see `announce_fenced`), not a probe
                    // that expects an answer.
                    return;
                }
                let answer = lease.map(|req| match self.vote(now, &from, &req, out) {
                    Ok(()) => LeaseAnswer::Granted { epoch: req.epoch },
                    Err(voted_epoch) => LeaseAnswer::Denied {
                        epoch: req.epoch,
                        voted_epoch,
                    },
                });
                let reply = Body::ProbeReply {
                    probe_sent_ms: sent_ms,
                    status: self.status(now),
                    lease: answer,
                };
                out.push(self.envelope(&from, reply));
            }
            Body::ProbeReply {
                probe_sent_ms,
                status,
                lease,
            } => {
                // The reply echoes our own send time, which a lease is then
                // counted from. One from the future answers no probe of
                // ours: counted, it would stretch the lease past what the
                // voter promised (and near `u64::MAX` overflow it), and
                // make the peer look fresh for as long.
                if probe_sent_ms > now {
                    return;
                }
                self.observe(now, &from, env.epoch, status, Some(probe_sent_ms), out);
                match lease {
                    Some(LeaseAnswer::Granted { epoch }) => {
                        if let Some(c) = &mut self.claim
                            && c.epoch == epoch
                        {
                            let t = c.grants.entry(from).or_insert(probe_sent_ms);
                            *t = (*t).max(probe_sent_ms);
                        }
                    }
                    Some(LeaseAnswer::Denied { epoch, voted_epoch }) => {
                        self.highest_seen = self.highest_seen.max(voted_epoch);
                        if voted_epoch >= epoch
                            && let Some(c) = &mut self.claim
                            && c.epoch == epoch
                        {
                            c.refused.insert(from);
                        }
                    }
                    None => {}
                }
            }
            Body::Prepare { epoch, reason } => self.on_prepare(now, &from, epoch, reason, out),
            Body::Ready { epoch } => self.on_ready(now, &from, epoch, out),
            Body::Refuse { epoch, reason } => {
                if let Some(h) = &self.handover
                    && h.target == from
                    && h.epoch == epoch
                    && h.phase == Phase::Preparing
                {
                    self.handover = None;
                    if let Some(v) = self.peers.get_mut(&from) {
                        v.status.eligible = false;
                    }
                    out.push(record(
                        EventKind::Warning,
                        Reason::HandoverAborted,
                        format!("{from} refused to take over: {reason}"),
                    ));
                }
            }
            Body::Change { epoch, new_epoch } => self.on_change(now, &from, epoch, new_epoch, out),
            Body::Changed { new_epoch } => {
                if let Some(h) = &self.handover
                    && h.target == from
                    && h.phase == (Phase::Changing { new_epoch })
                {
                    self.handover = None;
                    if self.rec.role == Role::Active {
                        // Only reachable with fencing disabled: the seed's S910.
                        self.fence(
                            now,
                            Reason::SteppedDown,
                            format!("{from} confirmed it is active"),
                            out,
                        );
                    }
                    out.push(record(
                        EventKind::Normal,
                        Reason::HandoverComplete,
                        format!("{from} confirmed it is active in epoch {new_epoch}"),
                    ));
                }
            }
        }
    }

    /// An active was heard: a pending "data behind" is real (the active is
    /// alive and this member still is not current).
    fn confirm_data_behind(&mut self) {
        if self.data_behind_pending {
            self.data_behind_pending = false;
            self.data_behind_judged = true;
            self.health.data_behind = true;
            self.eligible_since = None;
        }
    }

    /// Updates the view of a peer and reacts to a competing active (para
    /// 0088, both active: higher epoch, then preference, stays).
    fn observe(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        status: Status,
        answered: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let view = self.peers.entry(from.to_owned()).or_insert(PeerView {
            status,
            epoch,
            answered_probe_ms: None,
            heard_ms: now,
        });
        let newer = match (answered, view.answered_probe_ms) {
            (Some(a), Some(b)) => a >= b,
            _ => true,
        };
        if newer {
            view.status = status;
            view.epoch = epoch;
            view.heard_ms = now;
            if answered.is_some() {
                view.answered_probe_ms = answered;
            }
        }
        if status.role == Role::Active {
            self.fenced.remove(from);
        } else if !status.serving {
            let e = self.fenced.entry(from.to_owned()).or_insert(epoch);
            *e = (*e).max(epoch);
        }
        if status.role == Role::Active && epoch >= self.rec.epoch {
            self.confirm_data_behind();
        }
        if status.role != Role::Active || epoch < self.rec.epoch {
            return;
        }
        match self.rec.role {
            Role::Active => {
                // Para 0088 (both active: the preferred stays) for the
                // actives that can coexist in one epoch: without the
                // quorum (the unsafe opt-in), or a restarted active that has
                // not re-established its lease. A live lease is never given
                // up for a same-epoch claim: one epoch has one majority.
                let may_yield = self.cfg.unsafe_promote_on_silence || !self.claim_live(now);
                if epoch == self.rec.epoch && self.cfg.prefers(from, &self.me) && may_yield {
                    self.fence(
                        now,
                        Reason::SteppedDown,
                        format!("{from} is also active in epoch {epoch} and is preferred"),
                        out,
                    );
                }
            }
            Role::Standby => {
                self.quiet_since = now;
                self.heard_active = true;
                // A serving active answers for its epoch; an election
                // without a handover cannot win against its voters.
                if status.serving && self.claim.as_ref().is_some_and(|c| c.transfer.is_none()) {
                    self.claim = None;
                }
            }
        }
    }
}

impl Node {
    fn on_prepare(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        reason: HandoverReason,
        out: &mut Vec<Action>,
    ) {
        // Only an active prepares a handover: it is alive.
        self.confirm_data_behind();
        let refusal = if self.is_witness() {
            Some("the witness holds no workloads".to_owned())
        } else if epoch < self.rec.epoch {
            Some(format!(
                "stale epoch {epoch}, this member knows {}",
                self.rec.epoch
            ))
        } else if self.rec.role == Role::Active {
            Some(format!("{} is active itself", self.me))
        } else if self.health.data_behind {
            Some(format!(
                "{}'s data is not current (a synchronization component is down or lagging)",
                self.me
            ))
        } else if !self.health.eligible() {
            Some(format!(
                "{} is not healthy (abnormal: {}, score at or above threshold: {})",
                self.me, self.health.abnormal, self.health.meets_threshold
            ))
        } else if self.claim.as_ref().is_some_and(|c| c.transfer.is_some()) {
            Some("already taking over".to_owned())
        } else {
            None
        };
        match refusal {
            Some(reason) => out.push(self.envelope(from, Body::Refuse { epoch, reason })),
            None => {
                // The active is alive and handing over; do not run an
                // election of our own meanwhile.
                self.quiet_since = now;
                self.heard_active = true;
                self.claim = None;
                out.push(record(
                    EventKind::Normal,
                    Reason::HandoverReady,
                    format!("{from} prepares a handover ({reason:?}) in epoch {epoch}; ready"),
                ));
                out.push(self.envelope(from, Body::Ready { epoch }));
            }
        }
    }

    fn on_ready(&mut self, now: u64, from: &str, epoch: u64, out: &mut Vec<Action>) {
        let Some(h) = &self.handover else { return };
        if h.target != from
            || h.epoch != epoch
            || h.phase != Phase::Preparing
            || self.rec.role != Role::Active
            || self.rec.epoch != epoch
            || !self.serving
        {
            return;
        }
        let reason = h.reason;
        // No epoch left: the handover cannot happen, and times out as one
        // the target never confirms; the active keeps serving meanwhile.
        let Some(new_epoch) = self.next_epoch() else {
            return;
        };
        // Fence first: stop serving, then persist standby together with the
        // vote that lets `from` take the next epoch. Only then `change`.
        if !self.cfg.fencing_disabled_for_tests {
            self.serving = false;
            out.push(Action::SetServing(false));
            self.rec.role = Role::Standby;
            self.claim = None;
        }
        self.rec.vote = Some(Vote {
            epoch: new_epoch,
            to: from.to_owned(),
        });
        self.promise_until = now + self.cfg.lease_ms;
        self.highest_seen = new_epoch;
        self.quiet_since = now;
        self.persist(out);
        out.push(record(
            EventKind::Normal,
            Reason::HandedOver,
            format!(
                "handover ({reason:?}): fenced in epoch {epoch}, asking {from} to become active in epoch {new_epoch}"
            ),
        ));
        out.push(self.envelope(from, Body::Change { epoch, new_epoch }));
        self.announce_fenced(now, from, out);
        if let Some(h) = &mut self.handover {
            h.phase = Phase::Changing { new_epoch };
            h.started_ms = now;
        }
    }

    fn on_change(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        new_epoch: u64,
        out: &mut Vec<Action>,
    ) {
        if self.is_witness() || new_epoch <= epoch || new_epoch < self.rec.epoch {
            return;
        }
        if self.rec.role == Role::Active {
            if self.rec.epoch == new_epoch {
                // A retried `change`: answer again, change nothing.
                out.push(self.envelope(from, Body::Changed { new_epoch }));
            }
            return;
        }
        if new_epoch == self.rec.epoch || self.claim.as_ref().is_some_and(|c| c.epoch == new_epoch)
        {
            return;
        }
        // `change` is sent only after its sender fenced (the ordering
        // contract): evidence for this member's own vote.
        let e = self.fenced.entry(from.to_owned()).or_insert(epoch);
        *e = (*e).max(epoch);
        let transfer = Transfer {
            from: from.to_owned(),
            epoch,
        };
        self.start_candidacy(now, new_epoch, Some(transfer), out);
    }

    /// Tells every voter but the target (which has `change`) that this
    /// member no longer serves: a status without a lease request, which is
    /// not answered. Voters bound to it may then release their vote to the
    /// target of its handover.
    fn announce_fenced(&self, now: u64, target: &str, out: &mut Vec<Action>) {
        if self.serving {
            return;
        }
        let status = self.status(now);
        for peer in self.others().into_iter().filter(|p| p != target) {
            out.push(self.envelope(
                &peer,
                Body::Probe {
                    sent_ms: now,
                    status,
                    lease: None,
                },
            ));
        }
    }

    fn begin_handover(
        &mut self,
        now: u64,
        target: String,
        reason: HandoverReason,
        out: &mut Vec<Action>,
    ) {
        let epoch = self.rec.epoch;
        out.push(record(
            EventKind::Normal,
            Reason::HandoverStarted,
            format!("handover ({reason:?}) to {target}: prepare sent in epoch {epoch}"),
        ));
        out.push(self.envelope(&target, Body::Prepare { epoch, reason }));
        self.handover = Some(Handover {
            target,
            reason,
            epoch,
            started_ms: now,
            phase: Phase::Preparing,
        });
    }

    /// Transitions that follow from the state alone: promotion once a
    /// majority voted, recovery of a restarted active, handover start and
    /// timeouts, giving up an election.
    fn progress(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rec.role == Role::Active && !self.serving && self.claim_live(now) {
            self.serving = true;
            self.recover_until = None;
            out.push(Action::SetServing(true));
            out.push(record(
                EventKind::Normal,
                Reason::Recovered,
                format!("lease for epoch {} re-established; serving", self.rec.epoch),
            ));
        }
        if self.rec.role == Role::Standby {
            if self.claim_live(now) {
                self.promote(now, out);
            } else if let Some(c) = &self.claim {
                // Once too many voters are bound to higher epochs, waiting
                // out the lease only keeps this member's own vote (and the
                // others' elections) tied up: give up at once.
                let lost = self.cfg.member_names().count() - c.refused.len() < self.cfg.quorum();
                if lost || now >= c.started_ms + self.cfg.lease_ms {
                    let epoch = c.epoch;
                    let message = if lost {
                        let refused: Vec<&str> = c.refused.iter().map(String::as_str).collect();
                        format!(
                            "epoch {epoch} cannot reach a majority: {} voted in it or later for another member",
                            refused.join(", ")
                        )
                    } else {
                        format!("no majority of voters granted epoch {epoch} in time")
                    };
                    self.claim = None;
                    self.quiet_since = now;
                    // The vote for ourselves protected a lease we no longer
                    // seek: free it for the next candidate, as `fence` does.
                    if self.rec.vote.as_ref().is_some_and(|v| v.to == self.me) {
                        self.promise_until = now;
                    }
                    out.push(record(EventKind::Warning, Reason::ElectionFailed, message));
                }
            }
        }
        if let Some(h) = &self.handover {
            let timeout = match h.phase {
                Phase::Preparing => self.cfg.candidate_fresh_ms,
                Phase::Changing { .. } => self.cfg.lease_ms + self.cfg.margin_ms,
            };
            if now >= h.started_ms + timeout {
                let message = format!("handover to {} timed out ({:?})", h.target, h.phase);
                self.handover = None;
                out.push(record(EventKind::Warning, Reason::HandoverAborted, message));
            }
        }
        if self.rec.role == Role::Active && self.serving && self.handover.is_none() {
            self.maybe_start_handover(now, out);
        }
    }

    fn maybe_start_handover(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rec.paused {
            return;
        }
        if self.health.abnormal {
            match self.candidates(now).first().map(|s| (*s).to_owned()) {
                Some(target) => self.begin_handover(now, target, HandoverReason::Abnormal, out),
                None if !self.warned_no_candidate => {
                    self.warned_no_candidate = true;
                    out.push(record(
                        EventKind::Warning,
                        Reason::NoCandidate,
                        "abnormal, but no standby answered the recent probes as healthy; \
                         staying active (para 0160)"
                            .to_owned(),
                    ));
                }
                None => {}
            }
            return;
        }
        if self.cfg.preempt_after_ms.is_none() {
            return;
        }
        let target = self
            .candidates(now)
            .into_iter()
            .find(|c| {
                self.cfg.prefers(c, &self.me)
                    && self.peers.get(*c).is_some_and(|v| v.status.preempt_ready)
            })
            .map(str::to_owned);
        if let Some(target) = target {
            self.begin_handover(now, target, HandoverReason::Preempt, out);
        }
    }
}

/// Whether a message's sender claims to hold a live lease: it reports
/// itself active and serving, which the core only does with a live lease.
fn claims_live_lease(body: &Body) -> bool {
    match body {
        Body::Probe { status, .. } | Body::ProbeReply { status, .. } => {
            status.role == Role::Active && status.serving
        }
        _ => false,
    }
}

fn record(kind: EventKind, reason: Reason, message: String) -> Action {
    Action::Record(Record {
        kind,
        reason,
        message,
    })
}
