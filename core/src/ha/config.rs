//! Static configuration of the HA group: who the members are, their
//! priorities, the witness, and the timings every lease decision rests on.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// One cluster of the group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// Unique name; also the peer identity matched against certificate SANs.
    pub name: String,
    /// Larger is preferred. Ties are broken by the lexicographically smaller name.
    pub priority: u32,
}

/// The configuration every node of the group must share.
///
/// All durations are milliseconds of a monotonic clock. The safety argument
/// needs `lease_ms > probe_interval_ms + margin_ms` and `margin_ms` larger
/// than the worst clock-rate drift over one lease plus the time the
/// controller needs to carry out a fence (stop serving, write the state).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaConfig {
    /// All clusters, at least two.
    pub clusters: Vec<ClusterSpec>,
    /// Name of the optional witness: a voter that holds no workloads.
    #[serde(default)]
    pub witness: Option<String>,
    /// FIG. 10 probe interval; also how often an active renews its lease.
    pub probe_interval_ms: u64,
    /// How long one vote (lease grant) binds its voter.
    pub lease_ms: u64,
    /// Safety margin subtracted by the lease holder from its lease.
    pub margin_ms: u64,
    /// A standby is a handover candidate only if it answered a probe sent at
    /// most this long ago (para 0160).
    pub candidate_fresh_ms: u64,
    /// When set, a standby with a higher priority than the active that has
    /// been healthy this long gets the active role handed back to it.
    /// Unset (the default) means no preemption.
    #[serde(default)]
    pub preempt_after_ms: Option<u64>,
    /// The seed's S1012: promote when the active is silent, without a quorum
    /// of votes. Allows two actives under a partition; explicit opt-in only.
    #[serde(default)]
    pub unsafe_promote_on_silence: bool,
    /// Bound on the difference between the wall clocks of the nodes of one
    /// cluster (NTP keeps it far smaller). The serving lease published to
    /// the workload ends this much before the lease, so a pod on a node
    /// whose clock is behind still stops in time (see `crate::serving`).
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
    /// Test-only: skip fencing (keep serving on lease loss and during a
    /// handover until `changed`). Exists so the model checker can prove it
    /// detects split brain; never read from configuration files.
    #[serde(skip)]
    pub fencing_disabled_for_tests: bool,
}

fn default_max_clock_skew_ms() -> u64 {
    500
}

/// Why a configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaConfigError {
    /// Fewer than two clusters.
    #[error("`clusters` lists {0} cluster(s); at least 2 are needed")]
    TooFewClusters(usize),
    /// A name is empty.
    #[error("`clusters` or `witness` holds an empty name")]
    EmptyName,
    /// Two members share a name.
    #[error("name {0:?} appears more than once in `clusters`/`witness`")]
    DuplicateName(String),
    /// A name is not a cluster name (a DNS-1123 label), which `cwctl`,
    /// certificates and the serving lease need.
    #[error(
        "`clusters`/`witness`: {reason}; members are named by DNS labels, as `cwctl switchover --to` and the serving lease name them"
    )]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node's own name is not a member.
    #[error("this node's name {0:?} is neither in `clusters` nor the `witness`")]
    UnknownSelf(String),
    /// A duration is zero.
    #[error("`{0}` must be greater than zero")]
    Zero(&'static str),
    /// The lease cannot be renewed in time.
    #[error(
        "`leaseMs` ({lease_ms}) must exceed `probeIntervalMs` ({probe_interval_ms}) + `marginMs` ({margin_ms})"
    )]
    LeaseTooShort {
        /// Configured lease.
        lease_ms: u64,
        /// Configured probe interval.
        probe_interval_ms: u64,
        /// Configured margin.
        margin_ms: u64,
    },
    /// The workload could never be told to serve for long enough.
    #[error(
        "`leaseMs` ({lease_ms}) must exceed `probeIntervalMs` + `marginMs` + `maxClockSkewMs` \
         ({horizon}): the serving lease published to the pods ends `maxClockSkewMs` before the \
         lease, and must still reach past the next renewal"
    )]
    NoServingHorizon {
        /// Configured lease.
        lease_ms: u64,
        /// Probe interval, margin and skew together.
        horizon: u64,
    },
}

impl HaConfig {
    /// Reads an HA configuration file (YAML or JSON), bounded like every
    /// configuration (`crate::bounded`); [`HaConfig::validate`] is separate.
    pub fn from_yaml(bytes: &[u8]) -> Result<Self, crate::bounded::BoundedError> {
        crate::bounded::from_yaml_slice(bytes, crate::bounded::Limits::CONFIG)
    }

