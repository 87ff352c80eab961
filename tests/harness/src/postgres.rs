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
    settings: Vec<(String, String)>,
}

/// How a test server is initialized and run; [`Postgres::start`] uses the
/// default (no extra settings, no checksums).
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Extra `-c name=value` settings on the server command line. They win
    /// over `postgresql.conf` and `postgresql.auto.conf`, so settings that
    /// must change at run time (`primary_conninfo`,
    /// `synchronous_standby_names`) do not belong here.
    pub settings: Vec<(String, String)>,
    /// `initdb --data-checksums`; `pg_rewind` needs this or `wal_log_hints`.
    pub data_checksums: bool,
    /// Serve TLS (`ssl = on`) with this certificate and key (PEM), e.g.
    /// issued by the `certs` crate. Plain connections stay allowed.
    pub tls: Option<ServerTls>,
}

/// A server certificate and key for [`PgOptions::tls`].
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for ServerTls {
    // Never print the key, even in test failure output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl PgOptions {
    /// Settings for a streaming-replication pair that `pg_rewind` can
    /// repair: data checksums (recorded in the control file for good;
    /// `wal_log_hints` given with `-c` alone is lost when `pg_rewind`
    /// recovers a crashed target in single-user mode without it), hint bits
    /// WAL-logged too, enough WAL kept for a rewound or lagging
    /// standby to catch up without an archive, fast feedback from standbys.
    pub fn replication() -> Self {
        let set = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        Self {
            settings: vec![
                set("wal_level", "replica"),
                set("wal_log_hints", "on"),
                set("max_wal_senders", "10"),
                set("wal_keep_size", "512MB"),
                set("hot_standby", "on"),
                set("wal_receiver_status_interval", "1s"),
                set("wal_sender_timeout", "10s"),
                set("wal_receiver_timeout", "10s"),
                set("wal_retrieve_retry_interval", "500ms"),
            ],
            data_checksums: true,
            tls: None,
        }
    }
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
        Self::start_with(PgOptions::default()).await
    }

    /// Like [`Postgres::start`], with options.
    pub async fn start_with(options: PgOptions) -> Result<Self, HarnessError> {
        let password = format!("pw-{}", free_port()?);
        let mut pg = Self::unstarted(options.clone(), &password)?;
        let pwfile = pg.dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)
            .map_err(|e| HarnessError::io("writing the password file", e))?;
        chown_to_pg(pg.dir.path())?;
        let data = pg.data_dir();
        let mut initdb_args = vec![
            format!("--pgdata={}", data.display()),
            format!("--username={PG_USER}"),
            "--auth=scram-sha-256".into(),
            format!("--pwfile={}", pwfile.display()),
            "--no-sync".into(),
        ];
        if options.data_checksums {
            initdb_args.push("--data-checksums".into());
        }
        let (prog, args) = as_pg_user(&pg.bin.join("initdb"), &initdb_args);
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
        if !options.settings.is_empty() {
            // Also in postgresql.conf, not only on the command line: tools
            // that start the server themselves (pg_rewind's single-user
            // crash recovery) must see wal_keep_size and friends, or that
            // recovery recycles the WAL pg_rewind then needs. Base backups
            // copy the file to replicas.
            use std::io::Write;
            let conf = data.join("postgresql.conf");
            let lines: String = options
                .settings
                .iter()
                .map(|(k, v)| format!("{k} = '{v}'\n"))
                .collect();
            std::fs::OpenOptions::new()
                .append(true)
                .open(&conf)
                .and_then(|mut f| f.write_all(lines.as_bytes()))
                .map_err(|e| HarnessError::io("appending settings to postgresql.conf", e))?;
        }
        if let Some(tls) = &options.tls {
            // PostgreSQL refuses a key readable by others; the files live in
            // the server's own directory, given to the server user below.
            use std::os::unix::fs::PermissionsExt;
            let (cert, key) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
            );
            std::fs::write(&cert, &tls.cert_pem)
                .and_then(|()| std::fs::write(&key, &tls.key_pem))
                .and_then(|()| {
                    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| HarnessError::io("writing the server's TLS files", e))?;
            chown_to_pg(pg.dir.path())?;
            for (k, v) in [
                ("ssl", "on".to_owned()),
                ("ssl_cert_file", cert.display().to_string()),
                ("ssl_key_file", key.display().to_string()),
            ] {
                pg.settings.push((k.to_owned(), v));
            }
        }
        pg.resume().await?;
        Ok(pg)
    }

    /// A directory (owned by the server user), port and password for a
    /// server whose data directory the caller creates, e.g. a replica made
    /// with `pg_basebackup` into [`Postgres::data_dir`]. Nothing runs until
    /// [`Postgres::resume`]. `password` is the one the data will carry (a
    /// base backup copies the primary's users).
    pub fn unstarted(options: PgOptions, password: &str) -> Result<Self, HarnessError> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("counterweight-pg-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the PostgreSQL directory", e))?;
        chown_to_pg(dir.path())?;
        Ok(Self {
            bin,
            port: free_port()?,
            dir,
            password: password.to_owned(),
            process: None,
            settings: options.settings,
        })
    }

    /// Directory of the server binaries (`pg_ctl`, `pg_rewind`, `pgbench`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The server's own directory: socket, log, and `data/` below it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether this handle started the server and has not stopped it.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// The server user when tests run as root (`postgres`), else `None`:
    /// tools that touch the data directory must run as this user.
    pub fn run_as() -> Option<&'static str> {
        is_root().then_some("postgres")
    }

    /// Clean shutdown (`pg_ctl stop -m fast`): the server writes a shutdown
    /// checkpoint and sends all WAL to connected standbys first, which is
    /// what a planned switchover and `pg_rewind` rely on.
    pub fn stop_fast(&mut self) -> Result<(), HarnessError> {
        if self.process.is_none() {
            return Ok(());
        }
        let (prog, args) = as_pg_user(
            &self.bin.join("pg_ctl"),
            &[
                "stop".into(),
                "-m".into(),
                "fast".into(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-D".into(),
                self.data_dir().display().to_string(),
            ],
        );
        let out = Command::new(&prog)
            .args(&args)
            .output()
            .map_err(|e| HarnessError::io("running pg_ctl stop", e))?;
        // Reap (or, if pg_ctl failed, kill) what is left of the group.
        self.stop();
        if !out.status.success() {
            return Err(HarnessError::Exited {
                name: "pg_ctl stop".into(),
                status: out.status.to_string(),
                log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Kills the server at once (SIGKILL to its process group), like a
    /// machine loss: no shutdown checkpoint, no last WAL sent.
    ///
    /// Only the postmaster is killed first, so that its parent (`runuser`
    /// under root) reaps it: killing the whole group at once would orphan
    /// it, and a zombie postmaster left for PID 1 to reap keeps
    /// `postmaster.pid` looking alive to the next server or `pg_rewind`.
    /// Its backends exit when they notice it is gone; any left are killed
    /// with the group.
    pub fn crash(&mut self) {
        let Some(mut p) = self.process.take() else {
            return;
        };
        let pid = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            p.reap(Instant::now() + Duration::from_secs(10));
        } else {
            p.kill();
        }
    }

    /// Path of the server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }
}

/// Gives `dir` to the server user when we are root (PostgreSQL refuses a
/// data directory it does not own).
fn chown_to_pg(dir: &Path) -> Result<(), HarnessError> {
    if is_root() {
        // The server user must own its directory.
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .map_err(|e| HarnessError::io("chown of the PostgreSQL directory", e))?;
        if !status.success() {
            return Err(HarnessError::io(
                "chown of the PostgreSQL directory",
                std::io::Error::other(status.to_string()),
            ));
        }
    }
    Ok(())
}

impl Postgres {
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
        let mut server_args: Vec<String> = vec![
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
        ];
        for (name, value) in &self.settings {
            server_args.push("-c".into());
            server_args.push(format!("{name}={value}"));
        }
        let (prog, args) = as_pg_user(&self.bin.join("postgres"), &server_args);
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
