//! How long the HA loop and the writers beside it wait for the API server,
//! derived from the HA configuration's timings.

use std::time::Duration;

use counterweight_core::ha::HaConfig;

/// The longest the HA loop waits for one API call: `marginMs`, the slack
/// the lease keeps for exactly such delays (at least 100 ms).
pub fn api_timeout(config: &HaConfig) -> Duration {
    Duration::from_millis(config.margin_ms.max(100))
}

/// The longest a writer beside the HA loop (the informational keys, the
/// serving lease) waits for one write: half a lease, never less than
/// [`api_timeout`]. Nothing waits on these writes, so the loop's margin is
/// no reason to give up on them: on an API server that answers in 400 ms,
/// a 300 ms bound abandoned every write (which the server may still carry
/// out) and sent the next at once, so nothing ever got through and the
/// load only grew. Half a lease still lets a newer value follow before the
/// published one runs out.
pub fn beside_timeout(config: &HaConfig) -> Duration {
    Duration::from_millis(config.lease_ms / 2).max(api_timeout(config))
}

/// Pause after a failed or timed-out write beside the loop, before the
/// next: a struggling API server is not sent the next request at once.
pub const BESIDE_RETRY: Duration = Duration::from_millis(100);
