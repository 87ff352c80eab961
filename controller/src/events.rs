//! Kubernetes Events of the controller, all attached to the state ConfigMap.
//!
//! `kubectl describe configmap counterweight-state` then shows the health
//! verdicts and every state transition next to the state they explain. An
//! Event that cannot be recorded is logged and dropped: Events are for
//! people, and must never block a decision.

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::state_store::StateStore;

/// Records Events regarding the state ConfigMap.
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
    client: kube::Client,
    reporter: Reporter,
    recorder: Recorder,
    store: StateStore,
    namespace: String,
    name: String,
}

impl EventSink {
    /// A sink for Events about `namespace/name`, reported as this cluster's
    /// controller.
    pub fn new(client: kube::Client, cluster: &str, namespace: &str, name: &str) -> Self {
        let reporter = Reporter {
            controller: "counterweight-controller".into(),
            instance: Some(cluster.to_owned()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            store: StateStore::new(client.clone(), namespace, name),
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Records one Event of a condition that may repeat: a repeat of
    /// `reason` and `action` within six minutes counts up the first Event.
    /// `note` is cut to the API server's 1 kB limit.
    pub async fn record(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        self.publish(&self.recorder, type_, reason, action, note)
            .await;
    }

    /// Records one transition as an Event of its own, whatever came before
    /// with the same reason, so its note is never replaced by an earlier one.
    pub async fn record_transition(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        // A recorder with an empty cache creates; it never patches a series.
        let fresh = Recorder::new(self.client.clone(), self.reporter.clone());
        self.publish(&fresh, type_, reason, action, note).await;
    }

    async fn publish(
        &self,
        recorder: &Recorder,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
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
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason, "could not record Event");
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
