//! Peer protocol messages: the FIG. 9 handshake, the FIG. 10 probes, and the
//! lease votes that make both safe. Versioned JSON, one envelope per message.

use serde::{Deserialize, Serialize};

use crate::state::Role;

/// Version carried by every envelope; a receiver drops other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// One message between two members of the group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Always [`PROTOCOL_VERSION`] when sent by this code.
    pub version: u32,
    /// Sender's member name.
    pub from: String,
    /// Receiver's member name.
    pub to: String,
    /// Sender's current epoch (the epoch of its role).
    pub epoch: u64,
    /// What the message says.
    pub body: Body,
}

/// A node's status as carried by probes and their replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Role as persisted (the witness reports standby).
    pub role: Role,
    /// Serving right now (active with a live lease).
    pub serving: bool,
    /// Healthy (S ≥ D and not abnormal): may take over.
    pub eligible: bool,
    /// Eligible for at least the configured preemption period.
    pub preempt_ready: bool,
}

/// A request for a vote (a lease grant) for `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    /// The epoch the sender holds or wants.
    pub epoch: u64,
    /// Set when the previous active handed its role over (FIG. 9) after
    /// fencing: voters still bound to that active may then vote at once.
    pub transfer: Option<Transfer>,
}

/// Proof-of-handover carried by a lease request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transfer {
    /// The fenced former active.
    pub from: String,
    /// The epoch it was active in.
    pub epoch: u64,
}

/// A voter's answer to a [`LeaseRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "answer")]
pub enum LeaseAnswer {
    /// The voter is bound to the requester until its own clock passes
    /// receipt time + `leaseMs`.
    Granted {
        /// The epoch granted.
        epoch: u64,
    },
    /// Bound to someone else, or the epoch is not new enough.
    Denied {
        /// The epoch asked for.
        epoch: u64,
        /// The highest epoch the voter has voted in.
        voted_epoch: u64,
    },
}

/// Why a handover is happening; shown in Events and to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HandoverReason {
    /// The active's health verdict is abnormal (FIG. 9).
    Abnormal,
    /// An operator asked for it.
    Switchover,
    /// A preferred cluster has been healthy for the preemption period.
    Preempt,
}

/// Message bodies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Body {
    /// FIG. 10 S1001: status, optionally with a lease (vote) request.
    Probe {
        /// Sender's monotonic time at sending; echoed back to judge freshness.
        sent_ms: u64,
        /// Sender's status.
        status: Status,
        /// Renewal (active) or acquisition (candidate) request.
        lease: Option<LeaseRequest>,
    },
    /// FIG. 10 S1003: answer to a probe.
    ProbeReply {
        /// The `sent_ms` of the probe answered, in the prober's clock.
        probe_sent_ms: u64,
        /// Replier's status.
        status: Status,
        /// The vote, if the probe asked for one.
        lease: Option<LeaseAnswer>,
    },
    /// FIG. 9 S903: get ready to take over.
    Prepare {
        /// The sender's active epoch.
        epoch: u64,
        /// Why.
        reason: HandoverReason,
    },
    /// FIG. 9 S905: ready (healthy standby).
    Ready {
        /// Echo of the prepare's epoch.
        epoch: u64,
    },
    /// FIG. 9 S905, negative.
    Refuse {
        /// Echo of the prepare's epoch.
        epoch: u64,
        /// Human-readable reason.
        reason: String,
    },
    /// FIG. 9 S907: take over in `new_epoch`. Sent only after the sender has
    /// fenced itself and voted for the receiver in `new_epoch`.
    Change {
        /// The sender's (former) active epoch.
        epoch: u64,
        /// The epoch the receiver is to be active in.
        new_epoch: u64,
    },
    /// FIG. 9 S909: the receiver of `change` is active in `new_epoch`.
    Changed {
        /// The new active epoch.
        new_epoch: u64,
    },
}

/// A message that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not a valid envelope.
    #[error("malformed peer message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Another protocol version.
    #[error("peer message has protocol version {got}, this node speaks {PROTOCOL_VERSION}")]
    Version {
        /// The version received.
        got: u32,
    },
}

impl Envelope {
    /// Encodes as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, ProtocolError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Decodes JSON and checks the version. The caller bounds the size and
    /// authenticates `from` (certificate SAN) before handing it to the node.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let env: Envelope = serde_json::from_slice(bytes)?;
        if env.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version { got: env.version });
        }
        Ok(env)
    }
}
