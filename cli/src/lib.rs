//! `cwctl`: the operator's view of Counterweight across clusters.
//!
//! One kubeconfig context per cluster. Commands read the state ConfigMaps for
//! status, and go through the controllers (never by writing ConfigMaps) for
//! anything that changes state.

use std::path::PathBuf;

/// Command-line and environment configuration of `cwctl`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cwctl", version, about, long_about = None)]
pub struct Args {
    /// Kubeconfig holding one context per cluster.
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Contexts to include; all contexts of the kubeconfig if none.
    #[arg(
        long = "context",
        global = true,
        env = "CWCTL_CONTEXTS",
        value_delimiter = ','
    )]
    pub contexts: Vec<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The `cwctl` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// State, epoch, lease and weighted health of every cluster.
    Status,
    /// Why the last transition happened, with the health history behind it.
    Explain,
    /// Planned handover to the named cluster, through the controllers.
    Switchover {
        /// Cluster that should become active.
        #[arg(long)]
        to: String,
    },
    /// Stop automatic failover (planned switchover still works).
    Pause,
    /// Resume automatic failover.
    Resume,
    /// Named health checks of the installation, with fix hints.
    Check,
}

/// Errors `cwctl` reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command that is not built yet was asked for.
    #[error("{0} is not implemented yet; see the open issues")]
    NotImplemented(&'static str),
}

/// Runs one `cwctl` command.
pub async fn run(args: Args) -> Result<(), Error> {
    tracing::debug!(?args.command, "cwctl");
    Err(Error::NotImplemented("this cwctl command"))
}
