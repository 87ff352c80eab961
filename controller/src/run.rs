//! What a started controller runs: the witness (votes only) or a member
//! (health, gate access, and with an HA group the HA loop driving the
//! service pods), and the admin server beside either. [`crate::Controller`]
//! gets here after the client, leader election and peer wiring; tests come
//! in through [`run_with`] with a client and listener of their own.

use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;

use crate::wiring::{HaWiring, state_and_events};
use crate::{Error, gate_access, ha_loop, health, serving, serving_lease, telemetry};

/// What every role of a started controller works with.
pub(crate) struct Parts {
    /// The cluster's API server.
    pub client: kube::Client,
    /// Cluster name and where the state and policy live.
    pub settings: health::HealthSettings,
    /// The registry `/metrics` serves.
    pub metrics: Arc<telemetry::Metrics>,
    /// What `/healthz` and `/readyz` answer.
    pub probes: Arc<telemetry::Probes>,
}

/// Runs the controller on a given client and metrics listener, so tests can
/// start it on port 0 against a test cluster.
pub async fn run_with(
    client: kube::Client,
    settings: health::HealthSettings,
    metrics_listener: tokio::net::TcpListener,
    ha: Option<HaWiring>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shutdown = shutdown.shared();
    let telemetry::AdminServer {
        metrics,
        probes,
        task: server,
    } = telemetry::start(metrics_listener, shutdown.clone());
    metrics.leader.set(1);
    let parts = Parts {
        client,
        settings,
        metrics,
        probes,
    };
    run_started(parts, ha, shutdown).await?;
    finish_server(server).await
}

/// Waits for the admin server, which ends at shutdown.
pub(crate) async fn finish_server(
    server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<(), Error> {
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Metrics(e)),
        Err(e) => Err(Error::Metrics(std::io::Error::other(e))),
    }
}

/// Runs the witness or a member, as the HA configuration says, until
/// `shutdown`.
pub(crate) async fn run_started(
    parts: Parts,
    ha: Option<HaWiring>,
    shutdown: impl Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let witness = ha
        .as_ref()
        .is_some_and(|w| w.is_witness(&parts.settings.cluster));
    tracing::info!(
        cluster = %parts.settings.cluster,
        namespace = %parts.settings.namespace,
        witness,
        "starting controller"
    );
    match ha {
        Some(wiring) if witness => run_witness(parts, wiring, shutdown).await,
        ha => run_member(parts, ha, shutdown).await,
    }
}

/// A witness holds no workloads: no pod watch, no health, no gate RBAC, no
/// pod effects. It only votes and keeps its votes in the state ConfigMap so
/// a restart cannot forget a promise.
async fn run_witness(
    parts: Parts,
    wiring: HaWiring,
    shutdown: impl Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let (store, events) = state_and_events(&parts.client, &parts.settings);
    let serving = Arc::new(serving::ConfigMapServing::new(store.clone()));
    let (ha, inputs) = wiring.into_loop(&parts.settings, store, events, serving, None);
    parts.probes.set_ready(true);
    ha.run(inputs, shutdown).await.map_err(Error::from)
}

/// A cluster member: health, gate RBAC and, with HA wiring, the HA loop
/// driving the service pods.
async fn run_member(
    parts: Parts,
    ha: Option<HaWiring>,
    shutdown: impl Future<Output = ()> + Clone + Send + 'static,
) -> Result<(), Error> {
    let Parts {
        client,
        settings,
        metrics,
        probes,
    } = parts;
    let gate_access = tokio::spawn(gate_access::run(
        client.clone(),
        settings.namespace.clone(),
        shutdown.clone(),
    ));
    let health = health::HealthLoop::new(client.clone(), settings.clone(), metrics, probes.clone());
    let ha_task = ha.map(|wiring| {
        let (store, events) = state_and_events(&client, &settings);
        // The workload's dead-man switch: the serving lease, published
        // beside the HA loop and part of every fence.
        let lease = serving_lease::LeasePublisher::start(
            client.clone(),
            &settings.namespace,
            &settings.cluster,
            serving_lease::LeaseTimings {
                lease_ms: wiring.config.lease_ms,
                max_skew_ms: wiring.config.max_clock_skew_ms,
                write_timeout: ha_loop::beside_timeout(&wiring.config),
            },
        );
        // Pod-level effects: the serving condition, the demotion fence and
        // the restarts; the `serving` key of the state ConfigMap is kept too.
        let serving = Arc::new(serving::PodServing::start(
            client.clone(),
            store.clone(),
            Some(events.clone()),
            serving::PodServingConfig {
                // Every start fences (nothing serves before a lease), so a
                // restarted active controller would otherwise restart all
                // of its serving pods; a lease regained within this window
                // cancels those restarts.
                restart_delay: std::time::Duration::from_millis(
                    wiring.config.lease_ms + wiring.config.margin_ms,
                ),
                ..wiring.pods.clone()
            },
        ));
        let serving = Arc::new(serving_lease::LeasedServing::new(serving, lease.clone()));
        let serving = Arc::new(serving::StanceNoting::new(serving, health.stance()));
        let (ha, inputs) =
            wiring.into_loop(&settings, store, events, serving, Some(health.subscribe()));
        tokio::spawn(ha.with_serving_lease(lease).run(inputs, shutdown.clone()))
    });
    let Some(mut ha_task) = ha_task else {
        let result = health.run(shutdown).await;
        let _ = gate_access.await;
        return result.map_err(Error::from);
    };
    // Fail-stop: the HA loop returns only at shutdown. If it ends any other
    // way (an error, a panic), the process must not go on without it, its
    // pods fenced only by their lease: it reports not ready and exits, so
    // that Kubernetes restarts it or another replica takes over.
    let health = health.run(shutdown);
    let mut health = std::pin::pin!(health);
    tokio::select! {
        result = &mut health => {
            let _ = gate_access.await;
            match ha_task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(Error::HaStopped(e.to_string())),
            }
            result.map_err(Error::from)
        }
        ended = &mut ha_task => {
            let why = match ended {
                Ok(Ok(())) => "it returned before shutdown".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("it panicked: {e}"),
            };
            probes.set_failed(format!("the HA loop stopped: {why}"));
            tracing::error!(reason = %why, "the HA loop stopped; exiting so that this controller is restarted");
            gate_access.abort();
            Err(Error::HaStopped(why))
        }
    }
}
