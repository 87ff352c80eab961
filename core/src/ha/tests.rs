//! Flow tests: a small deterministic network of real nodes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::*;

const PROBE: u64 = 100;
const LEASE: u64 = 500;
const MARGIN: u64 = 100;

fn cfg(names: &[(&str, u32)], witness: bool) -> HaConfig {
    let mut c = HaConfig::new(
        names
            .iter()
            .map(|(n, p)| ClusterSpec {
                name: (*n).to_owned(),
                priority: *p,
            })
            .collect(),
        witness.then(|| "w".to_owned()),
    );
    c.probe_interval_ms = PROBE;
    c.lease_ms = LEASE;
    c.margin_ms = MARGIN;
    c.candidate_fresh_ms = 3 * PROBE;
    c.max_clock_skew_ms = 50;
    c
}

const HEALTHY: HealthVerdict = HealthVerdict {
    abnormal: false,
    meets_threshold: true,
    data_behind: false,
};
const ABNORMAL: HealthVerdict = HealthVerdict {
    abnormal: true,
    meets_threshold: false,
    data_behind: false,
};
const LOW: HealthVerdict = HealthVerdict {
    abnormal: false,
    meets_threshold: false,
    data_behind: false,
};

/// Executes actions like a controller would, over a reliable in-order
/// network with optional cut links and crashed members.
struct Sim {
    now: u64,
    nodes: BTreeMap<String, Node>,
    down: BTreeSet<String>,
    disks: BTreeMap<String, Persisted>,
    serving: BTreeMap<String, bool>,
    queue: VecDeque<Envelope>,
    cut: BTreeSet<(String, String)>,
    log: Vec<(u64, String, Action)>,
    // Times at which two members served at once; must stay empty.
    overlaps: Vec<u64>,
}

impl Sim {
    fn new(cfg: HaConfig, stored: &[(&str, Persisted)]) -> Self {
        let mut sim = Sim {
            now: 1000,
            nodes: BTreeMap::new(),
            down: BTreeSet::new(),
            disks: BTreeMap::new(),
            serving: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            log: Vec::new(),
            overlaps: Vec::new(),
        };
        let names: Vec<String> = cfg.member_names().map(str::to_owned).collect();
        for name in names {
            let rec = stored
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, r)| r.clone());
            let (node, actions) = Node::start(cfg.clone(), &name, rec, sim.now).unwrap();
            sim.nodes.insert(name.clone(), node);
            sim.apply(&name, actions);
            if cfg.is_cluster(&name) {
                sim.event(&name, Event::Health(HEALTHY));
            }
        }
        sim
    }

    fn apply(&mut self, name: &str, actions: Vec<Action>) {
        for a in actions {
            match &a {
                Action::Persist(p) => {
                    self.disks.insert(name.to_owned(), p.clone());
                }
                Action::SetServing(s) => {
                    self.serving.insert(name.to_owned(), *s);
                    if self.serving.values().filter(|s| **s).count() > 1 {
                        self.overlaps.push(self.now);
                    }
                }
                Action::Send(env) => self.queue.push_back(env.clone()),
                Action::Record(_) => {}
            }
            self.log.push((self.now, name.to_owned(), a));
        }
    }

    fn event(&mut self, name: &str, ev: Event) -> Vec<Action> {
        if self.down.contains(name) {
            return Vec::new();
        }
        let now = self.now;
        let actions = self.nodes.get_mut(name).unwrap().handle(now, ev);
        self.apply(name, actions.clone());
        actions
    }

    fn linked(&self, a: &str, b: &str) -> bool {
        !self.cut.contains(&(a.to_owned(), b.to_owned()))
            && !self.cut.contains(&(b.to_owned(), a.to_owned()))
    }

    fn deliver_all(&mut self) {
        let mut budget = 10_000;
        while let Some(env) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "message storm");
            if self.linked(&env.from, &env.to) {
                let to = env.to.clone();
                self.event(&to, Event::Message(env));
            }
        }
    }

    /// Advances time in probe-interval steps, ticking every member.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += PROBE / 2;
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            for n in names {
                self.event(&n, Event::Tick);
            }
            self.deliver_all();
        }
    }

    fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    fn actives(&self) -> Vec<&str> {
        self.serving
            .iter()
            .filter(|(_, s)| **s)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn cut(&mut self, a: &str, b: &str) {
        self.cut.insert((a.to_owned(), b.to_owned()));
    }

    fn crash(&mut self, name: &str) {
        self.down.insert(name.to_owned());
        self.serving.insert(name.to_owned(), false);
    }

    fn restart(&mut self, name: &str) {
        self.down.remove(name);
        let cfg = self.node(name).config().clone();
        let (node, actions) =
            Node::start(cfg, name, self.disks.get(name).cloned(), self.now).unwrap();
        self.nodes.insert(name.to_owned(), node);
        self.apply(name, actions);
        self.event(name, Event::Health(HEALTHY));
    }

    fn reasons(&self, name: &str) -> Vec<Reason> {
        self.log
            .iter()
            .filter(|(_, n, _)| n == name)
            .filter_map(|(_, _, a)| match a {
                Action::Record(r) => Some(r.reason),
                _ => None,
            })
            .collect()
    }

    fn first_time(&self, name: &str, pred: impl Fn(&Action) -> bool) -> Option<u64> {
        self.log
            .iter()
            .find(|(_, n, a)| n == name && pred(a))
            .map(|(t, _, _)| *t)
    }

    /// Two clusters (or more) started standby; runs until one is active.
    fn settled(cfg: HaConfig) -> Self {
        let mut sim = Sim::new(cfg, &[]);
        sim.run(2 * LEASE);
        assert_eq!(sim.actives().len(), 1, "{:?}", sim.actives());
        sim
    }
}

