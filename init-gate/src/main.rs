//! Entry point of `counterweight-gate`: flags, tracing, run, exit code.
//!
//! The runtime is single-threaded: the gate does one thing at a time, and a
//! single thread keeps its resident memory small in every service pod.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Logs at `level`, without colours (the output goes to the pod log).
///
/// kube-client logs every failed request at ERROR and kube-runtime every
/// watcher error at WARN; while the API server is down that is a line per
/// retry. The gate reports each distinct reason itself, at most once a
/// minute, so those libraries are silenced unless debugging.
fn init_logging(level: Level) {
    let deps = if matches!(level, Level::DEBUG | Level::TRACE) {
        LevelFilter::from_level(level)
    } else {
        LevelFilter::OFF
    };
    let targets = Targets::new()
        .with_default(level)
        .with_target("kube_client", deps)
        .with_target("kube_runtime", deps);
    tracing_subscriber::registry()
        .with(fmt::layer().with_ansi(false).with_filter(targets))
        .init();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_gate::Args::parse();
    init_logging(args.log_level);
    // Register the handlers before anything else can take time, so that a
    // SIGTERM arriving while the client is being built is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping before release"),
            _ = int.recv() => tracing::info!("SIGINT: stopping before release"),
        }
    };
    if args.hold {
        return match counterweight_gate::run_hold(args, shutdown).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                tracing::error!("{e}");
                Ok(ExitCode::from(e.exit_code()))
            }
        };
    }
    match counterweight_gate::run(args, shutdown).await {
        Ok(_) => Ok(ExitCode::from(counterweight_gate::EXIT_RELEASED)),
        Err(e) => {
            tracing::error!("{e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
