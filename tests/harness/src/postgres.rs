//! A real PostgreSQL server on loopback, from Debian's packages.
//!
//! Tests of the FIG. 8 "database connection return" check and of database
//! replication need a real server, not a mock. The server runs from a fresh
//! data directory with password (SCRAM) authentication on 127.0.0.1 only.
//! PostgreSQL refuses to run as root, so under root it runs as the
//! `postgres` system user through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{HarnessError, Process, free_port};

/// User created by `initdb` for tests.
pub const PG_USER: &str = "counterweight";

/// A running (or stopped) PostgreSQL server owned by a test.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    process: Option<Process>,
}

fn pg_bin_dir() -> Result<PathBuf, HarnessError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            HarnessError::io(
                "looking for PostgreSQL in /usr/lib/postgresql (apt-get install postgresql)",
                e,
            )
        })?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        HarnessError::io(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin",
            std::io::Error::new(std::io::ErrorKind::NotFound, "apt-get install postgresql"),
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The command to run `program`, as the `postgres` user when we are root.
fn as_pg_user(program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    if is_root() {
        let mut all = vec![
            "-u".to_owned(),
            "postgres".to_owned(),
            "--".to_owned(),
            program.display().to_string(),
        ];
        all.extend(args.iter().cloned());
        (PathBuf::from("runuser"), all)
    } else {
        (program.to_owned(), args.to_vec())
    }
}

impl Postgres {
    /// Initializes a data directory and starts the server on a free port.
    pub async fn start() -> Result<Self, HarnessError> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("counterweight-pg-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the PostgreSQL directory", e))?;
        let password = format!("pw-{}", free_port()?);
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)
            .map_err(|e| HarnessError::io("writing the password file", e))?;
        if is_root() {
            // The server user must own its directory.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| HarnessError::io("chown of the PostgreSQL directory", e))?;
            if !status.success() {
                return Err(HarnessError::io(
                    "chown of the PostgreSQL directory",
                    std::io::Error::other(status.to_string()),
                ));
            }
        }
        let data = dir.path().join("data");
        let (prog, args) = as_pg_user(
            &bin.join("initdb"),
            &[
                format!("--pgdata={}", data.display()),
                format!("--username={PG_USER}"),
                "--auth=scram-sha-256".into(),
                format!("--pwfile={}", pwfile.display()),
                "--no-sync".into(),
            ],
        );
        let out = Command::new(&prog)
            .args(&args)
            .output()
            .map_err(|e| HarnessError::io("running initdb", e))?;
        if !out.status.success() {
            return Err(HarnessError::Exited {
                name: "initdb".into(),
                status: out.status.to_string(),
                log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut pg = Self {
            bin,
            port: free_port()?,
            dir,
            password,
            process: None,
        };
        pg.resume().await?;
        Ok(pg)
    }

    /// Loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Password of [`PG_USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server (fast shutdown); the data is kept.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts the server again and waits until it accepts connections.
    pub async fn resume(&mut self) -> Result<(), HarnessError> {
        if self.process.is_some() {
            return Ok(());
        }
        let socket_dir = self.dir.path().display().to_string();
        let (prog, args) = as_pg_user(
            &self.bin.join("postgres"),
            &[
                "-D".into(),
                self.data_dir().display().to_string(),
                "-p".into(),
                self.port.to_string(),
                "-k".into(),
                socket_dir,
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                "fsync=off".into(),
            ],
        );
        let log = self.dir.path().join("postgres.log");
        let mut process = Process::spawn("postgres", &prog, &args, &log)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            process.check_alive()?;
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    cluster: "postgres".into(),
                    what: "PostgreSQL to accept connections".into(),
                    after: Duration::from_secs(60),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.process = Some(process);
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
