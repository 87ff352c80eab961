//! The operator command request: how `cwctl` asks a controller to switch
//! over, pause or resume, and how the controller answers.
//!
//! The request is a ConfigMap that `cwctl` files and the controller
//! validates, forwards to its state machine and answers in place. This
//! module is its one codec: [`CommandRequest::to_data`] is what `cwctl`
//! files, [`decide`] is how the controller reads it (and how `cwctl` can
//! check a request before filing it), [`Outcome::answer_data`] is the
//! controller's answer and [`Outcome::of`] how `cwctl` reads it back.
//! [`check_request_age`] is the one rule on when a request was filed.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::ha::Command;
use crate::names::check_cluster_name;

/// Name of the request ConfigMap in the controller namespace.
pub const COMMAND_CONFIGMAP: &str = "counterweight-command";
/// Request key: `switchover`, `pause` or `resume`.
pub const COMMAND_KEY: &str = "command";
/// Request key: the cluster a switchover should make active.
pub const TARGET_KEY: &str = "target";
/// Request key: the requester's identifier of this request.
pub const ID_KEY: &str = "id";
/// Request key: RFC 3339 time the request was filed.
pub const REQUESTED_AT_KEY: &str = "requestedAt";
/// Answer key: the `id` of the last request handled.
pub const HANDLED_ID_KEY: &str = "handledId";
/// Answer key: `accepted` or `rejected: <why>`.
pub const RESULT_KEY: &str = "result";
/// Answer key: RFC 3339 time the answer was written.
pub const HANDLED_AT_KEY: &str = "handledAt";
/// Value of [`RESULT_KEY`] for a request forwarded to the HA loop.
pub const ACCEPTED: &str = "accepted";
/// Prefix of [`RESULT_KEY`] for a refused request; the reason follows.
pub const REJECTED_PREFIX: &str = "rejected: ";

/// Requests older than this are rejected instead of executed: a `pause`
/// filed while the controller was down for an hour is more likely to
/// surprise than to help.
pub const MAX_REQUEST_AGE: Duration = Duration::from_secs(300);

/// How far in the future a request's `requestedAt` may lie: the clock of
/// the machine `cwctl` ran on may be ahead of the controller's. NTP keeps
/// servers within milliseconds; a minute leaves room for a laptop that is
/// not synchronized, and no more: a request dated later would stay
/// executable for that long past [`MAX_REQUEST_AGE`] (a request dated next
/// year would wait, armed, for a controller to come up).
pub const MAX_REQUEST_SKEW: Duration = Duration::from_secs(60);

/// Checks when a request was filed: `age_secs` is the controller's now
/// minus `requestedAt` (negative when it lies in the future), `filed` the
/// time as written, for the reason.
pub fn check_request_age(age_secs: i64, filed: &str) -> Result<(), String> {
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    if age_secs > secs(MAX_REQUEST_AGE) {
        return Err(format!(
            "the request was filed at {filed}, more than {}s ago; send it again",
            MAX_REQUEST_AGE.as_secs()
        ));
    }
    if age_secs < -secs(MAX_REQUEST_SKEW) {
        return Err(format!(
            "`{REQUESTED_AT_KEY}` {filed} is {}s in the future, more than the {}s of clock skew \
             allowed; check the clock of the machine that filed it and send it again",
            age_secs.unsigned_abs(),
            MAX_REQUEST_SKEW.as_secs()
        ));
    }
    Ok(())
}

/// Longest accepted `id`.
pub const MAX_ID_LEN: usize = 128;

/// One operator request, as `cwctl` files it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// What is asked.
    pub command: Command,
    /// The requester's identifier, fresh for each request: the answer
    /// names it.
    pub id: String,
    /// When it was filed.
    pub requested_at: Timestamp,
}

