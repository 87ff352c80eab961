//! The sample EMS's data in real pods, read and written the way an operator
//! would with `kubectl`: PostgreSQL rows through the `ems-db` Service (TLS,
//! the `postgres` role's password from the pod's mounted Secret), the
//! database's role as PostgreSQL itself reports it, and files in the
//! `ems-files` volume. For the real-node install test (issue 15), where the
//! database and the rsync copy run in pods of the project's images.
//!
//! Every call is one `kubectl` process with a deadline; a failure is an
//! `Err` with kubectl's output, for the test's bounded polls.

use std::path::PathBuf;
use std::time::Duration;

use crate::install::{InstallError, run_bounded};

/// The database pod of the sample (`StatefulSet` `ems-db`, one replica).
pub const DB_POD: &str = "ems-db-0";
/// The file-replication pod of the sample (`StatefulSet` `ems-files`).
pub const FILES_POD: &str = "ems-files-0";
/// The container of both sync pods that runs `counterweight-sync`.
const SYNC_CONTAINER: &str = "sync";
/// How long one kubectl call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// kubectl with one kubeconfig, one context per cluster.
#[derive(Clone, Debug)]
pub struct Kubectl {
    /// The kubectl binary.
    pub bin: PathBuf,
    /// The kubeconfig with a context per cluster.
    pub kubeconfig: PathBuf,
}

/// What PostgreSQL reports about its role in its pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbRole {
    /// `pg_is_in_recovery()`: a standby (or being promoted).
    pub in_recovery: bool,
    /// The timeline it writes (a primary) or receives (a standby; 0 with no
    /// WAL receiver): a promotion starts a new one, and a standby that
    /// follows the new primary receives on it.
    pub timeline: u32,
    /// `synchronous_standby_names` as the server runs with it.
    pub synchronous_standby_names: String,
    /// Standbys streaming from it with their `sync_state`
    /// (`application_name=sync_state`), from `pg_stat_replication`.
    pub standbys: Vec<String>,
    /// Its WAL receiver's status (`streaming`), empty when it has none.
    pub receiver: String,
}

impl Kubectl {
    /// Runs kubectl against `context` with `args`, bounded by 30 s; its
    /// stdout, or why not.
    pub async fn run_checked(&self, context: &str, args: &[&str]) -> Result<String, InstallError> {
        let mut kubectl = tokio::process::Command::new(&self.bin);
        kubectl
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--context={context}"))
            .args(args);
        let what = format!("kubectl --context={context} {}", args.join(" "));
        run_bounded(kubectl, what, CALL_TIMEOUT).await
    }

