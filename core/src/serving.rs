//! The serving lease: the workload's own dead-man switch.
//!
//! A pod's `counterweight.dev/serving` condition outlives the controller
//! that set it. A fence that needs a live controller (or a live API server)
//! is therefore no fence: a controller that is killed, frozen, cut off from
//! its API server, or whose HA loop is gone, leaves its pods serving while a
//! peer promotes. This module owns the contract that closes that gap.
//!
//! The active's controller publishes a [`ServingLease`] in the ConfigMap
//! [`SERVING_CONFIGMAP`]: its cluster, its epoch, and a wall-clock instant
//! `until` by which every workload of the cluster must have stopped serving
//! unless a newer lease says otherwise. The lease sidecar in every service
//! pod (the init-gate binary in `hold` mode, a Kubernetes native sidecar)
//! follows that record, writes it to a file the application reads (the
//! **application contract**: serve only while the file's `until` is in the
//! future by the node's clock, and only in the epoch the pod was released
//! in), and answers its readiness probe only while the lease holds, so the
//! kubelet takes the pod out of its Service's endpoints on its own. Nothing
//! in that path needs the controller.
//!
//! # Timing argument
//!
//! Let `T` be the real time at which the active's lease ends by its own
//! monotonic clock ([`crate::ha::Node::lease_until_ms`]); the core already
//! guarantees that no voter is free to back anyone else before `T +
//! marginMs` (minus clock-rate drift over one lease, which `marginMs`
//! covers). The controller converts `T` to its node's wall clock at the
//! moment it publishes and subtracts `maxClockSkewMs` ([`publish_until`]).
//! If the wall clocks of the nodes of one cluster differ by at most
//! `maxClockSkewMs` (the **assumption**, kept by NTP or chrony; the default
//! is 500 ms), a pod's node reaches the published instant no later than
//! real time `T`: every application that keeps the contract has stopped by
//! `T`, before any other cluster can even ask for votes that could win. The
//! sidecar's readiness turns false at the same instant, and the kubelet
//! reports it within its probe period, which `marginMs` should also cover
//! for the Ready condition to be off before `T + marginMs`.
//!
//! Publishing is delayed, lost or never happens (controller dead, API
//! server down): all of that only makes the published `until` older, hence
//! earlier, which is safe. A lease is only ever published from a live lease
//! of the core, never extended beyond it, and withdrawn (set to the past)
//! as part of every fence.
//!
//! What the lease does *not* give: with the API server down, the kubelet
//! cannot publish Ready=False and kube-proxy keeps routing to the old
//! endpoints. Then only the application contract holds, and a workload that
//! does not read the lease file keeps answering. An API server outage
//! longer than the published horizon (about `leaseMs - marginMs -
//! maxClockSkewMs` ahead) stops the workload even on an active that kept
//! its lease: fail-safe, like CloudNativePG's primary that shuts down when
//! it cannot reach the API server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// ConfigMap (in the controller namespace) holding the serving lease.
/// Written only by the active's controller, read by every lease sidecar.
pub const SERVING_CONFIGMAP: &str = "counterweight-serving";
/// Key: the cluster that holds the lease.
pub const CLUSTER_KEY: &str = "cluster";
/// Key: the epoch the lease was granted in.
pub const EPOCH_KEY: &str = "epoch";
/// Key: end of the lease, milliseconds since the Unix epoch (wall clock).
/// `0` means withdrawn.
pub const UNTIL_KEY: &str = "servingUntilUnixMs";

/// A published serving lease: the right of `cluster`'s workload to serve in
/// `epoch` until `until_unix_ms` (already reduced by the clock-skew bound).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingLease {
    /// The cluster whose workload may serve.
    pub cluster: String,
    /// The epoch the cluster is active in.
    pub epoch: u64,
    /// Wall-clock end in Unix milliseconds; at or before it, serving stops.
    pub until_unix_ms: u64,
}

