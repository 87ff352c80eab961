//! What to do with the local PostgreSQL server, as a pure function of the
//! desired role and epoch and what is observed locally and at the peers.
//!
//! The supervisor calls [`decide`] in a loop and performs one [`Action`]
//! per step, so a crash between steps only repeats a step: every action is
//! safe to retry (`pg_promote` on a primary is refused by the observation,
//! `pg_rewind` of an already rewound directory is a no-op, starting a
//! running server is skipped).
//!
//! A fenced former primary never waits stopped for a peer primary: no peer
//! may ever become one (every other member can be behind, and then the
//! newest data is here). It runs read-only instead, in recovery with no
//! upstream, so the health check sees a live database and this cluster can
//! be chosen again; its data directory is marked
//! ([`Observation::former_primary`]) so that, should a peer primary appear
//! after all, it is rewound from it before it follows (it may hold WAL that
//! the new timeline does not). Patroni does the same with a demoted leader.

use counterweight_core::state::{Role, RoleEpoch};
use serde::{Deserialize, Serialize};

use crate::role::is_current;

/// What a peer database looks like from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerState {
    /// Accepts connections and is not in recovery.
    Primary,
    /// Accepts connections and is in recovery.
    Standby,
    /// Did not answer (down, fenced, or cut off).
    Unreachable,
}

/// A peer database and its observed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Peer (cluster) name.
    pub name: String,
    /// Host it is reached at for replication.
    pub host: String,
    /// Port it is reached at for replication.
    pub port: u16,
    /// What it is.
    pub state: PeerState,
}

/// The local server as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    /// The server process runs.
    pub running: bool,
    /// It accepted a connection and answered.
    pub accepting: bool,
    /// The data directory holds a cluster (`PG_VERSION`).
    pub has_data: bool,
    /// In recovery: `pg_is_in_recovery()` when running, `standby.signal`
    /// present when stopped.
    pub in_recovery: bool,
    /// Host and port of `primary_conninfo`, when a standby.
    pub upstream: Option<(String, u16)>,
    /// Current `synchronous_standby_names`, when a primary.
    pub synchronous_standby_names: Option<String>,
    /// The data directory is a former primary's that has not been rewound
    /// from a peer primary since it was fenced: it may hold WAL that no
    /// peer has, so it must be rewound before it follows anyone. Observed
    /// as the supervisor's marker file in the data directory.
    pub former_primary: bool,
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum Action {
    /// Converged: nothing to do.
    Nothing,
    /// Cannot act safely yet; the reason says on what it waits.
    Wait {
        /// Human-readable reason.
        reason: String,
    },
    /// Start the stopped server.
    Start,
    /// Start the stopped, fenced former primary read-only: mark it
    /// ([`Observation::former_primary`]), put it in recovery with no
    /// upstream, and start it. Nothing can write to it; it can be checked,
    /// and promoted again if its cluster is chosen.
    StartReadOnly,
    /// Stop the read-only former primary so that it can be rewound from the
    /// named peer, which has become the primary.
    StopToRewind {
        /// The new primary.
        from: String,
    },
    /// Make a fresh standby from the named peer (`pg_basebackup -R`).
    BaseBackup {
        /// Peer to copy.
        from: String,
    },
    /// `SELECT pg_promote()` on the local standby.
    Promote {
        /// The epoch the promotion belongs to.
        epoch: u64,
    },
    /// Stop the local primary (fast, clean shutdown): the database side of
    /// fencing, so that nothing can write to a demoted primary and so that
    /// `pg_rewind` finds a cleanly shut down target.
    Fence,
    /// `pg_rewind` the stopped former primary from the named peer and
    /// configure it as its standby (this clears the former-primary mark).
    Rewind {
        /// Peer to rewind from and then stream from.
        from: String,
    },
    /// Point `primary_conninfo` at the named peer and reload.
    Follow {
        /// The new upstream.
        from: String,
    },
    /// Set `synchronous_standby_names` on the local primary and reload.
    SetSynchronousStandbyNames {
        /// The value.
        value: String,
    },
}

