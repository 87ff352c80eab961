//! The signal that stops a binary: SIGTERM (Kubernetes stopping the pod)
//! or SIGINT (Ctrl-C, a human).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: Kubernetes stops pods with it.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
}

impl Signal {
    /// The signal's name, as operators know it.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
        }
    }
}

/// A future that resolves with the first SIGTERM or SIGINT.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a binary calls it before anything that can take time, so
/// that a signal arriving meanwhile is not lost (the default action would
/// kill the process without its clean-up).
///
/// # Errors
///
/// The handlers could not be installed (no signal driver: the runtime was
/// built without `enable_io`).
pub fn signal_received() -> std::io::Result<impl Future<Output = Signal> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Signal::Term,
            _ = int.recv() => Signal::Int,
        }
    })
}

/// [`signal_received`], for binaries that do not care which signal came:
/// logs it and resolves.
///
/// # Errors
///
/// As [`signal_received`].
pub fn on_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let received = signal_received()?;
    Ok(async move {
        let signal = received.await;
        tracing::info!(signal = signal.as_str(), "stopping");
    })
}
