//! `cwctl switchover`, `pause` and `resume`: requests to the controllers.
//!
//! `cwctl` never writes the state ConfigMap. It files a request in the
//! ConfigMap [`COMMAND_CONFIGMAP`] of the controller namespace:
//!
//! ```yaml
//! data:
//!   command: switchover        # or pause, resume
//!   target: west               # switchover only
//!   id: cw-18a2f3c4d5e6-1a2b   # fresh per request
//!   requestedAt: 2026-11-24T21:00:00Z
//! ```
//!
//! The request's keys, its encoding and the answer's are
//! `counterweight_core::request`'s (one codec for both sides). The
//! controller (`counterweight_controller::commands`) validates it,
//! forwards it to its HA state machine, and answers in the same ConfigMap
//! with `handledId: <id>` and `result: accepted` or `rejected: <why>`.
//! `cwctl` waits, with a deadline, for that answer and then for the effect:
//! for a switchover the target becoming active (the request goes to the
//! current active, which runs the FIG. 9 handshake); for pause and resume
//! the `paused` flag of every cluster's record (the request goes to every
//! cluster, each controller pauses its own automatic failover). The state
//! machine can still refuse an accepted switchover (the target has not
//! answered a recent probe as a healthy standby); it says so in a
//! `CommandRefused` Event, which `cwctl` reports.
//!
//! An operator needs `get`, `create` and `update` on that one ConfigMap
//! (`manifests/base/cwctl-rbac.yaml`), and `get` on the state ConfigMap.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use counterweight_core::names;
use counterweight_core::state::Role;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

use crate::Error;
use crate::clusters::Target;
use crate::status::{self, Status};

use counterweight_core::ha::Command;
use counterweight_core::request::{COMMAND_CONFIGMAP, CommandRequest, ID_KEY, Outcome};

/// How often to look at the request and the state while waiting.
const POLL: Duration = Duration::from_millis(200);
/// Conflicting writers tolerated while filing one request.
const MAX_CONFLICTS: usize = 3;

/// A new request for `command` with a fresh id, filed now.
pub fn new_request(command: Command) -> CommandRequest {
    CommandRequest {
        command,
        id: new_id(),
        requested_at: Timestamp::now(),
    }
}

/// A fresh request id: time, process and a per-process counter, enough to
/// be unique among the requests of one cluster (it only has to differ from
/// the last handled one).
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("cw-{nanos:x}-{:x}-{n:x}", std::process::id())
}

/// Checks a switchover against the clusters' records and returns the
/// cluster the request must go to: the one active. Pure, so that every
/// refusal is unit-tested.
pub fn plan_switchover(status: &Status, to: &str) -> Result<String, Error> {
    let Some(target) = status.cluster(to) else {
        let known: Vec<&str> = status.clusters.iter().map(|c| c.cluster.as_str()).collect();
        return Err(Error::Refused(format!(
            "{to} is not one of the clusters ({}); the cluster name is its kubeconfig context",
            known.join(", ")
        )));
    };
    if let Some(why) = &target.unreachable {
        return Err(Error::Refused(format!(
            "{to} is unreachable ({why}); a switchover needs a healthy, reachable standby"
        )));
    }
    let actives = status.actives();
    let active = match actives.as_slice() {
        [] => {
            return Err(Error::Refused(
                "no cluster is active; there is nothing to switch over from (see `cwctl status`)"
                    .to_owned(),
            ));
        }
        [one] => *one,
        many => {
            // Several records say active while an old active has not yet
            // persisted its fence; only the highest epoch is current.
            let mut sorted = many.to_vec();
            sorted.sort_by_key(|c| std::cmp::Reverse(c.epoch));
            sorted[0]
        }
    };
    if active.cluster == to {
        return Err(Error::Refused(format!("{to} is already active")));
    }
    if target.role != Some(Role::Standby) {
        return Err(Error::Refused(format!(
            "{to} has no readable standby record ({}); see `cwctl check`",
            target.record_error.as_deref().unwrap_or("unknown state")
        )));
    }
    if let Some(h) = &target.health
        && counterweight_core::health::below_threshold(h.score, h.threshold)
    {
        return Err(Error::Refused(format!(
            "{to} is below its health threshold (S={}); the controller would refuse it as a \
             handover target. See `cwctl explain`",
            status::score_vs_threshold(h)
        )));
    }
    Ok(active.cluster.clone())
}

