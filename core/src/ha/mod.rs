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
//!   active role it rests on. It completes when it is *handed over*: the
//!   pods are made to serve by a task beside the loop, which a later
//!   `SetServing(false)` supersedes (a pod is never made to serve after the
//!   fence that follows has begun).
//! - [`Action::Send`] is fire-and-forget: loss, delay, duplication and
//!   reordering are tolerated; retries come from the state machine.
//! - [`Action::Record`] completes when it is queued; the Event is written
//!   beside the loop.
//!
//! **Only the fence may hold up a step.** The lease lives on renewals and
//! answers to peers, which need the loop to take its next step on time; a
//! step that waits for the workload to catch up lets the lease run out on a
//! cluster that is merely busy. So of the workload's effects only
//! `SetServing(false)` is awaited, because the `Persist` and `Send` after it
//! are safe only once nothing serves. Making pods serve, restarting the
//! fenced ones, Events, and the informational keys of the record (the HA
//! view, the last transition, the `serving` flag) all run beside the loop;
//! a `Persist` is awaited, but bounded by `marginMs` and failed if it runs
//! out. (`tests/e2e/tests/bulk_promotion.rs` holds the controller to this:
//! a promotion of 2,000 service pods, with the lease's renewals watched
//! throughout.)
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
//!
//! # Where each part lives
//!
//! This file holds the [`Node`], its start and its accessors. Each
//! sub-protocol is an `impl Node` of its own: `lease.rs` (claims, votes,
//! elections, the fence), `probes.rs` (FIG. 10 probes and what they tell
//! of peers), `handover.rs` (FIG. 9), `messages.rs` (a peer message's
//! checks and dispatch), `inputs.rs` (health, ticks, configuration,
//! commands). The types that cross the boundary are in `io.rs` (commands,
//! events, reasons, actions), `record.rs` (what is persisted) and
//! `protocol.rs` (the wire messages). The model checker
//! (`core/tests/model.rs`) drives this code through [`Node::handle`].

mod config;
mod handover;
mod inputs;
mod io;
mod lease;
mod messages;
mod probes;
mod protocol;
mod record;
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

pub use io::{Action, Command, Event, EventKind, Reason, Record};
pub use record::{Persisted, Vote};

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

    fn persist(&self, out: &mut Vec<Action>) {
        out.push(Action::Persist(self.rec.clone()));
    }

    // ---- lease holder side ----

    // ---- voter side ----

    // ---- events ----
}

fn record(kind: EventKind, reason: Reason, message: String) -> Action {
    Action::Record(Record {
        kind,
        reason,
        message,
    })
}
