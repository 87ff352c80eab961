//! Kubernetes Events of the controller, all attached to the state ConfigMap.
//!
//! `kubectl describe configmap counterweight-state` then shows the health
//! verdicts and every state transition next to the state they explain. An
//! Event that cannot be recorded is logged and dropped: Events are for
//! people, and must never block a decision. A condition that repeats (the
//! health verdict, every interval) holds at most one place in the queue,
//! so that a slow API server cannot make it crowd out the transitions.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::state_store::StateStore;

/// Events waiting to be published; beyond this, new ones are dropped (and
/// logged) while the API server is too slow or away.
const QUEUE: usize = 256;

/// Shortest time between two log lines about dropped Events: an API server
/// that is away for minutes must not fill the log as well.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Records Events regarding the state ConfigMap.
///
/// Recording only queues: one task per sink publishes the Events in order,
/// each costing one API call (a create, or a patch of a series) and, every
/// [`UID_FOR`], a read of the ConfigMap's uid. The
/// HA loop records a transition in the middle of a step that must also
/// answer its peers' probes in time; awaiting those calls there made a
/// slow API server stall lease renewals.
///
/// kube's [`Recorder`] turns a repeat of the same reason and action within
/// six minutes into a series of the first Event: the count grows, and the
/// note stays the first one. That is right for a condition that repeats
/// (a cluster abnormal tick after tick), and wrong for transitions, whose
/// notes differ (epochs, pods, data at that moment): a switchover back would
/// show the first promotion's note twice. [`EventSink::record`] coalesces;
/// [`EventSink::record_transition`] makes each its own Event.
///
/// A condition is queued only if the same reason and action is not
/// already waiting: the Event it would publish is the one already queued
/// (a series keeps its first note). Without this, an abnormal cluster
/// whose API server answers slowly filled the queue with one Event per
/// health interval (503 dropped in one 10,000-pod handover bench), and a
/// transition recorded then, a promotion or a fence, was the one dropped.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Pending>,
    /// Reason and action of every condition in the queue.
    queued: Arc<Mutex<HashSet<Series>>>,
    /// Events dropped since the last log line about them.
    drops: Arc<Mutex<Drops>>,
}

/// The reason and action that make a repeat of a condition one series.
type Series = (String, String);

/// Events dropped and not yet logged, and when that was last logged.
#[derive(Default)]
struct Drops {
    unlogged: u64,
    logged_at: Option<Instant>,
}

/// One Event to publish.
struct Pending {
    /// A transition (its own Event) or a repeatable condition (a series).
    transition: bool,
    type_: EventType,
    reason: String,
    action: String,
    note: String,
}

impl EventSink {
    /// A sink for Events about `namespace/name`, reported as this cluster's
    /// controller. Spawns the publishing task: call it on a Tokio runtime.
    pub fn new(client: kube::Client, cluster: &str, namespace: &str, name: &str) -> Self {
        let reporter = Reporter {
            controller: "counterweight-controller".into(),
            instance: Some(cluster.to_owned()),
        };
        let mut publisher = Publisher {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            store: StateStore::new(client.clone(), namespace, name),
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: None,
        };
        let (queue, mut pending) = mpsc::channel::<Pending>(QUEUE);
        let queued: Arc<Mutex<HashSet<Series>>> = Arc::default();
        let taken = queued.clone();
        // Ends when every sender is gone, after publishing what was queued.
        tokio::spawn(async move {
            while let Some(p) = pending.recv().await {
                if !p.transition {
                    // Out of the queue: a repeat from now on is queued
                    // again, and counts up this series once it is out.
                    if let Ok(mut q) = taken.lock() {
                        q.remove(&(p.reason.clone(), p.action.clone()));
                    }
                }
                publisher.publish(p).await;
            }
        });
        Self {
            queue,
            queued,
            drops: Arc::default(),
        }
    }

    /// Records one Event of a condition that may repeat: a repeat of
    /// `reason` and `action` within six minutes counts up the first Event.
    /// `note` is cut to the API server's 1 kB limit.
    pub fn record(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        self.enqueue(false, type_, reason, action, note);
    }

    /// Records one transition as an Event of its own, whatever came before
    /// with the same reason, so its note is never replaced by an earlier one.
    pub fn record_transition(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        self.enqueue(true, type_, reason, action, note);
    }

