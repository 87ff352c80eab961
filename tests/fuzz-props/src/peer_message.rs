//! Properties of the `peer_message` fuzz target: the peer message decoder, and what a node does with a
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

use std::sync::LazyLock;

use crate::support::{check_actions, drive};
use counterweight_core::ha::{ClusterSpec, Envelope, Event, HaConfig, Node, Persisted, Vote};
use counterweight_core::state::Role;

static CONFIG: LazyLock<HaConfig> = LazyLock::new(|| {
    let cluster = |name: &str, priority| ClusterSpec {
        name: name.into(),
        priority,
    };
    let mut c = HaConfig::new(
        vec![cluster("east", 2), cluster("west", 1)],
        Some("witness".into()),
    );
    c.probe_interval_ms = 1000;
    c.lease_ms = 6000;
    c.margin_ms = 2000;
    c.candidate_fresh_ms = 3000;
    c
});

/// Messages read from one input.
const MAX_MESSAGES: usize = 8;

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    // One message per line: several let a claim collect votes from more
    // than one peer, or a handover run through its steps.
    let mut messages = Vec::new();
    for line in data.split(|b| *b == b'\n').take(MAX_MESSAGES) {
        let Ok(env) = Envelope::from_json(line) else {
            continue;
        };
        let bytes = env.to_json().expect("a decoded envelope encodes");
        assert_eq!(
            Envelope::from_json(&bytes).expect("an encoded envelope decodes"),
            env
        );
        if CONFIG.is_member(&env.from) && CONFIG.is_member(&env.to) && env.from != env.to {
            messages.push(env);
        }
    }
    // Delivered to the addressee of the first; the node drops the others
    // that are not for it, as it would from the network.
    let Some(me) = messages.first().map(|env| env.to.clone()) else {
        return;
    };
    let active = CONFIG.is_cluster(&me).then(|| Persisted {
        role: Role::Active,
        epoch: 3,
        vote: Some(Vote {
            epoch: 3,
            to: me.clone(),
        }),
        paused: false,
    });
    for stored in [None, active] {
        let mut now = 1_000;
        let (mut node, actions) =
            Node::start(CONFIG.clone(), &me, stored, now).expect("the config is valid");
        check_actions(&actions);
        // Let a restarted active ask for its lease first, then deliver,
        // a step of its timers after each message, then run on.
        drive(&mut node, &mut now, 2);
        for env in &messages {
            check_actions(&node.handle(now, Event::Message(env.clone())));
            drive(&mut node, &mut now, 1);
        }
        drive(&mut node, &mut now, 10);
    }
}
