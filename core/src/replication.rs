//! PostgreSQL replication as a standby sees it, and the two rules on
//! whether its data is current.
//!
//! One query ([`STANDBY_QUERY`]) reads the local server's replication
//! state, one decoder ([`Lag::from_columns`]) turns its row into a [`Lag`];
//! the controller's health check and the sync agent both use them. The
//! two questions asked of a `Lag` differ on purpose, and are named for it:
//!
//! - [`Lag::kept_current`]: *is this standby being kept current?* Asked
//!   every health interval while an active lives, it decides whether the
//!   cluster may be chosen to take over at all: the standby must stream
//!   from its primary and be at most `maxLagBytes` behind in replay. A
//!   standby that stopped streaming is not current, whatever its lag says.
//! - [`Lag::ready_to_promote`]: *may this standby be promoted now?* Asked
//!   by the FIG. 9 `prepare` step, when the active may be what is failing:
//!   a standby that is not streaming right now may still be ready, and the
//!   byte rule (Patroni's `maximum_lag_on_failover`) decides, measured from
//!   the active's WAL position when the prepare carries it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The query [`Lag::from_columns`] decodes, one round trip. Its columns, in
/// order: `pg_is_in_recovery()`, the last WAL position received and the
/// last replayed (text, NULL on a primary), the WAL receiver's status (NULL
/// without one), whether replay is paused, and the seconds since the last
/// replayed transaction committed.
pub const STANDBY_QUERY: &str = "SELECT pg_is_in_recovery(), \
     pg_last_wal_receive_lsn()::text, \
     pg_last_wal_replay_lsn()::text, \
     (SELECT status FROM pg_stat_wal_receiver LIMIT 1), \
     CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8";

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

/// A WAL position that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a WAL position like 16/B374D848")]
pub struct LsnError(pub String);

impl FromStr for Lsn {
    type Err = LsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LsnError(s.to_owned());
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

/// The local server's replication state as a standby sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// The server is in recovery (a standby).
    pub in_recovery: bool,
    /// The WAL receiver's status (`streaming`, `waiting`, ...); `None`
    /// without a receiver.
    pub receiver: Option<String>,
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
    /// Decodes a row of [`STANDBY_QUERY`], its columns in order.
    pub fn from_columns(
        in_recovery: bool,
        received: Option<&str>,
        replayed: Option<&str>,
        receiver: Option<String>,
        replay_paused: bool,
        replay_age_s: Option<f64>,
    ) -> Result<Self, LsnError> {
        let received = received.map(str::parse).transpose()?;
        let replayed = replayed.map(str::parse).transpose()?;
        let bytes = match (received, replayed) {
            (Some(r), Some(p)) => Some(Lsn::bytes_since(r, p)),
            _ => None,
        };
        // Time since the last replayed commit is lag only while WAL waits
        // to be replayed; on an idle primary it would grow forever.
        let seconds = match bytes {
            Some(0) => Some(0.0),
            _ => replay_age_s.filter(|s| s.is_finite()).map(|s| s.max(0.0)),
        };
        Ok(Self {
            in_recovery,
            receiver,
            received,
            replayed,
            bytes,
            seconds,
            replay_paused,
        })
    }

    /// A WAL receiver is streaming from a primary right now.
    pub fn streaming(&self) -> bool {
        self.receiver.as_deref() == Some("streaming")
    }

    /// Bytes behind a primary whose current position is `primary`, from the
    /// replayed position; falls back to [`Lag::bytes`] without one.
    pub fn bytes_behind(&self, primary: Option<Lsn>) -> Option<u64> {
        match (primary, self.replayed) {
            (Some(p), Some(r)) => Some(p.bytes_since(r)),
            _ => self.bytes,
        }
    }

    /// Whether this server is being kept current while an active lives
    /// (the health check's rule; see the module documentation): a primary
    /// is; a standby must stream and be at most `max_lag_bytes` behind in
    /// replay. `Ok` carries a note for people (the data-loss estimate
    /// recorded with a takeover), `Err` why not.
    pub fn kept_current(&self, max_lag_bytes: u64) -> Result<String, String> {
        if !self.in_recovery {
            return Ok("primary".to_owned());
        }
        let lag = self.bytes.unwrap_or(0);
        let age = self
            .seconds
            .map(|s| format!(", replay {s:.1} s behind"))
            .unwrap_or_default();
        let note = format!("standby, replay lag {lag} B{age}");
        match self.receiver.as_deref() {
            Some("streaming") => {}
            Some(other) => return Err(format!("{note}; WAL receiver is {other}, not streaming")),
            None => return Err(format!("{note}; no WAL receiver: not replicating")),
        }
        if lag > max_lag_bytes {
            return Err(format!("{note} > maxLagBytes {max_lag_bytes}"));
        }
        Ok(note)
    }

