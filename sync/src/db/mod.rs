//! PostgreSQL streaming replication that follows the active cluster.
//!
//! Pure parts: [`decide()`] (what to do with the local server given the role,
//! epoch and what is observed), [`ConnParams`] rendering; the promotion
//! rule ([`Lag::ready_to_promote`]) and [`Lsn`] arithmetic are
//! `counterweight_core::replication`'s. I/O parts: [`pg`] (queries over
//! `tokio-postgres`), [`tools`] (`pg_basebackup`, `pg_rewind`, `pg_ctl`)
//! and [`supervisor`] (observe, decide, act, one step at a time).
//!
//! Safety precondition of promotion: the caller's state says `active` in an
//! epoch only after the previous active has fenced (see [`crate::role`]).
//! As a second line, [`decide()`] does not promote while any peer database is
//! still reachable as a primary: the old side's sync pod stops its server
//! when its state turns `standby`, and promotion waits for that.

pub mod conninfo;
pub mod decide;
pub mod lag;
pub mod pg;
pub mod supervisor;
pub mod tls;
pub mod tools;

pub use conninfo::ConnParams;
pub use decide::{Action, Observation, PeerState, Upstream, decide};
pub use lag::{Lag, Lsn, RefuseReason, ReplicaLag, within_failover_lag};
pub use supervisor::{DbConfig, DbSupervisor, Peer, ServerControl};
pub use tools::Tools;
