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

pub mod http;
pub mod supervisor;

use std::time::{Duration, Instant};

use counterweight_core::state::Role;
use serde::{Deserialize, Serialize};

pub use supervisor::{FilesConfig, FilesSupervisor, read_marker};

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
    /// The last push's error (of the directory or of the marker), cleared
    /// by a success of the same kind.
    pub last_error: Option<String>,
    /// On a standby: the marker the active last pushed into this copy
    /// ([`Marker`]). Filled in by the HTTP endpoint, never written to the
    /// watermark file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<Marker>,
}

/// File name of the [`Marker`] an active pushes into every destination
/// (the standby's directory). Excluded from the directory's own `rsync`
/// runs (so `--delete` keeps it and a new active never pushes a stale one)
/// and ignored by the watcher.
pub const MARKER_NAME: &str = ".counterweight-marker.json";

/// What the active pushes into a destination after each successful sync and
/// every heartbeat: how current that copy is, in the active's clock. The
/// standby reads it to judge its own copy (it cannot see the active's
/// directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    /// The pushing active's epoch.
    pub epoch: u64,
    /// When the active wrote the marker (Unix ms, active's clock).
    pub written_at_unix_ms: u64,
    /// Every change the active saw before this time (Unix ms, active's
    /// clock) is in this copy: the oldest change not yet synced to this
    /// destination, or `written_at_unix_ms` when none waited.
    pub complete_as_of_unix_ms: u64,
    /// The last change synced to this destination.
    pub synced_seq: u64,
}

impl Marker {
    /// The marker an active in `epoch` writes at `now_unix_ms` into a
    /// destination that has every change up to `synced_seq`, the rest
    /// dated by `log`.
    pub fn for_destination(epoch: u64, synced_seq: u64, log: &ChangeLog, now_unix_ms: u64) -> Self {
        Self {
            epoch,
            written_at_unix_ms: now_unix_ms,
            complete_as_of_unix_ms: log.oldest_after(synced_seq).unwrap_or(now_unix_ms),
            synced_seq,
        }
    }
}

/// When the changes not yet at every destination happened, so that each
/// destination's [`Marker`] can say how current that copy is, whatever the
/// others do: a destination that hangs must not make a current one look
/// stale. Pure: the caller passes sequence numbers and times.
///
/// Destinations sync whole batches ([`Debouncer::take`]), so a copy is
/// always synced up to a batch's number, and the oldest change it lacks is
/// the first one after that batch was taken. The log keeps exactly that: the
/// first change after each batch, no more, until every destination has it.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// `(seq, unix_ms)` of the first change after each batch taken, oldest
    /// first.
    firsts: std::collections::VecDeque<(u64, u64)>,
    /// The last batch taken.
    taken: u64,
}

/// Most entries a [`ChangeLog`] keeps; beyond, two are merged into one
/// that dates both by the older, which errs towards "older", never
/// "newer". Reached only while a destination fails for thousands of
/// batches.
const CHANGE_LOG_MAX: usize = 1024;

impl ChangeLog {
    /// Records change `seq`, seen at `now_unix_ms`.
    pub fn record(&mut self, seq: u64, now_unix_ms: u64) {
        if self.firsts.back().is_none_or(|(s, _)| *s <= self.taken) {
            self.firsts.push_back((seq, now_unix_ms));
            if self.firsts.len() > CHANGE_LOG_MAX {
                // Entries 1 and 2 become one: a copy synced between them
                // now reads entry 1's older time.
                if let (Some((_, older)), Some(next)) =
                    (self.firsts.remove(1), self.firsts.get_mut(1))
                {
                    next.1 = older;
                }
            }
        }
    }

    /// Records that the batch of every change up to `seq` was taken.
    pub fn taken(&mut self, seq: u64) {
        self.taken = seq;
    }

