//! Entry point of `counterweight-webhook`: flags, tracing, run until SIGTERM or Ctrl-C.

use clap::Parser;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_webhook::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stdout_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    counterweight_webhook::log_subscriber(filter, std::io::stdout, stdout_is_terminal).init();
    // Kubernetes stops pods with SIGTERM; Ctrl-C is for humans.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    counterweight_webhook::run(args, shutdown).await?;
    Ok(())
}
