//! What a member persists and restarts from: its role, epoch, latest vote
//! and pause flag, and their encoding in the state ConfigMap.

use super::*;

/// The latest vote a member gave.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// Epoch voted in.
    pub epoch: u64,
    /// Member voted for.
    pub to: String,
}

/// What a member persists (the state ConfigMap) and restarts from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persisted {
    /// Active or standby (the witness is always standby).
    pub role: Role,
    /// For an active, the epoch it is active in; for a standby, the highest
    /// epoch it knows an active was in.
    pub epoch: u64,
    /// The latest vote given; keeps a restarted voter from voting twice in
    /// one epoch.
    pub vote: Option<Vote>,
    /// Automatic failover is paused by an operator.
    pub paused: bool,
}

impl Persisted {
    /// The record a member starts from when it has none: standby, epoch 0.
    pub fn initial() -> Self {
        Self {
            role: Role::Standby,
            epoch: 0,
            vote: None,
            paused: false,
        }
    }

    /// Role and epoch, as the init-gate and `cwctl` read them.
    pub fn role_epoch(&self) -> RoleEpoch {
        RoleEpoch {
            role: self.role,
            epoch: self.epoch,
        }
    }

    /// Reads the record from state ConfigMap data. Any malformed key is an
    /// error: the caller then restarts as if the record were lost (standby,
    /// and no vote for one lease), never as active.
    pub fn from_data(
        data: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<Self, StateError> {
        let re = RoleEpoch::from_data(data)?;
        let data = data.ok_or(StateError::NoData)?;
        let vote = match data.get(VOTE_KEY).map(|v| v.trim()) {
            None | Some("") => None,
            Some(text) => Some(
                serde_json::from_str(text).map_err(|_| StateError::BadValue {
                    key: VOTE_KEY,
                    value: text.to_owned(),
                    expected: r#"JSON like {"epoch":3,"to":"east"}"#,
                })?,
            ),
        };
        let paused = match data.get(PAUSED_KEY).map(|v| v.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(StateError::BadValue {
                    key: PAUSED_KEY,
                    value: other.to_owned(),
                    expected: "`true` or `false`",
                });
            }
        };
        Ok(Self {
            role: re.role,
            epoch: re.epoch,
            vote,
            paused,
        })
    }

    /// Writes the record into state ConfigMap data, leaving other keys alone.
    pub fn write_to(&self, data: &mut std::collections::BTreeMap<String, String>) {
        self.role_epoch().write_to(data);
        match &self.vote {
            Some(v) => {
                // A two-field struct of a string and an integer always serializes.
                let json = serde_json::to_string(v).unwrap_or_default();
                data.insert(VOTE_KEY.to_owned(), json);
            }
            None => {
                data.remove(VOTE_KEY);
            }
        }
        data.insert(PAUSED_KEY.to_owned(), self.paused.to_string());
    }
}
