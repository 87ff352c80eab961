//! Lease-based leader election between replicas of one cluster's controller.
//!
//! Two replicas make a controller Deployment survive a node loss, but two
//! acting replicas would each run the HA protocol as the same member, which
//! the protocol cannot tell apart from a lying peer. So only the holder of
//! the `coordination.k8s.io` Lease acts; the others wait, report NotReady
//! (so the peer Service routes to the leader only) and take over when the
//! holder's record has sat unchanged for a whole lease on their own clock.
//! The holder gives up at its renew deadline, shorter than the lease, and
//! the binary exits so that nothing of the old term keeps running.
//! The decisions are [`counterweight_core::leader`]'s; this module reads and
//! writes the Lease with compare-and-swap on its resourceVersion.

use std::time::{Duration, Instant};

use counterweight_core::leader::{Election, Step, must_step_down};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// The leader Lease's name unless `--leader-election-lease` says another.
pub const DEFAULT_LEASE: &str = "counterweight-controller";

/// Where the Lease lives, who we are, and the timings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the controller's).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity, normally its pod name.
    pub identity: String,
    /// How long a silent holder's record must sit still before a follower
    /// takes over.
    pub lease: Duration,
    /// How long the holder keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to renew, or to look again while following.
    pub retry: Duration,
}

impl LeaderConfig {
    /// Checks the timings: the holder must give up before anyone may take
    /// over, and must get several renewal attempts before giving up.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.identity.is_empty() {
            return Err(LeaderError::Config(
                "the replica identity is empty; set --leader-election-identity or POD_NAME".into(),
            ));
        }
        if self.renew_deadline >= self.lease {
            return Err(LeaderError::Config(format!(
                "renew deadline {:?} must be shorter than the lease {:?}, or an old leader could still act when a new one starts",
                self.renew_deadline, self.lease
            )));
        }
        if self.retry.is_zero() || self.retry * 2 > self.renew_deadline {
            return Err(LeaderError::Config(format!(
                "retry period {:?} must be above zero and at most half the renew deadline {:?}",
                self.retry, self.renew_deadline
            )));
        }
        Ok(())
    }
}

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The settings cannot give a safe election.
    #[error("leader election settings: {0}")]
    Config(String),
    /// No successful renewal within the renew deadline, or another replica
    /// took the Lease.
    #[error(
        "lost the leader Lease ({0}); exiting so that the new leader is the only one acting (the pod restarts as a follower)"
    )]
    Lost(String),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The Lease held by this replica, renewed by [`Leadership::hold`].
pub struct Leadership {
    api: Api<Lease>,
    config: LeaderConfig,
    lease: Lease,
    renewed: Instant,
    started: Instant,
}