    /// Whether this standby may be promoted now (the `prepare` step's rule;
    /// see the module documentation): refuses a primary and an unmeasurable
    /// lag. `primary` is the active's current WAL position if the prepare
    /// carried it.
    pub fn ready_to_promote(
        &self,
        primary: Option<Lsn>,
        max_lag_bytes: u64,
    ) -> Result<(), RefuseReason> {
        if !self.in_recovery {
            return Err(RefuseReason::NotAStandby);
        }
        let bytes = self.bytes_behind(primary).ok_or_else(|| {
            RefuseReason::LagUnknown(
                "the standby reports no received or replayed WAL position".into(),
            )
        })?;
        within_failover_lag(bytes, max_lag_bytes)
    }
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

/// The byte rule of [`Lag::ready_to_promote`] (Patroni's
/// `maximum_lag_on_failover`): ready when the lag is at most
/// `max_lag_bytes`.
pub fn within_failover_lag(lag_bytes: u64, max_lag_bytes: u64) -> Result<(), RefuseReason> {
    if lag_bytes > max_lag_bytes {
        Err(RefuseReason::LagTooHigh {
            lag_bytes,
            max_lag_bytes,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_lsns() {
        let l: Lsn = "16/B374D848".parse().expect("an lsn");
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
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }

    fn standby(received: u64, replayed: u64, receiver: Option<&str>) -> Lag {
        Lag::from_columns(
            true,
            Some(&Lsn(received).to_string()),
            Some(&Lsn(replayed).to_string()),
            receiver.map(str::to_owned),
            false,
            Some(0.5),
        )
        .expect("valid positions")
    }

    #[test]
    fn a_row_decodes_with_its_lag_and_an_idle_standby_is_not_behind() {
        let l = standby(1000, 900, Some("streaming"));
        assert_eq!(l.bytes, Some(100));
        assert_eq!(l.seconds, Some(0.5));
        assert!(l.streaming());
        let caught_up = standby(1000, 1000, Some("streaming"));
        assert_eq!(caught_up.seconds, Some(0.0), "nothing waits to be replayed");
        let primary = Lag::from_columns(false, None, None, None, false, None).expect("a primary");
        assert_eq!((primary.bytes, primary.seconds), (None, None));
        let e = Lag::from_columns(true, Some("x/1"), None, None, false, None).unwrap_err();
        assert!(e.to_string().contains("\"x/1\""), "{e}");
    }

    #[test]
    fn kept_current_needs_streaming_and_the_lag_limit() {
        let primary = Lag::from_columns(false, None, None, None, false, None).expect("a primary");
        assert_eq!(primary.kept_current(10), Ok("primary".into()));
        let ok = standby(110, 100, Some("streaming")).kept_current(10);
        assert!(
            ok.as_ref().is_ok_and(|n| n.contains("replay lag 10 B")),
            "{ok:?}"
        );
        let e = standby(111, 100, Some("streaming"))
            .kept_current(10)
            .unwrap_err();
        assert!(e.contains("> maxLagBytes 10"), "{e}");
        let e = standby(100, 100, Some("waiting"))
            .kept_current(10)
            .unwrap_err();
        assert!(e.contains("waiting, not streaming"), "{e}");
        let e = standby(100, 100, None).kept_current(10).unwrap_err();
        assert!(e.contains("not replicating"), "{e}");
    }

    #[test]
    fn the_failover_limit_is_inclusive() {
        assert_eq!(within_failover_lag(0, 0), Ok(()));
        assert_eq!(within_failover_lag(100, 100), Ok(()));
        let e = within_failover_lag(101, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replication lag 101 bytes exceeds maxLagBytes 100"
        );
    }

    #[test]
    fn ready_to_promote_prefers_the_primary_position_and_needs_no_stream() {
        // Not streaming: the active may be what is failing; bytes decide.
        let lag = standby(1000, 900, None);
        assert_eq!(lag.ready_to_promote(None, 100), Ok(()));
        assert!(matches!(
            lag.ready_to_promote(Some(Lsn(5000)), 100),
            Err(RefuseReason::LagTooHigh {
                lag_bytes: 4100,
                ..
            })
        ));
        let primary = Lag {
            in_recovery: false,
            ..lag.clone()
        };
        assert_eq!(
            primary.ready_to_promote(None, 100),
            Err(RefuseReason::NotAStandby)
        );
        let unknown = Lag {
            received: None,
            replayed: None,
            bytes: None,
            ..lag
        };
        assert!(matches!(
            unknown.ready_to_promote(None, 100),
            Err(RefuseReason::LagUnknown(_))
        ));
    }
}
