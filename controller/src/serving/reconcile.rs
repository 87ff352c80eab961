//! The reconcile loop and its passes: while the desired state holds, new
//! and changed service pods are brought in line with it from the pod
//! watch's cache; [`ServeMemo`] keeps a pass from patching again what was
//! just made to serve.

use super::*;

/// How long a successful serve patch stands for its pod in the reconcile
/// loop's eyes, while the pod watch catches up with it. A few seconds is
/// ample for a watch to deliver thousands of updates; past it the pod
/// cache decides again, so a hand edit of the condition is undone at the
/// latest this much later.
pub const SERVE_MEMO: Duration = Duration::from_secs(5);

/// The pods whose serving condition this controller set True in the last
/// [`SERVE_MEMO`], by uid.
///
/// Why: a promotion patches every service pod, and every patch comes back
/// through the pod watch. The reconcile loop's pass runs on that watch's
/// cache, which lags the patches by up to seconds under load, so without a
/// memory it patched most pods a second time (2,000 pods: 4,201 status
/// PATCHes instead of about 2,300 in `benches/serving_scale.rs`), each
/// a real write with a new `lastTransitionTime`, which doubled the time to
/// all-serving. Only serving is remembered: a stop is never skipped, and
/// the fence forgets everything, so a later promotion starts afresh.
#[derive(Debug, Default)]
pub struct ServeMemo {
    at: HashMap<String, Instant>,
}

impl ServeMemo {
    /// Whether the pod `uid` was made to serve less than [`SERVE_MEMO`]
    /// before `now`.
    pub fn fresh(&self, uid: &str, now: Instant) -> bool {
        self.at
            .get(uid)
            .is_some_and(|t| now.saturating_duration_since(*t) < SERVE_MEMO)
    }

    /// Notes that the pod `uid` was made to serve at `now`.
    pub fn record(&mut self, uid: &str, now: Instant) {
        self.at.insert(uid.to_owned(), now);
    }

    /// Forgets the pod `uid` (its condition was set False).
    pub fn forget(&mut self, uid: &str) {
        self.at.remove(uid);
    }

    /// Forgets every pod (a fence).
    pub fn clear(&mut self) {
        self.at.clear();
    }

    /// Drops the entries older than [`SERVE_MEMO`] at `now`, so that pods
    /// long gone do not accumulate.
    pub fn prune(&mut self, now: Instant) {
        self.at
            .retain(|_, t| now.saturating_duration_since(*t) < SERVE_MEMO);
    }