/// Why a serving lease record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// A required key is absent.
    #[error("the serving lease lacks key `{0}`; only the controller writes it")]
    MissingKey(&'static str),
    /// A key holds something that does not parse.
    #[error("serving lease key `{key}` holds {value:?}, expected a non-negative integer")]
    BadNumber {
        /// The key.
        key: &'static str,
        /// What it held.
        value: String,
    },
    /// The cluster is not a cluster name (empty, say): the lease file
    /// could not carry it, and no member is named so.
    #[error("serving lease key `cluster` holds {value:?}: {reason}")]
    BadCluster {
        /// What it held.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ServingLease {
    /// A withdrawn lease for `cluster` in `epoch`: nothing serves.
    pub fn withdrawn(cluster: &str, epoch: u64) -> Self {
        Self {
            cluster: cluster.to_owned(),
            epoch,
            until_unix_ms: 0,
        }
    }

    /// Reads the lease from ConfigMap data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, LeaseError> {
        let number = |key: &'static str| -> Result<u64, LeaseError> {
            let text = data.get(key).ok_or(LeaseError::MissingKey(key))?;
            text.trim().parse().map_err(|_| LeaseError::BadNumber {
                key,
                value: text.clone(),
            })
        };
        let cluster = data
            .get(CLUSTER_KEY)
            .ok_or(LeaseError::MissingKey(CLUSTER_KEY))?
            .trim();
        crate::names::check_cluster_name(cluster).map_err(|reason| LeaseError::BadCluster {
            value: cluster.to_owned(),
            reason,
        })?;
        Ok(Self {
            cluster: cluster.to_owned(),
            epoch: number(EPOCH_KEY)?,
            until_unix_ms: number(UNTIL_KEY)?,
        })
    }

    /// The ConfigMap data of this lease.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (CLUSTER_KEY.to_owned(), self.cluster.clone()),
            (EPOCH_KEY.to_owned(), self.epoch.to_string()),
            (UNTIL_KEY.to_owned(), self.until_unix_ms.to_string()),
        ])
    }

    /// The lease file's text: one line, `<epoch> <untilUnixMs> <cluster>`,
    /// so that a shell script can read it with `read epoch until cluster`.
    pub fn to_file(&self) -> String {
        format!("{} {} {}\n", self.epoch, self.until_unix_ms, self.cluster)
    }

    /// Reads the lease file written by [`ServingLease::to_file`].
    pub fn from_file(text: &str) -> Option<Self> {
        let mut parts = text.split_whitespace();
        let epoch = parts.next()?.parse().ok()?;
        let until_unix_ms = parts.next()?.parse().ok()?;
        let cluster = parts.next()?.to_owned();
        Some(Self {
            cluster,
            epoch,
            until_unix_ms,
        })
    }
}

/// Converts the core's lease end (monotonic ms, `lease_until_ms`) into the
/// wall-clock instant to publish, given the same moment on both clocks
/// (`now_ms` monotonic, `now_unix_ms` wall) and the skew bound between the
/// nodes of the cluster. Never later than the lease; saturates at 0 (past).
pub fn publish_until(lease_until_ms: u64, now_ms: u64, now_unix_ms: u64, max_skew_ms: u64) -> u64 {
    let left = lease_until_ms.saturating_sub(now_ms);
    if left <= max_skew_ms {
        return 0;
    }
    now_unix_ms.saturating_add(left - max_skew_ms)
}

/// Whether a new lease end should be published over the last one.
///
/// Withdrawals, new epochs and first leases are published at once; a
/// renewal only once it moves the end by a quarter of a lease, which bounds
/// the write rate (and the watch events every sidecar receives) to about
/// four per lease while keeping the published end at most a quarter lease
/// behind the real one.
pub fn publish_due(published: Option<&ServingLease>, next: &ServingLease, lease_ms: u64) -> bool {
    let Some(old) = published else { return true };
    if old.cluster != next.cluster || old.epoch != next.epoch {
        return true;
    }
    if next.until_unix_ms < old.until_unix_ms {
        // Shorter: a withdrawal, or a lease that lost its renewals.
        return true;
    }
    next.until_unix_ms - old.until_unix_ms >= (lease_ms / 4).max(1)
}

