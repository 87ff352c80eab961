//! Entry point of `cwctl` (also usable as the kubectl plugin `kubectl cw`;
//! see the library documentation).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = counterweight_cli::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut stdout = std::io::stdout();
    match counterweight_cli::run(&args, &mut stdout).await? {
        counterweight_cli::Outcome::Ok => Ok(std::process::ExitCode::SUCCESS),
        // Failed checks were printed with their hints; only the exit code is left.
        counterweight_cli::Outcome::ChecksFailed => Ok(std::process::ExitCode::FAILURE),
    }
}
