//! Restarts of the pods a demotion stopped, and of pods that escaped their
//! gate: eviction first (it respects PodDisruptionBudgets), a delete after
//! [`PodServingConfig::delete_after`], with backoff, never twice for one
//! cause ([`EscapeMemo`]).

use super::*;

/// What to do after an eviction answer with HTTP status `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictStep {
    /// The pod is gone or replaced: nothing more to do.
    Gone,
    /// Refused for now (429: a PodDisruptionBudget; others: transient); retry.
    Retry,
}

/// Classifies an eviction or delete error by HTTP status.
pub fn evict_step(code: u16) -> EvictStep {
    match code {
        // 404: already gone; 409: the uid precondition failed, i.e. the pod
        // we meant was replaced already.
        404 | 409 => EvictStep::Gone,
        _ => EvictStep::Retry,
    }
}

/// Delay before eviction retry number `attempt` (0-based): doubling from
/// `min`, capped at `max`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// How one pod's restart ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Evicted,
    Deleted,
    Gone,
    Cancelled,
}

/// The result of restarting the pods a demotion stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartReport {
    /// Pods the batch was asked to restart.
    pub pods: usize,
    /// Pods restarted through the Eviction API.
    pub evicted: usize,
    /// Pods deleted after eviction was refused for
    /// [`PodServingConfig::delete_after`].
    pub deleted: usize,
    /// Pods already gone or replaced by the time we got to them.
    pub gone: usize,
    /// Pods left alone because the cluster turned active again (or the pod
    /// serves again).
    pub cancelled: usize,
    /// Wall time of the whole batch.
    pub took: Duration,
}

impl RestartReport {
    /// Pods actually restarted (evicted or deleted).
    pub fn restarted(&self) -> usize {
        self.evicted + self.deleted
    }
}

/// How long after restarting an [`escaped`](counterweight_core::workload::escaped) pod its owner's next escaped
/// pod is left alone: a replacement that came back without its gate says
/// a restart does not gate this owner's pods (no webhook registered, or
/// one configured to skip them), and restarting it again would only crash
/// the application in a loop.
pub const ESCAPE_RETRY: Duration = Duration::from_secs(600);

/// What to do with an [`escaped`](counterweight_core::workload::escaped) pod that [`decide`] would restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeVerdict {
    /// Restart it: its controller will make a gated replacement.
    Restart,
    /// Leave it serving, and warn (once per pod) for this reason.
    Leave(&'static str),
    /// Leave it; already warned about.
    LeaveQuietly,
}

/// The memory that keeps restarts of [`escaped`](counterweight_core::workload::escaped) pods from looping: for
/// each owner whose escaped pods were restarted, the newest creation time
/// among them, the pass that first restarted them, and when; and which
/// pods were warned about.
///
/// The pods of that owner in the pass that first restarted them are all
/// escapees of the same cause (replicas made before the webhook): all are
/// restarted, whatever their order and creation times. A ReplicaSet's
/// replicas are not made in the same second, and judging them by creation
/// time alone took a younger sibling for a replacement and left it
/// serving. In later passes, a pod no younger than the ones restarted is
/// one of them (asked about again while its eviction runs) and gets the
/// same answer; a younger one, still without its gate, is a replacement
/// that the webhook did not gate either, so it is left alone (with a
/// warning) for [`ESCAPE_RETRY`].
#[derive(Debug, Default)]
pub struct EscapeMemo {
    owners: HashMap<String, Restarted>,
    warned: HashMap<String, Instant>,
}

/// One owner's restarted escapees (see [`EscapeMemo`]).
#[derive(Debug)]
struct Restarted {
    /// The newest creation time among them.
    newest: Option<Timestamp>,
    /// The pass that first restarted them, which is also when.
    pass: Instant,
}

