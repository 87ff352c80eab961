//! Log set-up: human-readable lines, filtered by `RUST_LOG`, colour codes
//! only when a person is looking.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// Where a binary's logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Standard output: the servers, whose stdout is the pod log.
    Stdout,
    /// Standard error: command-line tools, whose stdout is their answer.
    Stderr,
}

/// The filter from `RUST_LOG`, or `default` (same syntax, e.g. `"info"` or
/// `"warn,kube_client=off"`) when it is unset or unreadable.
pub fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// A subscriber writing one `fmt` line per event to `writer` through
/// `filter`, with ANSI colours only when `ansi`. In a pod, stdout is a pipe
/// to the container runtime, and escape codes there only garble the lines
/// and cost formatting on every request. Public so that the benches log
/// exactly as the binaries do, into a writer of their own.
pub fn subscriber<W>(
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .finish()
}

/// Installs the process's subscriber: `RUST_LOG` or `default`, to
/// `output`, with colour codes only if `output` is a terminal (in a pod
/// they litter the logs).
pub fn init(default: &str, output: Output) {
    use std::io::IsTerminal;
    match output {
        Output::Stdout => {
            let ansi = std::io::stdout().is_terminal();
            subscriber(filter(default), std::io::stdout, ansi).init();
        }
        Output::Stderr => {
            let ansi = std::io::stderr().is_terminal();
            subscriber(filter(default), std::io::stderr, ansi).init();
        }
    }
}