fn two() -> HaConfig {
    cfg(&[("a", 3), ("b", 2)], false)
}

fn three() -> HaConfig {
    cfg(&[("a", 3), ("b", 2), ("c", 1)], false)
}

fn active_rec(epoch: u64, me: &str) -> Persisted {
    Persisted {
        role: Role::Active,
        epoch,
        vote: Some(Vote {
            epoch,
            to: me.to_owned(),
        }),
        paused: false,
    }
}

#[test]
fn config_validation_names_the_problem() {
    let mut c = two();
    assert_eq!(c.validate(), Ok(()));
    c.clusters.truncate(1);
    assert_eq!(c.validate(), Err(HaConfigError::TooFewClusters(1)));
    let mut c = two();
    c.witness = Some("a".to_owned());
    assert_eq!(c.validate(), Err(HaConfigError::DuplicateName("a".into())));
    let mut c = two();
    c.clusters[1].name.clear();
    assert_eq!(c.validate(), Err(HaConfigError::EmptyName));
    // Issue 17: names cwctl cannot target (not DNS labels) were accepted.
    for bad in ["West", "west.example", "a b", "-b"] {
        let mut c = two();
        c.clusters[1].name = bad.to_owned();
        let e = c.validate().unwrap_err();
        assert!(
            matches!(&e, HaConfigError::BadName { name, .. } if name == bad),
            "{bad}: {e:?}"
        );
        assert!(e.to_string().contains("not a DNS label"), "{e}");
    }
    let mut c = two();
    c.witness = Some("Witness".to_owned());
    assert!(matches!(c.validate(), Err(HaConfigError::BadName { .. })));
    let mut c = two();
    c.lease_ms = c.probe_interval_ms + c.margin_ms;
    assert!(matches!(
        c.validate(),
        Err(HaConfigError::LeaseTooShort { .. })
    ));
    let mut c = two();
    c.probe_interval_ms = 0;
    assert_eq!(c.validate(), Err(HaConfigError::Zero("probeIntervalMs")));
    assert_eq!(
        Node::start(two(), "zz", None, 0).unwrap_err(),
        HaConfigError::UnknownSelf("zz".into())
    );
}

#[test]
fn quorum_is_a_strict_majority_of_voters() {
    assert_eq!(two().quorum(), 2);
    assert_eq!(cfg(&[("a", 1), ("b", 1)], true).quorum(), 2);
    assert_eq!(three().quorum(), 2);
    assert_eq!(cfg(&[("a", 1), ("b", 1), ("c", 1)], true).quorum(), 3);
    let mut c = two();
    c.unsafe_promote_on_silence = true;
    assert_eq!(c.quorum(), 1);
}

#[test]
fn protocol_round_trips_as_versioned_json() {
    let env = Envelope {
        version: PROTOCOL_VERSION,
        from: "a".into(),
        to: "b".into(),
        epoch: 3,
        body: Body::Probe {
            sent_ms: 17,
            status: Status {
                role: Role::Active,
                serving: true,
                eligible: true,
                preempt_ready: false,
            },
            lease: Some(LeaseRequest {
                epoch: 3,
                transfer: Some(Transfer {
                    from: "c".into(),
                    epoch: 2,
                }),
            }),
        },
    };
    let json = env.to_json().unwrap();
    let text = String::from_utf8(json.clone()).unwrap();
    assert!(text.contains(r#""type":"probe""#), "{text}");
    assert_eq!(Envelope::from_json(&json).unwrap(), env);
    let mut other = env.clone();
    other.version = 2;
    assert!(matches!(
        Envelope::from_json(&other.to_json().unwrap()),
        Err(ProtocolError::Version { got: 2 })
    ));
    assert!(Envelope::from_json(b"{}").is_err());
}

#[test]
fn persisted_record_round_trips() {
    let rec = active_rec(4, "a");
    let json = serde_json::to_string(&rec).unwrap();
    assert_eq!(serde_json::from_str::<Persisted>(&json).unwrap(), rec);
    assert_eq!(
        rec.role_epoch(),
        RoleEpoch {
            role: Role::Active,
            epoch: 4
        }
    );
}

#[test]
fn both_standby_elects_the_preferred_cluster_after_one_lease() {
    let sim = Sim::settled(two());
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.node("a").epoch(), 1);
    assert_eq!(sim.node("b").epoch(), 1, "standby learns the epoch");
    assert_eq!(sim.disks["a"].role, Role::Active);
    // Nobody may vote before a full lease after start: promotion is late enough.
    let promoted = sim
        .first_time("a", |a| *a == Action::SetServing(true))
        .unwrap();
    assert!(promoted >= 1000 + LEASE + MARGIN, "{promoted}");
    assert!(sim.overlaps.is_empty());
}

/// When `name` first asked for votes, if it did.
fn first_election(sim: &Sim, name: &str) -> Option<u64> {
    sim.first_time(
        name,
        |a| matches!(a, Action::Record(r) if r.reason == Reason::ElectionStarted),
    )
}

#[test]
fn a_preferred_cluster_that_starts_late_still_wins_the_first_election() {
    // a (preferred) starts 300 ms after b: more than a probe interval, so
    // with the failover stagger (a probe per rank) b's timer would fire
    // first and b would win a fresh install.
    let mut sim = Sim::new(two(), &[]);
    sim.crash("a");
    sim.run(300);
    sim.restart("a");
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.node("a").epoch(), 1, "one election, no split vote");
    assert_eq!(first_election(&sim, "b"), None, "b waited for a");
    assert!(sim.overlaps.is_empty());
}

