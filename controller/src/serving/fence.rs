//! The fence: every service pod's condition False, confirmed, before
//! [`PodServing::demote`] returns (and the HA loop may send `change`).
//!
//! It starts from the pod watch's cache and ends on a quorum LIST. The
//! pods the cache shows serving are stopped at once, while the LIST runs;
//! then every pod the LIST shows still needing a stop (and not already
//! patched from the cache) is stopped. The fence is in place when every
//! pod of the LIST has been dealt with, never on the cache alone: the
//! cache lags this controller's own serve patches by seconds under load
//! (the reason for [`ConditionMemo`]), and it cannot show that a write
//! completed by a previous leader, or by hand, has reached it. The LIST is
//! taken after the effects lock, so after every serve patch of this
//! controller has been answered, and it is itself served from a cache, the
//! API server's own: since Kubernetes 1.34 (`ConsistentListFromCache`, GA)
//! a quorum LIST waits until the API server's watch cache has caught up
//! with etcd and answers from it. At 10,000 pods that read still takes
//! 1.3–1.9 s on two cores (`benches/serving_scale.rs`), which is why it
//! runs beside the first patches rather than before them.
//!
//! Only pods the cache shows serving are stopped from it, with
//! [`STOPPED_REASON`] (they must be restarted): a pod it shows without the
//! condition may have been made to serve since, and the reason it gets
//! decides whether it is restarted, so it waits for the LIST.

use super::*;

/// The effects lock, handed back by [`fence`] so the restarts it found are
/// registered before any reconcile pass can claim them.
pub(super) type FenceGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Attempts of the fence before it reports failure.
pub(super) const FENCE_ROUNDS: usize = 5;

/// What [`fence`] did, with the effects lock still held.
pub(super) struct Fenced<'a> {
    /// The effects lock: no pass sets a condition True while it is held.
    pub effects: FenceGuard<'a>,
    /// Pods whose condition went from True to False.
    pub stopped: usize,
    /// Pods that got the condition False without having served.
    pub standby: usize,
    /// Pods to restart, sorted and without repeats.
    pub restart: Vec<PodRef>,
    /// Pods stopped from the watch cache, before the LIST's answer.
    pub from_cache: usize,
    /// Time the quorum LIST took (it runs beside the first patches).
    pub read_took: Duration,
}

/// The stops the fence sends from the watch cache, before the LIST
/// answers: the pods `cached` shows serving (see the module documentation
/// for why no others).
pub(super) fn early_stops(cached: &[Arc<Pod>]) -> Vec<ConditionPatch> {
    cached
        .iter()
        .filter(|p| decide(p, false, 0) == PodAction::Stop(STOPPED_REASON))
        .filter_map(|p| Some((PodRef::of(p)?, false, STOPPED_REASON)))
        .collect()
}

/// The outcomes of the fence's patches so far.
#[derive(Default)]
struct Tally {
    stopped: usize,
    standby: usize,
    restart: Vec<PodRef>,
    failed: Vec<ConditionPatch>,
    last_error: String,
}

impl Tally {
    fn add(&mut self, results: Vec<(ConditionPatch, Result<bool, kube::Error>)>) {
        for (patch, res) in results {
            match res {
                Ok(true) if patch.2 == STOPPED_REASON => {
                    self.stopped += 1;
                    self.restart.push(patch.0);
                }
                Ok(true) => self.standby += 1,
                Ok(false) => {}
                Err(e) => {
                    self.last_error = format!("{}/{}: {e}", patch.0.namespace, patch.0.name);
                    self.failed.push(patch);
                }
            }
        }
    }
}

/// Sets the condition False on every service pod; returns once no service
/// pod has it True.
pub(super) async fn fence(shared: &Shared) -> Result<Fenced<'_>, ServingError> {
    let effects = shared.effects.lock().await;
    // Whatever served before the fence is judged afresh by the next
    // promotion.
    if let Ok(mut memo) = shared.memo.lock() {
        memo.clear();
    }
    let early = early_stops(&cached_service_pods(shared));
    let from_cache = early.len();
    let early_uids: HashSet<String> = early.iter().map(|(r, _, _)| r.uid.clone()).collect();
    let read = async {
        let started = Instant::now();
        (list_service_pods(&shared.client).await, started.elapsed())
    };
    let (early_results, (listed, read_took)) = futures::join!(send_conditions(shared, early), read);
    let mut tally = Tally::default();
    tally.add(early_results);
    let listed = listed?;
    let mut late = Vec::new();
    {
        let now = Instant::now();
        // Held for this loop only: the guard is not `Send`.
        let mut escapes = shared.escapes.lock().ok();
        for pod in &listed {
            let Some(r) = PodRef::of(pod) else { continue };
            match decide(pod, false, 0) {
                // Already sent from the cache (a failure is retried below).
                PodAction::Stop(_) if early_uids.contains(&r.uid) => {}
                PodAction::Stop(reason) => late.push((r, false, reason)),
                PodAction::Restart
                    if admit_restart(shared, escapes.as_deref_mut(), pod, &r, now) =>
                {
                    tally.restart.push(r);
                }
                PodAction::Restart | PodAction::Keep | PodAction::Serve => {}
            }
        }
    }
    tally.add(send_conditions(shared, late).await);
    for round in 1..FENCE_ROUNDS {
        if tally.failed.is_empty() {
            break;
        }
        warn!(round, failed = tally.failed.len(), error = %tally.last_error, "some service pods could not be stopped; retrying");
        tokio::time::sleep(backoff(
            u32::try_from(round - 1).unwrap_or(u32::MAX),
            shared.config.backoff_min,
            shared.config.backoff_max,
        ))
        .await;
        let retry = std::mem::take(&mut tally.failed);
        tally.add(send_conditions(shared, retry).await);
    }
    if !tally.failed.is_empty() {
        // Count what still serves, for the message.
        let still = list_service_pods(&shared.client)
            .await?
            .iter()
            .filter(|p| serving_state(p) == ServingState::True)
            .count();
        if still > 0 {
            return Err(ServingError::FenceIncomplete(still, tally.last_error));
        }
    }
    let Tally {
        stopped,
        standby,
        mut restart,
        ..
    } = tally;
    restart.sort_by(|a, b| a.uid.cmp(&b.uid));
    restart.dedup();
    Ok(Fenced {
        effects,
        stopped,
        standby,
        restart,
        from_cache,
        read_took,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodReadinessGate, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(name: &str, condition: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("app".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                readiness_gates: Some(vec![PodReadinessGate {
                    condition_type: counterweight_core::names::SERVING_CONDITION.into(),
                }]),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                conditions: condition.map(|status| {
                    vec![PodCondition {
                        type_: counterweight_core::names::SERVING_CONDITION.into(),
                        status: status.into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_the_pods_the_cache_shows_serving_are_stopped_before_the_list() {
        let cached = [
            pod("serving", Some("True")),
            pod("stopped", Some("False")),
            pod("never-told", None),
        ]
        .map(Arc::new);
        let early = early_stops(&cached);
        let names: Vec<&str> = early.iter().map(|(r, _, _)| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["serving"],
            "a pod the cache shows without the condition may serve by now: its reason waits for the LIST"
        );
        assert!(
            early
                .iter()
                .all(|(_, serve, reason)| !serve && *reason == STOPPED_REASON)
        );
    }
}
