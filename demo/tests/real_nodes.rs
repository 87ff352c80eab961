//! `counterweight-demo --real-nodes --once` keeps working: on two real-node
//! clusters and a witness, installed with README.md's guide, it must hand
//! over from east to west, read back on west every PostgreSQL row written
//! on east before the handover, exit 0, and leave nothing behind (the
//! clusters' and the install's directories, whose paths it prints).
//!
//! Needs root (real nodes; skips otherwise, like the other real-node
//! tests), the images (`COUNTERWEIGHT_IMAGES`, tools/images.sh) and the
//! workspace's binaries next to the demo (`cargo build --workspace
//! --bins`): the guide runs `cw-certs`, `cwctl` and
//! `counterweight-controller` from there.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Demo, check_binaries};

/// Generous for a busy two-core machine: a run takes about 2 minutes.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a stopped demo may take to tear its real nodes down.
const STOP_GRACE: Duration = Duration::from_secs(60);

fn assert_has(out: &str, needle: &str) {
    assert!(
        out.contains(needle),
        "missing {needle:?} in the demo's output:\n{out}"
    );
}

#[test]
fn real_node_demo_reads_the_rows_back_on_the_new_active_and_cleans_up() {
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    check_binaries(&["cw-certs", "cwctl", "counterweight-controller"]);
    let started = Instant::now();
    let mut demo = Demo::start(&["--real-nodes", "--once"], STOP_GRACE);
    let status = demo.wait(started + RUN_TIMEOUT);
    let seen = demo.seen().to_vec();
    let out = seen.join("\n");
    println!(
        "demo --real-nodes --once took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "the demo failed ({status}):\n{out}");

    for needle in [
        "step `apply` done",
        "init container counterweight-gate running; app container web waiting (PodInitializing)",
        "east hears west as an eligible standby",
        "rows written into table counterweight_demo of east's database",
        "handover took",
        "west active, epoch",
        "init container counterweight-gate exited 0; app container web running",
        "rows read back on west: 5 of 5",
        "every row written on east is on west",
        "stopped in",
        "nothing left behind",
    ] {
        assert_has(&out, needle);
    }
    // The rows printed after the read on west are those printed after the
    // write on east.
    let rows_after = |header: &str| -> Vec<String> {
        seen.iter()
            .skip_while(|l| !l.contains(header))
            .skip(1)
            .take(5)
            .map(|l| l.split("]     ").nth(1).unwrap_or(l).to_owned())
            .collect()
    };
    let written = rows_after("rows written into table");
    let read = rows_after("rows read back on west");
    assert_eq!(written.len(), 5, "five rows written:\n{out}");
    assert!(
        written
            .iter()
            .all(|r| r.contains("written on east before the handover")),
        "the rows written: {written:?}"
    );
    assert_eq!(read, written, "west read back what east wrote:\n{out}");

    // Teardown: the directories it printed are gone.
    let dirs: Vec<PathBuf> = demo
        .cluster_dirs()
        .into_iter()
        .chain(
            seen.iter()
                .filter_map(|l| l.split("steps as written, in ").nth(1))
                .map(PathBuf::from),
        )
        .collect();
    assert_eq!(
        dirs.len(),
        3,
        "both clusters' and the install's directories reported:\n{out}"
    );
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
