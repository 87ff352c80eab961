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

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous for a busy two-core machine: a run takes about 2 minutes.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

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
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_counterweight-demo"));
    let dir = exe.parent().expect("target dir").to_owned();
    for name in ["cw-certs", "cwctl", "counterweight-controller"] {
        assert!(
            dir.join(name).exists(),
            "{} missing; run `cargo build --workspace --bins` (or tools/demo.sh) first",
            dir.join(name).display()
        );
    }
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args(["--real-nodes", "--once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start counterweight-demo");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("demo| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Until stdout closes (the demo exited) or the deadline passes.
    let deadline = started + RUN_TIMEOUT;
    let mut seen = Vec::new();
    let finished = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
        }
    };
    if !finished {
        // SIGTERM: the demo tears down on it.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let grace = Instant::now() + Duration::from_secs(60);
        while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        panic!(
            "the demo did not finish within {RUN_TIMEOUT:?}; output:\n{}",
            seen.join("\n")
        );
    }
    let status = child.wait().expect("wait for the demo");
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
    let dirs: Vec<PathBuf> = seen
        .iter()
        .filter_map(|l| l.split("(logs in ").nth(1))
        .filter_map(|rest| rest.strip_suffix("/logs)"))
        .map(PathBuf::from)
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
