//! Helpers shared by Counterweight's end-to-end tests: bounded polling, test
//! logging and common fixtures. The tests themselves live in `tests/`.

pub mod ems;
pub mod fixtures;
pub mod ha;
pub mod realgroup;
pub mod workload;
pub mod workload_group;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns `Some`, or panics with `what`
/// and the last observation after `timeout`. Never sleeps as synchronization:
/// the loop ends as soon as the condition holds.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, every: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    eventually_explained(what, timeout, every, check, || async { String::new() }).await
}

/// [`eventually`], with `explain` run once on a timeout and its text added
/// to the panic: for diagnostics (process logs, whole records) too costly
/// to gather on every poll.
pub async fn eventually_explained<T, F, Fut, E, EFut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
    explain: E,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = String>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no observation yet");
    loop {
        match check().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            let more = explain().await;
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}{more}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Sends test logs to the captured test output; idempotent.
///
/// kube's client logs every failed request at ERROR; the harness's
/// readiness polls fail on purpose while an apiserver starts, and those
/// hundreds of lines buried the one panic message that mattered in CI.
/// Failed requests still reach the tests as errors.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
            }),
        )
        .with_test_writer()
        .try_init();
}
