//! Counterweight's synchronization pods (claims 6-7, FIG. 1-2): the data a
//! standby needs to take over "immediately" follows the active cluster.
//!
//! Two kinds of data, both moved by proven tools rather than home-made
//! replication:
//!
//! - [`db`]: PostgreSQL physical streaming replication. The active side's
//!   server is the primary; standbys run hot standbys made with
//!   `pg_basebackup -R`. On promotion the local replica is promoted with
//!   `pg_promote()`; a demoted primary is stopped (fenced), rewound with
//!   `pg_rewind` and restarted as a standby of the new primary. Replication
//!   lag is read from the server and [`db::Lag::ready_to_promote`] turns it
//!   into a `ready`/`refuse` answer for the FIG. 9 prepare step.
//! - [`files`]: one-way replication of a directory with `rsync`, driven by
//!   inotify through the `notify` crate with debounced batches, and a
//!   watermark (last fully synced change and its time).
//!
//! Every decision is a pure function ([`db::decide()`], [`files::Debouncer`],
//! [`db::Lag::ready_to_promote`]) unit-tested without I/O; the supervisors
//! around them only observe and act. The role and epoch come from the state
//! ConfigMap's `state` and `epoch` keys ([`role`]).

pub mod db;
pub mod error;
pub mod files;
pub mod role;

pub use error::SyncError;
