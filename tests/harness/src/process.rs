//! Child processes of a test cluster, owned so that none outlives its owner.
//!
//! Each process runs in its own process group with its output in a log file.
//! Dropping a [`Process`] kills the whole group and reaps it, which is what
//! makes a panicking test leave nothing behind.

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
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
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
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
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
        tracing::debug!(name = %self.name, "stopped");
    }

    /// Kills the group at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
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
