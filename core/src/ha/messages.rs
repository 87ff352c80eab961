//! A peer's message: dropped unless it is for this member from another
//! member in this protocol version; a later epoch is adopted (an active
//! steps down for it only if the sender claims a live lease); then each
//! body goes to its sub-protocol (probes, lease answers, the handover).

use super::*;

impl Node {
    pub(super) fn on_message(&mut self, now: u64, env: Envelope, out: &mut Vec<Action>) {
        if env.version != PROTOCOL_VERSION
            || env.to != self.me
            || env.from == self.me
            || !self.cfg.is_member(&env.from)
        {
            return;
        }
        let from = env.from.clone();
        self.highest_seen = self.highest_seen.max(env.epoch);
        // A lease holder yields to a later epoch only when the sender claims
        // a live lease in it (it serves as active). While this lease lives,
        // no majority can have backed anyone else, so any other claim of a
        // later epoch is stale or false (a record edited by hand, a peer
        // restarted from one): it must not stop the one live active.
        let yields =
            self.rec.role != Role::Active || !self.claim_live(now) || claims_live_lease(&env.body);
        if env.epoch > self.rec.epoch && yields {
            // Someone was active in a later epoch; an active here has lost
            // its lease already (majorities intersect), so it steps down.
            if self.rec.role == Role::Active {
                self.fence(
                    now,
                    Reason::SteppedDown,
                    format!("{from} reports epoch {} > {}", env.epoch, self.rec.epoch),
                    out,
                );
            }
            self.rec.epoch = env.epoch;
            self.persist(out);
            if self.claim.as_ref().is_some_and(|c| c.epoch <= env.epoch) {
                self.claim = None;
            }
        }
        match env.body {
            Body::Probe {
                sent_ms,
                status,
                lease,
            } => {
                self.observe(now, &from, env.epoch, status, None, out);
                // Without a lease request it is an announcement (see
                // `announce_fenced`), not a probe that expects an answer.
                if let Some(request) = lease {
                    self.answer_probe(now, &from, sent_ms, &request, out);
                }
            }
            Body::ProbeReply {
                probe_sent_ms,
                status,
                lease,
            } => {
                // The reply echoes our own send time, which a lease is then
                // counted from. One from the future answers no probe of
                // ours: counted, it would stretch the lease past what the
                // voter promised (and near `u64::MAX` overflow it), and
                // make the peer look fresh for as long.
                if probe_sent_ms > now {
                    return;
                }
                self.observe(now, &from, env.epoch, status, Some(probe_sent_ms), out);
                if let Some(answer) = lease {
                    self.count_answer(from, probe_sent_ms, answer);
                }
            }
            Body::Prepare { epoch, reason } => self.on_prepare(now, &from, epoch, reason, out),
            Body::Ready { epoch } => self.on_ready(now, &from, epoch, out),
            Body::Refuse { epoch, reason } => self.on_refuse(&from, epoch, &reason, out),
            Body::Change { epoch, new_epoch } => self.on_change(now, &from, epoch, new_epoch, out),
            Body::Changed { new_epoch } => self.on_changed(now, &from, new_epoch, out),
        }
    }
}

/// Whether a message's sender claims to hold a live lease: it reports
/// itself active and serving, which the core only does with a live lease.
fn claims_live_lease(body: &Body) -> bool {
    match body {
        Body::Probe { status, .. } | Body::ProbeReply { status, .. } => {
            status.role == Role::Active && status.serving
        }
        _ => false,
    }
}