/// Files `request` on the cluster of `api`: creates the request
/// ConfigMap, or replaces its data (compare-and-swap on resourceVersion).
pub async fn file(
    api: &Api<ConfigMap>,
    cluster: &str,
    request: &CommandRequest,
) -> Result<(), Error> {
    let err = |what: &str, e: kube::Error| Error::Cluster {
        cluster: cluster.to_owned(),
        message: format!("{what} ConfigMap {COMMAND_CONFIGMAP}: {e}{}", rbac_hint(&e)),
    };
    for _ in 0..MAX_CONFLICTS {
        match api
            .get_opt(COMMAND_CONFIGMAP)
            .await
            .map_err(|e| err("reading", e))?
        {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(COMMAND_CONFIGMAP.to_owned()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_owned(),
                            "counterweight".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(request.to_data()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(err("creating", e)),
                }
            }
            Some(mut cm) => {
                cm.data = Some(request.to_data());
                match api
                    .replace(COMMAND_CONFIGMAP, &PostParams::default(), &cm)
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(err("updating", e)),
                }
            }
        }
    }
    Err(Error::Cluster {
        cluster: cluster.to_owned(),
        message: format!("ConfigMap {COMMAND_CONFIGMAP} kept changing; try again"),
    })
}

fn rbac_hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            " (grant yourself the counterweight-operator Role of manifests/base/cwctl-rbac.yaml)"
        }
        _ => "",
    }
}

/// Waits until the controller answered `request` and returns its result.
pub async fn wait_answer(
    api: &Api<ConfigMap>,
    cluster: &str,
    request: &CommandRequest,
    deadline: Instant,
) -> Result<Outcome, Error> {
    let mut last = String::from("no answer yet");
    loop {
        match api.get_opt(COMMAND_CONFIGMAP).await {
            Ok(Some(cm)) => {
                let d = cm.data.unwrap_or_default();
                if d.get(ID_KEY) != Some(&request.id) {
                    return Err(Error::Refused(format!(
                        "{cluster}: the request was replaced by another one (id {}) before it \
                         was answered; someone else is sending commands",
                        d.get(ID_KEY).map_or("none", String::as_str)
                    )));
                }
                if let Some(outcome) = Outcome::of(&d, &request.id) {
                    return Ok(outcome);
                }
            }
            Ok(None) => last = "the request ConfigMap disappeared".to_owned(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{cluster}'s controller did not answer request {} ({last}); is it running, \
                 and does it run commands::run?",
                request.id
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn target<'a>(targets: &'a [Target], name: &str) -> Result<&'a Target, Error> {
    targets
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Refused(format!("no context {name}")))
}

fn client(t: &Target) -> Result<kube::Client, Error> {
    t.client.clone().map_err(|message| Error::Cluster {
        cluster: t.name.clone(),
        message,
    })
}

/// `cwctl switchover --to <to>`: asks the active to hand over, then waits
/// for `to` to become active, printing progress.
pub async fn switchover(
    targets: &[Target],
    namespace: &str,
    to: &str,
    timeout: Duration,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + timeout;
    let before = status::gather(targets, namespace).await;
    let active = plan_switchover(&before, to)?;
    let old_epoch = before.cluster(&active).and_then(|c| c.epoch).unwrap_or(0);
    let active_client = client(target(targets, &active)?)?;
    let cms: Api<ConfigMap> = Api::namespaced(active_client.clone(), namespace);
    let request = new_request(Command::Switchover {
        target: to.to_owned(),
    });
    file(&cms, &active, &request).await?;
    writeln!(
        out,
        "→ asked {active} (active, epoch {old_epoch}) to hand over to {to} [request {}]",
        request.id
    )?;
    if let Outcome::Rejected(why) = wait_answer(&cms, &active, &request, deadline).await? {
        return Err(Error::Refused(format!(
            "{active}'s controller: rejected: {why}"
        )));
    }
    writeln!(
        out,
        "✓ {active}'s controller accepted the request ({:.1}s)",
        started.elapsed().as_secs_f64()
    )?;

    // Watch both records until the target is active in a newer epoch.
    let events: Api<Event> = Api::namespaced(active_client, namespace);
    let mut seen: BTreeMap<String, (Option<Role>, Option<u64>)> = BTreeMap::new();
    let mut abort_noted = false;
    loop {
        let now = status::gather(targets, namespace).await;
        for name in [active.as_str(), to] {
            if let Some(c) = now.cluster(name) {
                let cur = (c.role, c.epoch);
                if seen.get(name) != Some(&cur) && c.unreachable.is_none() {
                    if seen.contains_key(name) {
                        writeln!(
                            out,
                            "  {name}: {} (epoch {}) after {:.1}s",
                            cur.0.map_or("unknown".to_owned(), |r| r.to_string()),
                            cur.1.map_or("?".to_owned(), |e| e.to_string()),
                            started.elapsed().as_secs_f64()
                        )?;
                    }
                    seen.insert(name.to_owned(), cur);
                }
            }
        }
        if let Some(c) = now.cluster(to)
            && c.role == Some(Role::Active)
            && c.epoch.is_some_and(|e| e > old_epoch)
        {
            writeln!(
                out,
                "✓ {to} is active in epoch {} ({:.1}s)",
                c.epoch.unwrap_or_default(),
                started.elapsed().as_secs_f64()
            )?;
            return Ok(());
        }
        if let Some(why) = refusal_since(&events, request.requested_at).await {
            let old_still_active = now
                .cluster(&active)
                .is_some_and(|c| c.role == Some(Role::Active) && c.epoch == Some(old_epoch));
            if refusal_is_final(&why, old_still_active) {
                return Err(Error::Refused(format!("{active} did not hand over: {why}")));
            }
            if !abort_noted {
                writeln!(
                    out,
                    "  {active} reports {why}; it no longer holds the active role, so {to} may                      still take over: watching"
                )?;
                abort_noted = true;
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{to} did not become active within {}s; see `cwctl explain`",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a refusal (`refusal_since`'s text) ends the switchover as
/// failed. A `CommandRefused` always does: the handover never began. A
/// `HandoverAborted` does only while the old active still holds its role in
/// its epoch; once it does not (it fenced before the abort, and its lease
/// may let the target in), the target becoming active is still the outcome
/// to wait for, and `cwctl` must not call a switchover that happened
/// refused.
pub fn refusal_is_final(refusal: &str, old_active_still_active: bool) -> bool {
    !refusal.starts_with("HandoverAborted") || old_active_still_active
}

/// A `CommandRefused` or `HandoverAborted` Event recorded after `since`
/// (the state machine's own refusal), with its message.
async fn refusal_since(events: &Api<Event>, since: Timestamp) -> Option<String> {
    let list = events.list(&ListParams::default().limit(500)).await.ok()?;
    list.items
        .into_iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("CommandRefused" | "HandoverAborted")
            ) && e
                .regarding
                .as_ref()
                .is_some_and(|r| r.name.as_deref() == Some(names::STATE_CONFIGMAP))
        })
        .find(|e| {
            // Event times have microsecond precision; the request time is
            // taken before filing, so any refusal of this request is later.
            let at = e
                .series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or(e.event_time.as_ref().map(|t| t.0));
            at.is_some_and(|t| t >= since)
        })
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default()
            )
        })
}

