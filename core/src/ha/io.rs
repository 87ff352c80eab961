//! What goes into the state machine and what comes out: operator commands,
//! events, the reasons of what it records, and the actions the controller
//! carries out in order.

use super::*;

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
