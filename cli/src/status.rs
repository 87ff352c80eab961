//! `cwctl status`: every cluster's state ConfigMap, side by side.
//!
//! [`gather`] reads the `counterweight-state` ConfigMap of every cluster
//! into a [`Status`]; [`from_data`] is the pure part of that (ConfigMap data
//! to [`ClusterStatus`]), and [`render`] turns a `Status` into the table.
//! JSON and YAML output serialize the same `Status`, so scripts and people
//! see the same data. The record is decoded by core's one codec
//! (`counterweight_core::state::StateRecord`): keys that a controller has not
//! written yet (no policy, no HA configuration) are absent, and a key that
//! is there but unreadable is named in `unreadable`, never shown as absent.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_core::health::{HealthReport, below_threshold};
use counterweight_core::names;
use counterweight_core::state::{HaView, Role, StateRecord, Transition};
use futures::future::join_all;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde::{Deserialize, Serialize};

use crate::clusters::Target;

/// All clusters, in kubeconfig order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The controller namespace read.
    pub namespace: String,
    /// One entry per cluster.
    pub clusters: Vec<ClusterStatus>,
}

impl Status {
    /// The clusters whose record says active.
    pub fn actives(&self) -> Vec<&ClusterStatus> {
        self.clusters
            .iter()
            .filter(|c| c.role == Some(Role::Active))
            .collect()
    }

    /// The entry of `cluster`.
    pub fn cluster(&self, cluster: &str) -> Option<&ClusterStatus> {
        self.clusters.iter().find(|c| c.cluster == cluster)
    }

    /// The clusters that could not be read (no answer, refused, no
    /// client): what makes `status` and `explain` exit 3.
    pub fn unreachable(&self) -> Vec<&str> {
        self.clusters
            .iter()
            .filter(|c| c.unreachable.is_some())
            .map(|c| c.cluster.as_str())
            .collect()
    }
}

/// What one cluster's state ConfigMap says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Cluster name (kubeconfig context).
    pub cluster: String,
    /// The cluster could not be reached, or its record not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
    /// The record exists but is malformed (or missing), with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_error: Option<String>,
    /// Active or standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The epoch of the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Automatic failover paused by an operator.
    #[serde(default)]
    pub paused: bool,
    /// Whether service pods were last set to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    /// The HA loop's published view (lease, peers, handover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaView>,
    /// The weighted health report (S, D, K, components).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// The policy status line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The last transition and its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<Transition>,
    /// Keys of the record that are there but could not be read, and keys
    /// this version does not know, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

/// What a cluster that did not answer within `deadline` is shown with.
pub fn no_answer(deadline: Duration) -> String {
    format!(
        "no answer within {:.1}s (--request-timeout)",
        deadline.as_secs_f64()
    )
}

/// Reads every cluster's state ConfigMap, concurrently.
pub async fn gather(targets: &[Target], namespace: &str) -> Status {
    let reads = targets.iter().map(|t| read_one(t, namespace));
    Status {
        namespace: namespace.to_owned(),
        clusters: join_all(reads).await,
    }
}

async fn read_one(target: &Target, namespace: &str) -> ClusterStatus {
    let unreachable = |why: String| ClusterStatus {
        cluster: target.name.clone(),
        unreachable: Some(why),
        ..Default::default()
    };
    let client = match &target.client {
        Ok(c) => c.clone(),
        Err(e) => return unreachable(e.clone()),
    };
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    match tokio::time::timeout(target.deadline, api.get_opt(names::STATE_CONFIGMAP)).await {
        Err(_) => unreachable(no_answer(target.deadline)),
        Ok(Err(e)) => unreachable(crate::describe(&e)),
        Ok(Ok(None)) => ClusterStatus {
            cluster: target.name.clone(),
            record_error: Some(format!(
                "no ConfigMap {namespace}/{}: is the controller running?",
                names::STATE_CONFIGMAP
            )),
            ..Default::default()
        },
        Ok(Ok(Some(cm))) => from_data(&target.name, cm.data.as_ref()),
    }
}

