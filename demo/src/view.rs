//! The live view: polls both clusters and prints one line per change.
//!
//! Every [`TICK`] it reads what `cwctl` reads (state records and the Events
//! regarding them), the EMS pods, and the gates' logs, and prints a
//! timestamped line for each thing that changed since the last look: a
//! role or epoch, a health verdict, the pods serving or held at the gate, a
//! gate's `waiting:`/`released:` line, a new Event. Nothing here decides
//! anything; the lines are what an operator would see with kubectl.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use counterweight_cli::clusters::Target;
use counterweight_cli::explain::{self, EventLine};
use counterweight_cli::status::ClusterStatus;
use counterweight_core::health::{HealthReport, Verdict, below_threshold};
use counterweight_core::names;
use counterweight_core::state::Role;
use k8s_openapi::jiff::Timestamp;

use crate::ems::{self, AppPods, Sample};

/// How often the clusters are read.
pub const TICK: Duration = Duration::from_millis(100);

/// What one look at one cluster found.
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// Cluster name.
    pub name: String,
    /// Its state record.
    pub status: ClusterStatus,
    /// Its EMS pods per Deployment, if they could be listed.
    pub pods: Option<Vec<(&'static str, AppPods)>>,
}

impl Side {
    /// Active per its record.
    pub fn active(&self) -> bool {
        self.status.role == Some(Role::Active)
    }

    /// Its health report's verdict is abnormal.
    pub fn abnormal(&self) -> bool {
        self.status
            .health
            .as_ref()
            .is_some_and(|h| matches!(h.verdict, Verdict::Abnormal { .. }))
    }

    /// The record's epoch (0 before there is one).
    pub fn epoch(&self) -> u64 {
        self.status.epoch.unwrap_or(0)
    }

    /// Every service pod serves, and there is at least one per Deployment
    /// that should have one.
    pub fn all_serving(&self) -> bool {
        self.service_pods()
            .is_some_and(|ps| ps.iter().all(|(_, a)| a.total > 0 && a.serving == a.total))
    }

    /// No service pod serves (all held at the gate, or none left).
    pub fn none_serving(&self) -> bool {
        self.service_pods()
            .is_some_and(|ps| ps.iter().all(|(_, a)| a.serving == 0))
    }

    /// Every service Deployment has its pods, all injected and held.
    pub fn all_held(&self) -> bool {
        self.service_pods().is_some_and(|ps| {
            ps.iter()
                .all(|(_, a)| a.total > 0 && a.gated == a.total && a.serving == 0)
        })
    }

    /// Every service Deployment has its pods, each held by the gate's init
    /// container as the kubelet reports it (gate running, app containers
    /// waiting): real nodes only.
    pub fn all_at_gate(&self) -> bool {
        self.service_pods().is_some_and(|ps| {
            ps.iter()
                .all(|(_, a)| a.total > 0 && a.at_gate == a.total && a.serving == 0)
        })
    }

    /// One line: role, epoch, S vs D and the pods, for error messages.
    pub fn summary(&self) -> String {
        let role = self
            .status
            .role
            .map_or("no state record".to_owned(), |r| r.to_string());
        let health = self
            .status
            .health
            .as_ref()
            .map_or("no health report".to_owned(), |h| {
                format!("S={:.2} vs D={:.2}", h.score, h.threshold)
            });
        let pods = self
            .pods
            .as_deref()
            .map_or("pods unknown".to_owned(), pods_line);
        format!(
            "{} {role} epoch {}, {health}; {pods}",
            self.name,
            self.epoch()
        )
    }

    fn service_pods(&self) -> Option<Vec<&(&'static str, AppPods)>> {
        self.pods
            .as_ref()
            .map(|ps| ps.iter().filter(|(app, _)| ems::is_service(app)).collect())
    }
}

/// The clusters as last seen, and what has been printed already.
pub struct View {
    targets: Vec<Target>,
    sample: Sample,
    // (cluster, pod) -> its containers' line as last printed (real nodes).
    containers: HashMap<(String, String), String>,
    gate_logs: Vec<(String, PathBuf)>,
    t0: Instant,
    // `t0` on the wall clock, which Event times are on.
    t0_wall: Timestamp,
    /// The last look, in cluster order.
    pub sides: Vec<Side>,
    // (cluster, reason, note): an Event series that repeats is printed
    // once; its later occurrences still count for the handover time.
    printed_events: HashSet<(String, String, String)>,
    // Every occurrence seen: (cluster, reason, note, time, count).
    seen_events: HashSet<(String, String, String, Option<String>, i32)>,
    /// Events first seen since [`View::restart_clock`].
    pub fresh_events: Vec<EventLine>,
    gate_lines: Vec<usize>,
    /// Gates that printed their `released:` line.
    pub released: HashSet<String>,
    handover_reported: bool,
    // Clusters whose abnormal verdict has been printed since the clock was
    // last restarted.
    told_abnormal: HashSet<String>,
}

