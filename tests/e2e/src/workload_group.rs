//! The group most workload-safety tests share (`tests/workload.rs`, and the
//! 2,000-pod promotion in `tests/bulk_promotion.rs`, which has a test binary
//! of its own so that its load meets no other test's budgets): east and west
//! with the sample EMS, a witness, real controller processes, east elected
//! with its service pods serving.

use std::time::Duration;

use counterweight_core::ha::HaConfig;
use counterweight_harness::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use crate::ems::{all_serving, prepare, restarted_blocked};
use crate::eventually;
use crate::fixtures::fast_ha_config;
use crate::ha::{
    Controller, Mesh, SYSTEM, leader_lease_holder, sample, start_group, wait_active,
    write_ha_config,
};
use crate::init_tracing;
use crate::workload::Watched;

/// east and west with the sample EMS, a witness, their controllers, and
/// east elected with its service pods serving.
pub struct Group {
    // The controllers first, so dropped first: one that fails prints its
    // log's tail on drop, from its cluster's directory, which the cluster's
    // drop removes.
    /// Each member's controller (its first replica), `None` once killed.
    pub nodes: Vec<Option<Controller>>,
    /// The member that runs two controller replicas with leader election,
    /// and its second replica (the first is in `nodes`).
    pub second: Option<(usize, Controller)>,
    /// east, west and the witness's cluster, in [`NAMES`] order.
    pub clusters: Vec<Cluster>,
    /// Each member's state ConfigMap.
    pub cms: Vec<Api<ConfigMap>>,
    /// Where the controllers' certificates, HA file and logs live.
    pub dir: tempfile::TempDir,
    /// The peer links, each through a proxy a test can cut.
    pub mesh: Mesh,
    /// The HA configuration every member runs.
    pub config: HaConfig,
    /// That configuration's file.
    pub ha_file: std::path::PathBuf,
    /// east's epoch when it was elected.
    pub first: u64,
    /// uids of east's service pods that served.
    pub east_served: Vec<String>,
}

/// The members, in the order of [`Group::clusters`].
pub const NAMES: [&str; 3] = ["east", "west", "witness"];

impl Group {
    /// The group with one controller replica per member.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// With `two_replicas: Some(i)`, member `i` runs two controller
    /// replicas with leader election, as the manifests do.
    pub async fn start_with(two_replicas: Option<usize>) -> Self {
        Self::start_configured(
            two_replicas,
            fast_ha_config(&["east", "west"], Some("witness")),
        )
        .await
    }

    /// [`Group::start_with`], with HA `config` instead of the tests' fast
    /// timings (its members must be east, west and the witness).
    pub async fn start_configured(two_replicas: Option<usize>, config: HaConfig) -> Self {
        init_tracing();
        counterweight_harness::install_crypto_provider();
        let (clusters, cms, dir, mesh) = start_group(&NAMES).await;
        prepare(&clusters[0], true).await;
        prepare(&clusters[1], true).await;
        prepare(&clusters[2], false).await;
        let ha_file = write_ha_config(dir.path(), &config);
        let mut g = Self {
            clusters,
            cms,
            dir,
            mesh,
            config,
            ha_file,
            nodes: Vec::new(),
            first: 0,
            east_served: Vec::new(),
            second: None,
        };
        g.nodes = (0..NAMES.len())
            .map(|i| match two_replicas {
                Some(r) if r == i => Some(g.replica(i, "a")),
                _ => Some(g.controller(i)),
            })
            .collect();
        g.second = two_replicas.map(|i| (i, g.replica(i, "b")));
        g.first = wait_active(&g.cms[0], "east to become active", 1)
            .await
            .epoch;
        g.east_served = all_serving(&g.clusters[0], "east's service pods to serve").await;
        g
    }

    /// Starts member `i`'s controller (one replica; the witness with
    /// `--witness`).
    pub fn controller(&self, i: usize) -> Controller {
        let extra: &[&str] = if NAMES[i] == "witness" {
            &["--witness"]
        } else {
            &[]
        };
        self.start_member(i, extra)
    }

