//! `--real-nodes`: the demo on two real-node clusters and a witness.
//!
//! This module owns the real-node run from start to teardown. The
//! infrastructure and the install are `counterweight_harness::install`'s,
//! the same that `tests/e2e/tests/real_install.rs` runs: two clusters with
//! a real node each (containerd, kubelet, kube-proxy) on one LAN, the
//! project's images imported into them, then README.md's "Install on two
//! clusters" commands as written, which start every Counterweight part in
//! pods and the witness as a process. The live view is the KWOK demo's
//! ([`crate::view`]), reading the kubelet's account of each `web` pod's
//! containers: on the standby the gate's init container runs and the app
//! container waits. Once east hears west as an eligible standby (west's
//! PostgreSQL streams from east's), rows are written into east's database
//! in its `ems-db-0` pod; east's web tier is broken (its pods stop serving
//! `/hostname`, the policy's check); after the handover the rows are read
//! back from west's database, promoted in its pod. With `--once` the run
//! ends there: exit 0 if every row came back, an error saying what did not
//! otherwise. Dropping [`Running`] tears everything down.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use counterweight_core::state::Role;
use counterweight_harness::Process;
use counterweight_harness::install::{self, Infra};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams};

use crate::ems::Sample;
use crate::view::{Side, TICK, View};
use crate::{Args, cwctl, say, wait};

