//! PostgreSQL's own tools, run as child processes: `pg_basebackup` (make a
//! standby), `pg_rewind` (turn a former primary into a standby of the new
//! one) and `pg_ctl` (start and stop the server the sidecar supervises).
//!
//! Tools that touch the data directory must run as its owner. In a pod the
//! sidecar already runs as the server's user; tests running as root set
//! [`Tools::run_as`] and the tools run through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::conninfo::ConnParams;
use crate::SyncError;

/// Where the tools are and as whom to run them.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Directory holding `pg_ctl`, `pg_rewind`, `pg_basebackup`.
    pub bin_dir: PathBuf,
    /// Run as this user through `runuser` (only when started as root).
    pub run_as: Option<String>,
}

/// Keeps the last `max` bytes of a tool's output for error messages.
fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim().to_owned()
}

impl Tools {
    /// The tools in `bin_dir`, run as the current user.
    pub fn new(bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            bin_dir: bin_dir.into(),
            run_as: None,
        }
    }

    fn command(&self, tool: &str) -> tokio::process::Command {
        let program = self.bin_dir.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = tokio::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => tokio::process::Command::new(&program),
        };
        // The server user may not be able to enter the caller's directory.
        cmd.current_dir("/").stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Runs `tool` with `args`, the password (if any) in `PGPASSWORD`
    /// rather than on the command line. Returns its standard output.
    async fn run(
        &self,
        tool: &str,
        args: &[String],
        password: Option<&str>,
    ) -> Result<String, SyncError> {
        let mut cmd = self.command(tool);
        cmd.args(args);
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        tracing::info!(tool, ?args, "running");
        let out = cmd.output().await.map_err(|e| SyncError::Tool {
            tool: tool.to_owned(),
            status: format!("could not start: {e}"),
            stderr: String::new(),
        })?;
        if !out.status.success() {
            return Err(SyncError::Tool {
                tool: tool.to_owned(),
                status: out.status.to_string(),
                stderr: tail(&out.stderr, 2000),
            });
        }
        // pg_rewind and pg_basebackup report what they did on stderr.
        tracing::info!(tool, output = %tail(&out.stderr, 2000), "finished");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `pg_basebackup -R`: copies `from` into the (absent or empty)
    /// `data_dir` and configures it as a standby streaming from `from`
    /// (`standby.signal`, `primary_conninfo` with `from`'s application
    /// name). WAL is streamed during the copy so the backup is consistent
    /// without an archive.
    pub async fn base_backup(&self, from: &ConnParams, data_dir: &Path) -> Result<(), SyncError> {
        let args = vec![
            format!("--pgdata={}", data_dir.display()),
            "--write-recovery-conf".into(),
            "--wal-method=stream".into(),
            "--checkpoint=fast".into(),
            format!("--dbname={}", from.conninfo(false)),
        ];
        self.run("pg_basebackup", &args, from.password.as_deref())
            .await
            .map(drop)
    }

    /// `pg_rewind -R`: makes the stopped former primary in `data_dir`
    /// consistent with `from` (copying the blocks changed since the
    /// timelines forked) and configures it as `from`'s standby. Needs
    /// `wal_log_hints = on` or data checksums. A target that crashed is
    /// first recovered by `pg_rewind` itself (single-user mode).
    pub async fn rewind(&self, from: &ConnParams, data_dir: &Path) -> Result<(), SyncError> {
        let args = vec![
            format!("--target-pgdata={}", data_dir.display()),
            format!("--source-server={}", from.conninfo(true)),
            "--write-recovery-conf".into(),
        ];
        self.run("pg_rewind", &args, from.password.as_deref())
            .await
            .map(drop)
    }

    /// `pg_ctl start -w`: starts the server and waits until it accepts
    /// connections (or, for a standby, reaches a consistent state).
    /// `options` are passed to `postgres` (`-o`).
    pub async fn pg_ctl_start(
        &self,
        data_dir: &Path,
        log: &Path,
        options: &str,
    ) -> Result<(), SyncError> {
        let mut args = vec![
            "start".into(),
            "-w".into(),
            "-t".into(),
            "300".into(),
            "-D".into(),
            data_dir.display().to_string(),
            "-l".into(),
            log.display().to_string(),
        ];
        if !options.is_empty() {
            args.push("-o".into());
            args.push(options.to_owned());
        }
        // Not captured: the server pg_ctl leaves behind keeps whatever `-l`
        // opens, and the default log, /dev/stderr, is pg_ctl's own stderr.
        // Captured, that is the pipe `run` reads to its end, which never
        // comes while the server runs: the supervisor hung after its first
        // start (found in a pod, where the log is the container's). Passed
        // through, the server logs to the sidecar's stderr, the pod's log.
        let mut cmd = self.command("pg_ctl");
        cmd.args(&args)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        tracing::info!(tool = "pg_ctl", ?args, "running");
        let status = cmd.status().await.map_err(|e| SyncError::Tool {
            tool: "pg_ctl".to_owned(),
            status: format!("could not start: {e}"),
            stderr: String::new(),
        })?;
        if !status.success() {
            return Err(SyncError::Tool {
                tool: "pg_ctl".to_owned(),
                status: status.to_string(),
                stderr: format!("see the server log ({})", log.display()),
            });
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast -w`: clean shutdown; a primary sends all WAL
    /// to connected standbys before it exits.
    pub async fn pg_ctl_stop(&self, data_dir: &Path) -> Result<(), SyncError> {
        let args = vec![
            "stop".into(),
            "-m".into(),
            "fast".into(),
            "-w".into(),
            "-t".into(),
            "300".into(),
            "-D".into(),
            data_dir.display().to_string(),
        ];
        self.run("pg_ctl", &args, None).await.map(drop)
    }

    /// `pg_ctl status`: whether a server runs on `data_dir`.
    pub async fn pg_ctl_running(&self, data_dir: &Path) -> bool {
        let args = vec!["status".into(), "-D".into(), data_dir.display().to_string()];
        self.run("pg_ctl", &args, None).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `pg_ctl` that leaves a server behind holding its stderr, as the
    /// real one does with `-l /dev/stderr`.
    #[tokio::test]
    async fn start_returns_while_the_server_it_left_holds_stderr() {
        let dir = tempfile::tempdir().expect("dir");
        let fake = dir.path().join("pg_ctl");
        std::fs::write(&fake, "#!/bin/sh\nsleep 30 >> /dev/stderr &\nexit 0\n").expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let tools = Tools::new(dir.path());
        let started = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tools.pg_ctl_start(dir.path(), Path::new("/dev/stderr"), ""),
        )
        .await;
        assert!(
            matches!(started, Ok(Ok(()))),
            "pg_ctl start must return once pg_ctl exits: {started:?}"
        );
    }

    #[test]
    fn tails_keep_the_end_on_a_char_boundary() {
        assert_eq!(tail(b"abcdef", 3), "def");
        assert_eq!(tail("aé".as_bytes(), 1), "");
        assert_eq!(tail(b"x", 10), "x");
    }
}
