//! The demo binary as the tests drive it: started with its stdout read
//! line by line on a thread, waited for with a deadline (SIGTERM, then
//! SIGKILL, for one that overstays), and stopped on drop so that a failed
//! assertion leaves no demo and no clusters running. Shared by `demo.rs`
//! (KWOK) and `real_nodes.rs`.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The demo runs the binaries next to it; like the other e2e tests, this
/// test expects them built (`tools/test.sh` runs `cargo build --workspace
/// --bins` first) rather than building a different feature set itself.
pub fn check_binaries(names: &[&str]) {
    let dir = Path::new(env!("CARGO_BIN_EXE_counterweight-demo"))
        .parent()
        .expect("target dir")
        .to_owned();
    for name in names {
        assert!(
            dir.join(name).exists(),
            "{} missing; run `cargo build --workspace --bins` (or tools/demo.sh) first",
            dir.join(name).display()
        );
    }
}

/// The demo process with its stdout arriving line by line.
pub struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// How long a demo told to stop (SIGTERM) may take to clean up.
    grace: Duration,
}

impl Demo {
    /// Starts the demo with `args`; a stop (SIGTERM) may take `grace`.
    pub fn start(args: &[&str], grace: Duration) -> Self {
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
            grace,
        }
    }

    /// Collects output until a line contains `needle` (true) or the
    /// output ends or `deadline` passes (false).
    pub fn until(&mut self, needle: &str, deadline: Instant) -> bool {
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
    pub fn wait(&mut self, deadline: Instant) -> std::process::ExitStatus {
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.drain();
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.signal(Signal::SIGTERM);
        let grace = Instant::now() + self.grace;
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

    pub fn signal(&self, s: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, s).expect("signal the demo");
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
    }

    /// Everything it printed so far, joined.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// Everything it printed so far, line by line.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The cluster directories the demo reported (`logs in <dir>/logs`).
    pub fn cluster_dirs(&self) -> Vec<PathBuf> {
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
            let until = Instant::now() + self.grace;
            while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
    }
}