    /// A configuration with default timings: probe every second, 5 s leases
    /// with a 1 s margin, candidates fresh for 3 s, no preemption.
    pub fn new(clusters: Vec<ClusterSpec>, witness: Option<String>) -> Self {
        Self {
            clusters,
            witness,
            probe_interval_ms: 1000,
            lease_ms: 5000,
            margin_ms: 1000,
            candidate_fresh_ms: 3000,
            preempt_after_ms: None,
            unsafe_promote_on_silence: false,
            max_clock_skew_ms: default_max_clock_skew_ms(),
            fencing_disabled_for_tests: false,
        }
    }

    /// Checks the invariants the state machine relies on.
    pub fn validate(&self) -> Result<(), HaConfigError> {
        if self.clusters.len() < 2 {
            return Err(HaConfigError::TooFewClusters(self.clusters.len()));
        }
        let mut seen = BTreeSet::new();
        for name in self.member_names() {
            if name.is_empty() {
                return Err(HaConfigError::EmptyName);
            }
            crate::names::check_cluster_name(name).map_err(|reason| HaConfigError::BadName {
                name: name.to_owned(),
                reason,
            })?;
            if !seen.insert(name) {
                return Err(HaConfigError::DuplicateName(name.to_owned()));
            }
        }
        for (field, v) in [
            ("probeIntervalMs", self.probe_interval_ms),
            ("leaseMs", self.lease_ms),
            ("candidateFreshMs", self.candidate_fresh_ms),
        ] {
            if v == 0 {
                return Err(HaConfigError::Zero(field));
            }
        }
        if self.lease_ms <= self.probe_interval_ms.saturating_add(self.margin_ms) {
            return Err(HaConfigError::LeaseTooShort {
                lease_ms: self.lease_ms,
                probe_interval_ms: self.probe_interval_ms,
                margin_ms: self.margin_ms,
            });
        }
        let horizon = self
            .probe_interval_ms
            .saturating_add(self.margin_ms)
            .saturating_add(self.max_clock_skew_ms);
        if self.lease_ms <= horizon {
            return Err(HaConfigError::NoServingHorizon {
                lease_ms: self.lease_ms,
                horizon,
            });
        }
        Ok(())
    }

    /// Every member that votes on leases: all clusters, then the witness.
    pub fn member_names(&self) -> impl Iterator<Item = &str> {
        self.clusters
            .iter()
            .map(|c| c.name.as_str())
            .chain(self.witness.as_deref())
    }

    /// Whether `name` is a cluster (not the witness, not a stranger).
    pub fn is_cluster(&self, name: &str) -> bool {
        self.clusters.iter().any(|c| c.name == name)
    }

    /// Whether `name` is the group's witness.
    pub fn is_witness(&self, name: &str) -> bool {
        self.witness.as_deref() == Some(name)
    }

    /// Whether `name` is a member at all.
    pub fn is_member(&self, name: &str) -> bool {
        self.member_names().any(|n| n == name)
    }

    /// Priority of a cluster; `None` for the witness or a stranger.
    pub fn priority(&self, name: &str) -> Option<u32> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.priority)
    }

    /// Votes needed to hold a lease: a strict majority of the members, so
    /// that any two quorums share a voter. With the unsafe opt-in a node
    /// needs only itself, which is exactly what allows split brain.
    pub fn quorum(&self) -> usize {
        if self.unsafe_promote_on_silence {
            1
        } else {
            self.member_names().count() / 2 + 1
        }
    }

    /// How many clusters are preferred over `name`; orders elections so that
    /// the most preferred healthy standby tries first (para 0088).
    pub fn rank(&self, name: &str) -> usize {
        let Some(mine) = self.priority(name) else {
            return 0;
        };
        self.clusters
            .iter()
            .filter(|c| c.priority > mine || (c.priority == mine && c.name.as_str() < name))
            .count()
    }

    /// True when `a` is preferred over `b`: higher priority, then smaller name.
    pub fn prefers(&self, a: &str, b: &str) -> bool {
        let pa = self.priority(a).unwrap_or(0);
        let pb = self.priority(b).unwrap_or(0);
        pa > pb || (pa == pb && a < b)
    }

    /// Whether switching from `self` to `next` at runtime is safe: the voter
    /// set and the lease timings must stay, because quorums and promises made
    /// under the old ones are still binding.
    pub(crate) fn runtime_compatible(&self, next: &HaConfig) -> bool {
        let members = |c: &HaConfig| c.member_names().map(str::to_owned).collect::<BTreeSet<_>>();
        members(self) == members(next)
            && self.witness == next.witness
            && self.lease_ms == next.lease_ms
            && self.margin_ms == next.margin_ms
            && self.unsafe_promote_on_silence == next.unsafe_promote_on_silence
    }
}