/// `cwctl pause` / `cwctl resume`: asks every cluster's controller, then
/// waits for every record to show the new flag.
pub async fn set_paused(
    targets: &[Target],
    namespace: &str,
    pause: bool,
    timeout: Duration,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + timeout;
    let verb = if pause { "pause" } else { "resume" };
    let mut failures = Vec::new();
    let mut filed = Vec::new();
    for t in targets {
        let request = new_request(if pause {
            Command::Pause
        } else {
            Command::Resume
        });
        let api = match client(t) {
            Ok(c) => Api::<ConfigMap>::namespaced(c, namespace),
            Err(e) => {
                writeln!(out, "✗ {}: {e}", t.name)?;
                failures.push(t.name.clone());
                continue;
            }
        };
        match file(&api, &t.name, &request).await {
            Ok(()) => {
                writeln!(out, "→ asked {} to {verb} [request {}]", t.name, request.id)?;
                filed.push((t, api, request));
            }
            Err(e) => {
                writeln!(out, "✗ {e}")?;
                failures.push(t.name.clone());
            }
        }
    }
    for (t, api, request) in filed {
        match wait_answer(&api, &t.name, &request, deadline).await {
            Ok(Outcome::Accepted) => {}
            Ok(Outcome::Rejected(why)) => {
                writeln!(out, "✗ {}: rejected: {why}", t.name)?;
                failures.push(t.name.clone());
                continue;
            }
            Err(e) => {
                writeln!(out, "✗ {e}")?;
                failures.push(t.name.clone());
                continue;
            }
        }
        // The answer means the HA loop has the command; the record shows
        // it once persisted.
        let done = loop {
            let s = status::gather(std::slice::from_ref(t), namespace).await;
            if s.clusters
                .first()
                .is_some_and(|c| c.paused == pause && c.role.is_some())
            {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(POLL).await;
        };
        if done {
            writeln!(
                out,
                "✓ {}: automatic failover {}d ({:.1}s)",
                t.name,
                verb,
                started.elapsed().as_secs_f64()
            )?;
        } else {
            writeln!(
                out,
                "✗ {}: accepted, but its record does not show paused={pause} yet",
                t.name
            )?;
            failures.push(t.name.clone());
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "{verb} did not complete on: {}",
            failures.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_aborted_handover_is_final_only_while_the_old_active_holds_on() {
        use super::refusal_is_final;
        assert!(refusal_is_final("CommandRefused: paused", false));
        assert!(refusal_is_final("CommandRefused: paused", true));
        assert!(refusal_is_final("HandoverAborted: west not ready", true));
        assert!(!refusal_is_final("HandoverAborted: west not ready", false));
    }

    use super::*;
    use crate::status::ClusterStatus;

    fn cluster(name: &str, role: Option<Role>, epoch: u64) -> ClusterStatus {
        ClusterStatus {
            cluster: name.into(),
            role,
            epoch: Some(epoch),
            ..Default::default()
        }
    }

    fn status(clusters: Vec<ClusterStatus>) -> Status {
        Status {
            namespace: "ns".into(),
            clusters,
        }
    }

    fn refused(r: Result<String, Error>) -> String {
        match r {
            Err(Error::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn switchover_goes_to_the_active() {
        let s = status(vec![
            cluster("east", Some(Role::Active), 3),
            cluster("west", Some(Role::Standby), 3),
        ]);
        assert_eq!(plan_switchover(&s, "west").expect("plan"), "east");
    }

    #[test]
    fn switchover_refusals_say_why() {
        let s = status(vec![
            cluster("east", Some(Role::Active), 3),
            cluster("west", Some(Role::Standby), 3),
        ]);
        assert!(refused(plan_switchover(&s, "south")).contains("not one of the clusters"));
        assert!(refused(plan_switchover(&s, "east")).contains("already active"));

        let none = status(vec![
            cluster("east", Some(Role::Standby), 3),
            cluster("west", Some(Role::Standby), 3),
        ]);
        assert!(refused(plan_switchover(&none, "west")).contains("no cluster is active"));

        let mut down = s.clone();
        down.clusters[1].unreachable = Some("connection refused".into());
        assert!(refused(plan_switchover(&down, "west")).contains("unreachable"));

        let mut broken = s.clone();
        broken.clusters[1].role = None;
        broken.clusters[1].record_error = Some("key `state` holds x".into());
        assert!(refused(plan_switchover(&broken, "west")).contains("key `state`"));

        let mut sick = s;
        sick.clusters[1].health = Some(counterweight_core::health::HealthReport {
            score: 0.4,
            threshold: 0.6,
            retries: 1,
            retry_count: 1,
            verdict: counterweight_core::health::Verdict::Degraded { retry_count: 1 },
            components: vec![],
            data_behind: vec![],
            data: vec![],
        });
        assert!(refused(plan_switchover(&sick, "west")).contains("below its health threshold"));
    }

    #[test]
    fn two_actives_pick_the_higher_epoch() {
        let s = status(vec![
            cluster("east", Some(Role::Active), 3),
            cluster("west", Some(Role::Active), 4),
            cluster("south", Some(Role::Standby), 4),
        ]);
        assert_eq!(plan_switchover(&s, "south").expect("plan"), "west");
    }

    #[test]
    fn a_new_request_is_filed_now_and_the_controller_forwards_it() {
        use counterweight_core::request::{Decision, HANDLED_ID_KEY, decide};
        let r = new_request(Command::Switchover {
            target: "west".into(),
        });
        let d = r.to_data();
        assert!(
            !d.contains_key(HANDLED_ID_KEY),
            "a new request drops old answers"
        );
        assert_eq!(
            decide(&d, Timestamp::now()),
            Decision::Forward {
                id: r.id.clone(),
                command: r.command.clone()
            }
        );
    }

    #[test]
    fn ids_are_fresh() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert!(a.len() < 128);
    }
}
