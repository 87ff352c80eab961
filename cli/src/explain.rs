//! `cwctl explain`: why the last transition happened.
//!
//! Three sources, all already written by the controllers: the
//! `lastTransition` key (what happened, with the state machine's reason),
//! the `health` key (S against D and the components that are down, with the
//! failing check or pod count), and the Events regarding the state
//! ConfigMap (the health verdicts and protocol steps that led there). Events
//! of all clusters are merged into one timeline ordered by their time, so a
//! handover reads as one story: east abnormal, prepare, west ready, east
//! handed over, west promoted.

use counterweight_core::names;
use futures::future::join_all;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use crate::clusters::Target;
use crate::status::{self, ClusterStatus, Status};

/// Everything `explain` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The clusters' state records.
    pub status: Status,
    /// Events regarding the state ConfigMaps, oldest first.
    pub events: Vec<EventLine>,
    /// Clusters whose Events could not be read, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_errors: Vec<String>,
}

/// One Event, reduced to what a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// The cluster it was recorded in.
    pub cluster: String,
    /// RFC 3339 time of its latest occurrence.
    pub time: Option<String>,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Machine-readable reason.
    pub reason: String,
    /// The message.
    pub note: String,
    /// How many times it occurred (Event series).
    pub count: i32,
}

/// Reads the state records and the Events of every cluster, all at once:
/// a cluster that never answers costs one deadline (`--request-timeout`),
/// not one per read. Keeps the `limit` most recent Events.
pub async fn gather(targets: &[Target], namespace: &str, limit: usize) -> Explanation {
    let reads = targets.iter().map(|t| events_of(t, namespace));
    let (status, read) = tokio::join!(status::gather(targets, namespace), join_all(reads));
    let mut events = Vec::new();
    let mut event_errors = Vec::new();
    for (t, r) in targets.iter().zip(read) {
        match r {
            Ok(mut e) => events.append(&mut e),
            Err(why) => event_errors.push(format!("{}: {why}", t.name)),
        }
    }
    sort_and_trim(&mut events, limit);
    Explanation {
        status,
        events,
        event_errors,
    }
}

async fn events_of(target: &Target, namespace: &str) -> Result<Vec<EventLine>, String> {
    let client = target.client.clone()?;
    let api: Api<Event> = Api::namespaced(client, namespace);
    // Filtered here rather than by field selector: the field selectors
    // events.k8s.io supports for `regarding` differ between versions.
    let list = tokio::time::timeout(
        target.deadline,
        api.list(&ListParams::default().limit(1000)),
    )
    .await
    .map_err(|_| status::no_answer(target.deadline))?
    // With its causes: kube's own message ("client error (Connect)") only
    // says where to look.
    .map_err(|e| crate::describe(&e))?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.name.as_deref() == Some(names::STATE_CONFIGMAP)
                    && r.kind.as_deref() == Some("ConfigMap")
            })
        })
        .map(|e| line(&target.name, e))
        .collect())
}