    fn enqueue(&self, transition: bool, type_: EventType, reason: &str, action: &str, note: &str) {
        let series = (reason.to_owned(), action.to_owned());
        // A poisoned lock only loses the coalescing: the Event is queued.
        if !transition
            && let Ok(mut q) = self.queued.lock()
            && !q.insert(series.clone())
        {
            return;
        }
        let pending = Pending {
            transition,
            type_,
            reason: series.0.clone(),
            action: series.1.clone(),
            note: truncate(note, 1000),
        };
        if let Err(e) = self.queue.try_send(pending) {
            if !transition && let Ok(mut q) = self.queued.lock() {
                q.remove(&series);
            }
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the queue is full (API server slow?)",
                mpsc::error::TrySendError::Closed(_) => "the publisher has stopped",
            };
            self.log_drop(reason, why);
        }
    }

    /// Logs a dropped Event, at most once per [`DROP_LOG_EVERY`], with the
    /// number dropped since the last line.
    fn log_drop(&self, reason: &str, why: &str) {
        let Ok(mut d) = self.drops.lock() else {
            return;
        };
        if let Some(dropped) = d.count(Instant::now()) {
            tracing::warn!(
                reason,
                why,
                dropped,
                "dropping Events; `dropped` counts this one and those since the last such line"
            );
        }
    }
}

impl Drops {
    /// Counts one dropped Event at `now`; returns how many to log now (this
    /// one and the unlogged before it), or `None` within [`DROP_LOG_EVERY`]
    /// of the last line.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < DROP_LOG_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// How long the state ConfigMap's uid is used before it is read again. A
/// ConfigMap deleted and made again gets a new uid, and an Event naming
/// the old one is not shown with it; reading it for every Event doubled
/// the API calls of each one.
const UID_FOR: Duration = Duration::from_secs(30);

/// The publishing side of an [`EventSink`].
struct Publisher {
    client: kube::Client,
    reporter: Reporter,
    recorder: Recorder,
    store: StateStore,
    namespace: String,
    name: String,
    /// The state ConfigMap's uid and when it was read.
    uid: Option<(String, Instant)>,
}

impl Publisher {
    /// The state ConfigMap's uid: the one read within [`UID_FOR`], else
    /// read now; `None` while it cannot be read (the Event is still made).
    async fn uid(&mut self) -> Option<String> {
        if let Some((uid, at)) = &self.uid
            && at.elapsed() < UID_FOR
        {
            return Some(uid.clone());
        }
        let uid = self
            .store
            .get()
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.metadata.uid);
        self.uid = uid.clone().map(|u| (u, Instant::now()));
        uid
    }

    async fn publish(&mut self, p: Pending) {
        let uid = self.uid().await;
        let reference = ObjectReference {
            api_version: Some(ConfigMap::api_version(&()).into_owned()),
            kind: Some(ConfigMap::kind(&()).into_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid,
            ..Default::default()
        };
        let event = Event {
            type_: p.type_,
            reason: p.reason,
            note: Some(p.note),
            action: p.action,
            secondary: None,
        };
        let result = if p.transition {
            // A recorder with an empty cache creates; it never patches a series.
            Recorder::new(self.client.clone(), self.reporter.clone())
                .publish(&event, &reference)
                .await
        } else {
            self.recorder.publish(&event, &reference).await
        };
        if let Err(e) = result {
            // Perhaps the ConfigMap was made again: read its uid anew.
            self.uid = None;
            tracing::warn!(error = %e, reason = %event.reason, "could not record Event");
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_events_are_logged_at_once_then_at_most_every_ten_seconds_with_the_count() {
        let mut d = Drops::default();
        let t0 = Instant::now();
        assert_eq!(d.count(t0), Some(1), "the first drop is logged at once");
        for i in 1..=500 {
            assert_eq!(d.count(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            d.count(t0 + DROP_LOG_EVERY),
            Some(501),
            "then the 500 since, and this one"
        );
        assert_eq!(d.count(t0 + DROP_LOG_EVERY + Duration::from_secs(1)), None);
        assert_eq!(d.count(t0 + 3 * DROP_LOG_EVERY), Some(2));
    }
}
