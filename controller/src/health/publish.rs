//! An evaluation and where its outcome goes: S and the verdict, to the HA
//! loop first (a handover must not wait for anything else), then metrics,
//! Events and the state record's health key.

use counterweight_core::health::{HealthReport, Observation, Verdict, evaluate, pods_up};
use counterweight_core::state::{Part, PolicyStatus};
use kube::runtime::events::EventType;
use tracing::{Instrument, info, info_span, warn};

use super::HealthLoop;
use super::evaluator::Evaluator;
use crate::state_store::Written;
use crate::telemetry::ComponentLabel;

impl HealthLoop {
    /// Evaluates S; at a tick also advances Table 1's counter. Publishes the
    /// explanation, metrics, Events and the report channel.
    pub(super) async fn publish(&self, ev: &mut Evaluator, tick: bool) {
        // Before the pod cache has synced every component would look down:
        // say nothing rather than something false.
        if !ev.synced {
            return;
        }
        let Some(policy) = ev.policy.clone() else {
            return;
        };
        let Some(tally) = &ev.tally else { return };
        let span = info_span!("evaluation", cluster = %self.settings.cluster, tick);
        async {
            let started = std::time::Instant::now();
            let stance = self.stance.get();
            let grace_ms =
                u64::try_from(policy.gate_release_grace.as_millis()).unwrap_or(u64::MAX);
            let observations: Vec<Observation> = (0..policy.components.len())
                .map(|i| {
                    let (selected, ready) = tally.counts(i);
                    Observation {
                        selected,
                        ready: pods_up(
                            ready,
                            tally.at_gate(i),
                            tally.released(i),
                            stance,
                            grace_ms,
                        ),
                        checks: ev.checks.get(i).cloned().unwrap_or_default(),
                    }
                })
                .collect();
            let score = evaluate(&policy, &observations);
            let previous = ev.last_verdict;
            let verdict = if tick {
                self.metrics.evaluations.inc();
                ev.counter.tick(score.score, policy.threshold, policy.retries)
            } else {
                ev.last_verdict
            };
            ev.last_verdict = verdict;
            let report = HealthReport::new(&policy, score, verdict);

            self.metrics.health_score.set(report.score);
            self.metrics.health_threshold.set(report.threshold);
            self.metrics
                .health_retry_count
                .set(i64::from(report.retry_count));
            for c in &report.components {
                self.metrics
                    .component_up
                    .get_or_create(&ComponentLabel {
                        component: c.name.clone(),
                    })
                    .set(i64::from(c.up));
            }
            if tick {
                tracing::debug!(score = report.score, retry_count = report.retry_count, ?verdict, "interval evaluated");
            }

            // The HA loop hears the verdict first: a handover must not wait
            // for the Event and the explanation to be written.
            self.reports.send_replace(Some(report.clone()));
            let serialized = report.encode();
            self.metrics
                .evaluation_seconds
                .observe(started.elapsed().as_secs_f64());
            match verdict {
                Verdict::Abnormal { .. } if tick => {
                    warn!(summary = %report.summary(), "cluster abnormal");
                    self.record(
                        EventType::Warning,
                        "ClusterAbnormal",
                        "EvaluateHealth",
                        format!(
                            "weighted health stayed below the threshold for more than K={} intervals: {}",
                            report.retries,
                            report.summary()
                        ),
                    );
                }
                Verdict::Healthy if tick && previous != Verdict::Healthy => {
                    info!(summary = %report.summary(), "cluster healthy again");
                    self.record(
                        EventType::Normal,
                        "HealthRecovered",
                        "EvaluateHealth",
                        format!("weighted health is back at or above the threshold: {}", report.summary()),
                    );
                }
                _ => {}
            }

            if ev.published_health.as_deref() != Some(serialized.as_str())
                && self.write_key(HealthReport::KEY, serialized.clone()).await
            {
                ev.published_health = Some(serialized);
            }
        }
        .instrument(span)
        .await;
    }

    /// Writes the policy status key, unless it is already stored.
    pub(super) async fn write_policy_status(&self, ev: &mut Evaluator, status: String) {
        if ev.published_policy.as_deref() == Some(status.as_str()) {
            return;
        }
        if self.write_key(PolicyStatus::KEY, status.clone()).await {
            ev.published_policy = Some(status);
        }
    }

    /// Writes one key of the state ConfigMap; returns whether it is stored.
    async fn write_key(&self, key: &'static str, value: String) -> bool {
        self.metrics.api_requests.inc();
        match self
            .store
            .update(|data| {
                data.insert(key.to_owned(), value.clone());
            })
            .await
        {
            Ok((_, Written::Created)) => {
                warn!("state ConfigMap was missing; recreated as standby");
                true
            }
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, key, "could not write the state ConfigMap; will retry");
                false
            }
        }
    }
}
