//! Replication lag and the readiness rule of the prepare step.
//!
//! A standby answers FIG. 9 `prepare` with `ready` only if taking over would
//! lose at most `maxLagBytes` of WAL: Patroni's `maximum_lag_on_failover`.
//! The best measure is the primary's current WAL position minus what the
//! standby has replayed (the active can put its position in the prepare);
//! without it, what the standby has received minus replayed is a lower
//! bound.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::SyncError;

/// A WAL position (`pg_lsn`), e.g. `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Bytes from `earlier` to `self`, zero if `earlier` is ahead (a
    /// standby can briefly report a replay position past a stale primary
    /// sample; that is no lag, not a wrap-around).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl FromStr for Lsn {
    type Err = SyncError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SyncError::Parse {
            what: "a WAL position like 16/B374D848",
            value: s.to_owned(),
        };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Lag of the local server as a standby sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// The server is in recovery (a standby).
    pub in_recovery: bool,
    /// A WAL receiver is streaming from a primary right now.
    pub streaming: bool,
    /// Last WAL position received and flushed (`pg_last_wal_receive_lsn`).
    pub received: Option<Lsn>,
    /// Last WAL position replayed (`pg_last_wal_replay_lsn`).
    pub replayed: Option<Lsn>,
    /// `received - replayed`, bytes: WAL here but not yet visible.
    pub bytes: Option<u64>,
    /// Seconds since the last replayed transaction's commit, or 0 when all
    /// received WAL is replayed (an idle primary is not lag).
    pub seconds: Option<f64>,
    /// Replay is paused (`pg_wal_replay_pause`).
    pub replay_paused: bool,
}

impl Lag {
    /// Bytes behind a primary whose current position is `primary`, from the
    /// replayed position; falls back to [`Lag::bytes`] without one.
    pub fn bytes_behind(&self, primary: Option<Lsn>) -> Option<u64> {
        match (primary, self.replayed) {
            (Some(p), Some(r)) => Some(p.bytes_since(r)),
            _ => self.bytes,
        }
    }
}

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

/// Why a standby refuses to take over. Its [`fmt::Display`] is the text of
/// the FIG. 9 `refuse` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefuseReason {
    /// The local server is a primary, not a standby: nothing to promote.
    #[error("the local database is not a standby")]
    NotAStandby,
    /// The lag could not be measured (server down, no WAL position).
    #[error("replication lag is unknown: {0}")]
    LagUnknown(String),
    /// More WAL would be lost than the policy allows.
    #[error("replication lag {lag_bytes} bytes exceeds maxLagBytes {max_lag_bytes}")]
    LagTooHigh {
        /// Measured lag.
        lag_bytes: u64,
        /// The limit.
        max_lag_bytes: u64,
    },
}

/// The prepare-step rule (Patroni's `maximum_lag_on_failover`): ready when
/// the lag is at most `max_lag_bytes`.
pub fn ready_for_promotion(lag_bytes: u64, max_lag_bytes: u64) -> Result<(), RefuseReason> {
    if lag_bytes > max_lag_bytes {
        Err(RefuseReason::LagTooHigh {
            lag_bytes,
            max_lag_bytes,
        })
    } else {
        Ok(())
    }
}

/// [`ready_for_promotion`] for a measured [`Lag`]: refuses a primary and an
/// unmeasurable lag too. `primary` is the active's current WAL position if
/// the prepare carried it. A standby that is not streaming right now may
/// still be ready (the active is what is failing); the byte rule decides.
pub fn assess(lag: &Lag, primary: Option<Lsn>, max_lag_bytes: u64) -> Result<(), RefuseReason> {
    if !lag.in_recovery {
        return Err(RefuseReason::NotAStandby);
    }
    let bytes = lag.bytes_behind(primary).ok_or_else(|| {
        RefuseReason::LagUnknown("the standby reports no received or replayed WAL position".into())
    })?;
    ready_for_promotion(bytes, max_lag_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_lsns() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16-B3".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
        assert_eq!(Lsn(10).bytes_since(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_since(Lsn(10)), 0);
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
        }
    }

    #[test]
    fn the_limit_is_inclusive() {
        assert_eq!(ready_for_promotion(0, 0), Ok(()));
        assert_eq!(ready_for_promotion(100, 100), Ok(()));
        let e = ready_for_promotion(101, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replication lag 101 bytes exceeds maxLagBytes 100"
        );
    }

    fn standby(received: u64, replayed: u64) -> Lag {
        Lag {
            in_recovery: true,
            streaming: true,
            received: Some(Lsn(received)),
            replayed: Some(Lsn(replayed)),
            bytes: Some(received - replayed),
            seconds: Some(0.0),
            replay_paused: false,
        }
    }

    #[test]
    fn assess_prefers_the_primary_position() {
        let lag = standby(1000, 900);
        assert_eq!(assess(&lag, None, 100), Ok(()));
        assert!(matches!(
            assess(&lag, Some(Lsn(5000)), 100),
            Err(RefuseReason::LagTooHigh {
                lag_bytes: 4100,
                ..
            })
        ));
        let primary = Lag {
            in_recovery: false,
            ..lag.clone()
        };
        assert_eq!(assess(&primary, None, 100), Err(RefuseReason::NotAStandby));
        let unknown = Lag {
            received: None,
            replayed: None,
            bytes: None,
            ..lag
        };
        assert!(matches!(
            assess(&unknown, None, 100),
            Err(RefuseReason::LagUnknown(_))
        ));
    }
}
