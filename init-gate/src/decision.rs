//! What one observation of the state ConfigMap means for the gate.
//!
//! This is the whole FIG. 6 stage 620 decision ("is the cluster active?") as
//! pure functions, so it can be tested without a cluster: the wait loop only
//! feeds observations in and acts on the [`Decision`]. The rule is
//! deliberately one-sided: only a well-formed record that says `active`
//! releases the pod; every other observation, including every error, is a
//! [`WaitReason`].

use std::fmt;

use counterweight_core::state::{Role, RoleEpoch, StateError};
use k8s_openapi::api::core::v1::ConfigMap;

/// What the gate does after an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The cluster is active in `epoch`: let the pod start (FIG. 6 stage 640).
    Release {
        /// The epoch the cluster is active in; written to the epoch file.
        epoch: u64,
    },
    /// Keep the pod blocked (FIG. 6 stage 630), for this reason.
    Wait(WaitReason),
}

/// Why the gate keeps waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// The record says standby.
    Standby {
        /// The epoch of the standby record.
        epoch: u64,
    },
    /// The state ConfigMap does not exist (yet, or any more).
    Missing,
    /// The state ConfigMap exists but cannot be read as a state record.
    Malformed(StateError),
    /// The API server refused the gate's identity (401) or its permissions (403).
    Forbidden {
        /// HTTP status code, 401 or 403.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// Any other error status from the API server.
    Api {
        /// HTTP status code.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// The API server could not be reached or the connection broke.
    Unreachable(String),
}

impl WaitReason {
    /// Identifies the *kind* of reason for log rate limiting.
    ///
    /// Two reasons with the same key are "the same reason" and are logged at
    /// most once per period. Transport errors are keyed by kind only, since
    /// their text varies from retry to retry (ports, timings) while meaning
    /// the same thing; a standby record is keyed by its epoch so that a new
    /// epoch is logged at once.
    pub fn key(&self) -> String {
        match self {
            WaitReason::Standby { epoch } => format!("standby/{epoch}"),
            WaitReason::Missing => "missing".to_owned(),
            WaitReason::Malformed(e) => format!("malformed/{e}"),
            WaitReason::Forbidden { code, .. } => format!("forbidden/{code}"),
            WaitReason::Api { code, .. } => format!("api/{code}"),
            WaitReason::Unreachable(_) => "unreachable".to_owned(),
        }
    }

    /// Whether this is the normal standby wait rather than a problem.
    pub fn is_standby(&self) -> bool {
        matches!(self, WaitReason::Standby { .. })
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::Standby { epoch } => write!(f, "standby (epoch {epoch})"),
            WaitReason::Missing => f.write_str("the state ConfigMap does not exist"),
            WaitReason::Malformed(e) => write!(f, "the state ConfigMap is malformed: {e}"),
            WaitReason::Forbidden { code, message } => write!(
                f,
                "the API server refused access ({code}): {message}; check the gate's RoleBinding"
            ),
            WaitReason::Api { code, message } => {
                write!(f, "the API server answered {code}: {message}")
            }
            WaitReason::Unreachable(e) => write!(f, "the API server is unreachable: {e}"),
        }
    }
}

/// Decides from the current state ConfigMap, `None` meaning it does not exist.
pub fn decide(cm: Option<&ConfigMap>) -> Decision {
    let Some(cm) = cm else {
        return Decision::Wait(WaitReason::Missing);
    };
    match RoleEpoch::from_data(cm.data.as_ref()) {
        Ok(RoleEpoch {
            role: Role::Active,
            epoch,
        }) => Decision::Release { epoch },
        Ok(RoleEpoch {
            role: Role::Standby,
            epoch,
        }) => Decision::Wait(WaitReason::Standby { epoch }),
        Err(e) => Decision::Wait(WaitReason::Malformed(e)),
    }
}

/// Classifies a failed API request as a reason to wait.
///
/// A 404 is the missing ConfigMap (the polling fallback reads it by name);
/// everything else without an HTTP status is a transport problem.
pub fn classify(err: &kube::Error) -> WaitReason {
    match err {
        kube::Error::Api(status) => from_status(status.code, &status.message),
        other => WaitReason::Unreachable(with_sources(other)),
    }
}

