//! What the HA loop records and how it reads health, as plain functions:
//! the health report turned into the machine's verdict, which reasons are
//! transitions worth keeping in the state record, what a missing record
//! means once a peer is heard, and the owned keys an Event shows when a
//! foreign write is put back.

use std::collections::BTreeMap;

use counterweight_core::ha::{HealthVerdict, Reason};
use counterweight_core::health::{HealthReport, Verdict, below_threshold};
use counterweight_core::state;
use kube::runtime::events::EventType;

/// What to record about a state record that was missing at start, once
/// that can be told: when a peer is first heard (`highest` is the peer
/// heard at the highest epoch; `None` until then). Peers may come up minutes
/// apart on a first install, so there is no deadline: until then a log line
/// says the record was missing.
///
/// Missing is normal on a first install, where every member starts at
/// epoch 0, and worth a Warning when the group is past that: the member
/// joined late, or its record was deleted and with it any vote it promised
/// (the core grants no vote for `quiet_ms` after such a start).
pub(super) fn missing_record_event(
    highest: Option<(&str, u64)>,
    quiet_ms: u64,
) -> Option<(EventType, &'static str, String)> {
    match highest? {
        (_, 0) => Some((
            EventType::Normal,
            "StateCreated",
            "no state ConfigMap, and no member has been active yet (epoch 0): a first start; \
             created it as standby"
                .to_owned(),
        )),
        (peer, epoch) => Some((
            EventType::Warning,
            "StateRecreated",
            format!(
                "no state ConfigMap, while {peer} is at epoch {epoch}: this member joined late, \
                 or its record was deleted; created it as standby, and it grants no vote for \
                 {quiet_ms} ms after its start in case it promised one before"
            ),
        )),
    }
}

/// Turns a health report into the HA machine's verdict. Table 1 reports
/// "abnormal" on one tick only (its counter then restarts); for handover the
/// cluster stays abnormal until an interval is healthy again.
pub fn verdict(report: Option<&HealthReport>, abnormal: &mut bool) -> HealthVerdict {
    let Some(r) = report else {
        // No policy, no verdict: never a candidate, never abnormal.
        *abnormal = false;
        return HealthVerdict::default();
    };
    match r.verdict {
        Verdict::Abnormal { .. } => *abnormal = true,
        Verdict::Healthy => *abnormal = false,
        Verdict::Degraded { .. } => {}
    }
    HealthVerdict {
        abnormal: *abnormal,
        meets_threshold: !below_threshold(r.score, r.threshold),
        data_behind: !r.data_behind.is_empty(),
    }
}

pub(super) fn is_transition(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::Promoted
            | Reason::Fenced
            | Reason::SteppedDown
            | Reason::HandedOver
            | Reason::HandoverComplete
            | Reason::Recovered
    )
}

pub(super) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The keys of the state record the HA node owns, for a correction's Event.
pub(super) fn owned_keys(data: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    [
        state::STATE_KEY,
        state::EPOCH_KEY,
        state::VOTE_KEY,
        state::PAUSED_KEY,
    ]
    .into_iter()
    .map(|k| {
        (
            k.to_owned(),
            data.get(k)
                .cloned()
                .unwrap_or_else(|| "<absent>".to_owned()),
        )
    })
    .collect()
}

/// `k=v, …`, for an Event's message.
pub(super) fn show(keys: &BTreeMap<String, String>) -> String {
    keys.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::health::HealthReport;

    #[test]
    fn a_missing_record_is_a_first_start_only_while_the_group_is_at_epoch_0() {
        // Nobody heard yet: nothing can be told.
        assert!(missing_record_event(None, 1_800).is_none());
        let (kind, reason, _) = missing_record_event(Some(("west", 0)), 1_800).unwrap();
        assert_eq!((kind, reason), (EventType::Normal, "StateCreated"));
        let (kind, reason, message) = missing_record_event(Some(("west", 7)), 1_800).unwrap();
        assert_eq!((kind, reason), (EventType::Warning, "StateRecreated"));
        assert!(message.contains("west is at epoch 7"), "{message}");
        assert!(message.contains("1800 ms"), "{message}");
    }

    fn report(score: f64, verdict: Verdict) -> HealthReport {
        HealthReport {
            score,
            threshold: 0.6,
            retries: 2,
            retry_count: verdict.retry_count(),
            verdict,
            components: vec![],
            data_behind: vec![],
            data: vec![],
        }
    }

    #[test]
    fn abnormal_sticks_until_a_healthy_interval() {
        let mut abnormal = false;
        let v = verdict(
            Some(&report(0.5, Verdict::Abnormal { retry_count: 3 })),
            &mut abnormal,
        );
        assert!(v.abnormal && !v.meets_threshold);
        // Table 1 restarts its counter: the next interval is "degraded 1".
        let v = verdict(
            Some(&report(0.5, Verdict::Degraded { retry_count: 1 })),
            &mut abnormal,
        );
        assert!(v.abnormal, "still abnormal until healthy");
        // S back above D between ticks: eligible score, still abnormal.
        let v = verdict(
            Some(&report(0.9, Verdict::Degraded { retry_count: 1 })),
            &mut abnormal,
        );
        assert!(v.abnormal && v.meets_threshold);
        let v = verdict(Some(&report(0.9, Verdict::Healthy)), &mut abnormal);
        assert!(v.eligible());
        assert_eq!(verdict(None, &mut abnormal), HealthVerdict::default());
    }
}
