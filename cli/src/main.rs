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
    counterweight_runtime::logging::init(
        "warn,kube_client=off",
        counterweight_runtime::logging::Output::Stderr,
    );
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