/// What a lease sidecar concludes about its pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Allowance {
    /// The pod may serve until this wall-clock instant (Unix ms).
    Serve {
        /// The epoch served in.
        epoch: u64,
        /// End of the right to serve.
        until_unix_ms: u64,
    },
    /// The pod must not serve now.
    Hold(HoldReason),
}

/// Why a pod must not serve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HoldReason {
    /// No lease was read yet (or it is unreadable).
    NoLease,
    /// The lease names another cluster.
    OtherCluster(String),
    /// The lease ended (or was withdrawn) at this instant.
    Expired {
        /// Its epoch.
        epoch: u64,
        /// Its end.
        until_unix_ms: u64,
    },
    /// The pod was released in another epoch than the lease's: its
    /// application started under an activation that is over, and must be
    /// restarted rather than serve (a transient active released its gate).
    OtherEpoch {
        /// Epoch of the pod's release.
        released: u64,
        /// Epoch of the lease.
        lease: u64,
    },
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldReason::NoLease => f.write_str("no serving lease has been read"),
            HoldReason::OtherCluster(c) => write!(f, "the serving lease belongs to cluster {c}"),
            HoldReason::Expired {
                epoch,
                until_unix_ms,
            } => write!(
                f,
                "the serving lease of epoch {epoch} ended at {until_unix_ms} ms (Unix)"
            ),
            HoldReason::OtherEpoch { released, lease } => write!(
                f,
                "released in epoch {released}, but the cluster serves in epoch {lease}: restart the pod"
            ),
        }
    }
}

/// The sidecar's decision: may a pod of `cluster`, released in
/// `released_epoch`, serve at `now_unix_ms` under `lease`?
pub fn allowance(
    lease: Option<&ServingLease>,
    cluster: &str,
    released_epoch: u64,
    now_unix_ms: u64,
) -> Allowance {
    let Some(lease) = lease else {
        return Allowance::Hold(HoldReason::NoLease);
    };
    if lease.cluster != cluster {
        return Allowance::Hold(HoldReason::OtherCluster(lease.cluster.clone()));
    }
    if lease.epoch != released_epoch {
        return Allowance::Hold(HoldReason::OtherEpoch {
            released: released_epoch,
            lease: lease.epoch,
        });
    }
    if now_unix_ms >= lease.until_unix_ms {
        return Allowance::Hold(HoldReason::Expired {
            epoch: lease.epoch,
            until_unix_ms: lease.until_unix_ms,
        });
    }
    Allowance::Serve {
        epoch: lease.epoch,
        until_unix_ms: lease.until_unix_ms,
    }
}

/// Whether a pod released in `released_epoch` must be restarted by the
/// controller of a cluster whose state is `active_epoch` (`None`: standby).
/// A pod past its gate runs its application: on a standby it must not, and
/// on an active only if it was released in the epoch being served.
pub fn must_restart(released_epoch: Option<u64>, active_epoch: Option<u64>) -> bool {
    match (released_epoch, active_epoch) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(r), Some(a)) => r != a,
    }
}

/// Prefix of the gate's termination message on release. The kubelet
/// copies the message into the pod's `initContainerStatuses`, which is how
/// the controller learns the epoch a pod was released in without reading
/// inside the pod.
pub const RELEASE_MESSAGE_PREFIX: &str = "released in epoch ";

/// The gate's termination message for a release in `epoch`.
pub fn release_message(epoch: u64) -> String {
    format!("{RELEASE_MESSAGE_PREFIX}{epoch}")
}

