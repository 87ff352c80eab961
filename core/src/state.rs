//! The state record a cluster publishes in its `counterweight-state`
//! ConfigMap, and its one codec.
//!
//! The ConfigMap is the contract between the controller (its only writer),
//! the init-gate (which waits for `state: active`), `cwctl` and operators
//! reading it with `kubectl`. Keys are flat strings so that
//! `kubectl get cm counterweight-state -o yaml` reads well; structured parts
//! (health explanation, HA view, last transition) are JSON under their own
//! key.
//!
//! This module owns every key ([`KEYS`]) and every value's encoding: the
//! protocol's part ([`Persisted`]: role, epoch, vote, paused), which the
//! HA loop persists and restarts from, and the informational parts
//! ([`Part`]: [`HaView`], [`Transition`], the health report, the policy
//! status, the serving flag), each written by one task of the controller.
//! Readers decode through [`StateRecord`], which says what it could not
//! read instead of showing it as absent. Parsing of the protocol's part is
//! strict: anything unexpected is an error that names the key, and callers
//! treat an unreadable record as "not active".
//!
//! [`Persisted`]: crate::ha::Persisted

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ha::Persisted;
use crate::health::HealthReport;

/// ConfigMap key holding the [`Role`] (`active` or `standby`).
pub const STATE_KEY: &str = "state";
/// ConfigMap key holding the epoch, a decimal `u64`.
pub const EPOCH_KEY: &str = "epoch";
/// ConfigMap key of the latest vote, JSON like `{"epoch":3,"to":"east"}`;
/// absent when there is none.
pub const VOTE_KEY: &str = "vote";
/// ConfigMap key of the paused flag, `true` or `false`.
pub const PAUSED_KEY: &str = "paused";
/// ConfigMap key of the HA loop's published [`HaView`], JSON.
pub const HA_KEY: &str = "ha";
/// ConfigMap key of the last [`Transition`], JSON.
pub const TRANSITION_KEY: &str = "lastTransition";
/// ConfigMap key of the health report ([`HealthReport`]), JSON.
pub const HEALTH_KEY: &str = "health";
/// ConfigMap key of the one-line status of the policy in force.
pub const POLICY_STATUS_KEY: &str = "policy";
/// ConfigMap key of the serving effect last applied to the service pods,
/// `true` or `false` (the HA view's `serving` is the node's intent).
pub const SERVING_KEY: &str = "serving";

/// Every key of the state record: the protocol's ([`STATE_KEY`],
/// [`EPOCH_KEY`], [`VOTE_KEY`], [`PAUSED_KEY`]) and the informational
/// ones. A key outside this list is reported by [`StateRecord`].
pub const KEYS: [&str; 9] = [
    STATE_KEY,
    EPOCH_KEY,
    VOTE_KEY,
    PAUSED_KEY,
    HA_KEY,
    TRANSITION_KEY,
    HEALTH_KEY,
    POLICY_STATUS_KEY,
    SERVING_KEY,
];

/// Whether a cluster serves (active) or waits (standby).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The one cluster that serves.
    Active,
    /// Runs, replicates, does not serve.
    Standby,
}

impl Role {
    /// The lowercase name used in the ConfigMap and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Role::Active),
            "standby" => Ok(Role::Standby),
            other => Err(StateError::BadValue {
                key: STATE_KEY,
                value: other.to_owned(),
                expected: "`active` or `standby`",
            }),
        }
    }
}

/// Why a state record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The ConfigMap has no data at all.
    #[error(
        "the state ConfigMap has no data; the controller recreates it, or it was emptied by hand"
    )]
    NoData,
    /// A required key is absent.
    #[error("the state ConfigMap lacks key `{0}`")]
    MissingKey(&'static str),
    /// A key holds something that does not parse.
    #[error("key `{key}` holds {value:?}, expected {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// What it held.
        value: String,
        /// What would have been valid.
        expected: &'static str,
    },
    /// A JSON part does not decode (a field missing, unknown or of the
    /// wrong type): written by another version, or edited by hand.
    #[error(
        "key `{key}` does not decode: {reason}; a controller and cwctl of different versions, or an edit by hand"
    )]
    BadJson {
        /// The key.
        key: &'static str,
        /// What serde said, naming the field.
        reason: String,
    },
    /// A key no part of this version knows.
    #[error("unknown key `{0}`: written by a newer controller, or by hand")]
    UnknownKey(String),
}

