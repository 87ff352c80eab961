//! The planned handover (FIG. 9): `prepare` → `ready`/`refuse` →
//! `change` → `changed`, on both sides: the active that hands over (it
//! fences, votes for the target in the next epoch, then sends `change`) and
//! the target that takes over with a transfer of the old active's grant.

use super::*;

impl Node {
    pub(super) fn on_prepare(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        reason: HandoverReason,
        out: &mut Vec<Action>,
    ) {
        // Only an active prepares a handover: it is alive.
        self.confirm_data_behind();
        let refusal = if self.is_witness() {
            Some("the witness holds no workloads".to_owned())
        } else if epoch < self.rec.epoch {
            Some(format!(
                "stale epoch {epoch}, this member knows {}",
                self.rec.epoch
            ))
        } else if self.rec.role == Role::Active {
            Some(format!("{} is active itself", self.me))
        } else if self.health.data_behind {
            Some(format!(
                "{}'s data is not current (a synchronization component is down or lagging)",
                self.me
            ))
        } else if !self.health.eligible() {
            Some(format!(
                "{} is not healthy (abnormal: {}, score at or above threshold: {})",
                self.me, self.health.abnormal, self.health.meets_threshold
            ))
        } else if self.claim.as_ref().is_some_and(|c| c.transfer.is_some()) {
            Some("already taking over".to_owned())
        } else {
            None
        };
        match refusal {
            Some(reason) => out.push(self.envelope(from, Body::Refuse { epoch, reason })),
            None => {
                // The active is alive and handing over; do not run an
                // election of our own meanwhile.
                self.quiet_since = now;
                self.heard_active = true;
                self.claim = None;
                out.push(record(
                    EventKind::Normal,
                    Reason::HandoverReady,
                    format!("{from} prepares a handover ({reason:?}) in epoch {epoch}; ready"),
                ));
                out.push(self.envelope(from, Body::Ready { epoch }));
            }
        }
    }

    pub(super) fn on_ready(&mut self, now: u64, from: &str, epoch: u64, out: &mut Vec<Action>) {
        let Some(h) = &self.handover else { return };
        if h.target != from
            || h.epoch != epoch
            || h.phase != Phase::Preparing
            || self.rec.role != Role::Active
            || self.rec.epoch != epoch
            || !self.serving
        {
            return;
        }
        let reason = h.reason;
        // No epoch left: the handover cannot happen, and times out as one
        // the target never confirms; the active keeps serving meanwhile.
        let Some(new_epoch) = self.next_epoch() else {
            return;
        };
        // Fence first: stop serving, then persist standby together with the
        // vote that lets `from` take the next epoch. Only then `change`.
        if !self.cfg.fencing_disabled_for_tests {
            self.serving = false;
            out.push(Action::SetServing(false));
            self.rec.role = Role::Standby;
            self.claim = None;
        }
        self.rec.vote = Some(Vote {
            epoch: new_epoch,
            to: from.to_owned(),
        });
        self.promise_until = now + self.cfg.lease_ms;
        self.highest_seen = new_epoch;
        self.quiet_since = now;
        self.persist(out);
        out.push(record(
            EventKind::Normal,
            Reason::HandedOver,
            format!(
                "handover ({reason:?}): fenced in epoch {epoch}, asking {from} to become active in epoch {new_epoch}"
            ),
        ));
        out.push(self.envelope(from, Body::Change { epoch, new_epoch }));
        self.announce_fenced(now, from, out);
        if let Some(h) = &mut self.handover {
            h.phase = Phase::Changing { new_epoch };
            h.started_ms = now;
        }
    }

    pub(super) fn on_change(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        new_epoch: u64,
        out: &mut Vec<Action>,
    ) {
        if self.is_witness() || new_epoch <= epoch || new_epoch < self.rec.epoch {
            return;
        }
        if self.rec.role == Role::Active {
            if self.rec.epoch == new_epoch {
                // A retried `change`: answer again, change nothing.
                out.push(self.envelope(from, Body::Changed { new_epoch }));
            }
            return;
        }
        if new_epoch == self.rec.epoch || self.claim.as_ref().is_some_and(|c| c.epoch == new_epoch)
        {
            return;
        }
        // `change` is sent only after its sender fenced (the ordering
        // contract): evidence for this member's own vote.
        let e = self.fenced.entry(from.to_owned()).or_insert(epoch);
        *e = (*e).max(epoch);
        let transfer = Transfer {
            from: from.to_owned(),
            epoch,
        };
        self.start_candidacy(now, new_epoch, Some(transfer), out);
    }

    /// Tells every voter but the target (which has `change`) that this
    /// member no longer serves: a status without a lease request, which is
    /// not answered. Voters bound to it may then release their vote to the
    /// target of its handover.
    pub(super) fn announce_fenced(&self, now: u64, target: &str, out: &mut Vec<Action>) {
        if self.serving {
            return;
        }
        let status = self.status(now);
        for peer in self.others().into_iter().filter(|p| p != target) {
            out.push(self.envelope(
                &peer,
                Body::Probe {
                    sent_ms: now,
                    status,
                    lease: None,
                },
            ));
        }
    }