/// An error and its chain of causes, so that "client error (Connect)" comes
/// with the "Connection refused" that explains it.
fn with_sources(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    // Bounded: error chains are short, and a cyclic one must not hang the gate.
    for _ in 0..8 {
        let Some(c) = cause else { break };
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// Classifies a watcher error as a reason to wait.
pub fn classify_watch(err: &kube::runtime::watcher::Error) -> WaitReason {
    use kube::runtime::watcher::Error as W;
    match err {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => classify(e),
        W::WatchError(status) => from_status(status.code, &status.message),
        other => WaitReason::Unreachable(with_sources(other)),
    }
}

/// Whether a watcher error is routine resynchronisation, not a failure.
///
/// `410 Gone` means the watch's resource version was compacted away; the
/// watcher re-lists on its next poll, so the gate neither backs off nor
/// falls back to polling for it.
pub fn is_resync(err: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error as W;
    match err {
        W::WatchError(status) => status.code == 410,
        W::WatchFailed(kube::Error::Api(status))
        | W::WatchStartFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

fn from_status(code: u16, message: &str) -> WaitReason {
    match code {
        404 => WaitReason::Missing,
        401 | 403 => WaitReason::Forbidden {
            code,
            message: message.to_owned(),
        },
        _ => WaitReason::Api {
            code,
            message: message.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::Status;

    use super::*;

    fn cm(pairs: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn api_error(code: u16) -> kube::Error {
        let mut status = Status::failure("boom", "Reason");
        status.code = code;
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn only_a_wellformed_active_record_releases() {
        assert_eq!(
            decide(Some(&cm(&[("state", "active"), ("epoch", "7")]))),
            Decision::Release { epoch: 7 }
        );
        assert_eq!(
            decide(Some(&cm(&[("state", "standby"), ("epoch", "7")]))),
            Decision::Wait(WaitReason::Standby { epoch: 7 })
        );
        assert_eq!(decide(None), Decision::Wait(WaitReason::Missing));
    }

    #[test]
    fn malformed_records_wait_and_say_why() {
        for bad in [
            cm(&[("state", "active")]),
            cm(&[("epoch", "3")]),
            cm(&[("state", "ACTIVE"), ("epoch", "3")]),
            cm(&[("state", "active"), ("epoch", "-3")]),
            cm(&[("state", "active"), ("epoch", "three")]),
            ConfigMap::default(),
        ] {
            match decide(Some(&bad)) {
                Decision::Wait(WaitReason::Malformed(_)) => {}
                other => panic!("{bad:?} must not release, got {other:?}"),
            }
        }
    }

    #[test]
    fn api_errors_are_classified_by_status() {
        assert_eq!(classify(&api_error(404)), WaitReason::Missing);
        assert!(matches!(
            classify(&api_error(403)),
            WaitReason::Forbidden { code: 403, .. }
        ));
        assert!(matches!(
            classify(&api_error(401)),
            WaitReason::Forbidden { code: 401, .. }
        ));
        assert!(matches!(
            classify(&api_error(500)),
            WaitReason::Api { code: 500, .. }
        ));
        let transport = kube::Error::LinesCodecMaxLineLengthExceeded;
        assert!(matches!(classify(&transport), WaitReason::Unreachable(_)));
    }

    #[test]
    fn watcher_errors_unwrap_to_the_request_error() {
        use kube::runtime::watcher::Error as W;
        assert!(matches!(
            classify_watch(&W::InitialListFailed(api_error(403))),
            WaitReason::Forbidden { .. }
        ));
        let mut gone = Status::failure("too old", "Expired");
        gone.code = 410;
        let gone = W::WatchError(Box::new(gone));
        assert!(is_resync(&gone));
        assert!(!is_resync(&W::WatchStartFailed(api_error(403))));
    }

    #[test]
    fn transport_errors_carry_their_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let err = kube::Error::ReadEvents(io);
        match classify(&err) {
            WaitReason::Unreachable(text) => {
                assert!(text.contains("Connection refused"), "{text}");
                assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rate_limit_keys_group_equivalent_reasons() {
        let a = WaitReason::Unreachable("connection refused :1".into());
        let b = WaitReason::Unreachable("connection reset :2".into());
        assert_eq!(a.key(), b.key());
        assert_ne!(
            WaitReason::Standby { epoch: 1 }.key(),
            WaitReason::Standby { epoch: 2 }.key()
        );
        assert_ne!(WaitReason::Missing.key(), a.key());
    }
}