impl View {
    /// A view of `targets` (cwctl's clusters), the gates' log files (the
    /// KWOK demo's gate processes; none on real nodes, where the gates are
    /// init containers and the kubelet reports them) and `sample`'s pods.
    pub fn new(
        targets: Vec<Target>,
        gate_logs: Vec<(String, PathBuf)>,
        t0: Instant,
        sample: Sample,
    ) -> Self {
        let n = gate_logs.len();
        Self {
            targets,
            sample,
            containers: HashMap::new(),
            gate_logs,
            t0,
            t0_wall: Timestamp::now(),
            sides: Vec::new(),
            printed_events: HashSet::new(),
            seen_events: HashSet::new(),
            fresh_events: Vec::new(),
            gate_lines: vec![0; n],
            released: HashSet::new(),
            // No handover is timed before the fault (restart_clock): at a
            // real-node install both clusters may be abnormal before the
            // first election, and that Promoted is no handover.
            handover_reported: true,
            told_abnormal: HashSet::new(),
        }
    }

    /// Times printed from now on count from here.
    pub fn restart_clock(&mut self) {
        self.t0 = Instant::now();
        self.t0_wall = Timestamp::now();
        self.fresh_events.clear();
        self.handover_reported = false;
        self.told_abnormal.clear();
    }

    /// Whether `cluster`'s abnormal verdict has been printed since the
    /// clock was last restarted. A handover is the story of that verdict,
    /// and its report can reach the state record after the whole handover:
    /// the health loop writes it after the HA loop has heard the verdict,
    /// into the ConfigMap the handover is writing too.
    pub fn told_abnormal(&self, cluster: &str) -> bool {
        self.told_abnormal.contains(cluster)
    }

    /// Time since the clock was last (re)started.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Whether the handover time (from the Events) has been printed since
    /// the clock was last restarted.
    pub fn handover_reported(&self) -> bool {
        self.handover_reported
    }

    /// Whether an Event `reason` of `cluster` has been seen.
    pub fn has_event(&self, cluster: &str, reason: &str) -> bool {
        self.printed_events
            .iter()
            .any(|(c, r, _)| c == cluster && r == reason)
    }

    /// The side of `name` as last seen.
    pub fn side(&self, name: &str) -> Option<&Side> {
        self.sides.iter().find(|s| s.name == name)
    }

    /// Prints one timestamped line.
    pub fn say(&self, line: &str) {
        crate::say(self.t0, line);
    }

    /// Reads everything once and prints what changed.
    pub async fn look(&mut self) -> Result<()> {
        let x = explain::gather(&self.targets, names::SYSTEM_NAMESPACE, 500).await;
        let mut sides = Vec::new();
        for (t, status) in self.targets.iter().zip(x.status.clusters) {
            let pods = match &t.client {
                Ok(c) => ems::pods(c, self.sample).await.ok(),
                Err(_) => None,
            };
            sides.push(Side {
                name: t.name.clone(),
                status,
                pods,
            });
        }
        // Within one look, print in the order a person reads a handover:
        // the verdict, the protocol steps (Events), the resulting roles,
        // then the workload effects.
        let old = std::mem::replace(&mut self.sides, sides);
        let mut told = Vec::new();
        for (i, new) in self.sides.iter().enumerate() {
            if let Some(line) = health_line(old.get(i), new) {
                self.say(&line);
                if new.abnormal() {
                    told.push(new.name.clone());
                }
            }
        }
        self.told_abnormal.extend(told);
        self.report_events(x.events);
        for (i, new) in self.sides.iter().enumerate() {
            let before = old.get(i).map(|o| (o.status.role, o.status.epoch));
            if before != Some((new.status.role, new.status.epoch))
                && let (Some(role), Some(epoch)) = (new.status.role, new.status.epoch)
            {
                self.say(&format!("{} {role}, epoch {epoch}", new.name));
            }
        }
        if !self.handover_reported
            && let Some(took) = handover_time(&self.fresh_events, self.t0_wall)
        {
            self.handover_reported = true;
            self.say(&took);
        }
        for (i, new) in self.sides.iter().enumerate() {
            let now = new.pods.as_deref().map(pods_line);
            if now.is_some() && now != old.get(i).and_then(|o| o.pods.as_deref().map(pods_line)) {
                self.say(&format!("{} pods: {}", new.name, now.unwrap_or_default()));
            }
        }
        self.report_containers();
        self.report_gates();
        Ok(())
    }