fn line(cluster: &str, e: Event) -> EventLine {
    let time = e
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(e.event_time.as_ref().map(|t| t.0))
        .or(e.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
    EventLine {
        cluster: cluster.to_owned(),
        time: time.map(|t| t.to_string()),
        type_: e.type_.unwrap_or_default(),
        reason: e.reason.unwrap_or_default(),
        note: e.note.unwrap_or_default(),
        count: e.series.as_ref().map_or(1, |s| s.count.max(1)),
    }
}

/// Orders Events by time (undated ones first, then by cluster) and keeps
/// the `limit` most recent.
pub fn sort_and_trim(events: &mut Vec<EventLine>, limit: usize) {
    let key = |e: &EventLine| e.time.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
    events.sort_by(|a, b| key(a).cmp(&key(b)).then(a.cluster.cmp(&b.cluster)));
    if events.len() > limit {
        events.drain(..events.len() - limit);
    }
}

/// The latest transition across clusters (by its time), with its cluster.
pub fn latest_transition(status: &Status) -> Option<&ClusterStatus> {
    status
        .clusters
        .iter()
        .filter(|c| c.last_transition.is_some())
        .max_by_key(|c| {
            c.last_transition
                .as_ref()
                .and_then(|t| t.at.parse::<Timestamp>().ok())
        })
}

/// The text shown by `cwctl explain`.
pub fn render(x: &Explanation) -> String {
    let mut out = String::new();
    match latest_transition(&x.status) {
        None => out.push_str(
            "No transition recorded yet: no controller has changed role since its state \
             ConfigMap was created.\n",
        ),
        Some(c) => {
            if let Some(t) = &c.last_transition {
                out.push_str(&format!(
                    "Last transition: {} {} (now {} in epoch {}) at {}\n  {}\n",
                    c.cluster, t.reason, t.role, t.epoch, t.at, t.message
                ));
            }
        }
    }
    let others: Vec<String> = x
        .status
        .clusters
        .iter()
        .filter(|c| {
            Some(c.cluster.as_str()) != latest_transition(&x.status).map(|l| l.cluster.as_str())
        })
        .filter_map(|c| {
            c.last_transition
                .as_ref()
                .map(|t| format!("{}: {} at {}", c.cluster, t.reason, t.at))
        })
        .collect();
    if !others.is_empty() {
        out.push_str(&format!("  (earlier, elsewhere: {})\n", others.join("; ")));
    }

    out.push_str("\nHealth now:\n");
    for c in &x.status.clusters {
        let role = c.role.map_or("unknown".to_owned(), |r| r.to_string());
        if let Some(why) = &c.unreachable {
            out.push_str(&format!("  {}: unreachable: {why}\n", c.cluster));
            continue;
        }
        match &c.health {
            None => out.push_str(&format!(
                "  {} ({role}): no health report{}\n",
                c.cluster,
                c.policy
                    .as_deref()
                    .map(|p| format!(" (policy: {p})"))
                    .unwrap_or_default()
            )),
            Some(h) => {
                out.push_str(&format!(
                    "  {} ({role}): S={}, retryCount {}/{}\n",
                    c.cluster,
                    status::score_vs_threshold(h),
                    h.retry_count,
                    h.retries
                ));
                for comp in h.components.iter().filter(|c| !c.up) {
                    out.push_str(&format!(
                        "    down: {} (w={:.2}, {}/{} ready): {}\n",
                        comp.name,
                        comp.weight,
                        comp.ready,
                        comp.required,
                        comp.failing.as_deref().unwrap_or("down")
                    ));
                }
            }
        }
    }

    out.push_str("\nEvents, oldest first:\n");
    if x.events.is_empty() {
        out.push_str("  (none)\n");
    }
    let rows: Vec<Vec<String>> = x
        .events
        .iter()
        .map(|e| {
            vec![
                format!("  {}", e.time.as_deref().unwrap_or("?")),
                e.cluster.clone(),
                e.type_.clone(),
                if e.count > 1 {
                    format!("{} (x{})", e.reason, e.count)
                } else {
                    e.reason.clone()
                },
                e.note.clone(),
            ]
        })
        .collect();
    out.push_str(&status::table(&rows));
    for err in &x.event_errors {
        out.push_str(&format!("  events of {err}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::state::Transition;

    fn ev(cluster: &str, time: &str, reason: &str) -> EventLine {
        EventLine {
            cluster: cluster.into(),
            time: Some(time.into()),
            type_: "Normal".into(),
            reason: reason.into(),
            note: format!("{reason} note"),
            count: 1,
        }
    }

    #[test]
    fn events_merge_in_time_order_and_keep_the_latest() {
        let mut e = vec![
            ev("west", "2026-11-24T10:00:02Z", "Promoted"),
            ev("east", "2026-11-24T10:00:00Z", "ClusterAbnormal"),
            ev("east", "2026-11-24T10:00:01.5Z", "HandedOver"),
        ];
        sort_and_trim(&mut e, 2);
        let reasons: Vec<&str> = e.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["HandedOver", "Promoted"]);
    }

    #[test]
    fn render_names_the_latest_transition_and_what_is_down() {
        let mut status = crate::status::Status {
            namespace: "ns".into(),
            clusters: vec![
                ClusterStatus {
                    cluster: "east".into(),
                    last_transition: Some(Transition {
                        reason: "HandedOver".into(),
                        message: "handed over to west".into(),
                        role: counterweight_core::state::Role::Standby,
                        epoch: 3,
                        at: "2026-11-24T10:00:01Z".into(),
                    }),
                    ..Default::default()
                },
                ClusterStatus {
                    cluster: "west".into(),
                    last_transition: Some(Transition {
                        reason: "Promoted".into(),
                        message: "active in epoch 4".into(),
                        role: counterweight_core::state::Role::Active,
                        epoch: 4,
                        at: "2026-11-24T10:00:02Z".into(),
                    }),
                    ..Default::default()
                },
            ],
        };
        status.clusters[0].health = Some(counterweight_core::health::HealthReport {
            score: 0.4,
            threshold: 0.6,
            retries: 1,
            retry_count: 2,
            verdict: counterweight_core::health::Verdict::Abnormal { retry_count: 2 },
            components: vec![counterweight_core::health::ComponentHealth {
                name: "web".into(),
                weight: 0.6,
                up: false,
                ready: 0,
                required: 1,
                selected: 1,
                failing: Some("0 of 1 pods up, 1 required".into()),
                passed: vec![],
            }],
            data_behind: vec![],
            data: vec![],
        });
        let x = Explanation {
            status,
            events: vec![ev("east", "2026-11-24T10:00:00Z", "ClusterAbnormal")],
            event_errors: vec![],
        };
        let text = render(&x);
        assert!(
            text.starts_with("Last transition: west Promoted (now active in epoch 4)"),
            "{text}"
        );
        assert!(
            text.contains("earlier, elsewhere: east: HandedOver"),
            "{text}"
        );
        assert!(text.contains("S=0.400 < 0.600"), "{text}");
        assert!(
            text.contains("down: web (w=0.60, 0/1 ready): 0 of 1 pods"),
            "{text}"
        );
        assert!(text.contains("ClusterAbnormal"), "{text}");
    }
}
