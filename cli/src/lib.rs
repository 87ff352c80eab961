//! `cwctl`: the operator's view of Counterweight across clusters.
//!
//! One kubeconfig context per cluster, and the context name is the
//! cluster's name in the HA group (the name peers and `switchover --to`
//! use). Every command reads all contexts of the kubeconfig unless
//! `--context` narrows them down; a cluster that cannot be reached is shown
//! as unreachable, never a reason to abort.
//!
//! - `cwctl status` reads each cluster's `counterweight-state` ConfigMap
//!   into a [`status::Status`] (the "gather") and prints it as a table, JSON
//!   or YAML (the pure "render").
//! - `cwctl explain` adds the Events regarding the state ConfigMap, in time
//!   order, to say why the last transition happened.
//! - `cwctl switchover --to <cluster>`, `cwctl pause` and `cwctl resume` go
//!   through the controllers: they file a request in the
//!   `counterweight-command` ConfigMap (see [`request`]), which the
//!   controller validates and forwards to its HA state machine. `cwctl` never
//!   writes the state ConfigMap.
//! - `cwctl check` runs named checks with fix hints and exits non-zero if
//!   any fails.
//!
//! Exit codes, for scripts:
//!
//! - 0: done, every cluster read;
//! - 1: `check` found a failing check;
//! - 2: the command could not be carried out (the message says why);
//! - 3: `status` or `explain` printed what it could, but at least one
//!   cluster could not be read (shown as unreachable, with the reason).
//!
//! Every read of a cluster is bounded by `--request-timeout` (10 s), and
//! the clusters are read at once: a dead cluster costs one timeout.
//!
//! # As a kubectl plugin
//!
//! kubectl runs any `kubectl-<name>` executable on its `PATH` as
//! `kubectl <name>`. The binary stays `cwctl`; link it under the plugin name:
//!
//! ```text
//! ln -s "$(which cwctl)" ~/.local/bin/kubectl-cw
//! kubectl cw status
//! ```
//!
//! kubectl passes `KUBECONFIG` through the environment, which `cwctl` reads.

pub mod check;
pub mod clusters;
pub mod explain;
pub mod request;
pub mod status;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use counterweight_core::names;

/// Command-line and environment configuration of `cwctl`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cwctl", version, about, long_about = None)]
pub struct Args {
    /// Kubeconfig holding one context per cluster (a `:`-separated list is merged).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Contexts (clusters) to include; all contexts of the kubeconfig if none.
    #[arg(
        long = "context",
        global = true,
        env = "CWCTL_CONTEXTS",
        value_delimiter = ','
    )]
    pub contexts: Vec<String>,

    /// Namespace of the controller and its ConfigMaps.
    #[arg(long, short = 'n', global = true, env = "CWCTL_NAMESPACE", default_value = names::SYSTEM_NAMESPACE)]
    pub namespace: String,

    /// Longest wait for one cluster's answer (connection included); a
    /// cluster that has not answered by then is shown as unreachable.
    #[arg(long, global = true, env = "CWCTL_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Output format of `status`, `explain` and `check`.
    #[arg(long, short = 'o', global = true, env = "CWCTL_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Table,
    /// JSON, one document.
    Json,
    /// YAML, one document.
    Yaml,
}

/// The `cwctl` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// State, epoch, lease and weighted health of every cluster.
    Status {
        /// Redraw every this often (e.g. `1s`) until interrupted; table output only.
        #[arg(long, env = "CWCTL_WATCH", value_parser = parse_duration)]
        watch: Option<Duration>,
    },
    /// Why the last transition happened, with the health and Events behind it.
    Explain {
        /// Show at most this many Events (the most recent ones).
        #[arg(long, env = "CWCTL_EVENTS", default_value_t = 40)]
        events: usize,
    },
    /// Planned handover to the named cluster, through the controllers.
    Switchover {
        /// Cluster (kubeconfig context) that should become active.
        #[arg(long, env = "CWCTL_SWITCHOVER_TO")]
        to: String,
        /// How long to wait for the controller and the handover, e.g. `60s`.
        #[arg(long, env = "CWCTL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stop automatic failover on every cluster (planned switchover still works).
    Pause {
        /// How long to wait for each controller, e.g. `30s`.
        #[arg(long, env = "CWCTL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Resume automatic failover on every cluster.
    Resume {
        /// How long to wait for each controller, e.g. `30s`.
        #[arg(long, env = "CWCTL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Named health checks of the installation, with fix hints.
    Check {
        /// Largest tolerated difference between an API server's clock and this machine's, e.g. `2s`.
        #[arg(long, env = "CWCTL_MAX_CLOCK_SKEW", default_value = "2s", value_parser = parse_duration)]
        max_clock_skew: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    counterweight_core::policy::parse_duration(text)
}

/// How a command ended, when it ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for was done or shown.
    Ok,
    /// `check` ran and at least one check failed.
    ChecksFailed,
    /// `status` or `explain` was printed, but these clusters could not be
    /// read.
    Unreachable(Vec<String>),
}

impl Outcome {
    /// The process exit code (see the crate documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::ChecksFailed => 1,
            Outcome::Unreachable(_) => 3,
        }
    }
}

