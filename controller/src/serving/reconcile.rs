//! The reconcile loop and its passes: while the desired state holds, new
//! and changed service pods are brought in line with it from the pod
//! watch's cache; [`ConditionMemo`] keeps a pass from patching again what
//! was just made to serve or stopped.

use super::*;

/// How long a successful condition patch stands for its pod in the
/// reconcile loop's eyes, while the pod watch catches up with it. A few
/// seconds is ample for a watch to deliver thousands of updates; past it
/// the pod cache decides again, so a hand edit of the condition is undone
/// at the latest this much later.
pub const CONDITION_MEMO: Duration = Duration::from_secs(5);

/// The pods whose serving condition this controller set in the last
/// [`CONDITION_MEMO`], by uid, with the value it set.
///
/// Why: a promotion patches every service pod True, and a fence every one
/// False, and every patch comes back through the pod watch. The reconcile
/// loop's pass runs on that watch's cache, which lags the patches by up to
/// seconds under load, so without a memory it patched most pods a second
/// time: 2,000 pods took 4,201 status PATCHes to make serve instead of
/// about 2,300 (`benches/serving_scale.rs`), each a real write with a new
/// `lastTransitionTime`, which doubled the time to all-serving; and after
/// a fence the pass would stop again every pod the cache still showed
/// serving. The fence itself never skips a pod for the memo: it
/// reads the API server (see the `fence` module), and forgets everything
/// first, so a later promotion starts afresh.
#[derive(Debug, Default)]
pub struct ConditionMemo {
    at: HashMap<String, (bool, Instant)>,
}

impl ConditionMemo {
    /// Whether the pod `uid` was given the condition `serve` less than
    /// [`CONDITION_MEMO`] before `now`.
    pub fn fresh(&self, uid: &str, serve: bool, now: Instant) -> bool {
        self.at
            .get(uid)
            .is_some_and(|(v, t)| *v == serve && now.saturating_duration_since(*t) < CONDITION_MEMO)
    }

    /// Notes that the pod `uid` was given the condition `serve` at `now`.
    pub fn record(&mut self, uid: &str, serve: bool, now: Instant) {
        self.at.insert(uid.to_owned(), (serve, now));
    }

    /// Forgets every pod (a fence).
    pub fn clear(&mut self) {
        self.at.clear();
    }

    /// Drops the entries older than [`CONDITION_MEMO`] at `now`, so that
    /// pods long gone do not accumulate.
    pub fn prune(&mut self, now: Instant) {
        self.at
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < CONDITION_MEMO);
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
/// send and the pods to restart. Pods given the wanted condition in the
/// last [`CONDITION_MEMO`] are left alone (see [`ConditionMemo`]).
pub(super) fn plan_pass(
    shared: &Shared,
    pods: &[Arc<Pod>],
    desired: bool,
) -> (Vec<ConditionPatch>, Vec<PodRef>) {
    let mut patches = Vec::new();
    let mut restart = Vec::new();
    let now = Instant::now();
    let mut memo = shared.memo.lock().ok();
    if let Some(m) = memo.as_mut() {
        m.prune(now);
    }
    let mut escapes = shared.escapes.lock().ok();
    let epoch = shared.epoch.load(std::sync::atomic::Ordering::SeqCst);
    for pod in pods {
        let Some(r) = PodRef::of(pod) else { continue };
        match decide(pod, desired, epoch) {
            // Set moments ago; the cache has not caught up.
            PodAction::Serve if memo.as_ref().is_some_and(|m| m.fresh(&r.uid, true, now)) => {}
            PodAction::Stop(_) if memo.as_ref().is_some_and(|m| m.fresh(&r.uid, false, now)) => {}
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

/// The service pods in the watch caches, now (shared, not copied: a pass
/// at 10,000 pods would otherwise copy them all).
pub(super) fn cached_service_pods(shared: &Shared) -> Vec<Arc<Pod>> {
    let opted = opted_in(
        &shared
            .nss
            .state()
            .iter()
            .map(|n| n.as_ref().clone())
            .collect::<Vec<_>>(),
    );
    shared
        .pods
        .state()
        .into_iter()
        .filter(|p| is_service_pod(p, &opted))
        .collect()
}

/// One reconciliation pass for the current desired state over the pods
/// `pods()` gives, called once the effects lock is held (so that a pass that
/// waited for a fence plans from what the cache shows after it, not
/// before): sends condition patches and starts restarts. Returns how many
/// pods were made to serve.
pub(super) async fn pass(
    shared: &Arc<Shared>,
    pods: impl FnOnce() -> Vec<Arc<Pod>>,
    tasks: &Arc<Mutex<JoinSet<()>>>,
) -> usize {
    let _effects = shared.effects.lock().await;
    let Some(desired) = *shared.desired.borrow() else {
        return 0;
    };
    let (patches, restart) = plan_pass(shared, &pods(), desired);
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

/// Watches pods and opted-in namespaces into the shared caches and
/// reconciles on every change, on a desired-state change and every
/// `resync`.
pub(super) async fn reconcile_loop(
    shared: Arc<Shared>,
    tasks: Weak<Mutex<JoinSet<()>>>,
    pods_writer: reflector::store::Writer<Pod>,
    nss_writer: reflector::store::Writer<Namespace>,
) {
    let pod_events = watcher(
        Api::<Pod>::all(shared.client.clone()),
        watcher::Config::default().labels(&service_pod_selector()),
    )
    .default_backoff()
    .modify(super::pods::strip)
    .reflect(pods_writer)
    .map(|_| ());
    let ns_events = watcher(
        Api::<Namespace>::all(shared.client.clone()),
        watcher::Config::default().labels(&opted_in_selector()),
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
        if shared.pods.wait_until_ready().await.is_err()
            || shared.nss.wait_until_ready().await.is_err()
        {
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
            let Some(tasks) = tasks.upgrade() else { return };
            pass(&shared, || cached_service_pods(&shared), &tasks).await;
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
    fn a_condition_is_remembered_with_its_value_for_the_memo_period() {
        let t0 = Instant::now();
        let mut memo = ConditionMemo::default();
        assert!(!memo.fresh("a", true, t0));
        memo.record("a", true, t0);
        memo.record("b", false, t0);
        let within = t0 + CONDITION_MEMO - Duration::from_millis(1);
        assert!(memo.fresh("a", true, within));
        assert!(!memo.fresh("a", false, within), "a serve is not a stop");
        assert!(memo.fresh("b", false, within));
        assert!(
            !memo.fresh("a", true, t0 + CONDITION_MEMO),
            "past the memo the cache decides"
        );
        memo.record("a", false, t0);
        assert!(!memo.fresh("a", true, t0), "the newest value counts");
        memo.prune(t0 + CONDITION_MEMO);
        assert!(memo.is_empty(), "old entries are pruned");
        memo.record("c", true, t0);
        memo.clear();
        assert_eq!(memo.len(), 0);
    }
}
