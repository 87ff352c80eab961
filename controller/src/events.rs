//! Kubernetes Events of the controller, all attached to the state ConfigMap.
//!
//! `kubectl describe configmap counterweight-state` then shows the health
//! verdicts and every state transition next to the state they explain. An
//! Event that cannot be recorded is logged and dropped: Events are for
//! people, and must never block a decision.

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::state_store::StateStore;

/// Events waiting to be published; beyond this, new ones are dropped (and
/// logged) while the API server is too slow or away.
const QUEUE: usize = 256;

/// Records Events regarding the state ConfigMap.
///
/// Recording only queues: one task per sink publishes the Events in order,
/// each costing two API calls (the ConfigMap's uid, then the create). The
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
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Pending>,
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
        let publisher = Publisher {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            store: StateStore::new(client.clone(), namespace, name),
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let (queue, mut pending) = mpsc::channel::<Pending>(QUEUE);
        // Ends when every sender is gone, after publishing what was queued.
        tokio::spawn(async move {
            while let Some(p) = pending.recv().await {
                publisher.publish(p).await;
            }
        });
        Self { queue }
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
        let pending = Pending {
            transition,
            type_,
            reason: reason.to_owned(),
            action: action.to_owned(),
            note: truncate(note, 1000),
        };
        if let Err(e) = self.queue.try_send(pending) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the queue is full (API server slow?)",
                mpsc::error::TrySendError::Closed(_) => "the publisher has stopped",
            };
            tracing::warn!(reason, why, "dropping an Event");
        }
    }
}

/// The publishing side of an [`EventSink`].
struct Publisher {
    client: kube::Client,
    reporter: Reporter,
    recorder: Recorder,
    store: StateStore,
    namespace: String,
    name: String,
}

impl Publisher {
    async fn publish(&self, p: Pending) {
        let uid = self
            .store
            .get()
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.metadata.uid);
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
