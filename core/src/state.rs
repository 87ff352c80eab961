//! The state record a cluster publishes in its `counterweight-state` ConfigMap.
//!
//! The ConfigMap is the contract between the controller (its only writer),
//! the init-gate (which waits for `state: active`), `cwctl` and operators
//! reading it with `kubectl`. Keys are flat strings so that
//! `kubectl get cm counterweight-state -o yaml` reads well; structured parts
//! (health explanation, peers, last transition) are JSON under their own key.
//! Parsing is strict: anything unexpected is an error that names the key, and
//! callers treat an unreadable record as "not active".

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// ConfigMap key holding the [`Role`] (`active` or `standby`).
pub const STATE_KEY: &str = "state";
/// ConfigMap key holding the epoch, a decimal `u64`.
pub const EPOCH_KEY: &str = "epoch";

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
}