#[test]
fn a_preferred_cluster_that_never_starts_delays_a_fresh_install_by_a_lease() {
    let mut sim = Sim::new(two(), &[]);
    sim.crash("a");
    sim.run(4 * LEASE);
    let own_time = 1000 + LEASE + MARGIN + LEASE;
    let started = first_election(&sim, "b").expect("b campaigned");
    assert!(
        (own_time..own_time + PROBE / 2).contains(&started),
        "b's election at {started}, expected at {own_time}"
    );
    // b cannot win alone (a is a voter). a comes back and asks for epoch
    // 1, which b gave itself: b's refusal ends a's election at once and
    // frees a's vote, so b's next try, in epoch 2, wins.
    sim.restart("a");
    let back = sim.now;
    sim.run(LEASE + MARGIN + 2 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
    assert_eq!(sim.node("b").epoch(), 2);
    let failed = sim
        .first_time(
            "a",
            |x| matches!(x, Action::Record(r) if r.reason == Reason::ElectionFailed),
        )
        .expect("a's election failed");
    assert!(
        failed < back + LEASE + MARGIN + PROBE,
        "a gave up at {failed}, not a lease after asking (back at {back})"
    );
    assert!(sim.overlaps.is_empty());
}

#[test]
fn after_an_active_was_heard_the_stagger_is_a_probe_interval() {
    // a active, then killed: b (rank 1) asks a lease and a margin after
    // a's last probe plus one probe interval, not a lease.
    let mut sim = Sim::settled(two());
    sim.crash("a");
    let killed = sim.now;
    sim.run(3 * LEASE);
    let started = first_election(&sim, "b").expect("b campaigned");
    assert!(
        started <= killed + LEASE + MARGIN + PROBE,
        "b's election at {started}, a killed at {killed}"
    );
}

#[test]
fn active_keeps_fresh_candidates_from_probe_replies() {
    let mut sim = Sim::settled(three());
    let now = sim.now;
    assert_eq!(sim.node("a").candidates(now), vec!["b", "c"]);
    sim.event("b", Event::Health(LOW));
    sim.run(2 * PROBE);
    let now = sim.now;
    assert_eq!(sim.node("a").candidates(now), vec!["c"]);
    // c stops answering: it drops out once its last answer is stale.
    sim.cut("a", "c");
    sim.run(4 * PROBE);
    let now = sim.now;
    assert!(sim.node("a").candidates(now).is_empty());
    assert_eq!(sim.actives(), vec!["a"], "a still has b's votes");
}

#[test]
fn fig9_handover_fences_before_change() {
    let mut sim = Sim::settled(two());
    let mark = sim.log.len();
    sim.event("a", Event::Health(ABNORMAL));
    sim.deliver_all();
    sim.run(2 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
    assert_eq!(sim.node("b").epoch(), 2);
    assert_eq!(sim.node("a").role(), Role::Standby);
    assert_eq!(sim.node("a").epoch(), 2);
    // a's actions in order: prepare ... stop serving, persist standby, send change.
    let a_actions: Vec<&Action> = sim.log[mark..]
        .iter()
        .filter(|(_, n, _)| n == "a")
        .map(|(_, _, a)| a)
        .collect();
    let pos = |pred: &dyn Fn(&Action) -> bool| a_actions.iter().position(|a| pred(a)).unwrap();
    let prepare = pos(&|a| {
        matches!(
            a,
            Action::Send(Envelope {
                body: Body::Prepare { .. },
                ..
            })
        )
    });
    let stop = pos(&|a| *a == Action::SetServing(false));
    let fence = pos(&|a| matches!(a, Action::Persist(p) if p.role == Role::Standby));
    let change = pos(&|a| {
        matches!(
            a,
            Action::Send(Envelope {
                body: Body::Change { .. },
                ..
            })
        )
    });
    assert!(
        prepare < stop && stop < fence && fence < change,
        "{a_actions:#?}"
    );
    assert!(sim.reasons("a").contains(&Reason::HandoverComplete));
    assert!(sim.overlaps.is_empty());
}

#[test]
fn abnormal_without_fresh_candidate_stays_active() {
    let mut sim = Sim::settled(two());
    sim.event("b", Event::Health(LOW));
    sim.run(4 * PROBE);
    sim.event("a", Event::Health(ABNORMAL));
    sim.run(4 * PROBE);
    assert_eq!(sim.actives(), vec!["a"]);
    let r = sim.reasons("a");
    assert_eq!(r.iter().filter(|r| **r == Reason::NoCandidate).count(), 1);
    assert!(!r.contains(&Reason::HandoverStarted));
}

/// a's FIG. 9 prepare to b, in epoch 1.
fn prepare_from_a() -> Event {
    Event::Message(Envelope {
        version: PROTOCOL_VERSION,
        from: "a".into(),
        to: "b".into(),
        epoch: 1,
        body: Body::Prepare {
            epoch: 1,
            reason: HandoverReason::Abnormal,
        },
    })
}

#[test]
fn unhealthy_standby_refuses_prepare() {
    let mut sim = Sim::settled(two());
    sim.event("b", Event::Health(LOW));
    let out = sim.event("b", prepare_from_a());
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Send(Envelope {
                body: Body::Refuse { .. },
                ..
            })
        )),
        "{out:?}"
    );
    sim.deliver_all();
    assert_eq!(sim.actives(), vec!["a"]);
}