/// The one peer that is a primary, if exactly one is.
fn sole_primary(peers: &[Upstream]) -> Result<Option<&Upstream>, String> {
    let primaries: Vec<&Upstream> = peers
        .iter()
        .filter(|p| p.state == PeerState::Primary)
        .collect();
    match primaries.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(format!(
            "several peers are primaries ({}); following none of them",
            many.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Decides the next step.
///
/// - `state`: role and epoch from the state ConfigMap. Precondition for
///   promotion: the controller writes `active` in a new epoch only once the
///   previous active has fenced.
/// - `applied_epoch`: the highest epoch acted on; a lower `state.epoch` is
///   stale and changes nothing.
/// - `sync_names`: the wanted `synchronous_standby_names` when primary
///   (empty for asynchronous replication).
pub fn decide(
    state: RoleEpoch,
    applied_epoch: u64,
    local: &Observation,
    peers: &[Upstream],
    sync_names: &str,
) -> Action {
    if !is_current(state, applied_epoch) {
        return Action::Wait {
            reason: format!(
                "state epoch {} is older than epoch {applied_epoch} already acted on; ignoring it",
                state.epoch
            ),
        };
    }
    let wait = |reason: String| Action::Wait { reason };
    match state.role {
        Role::Active => {
            if !local.running {
                return if local.has_data {
                    Action::Start
                } else {
                    wait("active, but the data directory is empty; provision it (initdb or restore) first".into())
                };
            }
            if !local.accepting {
                return wait("the local server runs but does not accept connections yet".into());
            }
            if local.in_recovery {
                // Second line of the fencing precondition: a peer that still
                // answers as a primary has not fenced; promoting now would
                // make two writable databases.
                return match peers.iter().find(|p| p.state == PeerState::Primary) {
                    Some(p) => wait(format!(
                        "peer {} is still a primary; promotion waits until it fences",
                        p.name
                    )),
                    None => Action::Promote { epoch: state.epoch },
                };
            }
            match &local.synchronous_standby_names {
                Some(current) if current.trim() != sync_names.trim() => {
                    Action::SetSynchronousStandbyNames {
                        value: sync_names.to_owned(),
                    }
                }
                _ => Action::Nothing,
            }
        }
        Role::Standby => {
            if local.running && !local.accepting {
                return wait("the local server runs but does not accept connections yet".into());
            }
            if local.running && !local.in_recovery {
                return Action::Fence;
            }
            let primary = match sole_primary(peers) {
                Ok(p) => p,
                Err(reason) => return wait(reason),
            };
            if local.running {
                return match primary {
                    Some(p) if local.former_primary => Action::StopToRewind {
                        from: p.name.clone(),
                    },
                    Some(p) if local.upstream.as_ref() != Some(&(p.host.clone(), p.port)) => {
                        Action::Follow {
                            from: p.name.clone(),
                        }
                    }
                    // Streaming from the primary, or no primary to switch
                    // to: the WAL receiver keeps retrying its current
                    // upstream.
                    _ => Action::Nothing,
                };
            }
            // Stopped. A primary's data (not in recovery, or marked as a
            // former primary's) is rewound before it follows anyone.
            let primary_data = !local.in_recovery || local.former_primary;
            match (local.has_data, primary) {
                (false, Some(p)) => Action::BaseBackup {
                    from: p.name.clone(),
                },
                (false, None) => wait("no data yet and no peer primary to copy it from".into()),
                (true, Some(p)) if primary_data => Action::Rewind {
                    from: p.name.clone(),
                },
                (true, _) if local.in_recovery => Action::Start,
                (true, _) => Action::StartReadOnly,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(role: Role, epoch: u64) -> RoleEpoch {
        RoleEpoch { role, epoch }
    }

    fn peer(name: &str, port: u16, state: PeerState) -> Upstream {
        Upstream {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            state,
        }
    }

    fn primary() -> Observation {
        Observation {
            running: true,
            accepting: true,
            has_data: true,
            in_recovery: false,
            upstream: None,
            synchronous_standby_names: Some(String::new()),
            former_primary: false,
        }
    }

    fn standby_of(port: u16) -> Observation {
        Observation {
            in_recovery: true,
            upstream: Some(("127.0.0.1".into(), port)),
            synchronous_standby_names: None,
            ..primary()
        }
    }

    fn stopped(in_recovery: bool) -> Observation {
        Observation {
            running: false,
            accepting: false,
            in_recovery,
            ..primary()
        }
    }

    #[test]
    fn a_standby_promotes_only_when_no_peer_is_primary() {
        let local = standby_of(1);
        let a_alive = [peer("a", 1, PeerState::Primary)];
        let a_gone = [peer("a", 1, PeerState::Unreachable)];
        assert!(matches!(
            decide(re(Role::Active, 2), 1, &local, &a_alive, ""),
            Action::Wait { .. }
        ));
        assert_eq!(
            decide(re(Role::Active, 2), 1, &local, &a_gone, ""),
            Action::Promote { epoch: 2 }
        );
    }

    #[test]
    fn stale_epochs_change_nothing() {
        let a = decide(
            re(Role::Active, 1),
            2,
            &standby_of(1),
            &[peer("a", 1, PeerState::Unreachable)],
            "",
        );
        assert!(matches!(a, Action::Wait { reason } if reason.contains("older")));
    }

    #[test]
    fn a_demoted_primary_fences_then_rewinds_then_starts_then_follows() {
        let b = [peer("b", 2, PeerState::Primary)];
        let st = re(Role::Standby, 2);
        assert_eq!(decide(st, 2, &primary(), &b, ""), Action::Fence);
        assert_eq!(
            decide(st, 2, &stopped(false), &b, ""),
            Action::Rewind { from: "b".into() }
        );
        assert_eq!(decide(st, 2, &stopped(true), &b, ""), Action::Start);
        assert_eq!(
            decide(st, 2, &standby_of(1), &b, ""),
            Action::Follow { from: "b".into() }
        );
        assert_eq!(decide(st, 2, &standby_of(2), &b, ""), Action::Nothing);
    }

    fn read_only_former_primary() -> Observation {
        Observation {
            upstream: None,
            former_primary: true,
            ..standby_of(1)
        }
    }

    #[test]
    fn a_fenced_former_primary_with_no_peer_primary_runs_read_only() {
        let st = re(Role::Standby, 1);
        for nobody in [
            vec![],
            vec![peer("b", 2, PeerState::Unreachable)],
            vec![peer("b", 2, PeerState::Standby)],
        ] {
            // It does not wait stopped for a primary that only a member
            // that is behind could become.
            assert_eq!(
                decide(st, 1, &stopped(false), &nobody, ""),
                Action::StartReadOnly,
                "{nobody:?}"
            );
            let marked_and_stopped = Observation {
                former_primary: true,
                ..stopped(true)
            };
            assert_eq!(
                decide(st, 1, &marked_and_stopped, &nobody, ""),
                Action::Start
            );
            assert_eq!(
                decide(st, 1, &read_only_former_primary(), &nobody, ""),
                Action::Nothing
            );
        }
        // Chosen again: it is promoted, as any standby is.
        assert_eq!(
            decide(
                re(Role::Active, 2),
                1,
                &read_only_former_primary(),
                &[peer("b", 2, PeerState::Standby)],
                ""
            ),
            Action::Promote { epoch: 2 }
        );
    }

    #[test]
    fn a_read_only_former_primary_is_rewound_before_it_follows_a_new_primary() {
        let st = re(Role::Standby, 2);
        let b = [peer("b", 2, PeerState::Primary)];
        assert_eq!(
            decide(st, 2, &read_only_former_primary(), &b, ""),
            Action::StopToRewind { from: "b".into() }
        );
        let marked_and_stopped = Observation {
            former_primary: true,
            ..stopped(true)
        };
        assert_eq!(
            decide(st, 2, &marked_and_stopped, &b, ""),
            Action::Rewind { from: "b".into() }
        );
        // A plain standby (never a primary) just follows.
        assert_eq!(decide(st, 2, &stopped(true), &b, ""), Action::Start);
    }

    #[test]
    fn an_empty_standby_copies_the_primary() {
        let none = Observation::default();
        assert_eq!(
            decide(
                re(Role::Standby, 1),
                0,
                &none,
                &[peer("a", 1, PeerState::Primary)],
                ""
            ),
            Action::BaseBackup { from: "a".into() }
        );
        assert!(matches!(
            decide(re(Role::Active, 1), 0, &none, &[], ""),
            Action::Wait { .. }
        ));
    }

    #[test]
    fn two_primary_peers_are_followed_by_nobody() {
        let peers = [
            peer("a", 1, PeerState::Primary),
            peer("c", 3, PeerState::Primary),
        ];
        assert!(matches!(
            decide(re(Role::Standby, 3), 3, &standby_of(1), &peers, ""),
            Action::Wait { reason } if reason.contains("a, c")
        ));
    }

    #[test]
    fn an_active_primary_keeps_synchronous_names_as_configured() {
        let st = re(Role::Active, 1);
        assert_eq!(
            decide(st, 1, &primary(), &[], "FIRST 1 (b)"),
            Action::SetSynchronousStandbyNames {
                value: "FIRST 1 (b)".into()
            }
        );
        let configured = Observation {
            synchronous_standby_names: Some("FIRST 1 (b)".into()),
            ..primary()
        };
        assert_eq!(
            decide(st, 1, &configured, &[], "FIRST 1 (b)"),
            Action::Nothing
        );
        assert_eq!(decide(st, 1, &stopped(true), &[], ""), Action::Start);
    }
}
