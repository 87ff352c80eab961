//! The properties the fuzz targets check, one module per target, each with
//! a `check(data: &[u8])` that panics when a property does not hold.
//!
//! They live here, in the main workspace, so that they are written once and
//! run twice: by the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer,
//! coverage-guided; each target is `timed(name, data, check)`), and by this
//! crate's `tests/corpus.rs` on stable in `cargo test --workspace`, which
//! feeds every committed file of `fuzz/corpus/<target>/` to the same
//! `check`. A change that breaks a property on an input the fuzzer once
//! found interesting then fails the normal suite, without libFuzzer.
//!
//! [`TARGETS`] names each target with its check; the corpus test and the
//! fuzz targets agree on the names (`fuzz/Cargo.toml`'s `[[bin]]`s).

pub mod admission_pod;
pub mod admission_review;
pub mod command_request;
pub mod ha_config;
pub mod peer_message;
pub mod policy;
pub mod state_record;
pub mod support;

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// Every fuzz target, by the name of its `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`, with its check.
pub const TARGETS: [(&str, Check); 7] = [
    ("admission_pod", admission_pod::check),
    ("admission_review", admission_review::check),
    ("command_request", command_request::check),
    ("ha_config", ha_config::check),
    ("peer_message", peer_message::check),
    ("policy", policy::check),
    ("state_record", state_record::check),
];
