//! Child processes of a test cluster, owned so that none outlives its owner.
//!
//! Each process runs in its own process group with its output in a log file.
//! Dropping a [`Process`] kills the whole group and reaps it, which is what
//! makes a panicking test leave nothing behind. A test process that is
//! itself SIGKILLed (a CI timeout) runs no `Drop`, so each child also gets a
//! watchdog: a small `sh` loop outside the child's group that kills the group
//! once the owning process is gone, so no etcd or kube-apiserver outlives
//! the test run that started it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::HarnessError;

/// A running child process and the file its output goes to.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    watchdog: Option<Child>,
    log: PathBuf,
    tail_on_panic: bool,
}

/// The watchdog: `$1` is the owning process, `$2` the child, leader of its
/// own process group. Every `$3` ([`WATCHDOG_PERIOD_S`]) seconds it checks both;
/// when the owner is gone it kills the child's group. It ends with the
/// child, or is killed with it by [`Process::reap`].
const WATCHDOG: &str = r#"
while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep "$3"; done
kill -0 "$1" 2>/dev/null || kill -KILL "-$2" 2>/dev/null
"#;

/// The watchdog's period. Each round forks a `sleep`, for every child of
/// every cluster of a test: a few seconds keep that negligible next to the
/// control planes on a 2-core machine, and an orphan lives no longer.
const WATCHDOG_PERIOD_S: u64 = 3;

impl Process {
    /// Starts `program` with `args`, stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self, HarnessError> {
        Self::spawn_owned_by(name, program, args, log, std::process::id())
    }

    /// [`Process::spawn`], with the child killed once process `owner` is
    /// gone (normally this process).
    fn spawn_owned_by(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        owner: u32,
    ) -> Result<Self, HarnessError> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| HarnessError::io(format!("opening log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io(format!("cloning log {}", log.display()), e))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                // Own group: killing it also kills anything the binary forks.
                .process_group(0)
                .spawn()
                .map_err(|e| HarnessError::io(format!("starting {}", program.display()), e))?
        };
        tracing::debug!(name, pid = child.id(), "started");
        let watchdog = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .args(["-c", WATCHDOG, "counterweight-watchdog"])
                .args([
                    owner.to_string(),
                    child.id().to_string(),
                    WATCHDOG_PERIOD_S.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
        };
        let watchdog = match watchdog {
            Ok(w) => Some(w),
            Err(e) => {
                // The child still runs and is still killed on drop; only a
                // SIGKILL of this process would leave it behind.
                tracing::warn!(name, error = %e, "no watchdog for the child");
                None
            }
        };
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            watchdog,
            log: log.to_owned(),
            tail_on_panic: false,
        })
    }

    /// Name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Path of the log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Prints the last lines of the log when dropped by a panicking test,
    /// so a failed wait shows what the process was doing (the CI report
    /// keeps the test's output, not the log files).
    pub fn tail_on_panic(&mut self) {
        self.tail_on_panic = true;
    }

    /// Returns an error with the log tail if the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Err(HarnessError::Exited {
                name: self.name.clone(),
                status: "stopped".into(),
                log_tail: tail(&self.log),
            });
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HarnessError::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log_tail: tail(&self.log),
            }),
            Err(e) => Err(HarnessError::io(format!("waiting for {}", self.name), e)),
        }
    }

    /// Asks the process group to exit (SIGTERM) without waiting.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs the group and reaps it.
    pub fn stop(&mut self, grace: Duration) {
        self.terminate();
        self.reap(Instant::now() + grace);
    }

    /// Waits for the process to exit until `deadline`, then SIGKILLs the
    /// group and reaps it.
    pub fn reap(&mut self, deadline: Instant) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = Pid::from_raw(child.id() as i32);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The leader may be gone while children of the group linger.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        tracing::debug!(name = %self.name, "stopped");
    }

    /// Sends `signal` to the process group (e.g. SIGSTOP to freeze it,
    /// SIGCONT to let it go on), without waiting.
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = killpg(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Kills the group at once (SIGKILL), like a crash: no SIGTERM goes
    /// first. A SIGTERM, however closely followed by the SIGKILL, lets a
    /// process that the scheduler runs in between shut down gracefully: a
    /// controller "killed" that way released its leader Lease, its other
    /// replica took over at once, and a test of a crash saw no failover.
    pub fn kill(&mut self) {
        // A reap whose deadline has passed SIGKILLs the group at once.
        self.reap(Instant::now());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.tail_on_panic && std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        self.kill();
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(30);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Polls `done` every 50 ms until `within`; whether it came true.
    fn within(within: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done()
    }

    #[test]
    fn a_child_dies_with_its_owner_even_without_drop() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // Stands in for a test process that gets SIGKILLed.
        let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
        let mut p = Process::spawn_owned_by(
            "sleeper",
            Path::new("sleep"),
            &["600".into()],
            &log,
            owner.id(),
        )
        .unwrap();
        p.check_alive().unwrap();
        owner.kill().unwrap();
        owner.wait().unwrap();
        assert!(
            within(Duration::from_secs(10), || p.check_alive().is_err()),
            "the child outlived its owner by 10 s"
        );
    }

    #[test]
    fn a_child_of_a_live_owner_keeps_running_and_drop_ends_both() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut p = Process::spawn("sleeper", Path::new("sleep"), &["600".into()], &log).unwrap();
        // More than one watchdog round.
        std::thread::sleep(Duration::from_secs(WATCHDOG_PERIOD_S) + Duration::from_millis(500));
        p.check_alive().unwrap();
        let watchdog = p.watchdog.as_ref().map(Child::id).unwrap();
        drop(p);
        let gone = within(Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{watchdog}")).exists()
        });
        assert!(gone, "the watchdog outlived its process");
    }
}
