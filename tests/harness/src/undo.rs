//! Undo scripts: how the harness removes what it made outside its own processes.
//!
//! Network namespaces, mount namespaces, veths, bridges, cgroups and global sysctls outlive the
//! process that made them. An [`Undo`] collects, step by step as a resource is made, the shell
//! commands that remove it, and runs them in reverse order when dropped. The same script also
//! runs when the owning test process dies without running `Drop` (SIGKILL by a CI timeout): a
//! watchdog `sh`, in a process group of its own, waits for the owner to disappear and then runs
//! the script from its file. One script serves both paths, so the path a crash takes is the path
//! every test takes.
//!
//! Every step is written to tolerate what is already gone (`|| true`), so running it twice or
//! after a partial setup is harmless.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::HarnessError;

/// Where the undo scripts live while their resources exist (root only).
pub const UNDO_DIR: &str = "/run/counterweight/undo";

/// The watchdog: `$1` is the owning process, `$2` the script. It polls every 3 s (the period of
/// the process watchdogs) and runs the script once the owner is gone.
const WATCHDOG: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 3; done
[ -f "$2" ] && sh "$2" >/dev/null 2>&1
rm -f "$2"
"#;

/// An ordered list of shell steps that remove a resource, run in reverse on drop and by a
/// watchdog if the owner dies first.
#[derive(Debug)]
pub struct Undo {
    script: PathBuf,
    steps: Vec<String>,
    watchdog: Option<Child>,
}

impl Undo {
    /// A new, empty undo script named `name` (unique among live ones), watched on behalf of
    /// this process.
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        Self::owned_by(name, std::process::id())
    }

    /// [`Undo::new`], with the script run once process `owner` is gone.
    fn owned_by(name: &str, owner: u32) -> Result<Self, HarnessError> {
        std::fs::create_dir_all(UNDO_DIR)
            .map_err(|e| HarnessError::io(format!("creating {UNDO_DIR}"), e))?;
        let script = PathBuf::from(UNDO_DIR).join(format!("{name}.sh"));
        let mut undo = Self {
            script,
            steps: Vec::new(),
            watchdog: None,
        };
        undo.write()?;
        let watchdog = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .args(["-c", WATCHDOG, "counterweight-undo-watchdog"])
                .arg(owner.to_string())
                .arg(&undo.script)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| HarnessError::io("starting an undo watchdog", e))?
        };
        undo.watchdog = Some(watchdog);
        Ok(undo)
    }

    /// Adds a step; steps run last-added first.
    pub fn push(&mut self, step: impl Into<String>) -> Result<(), HarnessError> {
        self.steps.push(step.into());
        self.write()
    }

    /// Runs the steps now (last-added first) and forgets them.
    pub fn run(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if self.steps.is_empty() {
            let _ = std::fs::remove_file(&self.script);
            return;
        }
        match Command::new("sh")
            .arg(&self.script)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if !out.status.success() => tracing::warn!(
                script = %self.script.display(),
                stderr = %String::from_utf8_lossy(&out.stderr),
                "undo script failed"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not run the undo script"),
        }
        self.steps.clear();
        let _ = std::fs::remove_file(&self.script);
    }

    fn write(&self) -> Result<(), HarnessError> {
        let mut text = String::from("# written by counterweight-harness; steps run bottom-up\n");
        for step in self.steps.iter().rev() {
            text.push_str(step);
            text.push('\n');
        }
        let tmp = self.script.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.script))
            .map_err(|e| HarnessError::io(format!("writing {}", self.script.display()), e))
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.run();
    }
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn steps_run_in_reverse_on_drop() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for {UNDO_DIR}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let l = sh_quote(&log.display().to_string());
        let mut undo = Undo::new(&format!("unit-{}", std::process::id())).unwrap();
        undo.push(format!("echo first >> {l}")).unwrap();
        undo.push(format!("echo second >> {l}")).unwrap();
        let script = undo.script.clone();
        assert!(script.is_file());
        drop(undo);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "second\nfirst\n",
            "undo steps run last-added first"
        );
        assert!(!script.exists(), "the script is removed after it ran");
    }

    #[test]
    fn the_watchdog_runs_the_steps_when_the_owner_dies_without_drop() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for {UNDO_DIR}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let l = sh_quote(&log.display().to_string());
        // Stands in for a test process that gets SIGKILLed.
        let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
        let mut undo =
            Undo::owned_by(&format!("unit-owner-{}", std::process::id()), owner.id()).unwrap();
        undo.push(format!("echo first >> {l}")).unwrap();
        undo.push(format!("echo second >> {l}")).unwrap();
        let script = undo.script.clone();
        // What a killed process leaves: the script and its watchdog, no Drop.
        let watchdog = undo.watchdog.take().unwrap();
        std::mem::forget(undo);
        owner.kill().unwrap();
        owner.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while script.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            !script.exists(),
            "the watchdog did not run the script within 10 s"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "second\nfirst\n");
        let mut watchdog = watchdog;
        let _ = watchdog.wait();
    }

    #[test]
    fn quoting_survives_single_quotes() {
        let out = Command::new("sh")
            .args(["-c", &format!("printf %s {}", sh_quote("a'b c"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a'b c");
    }
}
