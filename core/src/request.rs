//! The operator command request: how `cwctl` asks a controller to switch
//! over, pause or resume, and how the controller answers.
//!
//! The request is a ConfigMap that `cwctl` files and the controller
//! validates, forwards to its state machine and answers in place. Both sides
//! use these names, so they cannot drift apart, and [`check_request_age`]
//! is the one rule on when a request was filed.

use std::time::Duration;

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
}