impl EscapeMemo {
    /// Decides for the escaped pod `uid`, created at `created`, whose
    /// controller is `owner` (its controller owner reference's uid), in the
    /// pass at `pass`, and remembers it. A pass takes `pass` once and asks
    /// about every pod of one snapshot with it, so the same instant means
    /// the same snapshot. A pod without a controller is left alone:
    /// evicting it deletes it for good.
    pub fn admit(
        &mut self,
        uid: &str,
        owner: Option<&str>,
        created: Option<Timestamp>,
        pass: Instant,
    ) -> EscapeVerdict {
        self.owners
            .retain(|_, r| pass.saturating_duration_since(r.pass) < ESCAPE_RETRY);
        self.warned
            .retain(|_, t| pass.saturating_duration_since(*t) < ESCAPE_RETRY);
        let reason = match owner {
            None => "no controller owns it, and a restart would delete it for good",
            Some(o) => match self.owners.get_mut(o) {
                Some(r) if r.pass != pass && created.is_some() && created > r.newest => {
                    "a replacement of the same owner came back without its gate too: check that \
                     the webhook is registered and injects this pod (cwctl check)"
                }
                Some(r) => {
                    r.newest = r.newest.max(created);
                    return EscapeVerdict::Restart;
                }
                None => {
                    self.owners.insert(
                        o.to_owned(),
                        Restarted {
                            newest: created,
                            pass,
                        },
                    );
                    return EscapeVerdict::Restart;
                }
            },
        };
        if self.warned.insert(uid.to_owned(), pass).is_some() {
            EscapeVerdict::LeaveQuietly
        } else {
            EscapeVerdict::Leave(reason)
        }
    }
}

/// The uid of `pod`'s controller (the owner reference marked `controller`).
pub(super) fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Whether `pod`, which [`decide`] would restart, is restarted: a gated
/// pod always; an [`escaped`](counterweight_core::workload::escaped) one if [`EscapeMemo::admit`] lets it, with a
/// Warning Event for a pod restarted or left serving. `escapes` is `None`
/// only if its lock was poisoned, and then every restart goes ahead.
/// `pass` is the instant the caller's pass took once for its snapshot.
pub(super) fn admit_restart(
    shared: &Shared,
    escapes: Option<&mut EscapeMemo>,
    pod: &Pod,
    r: &PodRef,
    pass: Instant,
) -> bool {
    let Some(memo) = escapes else {
        return true;
    };
    if has_serving_gate(pod) {
        return true;
    }
    let name = format!("{}/{}", r.namespace, r.name);
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    match memo.admit(&r.uid, controller_uid(pod), created, pass) {
        EscapeVerdict::Restart => {
            warn!(pod = %name, "a pod without its init-gate runs on a standby; restarting it so that its replacement is gated");
            record(
                shared,
                EventType::Warning,
                "UngatedPodRestarted",
                "Restart",
                &format!(
                    "{name} ran without its init-gate on a standby (made before the webhook or before its namespace opted in); restarting it so that its replacement is gated"
                ),
            );
            true
        }
        EscapeVerdict::Leave(why) => {
            warn!(pod = %name, why, "a pod without its init-gate serves on a standby; not restarting it");
            record(
                shared,
                EventType::Warning,
                "UngatedPodServes",
                "Restart",
                &format!(
                    "{name} runs without its init-gate on a standby and is not restarted: {why}"
                ),
            );
            false
        }
        EscapeVerdict::LeaveQuietly => false,
    }
}

/// Starts a background batch restarting `pods` not already being restarted;
/// returns how many it took on and where its report will come.
pub(super) fn spawn_restarts(
    shared: &Arc<Shared>,
    tasks: &Arc<Mutex<JoinSet<()>>>,
    pods: Vec<PodRef>,
) -> (usize, Option<oneshot::Receiver<RestartReport>>) {
    let fresh: Vec<PodRef> = match shared.restarting.lock() {
        Ok(mut busy) => pods
            .into_iter()
            .filter(|p| busy.insert(p.uid.clone()))
            .collect(),
        Err(_) => return (0, None),
    };
    if fresh.is_empty() {
        return (0, None);
    }
    let count = fresh.len();
    let (tx, rx) = oneshot::channel();
    let shared = shared.clone();
    let Ok(mut set) = tasks.lock() else {
        return (0, None);
    };
    // Reap finished tasks so the set does not grow without bound.
    while set.try_join_next().is_some() {}
    set.spawn(async move {
        let report = restart_batch(&shared, fresh).await;
        // Nobody may wait for it (the HA loop does not): that is fine.
        let _ = tx.send(report);
    });
    (count, Some(rx))
}