    pub(super) fn begin_handover(
        &mut self,
        now: u64,
        target: String,
        reason: HandoverReason,
        out: &mut Vec<Action>,
    ) {
        let epoch = self.rec.epoch;
        out.push(record(
            EventKind::Normal,
            Reason::HandoverStarted,
            format!("handover ({reason:?}) to {target}: prepare sent in epoch {epoch}"),
        ));
        out.push(self.envelope(&target, Body::Prepare { epoch, reason }));
        self.handover = Some(Handover {
            target,
            reason,
            epoch,
            started_ms: now,
            phase: Phase::Preparing,
        });
    }

    /// Transitions that follow from the state alone: promotion once a
    /// majority voted, recovery of a restarted active, handover start and
    /// timeouts, giving up an election.
    pub(super) fn progress(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rec.role == Role::Active && !self.serving && self.claim_live(now) {
            self.serving = true;
            self.recover_until = None;
            out.push(Action::SetServing(true));
            out.push(record(
                EventKind::Normal,
                Reason::Recovered,
                format!("lease for epoch {} re-established; serving", self.rec.epoch),
            ));
        }
        if self.rec.role == Role::Standby {
            if self.claim_live(now) {
                self.promote(now, out);
            } else if let Some(c) = &self.claim {
                // Once too many voters are bound to higher epochs, waiting
                // out the lease only keeps this member's own vote (and the
                // others' elections) tied up: give up at once.
                let lost = self.cfg.member_names().count() - c.refused.len() < self.cfg.quorum();
                if lost || now >= c.started_ms + self.cfg.lease_ms {
                    let epoch = c.epoch;
                    let message = if lost {
                        let refused: Vec<&str> = c.refused.iter().map(String::as_str).collect();
                        format!(
                            "epoch {epoch} cannot reach a majority: {} voted in it or later for another member",
                            refused.join(", ")
                        )
                    } else {
                        format!("no majority of voters granted epoch {epoch} in time")
                    };
                    self.claim = None;
                    self.quiet_since = now;
                    // The vote for ourselves protected a lease we no longer
                    // seek: free it for the next candidate, as `fence` does.
                    if self.rec.vote.as_ref().is_some_and(|v| v.to == self.me) {
                        self.promise_until = now;
                    }
                    out.push(record(EventKind::Warning, Reason::ElectionFailed, message));
                }
            }
        }
        if let Some(h) = &self.handover {
            let timeout = match h.phase {
                Phase::Preparing => self.cfg.candidate_fresh_ms,
                Phase::Changing { .. } => self.cfg.lease_ms + self.cfg.margin_ms,
            };
            if now >= h.started_ms + timeout {
                let message = format!("handover to {} timed out ({:?})", h.target, h.phase);
                self.handover = None;
                out.push(record(EventKind::Warning, Reason::HandoverAborted, message));
            }
        }
        if self.rec.role == Role::Active && self.serving && self.handover.is_none() {
            self.maybe_start_handover(now, out);
        }
    }

    pub(super) fn maybe_start_handover(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rec.paused {
            return;
        }
        if self.health.abnormal {
            match self.candidates(now).first().map(|s| (*s).to_owned()) {
                Some(target) => self.begin_handover(now, target, HandoverReason::Abnormal, out),
                None if !self.warned_no_candidate => {
                    self.warned_no_candidate = true;
                    out.push(record(
                        EventKind::Warning,
                        Reason::NoCandidate,
                        "abnormal, but no standby answered the recent probes as healthy; \
                         staying active (para 0160)"
                            .to_owned(),
                    ));
                }
                None => {}
            }
            return;
        }
        if self.cfg.preempt_after_ms.is_none() {
            return;
        }
        let target = self
            .candidates(now)
            .into_iter()
            .find(|c| {
                self.cfg.prefers(c, &self.me)
                    && self.peers.get(*c).is_some_and(|v| v.status.preempt_ready)
            })
            .map(str::to_owned);
        if let Some(target) = target {
            self.begin_handover(now, target, HandoverReason::Preempt, out);
        }
    }

    /// The target of a handover being prepared refused it: the handover is
    /// off, and the target is not a candidate until it says otherwise.
    pub(super) fn on_refuse(
        &mut self,
        from: &str,
        epoch: u64,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        if let Some(h) = &self.handover
            && h.target == from
            && h.epoch == epoch
            && h.phase == Phase::Preparing
        {
            self.handover = None;
            if let Some(v) = self.peers.get_mut(from) {
                v.status.eligible = false;
            }
            out.push(record(
                EventKind::Warning,
                Reason::HandoverAborted,
                format!("{from} refused to take over: {reason}"),
            ));
        }
    }

    /// The target confirms it is active in `new_epoch`: the handover is
    /// complete.
    pub(super) fn on_changed(
        &mut self,
        now: u64,
        from: &str,
        new_epoch: u64,
        out: &mut Vec<Action>,
    ) {
        if let Some(h) = &self.handover
            && h.target == from
            && h.phase == (Phase::Changing { new_epoch })
        {
            self.handover = None;
            if self.rec.role == Role::Active {
                // Only reachable with fencing disabled: the seed's S910.
                self.fence(
                    now,
                    Reason::SteppedDown,
                    format!("{from} confirmed it is active"),
                    out,
                );
            }
            out.push(record(
                EventKind::Normal,
                Reason::HandoverComplete,
                format!("{from} confirmed it is active in epoch {new_epoch}"),
            ));
        }
    }
}
