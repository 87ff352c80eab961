//! Leases and elections: a claim on an epoch collects votes from a majority
//! of voters; the holder serves while its lease lives and fences the
//! moment it cannot renew it; a voter binds itself to one holder per epoch
//! for a lease, and only moves to higher epochs.

use super::*;

impl Node {
    /// Whether a tick at [`Node::election_at`] starts an election.
    pub(super) fn may_start_election(&self) -> bool {
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
    pub(super) fn next_epoch(&self) -> Option<u64> {
        self.highest_seen
            .max(self.rec.epoch)
            .max(self.rec.vote.as_ref().map_or(0, |v| v.epoch))
            .checked_add(1)
    }

    pub(super) fn claim_until(&self, c: &Claim) -> Option<u64> {
        let q = self.cfg.quorum();
        let mut sent: Vec<u64> = c.grants.values().copied().collect();
        if sent.len() < q {
            return None;
        }
        sent.sort_unstable_by(|a, b| b.cmp(a));
        Some(sent[q - 1] + self.cfg.lease_ms - self.cfg.margin_ms)
    }

    pub(super) fn claim_live(&self, now: u64) -> bool {
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
    pub(super) fn election_at(&self) -> u64 {
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

    pub(super) fn check_lease(&mut self, now: u64, out: &mut Vec<Action>) {
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
    pub(super) fn fence(
        &mut self,
        now: u64,
        reason: Reason,
        message: String,
        out: &mut Vec<Action>,
    ) {
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

    pub(super) fn start_candidacy(
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

    pub(super) fn promote(&mut self, now: u64, out: &mut Vec<Action>) {
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

    /// Decides a vote and, if it changes the persisted vote, persists it
    /// before the caller sends the answer. `Err` carries the epoch this
    /// voter is bound to.
    pub(super) fn vote(
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
}
