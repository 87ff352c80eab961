//! Properties of the `ha_config` fuzz target: the HA configuration file.
//!
//! The input is the `ha.yaml` file (YAML or JSON). `HaConfig::from_yaml`
//! must answer within the time bar; a configuration it reads must either be
//! refused by `HaConfig::validate` or keep what validation promises (at
//! least two clusters, unique member names that are cluster names (DNS
//! labels), non-zero timings and a
//! lease longer than the probe interval, the margin and the clock-skew bound
//! together) and read back unchanged once written as JSON.
//!
//! A validated configuration is then run: its first three members are
//! started from no record and, if a cluster, from a record as active, and driven alone
//! through its timers, as the controller would. A configuration that passes
//! validation must never make the state machine panic or overflow its
//! arithmetic (the targets are built with debug assertions).

use std::collections::BTreeSet;

use crate::support::{check_actions, drive, yaml_cannot_carry};
use counterweight_core::ha::{HaConfig, Node, Persisted, Vote};
use counterweight_core::names::check_cluster_name;
use counterweight_core::state::Role;

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    let Ok(config) = HaConfig::from_yaml(data) else {
        return;
    };
    // Written as JSON, read back by the YAML reader, as a file would be.
    // Except names the YAML 1.1 reader cannot read back from JSON (see
    // `yaml_cannot_carry`; found by this target, U+FFFF the second time;
    // `validate` refuses such names, but the file is read before).
    if !config.member_names().any(yaml_cannot_carry) {
        let written = serde_json::to_vec(&config).expect("a config serializes");
        let again = HaConfig::from_yaml(&written).expect("a written config reads back");
        assert_eq!(again, config, "{}", String::from_utf8_lossy(&written));
    }
    if config.validate().is_err() {
        return;
    }
    assert!(config.clusters.len() >= 2);
    let members: Vec<&str> = config.member_names().collect();
    assert_eq!(
        members.iter().collect::<BTreeSet<_>>().len(),
        members.len(),
        "unique members"
    );
    for name in &members {
        assert_eq!(check_cluster_name(name), Ok(()), "{name:?}");
    }
    assert!(config.quorum() >= 1 && config.quorum() <= members.len());
    assert!(config.lease_ms > config.probe_interval_ms.saturating_add(config.margin_ms));

    // Three members are enough to reach every role (a group may list
    // hundreds, and each would be run in full).
    for me in members.iter().take(3) {
        let active = config.is_cluster(me).then(|| Persisted {
            role: Role::Active,
            epoch: 3,
            vote: Some(Vote {
                epoch: 3,
                to: (*me).to_owned(),
            }),
            paused: false,
        });
        for stored in [None, active] {
            let mut now = 1_000;
            let (mut node, actions) = Node::start(config.clone(), me, stored, now)
                .expect("a validated config starts every member");
            check_actions(&actions);
            drive(&mut node, &mut now, 12);
        }
    }
}
