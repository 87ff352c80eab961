//! Queries the sidecar runs against PostgreSQL over `tokio-postgres`:
//! recovery state, replication lag on either side, promotion, and the two
//! settings it manages (`primary_conninfo`, `synchronous_standby_names`).

use std::time::Duration;

use tokio_postgres::Client;

use super::conninfo::ConnParams;
use super::decide::PeerState;
use counterweight_core::replication::STANDBY_QUERY;

use super::lag::{Lag, Lsn, ReplicaLag};
use crate::SyncError;

/// Connects (bounded by `timeout`) and drives the connection in a task that
/// ends when the returned client is dropped.
/// TLS follows `params.sslmode` and `params.sslrootcert` as libpq would
/// ([`counterweight_pgtls`]); without an `sslmode` the connection is plain.
pub async fn connect(params: &ConnParams, timeout: Duration) -> Result<Client, SyncError> {
    let what = format!("connecting to {}:{}", params.host, params.port);
    let tls = super::tls::from_params(params)?;
    tokio::time::timeout(
        timeout,
        counterweight_pgtls::connect(params.tokio_config(timeout), &tls),
    )
    .await
    .map_err(|_| SyncError::Timeout { what: what.clone() })?
    .map_err(|e| SyncError::pg(what, e))
}

/// `pg_is_in_recovery()`.
pub async fn in_recovery(client: &Client) -> Result<bool, SyncError> {
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| SyncError::pg("pg_is_in_recovery()", e))?;
    Ok(row.get(0))
}

/// `current_setting(name)`.
pub async fn setting(client: &Client, name: &str) -> Result<String, SyncError> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(|e| SyncError::pg(format!("current_setting({name})"), e))?;
    Ok(row.get(0))
}

/// The local server's replication state as a standby sees it (core's
/// [`STANDBY_QUERY`], decoded by [`Lag::from_columns`]). On a primary it
/// returns `in_recovery: false` and no positions.
pub async fn standby_lag(client: &Client) -> Result<Lag, SyncError> {
    let row = client
        .query_one(STANDBY_QUERY, &[])
        .await
        .map_err(|e| SyncError::pg("reading standby lag", e))?;
    Lag::from_columns(
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    )
    .map_err(SyncError::from)
}

/// Every standby connected to the local primary (`pg_stat_replication`).
pub async fn replicas(client: &Client) -> Result<Vec<ReplicaLag>, SyncError> {
    let rows = client
        .query(
            "SELECT coalesce(application_name, ''), coalesce(state, ''), coalesce(sync_state, ''),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn)::int8,
                    extract(epoch FROM replay_lag)::float8
             FROM pg_stat_replication ORDER BY application_name",
            &[],
        )
        .await
        .map_err(|e| SyncError::pg("reading pg_stat_replication", e))?;
    Ok(rows
        .iter()
        .map(|r| ReplicaLag {
            application_name: r.get(0),
            state: r.get(1),
            sync_state: r.get(2),
            bytes: r.get::<_, Option<i64>>(3).map(|b| b.max(0).unsigned_abs()),
            unsent_bytes: r.get::<_, Option<i64>>(4).map(|b| b.max(0).unsigned_abs()),
            replay_seconds: r.get(5),
        })
        .collect())
}

/// The primary's current WAL write position (`pg_current_wal_lsn()`); what
/// an active puts in a prepare so the standby can measure its full lag.
pub async fn current_lsn(client: &Client) -> Result<Lsn, SyncError> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| SyncError::pg("pg_current_wal_lsn()", e))?;
    Ok(row.get::<_, String>(0).parse()?)
}

/// `pg_promote(true, wait_seconds)`: ends recovery after replaying all WAL
/// already received. Returns whether the promotion finished within the
/// wait.
pub async fn promote(client: &Client, wait_seconds: i32) -> Result<bool, SyncError> {
    let row = client
        .query_one("SELECT pg_promote(true, $1)", &[&wait_seconds])
        .await
        .map_err(|e| SyncError::pg("pg_promote()", e))?;
    Ok(row.get(0))
}

/// A SQL string literal (standard_conforming_strings is on since 9.1).
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The settings this crate changes at run time. A closed set, because
/// `ALTER SYSTEM` takes no bind parameters and names are not quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedSetting {
    /// Where a standby streams from.
    PrimaryConninfo,
    /// Which standbys a primary waits for on commit.
    SynchronousStandbyNames,
}

impl ManagedSetting {
    /// The GUC name.
    pub fn name(self) -> &'static str {
        match self {
            Self::PrimaryConninfo => "primary_conninfo",
            Self::SynchronousStandbyNames => "synchronous_standby_names",
        }
    }
}

/// `ALTER SYSTEM SET` then `pg_reload_conf()`; both settings take effect on
/// reload (`primary_conninfo` since PostgreSQL 13).
pub async fn alter_system(
    client: &Client,
    setting: ManagedSetting,
    value: &str,
) -> Result<(), SyncError> {
    let name = setting.name();
    // Two round trips: several statements in one simple query form one
    // implicit transaction, and ALTER SYSTEM refuses to run in one.
    client
        .batch_execute(&format!("ALTER SYSTEM SET {name} = {}", literal(value)))
        .await
        .map_err(|e| SyncError::pg(format!("ALTER SYSTEM SET {name}"), e))?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| SyncError::pg("pg_reload_conf()", e))
}

/// `pg_wal_replay_pause()` / `pg_wal_replay_resume()` on a standby.
pub async fn set_replay_paused(client: &Client, paused: bool) -> Result<(), SyncError> {
    let sql = if paused {
        "SELECT pg_wal_replay_pause()"
    } else {
        "SELECT pg_wal_replay_resume()"
    };
    client
        .batch_execute(sql)
        .await
        .map_err(|e| SyncError::pg(sql, e))
}

/// What a peer database is, or [`PeerState::Unreachable`] if it does not
/// answer within `timeout`.
pub async fn peer_state(params: &ConnParams, timeout: Duration) -> PeerState {
    let probe = async {
        let client = connect(params, timeout).await?;
        in_recovery(&client).await
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(true)) => PeerState::Standby,
        Ok(Ok(false)) => PeerState::Primary,
        Ok(Err(e)) => {
            tracing::debug!(host = %params.host, port = params.port, error = %e, "peer unreachable");
            PeerState::Unreachable
        }
        Err(_) => PeerState::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("FIRST 1 (b)"), "'FIRST 1 (b)'");
        assert_eq!(literal("a'b"), "'a''b'");
    }
}
