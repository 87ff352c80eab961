//! Whether this cluster's service pods are meant to serve: the one fact the
//! health evaluation needs from the HA side, to tell a pod held at the
//! init-gate on a standby (as it should be) from one stuck there.

/// Whether this cluster's service pods are meant to serve, and since when;
/// set by whatever turns serving on and off (the HA loop), read at each
/// evaluation to decide what a pod waiting at the init-gate counts as.
#[derive(Debug, Default)]
pub struct ServingStance {
    since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ServingStance {
    /// Records that service pods now serve (or not).
    pub fn set(&self, serving: bool) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match (serving, *since) {
            (true, None) => *since = Some(std::time::Instant::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }

    /// The stance for the core's health evaluation.
    pub fn get(&self) -> counterweight_core::health::Stance {
        let since = *self.since.lock().unwrap_or_else(|p| p.into_inner());
        match since {
            None => counterweight_core::health::Stance::Standby,
            Some(t) => counterweight_core::health::Stance::Serving {
                for_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
        }
    }
}
