//! The fence: every service pod's condition False, confirmed, before
//! [`PodServing::demote`] returns (and the HA loop may send `change`).

use super::*;

/// The effects lock, handed back by [`fence`] so the restarts it found are
/// registered before any reconcile pass can claim them.
pub(super) type FenceGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Attempts of the fence before it reports failure.
pub(super) const FENCE_ROUNDS: usize = 5;

/// Sets the condition False on every service pod; returns (the effects
/// lock, stopped, standby, pods to restart) once no service pod has it True.
pub(super) async fn fence(
    shared: &Shared,
) -> Result<(FenceGuard<'_>, usize, usize, Vec<PodRef>), ServingError> {
    let effects = shared.effects.lock().await;
    // Whatever served before the fence is judged afresh by the next
    // promotion.
    if let Ok(mut memo) = shared.served.lock() {
        memo.clear();
    }
    let (mut stopped, mut standby) = (0, 0);
    let mut restart: Vec<PodRef> = Vec::new();
    let mut last_error = String::new();
    for round in 0..FENCE_ROUNDS {
        let pods = list_service_pods(&shared.client).await?;
        let mut work = Vec::new();
        {
            let now = Instant::now();
            // Held for this loop only: the guard is not `Send`.
            let mut escapes = shared.escapes.lock().ok();
            for pod in &pods {
                let Some(r) = PodRef::of(pod) else { continue };
                match decide(pod, false, 0) {
                    PodAction::Stop(reason) => work.push((r, reason)),
                    PodAction::Restart
                        if admit_restart(shared, escapes.as_deref_mut(), pod, &r, now) =>
                    {
                        restart.push(r);
                    }
                    PodAction::Restart | PodAction::Keep | PodAction::Serve => {}
                }
            }
        }
        if work.is_empty() {
            restart.sort_by(|a, b| a.uid.cmp(&b.uid));
            restart.dedup();
            return Ok((effects, stopped, standby, restart));
        }
        let stops = work.into_iter().map(|(r, reason)| (r, false, reason));
        let results = send_conditions(shared, stops.collect()).await;
        let mut failed = 0;
        for ((r, _, reason), res) in results {
            match res {
                Ok(true) if reason == STOPPED_REASON => {
                    stopped += 1;
                    restart.push(r);
                }
                Ok(true) => standby += 1,
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    last_error = format!("{}/{}: {e}", r.namespace, r.name);
                }
            }
        }
        if failed == 0 {
            restart.sort_by(|a, b| a.uid.cmp(&b.uid));
            restart.dedup();
            return Ok((effects, stopped, standby, restart));
        }
        warn!(round, failed, error = %last_error, "some service pods could not be stopped; retrying");
        tokio::time::sleep(backoff(
            u32::try_from(round).unwrap_or(u32::MAX),
            shared.config.backoff_min,
            shared.config.backoff_max,
        ))
        .await;
    }
    // Count what still serves, for the message.
    let still = list_service_pods(&shared.client)
        .await?
        .iter()
        .filter(|p| serving_state(p) == ServingState::True)
        .count();
    if still == 0 {
        return Ok((effects, stopped, standby, restart));
    }
    Err(ServingError::FenceIncomplete(still, last_error))
}
