//! Leader election among the replicas of one cluster's controller.
//!
//! Replicas share a `coordination.k8s.io` Lease; only its holder acts. The
//! rule is client-go's: a follower never trusts the timestamps written in
//! the Lease (another node's clock), only how long *it* has seen the same
//! record unchanged on its own monotonic clock. A holder that stops renewing
//! is replaced once a follower has watched its record sit still for a whole
//! lease duration; the holder itself gives up earlier, at its renew
//! deadline, so the two never overlap while clocks run at similar rates.

/// What a replica should do after looking at the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it, or the holder's record went stale: take it.
    Acquire,
    /// This replica holds it: renew.
    Renew,
    /// Someone else holds it and renewed recently: wait and look again.
    Follow {
        /// The holder's identity.
        holder: String,
    },
}

/// One replica's view of the election, fed with each observation of the
/// Lease.
#[derive(Debug, Clone)]
pub struct Election {
    me: String,
    lease_ms: u64,
    // The last record seen (holder, version) and when it was first seen.
    seen: Option<(Option<String>, String, u64)>,
}

impl Election {
    /// A replica called `me`; a holder's record must sit unchanged for
    /// `lease_ms` before `me` takes over.
    pub fn new(me: &str, lease_ms: u64) -> Self {
        Self {
            me: me.to_owned(),
            lease_ms,
            seen: None,
        }
    }

    /// This replica's identity.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Decides from the Lease as read at `now_ms` (a monotonic clock):
    /// `holder` is its holderIdentity (empty means released) and `version`
    /// anything that changes on every write, e.g. its resourceVersion.
    /// `None` for both means the Lease does not exist yet.
    pub fn observe(&mut self, now_ms: u64, holder: Option<&str>, version: &str) -> Step {
        let holder = holder.filter(|h| !h.is_empty());
        let Some(holder) = holder else {
            self.seen = None;
            return Step::Acquire;
        };
        if holder == self.me {
            return Step::Renew;
        }
        let changed = match &self.seen {
            Some((h, v, _)) => h.as_deref() != Some(holder) || v != version,
            None => true,
        };
        if changed {
            self.seen = Some((Some(holder.to_owned()), version.to_owned(), now_ms));
        }
        let since = self.seen.as_ref().map_or(now_ms, |(_, _, at)| *at);
        if now_ms.saturating_sub(since) >= self.lease_ms {
            Step::Acquire
        } else {
            Step::Follow {
                holder: holder.to_owned(),
            }
        }
    }
}

/// Whether a holder whose last successful renewal was at `renewed_ms` must
/// stop acting at `now_ms`: it gives up after `renew_deadline_ms`, which is
/// shorter than the lease, so it stops before any follower may take over.
pub fn must_step_down(now_ms: u64, renewed_ms: u64, renew_deadline_ms: u64) -> bool {
    now_ms.saturating_sub(renewed_ms) >= renew_deadline_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_or_released_lease_is_acquired() {
        let mut e = Election::new("a", 1000);
        assert_eq!(e.observe(0, None, ""), Step::Acquire);
        assert_eq!(e.observe(0, Some(""), "7"), Step::Acquire);
    }

    #[test]
    fn own_lease_is_renewed() {
        let mut e = Election::new("a", 1000);
        assert_eq!(e.observe(0, Some("a"), "1"), Step::Renew);
    }

    #[test]
    fn a_renewing_holder_is_followed_forever() {
        let mut e = Election::new("b", 1000);
        // The version changes every observation: the holder renews.
        for t in 0..100u64 {
            assert_eq!(
                e.observe(t * 500, Some("a"), &t.to_string()),
                Step::Follow { holder: "a".into() },
                "t={t}"
            );
        }
    }

    #[test]
    fn a_silent_holder_is_replaced_only_after_a_full_lease_of_own_observation() {
        let mut e = Election::new("b", 1000);
        // First seen at 5000 (whatever the record's own timestamps say).
        assert!(matches!(
            e.observe(5000, Some("a"), "9"),
            Step::Follow { .. }
        ));
        assert!(matches!(
            e.observe(5999, Some("a"), "9"),
            Step::Follow { .. }
        ));
        assert_eq!(e.observe(6000, Some("a"), "9"), Step::Acquire);
    }

    #[test]
    fn a_new_holder_or_version_restarts_the_wait() {
        let mut e = Election::new("c", 1000);
        e.observe(0, Some("a"), "1");
        assert!(matches!(
            e.observe(900, Some("b"), "1"),
            Step::Follow { .. }
        ));
        assert!(matches!(
            e.observe(1800, Some("b"), "1"),
            Step::Follow { .. }
        ));
        assert_eq!(e.observe(1900, Some("b"), "1"), Step::Acquire);
    }

    #[test]
    fn the_holder_steps_down_at_its_renew_deadline() {
        assert!(!must_step_down(1499, 500, 1000));
        assert!(must_step_down(1500, 500, 1000));
        assert!(!must_step_down(0, 500, 1000), "clock before the renewal");
    }
}