/// Waits until this replica holds the Lease; `None` if `shutdown` came
/// first. Errors reading or writing the Lease are retried: a follower that
/// cannot reach the API server simply keeps waiting.
pub async fn acquire(
    client: kube::Client,
    config: LeaderConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Option<Leadership>, LeaderError> {
    config.validate()?;
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let started = Instant::now();
    let mut election = Election::new(&config.identity, ms(config.lease));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_holder = None::<String>;
    loop {
        let now = ms(started.elapsed());
        match api.get_opt(&config.name).await {
            Ok(current) => {
                let holder = current
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.clone());
                let version = current
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone())
                    .unwrap_or_default();
                match election.observe(now, holder.as_deref(), &version) {
                    Step::Follow { holder } => {
                        if last_holder.as_deref() != Some(holder.as_str()) {
                            info!(%holder, lease = %config.name, "following the leader");
                            last_holder = Some(holder);
                        }
                    }
                    Step::Acquire | Step::Renew => {
                        if let Some(lease) = take(&api, &config, current).await {
                            info!(identity = %config.identity, lease = %config.name, "became the leader");
                            return Ok(Some(Leadership {
                                api,
                                config,
                                lease,
                                renewed: Instant::now(),
                                started,
                            }));
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, lease = %config.name, "cannot read the leader Lease; retrying")
            }
        }
        tokio::select! {
            () = &mut shutdown => return Ok(None),
            () = tokio::time::sleep(config.retry) => {}
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Writes this replica in as the holder, compare-and-swap against the
/// version just read; `None` if another replica wrote first.
async fn take(api: &Api<Lease>, config: &LeaderConfig, current: Option<Lease>) -> Option<Lease> {
    let now = now_micro();
    match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(seconds(config.lease)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease)
                .await
                .map_err(|e| info!(error = %e, "another replica created the Lease first"))
                .ok()
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let was = spec.holder_identity.clone().unwrap_or_default();
            if was != config.identity {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(now.clone());
            }
            spec.holder_identity = Some(config.identity.clone());
            spec.lease_duration_seconds = Some(seconds(config.lease));
            spec.renew_time = Some(now);
            // resourceVersion from the read: a write by anyone in between
            // is a 409, never an overwrite.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
                .map_err(|e| info!(error = %e, previous = %was, "could not take the Lease"))
                .ok()
        }
    }
}

/// A [`Leadership`] renewed by a background task ([`Leadership::keep`]).
#[derive(Debug)]
pub struct Kept {
    lost: tokio::sync::watch::Receiver<bool>,
    release: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), LeaderError>>,
}

impl Kept {
    /// Resolves once the Lease is no longer held (lost, or released): the
    /// moment to stop acting. Cheap to call more than once.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            // Resolves on `true` or when the task is gone, whichever first.
            let _ = lost.wait_for(|l| *l).await;
        }
    }

    /// Hands the Lease back (once everything that acted under it has
    /// stopped) and reports how holding it ended: `Err(Lost)` if it was
    /// lost before.
    pub async fn release(self) -> Result<(), LeaderError> {
        let _ = self.release.send(());
        match self.task.await {
            Ok(result) => result,
            Err(e) => {
                // The renewal task panicked or was cancelled: nothing left
                // to hand back; the Lease expires on its own.
                warn!(error = %e, "leader election task failed");
                Ok(())
            }
        }
    }
}

impl Leadership {
    /// Renews the Lease in a background task until [`Kept::release`]; see
    /// [`Leadership::hold`].
    pub fn keep(self) -> Kept {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let held = self
                .hold(async move {
                    let _ = released.await;
                })
                .await;
            let _ = lost_tx.send(true);
            held
        });
        Kept {
            lost,
            release,
            task,
        }
    }

    /// Renews the Lease every retry period until `shutdown` (then releases
    /// it so a follower takes over at once, and returns `Ok`) or until the
    /// renew deadline passes without a successful renewal or another
    /// replica holds it (`Err(Lost)`).
    pub async fn hold(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), LeaderError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let now = ms(self.started.elapsed());
            let renewed = ms(self.renewed.duration_since(self.started));
            if must_step_down(now, renewed, ms(self.config.renew_deadline)) {
                return Err(LeaderError::Lost(format!(
                    "no renewal for {:?}",
                    self.renewed.elapsed()
                )));
            }
            tokio::select! {
                () = &mut shutdown => {
                    self.release().await;
                    return Ok(());
                }
                () = tokio::time::sleep(self.config.retry) => {}
            }
            self.renew().await?;
        }
    }

    /// One renewal; a conflict is re-read, and lost only if someone else
    /// now holds the Lease.
    async fn renew(&mut self) -> Result<(), LeaderError> {
        let mut lease = self.lease.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(now_micro());
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.lease = written;
                self.renewed = Instant::now();
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match self.api.get_opt(&self.config.name).await {
                    Ok(Some(current)) => {
                        let holder = current
                            .spec
                            .as_ref()
                            .and_then(|s| s.holder_identity.clone())
                            .unwrap_or_default();
                        if holder != self.config.identity {
                            return Err(LeaderError::Lost(format!("{holder:?} holds it now")));
                        }
                        // Changed by someone else but still ours (a label, say):
                        // renew against the new version next time.
                        self.lease = current;
                    }
                    Ok(None) => return Err(LeaderError::Lost("the Lease was deleted".into())),
                    Err(e) => warn!(error = %e, "cannot re-read the leader Lease"),
                }
            }
            Err(e) => warn!(error = %e, "renewing the leader Lease failed; retrying"),
        }
        Ok(())
    }

    /// Hands the Lease back: an empty holder lets a follower take it at its
    /// next look instead of after a whole lease.
    async fn release(&mut self) {
        let mut lease = self.lease.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(now_micro());
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.config.name, "released the leader Lease"),
            Err(e) => {
                warn!(error = %e, "could not release the leader Lease; followers wait one lease")
            }
        }
    }
}