    /// [`Kubectl::run_checked`] with the error as text, for bounded polls.
    pub async fn run(&self, context: &str, args: &[&str]) -> Result<String, String> {
        self.run_checked(context, args)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs `script` with bash in `container` of the `ems` pod `pod`, with
    /// `args` as `$1...`; its stdout.
    async fn exec(
        &self,
        context: &str,
        pod: &str,
        script: &str,
        args: &[&str],
    ) -> Result<String, String> {
        let mut argv = vec![
            "-n",
            "ems",
            "exec",
            pod,
            "-c",
            SYNC_CONTAINER,
            "--",
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
            "sh",
        ];
        argv.extend_from_slice(args);
        self.run(context, &argv).await
    }

    /// Runs `sql` (one statement, or several separated by `;`) in database
    /// `postgres` as `postgres`, through `context`'s `ems-db` Service
    /// address with TLS, from inside its database pod: a client of the EMS
    /// would reach the database the same way. Unaligned tuples-only output.
    pub async fn sql_via_service(&self, context: &str, sql: &str) -> Result<String, String> {
        let ip = self
            .run(
                context,
                &[
                    "-n",
                    "ems",
                    "get",
                    "service",
                    "ems-db",
                    "-o",
                    "jsonpath={.spec.clusterIP}",
                ],
            )
            .await?;
        let ip = ip.trim();
        if ip.is_empty() {
            return Err(format!("{context}'s ems-db Service has no cluster IP"));
        }
        self.exec(
            context,
            DB_POD,
            r#"PGPASSWORD=$(cat /etc/counterweight/db-credentials/postgres-password) \
               PGCONNECT_TIMEOUT=5 PGOPTIONS='-c statement_timeout=20000' \
               psql "host=$1 port=5432 dbname=postgres user=postgres sslmode=require" \
                 -v ON_ERROR_STOP=1 -Atq -c "$2""#,
            &[ip, sql],
        )
        .await
        .map(|s| s.trim().to_owned())
    }

    /// Runs `sql` on the local server of `context`'s database pod, over its
    /// Unix socket (peer authentication): for reading a standby, whose
    /// Service has no writer.
    pub async fn sql_local(&self, context: &str, sql: &str) -> Result<String, String> {
        self.exec(
            context,
            DB_POD,
            r#"PGCONNECT_TIMEOUT=5 psql -h /var/run/postgresql -d postgres -U postgres \
                 -v ON_ERROR_STOP=1 -Atq -c "$1""#,
            &[sql],
        )
        .await
        .map(|s| s.trim().to_owned())
    }

    /// What PostgreSQL in `context`'s database pod says about its role.
    pub async fn db_role(&self, context: &str) -> Result<DbRole, String> {
        let out = self
            .sql_local(
                context,
                "SELECT pg_is_in_recovery(), \
                   CASE WHEN pg_is_in_recovery() \
                     THEN (SELECT coalesce(max(received_tli), 0) FROM pg_stat_wal_receiver) \
                     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int \
                   END, \
                   current_setting('synchronous_standby_names'), \
                   (SELECT coalesce(string_agg(application_name || '=' || sync_state, ','), '') \
                      FROM pg_stat_replication), \
                   (SELECT coalesce(max(status), '') FROM pg_stat_wal_receiver)",
            )
            .await?;
        let f: Vec<&str> = out.split('|').collect();
        let [rec, tli, names, standbys, receiver] = f[..] else {
            return Err(format!(
                "unexpected answer from {context}'s database: {out:?}"
            ));
        };
        Ok(DbRole {
            in_recovery: rec == "t",
            timeline: tli
                .parse()
                .map_err(|e| format!("timeline {tli:?} from {context}: {e}"))?,
            synchronous_standby_names: names.to_owned(),
            standbys: standbys
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            receiver: receiver.to_owned(),
        })
    }

    /// The sync supervisor's log lines of `context`'s database pod that
    /// contain `needle`.
    pub async fn db_log_lines(&self, context: &str, needle: &str) -> Result<Vec<String>, String> {
        let log = self
            .run(
                context,
                &["-n", "ems", "logs", DB_POD, "-c", SYNC_CONTAINER],
            )
            .await?;
        Ok(log
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect())
    }

    /// Writes `content` to `/data/<name>` in `context`'s file-replication
    /// pod (the replicated volume), atomically (a temporary name, then a
    /// rename), as the EMS would.
    pub async fn write_file(&self, context: &str, name: &str, content: &str) -> Result<(), String> {
        self.exec(
            context,
            FILES_POD,
            r#"printf '%s' "$2" > "/data/.$1.tmp" && mv "/data/.$1.tmp" "/data/$1""#,
            &[name, content],
        )
        .await
        .map(drop)
    }

    /// The content of `/data/<name>` in `context`'s file-replication pod,
    /// `None` when there is no such file.
    pub async fn read_file(&self, context: &str, name: &str) -> Result<Option<String>, String> {
        let out = self
            .exec(
                context,
                FILES_POD,
                r#"if [ -e "/data/$1" ]; then printf 'present:'; cat "/data/$1"; else printf absent; fi"#,
                &[name],
            )
            .await?;
        Ok(out.strip_prefix("present:").map(str::to_owned))
    }
}
