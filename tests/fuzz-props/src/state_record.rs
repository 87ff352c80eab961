//! Properties of the `state_record` fuzz target: the state records read from ConfigMaps.
//!
//! The input is ConfigMap data, one `key=value` per line (see
//! `crate::support::config_map`). It is read as every reader reads it:
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

use std::sync::LazyLock;

use crate::support::{check_actions, config_map, drive};
use counterweight_core::ha::{ClusterSpec, HaConfig, Node, Persisted};
use counterweight_core::serving::ServingLease;
use counterweight_core::state::{HaView, Part, RoleEpoch, StateRecord, Transition};

static CONFIG: LazyLock<HaConfig> = LazyLock::new(|| {
    let cluster = |name: &str, priority| ClusterSpec {
        name: name.into(),
        priority,
    };
    HaConfig::new(
        vec![cluster("east", 2), cluster("west", 1)],
        Some("witness".into()),
    )
});

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    if data.is_empty() {
        assert!(RoleEpoch::from_data(None).is_err());
        assert!(Persisted::from_data(None).is_err());
    }
    let map = config_map(data);

    if let Ok(re) = RoleEpoch::from_data(Some(&map)) {
        let mut written = map.clone();
        re.write_to(&mut written);
        assert_eq!(RoleEpoch::from_data(Some(&written)), Ok(re));
    }

    if let Ok(lease) = ServingLease::from_data(&map) {
        assert_eq!(ServingLease::from_data(&lease.to_data()), Ok(lease.clone()));
        if !lease.cluster.is_empty() && !lease.cluster.contains(char::is_whitespace) {
            assert_eq!(ServingLease::from_file(&lease.to_file()), Some(lease));
        }
    }

    // cwctl's reader: the protocol's part as the controller reads it, and
    // each informational part it read writes back to itself.
    let whole = StateRecord::from_data(Some(&map));
    assert_eq!(whole.persisted, Persisted::from_data(Some(&map)));
    if let Some(view) = &whole.ha {
        assert_eq!(HaView::decode(&view.encode()).as_ref(), Ok(view));
    }
    if let Some(t) = &whole.last_transition {
        assert_eq!(Transition::decode(&t.encode()).as_ref(), Ok(t));
    }

    let Ok(record) = Persisted::from_data(Some(&map)) else {
        return;
    };
    let mut written = map.clone();
    record.write_to(&mut written);
    assert_eq!(Persisted::from_data(Some(&written)), Ok(record.clone()));
    assert_eq!(
        RoleEpoch::from_data(Some(&written)),
        Ok(record.role_epoch())
    );

    for me in ["east", "witness"] {
        let mut now = 1_000;
        let (mut node, actions) = Node::start(CONFIG.clone(), me, Some(record.clone()), now)
            .expect("the config is valid");
        check_actions(&actions);
        drive(&mut node, &mut now, 12);
    }
}