/// The epoch in a termination message written by [`release_message`];
/// `None` for anything else (an older gate, a log tail).
pub fn release_epoch(message: &str) -> Option<u64> {
    message
        .trim()
        .strip_prefix(RELEASE_MESSAGE_PREFIX)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(epoch: u64, until: u64) -> ServingLease {
        ServingLease {
            cluster: "east".into(),
            epoch,
            until_unix_ms: until,
        }
    }

    #[test]
    fn data_and_file_round_trip() {
        let l = lease(7, 1_700_000_000_123);
        assert_eq!(ServingLease::from_data(&l.to_data()), Ok(l.clone()));
        assert_eq!(ServingLease::from_file(&l.to_file()), Some(l));
        assert_eq!(ServingLease::from_file("garbage"), None);
    }

    #[test]
    fn a_bad_record_names_the_key() {
        let mut d = lease(1, 5).to_data();
        d.insert(UNTIL_KEY.into(), "soon".into());
        let e = ServingLease::from_data(&d).unwrap_err();
        assert!(e.to_string().contains(UNTIL_KEY), "{e}");
        d.remove(EPOCH_KEY);
        assert_eq!(
            ServingLease::from_data(&d),
            Err(LeaseError::MissingKey(EPOCH_KEY))
        );
    }

    /// Issue 17: an empty cluster was read as a lease (the lease file
    /// cannot carry it, and no member is named so).
    #[test]
    fn a_lease_without_a_cluster_name_is_refused() {
        for bad in ["", "  ", "east west", "East"] {
            let mut d = lease(1, 5).to_data();
            d.insert(CLUSTER_KEY.into(), bad.into());
            let e = ServingLease::from_data(&d).unwrap_err();
            assert!(matches!(e, LeaseError::BadCluster { .. }), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("`cluster`"), "{e}");
        }
    }

    #[test]
    fn the_published_end_is_the_lease_less_the_skew_never_later() {
        // 3 s of lease left, 0.5 s skew: 2.5 s ahead on the wall clock.
        assert_eq!(publish_until(13_000, 10_000, 1_000_000, 500), 1_002_500);
        // Less lease left than the skew: nothing may serve.
        assert_eq!(publish_until(10_400, 10_000, 1_000_000, 500), 0);
        assert_eq!(publish_until(9_000, 10_000, 1_000_000, 0), 0);
    }

    #[test]
    fn renewals_are_published_a_quarter_lease_at_a_time() {
        let old = lease(3, 10_000);
        assert!(publish_due(None, &old, 4_000));
        assert!(!publish_due(Some(&old), &lease(3, 10_999), 4_000));
        assert!(publish_due(Some(&old), &lease(3, 11_000), 4_000));
        // A shorter end, a withdrawal and a new epoch go out at once.
        assert!(publish_due(Some(&old), &lease(3, 9_999), 4_000));
        assert!(publish_due(Some(&old), &lease(3, 0), 4_000));
        assert!(publish_due(Some(&old), &lease(4, 10_000), 4_000));
    }

    #[test]
    fn a_pod_serves_only_in_its_epoch_of_its_cluster_before_the_end() {
        let l = lease(4, 10_000);
        assert_eq!(
            allowance(Some(&l), "east", 4, 9_999),
            Allowance::Serve {
                epoch: 4,
                until_unix_ms: 10_000
            }
        );
        assert!(matches!(
            allowance(Some(&l), "east", 4, 10_000),
            Allowance::Hold(HoldReason::Expired { .. })
        ));
        assert_eq!(
            allowance(Some(&l), "east", 2, 5_000),
            Allowance::Hold(HoldReason::OtherEpoch {
                released: 2,
                lease: 4
            })
        );
        assert!(matches!(
            allowance(Some(&l), "west", 4, 5_000),
            Allowance::Hold(HoldReason::OtherCluster(_))
        ));
        assert_eq!(
            allowance(None, "east", 4, 0),
            Allowance::Hold(HoldReason::NoLease)
        );
    }

    #[test]
    fn released_pods_restart_unless_released_in_the_served_epoch() {
        assert!(!must_restart(None, None));
        assert!(!must_restart(None, Some(3)));
        assert!(must_restart(Some(2), None));
        assert!(must_restart(Some(2), Some(4)));
        assert!(!must_restart(Some(4), Some(4)));
    }

    #[test]
    fn the_release_message_carries_the_epoch_and_nothing_else_parses() {
        assert_eq!(release_epoch(&release_message(42)), Some(42));
        assert_eq!(release_epoch("released in epoch 7\n"), Some(7));
        for other in [
            "",
            "released in epoch",
            "released in epoch x",
            "panic: boom",
            "epoch 3",
        ] {
            assert_eq!(release_epoch(other), None, "{other:?}");
        }
    }
}