impl CommandRequest {
    /// The request ConfigMap's data (any earlier answer is dropped).
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let (command, target) = match &self.command {
            Command::Switchover { target } => ("switchover", Some(target.clone())),
            Command::Pause => ("pause", None),
            Command::Resume => ("resume", None),
        };
        let mut d = BTreeMap::from([
            (COMMAND_KEY.to_owned(), command.to_owned()),
            (ID_KEY.to_owned(), self.id.clone()),
            (REQUESTED_AT_KEY.to_owned(), self.requested_at.to_string()),
        ]);
        if let Some(t) = target {
            d.insert(TARGET_KEY.to_owned(), t);
        }
        d
    }
}

/// What to do with the current content of the request ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do: no request, or it was handled already.
    Ignore,
    /// Forward this command, then answer [`Outcome::Accepted`].
    Forward {
        /// The request's id.
        id: String,
        /// The command for the HA loop.
        command: Command,
    },
    /// Answer [`Outcome::Rejected`] without forwarding.
    Reject {
        /// The request's id.
        id: String,
        /// Why, for the operator.
        reason: String,
    },
}

/// Decides what a request means, as of `now`: the controller's reading of
/// what [`CommandRequest::to_data`] wrote (or an operator by hand). Every
/// refusal names the key at fault.
pub fn decide(data: &BTreeMap<String, String>, now: Timestamp) -> Decision {
    let Some(id) = data.get(ID_KEY).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        // Without an id there is nobody to answer; cwctl always sets one.
        return Decision::Ignore;
    };
    if data.get(HANDLED_ID_KEY).map(|s| s.trim()) == Some(id) {
        return Decision::Ignore;
    }
    let id = id.to_owned();
    let reject = |reason: String| Decision::Reject {
        id: id.clone(),
        reason,
    };
    if id.len() > MAX_ID_LEN {
        return reject(format!("`{ID_KEY}` is longer than {MAX_ID_LEN} characters"));
    }
    match data.get(REQUESTED_AT_KEY).map(|s| s.trim()) {
        None | Some("") => {
            return reject(format!(
                "`{REQUESTED_AT_KEY}` is missing; set it to the RFC 3339 time of the request"
            ));
        }
        Some(text) => match text.parse::<Timestamp>() {
            Err(_) => {
                return reject(format!(
                    "`{REQUESTED_AT_KEY}` is {text:?}, expected an RFC 3339 time"
                ));
            }
            Ok(at) => {
                let age = now.duration_since(at).as_secs();
                if let Err(reason) = check_request_age(age, &at.to_string()) {
                    return reject(reason);
                }
            }
        },
    }
    let target = data
        .get(TARGET_KEY)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    let command = match data.get(COMMAND_KEY).map(|s| s.trim()) {
        Some("pause") => Command::Pause,
        Some("resume") => Command::Resume,
        Some("switchover") => match target {
            None => {
                return reject(format!(
                    "a switchover needs `{TARGET_KEY}`: the cluster to become active"
                ));
            }
            Some(t) if check_cluster_name(t).is_err() => {
                return reject(format!(
                    "`{TARGET_KEY}` {t:?} is not a cluster name (a DNS label: lowercase letters, \
                     digits and '-', at most 63)"
                ));
            }
            Some(t) => Command::Switchover {
                target: t.to_owned(),
            },
        },
        None | Some("") => return reject(format!("`{COMMAND_KEY}` is missing")),
        Some(other) => {
            return reject(format!(
                "`{COMMAND_KEY}` is {other:?}; expected switchover, pause or resume"
            ));
        }
    };
    Decision::Forward { id, command }
}

/// The controller's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The HA loop has the command (the state machine may still refuse it,
    /// with a `CommandRefused` Event).
    Accepted,
    /// Refused without forwarding, with why.
    Rejected(String),
}

impl Outcome {
    /// The value of [`RESULT_KEY`].
    pub fn encode(&self) -> String {
        match self {
            Outcome::Accepted => ACCEPTED.to_owned(),
            Outcome::Rejected(why) => format!("{REJECTED_PREFIX}{why}"),
        }
    }

