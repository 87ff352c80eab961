//! Entry point of `counterweight-controller`: flags, tracing, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_controller::Args::parse();
    tracing_subscriber::fmt()
        // Colour codes only for a terminal: in a pod they litter the logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Kubernetes stops pods with SIGTERM; Ctrl-C is for humans. Either way
    // the leader hands its Lease back on the way out.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    counterweight_controller::run(args, shutdown).await?;
    Ok(())
}