/// Rows written on east before the handover.
const ROWS: u32 = 5;
/// The demo's table in east's (then west's) database.
const TABLE: &str = "counterweight_demo";
/// How long east may take to hear west as an eligible standby after the
/// election (west's database copied and streaming, its files current).
const ELIGIBLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long reading or writing the rows may keep failing (a pod
/// restarting, a promotion in progress) before the demo gives up.
const ROWS_TIMEOUT: Duration = Duration::from_secs(120);
/// How long teardown may take to leave nothing behind.
const LEFTOVERS_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll period of the waits that are not the view's.
const POLL: Duration = Duration::from_millis(500);

/// The witness process and the infrastructure; dropping it stops the
/// witness first, then every cluster (their pods with them), the LAN and
/// the directories.
struct Running {
    witness: Process,
    infra: Infra,
}

impl Running {
    /// Fails if the witness or a cluster's process exited.
    fn check_alive(&mut self) -> Result<()> {
        self.witness
            .check_alive()
            .context("the witness (the guide's step `witness`) exited")?;
        self.infra.east.check_alive()?;
        self.infra.west.check_alive()?;
        Ok(())
    }
}

/// Runs the real-node demo (see the module's documentation).
pub async fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout);
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "--real-nodes needs root (network and mount namespaces, cgroups, containerd): run `sudo tools/demo.sh --real-nodes`"
        );
    }
    let images = std::env::var_os("COUNTERWEIGHT_IMAGES")
        .map(std::path::PathBuf::from)
        .context(
            "COUNTERWEIGHT_IMAGES is not set: it names tools/images.sh's directory (tools/demo.sh --real-nodes sets it)",
        )?;
    let exe = std::env::current_exe().context("locating the demo binary")?;
    let tools_dir = exe
        .parent()
        .context("the demo binary has no parent directory")?
        .to_owned();
    let readme = install::read_readme()?;
    install::check_steps(&readme)?;

    let (infra, took) = install::Infra::start(&images, &tools_dir, &mut |l| say(started, l))
        .await
        .context("starting the clusters and importing the images")?;
    for (c, n) in [("east", &infra.east), ("west", &infra.west)] {
        if let Some(node) = n.real_node() {
            say(
                started,
                &format!(
                    "  {c}: API server {}, node {} at {} (logs in {})",
                    n.server_url(),
                    counterweight_harness::REAL_NODE_NAME,
                    node.addr(),
                    n.dir().join("logs").display()
                ),
            );
        }
    }
    say(
        started,
        &format!(
            "  clusters up in {:.1}s, images imported in {:.1}s",
            took.clusters_up.as_secs_f64(),
            took.imported.as_secs_f64()
        ),
    );
    say(
        started,
        &format!(
            "running README.md's \"Install on two clusters\" steps as written, in {}",
            infra.work.path().display()
        ),
    );
    let (_, witness) = infra
        .run_guide(&readme, &mut |name, d| {
            if name == install::WITNESS_STEP {
                say(
                    started,
                    "  step `witness`: counterweight-controller --witness runs (a process on the LAN)",
                );
            } else {
                say(
                    started,
                    &format!("  step `{name}` done in {:.1}s", d.as_secs_f64()),
                );
            }
        })
        .await?;
    let mut running = Running { witness, infra };

    let targets = counterweight_cli::clusters::targets(
        Some(&running.infra.kubeconfig),
        &[],
        counterweight_cli::clusters::REQUEST_TIMEOUT,
    )
    .await?;
    let mut view = View::new(targets, Vec::new(), started, Sample::Manifests);

    // 1. The first election: east active with its web pods Ready; west
    //    standby with its web pods held by their gates' init containers.
    view.say("waiting for the first election (east is preferred, priority 2)");
    wait(
        &mut || running.check_alive(),
        &mut view,
        timeout,
        "east active and serving, west's web pods held at their gates",
        |v| {
            let (Some(e), Some(w)) = (v.side("east"), v.side("west")) else {
                return false;
            };
            e.active()
                && w.status.role == Some(Role::Standby)
                && e.epoch() == w.epoch()
                && e.all_serving()
                && web_ready(e)
                && w.all_at_gate()
        },
    )
    .await?;
    let first_epoch = view.side("east").map_or(0, Side::epoch);
    println!(
        "\nInstalled and elected after {:.1}s. `cwctl status` (the guide's step `check`):\n",
        started.elapsed().as_secs_f64()
    );
    cwctl(&running.infra.kubeconfig, &["status"]).await?;

    // 2. Rows on east, once west streams (under synchronous commit a write
    //    waits for west).
    let east_cms: Api<ConfigMap> = running.infra.cms(&running.infra.east);
    view.say("waiting until east hears west as an eligible standby (west's database streams from east's, its files are current)");
    let deadline = Instant::now() + ELIGIBLE_TIMEOUT;
    loop {
        running.check_alive()?;
        view.look().await?;
        match install::hears_eligible(&east_cms, "west", 3000).await {
            Ok(()) => break,
            Err(why) if Instant::now() > deadline => bail!(
                "east did not hear west as an eligible standby within {ELIGIBLE_TIMEOUT:?}; last: {why}"
            ),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
    view.say("east hears west as an eligible standby");
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let expected: Vec<String> = (1..=ROWS).map(|i| row(i, token)).collect();
    let written = write_rows(&running.infra, token).await?;
    if written != expected {
        bail!("east's database returned {written:?} after the INSERT, not {expected:?}");
    }
    view.say(&format!(
        "east: {ROWS} rows written into table {TABLE} of east's database (kubectl exec ems-db-0 -c sync -- psql):"
    ));
    for r in &written {
        view.say(&format!("    {r}"));
    }

    // 3. The fault: east's web pods stop serving /hostname, the policy's
    //    check (and the readiness probe after it).
    let east_web = web_pod_names(&running.infra.east.client()).await?;
    println!(
        "\nBreaking east's web tier: /www/hostname removed in its web pods {}; the policy's http check fails.",
        east_web.join(", ")
    );
    println!("Times below count from that moment.\n");
    view.restart_clock();
    for pod in &east_web {
        running
            .infra
            .kubectl(
                "east",
                &[
                    "-n",
                    "ems",
                    "exec",
                    pod,
                    "-c",
                    "web",
                    "--",
                    "rm",
                    "/www/hostname",
                ],
            )
            .await
            .with_context(|| format!("breaking east's web pod {pod}"))?;
    }
    view.say("east: /www/hostname removed from every web pod (the web tier broke)");
    wait(
        &mut || running.check_alive(),
        &mut view,
        timeout,
        "the handover to west, west's web pods released and Ready",
        |v| {
            let (Some(e), Some(w)) = (v.side("east"), v.side("west")) else {
                return false;
            };
            w.active()
                && w.epoch() > first_epoch
                && e.status.role == Some(Role::Standby)
                && w.all_serving()
                && web_ready(w)
                && e.none_serving()
                && v.handover_reported()
        },
    )
    .await?;
    let handover_at = view.elapsed().as_secs_f64();
    view.say("west is active and serving; reading the rows back from west's database");

    // 4. The rows, on the new active: west's database promoted in its pod.
    let deadline = Instant::now() + ROWS_TIMEOUT;
    let read = loop {
        running.check_alive()?;
        let last = match read_rows(&running.infra, "west").await {
            Ok((false, rows)) if rows == expected => break rows,
            Ok((in_recovery, rows)) => format!(
                "pg_is_in_recovery = {in_recovery}, {} of {ROWS} rows: {rows:?}",
                rows.iter().filter(|r| expected.contains(r)).count()
            ),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "the rows written on east before the handover were not read back on west within {ROWS_TIMEOUT:?}: \
                 expected {expected:?} from a promoted database; last read: {last}"
            );
        }
        view.look().await?;
        tokio::time::sleep(POLL).await;
    };
    view.say(&format!(
        "rows read back on west: {} of {ROWS}, from its database promoted in pod ems-db-0 (pg_is_in_recovery = f):",
        read.len()
    ));
    for r in &read {
        view.say(&format!("    {r}"));
    }
    println!(
        "\nHandover complete {handover_at:.1}s after the fault: west is active and serving, east is standby, \
         and every row written on east is on west. `cwctl status`:\n"
    );
    cwctl(&running.infra.kubeconfig, &["status"]).await?;

    if args.once {
        println!(
            "\n--once: stopping the witness, both clusters (every pod), the LAN and the directories"
        );
        let stopping = Instant::now();
        let made = running.infra.leftovers_to_check();
        drop(running);
        println!("stopped in {:.1}s", stopping.elapsed().as_secs_f64());
        // The harness's watchdogs reap a straggler within a few seconds.
        let deadline = Instant::now() + LEFTOVERS_TIMEOUT;
        loop {
            let left = made.remaining();
            if left.is_empty() {
                println!(
                    "nothing left behind: {} network namespaces, {} links, {} directories gone",
                    made.namespaces.len(),
                    made.links.len(),
                    made.dirs.len()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("left behind after teardown:\n  {}", left.join("\n  "));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    println!(
        "\nLive view until Ctrl-C. Try, in another shell:\n\
         \x20 export KUBECONFIG={}\n\
         \x20 {} --context west -n ems get pods -o wide\n\
         \x20 {} --context east -n ems describe pod -l app.kubernetes.io/name=web   # the gate's init container\n\
         \x20 cwctl switchover --to east   # planned handover back (from target/debug)\n",
        running.infra.kubeconfig.display(),
        running.infra.kubectl.display(),
        running.infra.kubectl.display(),
    );
    let end = Instant::now() + Duration::from_secs(args.live_for);
    while Instant::now() < end {
        running.check_alive()?;
        view.look().await?;
        tokio::time::sleep(TICK).await;
    }
    println!("live view ended after {}s (--live-for)", args.live_for);
    Ok(())
}

/// Every `web` pod of `side` Ready (the kubelet's probe passed too).
fn web_ready(side: &Side) -> bool {
    side.pods.as_ref().is_some_and(|ps| {
        ps.iter()
            .any(|(app, a)| *app == "web" && a.total > 0 && a.ready == a.total)
    })
}

/// Row `i` of the run marked `token`, as `psql -At` prints it.
fn row(i: u32, token: u128) -> String {
    format!("{i}|written on east before the handover, run {token}")
}

/// Runs `sql` on the server in `context`'s `ems-db-0` (over its socket,
/// from inside the pod); psql's output lines.
async fn exec_sql(infra: &Infra, context: &str, sql: &str) -> Result<Vec<String>> {
    let out = infra
        .tool()
        .sql_local(context, sql)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// The SELECT that lists the demo's rows.
fn select_rows() -> String {
    format!("SELECT id, note FROM {TABLE} ORDER BY id")
}

/// Writes [`ROWS`] rows on east (idempotent: a retry after a timed-out
/// commit adds nothing) and returns them as east reads them back.
async fn write_rows(infra: &Infra, token: u128) -> Result<Vec<String>> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, note text NOT NULL); \
         INSERT INTO {TABLE} SELECT i, 'written on east before the handover, run {token}' \
         FROM generate_series(1, {ROWS}) i ON CONFLICT DO NOTHING; {}",
        select_rows()
    );
    let deadline = Instant::now() + ROWS_TIMEOUT;
    loop {
        match exec_sql(infra, "east", &sql).await {
            Ok(rows) => return Ok(rows),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!(
                    "writing {ROWS} rows into east's database for {ROWS_TIMEOUT:?}"
                )));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Whether `context`'s database is in recovery (a standby), and the demo's
/// rows there.
async fn read_rows(infra: &Infra, context: &str) -> Result<(bool, Vec<String>)> {
    let sql = format!("SELECT pg_is_in_recovery(); {}", select_rows());
    let mut lines = exec_sql(infra, context, &sql).await?.into_iter();
    let in_recovery = match lines.next().as_deref() {
        Some("f") => false,
        Some("t") => true,
        other => bail!("pg_is_in_recovery() printed {other:?}"),
    };
    Ok((in_recovery, lines.collect()))
}

/// The names of the `web` pods of a cluster (not being deleted).
async fn web_pod_names(client: &kube::Client) -> Result<Vec<String>> {
    let pods = Api::<Pod>::namespaced(client.clone(), crate::ems::NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/name=web"))
        .await
        .context("listing east's web pods")?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect())
}