    /// When the oldest change after `synced_seq` happened; `None` when
    /// there is none.
    pub fn oldest_after(&self, synced_seq: u64) -> Option<u64> {
        self.firsts
            .iter()
            .find(|(s, _)| *s > synced_seq)
            .map(|(_, at)| *at)
    }

    /// Forgets the changes up to `seq`, which every destination has.
    pub fn forget_through(&mut self, seq: u64) {
        while self.firsts.front().is_some_and(|(s, _)| *s <= seq) {
            self.firsts.pop_front();
        }
    }

    /// Forgets everything (the side became a standby; a new active starts
    /// over).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Longest error text kept in a one-line reason.
const REASON_MAX_CHARS: usize = 300;

/// Makes a (possibly multi-line) error fit one line of bounded length, for
/// an HTTP answer that ends up in the controller's health explanation.
fn one_line(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    if joined.chars().count() > REASON_MAX_CHARS {
        let cut: String = joined.chars().take(REASON_MAX_CHARS).collect();
        format!("{cut}...")
    } else {
        joined
    }
}

/// Whether this side's files are current, the rule behind `GET /ready`
/// (the policy's `http` check on the `file-replication` component). `Ok`
/// carries a note, `Err` the one-line reason. Pure: the caller passes the
/// local watermark, the marker found in the local directory and the time.
///
/// - **Active** (the pusher): its own directory is the truth; what is
///   judged is whether the standbys keep up. Current when the last push
///   (directory or heartbeat marker) did not fail and the oldest change not
///   yet at every destination is at most `max_age_ms` old. Same clock on
///   both ends of the subtraction: no skew.
/// - **Standby** (the receiver): current when the active's [`Marker`] is
///   in its directory, comes from an epoch at least its own (an older one
///   is from a previous active: nothing from the current one arrived yet),
///   and the copy is complete as of at most `max_age_ms` ago. The age
///   subtracts the active's clock from the standby's, so it is off by their
///   skew (bounded by the controllers' lease margin, which `cwctl check`
///   verifies); a marker from the future counts as age 0. The active
///   pushes the marker at least every heartbeat even without changes, so a
///   healthy pair stays under `heartbeat + skew`; choose `max_age_ms` well
///   above that.
/// - **Unknown role** (state unreadable): not current, nothing is pushed.
pub fn freshness(
    local: &Watermark,
    received: Option<&Marker>,
    now_unix_ms: u64,
    max_age_ms: u64,
) -> Result<String, String> {
    match local.role {
        None => Err("role unknown (state not readable): not replicating".to_owned()),
        Some(Role::Active) => {
            if let Some(e) = &local.last_error {
                return Err(format!(
                    "active (epoch {}): last push failed: {}",
                    local.epoch,
                    one_line(e)
                ));
            }
            let age = local.age_ms(now_unix_ms);
            if age > max_age_ms {
                return Err(format!(
                    "active (epoch {}): oldest unsynced change is {age} ms old > maxAgeMs {max_age_ms}",
                    local.epoch
                ));
            }
            Ok(format!(
                "active (epoch {}): synced up to change {} of {}, oldest unsynced {age} ms old",
                local.epoch, local.synced_seq, local.seen_seq
            ))
        }
        Some(Role::Standby) => {
            let Some(m) = received else {
                return Err(format!(
                    "standby (epoch {}): no marker from an active in {MARKER_NAME}: how current this copy is is unknown",
                    local.epoch
                ));
            };
            if m.epoch < local.epoch {
                return Err(format!(
                    "standby (epoch {}): the marker is from epoch {}, nothing pushed by the current active yet",
                    local.epoch, m.epoch
                ));
            }
            let age = now_unix_ms.saturating_sub(m.complete_as_of_unix_ms);
            let heard = now_unix_ms.saturating_sub(m.written_at_unix_ms);
            if age > max_age_ms {
                return Err(format!(
                    "standby (epoch {}): copy is {age} ms old > maxAgeMs {max_age_ms} (last marker from the active in epoch {} written {heard} ms ago)",
                    local.epoch, m.epoch
                ));
            }
            Ok(format!(
                "standby (epoch {}): copy is {age} ms old (active epoch {}, synced change {})",
                local.epoch, m.epoch, m.synced_seq
            ))
        }
    }
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
    fn clear_drops_the_pending_batch() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(10 * MS, 100 * MS);
        d.record(t0);
        d.clear();
        assert!(!d.pending());
        assert_eq!(d.take(t0 + 500 * MS), None);
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

    fn wm(role: Option<Role>, epoch: u64, oldest: Option<u64>, error: Option<&str>) -> Watermark {
        Watermark {
            role,
            epoch,
            seen_seq: 5,
            synced_seq: 4,
            synced_at_unix_ms: Some(9_000),
            oldest_unsynced_unix_ms: oldest,
            last_error: error.map(str::to_owned),
            received: None,
        }
    }

    fn marker(epoch: u64, written: u64, complete: u64) -> Marker {
        Marker {
            epoch,
            written_at_unix_ms: written,
            complete_as_of_unix_ms: complete,
            synced_seq: 7,
        }
    }

    /// (case, local, marker, now, maxAge, Ok?, words the note or reason must hold)
    type Case<'a> = (
        &'a str,
        Watermark,
        Option<Marker>,
        u64,
        u64,
        bool,
        &'a [&'a str],
    );

    #[test]
    fn freshness_table() {
        use Role::{Active, Standby};
        let long_error = format!("rsync to x failed\n{}", "e".repeat(1000));
        let cases: Vec<Case> = vec![
            (
                "unknown role",
                wm(None, 0, None, None),
                None,
                10_000,
                1_000,
                false,
                &["role unknown"],
            ),
            (
                "active, all synced",
                wm(Some(Active), 3, None, None),
                None,
                10_000,
                1_000,
                true,
                &["active (epoch 3)", "change 4 of 5", "0 ms"],
            ),
            (
                "active, young unsynced change",
                wm(Some(Active), 3, Some(9_500), None),
                None,
                10_000,
                1_000,
                true,
                &["500 ms old"],
            ),
            (
                "active, at the limit",
                wm(Some(Active), 3, Some(9_000), None),
                None,
                10_000,
                1_000,
                true,
                &["1000 ms old"],
            ),
            (
                "active, old unsynced change",
                wm(Some(Active), 3, Some(8_999), None),
                None,
                10_000,
                1_000,
                false,
                &["1001 ms old > maxAgeMs 1000"],
            ),
            (
                "active, failing destination",
                wm(
                    Some(Active),
                    3,
                    None,
                    Some("rsync to b failed (exit status: 11): No space\n  left"),
                ),
                None,
                10_000,
                1_000,
                false,
                &["last push failed", "No space / left"],
            ),
            (
                "active, failure wins over age",
                wm(Some(Active), 3, Some(1), Some("boom")),
                None,
                10_000,
                1_000,
                false,
                &["boom"],
            ),
            (
                "active, long error is cut",
                wm(Some(Active), 3, None, Some(&long_error)),
                None,
                10_000,
                1_000,
                false,
                &["rsync to x failed / eee", "..."],
            ),
            (
                "active ignores a stale marker in its dir",
                wm(Some(Active), 3, None, None),
                Some(marker(1, 0, 0)),
                10_000,
                1_000,
                true,
                &["active"],
            ),
            (
                "standby, no marker",
                wm(Some(Standby), 3, None, None),
                None,
                10_000,
                1_000,
                false,
                &["no marker", MARKER_NAME],
            ),
            (
                "standby, fresh marker",
                wm(Some(Standby), 3, None, None),
                Some(marker(3, 9_800, 9_700)),
                10_000,
                1_000,
                true,
                &["300 ms old", "active epoch 3"],
            ),
            (
                "standby, marker from a newer epoch",
                wm(Some(Standby), 3, None, None),
                Some(marker(4, 9_800, 9_800)),
                10_000,
                1_000,
                true,
                &["active epoch 4"],
            ),
            (
                "standby, marker from an older epoch",
                wm(Some(Standby), 3, None, None),
                Some(marker(2, 9_900, 9_900)),
                10_000,
                1_000,
                false,
                &["from epoch 2", "nothing pushed"],
            ),
            (
                "standby, pushes stopped",
                wm(Some(Standby), 3, None, None),
                Some(marker(3, 7_000, 7_000)),
                10_000,
                1_000,
                false,
                &["copy is 3000 ms old > maxAgeMs 1000", "written 3000 ms ago"],
            ),
            (
                "standby, active alive but behind",
                wm(Some(Standby), 3, None, None),
                Some(marker(3, 9_900, 5_000)),
                10_000,
                1_000,
                false,
                &["5000 ms old", "written 100 ms ago"],
            ),
            (
                "standby, marker from the future (skew)",
                wm(Some(Standby), 3, None, None),
                Some(marker(3, 10_400, 10_400)),
                10_000,
                1_000,
                true,
                &["0 ms old"],
            ),
        ];
        for (case, local, m, now, max, ok, words) in cases {
            let got = freshness(&local, m.as_ref(), now, max);
            assert_eq!(got.is_ok(), ok, "{case}: {got:?}");
            let text = got.unwrap_or_else(|e| e);
            assert!(!text.contains('\n'), "{case}: one line: {text}");
            assert!(text.chars().count() < 500, "{case}: bounded: {text}");
            for w in words {
                assert!(text.contains(w), "{case}: {text:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn a_marker_is_complete_as_of_the_oldest_change_its_destination_lacks() {
        let mut log = ChangeLog::default();
        assert_eq!(
            Marker::for_destination(2, 0, &log, 5_000).complete_as_of_unix_ms,
            5_000
        );
        // Changes 1-3, batch 3 taken; changes 4-5, batch 5 taken; change 6.
        for (seq, at) in [(1, 1_000), (2, 1_100), (3, 1_200)] {
            log.record(seq, at);
        }
        log.taken(3);
        log.record(4, 2_000);
        log.record(5, 2_100);
        log.taken(5);
        log.record(6, 3_000);
        let at = |log: &ChangeLog, synced| Marker::for_destination(2, synced, log, 5_000);
        // A destination with nothing lacks change 1; one with batch 3
        // lacks change 4; one with batch 5 lacks change 6.
        assert_eq!(at(&log, 0).complete_as_of_unix_ms, 1_000);
        assert_eq!(at(&log, 3).complete_as_of_unix_ms, 2_000);
        let m = at(&log, 5);
        assert_eq!(
            (m.epoch, m.complete_as_of_unix_ms, m.synced_seq),
            (2, 3_000, 5)
        );
        log.taken(6);
        assert_eq!(at(&log, 6).complete_as_of_unix_ms, 5_000, "current");
        log.forget_through(3);
        assert_eq!(
            log.oldest_after(0),
            Some(2_000),
            "only after everyone has it"
        );
        log.clear();
        assert_eq!(log.oldest_after(0), None);
    }

    #[test]
    fn a_full_change_log_errs_towards_older() {
        let mut log = ChangeLog::default();
        // One change after each of many batches, a destination stuck at 0.
        let n = CHANGE_LOG_MAX as u64 + 10;
        for seq in 1..=n {
            log.record(seq, 1_000 * seq);
            log.taken(seq);
        }
        assert!(log.firsts.len() <= CHANGE_LOG_MAX);
        for synced in 0..n {
            let at = log.oldest_after(synced).expect("a later change");
            // Never newer than the true oldest missing change (synced + 1).
            assert!(at <= 1_000 * (synced + 1), "synced {synced}: {at}");
        }
        assert_eq!(log.oldest_after(0), Some(1_000));
        assert_eq!(log.oldest_after(n - 1), Some(1_000 * n));
    }
}
