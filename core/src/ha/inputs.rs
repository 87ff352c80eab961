//! The inputs that are not peer messages: health verdicts, ticks, a new
//! HA configuration, and operator commands.

use super::*;

impl Node {
    pub(super) fn on_health(&mut self, now: u64, mut v: HealthVerdict) {
        if self.is_witness() {
            return;
        }
        // Data found current is believed at once; "behind" waits for a
        // live active to confirm it (see `confirm_data_behind`), since the
        // death of the active also stops replication (a WAL receiver no
        // longer streams, a marker ages) and must not keep every standby
        // from taking over.
        if v.data_behind {
            self.data_behind_pending |= !self.data_behind_judged;
        } else {
            self.data_behind_judged = false;
            self.data_behind_pending = false;
        }
        v.data_behind = self.data_behind_judged;
        if v.eligible() {
            self.eligible_since.get_or_insert(now);
        } else {
            self.eligible_since = None;
        }
        if !v.abnormal {
            self.warned_no_candidate = false;
        }
        self.health = v;
    }

    pub(super) fn on_tick(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.claim.is_some() && now >= self.next_probe_ms {
            self.send_probes(now, out);
        }
        if let Some(h) = &self.handover
            && let Phase::Changing { new_epoch } = h.phase
        {
            let (target, epoch) = (h.target.clone(), h.epoch);
            out.push(self.envelope(&target, Body::Change { epoch, new_epoch }));
        }
        if self.may_start_election()
            && now >= self.election_at()
            && let Some(epoch) = self.next_epoch()
        {
            self.start_candidacy(now, epoch, None, out);
        }
    }

    pub(super) fn on_config(&mut self, cfg: HaConfig, out: &mut Vec<Action>) {
        let verdict = cfg.validate().and_then(|()| {
            if cfg.is_member(&self.me) && cfg.is_cluster(&self.me) == self.cfg.is_cluster(&self.me)
            {
                Ok(())
            } else {
                Err(HaConfigError::UnknownSelf(self.me.clone()))
            }
        });
        match verdict {
            Err(e) => out.push(record(
                EventKind::Warning,
                Reason::ConfigRejected,
                format!("new HA configuration rejected, keeping the previous one: {e}"),
            )),
            Ok(()) if !self.cfg.runtime_compatible(&cfg) => out.push(record(
                EventKind::Warning,
                Reason::ConfigRejected,
                "members, witness, leaseMs, marginMs and unsafePromoteOnSilence cannot change \
                 while running; restart every member to apply"
                    .to_owned(),
            )),
            Ok(()) => {
                self.cfg = Arc::new(cfg);
                out.push(record(
                    EventKind::Normal,
                    Reason::ConfigApplied,
                    "new HA configuration applied".to_owned(),
                ));
            }
        }
    }

    pub(super) fn on_command(&mut self, now: u64, cmd: Command, out: &mut Vec<Action>) {
        match cmd {
            Command::Pause | Command::Resume => {
                let pause = cmd == Command::Pause;
                if self.rec.paused != pause {
                    self.rec.paused = pause;
                    self.persist(out);
                }
                let (reason, what) = if pause {
                    (Reason::Paused, "paused")
                } else {
                    (Reason::Resumed, "resumed")
                };
                out.push(record(
                    EventKind::Normal,
                    reason,
                    format!("automatic failover {what} by operator"),
                ));
            }
            Command::Switchover { target } => {
                let refusal = if self.rec.role != Role::Active || !self.serving {
                    Some(format!(
                        "{} is not the serving active; send the switchover to the active",
                        self.me
                    ))
                } else if target == self.me {
                    Some(format!("{target} is already active"))
                } else if !self.cfg.is_cluster(&target) {
                    Some(format!("{target} is not a cluster of this group"))
                } else if let Some(h) = &self.handover {
                    Some(format!("a handover to {} is already in progress", h.target))
                } else if !self.candidates(now).contains(&target.as_str()) {
                    Some(format!(
                        "{target} is not a fresh healthy candidate (it has not answered a recent \
                         probe as a healthy standby)"
                    ))
                } else {
                    None
                };
                match refusal {
                    Some(message) => {
                        out.push(record(EventKind::Warning, Reason::CommandRefused, message));
                    }
                    None => self.begin_handover(now, target, HandoverReason::Switchover, out),
                }
            }
        }
    }
}
