//! The active checks of one interval (TCP, HTTP, PostgreSQL): which run,
//! against which host, with which credentials, and where their outcomes
//! go.

use std::pin::Pin;

use counterweight_core::health::{CheckOutcome, runs_checks};
use counterweight_core::policy::Check;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tracing::warn;

use super::HealthLoop;
use super::evaluator::Evaluator;
use crate::checks::{self, PgCredentials};

/// A round of active checks in flight.
pub(super) type CheckRound = Pin<Box<dyn std::future::Future<Output = Vec<RoundResult>> + Send>>;

/// One check's outcome, placed by component and check index.
pub(super) struct RoundResult {
    component: usize,
    check: usize,
    outcome: CheckOutcome,
}

impl HealthLoop {
    /// Starts the active checks of one interval, concurrently; the round
    /// resolves with every outcome.
    pub(super) async fn start_round(&self, ev: &mut Evaluator) -> CheckRound {
        let Some(policy) = ev.policy.clone() else {
            return Box::pin(async { Vec::new() });
        };
        let Some(tally) = &ev.tally else {
            return Box::pin(async { Vec::new() });
        };
        // Hosts first: the tally borrow must end before credentials are
        // fetched (which may update the credential cache).
        let mut specs = Vec::new();
        let stance = self.stance.get();
        let grace_ms = u64::try_from(policy.gate_release_grace.as_millis()).unwrap_or(u64::MAX);
        for (i, component) in policy.components.iter().enumerate() {
            // A standby's service pods serve nothing to check (core's
            // `runs_checks`): their checks pass as not run.
            let runs = runs_checks(component.role, stance, grace_ms, tally.counts(i).1);
            for (k, check) in component.checks.iter().enumerate() {
                let host = check_host(check).or_else(|| tally.ready_ip(i).map(str::to_owned));
                specs.push((i, k, check.clone(), host, component.check_timeout, runs));
            }
        }
        let mut jobs = Vec::with_capacity(specs.len());
        for (i, k, check, host, timeout, runs) in specs {
            let creds = match &check {
                Check::Postgres(pg) if runs => self.credentials(ev, &pg.secret_ref).await,
                _ => None,
            };
            jobs.push(async move {
                let outcome = match host {
                    _ if !runs => CheckOutcome {
                        check: format!(
                            "{} not run: no service pod is meant to serve yet",
                            check.describe()
                        ),
                        error: None,
                    },
                    Some(host) => checks::run(&check, &host, timeout, creds.as_ref()).await,
                    None => CheckOutcome {
                        check: check.describe(),
                        error: Some("no Running and Ready pod with an IP to check".into()),
                    },
                };
                RoundResult {
                    component: i,
                    check: k,
                    outcome,
                }
            });
        }
        Box::pin(futures::future::join_all(jobs))
    }

    /// Stores a round's outcomes and evaluates the interval.
    pub(super) async fn finish_round(&self, ev: &mut Evaluator, results: Vec<RoundResult>) {
        for r in results {
            // Drop cached credentials the server refused, so a rotated
            // Secret is picked up on the next round.
            if let Some(err) = &r.outcome.error
                && (err.contains("28P01") || err.contains("28000"))
                && let Some(Check::Postgres(pg)) = ev
                    .policy
                    .as_ref()
                    .and_then(|p| p.components.get(r.component))
                    .and_then(|c| c.checks.get(r.check))
            {
                ev.credentials.remove(&pg.secret_ref.name);
            }
            if let Some(slot) = ev
                .checks
                .get_mut(r.component)
                .and_then(|c| c.get_mut(r.check))
            {
                *slot = Some(r.outcome);
            }
        }
        self.publish(ev, true).await;
    }

    /// The credentials a PostgreSQL check names, from its Secret (cached
    /// until the server refuses them).
    async fn credentials(
        &self,
        ev: &mut Evaluator,
        secret: &counterweight_core::policy::SecretRef,
    ) -> Option<PgCredentials> {
        if let Some(c) = ev.credentials.get(&secret.name) {
            return Some(c.clone());
        }
        self.metrics.api_requests.inc();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        let s = match api.get_opt(&secret.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                warn!(secret = %secret.name, "check credentials Secret not found");
                return None;
            }
            Err(e) => {
                warn!(secret = %secret.name, error = %e, "could not read check credentials");
                return None;
            }
        };
        let data = s.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let ca = match &secret.ca_key {
            None => None,
            Some(key) => match data.get(key) {
                Some(v) => Some((format!("Secret {} key {key}", secret.name), v.0.clone())),
                None => {
                    warn!(secret = %secret.name, key = %key, "check credentials Secret lacks the CA key the check names");
                    return None;
                }
            },
        };
        let creds = PgCredentials {
            user: get(&secret.user_key)?,
            password: get(&secret.password_key)?,
            ca,
        };
        ev.credentials.insert(secret.name.clone(), creds.clone());
        Some(creds)
    }
}

fn check_host(check: &Check) -> Option<String> {
    match check {
        Check::Tcp(c) => c.host.clone(),
        Check::Http(c) => c.host.clone(),
        Check::Postgres(c) => c.host.clone(),
    }
}