/// The part of the record every reader needs: role and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleEpoch {
    /// Active or standby.
    pub role: Role,
    /// The epoch the role was taken in.
    pub epoch: u64,
}

impl RoleEpoch {
    /// Reads role and epoch from ConfigMap data.
    pub fn from_data(data: Option<&BTreeMap<String, String>>) -> Result<Self, StateError> {
        let data = data.ok_or(StateError::NoData)?;
        let role = data
            .get(STATE_KEY)
            .ok_or(StateError::MissingKey(STATE_KEY))?
            .trim()
            .parse()?;
        let epoch_text = data
            .get(EPOCH_KEY)
            .ok_or(StateError::MissingKey(EPOCH_KEY))?;
        let epoch = epoch_text
            .trim()
            .parse()
            .map_err(|_| StateError::BadValue {
                key: EPOCH_KEY,
                value: epoch_text.clone(),
                expected: "a non-negative integer",
            })?;
        Ok(Self { role, epoch })
    }

    /// Writes role and epoch into ConfigMap data, leaving other keys alone.
    pub fn write_to(&self, data: &mut BTreeMap<String, String>) {
        data.insert(STATE_KEY.to_owned(), self.role.to_string());
        data.insert(EPOCH_KEY.to_owned(), self.epoch.to_string());
    }
}

/// One informational part of the state record: its key and its encoding,
/// defined once for its writer and every reader.
pub trait Part: Sized {
    /// The ConfigMap key it is stored under.
    const KEY: &'static str;
    /// Its stored text.
    fn encode(&self) -> String;
    /// Reads it back; an error names the key and what is wrong.
    fn decode(text: &str) -> Result<Self, StateError>;

    /// Stores it in ConfigMap data, leaving other keys alone.
    fn write_to(&self, data: &mut BTreeMap<String, String>) {
        data.insert(Self::KEY.to_owned(), self.encode());
    }
}

/// Encodes a JSON part. The parts are plain structs of strings, numbers
/// and maps with string keys, which always serialize.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(key: &'static str, text: &str) -> Result<T, StateError> {
    serde_json::from_str(text).map_err(|e| StateError::BadJson {
        key,
        reason: e.to_string(),
    })
}

/// What the HA loop publishes for `cwctl` and operators besides role and
/// epoch (key [`HA_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaView {
    /// The node serves (its intent; [`SERVING_KEY`] is the effect).
    pub serving: bool,
    /// Lease time left when the view was written, for an active.
    pub lease_expires_in_ms: Option<u64>,
    /// Handover in progress to this cluster.
    pub handover_target: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// What this node last heard of each peer.
    pub peers: BTreeMap<String, PeerView>,
}

impl HaView {
    /// Whether `self` differs from `before` in what people act on (serving,
    /// handover, pause, a peer's role, serving, eligibility or epoch), as
    /// opposed to the ages that change at every step.
    pub fn differs_in_substance(&self, before: &HaView) -> bool {
        // Called at every step of the HA loop: compared in place.
        let same_peer = |(na, a): (&String, &PeerView), (nb, b): (&String, &PeerView)| {
            na == nb
                && (a.role, a.serving, a.eligible, a.epoch)
                    == (b.role, b.serving, b.eligible, b.epoch)
        };
        self.serving != before.serving
            || self.handover_target != before.handover_target
            || self.paused != before.paused
            || self.peers.len() != before.peers.len()
            || !self
                .peers
                .iter()
                .zip(&before.peers)
                .all(|(a, b)| same_peer(a, b))
    }

    /// Whether this view heard `peer` as an eligible standby at most
    /// `within_ms` before it was written: what an active needs of a
    /// handover's target (`candidateFreshMs`), as a reader can tell it.
    pub fn hears_eligible_standby(&self, peer: &str, within_ms: u64) -> bool {
        self.hears_standby(peer, within_ms) == Some(true)
    }

    /// Whether this view heard `peer` as a standby at most `within_ms`
    /// before it was written, and if so whether as an eligible one.
    pub fn hears_standby(&self, peer: &str, within_ms: u64) -> Option<bool> {
        self.peers
            .get(peer)
            .filter(|p| p.role == Role::Standby && p.last_heard_ms_ago <= within_ms)
            .map(|p| p.eligible)
    }
}

