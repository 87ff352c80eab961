//! Role and epoch of the local cluster, read from the state ConfigMap: as a
//! mounted volume (one file per key: `state`, `epoch`), which only works in
//! the controller's own namespace, or through the API from any namespace
//! ([`StateSource`]); plus the highest epoch this pod has acted on.
//!
//! The ConfigMap's only writer is the controller, which writes
//! `state: active` with a new epoch only after the previous active has
//! fenced (its lease expired, or it sent FIG. 9 `change` after fencing).
//! That ordering is the precondition for promoting the local database; this
//! module only reads it. A record with a lower epoch than one already acted
//! on is stale (an old volume projection, a restored backup) and is ignored.

use std::collections::BTreeMap;
use std::path::Path;

use counterweight_core::state::{EPOCH_KEY, RoleEpoch, STATE_KEY};

use crate::SyncError;

/// Where the sidecar learns its cluster's role and epoch.
pub enum StateSource {
    /// The state ConfigMap mounted as a volume at this directory. A
    /// ConfigMap volume must come from the pod's own namespace.
    Dir(std::path::PathBuf),
    /// The state ConfigMap read through the API: works from the workload's
    /// namespace, where synchronization pods live.
    ConfigMap {
        /// Client for the ConfigMap's namespace (boxed: it is large, and
        /// read once per interval).
        api: Box<kube::Api<k8s_openapi::api::core::v1::ConfigMap>>,
        /// Its namespace, for messages.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl StateSource {
    /// Reads role and epoch once.
    pub async fn read(&self) -> Result<RoleEpoch, SyncError> {
        match self {
            StateSource::Dir(dir) => read_role_dir(dir),
            StateSource::ConfigMap {
                api,
                namespace,
                name,
            } => {
                let err = |message: String| SyncError::StateApi {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    message,
                };
                let cm = api
                    .get_opt(name)
                    .await
                    .map_err(|e| err(e.to_string()))?
                    .ok_or_else(|| err("not found (is the controller running?)".into()))?;
                RoleEpoch::from_data(cm.data.as_ref()).map_err(|e| err(e.to_string()))
            }
        }
    }
}

/// Reads role and epoch from a directory holding the ConfigMap's keys as
/// files (the layout of a ConfigMap volume, also used by tests).
pub fn read_role_dir(dir: &Path) -> Result<RoleEpoch, SyncError> {
    let mut data = BTreeMap::new();
    for key in [STATE_KEY, EPOCH_KEY] {
        let path = dir.join(key);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                data.insert(key.to_owned(), text);
            }
            // A missing key is reported by the parser, naming the key.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SyncError::io("reading the state record", path, e)),
        }
    }
    RoleEpoch::from_data(Some(&data)).map_err(|source| SyncError::State {
        dir: dir.to_owned(),
        source,
    })
}

/// Writes role and epoch into `dir` in the ConfigMap volume layout; each
/// file is replaced atomically (write then rename), as the kubelet does.
pub fn write_role_dir(dir: &Path, re: RoleEpoch) -> Result<(), SyncError> {
    let mut data = BTreeMap::new();
    re.write_to(&mut data);
    for (key, value) in data {
        write_atomic(&dir.join(key), value.as_bytes())?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` so that readers see the old or the new
/// content, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SyncError> {
    let tmp = path.with_extension("tmp-counterweight");
    std::fs::write(&tmp, bytes).map_err(|e| SyncError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SyncError::io("renaming into place", path, e))
}

/// Whether a state record should be acted on, given the highest epoch acted
/// on so far: equal or higher epochs are current, lower ones are stale.
pub fn is_current(re: RoleEpoch, applied_epoch: u64) -> bool {
    re.epoch >= applied_epoch
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::state::Role;

    #[test]
    fn round_trips_the_volume_layout_and_names_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let re = RoleEpoch {
            role: Role::Active,
            epoch: 4,
        };
        write_role_dir(dir.path(), re).unwrap();
        assert_eq!(read_role_dir(dir.path()).unwrap(), re);
        std::fs::remove_file(dir.path().join("epoch")).unwrap();
        let e = read_role_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("`epoch`"), "{e}");
    }

    #[test]
    fn lower_epochs_are_stale() {
        let re = |epoch| RoleEpoch {
            role: Role::Standby,
            epoch,
        };
        assert!(is_current(re(3), 3));
        assert!(is_current(re(4), 3));
        assert!(!is_current(re(2), 3));
    }
}
