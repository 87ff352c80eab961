//! The demo keeps working: `counterweight-demo --once` on fresh clusters
//! must hand over from east to west, print the key steps, exit 0 and leave
//! no cluster directory behind; and Ctrl-C in the middle must stop it
//! cleanly too.
//!
//! The demo runs the controller, webhook and gate binaries found next to it:
//! build them first (`cargo build --workspace --bins`, as `tools/test.sh`
//! does).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous for a busy two-core machine: a run takes about a minute.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// The demo runs the binaries next to it; like the other e2e tests, this
/// test expects them built (`tools/test.sh` runs `cargo build --workspace
/// --bins` first) rather than building a different feature set itself.
fn check_binaries() {
    let dir = Path::new(env!("CARGO_BIN_EXE_counterweight-demo"))
        .parent()
        .expect("target dir")
        .to_owned();
    for name in [
        "counterweight-controller",
        "counterweight-webhook",
        "counterweight-gate",
    ] {
        assert!(
            dir.join(name).exists(),
            "{} missing; run `cargo build --workspace --bins` (or tools/demo.sh) first",
            dir.join(name).display()
        );
    }
}

/// The demo process with its stdout arriving line by line.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_counterweight-demo"))
            .args(args)
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
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Collects output until a line contains `needle` (true) or the
    /// output ends or `deadline` passes (false).
    fn until(&mut self, needle: &str, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits for exit until `deadline`; SIGTERMs (the demo cleans up on it),
    /// then SIGKILLs a demo that overstays.
    fn wait(&mut self, deadline: Instant) -> std::process::ExitStatus {
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain();
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.signal(Signal::SIGTERM);
        let grace = Instant::now() + Duration::from_secs(30);
        while Instant::now() < grace {
            if self.child.try_wait().expect("try_wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!(
            "the demo did not finish in time; output:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, s: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, s).expect("signal the demo");
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// The cluster directories the demo reported (`logs in <dir>/logs`).
    fn cluster_dirs(&self) -> Vec<PathBuf> {
        self.seen
            .iter()
            .filter_map(|l| l.split("(logs in ").nth(1))
            .filter_map(|rest| rest.strip_suffix("/logs)"))
            .map(PathBuf::from)
            .collect()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // A failed assertion must not leave a demo (and its clusters) running.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
    }
}

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
    check_binaries();

    // --once: the whole story, exit 0.
    let mut demo = Demo::start(&["--once"]);
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
    let mut demo = Demo::start(&[]);
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