impl Part for HaView {
    const KEY: &'static str = HA_KEY;
    fn encode(&self) -> String {
        to_json(self)
    }
    fn decode(text: &str) -> Result<Self, StateError> {
        from_json(Self::KEY, text)
    }
}

/// One peer in the [`HaView`]: its status as it last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerView {
    /// The peer's role.
    pub role: Role,
    /// The peer serves (an active with a live lease).
    pub serving: bool,
    /// The peer is healthy enough to take over.
    pub eligible: bool,
    /// The peer's epoch.
    pub epoch: u64,
    /// How long ago it was heard from, when the view was written.
    pub last_heard_ms_ago: u64,
}

impl PeerView {
    /// The peer's status in words: `active, serving`, `standby, eligible`.
    pub fn describe(&self) -> String {
        let mut words = vec![self.role.as_str()];
        if self.serving {
            words.push("serving");
        } else if self.role == Role::Active {
            words.push("not serving");
        }
        if self.role == Role::Standby {
            words.push(if self.eligible {
                "eligible"
            } else {
                "not eligible"
            });
        }
        words.join(", ")
    }
}

/// The last change of role (key [`TRANSITION_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transition {
    /// The state machine's reason (`Promoted`, `HandedOver`, ...), the
    /// stable form of [`crate::ha::Reason::as_str`].
    pub reason: String,
    /// What happened, in words.
    pub message: String,
    /// Role after the transition.
    pub role: Role,
    /// Epoch after the transition.
    pub epoch: u64,
    /// When, RFC 3339.
    pub at: String,
}

impl Part for Transition {
    const KEY: &'static str = TRANSITION_KEY;
    fn encode(&self) -> String {
        to_json(self)
    }
    fn decode(text: &str) -> Result<Self, StateError> {
        from_json(Self::KEY, text)
    }
}

impl Part for HealthReport {
    const KEY: &'static str = HEALTH_KEY;
    fn encode(&self) -> String {
        to_json(self)
    }
    fn decode(text: &str) -> Result<Self, StateError> {
        from_json(Self::KEY, text)
    }
}

/// The one-line status of the policy in force (key [`POLICY_STATUS_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus(pub String);

impl Part for PolicyStatus {
    const KEY: &'static str = POLICY_STATUS_KEY;
    fn encode(&self) -> String {
        self.0.clone()
    }
    fn decode(text: &str) -> Result<Self, StateError> {
        Ok(Self(text.to_owned()))
    }
}

/// The serving effect last applied to the service pods (key
/// [`SERVING_KEY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingFlag(pub bool);

impl Part for ServingFlag {
    const KEY: &'static str = SERVING_KEY;
    fn encode(&self) -> String {
        self.0.to_string()
    }
    fn decode(text: &str) -> Result<Self, StateError> {
        match text.trim() {
            "true" => Ok(Self(true)),
            "false" => Ok(Self(false)),
            other => Err(StateError::BadValue {
                key: Self::KEY,
                value: other.to_owned(),
                expected: "`true` or `false`",
            }),
        }
    }
}

/// The whole state record as a reader sees it: the protocol's part, each
/// informational part that is present, and what could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRecord {
    /// Role, epoch, vote and paused; an error makes the cluster "not
    /// active" to every reader.
    pub persisted: Result<Persisted, StateError>,
    /// The HA view.
    pub ha: Option<HaView>,
    /// The serving effect.
    pub serving: Option<bool>,
    /// The health report.
    pub health: Option<HealthReport>,
    /// The policy status line.
    pub policy: Option<String>,
    /// The last transition.
    pub last_transition: Option<Transition>,
    /// Informational keys present but unreadable, and unknown keys: shown
    /// to the operator, never taken as absent in silence.
    pub unreadable: Vec<StateError>,
}

impl StateRecord {
    /// Decodes ConfigMap data. An empty value of an informational key is
    /// absent (the controller never writes one).
    pub fn from_data(data: Option<&BTreeMap<String, String>>) -> Self {
        let mut unreadable = Vec::new();
        let ha = read_part::<HaView>(data, &mut unreadable);
        let last_transition = read_part::<Transition>(data, &mut unreadable);
        let health = read_part::<HealthReport>(data, &mut unreadable);
        let policy = read_part::<PolicyStatus>(data, &mut unreadable).map(|p| p.0);
        let serving = read_part::<ServingFlag>(data, &mut unreadable).map(|s| s.0);
        if let Some(d) = data {
            unreadable.extend(
                d.keys()
                    .filter(|k| !KEYS.contains(&k.as_str()))
                    .map(|k| StateError::UnknownKey(k.clone())),
            );
        }
        Self {
            persisted: Persisted::from_data(data),
            ha,
            serving,
            health,
            policy,
            last_transition,
            unreadable,
        }
    }
}

