//! The pure decision core of Counterweight.
//!
//! Every decision the system makes lives here as a plain function or state
//! machine: the weighted health score of Table 1, the active/standby protocol,
//! policy validation and the init-gate injection patch. Nothing in this crate
//! performs I/O, reads a clock or touches Kubernetes; the binaries observe the
//! world, call into this crate, and carry out what it returns. That keeps the
//! logic table-testable and lets the model checker run the real code.

pub mod names;
