//! The FIG. 6 wait loop: watch the state ConfigMap, poll only as fallback.
//!
//! The loop reads the ConfigMap through a kube-runtime watcher restricted to
//! the one object (`fieldSelector=metadata.name=<name>`), so a flip to
//! `active` releases the pod within one watch event instead of one polling
//! interval. When the watch cannot be established (API server down, RBAC
//! refusing list or watch, ...) the loop backs off before retrying it, and
//! meanwhile reads the ConfigMap by name every polling interval: FIG. 6
//! stages 620 and 630 as literally described, used only as a fallback.
//! Every observation goes through [`decide`]; only its `Release` ends the
//! loop.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::watcher::{self, Event, ListSemantic};

use crate::backoff::Backoff;
use crate::decision::{Decision, WaitReason, classify, classify_watch, decide, is_resync};
use crate::ratelimit::LogLimiter;

/// First delay before re-establishing a failed watch.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest delay between watch attempts. The fallback polling keeps release
/// latency at one polling interval even while the watch backs off this far.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a persisting reason is logged again.
const LOG_PERIOD: Duration = Duration::from_secs(60);
/// Server-side duration of one watch request. The watcher re-watches from the
/// last resource version when it ends, and treats a connection silent for
/// longer than this (plus a margin) as dead, so a short value bounds how long
/// a half-open connection can hide a flip.
const WATCH_TIMEOUT_SECS: u32 = 60;

/// Where the state lives and how to wait for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name of this cluster, for log lines only.
    pub cluster: String,
    /// Namespace of the state ConfigMap.
    pub namespace: String,
    /// Name of the state ConfigMap.
    pub name: String,
    /// FIG. 6 polling interval for the fallback.
    pub poll_interval: Duration,
}

/// Waits until the state ConfigMap says active and returns its epoch.
///
/// Never returns otherwise: the caller bounds it with a timeout and a
/// shutdown signal.
pub async fn wait_active(client: kube::Client, target: &Target) -> u64 {
    let mut w = Waiter::new(client, target);
    w.run().await
}

struct Waiter<'a> {
    api: Api<ConfigMap>,
    target: &'a Target,
    backoff: Backoff,
    limiter: LogLimiter,
    /// The standby epoch currently waited out, and since when (wall clock).
    standby_since: Option<(u64, jiff::Timestamp)>,
}

impl<'a> Waiter<'a> {
    fn new(client: kube::Client, target: &'a Target) -> Self {
        Self {
            api: Api::namespaced(client, &target.namespace),
            target,
            backoff: Backoff::with_random_seed(BACKOFF_INITIAL, BACKOFF_MAX),
            limiter: LogLimiter::new(LOG_PERIOD),
            standby_since: None,
        }
    }

    async fn run(&mut self) -> u64 {
        let mut stream = self.watch();
        // Whether the object appeared in the current initial listing; a
        // listing without it means the ConfigMap does not exist.
        let mut listed = false;
        loop {
            let decision = match stream.next().await {
                Some(Ok(Event::Init)) => {
                    listed = false;
                    continue;
                }
                Some(Ok(Event::InitApply(cm))) => {
                    listed = true;
                    decide(Some(&cm))
                }
                Some(Ok(Event::InitDone)) => {
                    self.backoff.reset();
                    if listed {
                        continue;
                    }
                    decide(None)
                }
                Some(Ok(Event::Apply(cm))) => {
                    self.backoff.reset();
                    decide(Some(&cm))
                }
                Some(Ok(Event::Delete(_))) => decide(None),
                Some(Err(e)) if is_resync(&e) => {
                    tracing::debug!(error = %e, "watch expired; the watcher re-lists");
                    continue;
                }
                Some(Err(e)) => {
                    self.report(classify_watch(&e));
                    let retry_at = Instant::now() + self.backoff.next_delay();
                    if let Some(epoch) = self.poll_until(retry_at).await {
                        return epoch;
                    }
                    continue;
                }
                None => {
                    // The watcher stream is infinite by contract; should that
                    // ever change, start a new one rather than spin.
                    let retry_at = Instant::now() + self.backoff.next_delay();
                    if let Some(epoch) = self.poll_until(retry_at).await {
                        return epoch;
                    }
                    stream = self.watch();
                    continue;
                }
            };
            match decision {
                Decision::Release { epoch } => return epoch,
                Decision::Wait(reason) => self.report(reason),
            }
        }
    }

    /// A watcher on exactly the state ConfigMap.
    fn watch(&self) -> futures::stream::BoxStream<'static, watcher::Result<Event<ConfigMap>>> {
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.target.name))
            // A list served from the API server's watch cache may be stale;
            // releasing on a stale `active` would let a pod serve in a
            // cluster that was just demoted.
            .list_semantic(ListSemantic::MostRecent)
            .timeout(WATCH_TIMEOUT_SECS);
        watcher::watcher(self.api.clone(), config).boxed()
    }

    /// FIG. 6 stages 620/630 while the watch is down: read the ConfigMap by
    /// name now and then every polling interval, until `until`.
    async fn poll_until(&mut self, until: Instant) -> Option<u64> {
        let mut next = Instant::now();
        while next < until {
            tokio::time::sleep_until(next.into()).await;
            let decision = match self.api.get_opt(&self.target.name).await {
                Ok(cm) => decide(cm.as_ref()),
                Err(e) => Decision::Wait(classify(&e)),
            };
            match decision {
                Decision::Release { epoch } => return Some(epoch),
                Decision::Wait(reason) => self.report(reason),
            }
            next += self.target.poll_interval.max(Duration::from_millis(10));
        }
        tokio::time::sleep_until(until.into()).await;
        None
    }

    /// Logs a reason to wait, each distinct reason at most once per minute.
    fn report(&mut self, reason: WaitReason) {
        // "since" is when this standby epoch was first seen; transient errors
        // in between do not restart it, a new epoch does.
        let since = match (&reason, self.standby_since) {
            (WaitReason::Standby { epoch }, Some((seen, since))) if seen == *epoch => Some(since),
            (WaitReason::Standby { epoch }, _) => {
                let now = jiff::Timestamp::now();
                self.standby_since = Some((*epoch, now));
                Some(now)
            }
            _ => None,
        };
        if !self.limiter.admit(&reason.key(), Instant::now()) {
            return;
        }
        let t = self.target;
        match reason {
            WaitReason::Standby { epoch } => {
                let since = since.unwrap_or_else(jiff::Timestamp::now);
                tracing::info!(
                    cluster = %t.cluster,
                    epoch,
                    "waiting: cluster {} is standby (epoch {epoch}) since {since:.0}",
                    t.cluster
                );
            }
            other => tracing::warn!(
                cluster = %t.cluster,
                configmap = %format!("{}/{}", t.namespace, t.name),
                "waiting: cluster {} state unknown: {other}; retrying",
                t.cluster
            ),
        }
    }
}