    /// One of member `i`'s replicas, `<name>-<suffix>`, with leader
    /// election (test timings: a 4 s Lease, as in `leader.rs`).
    pub fn replica(&self, i: usize, suffix: &str) -> Controller {
        let args = [
            "--leader-elect".to_owned(),
            format!("--leader-election-identity={}", replica_identity(i, suffix)),
            "--leader-lease-duration=4000ms".to_owned(),
            "--leader-renew-deadline=3000ms".to_owned(),
            "--leader-retry-period=300ms".to_owned(),
        ];
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_member(i, &extra)
    }

    /// A controller process for member `i` with the group's mesh, HA file
    /// and directory, and `extra` flags.
    fn start_member(&self, i: usize, extra: &[&str]) -> Controller {
        Controller::start(
            &self.clusters[i],
            NAMES[i],
            &self.mesh,
            self.dir.path(),
            &self.ha_file,
            extra,
        )
    }

    /// SIGKILLs member `i`'s controller, like a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            c.process.kill();
        }
    }

    /// SIGKILLs the acting replica of the member that runs two, and returns
    /// the other. Checks that it was a crash: the Lease is still the dead
    /// replica's, so the follower must wait out a whole Lease. (A SIGTERM
    /// before the SIGKILL once let the leader hand its Lease back under
    /// load, the follower took over at once, and the test saw no failover.)
    pub async fn kill_leader(&mut self) -> Controller {
        let (i, b) = self.second.take().expect("a member with two replicas");
        let a = self.nodes[i].take().expect("replica a");
        let (mut leader, follower, id) = if leads(Some(&a)).await {
            (a, b, "a")
        } else {
            assert!(
                leads(Some(&b)).await,
                "one of {}'s replicas leads",
                NAMES[i]
            );
            (b, a, "b")
        };
        leader.process.kill();
        let leases: Api<Lease> = Api::namespaced(self.clusters[i].client(), SYSTEM);
        let killed = replica_identity(i, id);
        assert_eq!(
            leader_lease_holder(&leases).await,
            Some(killed.clone()),
            "{killed} was killed, not stopped: its Lease must outlive it"
        );
        follower
    }

    /// After member `i`'s leader was killed and the other member promoted
    /// in `epoch`: the follower leads, boots as any restarted controller
    /// does, fences, and member `i` rejoins as a standby with its pods that
    /// had served (`served`) restarted behind the gate.
    pub async fn follower_rejoins_as_standby(
        &self,
        i: usize,
        follower: &mut Controller,
        served: &[String],
        epoch: u64,
    ) {
        let name = NAMES[i];
        eventually(
            &format!("{name}'s other replica to lead"),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async { Ok(leads(Some(&*follower)).await.then_some(())) },
        )
        .await;
        restarted_blocked(
            &self.clusters[i],
            served,
            &format!("{name}'s served pods to be restarted by the new leader"),
        )
        .await;
        // The restarts say little when nothing had served: wait for the
        // record itself, which only a booted leader writes.
        eventually(
            &format!("{name} to record standby"),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { Ok(sample(&self.cms[i]).await.filter(|s| !s.active).map(|_| ())) },
        )
        .await;
        let other = 1 - i;
        assert_eq!(sample(&self.cms[other]).await.map(|s| s.epoch), Some(epoch));
        follower
            .process
            .check_alive()
            .expect("the new leader keeps running");
    }

    /// The workload of east and west as the monitors see it.
    pub fn watched(&self) -> [Watched; 2] {
        [0, 1].map(|i| Watched::new(NAMES[i], self.clusters[i].client(), crate::ems::APP))
    }

    /// The earliest a peer may promote after east's last renewal: its
    /// voters' promises run `leaseMs` from a renewal at most about two
    /// probe intervals before.
    pub fn lease_bound(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms - 2 * self.config.probe_interval_ms)
    }
}

/// Member `i`'s replica `suffix` as the leader Lease names it.
fn replica_identity(i: usize, suffix: &str) -> String {
    format!("{}-{suffix}", NAMES[i])
}

/// Whether `c` is the replica that acts (its metrics say it leads).
pub async fn leads(c: Option<&Controller>) -> bool {
    match c.map(|c| c.metrics_port) {
        Some(p) => crate::ha::http_get(p, "/metrics")
            .await
            .is_ok_and(|t| t.lines().any(|l| l == "counterweight_leader 1")),
        None => false,
    }
}