#[test]
fn a_standby_whose_data_is_behind_refuses_prepare_and_is_never_a_candidate() {
    let behind = HealthVerdict {
        data_behind: true,
        ..HEALTHY
    };
    assert!(!behind.eligible());
    let mut sim = Sim::settled(two());
    sim.event("b", Event::Health(behind));
    let out = sim.event("b", prepare_from_a());
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Send(Envelope {
                body: Body::Refuse { reason, .. },
                ..
            }) if reason.contains("data is not current")
        )),
        "{out:?}"
    );
    // The active's own abnormal verdict finds no candidate either.
    sim.run(4 * PROBE);
    sim.event("a", Event::Health(ABNORMAL));
    sim.run(4 * PROBE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert!(!sim.reasons("a").contains(&Reason::HandoverStarted));
}

#[test]
fn retried_change_is_idempotent_and_stale_messages_change_nothing() {
    let mut sim = Sim::settled(two());
    sim.event("a", Event::Health(ABNORMAL));
    sim.run(2 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
    let change = sim
        .log
        .iter()
        .find_map(|(_, _, a)| match a {
            Action::Send(e) if matches!(e.body, Body::Change { .. }) => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    let before = sim.node("b").clone();
    let out = sim.event("b", Event::Message(change.clone()));
    assert!(
        out.iter().all(|a| matches!(
            a,
            Action::Send(Envelope {
                body: Body::Changed { .. },
                ..
            })
        )),
        "{out:?}"
    );
    assert_eq!(out.len(), 1);
    assert_eq!(*sim.node("b"), before);
    // Stale prepare and stale change to the old active: nothing changes.
    let before = sim.node("a").clone();
    for body in [
        Body::Prepare {
            epoch: 1,
            reason: HandoverReason::Switchover,
        },
        Body::Change {
            epoch: 0,
            new_epoch: 1,
        },
        Body::Changed { new_epoch: 1 },
        Body::Ready { epoch: 1 },
    ] {
        let now = sim.now;
        let env = Envelope {
            version: PROTOCOL_VERSION,
            from: "b".into(),
            to: "a".into(),
            epoch: 1,
            body,
        };
        let out = sim
            .nodes
            .get_mut("a")
            .unwrap()
            .handle(now, Event::Message(env));
        assert!(
            out.iter().all(|a| matches!(a, Action::Send(_))),
            "stale message acted on: {out:?}"
        );
        assert_eq!(*sim.node("a"), before);
    }
}

#[test]
fn pair_without_witness_partition_fences_active_and_never_promotes() {
    let mut sim = Sim::settled(two());
    sim.cut("a", "b");
    sim.run(4 * LEASE);
    assert!(sim.actives().is_empty(), "safe but unavailable");
    assert!(sim.reasons("a").contains(&Reason::Fenced));
    assert_eq!(sim.disks["a"].role, Role::Standby);
    assert!(sim.overlaps.is_empty());
    // Heal: the preferred healthy cluster is elected again, in a new epoch.
    sim.cut.clear();
    sim.run(3 * LEASE);
    assert_eq!(sim.actives().len(), 1);
    let active = sim.actives()[0].to_owned();
    assert!(sim.node(&active).epoch() >= 2);
}

#[test]
fn witness_tells_link_cut_from_dead_peer() {
    // Link cut between the clusters: the active keeps its lease via the witness.
    let mut sim = Sim::settled(cfg(&[("a", 3), ("b", 2)], true));
    sim.cut("a", "b");
    sim.run(4 * LEASE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.node("a").epoch(), 1);
    assert!(sim.overlaps.is_empty());

    // The active isolated from everyone: it fences, then b promotes, later.
    let mut sim = Sim::settled(cfg(&[("a", 3), ("b", 2)], true));
    sim.cut("a", "b");
    sim.cut("a", "w");
    sim.run(4 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
    // a's fence is its last stop-serving (the first one is from its start).
    let fenced = sim
        .log
        .iter()
        .filter(|(_, n, a)| n == "a" && *a == Action::SetServing(false))
        .map(|(t, _, _)| *t)
        .next_back()
        .unwrap();
    let promoted = sim
        .first_time("b", |a| *a == Action::SetServing(true))
        .unwrap();
    assert!(
        fenced + MARGIN <= promoted,
        "fenced {fenced} promoted {promoted}"
    );
    assert!(sim.overlaps.is_empty());
}

#[test]
fn dead_active_is_replaced_only_after_its_lease() {
    let mut sim = Sim::settled(cfg(&[("a", 3), ("b", 2)], true));
    let died = sim.now;
    sim.crash("a");
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
    let promoted = sim
        .first_time("b", |a| *a == Action::SetServing(true))
        .unwrap();
    assert!(promoted >= died + LEASE, "died {died} promoted {promoted}");
    // No preemption by default: a comes back and stays standby.
    sim.restart("a");
    sim.run(4 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
    assert_eq!(sim.node("a").role(), Role::Standby);
}

#[test]
fn data_judged_current_while_the_active_was_heard_lets_a_standby_replace_a_dead_active() {
    let mut sim = Sim::settled(cfg(&[("a", 3), ("b", 2)], true));
    // b was current while a was alive...
    sim.event("b", Event::Health(HEALTHY));
    sim.crash("a");
    sim.run(PROBE);
    // ...then its replication stopped with a (the WAL receiver no longer
    // streams): that must not block the takeover.
    let stopped = HealthVerdict {
        data_behind: true,
        ..HEALTHY
    };
    sim.event("b", Event::Health(stopped));
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
}

#[test]
fn data_judged_behind_while_the_active_was_heard_keeps_a_standby_out_after_it_dies() {
    let mut sim = Sim::settled(cfg(&[("a", 3), ("b", 2)], true));
    let behind = HealthVerdict {
        data_behind: true,
        ..HEALTHY
    };
    // b lagged while a was alive, and a was heard after that.
    sim.event("b", Event::Health(behind));
    sim.run(2 * PROBE);
    sim.crash("a");
    sim.run(3 * LEASE);
    sim.event("b", Event::Health(behind));
    sim.run(3 * LEASE);
    assert!(
        sim.actives().is_empty(),
        "a standby that was behind must not take over on its own"
    );
    // Found current again (say an operator let it catch up from a backup):
    // believed at once.
    sim.event("b", Event::Health(HEALTHY));
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
}

#[test]
fn preempt_hands_back_after_healthy_period() {
    let mut c = cfg(&[("a", 3), ("b", 2)], true);
    c.preempt_after_ms = Some(2 * LEASE);
    let mut sim = Sim::settled(c);
    sim.crash("a");
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
    sim.restart("a");
    sim.run(LEASE);
    assert_eq!(sim.actives(), vec!["b"], "not before the healthy period");
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert!(sim.reasons("b").contains(&Reason::HandedOver));
    assert!(sim.overlaps.is_empty());
}

#[test]
fn restarted_active_serves_only_after_renewing_its_lease() {
    let mut sim = Sim::settled(two());
    let epoch = sim.node("a").epoch();
    sim.crash("a");
    sim.run(PROBE);
    sim.restart("a");
    assert!(sim.actives().is_empty());
    assert!(!sim.serving["a"]);
    sim.run(2 * PROBE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.node("a").epoch(), epoch, "same epoch, same holder");
    assert!(sim.reasons("a").contains(&Reason::Recovered));
}

#[test]
fn restarted_active_that_cannot_renew_fences() {
    let mut sim = Sim::settled(two());
    sim.crash("a");
    sim.cut("a", "b");
    sim.run(PROBE);
    sim.restart("a");
    sim.run(2 * LEASE);
    assert!(sim.actives().is_empty());
    assert_eq!(sim.disks["a"].role, Role::Standby);
}

#[test]
fn both_active_resolves_by_epoch_then_priority() {
    // Same epoch: the preferred cluster stays.
    let mut sim = Sim::new(
        two(),
        &[("a", active_rec(5, "a")), ("b", active_rec(5, "b"))],
    );
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.disks["b"].role, Role::Standby);
    assert!(sim.overlaps.is_empty());
    // Higher epoch wins over priority.
    let mut sim = Sim::new(
        two(),
        &[("a", active_rec(5, "a")), ("b", active_rec(6, "b"))],
    );
    sim.run(3 * LEASE);
    assert_eq!(sim.actives(), vec!["b"]);
    assert_eq!(sim.node("a").epoch(), 6);
    assert!(sim.overlaps.is_empty());
}

#[test]
fn both_active_from_hand_written_records_without_votes_resolve_to_one() {
    // What an operator (or the e2e test) writes: `state: active`, an
    // epoch, no vote. Whatever the start order, exactly one ends active.
    let bare = Persisted {
        role: Role::Active,
        epoch: 3,
        vote: None,
        paused: false,
    };
    for b_late in [0, 1, PROBE / 2, PROBE, 3 * PROBE] {
        let mut sim = Sim::new(two(), &[("a", bare.clone()), ("b", bare.clone())]);
        if b_late > 0 {
            sim.crash("b");
            sim.run(b_late);
            sim.disks.insert("b".to_owned(), bare.clone());
            sim.restart("b");
        }
        sim.run(4 * LEASE);
        assert_eq!(
            sim.actives().len(),
            1,
            "b {b_late} ms late: {:?}",
            sim.actives()
        );
        assert!(sim.overlaps.is_empty(), "b {b_late} ms late");
        let active = sim.actives()[0].to_owned();
        assert!(sim.node(&active).epoch() >= 3);
    }
}

#[test]
fn switchover_to_healthy_target_and_refusals() {
    let mut sim = Sim::settled(three());
    // Target unhealthy: refused, nothing moves.
    sim.event("c", Event::Health(LOW));
    sim.run(2 * PROBE);
    sim.event(
        "a",
        Event::Command(Command::Switchover { target: "c".into() }),
    );
    sim.run(2 * PROBE);
    assert_eq!(sim.actives(), vec!["a"]);
    assert_eq!(sim.reasons("a").last(), Some(&Reason::CommandRefused));
    // Sent to a standby: refused.
    sim.event(
        "b",
        Event::Command(Command::Switchover { target: "c".into() }),
    );
    assert_eq!(sim.reasons("b").last(), Some(&Reason::CommandRefused));
    // Healthy target, even while paused.
    sim.event("a", Event::Command(Command::Pause));
    sim.event(
        "a",
        Event::Command(Command::Switchover { target: "b".into() }),
    );
    sim.run(3 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
    assert_eq!(sim.node("b").epoch(), 2);
    assert!(sim.overlaps.is_empty());
}

#[test]
fn pause_stops_automatic_failover_until_resume() {
    let mut sim = Sim::settled(two());
    sim.event("a", Event::Command(Command::Pause));
    assert!(sim.disks["a"].paused, "pause survives restarts");
    sim.event("a", Event::Health(ABNORMAL));
    sim.run(4 * PROBE);
    assert_eq!(sim.actives(), vec!["a"]);
    sim.event("a", Event::Command(Command::Resume));
    sim.run(3 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
}

#[test]
fn three_clusters_hand_over_to_the_preferred_candidate() {
    let mut sim = Sim::settled(three());
    sim.event("a", Event::Health(ABNORMAL));
    sim.run(3 * PROBE);
    assert_eq!(sim.actives(), vec!["b"]);
    // b abnormal too; a is unhealthy, so c takes over.
    sim.event("b", Event::Health(ABNORMAL));
    sim.run(3 * PROBE);
    assert_eq!(sim.actives(), vec!["c"]);
    assert_eq!(sim.node("c").epoch(), 3);
    assert!(sim.overlaps.is_empty());
}

#[test]
fn unsafe_option_warns_at_start_and_promotes_on_silence() {
    let mut c = two();
    c.unsafe_promote_on_silence = true;
    let (_, out) = Node::start(c.clone(), "a", None, 0).unwrap();
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Record(Record {
            kind: EventKind::Warning,
            reason: Reason::UnsafeConfiguration,
            ..
        })
    )));
    let mut sim = Sim::settled(c);
    sim.cut("a", "b");
    sim.run(3 * LEASE);
    // The seed's behaviour: both serve. This is why it is opt-in only.
    assert_eq!(sim.actives(), vec!["a", "b"]);
}

#[test]
fn config_changes_apply_or_are_rejected_with_a_reason() {
    let mut sim = Sim::settled(two());
    let mut c = two();
    c.clusters[1].priority = 9;
    sim.event("a", Event::ConfigChanged(c));
    assert_eq!(sim.reasons("a").last(), Some(&Reason::ConfigApplied));
    assert_eq!(sim.node("a").config().priority("b"), Some(9));
    let mut c = two();
    c.lease_ms = 2 * LEASE;
    sim.event("a", Event::ConfigChanged(c));
    assert_eq!(sim.reasons("a").last(), Some(&Reason::ConfigRejected));
    assert_eq!(sim.node("a").config().lease_ms, LEASE);
    let mut c = two();
    c.margin_ms = LEASE;
    sim.event("a", Event::ConfigChanged(c));
    assert_eq!(sim.reasons("a").last(), Some(&Reason::ConfigRejected));
}

#[test]
fn missing_record_starts_standby_and_is_written() {
    let (node, out) = Node::start(two(), "a", None, 0).unwrap();
    assert_eq!(out[0], Action::Persist(Persisted::initial()));
    assert!(out.contains(&Action::SetServing(false)));
    assert_eq!(node.role(), Role::Standby);
    assert!(!node.serving());
}

#[test]
fn voter_restarted_does_not_vote_for_a_newcomer_within_a_lease() {
    let (mut w, _) = Node::start(cfg(&[("a", 3), ("b", 2)], true), "w", None, 0).unwrap();
    let probe = |from: &str, epoch| {
        Event::Message(Envelope {
            version: PROTOCOL_VERSION,
            from: from.into(),
            to: "w".into(),
            epoch: 0,
            body: Body::Probe {
                sent_ms: 0,
                status: Status {
                    role: Role::Standby,
                    serving: false,
                    eligible: true,
                    preempt_ready: false,
                },
                lease: Some(LeaseRequest {
                    epoch,
                    transfer: None,
                }),
            },
        })
    };
    let granted = |out: &[Action]| {
        out.iter().any(|a| {
            matches!(
                a,
                Action::Send(Envelope {
                    body: Body::ProbeReply {
                        lease: Some(LeaseAnswer::Granted { .. }),
                        ..
                    },
                    ..
                })
            )
        })
    };
    assert!(
        !granted(&w.handle(LEASE, probe("b", 1))),
        "quiet after start"
    );
    let out = w.handle(LEASE + MARGIN, probe("b", 1));
    assert!(granted(&out));
    // The vote is persisted before the grant is sent.
    let persist = out.iter().position(|a| matches!(a, Action::Persist(_)));
    let send = out.iter().position(|a| matches!(a, Action::Send(_)));
    assert!(persist < send && persist.is_some());
    assert!(
        !granted(&w.handle(LEASE + MARGIN + 1, probe("a", 2))),
        "bound to b"
    );
    assert!(
        !granted(&w.handle(3 * LEASE, probe("a", 1))),
        "epoch already used"
    );
    assert!(
        granted(&w.handle(3 * LEASE, probe("a", 2))),
        "b's vote expired"
    );
}

#[test]
fn persisted_round_trips_through_configmap_data_and_rejects_garbage() {
    let rec = Persisted {
        role: Role::Active,
        epoch: 4,
        vote: Some(Vote {
            epoch: 4,
            to: "east".into(),
        }),
        paused: true,
    };
    let mut data = std::collections::BTreeMap::new();
    data.insert("health".to_owned(), "{}".to_owned());
    rec.write_to(&mut data);
    assert_eq!(Persisted::from_data(Some(&data)), Ok(rec.clone()));
    assert_eq!(
        data.get("health").map(String::as_str),
        Some("{}"),
        "other keys stay"
    );
    let mut no_vote = rec.clone();
    no_vote.vote = None;
    no_vote.write_to(&mut data);
    assert!(!data.contains_key(VOTE_KEY));
    assert_eq!(Persisted::from_data(Some(&data)), Ok(no_vote));
    data.insert(VOTE_KEY.to_owned(), "east".to_owned());
    let err = Persisted::from_data(Some(&data)).unwrap_err();
    assert!(err.to_string().contains("`vote`"), "{err}");
    data.remove(VOTE_KEY);
    data.insert(PAUSED_KEY.to_owned(), "yes".to_owned());
    assert!(
        Persisted::from_data(Some(&data))
            .unwrap_err()
            .to_string()
            .contains("`paused`")
    );
}

fn status(role: Role, serving: bool) -> Status {
    Status {
        role,
        serving,
        eligible: true,
        preempt_ready: false,
    }
}

fn probe(from: &str, to: &str, epoch: u64, st: Status, lease: Option<LeaseRequest>) -> Event {
    Event::Message(Envelope {
        version: PROTOCOL_VERSION,
        from: from.to_owned(),
        to: to.to_owned(),
        epoch,
        body: Body::Probe {
            sent_ms: 0,
            status: st,
            lease,
        },
    })
}

#[test]
fn a_lease_holder_yields_to_a_later_epoch_only_for_a_live_lease_in_it() {
    let mut sim = Sim::settled(two());
    let epoch = sim.node("a").epoch();
    // b restarted from a record edited to `active`, epoch 99: it claims the
    // epoch but holds no lease (it does not serve).
    let out = sim.event("a", probe("b", "a", 99, status(Role::Active, false), None));
    assert!(!out.contains(&Action::SetServing(false)), "{out:#?}");
    assert!(sim.node("a").serving());
    assert_eq!(
        sim.node("a").epoch(),
        epoch,
        "a live active keeps its epoch"
    );
    // A serving active in a later epoch is believed: a steps down.
    let out = sim.event("a", probe("b", "a", 99, status(Role::Active, true), None));
    assert!(out.contains(&Action::SetServing(false)), "{out:#?}");
    assert_eq!(sim.node("a").role(), Role::Standby);
    assert_eq!(sim.node("a").epoch(), 99);
}

#[test]
fn a_lease_holder_keeps_its_lease_against_a_same_epoch_preferred_claim() {
    // b is preferred, but a holds the lease of epoch 5 (renewed by b's vote).
    let c = cfg(&[("a", 1), ("b", 2)], false);
    let standby5 = Persisted {
        role: Role::Standby,
        epoch: 5,
        vote: None,
        paused: false,
    };
    let mut sim = Sim::new(c, &[("a", active_rec(5, "a")), ("b", standby5)]);
    sim.run(2 * PROBE);
    assert_eq!(sim.actives(), vec!["a"], "a re-established its lease");
    // b's record is edited to `active` in the same epoch and b restarted:
    // it says active, holds no lease. Para 0088's preference must not make
    // the one live lease holder step down.
    let out = sim.event("a", probe("b", "a", 5, status(Role::Active, false), None));
    assert!(!out.contains(&Action::SetServing(false)), "{out:#?}");
    assert!(sim.node("a").serving());
}

#[test]
fn a_transfer_frees_a_vote_only_from_an_active_known_to_have_fenced() {
    let mut sim = Sim::settled(three());
    assert_eq!(sim.actives(), vec!["a"]);
    let epoch = sim.node("a").epoch();
    let ask = LeaseRequest {
        epoch: epoch + 1,
        transfer: Some(Transfer {
            from: "a".to_owned(),
            epoch,
        }),
    };
    // b claims a handed over; c has not heard a fence from a: refused.
    let out = sim.event(
        "c",
        probe(
            "b",
            "c",
            epoch,
            status(Role::Standby, false),
            Some(ask.clone()),
        ),
    );
    let granted = |out: &[Action]| {
        out.iter().any(|a| {
            matches!(
                a,
                Action::Send(Envelope {
                    body: Body::ProbeReply {
                        lease: Some(LeaseAnswer::Granted { .. }),
                        ..
                    },
                    ..
                })
            )
        })
    };
    assert!(!granted(&out), "{out:#?}");
    // a says it no longer serves (as it does right after its fence).
    sim.event(
        "c",
        probe("a", "c", epoch, status(Role::Standby, false), None),
    );
    let out = sim.event(
        "c",
        probe("b", "c", epoch, status(Role::Standby, false), Some(ask)),
    );
    assert!(granted(&out), "{out:#?}");
}

#[test]
fn the_serving_lease_ends_with_the_lease_and_only_while_serving() {
    let mut sim = Sim::settled(two());
    let a = sim.node("a");
    assert_eq!(a.serving_until_ms(), a.lease_until_ms());
    assert!(a.serving_until_ms().is_some());
    assert_eq!(sim.node("b").serving_until_ms(), None);
    sim.event("a", Event::Health(ABNORMAL));
    sim.deliver_all();
    sim.run(2 * PROBE);
    assert_eq!(sim.node("a").serving_until_ms(), None);
    assert!(sim.node("b").serving_until_ms().is_some());
}

#[test]
fn the_next_tick_is_never_in_the_past() {
    // The controller sleeps until `next_tick_ms` (at most a probe interval);
    // a time already past wakes it at once, so a deadline that the next
    // tick does not act on makes its HA loop spin. `next_probe_ms` moved
    // only during a claim, so a member without one (a standby; an old
    // active waiting for `changed`) ticked in a busy loop, and the old
    // active sent another `change` at every tick: on the real-node e2e its
    // peer client's in-flight limit filled with them, the vote replies to
    // the handover's target were dropped, the target's election failed and
    // the handover timed out.
    let future = |sim: &Sim, what: &str| {
        for (name, node) in &sim.nodes {
            assert!(
                node.next_tick_ms() > sim.now,
                "{what}: {name}'s next tick {} is not after now {}",
                node.next_tick_ms(),
                sim.now
            );
        }
    };
    let mut sim = Sim::settled(two());
    sim.run(2 * PROBE);
    future(&sim, "settled");
    // An unhealthy standby does not start an election at its election time.
    sim.event("b", Event::Health(LOW));
    sim.run(4 * LEASE);
    future(&sim, "unhealthy standby");
    sim.event("b", Event::Health(HEALTHY));
    sim.run(2 * PROBE);
    // A handover whose target does not answer `change` (b stopped): a stays
    // in Changing until the handover times out.
    sim.event("a", Event::Health(ABNORMAL));
    sim.deliver_all();
    let changes_before = sim
        .log
        .iter()
        .filter(|(_, n, a)| {
            n == "a"
                && matches!(
                    a,
                    Action::Send(Envelope {
                        body: Body::Change { .. },
                        ..
                    })
                )
        })
        .count();
    assert!(changes_before > 0, "a handed over");
    sim.crash("b");
    for _ in 0..5 {
        sim.now += 1;
        sim.event("a", Event::Tick);
        assert!(
            sim.node("a").next_tick_ms() > sim.now,
            "a waiting for `changed`: next tick {} is not after now {}",
            sim.node("a").next_tick_ms(),
            sim.now
        );
    }
}

#[test]
fn the_last_epoch_stops_elections_and_handovers_instead_of_overflowing() {
    // Found with the state_record fuzz target (fuzz/, README "Coverage-
    // guided fuzzing"): from a state record with epoch u64::MAX (edited by
    // hand), or after a peer's message naming it, the next epoch was
    // `epoch + 1`: a panic with overflow checks, a wrap to epoch 0 (which
    // no voter grants again) without.
    let last = Persisted {
        role: Role::Standby,
        epoch: u64::MAX,
        vote: None,
        paused: false,
    };
    let mut sim = Sim::new(two(), &[("a", last.clone()), ("b", last)]);
    sim.run(4 * LEASE);
    assert!(sim.actives().is_empty());
    for name in ["a", "b"] {
        assert!(!sim.reasons(name).contains(&Reason::ElectionStarted));
        assert!(sim.node(name).next_tick_ms() > sim.now, "{name} spins");
    }

    // A vote refusal naming the last epoch, then a switchover: the active
    // has no epoch to hand over in, so it stays active and serving.
    let mut sim = Sim::settled(two());
    let (active, other) = match sim.actives()[..] {
        ["a"] => ("a", "b"),
        _ => ("b", "a"),
    };
    let epoch = sim.node(active).epoch();
    let now = sim.now;
    sim.event(
        active,
        Event::Message(Envelope {
            version: PROTOCOL_VERSION,
            from: other.into(),
            to: active.into(),
            epoch,
            body: Body::ProbeReply {
                probe_sent_ms: now,
                status: status(Role::Standby, false),
                lease: Some(LeaseAnswer::Denied {
                    epoch,
                    voted_epoch: u64::MAX,
                }),
            },
        }),
    );
    sim.event(
        active,
        Event::Command(Command::Switchover {
            target: other.into(),
        }),
    );
    sim.run(3 * PROBE);
    assert!(
        sim.reasons(other).contains(&Reason::HandoverReady),
        "ready sent"
    );
    assert_eq!(sim.actives(), vec![active]);
    assert!(!sim.reasons(active).contains(&Reason::HandedOver));
    assert!(sim.overlaps.is_empty());
}

#[test]
fn a_probe_reply_from_the_future_counts_for_nothing() {
    // Found with the peer_message fuzz target (fuzz/, README "Coverage-
    // guided fuzzing"), from a hand-written boundary input: grants echoing
    // a send time this node never had were counted as given then. Two of them at u64::MAX overflowed the
    // lease end (`sent + leaseMs - marginMs`); any later time stretched
    // the lease past what the voters promised.
    for forged in [u64::MAX, 10_000_000] {
        let config = cfg(&[("a", 2), ("b", 1)], true);
        let (mut node, _) = Node::start(config, "a", Some(active_rec(3, "a")), 1000).unwrap();
        node.handle(1000, Event::Health(HEALTHY));
        node.handle(1000, Event::Tick);
        for from in ["b", "w"] {
            node.handle(
                1010,
                Event::Message(Envelope {
                    version: PROTOCOL_VERSION,
                    from: from.into(),
                    to: "a".into(),
                    epoch: 3,
                    body: Body::ProbeReply {
                        probe_sent_ms: forged,
                        status: status(Role::Standby, false),
                        lease: Some(LeaseAnswer::Granted { epoch: 3 }),
                    },
                }),
            );
        }
        assert_eq!(node.lease_until_ms(), None, "forged {forged}");
        assert!(!node.serving());
        assert!(
            node.peers()
                .get("b")
                .is_none_or(|p| p.answered_probe_ms != Some(forged))
        );
        // A genuine reply to the probe sent at 1000 still counts.
        node.handle(
            1020,
            Event::Message(Envelope {
                version: PROTOCOL_VERSION,
                from: "b".into(),
                to: "a".into(),
                epoch: 3,
                body: Body::ProbeReply {
                    probe_sent_ms: 1000,
                    status: status(Role::Standby, false),
                    lease: Some(LeaseAnswer::Granted { epoch: 3 }),
                },
            }),
        );
        assert_eq!(node.lease_until_ms(), Some(1000 + LEASE - MARGIN));
    }
}