    /// A line per service pod whose containers changed, as the kubelet
    /// reports them: the gate's init container holding the app container,
    /// then releasing it (real nodes; KWOK pods have no such lines).
    fn report_containers(&mut self) {
        let mut lines = Vec::new();
        for side in &self.sides {
            let Some(pods) = &side.pods else { continue };
            for (app, a) in pods {
                for (pod, line) in &a.containers {
                    let key = (side.name.clone(), pod.clone());
                    if self.containers.get(&key) != Some(line) {
                        lines.push(format!("{} {app} pod {pod}: {line}", side.name));
                        self.containers.insert(key, line.clone());
                    }
                }
            }
        }
        for l in lines {
            self.say(&l);
        }
    }

    fn report_gates(&mut self) {
        for (i, (cluster, log)) in self.gate_logs.iter().enumerate() {
            let Ok(text) = std::fs::read_to_string(log) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            for line in lines.iter().skip(self.gate_lines[i]) {
                // The gate logs through tracing; keep its message only.
                let msg = ["released:", "waiting:"]
                    .iter()
                    .find_map(|k| line.find(k).map(|at| &line[at..]))
                    // ... and drop the structured fields that follow it.
                    .map(|m| m.split(" cluster=").next().unwrap_or(m));
                if let Some(msg) = msg {
                    crate::say(self.t0, &format!("{cluster} gate of a new web pod: {msg}"));
                    if msg.starts_with("released:") {
                        self.released.insert(cluster.clone());
                    }
                }
            }
            self.gate_lines[i] = lines.len();
        }
    }

    fn report_events(&mut self, events: Vec<EventLine>) {
        for e in events {
            let occurrence = (
                e.cluster.clone(),
                e.reason.clone(),
                e.note.clone(),
                e.time.clone(),
                e.count,
            );
            if !self.seen_events.insert(occurrence) {
                continue;
            }
            let key = (e.cluster.clone(), e.reason.clone(), e.note.clone());
            if self.printed_events.insert(key) {
                self.say(&format!(
                    "{} Event {} {}: {}",
                    e.cluster,
                    e.type_,
                    e.reason,
                    shorten(&e.note, 110)
                ));
            }
            self.fresh_events.push(e);
        }
    }
}

/// The health line for `new`, if its report changed in a way worth a line.
fn health_line(old: Option<&Side>, new: &Side) -> Option<String> {
    let now = new.status.health.as_ref()?;
    let before = old.and_then(|o| o.status.health.as_ref());
    // The look that sees the abnormal verdict often already sees the
    // demotion it caused: it still counts as the active's verdict.
    let was_or_is_active = new.active() || old.is_some_and(Side::active);
    health_change(&new.name, was_or_is_active, before, now)
}

/// A line when the health report says something new worth a person's eye:
/// every interval's verdict of the active (that is where a handover comes
/// from), and for a standby only crossings of D.
///
/// An abnormal verdict after any other (the one that ends a degraded run)
/// is always the active's, even when the look that sees it already sees a
/// standby, or is the first look that read the cluster: the health report
/// and the HA record are written by different loops, and the handover the
/// verdict starts can reach the record first, one look or more ahead of
/// the report.
fn health_change(
    name: &str,
    active: bool,
    before: Option<&HealthReport>,
    now: &HealthReport,
) -> Option<String> {
    let turns_abnormal = matches!(now.verdict, Verdict::Abnormal { .. })
        && !before.is_some_and(|b| matches!(b.verdict, Verdict::Abnormal { .. }));
    let active = active || turns_abnormal;
    let below = below_threshold(now.score, now.threshold);
    let changed = match before {
        None => true,
        Some(b) if active => {
            b.retry_count != now.retry_count
                || b.verdict != now.verdict
                || (b.score - now.score).abs() > 1e-6
        }
        Some(b) => below_threshold(b.score, b.threshold) != below,
    };
    if !changed {
        return None;
    }
    // `+ 0.0` turns an empty sum's -0.0 into 0.0 for printing.
    let (s, d) = (now.score + 0.0, now.threshold);
    let down: Vec<String> = now
        .components
        .iter()
        .filter(|c| !c.up)
        .map(|c| format!("{} {}/{}", c.name, c.ready, c.required))
        .collect();
    let down = if down.is_empty() {
        String::new()
    } else {
        format!("; down: {}", down.join(", "))
    };
    // The controller refreshes S as pods change but the verdict once per
    // interval, so a report may pair a fresh S with the last verdict. Then,
    // and for a standby (whose verdicts only matter when they cross D: it
    // must be healthy to accept a handover), say which side of D it is.
    let verdict_agrees = matches!(now.verdict, Verdict::Healthy) != below;
    if !active || !verdict_agrees {
        return Some(if below {
            format!("{name} below D (S={s:.2} < D={d:.2}{down})")
        } else {
            format!("{name} at or above D (S={s:.2} >= D={d:.2})")
        });
    }
    Some(match now.verdict {
        Verdict::Healthy => format!("{name} healthy (S={s:.2} >= D={d:.2})"),
        Verdict::Degraded { retry_count } => format!(
            "{name} degraded (S={s:.2} < D={d:.2}, retry {retry_count}/{}{down})",
            now.retries
        ),
        Verdict::Abnormal { retry_count } => format!(
            "{name} abnormal (S={s:.2} < D={d:.2}, retry {retry_count}/{}{down})",
            now.retries
        ),
    })
}

