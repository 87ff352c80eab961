//! The HA configuration file: loaded and validated at start, then polled,
//! each changed version that parses handed to the HA loop. The core
//! decides what may change at run time; this module only reads.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::ha::HaConfig;
use counterweight_reload::{Reload, Watched};

use crate::Error;

/// The HA configuration file, followed while the controller runs.
pub type HaConfigFile = Watched<HaConfig, Error>;

/// Why the HA configuration file at `path` cannot be used.
pub(crate) fn error(path: &Path, message: impl ToString) -> Error {
    Error::HaConfigFile {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Loads the HA configuration file to follow it; the first version must
/// also validate, later ones go to the core, which decides what may change.
pub(crate) fn load(path: &Path) -> Result<(Arc<HaConfigFile>, HaConfig), Error> {
    let owned = path.to_owned();
    let file = HaConfigFile::load(vec![owned.clone()], move |files| match files {
        [text] => HaConfig::from_yaml(text).map_err(|e| error(&owned, e)),
        _ => Err(error(&owned, "expected one file")),
    })?;
    let config = (*file.current()).clone();
    config.validate().map_err(|e| error(path, e))?;
    Ok((Arc::new(file), config))
}

/// Polls the HA configuration file every `every` (a mounted ConfigMap
/// changes by a symlink swap, which a poll sees and inotify on the path
/// does not) and hands each changed version that parses to the HA loop. The
/// core decides what may change at run time and records an Event either
/// way; a file that does not parse is logged, and the last good one stays.
/// Ends when the HA loop is gone.
pub(crate) async fn follow(
    file: Arc<HaConfigFile>,
    mut current: HaConfig,
    updates: tokio::sync::mpsc::Sender<HaConfig>,
    every: Duration,
) {
    let path = file.path().display().to_string();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = updates.closed() => return,
            _ = tick.tick() => {}
        }
        match file.poll().await {
            Reload::Unchanged => {}
            Reload::Unreadable(e) => {
                tracing::warn!(%path, error = %e, "cannot read the HA config; keeping the one in force");
            }
            Reload::Rejected(e) => tracing::warn!(
                %path,
                error = %e,
                "the HA config file does not parse; keeping the one in force"
            ),
            Reload::Swapped => {
                let config = (*file.current()).clone();
                // A reformatted file with the same content is no change.
                if config == current {
                    continue;
                }
                tracing::info!(%path, "HA config file changed");
                current = config.clone();
                if updates.send(config).await.is_err() {
                    return;
                }
            }
        }
    }
}
