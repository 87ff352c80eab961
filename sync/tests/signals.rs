//! `counterweight-sync` stops cleanly on SIGTERM, the signal Kubernetes
//! sends to stop a container, as it does on SIGINT. Before, it handled only
//! SIGINT: outside a container SIGTERM killed it mid-work, and as a
//! container's PID 1 (where an unhandled SIGTERM is ignored) it ran until
//! the kubelet's SIGKILL at the end of the grace period.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `files` mode on a standby, with its state from a directory: no
/// cluster and no rsync run needed.
fn start_files(dir: &std::path::Path) -> Child {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("state"), "standby").expect("state");
    std::fs::write(state.join("epoch"), "1").expect("epoch");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    Command::new(env!("CARGO_BIN_EXE_counterweight-sync"))
        .arg("files")
        .arg("--state-dir")
        .arg(&state)
        .arg("--dir")
        .arg(&data)
        .arg("--dest")
        .arg(format!("{}/", dir.join("elsewhere").display()))
        .arg("--watermark")
        .arg(dir.join("watermark.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("counterweight-sync starts")
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name}");
}

/// Polls until the child exits, at most `within`.
fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn stops_cleanly_on(name: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = start_files(dir.path());
    // Running (its watermark written) before the signal, so the signal
    // meets the supervisor and not the process's start-up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.path().join("watermark.json").exists() {
        assert!(
            Instant::now() < deadline,
            "counterweight-sync never wrote its watermark"
        );
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("counterweight-sync exited before the test: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, name);
    let status = exit_within(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "SIG{name} must stop counterweight-sync with exit code 0 ({status:?})"
    );
}

#[test]
fn sigterm_stops_it_cleanly() {
    stops_cleanly_on("TERM");
}

#[test]
fn sigint_stops_it_cleanly() {
    stops_cleanly_on("INT");
}
