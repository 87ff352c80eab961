//! One-way replication of a directory from the active cluster to the
//! standbys with `rsync`, direction flipping with the state.
//!
//! The active side watches its directory (inotify through `notify`),
//! batches changes with a [`Debouncer`] (a quiet period, bounded by a
//! maximum delay so a directory that never goes quiet still syncs), and
//! runs `rsync -a --delete --delay-updates` to every destination (a path,
//! or an `rsync://` daemon module in the peer cluster). Every change gets a
//! sequence number; once `rsync` has finished to all destinations, every
//! change numbered before `rsync` started is there, and the [`Watermark`]
//! records that number and the time. A standby does not push; when it
//! becomes active it first pushes its whole directory (what it has is, by
//! the state's decision, the truth from now on, as with the database).

pub mod supervisor;

use std::time::{Duration, Instant};

use counterweight_core::state::Role;
use serde::{Deserialize, Serialize};

pub use supervisor::{FilesConfig, FilesSupervisor};

/// Batches changes: a batch is due `quiet` after its last change, or
/// `max_delay` after its first, whichever comes first. Pure: the caller
/// passes the time.
#[derive(Debug, Clone)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    seq: u64,
}

impl Debouncer {
    /// A debouncer with the given quiet period and maximum delay.
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Self {
            quiet,
            max_delay,
            first: None,
            last: None,
            seq: 0,
        }
    }

    /// Records one change at `now`; returns its sequence number.
    pub fn record(&mut self, now: Instant) -> u64 {
        self.seq += 1;
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.seq
    }

    /// Sequence number of the latest change.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether changes wait for a sync.
    pub fn pending(&self) -> bool {
        self.first.is_some()
    }

    /// When the pending batch is due, if there is one.
    pub fn due_at(&self) -> Option<Instant> {
        match (self.first, self.last) {
            (Some(first), Some(last)) => Some((last + self.quiet).min(first + self.max_delay)),
            _ => None,
        }
    }

    /// If a batch is due at `now`, starts it: returns the sequence number it
    /// covers (every change recorded so far) and opens a new window.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        if self.due_at().is_some_and(|due| due <= now) {
            self.first = None;
            self.last = None;
            Some(self.seq)
        } else {
            None
        }
    }

    /// Puts a batch back after a failed sync, due again at `retry_at`.
    pub fn retry(&mut self, retry_at: Instant) {
        let first = retry_at.checked_sub(self.max_delay).unwrap_or(retry_at);
        self.first = Some(self.first.map_or(first, |f| f.min(first)));
        self.last = Some(self.last.map_or(retry_at, |l| l.max(retry_at)));
    }

    /// Drops pending changes without syncing them (the side became a
    /// standby: it no longer pushes).
    pub fn clear(&mut self) {
        self.first = None;
        self.last = None;
    }
}

/// How far the standby's copy is known to be current. Written as JSON to
/// the watermark file after every change of it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Watermark {
    /// This side's role when written; only an active pushes.
    pub role: Option<Role>,
    /// The epoch of that role.
    pub epoch: u64,
    /// Sequence number of the latest change seen in the directory.
    pub seen_seq: u64,
    /// Every change up to this number is at every destination.
    pub synced_seq: u64,
    /// When the last successful sync finished (Unix ms).
    pub synced_at_unix_ms: Option<u64>,
    /// When the oldest change not yet synced happened (Unix ms); `None`
    /// when the destinations are current.
    pub oldest_unsynced_unix_ms: Option<u64>,
    /// The last sync's error, cleared by a success.
    pub last_error: Option<String>,
}

impl Watermark {
    /// How long the oldest unsynced change has waited at `now_unix_ms`
    /// (zero when everything is synced): the file side's data-loss window.
    pub fn age_ms(&self, now_unix_ms: u64) -> u64 {
        self.oldest_unsynced_unix_ms
            .map_or(0, |t| now_unix_ms.saturating_sub(t))
    }

    /// Health rule for the policy's file check and the prepare step: an
    /// active's copy is current enough when no change has waited longer
    /// than `max_age_ms`.
    pub fn is_current(&self, now_unix_ms: u64, max_age_ms: u64) -> bool {
        self.age_ms(now_unix_ms) <= max_age_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_is_one_batch_after_the_quiet_period() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(100 * MS, 1000 * MS);
        assert_eq!(d.due_at(), None);
        d.record(t0);
        d.record(t0 + 50 * MS);
        assert_eq!(d.due_at(), Some(t0 + 150 * MS));
        assert_eq!(d.take(t0 + 149 * MS), None);
        assert_eq!(d.take(t0 + 150 * MS), Some(2));
        assert!(!d.pending());
        assert_eq!(d.take(t0 + 10_000 * MS), None);
    }

    #[test]
    fn a_directory_that_never_goes_quiet_still_syncs() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(100 * MS, 300 * MS);
        for i in 0..10 {
            d.record(t0 + i * 50 * MS);
        }
        assert_eq!(d.due_at(), Some(t0 + 300 * MS));
        assert_eq!(d.take(t0 + 450 * MS), Some(10));
    }

    #[test]
    fn changes_during_a_sync_form_the_next_batch() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(10 * MS, 100 * MS);
        d.record(t0);
        assert_eq!(d.take(t0 + 10 * MS), Some(1));
        d.record(t0 + 11 * MS);
        assert!(d.pending());
        assert_eq!(d.take(t0 + 21 * MS), Some(2));
    }

    #[test]
    fn a_failed_batch_is_retried_and_clear_drops_it() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(10 * MS, 100 * MS);
        d.record(t0);
        assert_eq!(d.take(t0 + 10 * MS), Some(1));
        d.retry(t0 + 500 * MS);
        assert_eq!(d.take(t0 + 499 * MS), None);
        assert_eq!(d.take(t0 + 500 * MS), Some(1));
        d.record(t0 + 600 * MS);
        d.clear();
        assert!(!d.pending());
    }

    #[test]
    fn watermark_age_counts_only_unsynced_changes() {
        let mut w = Watermark {
            synced_at_unix_ms: Some(1_000),
            ..Watermark::default()
        };
        assert_eq!(w.age_ms(1_000_000), 0);
        assert!(w.is_current(1_000_000, 0));
        w.oldest_unsynced_unix_ms = Some(5_000);
        assert_eq!(w.age_ms(7_000), 2_000);
        assert!(!w.is_current(7_000, 1_999));
    }
}
