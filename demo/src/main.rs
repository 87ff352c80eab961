//! `counterweight-demo`: Counterweight end to end on one machine.
//!
//! Starts two local clusters (`east`, `west`) with the test harness, runs
//! the webhook and the controller of each as local processes on 127.0.0.1
//! (development certificates made here), deploys a sample EMS in both, shows
//! `cwctl status`, then makes east's web tier fail and prints the handover
//! to west as it happens. It keeps a live view until Ctrl-C, or exits after
//! the handover with `--once`. Every process and directory goes away on
//! exit: the harness kills its process groups when its values are dropped,
//! and every way out of `main` drops them.
//!
//! With `--real-nodes` (root) the clusters have real nodes instead
//! ([`real`]): README.md's install guide installs everything in pods, the
//! gates hold real app containers, and PostgreSQL rows written on east are
//! read back on west after the handover.

mod ems;
mod real;
mod stack;
mod view;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use crate::ems::Sample;
use crate::stack::{CLUSTERS, Stack};
use crate::view::{TICK, View};

/// Counterweight demo: two local clusters, a sample EMS, and a live
/// handover from east to west when east's weighted health falls.
#[derive(Parser, Debug)]
#[command(name = "counterweight-demo", version)]
struct Args {
    /// Exit (0) once the handover is complete, instead of keeping the live
    /// view until Ctrl-C. For CI and scripts.
    #[arg(long)]
    once: bool,

    /// Two real-node clusters (containerd, kubelet, kube-proxy) and a
    /// witness instead of KWOK, installed with README.md's "Install on two
    /// clusters" commands; shows the gate holding real app containers and
    /// PostgreSQL rows surviving the handover. Needs root and the images
    /// (`COUNTERWEIGHT_IMAGES`, tools/images.sh); run it with
    /// `tools/demo.sh --real-nodes`.
    #[arg(long)]
    real_nodes: bool,

    /// Longest wait for each stage (start-up, first election, handover), in
    /// seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,

    /// The live view ends by itself after this many seconds, so a forgotten
    /// demo does not run for ever.
    #[arg(long, default_value_t = 3600)]
    live_for: u64,
}

