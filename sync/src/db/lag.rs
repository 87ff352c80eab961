//! Replication lag: the primary's view of its standbys ([`ReplicaLag`]).
//!
//! The standby's own view ([`Lag`]), WAL positions ([`Lsn`]) and the two
//! rules on whether a standby is current (kept current while an active
//! lives; ready to promote at the FIG. 9 `prepare`) are
//! `counterweight_core::replication`'s, shared with the controller's health
//! check, and re-exported here.

use serde::{Deserialize, Serialize};

pub use counterweight_core::replication::{Lag, Lsn, RefuseReason, within_failover_lag};

/// One standby as the primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLag {
    /// The standby's `application_name`.
    pub application_name: String,
    /// Walsender state (`streaming`, `catchup`, ...).
    pub state: String,
    /// `async`, `sync`, `potential` or `quorum`.
    pub sync_state: String,
    /// Primary's current position minus the standby's replay position.
    pub bytes: Option<u64>,
    /// Primary's current position minus what was sent.
    pub unsent_bytes: Option<u64>,
    /// `replay_lag` in seconds (time for recent WAL to become visible there).
    pub replay_seconds: Option<f64>,
}
