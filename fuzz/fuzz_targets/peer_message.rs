//! Fuzz target: the peer message decoder, and what a node does with a
//! message.
//!
//! The input is one or more request bodies of the peer endpoint, one per
//! line. `Envelope::from_json` must decode each or refuse it; an envelope
//! it decodes must encode and decode back to itself (what one node writes,
//! the other reads).
//!
//! The peer server hands a decoded envelope to the HA state machine once
//! mutual TLS has shown that `from` is a configured peer; a member can
//! still send anything (a bug, another version, a hand-edited record), and
//! no message may make the receiver panic or overflow. So the messages from
//! a member to a member are delivered, in order, to the first one's
//! addressee in a three-member group
//! (`east`, `west`, witness `witness`, the timings of
//! `manifests/base/controller/ha-config.yaml`), started fresh and as a
//! restarted active, which is then driven through its timers, checking that
//! everything it sends encodes.
//!
//! The check itself is `counterweight_fuzz_props::peer_message::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/peer_message/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("peer_message", data, counterweight_fuzz_props::peer_message::check));