/// Prints `[  12.3s] line`, the time counted from `t0`.
pub fn say(t0: Instant, line: &str) {
    println!("[{:>6.1}s] {line}", t0.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    counterweight_harness::install_crypto_provider();
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut demo = Box::pin(run(&args));
    let why = tokio::select! {
        r = &mut demo => return r,
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    };
    // Dropping the demo's future drops the Stack it owns: every process is
    // killed and every directory removed before main returns.
    println!("\n{why}: stopping every process and removing the clusters' directories");
    let stopping = Instant::now();
    drop(demo);
    println!("stopped in {:.1}s", stopping.elapsed().as_secs_f64());
    Ok(())
}

async fn run(args: &Args) -> Result<()> {
    if args.real_nodes {
        return real::run(args).await;
    }
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    let mut stack = Stack::start(started).await?;
    let targets = counterweight_cli::clusters::targets(
        Some(&stack.kubeconfig),
        &[],
        counterweight_cli::clusters::REQUEST_TIMEOUT,
    )
    .await?;
    let gate_logs = stack
        .gates
        .iter()
        .map(|g| (g.cluster.clone(), g.process.log().to_owned()))
        .collect();
    let mut view = View::new(targets, gate_logs, started, Sample::Kwok);
    let (east, west) = (CLUSTERS[0], CLUSTERS[1]);

    // 1. The first election: east (preferred) active and serving, west's
    //    service pods held at the gate.
    view.say("waiting for the first election (east is preferred)");
    wait(
        &mut || stack.check_alive(),
        &mut view,
        timeout,
        "east active and serving",
        |v| {
            let (Some(e), Some(w)) = (v.side(east), v.side(west)) else {
                return false;
            };
            e.active()
                && e.all_serving()
                && !w.active()
                && w.all_held()
                && v.released.contains(east)
                && v.has_event(east, "Promoted")
        },
    )
    .await?;
    let first_epoch = view.side(east).map_or(0, view::Side::epoch);
    println!(
        "\nReady after {:.1}s. `cwctl status` now:\n",
        started.elapsed().as_secs_f64()
    );
    cwctl(&stack.kubeconfig, &["status"]).await?;

    // 2. The fault: east loses its web tier (w = 0.5), so S falls from 1.0
    //    to 0.5 < D = 0.6 and stays there.
    println!(
        "\nMaking east's weighted health fall: its web tier goes away (Deployment ems/web scaled to 0)."
    );
    println!("Times below count from that moment.\n");
    view.restart_clock();
    ems::scale(&stack.clusters[0].client(), "web", 0).await?;
    view.say("east: Deployment ems/web scaled to 0 (the web tier crashed)");
    wait(
        &mut || stack.check_alive(),
        &mut view,
        timeout,
        "the handover to west",
        |v| {
            let (Some(e), Some(w)) = (v.side(east), v.side(west)) else {
                return false;
            };
            w.active()
                && w.epoch() > first_epoch
                && !e.active()
                && w.all_serving()
                && e.none_serving()
                && v.released.contains(west)
                && v.handover_reported()
                && v.told_abnormal(east)
        },
    )
    .await?;
    let handover_at = view_elapsed(&view);
    println!(
        "\nHandover complete {handover_at:.1}s after the fault: west is active and serving, east is standby. `cwctl status`:\n"
    );
    cwctl(&stack.kubeconfig, &["status"]).await?;

    if args.once {
        println!("\n--once: stopping every process and removing the clusters' directories");
        return Ok(());
    }

    // 3. Live until Ctrl-C (or --live-for).
    let kubectl = stack.clusters[0].kubectl();
    let cwctl_bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("cwctl")))
        .filter(|p| p.exists())
        .map_or("cargo run -q -p counterweight-cli --".to_owned(), |p| {
            p.display().to_string()
        });
    println!(
        "\nLive view until Ctrl-C. Try, in another shell:\n\
         \x20 export KUBECONFIG={}\n\
         \x20 {} --context east -n ems scale deploy/web --replicas=2   # east heals; it stays standby (no preemption)\n\
         \x20 {cwctl_bin} switchover --to east   # planned handover back\n\
         \x20 {cwctl_bin} explain                # why the last transition happened\n",
        stack.kubeconfig.display(),
        kubectl.display(),
    );
    let end = Instant::now() + Duration::from_secs(args.live_for);
    while Instant::now() < end {
        stack.check_alive()?;
        view.look().await?;
        tokio::time::sleep(TICK).await;
    }
    println!("live view ended after {}s (--live-for)", args.live_for);
    Ok(())
}

/// Seconds since the view's clock was last restarted, as printed.
fn view_elapsed(view: &View) -> f64 {
    view.elapsed().as_secs_f64()
}

/// Looks every [`TICK`] until `done` holds; fails after `timeout` with
/// what was last seen, or as soon as `alive` says one of our processes
/// died.
async fn wait(
    alive: &mut dyn FnMut() -> Result<()>,
    view: &mut View,
    timeout: Duration,
    what: &str,
    done: impl Fn(&View) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        view.look().await?;
        if done(view) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = view.sides.iter().map(view::Side::summary).collect();
            bail!(
                "timed out after {timeout:?} waiting for {what}; last seen:\n  {}",
                seen.join("\n  ")
            );
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Runs `cwctl <args>` (the library behind the binary) against the demo's
/// kubeconfig and prints what it prints.
async fn cwctl(kubeconfig: &Path, args: &[&str]) -> Result<()> {
    let mut argv = vec![
        "cwctl".to_owned(),
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    let parsed = counterweight_cli::Args::try_parse_from(argv)?;
    let mut out = Vec::new();
    counterweight_cli::run(&parsed, &mut out).await?;
    print!("{}", String::from_utf8_lossy(&out));
    Ok(())
}
