//! Fuzz target: the operator command request decoder.
//!
//! The input is the data of the `counterweight-command` ConfigMap, one
//! `key=value` per line (see `counterweight_fuzz::config_map`), decided by
//! `counterweight_core::request::decide` (the controller's reading) at a fixed instant (the
//! seeds' requests are filed around it). Whatever the data, the decision
//! must keep the rules its module documents: no `id` (or the one already
//! handled) is ignored; a forwarded command has a trimmed `id` of at most
//! `MAX_ID_LEN` bytes, a `requestedAt` that parses and is at most
//! `MAX_REQUEST_AGE` old, and, for a switchover, a target that is a
//! cluster name; a rejection names its `id` and gives a reason.
//!
//! The check itself is `counterweight_fuzz_props::command_request::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/command_request/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("command_request", data, counterweight_fuzz_props::command_request::check));