/// [`Outcome::Unreachable`] if `status` names clusters it could not read.
fn read_outcome(status: &status::Status) -> Outcome {
    let down = status.unreachable();
    if down.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Unreachable(down.into_iter().map(str::to_owned).collect())
    }
}

/// Errors `cwctl` reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or lacks a context.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A request to a cluster failed.
    #[error("cluster {cluster}: {message}")]
    Cluster {
        /// The cluster (context).
        cluster: String,
        /// What failed.
        message: String,
    },
    /// The command cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// Something did not happen within the deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Output could not be written or serialized.
    #[error("output: {0}")]
    Output(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Output(e.to_string())
    }
}

/// Runs one `cwctl` command, printing to `out`.
pub async fn run(args: &Args, out: &mut (dyn Write + Send)) -> Result<Outcome, Error> {
    tracing::debug!(?args.command, "cwctl");
    let targets = clusters::targets(
        args.kubeconfig.as_deref(),
        &args.contexts,
        args.request_timeout,
    )
    .await?;
    let ns = args.namespace.as_str();
    match &args.command {
        Command::Status { watch: None } => {
            let status = status::gather(&targets, ns).await;
            print(out, args.output, &status, status::render)?;
            return Ok(read_outcome(&status));
        }
        Command::Status { watch: Some(every) } => loop {
            // Runs until the user interrupts it (Ctrl-C ends the process).
            let started = std::time::Instant::now();
            let status = status::gather(&targets, ns).await;
            let text = status::render(&status);
            // Clear the screen and home the cursor, then draw.
            write!(
                out,
                "\x1b[2J\x1b[H{}  (every {:.1}s, Ctrl-C to stop)\n\n{text}",
                k8s_openapi::jiff::Timestamp::now().strftime("%H:%M:%S"),
                every.as_secs_f64()
            )?;
            out.flush()?;
            tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
        },
        Command::Explain { events } => {
            let explanation = explain::gather(&targets, ns, *events).await;
            print(out, args.output, &explanation, explain::render)?;
            return Ok(read_outcome(&explanation.status));
        }
        Command::Switchover { to, timeout } => {
            request::switchover(&targets, ns, to, *timeout, out).await?;
        }
        Command::Pause { timeout } => {
            request::set_paused(&targets, ns, true, *timeout, out).await?;
        }
        Command::Resume { timeout } => {
            request::set_paused(&targets, ns, false, *timeout, out).await?;
        }
        Command::Check { max_clock_skew } => {
            let report = check::run(&targets, ns, *max_clock_skew).await;
            print(out, args.output, &report, check::render)?;
            if !report.passed() {
                return Ok(Outcome::ChecksFailed);
            }
        }
    }
    Ok(Outcome::Ok)
}

/// An error with its chain of sources, on one line: kube's top-level
/// messages ("client error (Connect)") only say where the cause is.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn print<T: serde::Serialize>(
    out: &mut (dyn Write + Send),
    format: Output,
    value: &T,
    render: fn(&T) -> String,
) -> Result<(), Error> {
    let text = match format {
        Output::Table => render(value),
        Output::Json => {
            let mut s =
                serde_json::to_string_pretty(value).map_err(|e| Error::Output(e.to_string()))?;
            s.push('\n');
            s
        }
        Output::Yaml => {
            serde_yaml_ng::to_string(value).map_err(|e| Error::Output(e.to_string()))?
        }
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
