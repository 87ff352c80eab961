//! Entry point of `cwctl` (also usable as the kubectl plugin `kubectl cw`;
//! see the library documentation).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_cli::Args::parse();
    // cwctl reports unreachable clusters itself; kube's own connection
    // errors would only repeat them, out of order.
    tracing_subscriber::fmt()
        // Colour codes only for a terminal: in a pod they litter the logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut stdout = std::io::stdout();
    match counterweight_cli::run(&args, &mut stdout).await {
        // Failed checks were printed with their hints, unreachable clusters
        // with their reasons; only the exit code is left.
        Ok(outcome) => Ok(ExitCode::from(outcome.exit_code())),
        // An operator-facing message, not a program fault: no backtrace.
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}