/// `web 2/2 serving, api 1/1 serving; ems-db 1/1 ready, ...`.
fn pods_line(pods: &[(&'static str, AppPods)]) -> String {
    let service: Vec<String> = pods
        .iter()
        .filter(|(app, _)| ems::is_service(app))
        .map(|(app, a)| {
            let held = a.total - a.serving.min(a.total);
            match (a.total, held) {
                (0, _) => format!("{app} no pods"),
                (_, 0) => format!("{app} {}/{} serving", a.serving, a.total),
                _ if a.at_gate > 0 => format!(
                    "{app} {}/{} serving ({held} held, serving=False; {} waiting at the gate's init container, app container not started)",
                    a.serving, a.total, a.at_gate
                ),
                _ => format!(
                    "{app} {}/{} serving ({held} held, serving=False)",
                    a.serving, a.total
                ),
            }
        })
        .collect();
    let sync: Vec<String> = pods
        .iter()
        .filter(|(app, _)| !ems::is_service(app))
        .map(|(app, a)| format!("{app} {}/{} ready", a.ready, a.total))
        .collect();
    format!("{}; sync {}", service.join(", "), sync.join(", "))
}

/// "handover took N ms" from the Event times: the latest `Promoted` since
/// `since`, measured from the latest `ClusterAbnormal` of another cluster
/// between `since` and it.
fn handover_time(events: &[EventLine], since: Timestamp) -> Option<String> {
    let at = |e: &EventLine| e.time.as_deref()?.parse::<Timestamp>().ok();
    let timed = || {
        events
            .iter()
            .filter_map(move |e| Some((e, at(e)?)))
            .filter(move |(_, t)| *t >= since)
    };
    let (promoted, p_at) = timed()
        .filter(|(e, _)| e.reason == "Promoted")
        .max_by_key(|(_, t)| *t)?;
    let (abnormal, a_at) = timed()
        .filter(|(e, t)| {
            e.reason == "ClusterAbnormal" && e.cluster != promoted.cluster && *t <= p_at
        })
        .max_by_key(|(_, t)| *t)?;
    Some(format!(
        "handover took {} ms ({} ClusterAbnormal -> {} Promoted, by Event times)",
        p_at.duration_since(a_at).as_millis(),
        abnormal.cluster,
        promoted.cluster
    ))
}

fn shorten(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(score: f64, retry_count: u32, verdict: Verdict) -> HealthReport {
        HealthReport {
            score,
            threshold: 0.6,
            retries: 2,
            retry_count,
            verdict,
            components: Vec::new(),
            data_behind: Vec::new(),
            data: Vec::new(),
        }
    }

    /// The demo's run that missed its `abnormal` line: the report of the
    /// abnormal verdict came after two looks had seen the demotion.
    #[test]
    fn the_abnormal_verdict_after_a_degraded_run_is_told_after_the_demotion_too() {
        let degraded = report(0.5, 2, Verdict::Degraded { retry_count: 2 });
        let abnormal = report(0.5, 3, Verdict::Abnormal { retry_count: 3 });
        assert_eq!(
            health_change("east", false, Some(&degraded), &abnormal).as_deref(),
            Some("east abnormal (S=0.50 < D=0.60, retry 3/2)")
        );
        // ... and when the look before it could not read the cluster.
        assert_eq!(
            health_change("east", false, None, &abnormal).as_deref(),
            Some("east abnormal (S=0.50 < D=0.60, retry 3/2)")
        );
        // A standby's report that stays below D is still not a line.
        assert_eq!(
            health_change("east", false, Some(&abnormal), &abnormal),
            None
        );
    }
}