pub(super) async fn restart_batch(shared: &Shared, pods: Vec<PodRef>) -> RestartReport {
    let started = Instant::now();
    let total = pods.len();
    if !shared.config.restart_delay.is_zero() {
        // Each restart re-checks the desired state first, so a return to
        // active during the delay cancels them.
        tokio::time::sleep(shared.config.restart_delay).await;
    }
    info!(
        pods = total,
        "restarting the service pods that were serving"
    );
    let futures: Vec<_> = pods
        .into_iter()
        .map(|p| async move {
            let o = restart_one(shared, &p).await;
            (p, o)
        })
        .collect();
    let outcomes: Vec<(PodRef, Outcome)> = stream::iter(futures)
        .buffer_unordered(shared.config.concurrency.max(1))
        .collect()
        .await;
    let mut report = RestartReport {
        pods: total,
        took: started.elapsed(),
        ..Default::default()
    };
    if let Ok(mut busy) = shared.restarting.lock() {
        for (p, _) in &outcomes {
            busy.remove(&p.uid);
        }
    }
    for (_, o) in &outcomes {
        match o {
            Outcome::Evicted => report.evicted += 1,
            Outcome::Deleted => report.deleted += 1,
            Outcome::Gone => report.gone += 1,
            Outcome::Cancelled => report.cancelled += 1,
        }
    }
    info!(
        restarted = report.restarted(),
        evicted = report.evicted,
        deleted = report.deleted,
        gone = report.gone,
        cancelled = report.cancelled,
        took_ms = report.took.as_millis(),
        "service pod restarts finished"
    );
    let type_ = if report.deleted > 0 {
        EventType::Warning
    } else {
        EventType::Normal
    };
    record(
        shared,
        type_,
        "ServicePodsRestarted",
        "Restart",
        &format!(
            "restarted {} of {} service pod(s) in {} ms: {} evicted, {} deleted after eviction was refused for {} s, {} already gone, {} left serving",
            report.restarted(),
            report.pods,
            report.took.as_millis(),
            report.evicted,
            report.deleted,
            shared.config.delete_after.as_secs(),
            report.gone,
            report.cancelled
        ),
    );
    report
}

/// Longest wait for one eviction request.
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest wait for one eviction request, so it can at least be answered.
pub(super) const MIN_EVICT_WAIT: Duration = Duration::from_millis(500);

