//! Probes (FIG. 10): every member probes the others each
//! `probeIntervalMs`; a probe carries a lease request and its reply the
//! vote, so renewals ride on them. What a member learns of its peers
//! (status, epoch, freshness, competing actives) comes from here.

use super::*;

impl Node {
    pub(super) fn send_probes(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(c) = &self.claim else { return };
        let req = LeaseRequest {
            epoch: c.epoch,
            transfer: c.transfer.clone(),
        };
        let me = self.me.clone();
        if self.vote(now, &me, &req, out).is_ok()
            && let Some(c) = &mut self.claim
        {
            c.grants.insert(me, now);
        }
        let status = self.status(now);
        for peer in self.others() {
            out.push(self.envelope(
                &peer,
                Body::Probe {
                    sent_ms: now,
                    status,
                    lease: Some(req.clone()),
                },
            ));
        }
        self.next_probe_ms = now + self.cfg.probe_interval_ms;
    }

    /// An active was heard: a pending "data behind" is real (the active is
    /// alive and this member still is not current).
    pub(super) fn confirm_data_behind(&mut self) {
        if self.data_behind_pending {
            self.data_behind_pending = false;
            self.data_behind_judged = true;
            self.health.data_behind = true;
            self.eligible_since = None;
        }
    }

    /// Updates the view of a peer and reacts to a competing active (para
    /// 0088, both active: higher epoch, then preference, stays).
    pub(super) fn observe(
        &mut self,
        now: u64,
        from: &str,
        epoch: u64,
        status: Status,
        answered: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let view = self.peers.entry(from.to_owned()).or_insert(PeerView {
            status,
            epoch,
            answered_probe_ms: None,
            heard_ms: now,
        });
        let newer = match (answered, view.answered_probe_ms) {
            (Some(a), Some(b)) => a >= b,
            _ => true,
        };
        if newer {
            view.status = status;
            view.epoch = epoch;
            view.heard_ms = now;
            if answered.is_some() {
                view.answered_probe_ms = answered;
            }
        }
        if status.role == Role::Active {
            self.fenced.remove(from);
        } else if !status.serving {
            let e = self.fenced.entry(from.to_owned()).or_insert(epoch);
            *e = (*e).max(epoch);
        }
        if status.role == Role::Active && epoch >= self.rec.epoch {
            self.confirm_data_behind();
        }
        if status.role != Role::Active || epoch < self.rec.epoch {
            return;
        }
        match self.rec.role {
            Role::Active => {
                // Para 0088 (both active: the preferred stays) for the
                // actives that can coexist in one epoch: without the
                // quorum (the unsafe opt-in), or a restarted active that has
                // not re-established its lease. A live lease is never given
                // up for a same-epoch claim: one epoch has one majority.
                let may_yield = self.cfg.unsafe_promote_on_silence || !self.claim_live(now);
                if epoch == self.rec.epoch && self.cfg.prefers(from, &self.me) && may_yield {
                    self.fence(
                        now,
                        Reason::SteppedDown,
                        format!("{from} is also active in epoch {epoch} and is preferred"),
                        out,
                    );
                }
            }
            Role::Standby => {
                self.quiet_since = now;
                self.heard_active = true;
                // A serving active answers for its epoch; an election
                // without a handover cannot win against its voters.
                if status.serving && self.claim.as_ref().is_some_and(|c| c.transfer.is_none()) {
                    self.claim = None;
                }
            }
        }
    }

    /// Answers a peer's probe with this member's status and its vote on the
    /// lease the probe asks for.
    pub(super) fn answer_probe(
        &mut self,
        now: u64,
        from: &str,
        sent_ms: u64,
        request: &LeaseRequest,
        out: &mut Vec<Action>,
    ) {
        let answer = match self.vote(now, from, request, out) {
            Ok(()) => LeaseAnswer::Granted {
                epoch: request.epoch,
            },
            Err(voted_epoch) => LeaseAnswer::Denied {
                epoch: request.epoch,
                voted_epoch,
            },
        };
        let reply = Body::ProbeReply {
            probe_sent_ms: sent_ms,
            status: self.status(now),
            lease: Some(answer),
        };
        out.push(self.envelope(from, reply));
    }

    /// Counts a voter's answer to the lease request of the probe sent at
    /// `probe_sent_ms`: a grant extends the claim from that send time; a
    /// refusal by a voter bound to a later epoch rules it out of this one.
    pub(super) fn count_answer(&mut self, from: String, probe_sent_ms: u64, answer: LeaseAnswer) {
        match answer {
            LeaseAnswer::Granted { epoch } => {
                if let Some(c) = &mut self.claim
                    && c.epoch == epoch
                {
                    let t = c.grants.entry(from).or_insert(probe_sent_ms);
                    *t = (*t).max(probe_sent_ms);
                }
            }
            LeaseAnswer::Denied { epoch, voted_epoch } => {
                self.highest_seen = self.highest_seen.max(voted_epoch);
                if voted_epoch >= epoch
                    && let Some(c) = &mut self.claim
                    && c.epoch == epoch
                {
                    c.refused.insert(from);
                }
            }
        }
    }
}