    /// Reads a [`RESULT_KEY`] value. Anything but an acceptance is a
    /// refusal; one this version cannot read says so.
    pub fn decode(text: &str) -> Self {
        let text = text.trim();
        if text == ACCEPTED {
            Outcome::Accepted
        } else if let Some(why) = text.strip_prefix(REJECTED_PREFIX.trim_end()) {
            Outcome::Rejected(why.trim().to_owned())
        } else {
            Outcome::Rejected(format!(
                "the controller answered {text:?}, which this cwctl cannot read"
            ))
        }
    }

    /// The answer's keys for request `id`, answered `at`: merged into the
    /// request ConfigMap beside the request.
    pub fn answer_data(&self, id: &str, at: Timestamp) -> BTreeMap<String, String> {
        BTreeMap::from([
            (HANDLED_ID_KEY.to_owned(), id.to_owned()),
            (RESULT_KEY.to_owned(), self.encode()),
            (HANDLED_AT_KEY.to_owned(), at.to_string()),
        ])
    }

    /// The answer to request `id` in the request ConfigMap's `data`; `None`
    /// while it is not answered.
    pub fn of(data: &BTreeMap<String, String>, id: &str) -> Option<Self> {
        if data.get(HANDLED_ID_KEY).map(|s| s.trim()) != Some(id) {
            return None;
        }
        Some(Self::decode(
            data.get(RESULT_KEY).map_or("", String::as_str),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_filed_too_long_ago_or_too_far_ahead_are_refused() {
        assert!(check_request_age(0, "t").is_ok());
        assert!(check_request_age(300, "t").is_ok());
        assert!(check_request_age(-60, "t").is_ok());
        let e = check_request_age(301, "t").unwrap_err();
        assert!(e.contains("send it again"), "{e}");
        // Issue 17: a request from the future was accepted, whatever its date.
        let e = check_request_age(-61, "2027-01-01T00:00:00Z").unwrap_err();
        assert!(
            e.contains("`requestedAt` 2027-01-01T00:00:00Z is 61s in the future"),
            "{e}"
        );
        assert!(check_request_age(i64::MIN, "t").is_err());
        assert!(check_request_age(i64::MAX, "t").is_err());
    }

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().expect("time")
    }

    fn req(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut d: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        d.entry(REQUESTED_AT_KEY.to_owned())
            .or_insert_with(|| "2026-11-24T11:59:58Z".to_owned());
        d
    }

    fn rejected(d: Decision) -> String {
        match d {
            Decision::Reject { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_requests_are_forwarded() {
        assert_eq!(
            decide(
                &req(&[("command", "switchover"), ("target", "west"), ("id", "a1")]),
                now()
            ),
            Decision::Forward {
                id: "a1".into(),
                command: Command::Switchover {
                    target: "west".into()
                }
            }
        );
        assert_eq!(
            decide(&req(&[("command", "pause"), ("id", "a2")]), now()),
            Decision::Forward {
                id: "a2".into(),
                command: Command::Pause
            }
        );
        assert_eq!(
            decide(&req(&[("command", "resume"), ("id", "a3")]), now()),
            Decision::Forward {
                id: "a3".into(),
                command: Command::Resume
            }
        );
    }

    #[test]
    fn handled_and_anonymous_requests_are_ignored() {
        let d = req(&[("command", "pause"), ("id", "a1"), ("handledId", "a1")]);
        assert_eq!(decide(&d, now()), Decision::Ignore);
        assert_eq!(
            decide(&req(&[("command", "pause")]), now()),
            Decision::Ignore
        );
        assert_eq!(decide(&BTreeMap::new(), now()), Decision::Ignore);
    }

    #[test]
    fn bad_requests_are_rejected_with_the_key_named() {
        let r = rejected(decide(&req(&[("command", "reboot"), ("id", "x")]), now()));
        assert!(r.contains("`command`") && r.contains("reboot"), "{r}");
        let r = rejected(decide(&req(&[("id", "x")]), now()));
        assert!(r.contains("`command` is missing"), "{r}");
        let r = rejected(decide(
            &req(&[("command", "switchover"), ("id", "x")]),
            now(),
        ));
        assert!(r.contains("`target`"), "{r}");
        let r = rejected(decide(
            &req(&[("command", "switchover"), ("target", "West!"), ("id", "x")]),
            now(),
        ));
        assert!(r.contains("not a cluster name"), "{r}");
        let r = rejected(decide(
            &req(&[
                ("command", "pause"),
                ("id", "x"),
                ("requestedAt", "yesterday"),
            ]),
            now(),
        ));
        assert!(r.contains("`requestedAt`"), "{r}");
        let long = "x".repeat(MAX_ID_LEN + 1);
        let r = rejected(decide(&req(&[("command", "pause"), ("id", &long)]), now()));
        assert!(r.contains("`id`"), "{r}");
    }

    #[test]
    fn stale_requests_are_rejected() {
        let r = rejected(decide(
            &req(&[
                ("command", "pause"),
                ("id", "x"),
                ("requestedAt", "2026-11-24T11:00:00Z"),
            ]),
            now(),
        ));
        assert!(r.contains("send it again"), "{r}");
    }

    /// Issue 17: a request dated in the future was forwarded, however far
    /// ahead; now only within the clock skew allowed.
    #[test]
    fn requests_from_the_future_are_rejected_beyond_the_skew() {
        let at = |t: &str| req(&[("command", "pause"), ("id", "x"), ("requestedAt", t)]);
        assert!(matches!(
            decide(&at("2026-11-24T12:01:00Z"), now()),
            Decision::Forward { .. }
        ));
        let r = rejected(decide(&at("2026-11-24T12:01:01Z"), now()));
        assert!(r.contains("61s in the future"), "{r}");
        let r = rejected(decide(&at("2099-01-01T00:00:00Z"), now()));
        assert!(r.contains("`requestedAt`") && r.contains("clock"), "{r}");
    }

    /// A switchover target is a cluster name by the HA configuration's rule
    /// (a DNS label), not any DNS name.
    #[test]
    fn switchover_targets_are_dns_labels() {
        let to = |t: &str| req(&[("command", "switchover"), ("target", t), ("id", "x")]);
        assert!(matches!(
            decide(&to("west-2"), now()),
            Decision::Forward { .. }
        ));
        for bad in ["west.example", "-west", &"w".repeat(64)] {
            let r = rejected(decide(&to(bad), now()));
            assert!(r.contains("not a cluster name"), "{bad}: {r}");
        }
    }

    #[test]
    fn what_cwctl_files_the_controller_forwards() {
        for command in [
            Command::Switchover {
                target: "west".into(),
            },
            Command::Pause,
            Command::Resume,
        ] {
            let r = CommandRequest {
                command: command.clone(),
                id: "r1".into(),
                requested_at: now(),
            };
            assert_eq!(
                decide(&r.to_data(), now()),
                Decision::Forward {
                    id: "r1".into(),
                    command
                }
            );
        }
    }

    #[test]
    fn an_answer_reads_back_and_marks_its_request_handled() {
        let r = CommandRequest {
            command: Command::Pause,
            id: "r1".into(),
            requested_at: now(),
        };
        for outcome in [
            Outcome::Accepted,
            Outcome::Rejected("paused already".into()),
        ] {
            let mut d = r.to_data();
            assert_eq!(Outcome::of(&d, "r1"), None, "not answered yet");
            d.extend(outcome.answer_data("r1", now()));
            assert_eq!(Outcome::of(&d, "r1"), Some(outcome));
            assert_eq!(Outcome::of(&d, "r0"), None, "another request's answer");
            assert_eq!(decide(&d, now()), Decision::Ignore, "handled: not again");
        }
        let odd = Outcome::decode("done");
        assert!(
            matches!(&odd, Outcome::Rejected(why) if why.contains("\"done\"")),
            "{odd:?}"
        );
    }
}