/// Restarts one pod: evicts it, retrying refusals with backoff, and deletes
/// it once eviction has been refused for `delete_after`.
pub(super) async fn restart_one(shared: &Shared, p: &PodRef) -> Outcome {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &p.namespace);
    let started = Instant::now();
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(p.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let mut attempt: u32 = 0;
    loop {
        debug!(pod = %p.name, attempt, "restart attempt");
        let Some(desired) = *shared.desired.borrow() else {
            return Outcome::Cancelled;
        };
        let epoch = shared.epoch.load(std::sync::atomic::Ordering::SeqCst);
        // The pod itself says whether it still needs the restart.
        match api.get_opt(&p.name).await {
            Ok(None) => return Outcome::Gone,
            Ok(Some(pod)) if pod.metadata.uid.as_deref() != Some(p.uid.as_str()) => {
                return Outcome::Gone;
            }
            Ok(Some(pod)) if pod.metadata.deletion_timestamp.is_some() => return Outcome::Gone,
            // Still to be restarted for the state wanted now? A return to
            // active cancels the restart of a pod a demotion stopped.
            Ok(Some(pod)) if decide(&pod, desired, epoch) != PodAction::Restart => {
                return Outcome::Cancelled;
            }
            Ok(Some(_)) => {}
            Err(e) => warn!(pod = %p.name, error = %e, "could not read pod before restart"),
        }
        if started.elapsed() >= shared.config.delete_after {
            match api.delete(&p.name, &delete).await {
                Ok(_) => {
                    warn!(namespace = %p.namespace, pod = %p.name, "eviction refused too long; pod deleted");
                    return Outcome::Deleted;
                }
                Err(kube::Error::Api(s)) if evict_step(s.code) == EvictStep::Gone => {
                    return Outcome::Gone;
                }
                Err(e) => warn!(pod = %p.name, error = %e, "delete failed; retrying"),
            }
        } else {
            let params = EvictParams {
                delete_options: Some(delete.clone()),
                ..Default::default()
            };
            // Bounded, and never past the delete deadline: kube's default
            // client retries a 429 itself, honouring the server's
            // Retry-After (10 s for a budget) up to 15 times, so a refused
            // eviction shows up here as a call that does not return.
            let budget = API_TIMEOUT
                .min(shared.config.delete_after.saturating_sub(started.elapsed()))
                .max(MIN_EVICT_WAIT);
            let Ok(answer) = tokio::time::timeout(budget, api.evict(&p.name, &params)).await else {
                info!(namespace = %p.namespace, pod = %p.name, waited_ms = budget.as_millis(), "eviction not answered in time (refused by a disruption budget and retried by the client, or slow); trying again");
                attempt = attempt.saturating_add(1);
                continue;
            };
            match answer {
                Ok(_) => {
                    debug!(namespace = %p.namespace, pod = %p.name, "evicted");
                    return Outcome::Evicted;
                }
                Err(kube::Error::Api(s)) if evict_step(s.code) == EvictStep::Gone => {
                    return Outcome::Gone;
                }
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    debug!(pod = %p.name, message = %s.message, "eviction refused (disruption budget); retrying");
                }
                Err(e) => warn!(pod = %p.name, error = %e, "eviction failed; retrying"),
            }
        }
        let wait = backoff(
            attempt,
            shared.config.backoff_min,
            shared.config.backoff_max,
        );
        let until_delete = shared.config.delete_after.saturating_sub(started.elapsed());
        let wait = if until_delete.is_zero() {
            wait
        } else {
            wait.min(until_delete)
        };
        tokio::time::sleep(wait).await;
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_pods_are_restarted_once_per_cause_never_in_a_loop() {
        let t = |s: i64| Some(Timestamp::from_second(s).expect("a time"));
        let now = Instant::now();
        let mut m = EscapeMemo::default();
        // No controller: an eviction would delete it for good.
        assert!(matches!(
            m.admit("bare", None, t(1), now),
            EscapeVerdict::Leave(_)
        ));
        assert_eq!(
            m.admit("bare", None, t(1), now),
            EscapeVerdict::LeaveQuietly
        );
        // Every replica made before the webhook, asked about in any order
        // and again on the next pass, is restarted: here the older first,
        // and the younger made a second later (the suite saw the younger
        // taken for a replacement and left serving).
        assert_eq!(m.admit("a", Some("rs"), t(9), now), EscapeVerdict::Restart);
        assert_eq!(m.admit("b", Some("rs"), t(10), now), EscapeVerdict::Restart);
        assert_eq!(m.admit("o", Some("rs"), t(8), now), EscapeVerdict::Restart);
        let next = now + Duration::from_millis(500);
        assert_eq!(
            m.admit("b", Some("rs"), t(10), next),
            EscapeVerdict::Restart
        );
        assert_eq!(m.admit("a", Some("rs"), t(9), next), EscapeVerdict::Restart);
        // A replacement made after them that is still ungated: the restart
        // did not gate it; leave it, warn once.
        assert!(matches!(
            m.admit("c", Some("rs"), t(20), next),
            EscapeVerdict::Leave(_)
        ));
        assert_eq!(
            m.admit("c", Some("rs"), t(20), next + Duration::from_millis(500)),
            EscapeVerdict::LeaveQuietly
        );
        // Another owner is judged on its own.
        assert_eq!(
            m.admit("d", Some("other"), t(20), next),
            EscapeVerdict::Restart
        );
        // After ESCAPE_RETRY the owner is tried again.
        let later = now + ESCAPE_RETRY;
        assert_eq!(
            m.admit("c", Some("rs"), t(20), later),
            EscapeVerdict::Restart
        );
    }

    #[test]
    fn eviction_answers_and_backoff() {
        assert_eq!(evict_step(404), EvictStep::Gone);
        assert_eq!(evict_step(409), EvictStep::Gone);
        assert_eq!(evict_step(429), EvictStep::Retry);
        assert_eq!(evict_step(500), EvictStep::Retry);
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        assert_eq!(backoff(0, min, max), min);
        assert_eq!(backoff(1, min, max), Duration::from_millis(400));
        assert_eq!(backoff(4, min, max), Duration::from_millis(3200));
        assert_eq!(backoff(5, min, max), max);
        assert_eq!(backoff(u32::MAX, min, max), max);
    }

    #[test]
    fn restart_report_counts_restarts() {
        let r = RestartReport {
            pods: 4,
            evicted: 2,
            deleted: 1,
            gone: 1,
            ..Default::default()
        };
        assert_eq!(r.restarted(), 3);
    }
}
