//! Entry point of `counterweight-gate`: flags, tracing, run, exit code.
//!
//! The runtime is single-threaded: the gate does one thing at a time, and a
//! single thread keeps its resident memory small in every service pod.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_gate::Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_ansi(false)
        .init();
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
    match counterweight_gate::run(args, shutdown).await {
        Ok(_) => Ok(ExitCode::from(counterweight_gate::EXIT_RELEASED)),
        Err(e) => {
            tracing::error!("{e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
