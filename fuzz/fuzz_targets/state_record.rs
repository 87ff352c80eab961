//! Fuzz target: the state records read from ConfigMaps.
//!
//! The input is ConfigMap data, one `key=value` per line (see
//! `counterweight_fuzz::config_map`). It is read as every reader reads it:
//! `RoleEpoch::from_data` (the init-gate, the sync agents),
//! `Persisted::from_data` (the controller's restart record),
//! `StateRecord::from_data` (`cwctl`: every key, informational ones too) and
//! `ServingLease::from_data` (the lease sidecar). Each must decode or
//! refuse; what decodes must write back to data that decodes to the same
//! record (the controller compares what it reads with what it wrote), and
//! a serving lease must survive the lease file that the sidecar writes for
//! the application whenever its cluster is a name the file can carry.
//!
//! A record that decodes is the one a restarting controller resumes from,
//! so a node of a three-member group is started from it and driven through
//! its timers: no record may make the state machine panic or overflow.
//!
//! The check itself is `counterweight_fuzz_props::state_record::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/state_record/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("state_record", data, counterweight_fuzz_props::state_record::check));
