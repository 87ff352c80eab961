//! The demo keeps working: `counterweight-demo --once` on fresh clusters
//! must hand over from east to west, print the key steps, exit 0 and leave
//! no cluster directory behind; and Ctrl-C in the middle must stop it
//! cleanly too.
//!
//! The demo runs the controller, webhook and gate binaries found next to it:
//! build them first (`cargo build --workspace --bins`, as `tools/test.sh`
//! does).

mod common;

use std::time::{Duration, Instant};

use common::{Demo, check_binaries};
use nix::sys::signal::Signal;

/// Generous for a busy two-core machine: a run takes about a minute.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a stopped demo may take to clean up its KWOK clusters.
const STOP_GRACE: Duration = Duration::from_secs(30);

fn assert_has(out: &str, needle: &str) {
    assert!(
        out.contains(needle),
        "missing {needle:?} in the demo's output:\n{out}"
    );
}

/// One test, two runs in sequence: four clusters at once would starve a
/// two-core machine.
#[test]
fn demo_hands_over_and_cleans_up_after_once_and_after_ctrl_c() {
    check_binaries(&[
        "counterweight-controller",
        "counterweight-webhook",
        "counterweight-gate",
    ]);

    // --once: the whole story, exit 0.
    let mut demo = Demo::start(&["--once"], STOP_GRACE);
    let status = demo.wait(Instant::now() + RUN_TIMEOUT);
    let out = demo.output();
    assert!(status.success(), "the demo failed ({status}):\n{out}");
    for needle in [
        "east active, epoch 1",
        "Ready after",
        "CLUSTER",
        "east: Deployment ems/web scaled to 0",
        "east abnormal (S=0.50 < D=0.60, retry 3/2",
        "east Event Warning ClusterAbnormal",
        "west Event Normal Promoted",
        "west active, epoch 2",
        "handover took",
        "west gate of a new web pod: released: cluster west is active (epoch 2)",
        "west pods: web 2/2 serving, api 1/1 serving",
        "Handover complete",
    ] {
        assert_has(&out, needle);
    }
    let dirs = demo.cluster_dirs();
    assert_eq!(dirs.len(), 2, "both cluster directories reported:\n{out}");
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }

    // Ctrl-C while the clusters run: a clean exit, nothing left behind.
    let mut demo = Demo::start(&[], STOP_GRACE);
    assert!(
        demo.until(
            "waiting for the first election",
            Instant::now() + RUN_TIMEOUT
        ),
        "the demo did not get to the first election:\n{}",
        demo.output()
    );
    demo.signal(Signal::SIGINT);
    let status = demo.wait(Instant::now() + Duration::from_secs(60));
    let out = demo.output();
    assert!(
        status.success(),
        "Ctrl-C must end the demo cleanly ({status}):\n{out}"
    );
    assert_has(&out, "Ctrl-C: stopping every process");
    let dirs = demo.cluster_dirs();
    assert_eq!(dirs.len(), 2, "both cluster directories reported:\n{out}");
    for d in &dirs {
        assert!(!d.exists(), "{} left behind after Ctrl-C", d.display());
    }
}
