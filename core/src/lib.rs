//! The pure decision core of Counterweight.
//!
//! Every decision the system makes lives here as a plain function or state
//! machine: the weighted health score of Table 1 ([`health`]), the health
//! policy ([`policy`]), the active/standby protocol ([`ha`]), the state
//! record shared through the `counterweight-state` ConfigMap ([`state`]) and
//! the init-gate injection patch ([`inject`]). Nothing in this crate performs
//! I/O, reads a clock or talks to Kubernetes; the binaries observe the world,
//! call into this crate, and carry out what it returns. Time enters as plain
//! values. That keeps the logic table-testable and lets the model checker run
//! the real code.

pub mod bounded;
pub mod clock;
pub mod ha;
pub mod health;
pub mod inject;
pub mod leader;
pub mod names;
pub mod policy;
pub mod replication;
pub mod request;
pub mod serving;
pub mod state;
pub mod workload;