/// Part `P` of `data`: `None` when absent or empty, and when unreadable,
/// which is then added to `unreadable`.
fn read_part<P: Part>(
    data: Option<&BTreeMap<String, String>>,
    unreadable: &mut Vec<StateError>,
) -> Option<P> {
    let text = data?.get(P::KEY)?;
    if text.trim().is_empty() {
        return None;
    }
    P::decode(text).map_err(|e| unreadable.push(e)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn reads_what_it_writes() {
        let re = RoleEpoch {
            role: Role::Active,
            epoch: 7,
        };
        let mut d = BTreeMap::new();
        re.write_to(&mut d);
        assert_eq!(RoleEpoch::from_data(Some(&d)), Ok(re));
    }

    #[test]
    fn every_malformation_names_its_key() {
        assert_eq!(RoleEpoch::from_data(None), Err(StateError::NoData));
        assert_eq!(
            RoleEpoch::from_data(Some(&data(&[("epoch", "1")]))),
            Err(StateError::MissingKey("state"))
        );
        assert_eq!(
            RoleEpoch::from_data(Some(&data(&[("state", "active")]))),
            Err(StateError::MissingKey("epoch"))
        );
        let e =
            RoleEpoch::from_data(Some(&data(&[("state", "Active"), ("epoch", "1")]))).unwrap_err();
        assert!(e.to_string().contains("`state`"), "{e}");
        let e =
            RoleEpoch::from_data(Some(&data(&[("state", "active"), ("epoch", "-1")]))).unwrap_err();
        assert!(e.to_string().contains("`epoch`"), "{e}");
    }

    /// A record with every key written by its writer.
    fn full_record() -> (
        BTreeMap<String, String>,
        Persisted,
        HaView,
        Transition,
        HealthReport,
    ) {
        use crate::ha::Vote;
        use crate::health::{ComponentHealth, Verdict};
        let persisted = Persisted {
            role: Role::Active,
            epoch: 4,
            vote: Some(Vote {
                epoch: 4,
                to: "east".to_owned(),
            }),
            paused: true,
        };
        let view = HaView {
            serving: true,
            lease_expires_in_ms: Some(1200),
            handover_target: Some("west".to_owned()),
            paused: true,
            peers: BTreeMap::from([(
                "west".to_owned(),
                PeerView {
                    role: Role::Standby,
                    serving: false,
                    eligible: true,
                    epoch: 4,
                    last_heard_ms_ago: 150,
                },
            )]),
        };
        let transition = Transition {
            reason: crate::ha::Reason::Promoted.as_str().to_owned(),
            message: "active in epoch 4".to_owned(),
            role: Role::Active,
            epoch: 4,
            at: "2026-12-05T07:00:00Z".to_owned(),
        };
        let health = HealthReport {
            score: 0.5,
            threshold: 0.6,
            retries: 1,
            retry_count: 2,
            verdict: Verdict::Abnormal { retry_count: 2 },
            components: vec![ComponentHealth {
                name: "web".to_owned(),
                weight: 0.5,
                up: false,
                ready: 0,
                required: 1,
                selected: 1,
                failing: Some("0 of 1 pods up".to_owned()),
                passed: Vec::new(),
            }],
            data_behind: Vec::new(),
            data: vec!["db: 1 of 1 pods up".to_owned()],
        };
        let mut d = BTreeMap::new();
        persisted.write_to(&mut d);
        view.write_to(&mut d);
        transition.write_to(&mut d);
        health.write_to(&mut d);
        PolicyStatus("version 3: 3 components".to_owned()).write_to(&mut d);
        ServingFlag(true).write_to(&mut d);
        (d, persisted, view, transition, health)
    }

    #[test]
    fn every_key_reads_back_what_its_writer_wrote() {
        let (d, persisted, view, transition, health) = full_record();
        // Every key of the record was written, and nothing else.
        let written: Vec<&str> = d.keys().map(String::as_str).collect();
        let mut all = KEYS.to_vec();
        all.sort_unstable();
        assert_eq!(written, all);
        let r = StateRecord::from_data(Some(&d));
        assert_eq!(r.unreadable, Vec::new());
        assert_eq!(r.persisted, Ok(persisted));
        assert_eq!(r.ha, Some(view));
        assert_eq!(r.last_transition, Some(transition));
        assert_eq!(r.health, Some(health));
        assert_eq!(r.policy.as_deref(), Some("version 3: 3 components"));
        assert_eq!(r.serving, Some(true));
    }

    #[test]
    fn an_unreadable_part_or_unknown_key_is_named_not_taken_as_absent() {
        let (mut d, ..) = full_record();
        d.insert(HA_KEY.into(), r#"{"serving":true}"#.into());
        d.insert(TRANSITION_KEY.into(), "Promoted".into());
        d.insert(SERVING_KEY.into(), "yes".into());
        d.insert("servingSince".into(), "1".into());
        let r = StateRecord::from_data(Some(&d));
        assert_eq!(r.ha, None);
        assert_eq!(r.last_transition, None);
        assert_eq!(r.serving, None);
        assert!(r.persisted.is_ok(), "the protocol's part is still read");
        let said: Vec<String> = r.unreadable.iter().map(ToString::to_string).collect();
        for key in [HA_KEY, TRANSITION_KEY, SERVING_KEY, "servingSince"] {
            assert!(
                said.iter().any(|e| e.contains(&format!("`{key}`"))),
                "{key} not named in {said:?}"
            );
        }
        // A field of the view this version does not know is named too.
        let (mut d, ..) = full_record();
        let mut v: serde_json::Value = serde_json::from_str(&d[HA_KEY]).expect("json");
        v["leaseHolder"] = "east".into();
        d.insert(HA_KEY.into(), v.to_string());
        let said = StateRecord::from_data(Some(&d)).unreadable[0].to_string();
        assert!(
            said.contains("leaseHolder") && said.contains("`ha`"),
            "{said}"
        );
    }

    #[test]
    fn a_view_differs_in_substance_only_in_what_people_act_on() {
        let (_, _, view, ..) = full_record();
        let mut aged = view.clone();
        aged.lease_expires_in_ms = Some(10);
        if let Some(p) = aged.peers.get_mut("west") {
            p.last_heard_ms_ago = 900;
        }
        assert!(!aged.differs_in_substance(&view), "ages alone");
        let mut ineligible = view.clone();
        if let Some(p) = ineligible.peers.get_mut("west") {
            p.eligible = false;
        }
        assert!(ineligible.differs_in_substance(&view));
        let mut more = view.clone();
        more.peers
            .insert("witness".into(), view.peers["west"].clone());
        assert!(more.differs_in_substance(&view) && view.differs_in_substance(&more));
    }

    #[test]
    fn a_peer_is_described_in_words_not_as_debug_output() {
        let (_, _, view, ..) = full_record();
        assert_eq!(view.peers["west"].describe(), "standby, eligible");
        assert!(view.hears_eligible_standby("west", 150));
        assert!(
            !view.hears_eligible_standby("west", 149),
            "heard too long ago"
        );
        assert!(!view.hears_eligible_standby("north", 1000), "never heard");
        assert_eq!(view.hears_standby("west", 150), Some(true));
        assert_eq!(view.hears_standby("west", 149), None);
        let mut behind = view.clone();
        if let Some(p) = behind.peers.get_mut("west") {
            p.eligible = false;
        }
        assert_eq!(behind.hears_standby("west", 150), Some(false));
        assert!(!behind.hears_eligible_standby("west", 150));
    }

    #[test]
    fn reasons_keep_the_names_earlier_versions_stored() {
        use crate::ha::Reason::*;
        // Earlier versions stored `format!("{:?}", reason)`: the stable
        // names must stay those.
        for r in [
            Started,
            UnsafeConfiguration,
            Promoted,
            Fenced,
            SteppedDown,
            Recovered,
            ElectionStarted,
            ElectionFailed,
            HandoverStarted,
            HandoverReady,
            HandoverAborted,
            HandedOver,
            HandoverComplete,
            NoCandidate,
            CommandRefused,
            Paused,
            Resumed,
            ConfigApplied,
            ConfigRejected,
        ] {
            assert_eq!(r.as_str(), format!("{r:?}"));
        }
    }
}