    /// How many pods are remembered.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no pod is remembered.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

/// What one pass does to `pods` for `desired`: the condition patches to
/// send and the pods to restart. Pods made to serve in the last
/// [`SERVE_MEMO`] are left alone (see [`ServeMemo`]).
pub(super) fn plan_pass(
    shared: &Shared,
    pods: &[Pod],
    desired: bool,
) -> (Vec<ConditionPatch>, Vec<PodRef>) {
    let mut patches = Vec::new();
    let mut restart = Vec::new();
    let now = Instant::now();
    let mut memo = shared.served.lock().ok();
    if let Some(m) = memo.as_mut() {
        m.prune(now);
    }
    let mut escapes = shared.escapes.lock().ok();
    let epoch = shared.epoch.load(std::sync::atomic::Ordering::SeqCst);
    for pod in pods {
        let Some(r) = PodRef::of(pod) else { continue };
        match decide(pod, desired, epoch) {
            // Made to serve moments ago; the cache has not caught up.
            PodAction::Serve if memo.as_ref().is_some_and(|m| m.fresh(&r.uid, now)) => {}
            PodAction::Serve => patches.push((r, true, ACTIVE_REASON)),
            PodAction::Stop(reason) => patches.push((r, false, reason)),
            PodAction::Restart if admit_restart(shared, escapes.as_deref_mut(), pod, &r, now) => {
                restart.push(r);
            }
            PodAction::Restart | PodAction::Keep => {}
        }
    }
    (patches, restart)
}

/// One reconciliation pass over `pods` for the current desired state: sends
/// condition patches and starts restarts. Returns how many pods were made to
/// serve.
pub(super) async fn pass(
    shared: &Arc<Shared>,
    pods: &[Pod],
    tasks: &Arc<Mutex<JoinSet<()>>>,
) -> usize {
    let _effects = shared.effects.lock().await;
    let Some(desired) = *shared.desired.borrow() else {
        return 0;
    };
    let (patches, restart) = plan_pass(shared, pods, desired);
    let mut served = 0;
    for ((r, serve, _), res) in send_conditions(shared, patches).await {
        let done = res.unwrap_or_else(|e| {
            warn!(pod = %format!("{}/{}", r.namespace, r.name), error = %e, "could not set the serving condition");
            false
        });
        if !done {
            continue;
        }
        if serve {
            served += 1;
        } else if desired {
            debug!(pod = %r.name, "unexpected stop while active");
        }
    }
    // Pods stopped by this pass with STOPPED_REASON are restarted by the
    // next pass (the watch sees the new condition); pods found stopped now
    // are restarted here: this is how an interrupted demotion resumes. Pods
    // released in an epoch not served are restarted in either state.
    if !restart.is_empty() {
        drop(spawn_restarts(shared, tasks, restart).1);
    }
    served
}

/// Watches pods and opted-in namespaces and reconciles on every change, on
/// a desired-state change and every `resync`.
pub(super) async fn reconcile_loop(shared: Arc<Shared>, tasks: Weak<Mutex<JoinSet<()>>>) {
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (nss, nss_writer) = reflector::store::<Namespace>();
    let pod_events = watcher(
        Api::<Pod>::all(shared.client.clone()),
        watcher::Config::default().labels(&service_pod_selector()),
    )
    .default_backoff()
    .reflect(pods_writer)
    .map(|_| ());
    let ns_events = watcher(
        Api::<Namespace>::all(shared.client.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            names::INJECT_LABEL,
            names::INJECT_ENABLED
        )),
    )
    .default_backoff()
    .reflect(nss_writer)
    .map(|_| ());
    let mut changes = stream::select(pod_events, ns_events).boxed();
    // The reflectors only fill while their stream is polled, so the stream
    // is driven on its own, beside the passes, and only signals a change.
    let changed = tokio::sync::Notify::new();
    let drive = async {
        while changes.next().await.is_some() {
            changed.notify_one();
        }
    };
    let reconcile = async {
        let mut desired = shared.desired.subscribe();
        if pods.wait_until_ready().await.is_err() || nss.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = changed.notified() => {}
                r = desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(shared.config.resync) => {}
            }
            // Let a burst of events settle into one pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let opted = opted_in(
                &nss.state()
                    .iter()
                    .map(|n| n.as_ref().clone())
                    .collect::<Vec<_>>(),
            );
            let targets: Vec<Pod> = pods
                .state()
                .iter()
                .filter(|p| is_service_pod(p, &opted))
                .map(|p| p.as_ref().clone())
                .collect();
            let Some(tasks) = tasks.upgrade() else { return };
            pass(&shared, &targets, &tasks).await;
        }
    };
    tokio::select! {
        () = drive => warn!("pod watch ended; serving reconcile loop stops"),
        () = reconcile => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serve_is_remembered_for_the_memo_period_and_a_stop_or_fence_forgets_it() {
        let t0 = Instant::now();
        let mut memo = ServeMemo::default();
        assert!(!memo.fresh("a", t0));
        memo.record("a", t0);
        memo.record("b", t0);
        assert!(memo.fresh("a", t0 + SERVE_MEMO - Duration::from_millis(1)));
        assert!(
            !memo.fresh("a", t0 + SERVE_MEMO),
            "past the memo the cache decides"
        );
        memo.forget("a");
        assert!(!memo.fresh("a", t0));
        memo.prune(t0 + SERVE_MEMO);
        assert!(memo.is_empty(), "old entries are pruned");
        memo.record("c", t0);
        memo.clear();
        assert_eq!(memo.len(), 0);
    }
}