/// The status of `cluster` from its state ConfigMap data, decoded by
/// core's codec. A malformed role or epoch is a `record_error` (readers
/// treat such a cluster as not active); an unreadable informational key is
/// named in `unreadable`.
pub fn from_data(cluster: &str, data: Option<&BTreeMap<String, String>>) -> ClusterStatus {
    let record = StateRecord::from_data(data);
    let mut s = ClusterStatus {
        cluster: cluster.to_owned(),
        unreadable: record.unreadable.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    match record.persisted {
        Ok(p) => {
            s.role = Some(p.role);
            s.epoch = Some(p.epoch);
            s.paused = p.paused;
        }
        Err(e) => s.record_error = Some(e.to_string()),
    }
    // The serving key is the effect actually applied; the HA view's flag
    // is the node's intent. Prefer the effect.
    s.serving = record.serving.or(record.ha.as_ref().map(|h| h.serving));
    s.ha = record.ha;
    s.health = record.health;
    s.policy = record.policy;
    s.last_transition = record.last_transition;
    s
}

/// The table shown by `cwctl status`.
pub fn render(status: &Status) -> String {
    let mut rows = vec![
        [
            "CLUSTER", "STATE", "EPOCH", "SERVING", "LEASE", "S vs D", "RETRY", "PAUSED",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let mut notes = Vec::new();
    for c in &status.clusters {
        let state = if c.unreachable.is_some() {
            "unreachable".to_owned()
        } else {
            c.role.map_or("unknown".to_owned(), |r| r.to_string())
        };
        if let Some(why) = &c.unreachable {
            notes.push(format!("{}: unreachable: {why}", c.cluster));
        }
        if let Some(why) = &c.record_error {
            notes.push(format!("{}: state record: {why}", c.cluster));
        }
        for why in &c.unreadable {
            notes.push(format!("{}: state record: {why}", c.cluster));
        }
        let lease = match (&c.ha, c.role) {
            (Some(ha), Some(Role::Active)) => {
                ha.lease_expires_in_ms.map_or("none".to_owned(), |ms| {
                    format!("{:.1}s", ms as f64 / 1000.0)
                })
            }
            _ => "-".to_owned(),
        };
        rows.push(vec![
            c.cluster.clone(),
            state,
            c.epoch.map_or("-".to_owned(), |e| e.to_string()),
            c.serving
                .map_or("-", |s| if s { "yes" } else { "no" })
                .to_owned(),
            lease,
            c.health.as_ref().map_or("-".to_owned(), score_vs_threshold),
            c.health.as_ref().map_or("-".to_owned(), |h| {
                format!("{}/{}", h.retry_count, h.retries)
            }),
            if c.unreachable.is_some() {
                "-"
            } else if c.paused {
                "yes"
            } else {
                "no"
            }
            .to_owned(),
        ]);
    }
    let mut out = table(&rows);

    let mut comp_rows = vec![
        ["CLUSTER", "COMPONENT", "WEIGHT", "s", "READY", "WHY DOWN"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for c in &status.clusters {
        for h in c.health.iter().flat_map(|h| h.components.iter()) {
            comp_rows.push(vec![
                c.cluster.clone(),
                h.name.clone(),
                format!("{:.2}", h.weight),
                if h.up { "1" } else { "0" }.to_owned(),
                format!("{}/{}", h.ready, h.required),
                h.failing.clone().unwrap_or_default(),
            ]);
        }
    }
    if comp_rows.len() > 1 {
        out.push('\n');
        out.push_str(&table(&comp_rows));
    }

    let peers: Vec<String> = status
        .clusters
        .iter()
        .filter_map(|c| c.ha.as_ref().map(|h| (c, h)))
        .filter(|(_, h)| !h.peers.is_empty())
        .map(|(c, h)| {
            let heard: Vec<String> = h
                .peers
                .iter()
                .map(|(name, p)| {
                    format!(
                        "{name} {} in epoch {}, {:.1}s ago",
                        p.describe(),
                        p.epoch,
                        p.last_heard_ms_ago as f64 / 1000.0
                    )
                })
                .collect();
            format!("{} hears: {}", c.cluster, heard.join("; "))
        })
        .collect();
    if !peers.is_empty() {
        out.push_str("\nPEERS (as each controller last published)\n");
        for p in peers {
            out.push_str("  ");
            out.push_str(&p);
            out.push('\n');
        }
    }

    let transitions: Vec<String> = status
        .clusters
        .iter()
        .filter_map(|c| c.last_transition.as_ref().map(|t| (c, t)))
        .map(|(c, t)| {
            format!(
                "{}: {} (epoch {}) at {}: {}",
                c.cluster, t.reason, t.epoch, t.at, t.message
            )
        })
        .collect();
    if !transitions.is_empty() {
        out.push_str("\nLAST TRANSITION\n");
        for t in transitions {
            out.push_str("  ");
            out.push_str(&t);
            out.push('\n');
        }
    }
    for c in &status.clusters {
        if let Some(ha) = &c.ha
            && let Some(t) = &ha.handover_target
        {
            notes.push(format!("{}: handover to {t} in progress", c.cluster));
        }
    }
    let actives = status.actives().len();
    if actives > 1 {
        notes.push(format!(
            "{actives} clusters report active: the one with the highest epoch is current, \
             the others have fenced or will on their next step"
        ));
    }
    if !notes.is_empty() {
        out.push_str("\nNOTES\n");
        for n in notes {
            out.push_str("  ");
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

/// `S ≥ D` or `S < D` with both numbers.
pub fn score_vs_threshold(h: &HealthReport) -> String {
    let op = if below_threshold(h.score, h.threshold) {
        "<"
    } else {
        "≥"
    };
    format!("{:.3} {op} {:.3}", h.score, h.threshold)
}

/// Left-aligned columns separated by two spaces; widths in characters, so
/// `≥` does not skew the layout.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::health::{ComponentHealth, Verdict};

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn health(score: f64, retry_count: u32) -> HealthReport {
        HealthReport {
            score,
            threshold: 0.6,
            retries: 2,
            retry_count,
            verdict: if retry_count == 0 {
                Verdict::Healthy
            } else {
                Verdict::Degraded { retry_count }
            },
            components: vec![
                ComponentHealth {
                    name: "web".into(),
                    weight: 0.6,
                    up: score >= 0.6,
                    ready: if score >= 0.6 { 2 } else { 0 },
                    required: 1,
                    selected: 2,
                    failing: (score < 0.6).then(|| "0 of 2 pods up, 1 required".into()),
                    passed: vec![],
                },
                ComponentHealth {
                    name: "api".into(),
                    weight: 0.4,
                    up: true,
                    ready: 1,
                    required: 1,
                    selected: 1,
                    failing: None,
                    passed: vec![],
                },
            ],
            data_behind: vec![],
            data: vec![],
        }
    }

    fn sample() -> Status {
        let east = data(&[
            ("state", "active"),
            ("epoch", "3"),
            ("paused", "false"),
            ("serving", "true"),
            (
                "ha",
                r#"{"serving":true,"leaseExpiresInMs":1200,"handoverTarget":null,"paused":false,"peers":{"west":{"role":"standby","serving":false,"eligible":true,"epoch":3,"lastHeardMsAgo":150}}}"#,
            ),
            (
                "health",
                &serde_json::to_string(&health(1.0, 0)).expect("json"),
            ),
            (
                "lastTransition",
                r#"{"reason":"Promoted","message":"active in epoch 3","role":"active","epoch":3,"at":"2026-11-24T10:00:00Z"}"#,
            ),
            ("policy", "in force: resourceVersion 42"),
        ]);
        let west = data(&[
            ("state", "standby"),
            ("epoch", "3"),
            ("paused", "true"),
            (
                "health",
                &serde_json::to_string(&health(0.4, 1)).expect("json"),
            ),
        ]);
        Status {
            namespace: "counterweight-system".into(),
            clusters: vec![
                from_data("east", Some(&east)),
                from_data("west", Some(&west)),
                ClusterStatus {
                    cluster: "north".into(),
                    unreachable: Some("connection refused".into()),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn from_data_reads_every_key() {
        let s = sample();
        let east = &s.clusters[0];
        assert_eq!(east.role, Some(Role::Active));
        assert_eq!(east.epoch, Some(3));
        assert_eq!(east.serving, Some(true));
        assert_eq!(
            east.ha.as_ref().and_then(|h| h.lease_expires_in_ms),
            Some(1200)
        );
        assert_eq!(east.health.as_ref().map(|h| h.score), Some(1.0));
        assert_eq!(
            east.last_transition.as_ref().map(|t| t.reason.as_str()),
            Some("Promoted")
        );
        let west = &s.clusters[1];
        assert!(west.paused);
        assert_eq!(west.serving, None, "no serving key and no HA view");
        assert_eq!(s.actives().len(), 1);
    }

    #[test]
    fn an_unreadable_key_is_shown_as_such_not_as_absent() {
        // The HA view as versions before core's codec wrote it.
        let s = from_data(
            "x",
            Some(&data(&[
                ("state", "active"),
                ("epoch", "1"),
                (
                    "ha",
                    r#"{"serving":true,"peers":{"west":{"status":"Standby"}}}"#,
                ),
            ])),
        );
        assert_eq!(s.role, Some(Role::Active));
        assert_eq!(s.ha, None);
        let text = render(&Status {
            namespace: "ns".into(),
            clusters: vec![s],
        });
        assert!(
            text.contains("x: state record: key `ha` does not decode"),
            "{text}"
        );
    }

    #[test]
    fn malformed_record_is_an_error_not_a_role() {
        let s = from_data("x", Some(&data(&[("state", "leader"), ("epoch", "1")])));
        assert_eq!(s.role, None);
        assert!(
            s.record_error
                .as_deref()
                .is_some_and(|e| e.contains("`state`")),
            "{s:?}"
        );
        let s = from_data("x", None);
        assert!(s.record_error.is_some());
    }

    #[test]
    fn render_shows_every_cluster_and_column() {
        let text = render(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLUSTER"), "{text}");
        assert!(lines[0].contains("S vs D") && lines[0].contains("RETRY"));
        let east = lines.iter().find(|l| l.starts_with("east ")).expect("east");
        for cell in ["active", "3", "yes", "1.2s", "1.000 ≥ 0.600", "0/2", "no"] {
            assert!(east.contains(cell), "{cell:?} missing in {east:?}");
        }
        let west = lines.iter().find(|l| l.starts_with("west ")).expect("west");
        for cell in ["standby", "0.400 < 0.600", "1/2", "yes"] {
            assert!(west.contains(cell), "{cell:?} missing in {west:?}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("north ") && l.contains("unreachable")),
            "{text}"
        );
        assert!(
            text.contains("north: unreachable: connection refused"),
            "{text}"
        );
        // Components with their contribution and why they are down.
        assert!(
            text.lines().any(|l| l.starts_with("west")
                && l.contains("web")
                && l.contains("0.60")
                && l.contains("0/1")
                && l.contains("0 of 2 pods")),
            "{text}"
        );
        assert!(text.contains("east: Promoted (epoch 3) at 2026-11-24T10:00:00Z"));
        assert!(
            text.contains("east hears: west standby, eligible in epoch 3, 0.1s ago"),
            "{text}"
        );
    }

    #[test]
    fn columns_line_up() {
        let text = render(&sample());
        let header = text.lines().next().expect("header");
        let col = header.find("EPOCH").expect("EPOCH");
        for l in text.lines().skip(1).take(3) {
            let prefix: String = l.chars().take(col).collect();
            assert!(
                prefix.ends_with("  "),
                "column misaligned in {l:?} of\n{text}"
            );
        }
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("json");
        let back: Status = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
        let yaml = serde_yaml_ng::to_string(&s).expect("yaml");
        assert!(yaml.contains("cluster: east"), "{yaml}");
    }
}
