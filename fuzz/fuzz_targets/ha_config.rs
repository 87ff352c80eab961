//! Fuzz target: the HA configuration file.
//!
//! The input is the `ha.yaml` file (YAML or JSON). `HaConfig::from_yaml`
//! must answer within the time bar; a configuration it reads must either be
//! refused by `HaConfig::validate` or keep what validation promises (at
//! least two clusters, unique non-empty member names, non-zero timings and a
//! lease longer than the probe interval, the margin and the clock-skew bound
//! together) and read back unchanged once written as JSON.
//!
//! A validated configuration is then run: its first three members are
//! started from no record and, if a cluster, from a record as active, and driven alone
//! through its timers, as the controller would. A configuration that passes
//! validation must never make the state machine panic or overflow its
//! arithmetic (the targets are built with debug assertions).
//!
//! The check itself is `counterweight_fuzz_props::ha_config::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/ha_config/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("ha_config", data, counterweight_fuzz_props::ha_config::check));
