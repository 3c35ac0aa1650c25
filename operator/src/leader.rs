//! Leader election on a coordination.k8s.io/v1 Lease, so that of several
//! replicas exactly one runs the reconcilers (the writers of status).
//!
//! Every write carries the Lease's resourceVersion, so two replicas racing
//! for it cannot both win: the loser gets a conflict and stays a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Settings of one elector.
#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This replica's name, written as the Lease's holder.
    pub identity: String,
    /// How long a lease lasts without renewal before another replica may take it.
    pub lease_duration: Duration,
}

/// Holds or waits for the lease; publishes `true` while it holds it.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    cfg: Config,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the lease (acquired or renewed).
    Leading,
    /// Another replica holds a live lease.
    Following { holder: String },
}

impl Elector {
    pub fn new(client: kube::Client, cfg: Config) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    fn lease_secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Acquire, renew, or find that another replica holds the lease.
    /// `observed` is this replica's memory of the lease: another holder's
    /// lease expires when it has not changed for its duration *by our own
    /// clock* (the holder's timestamps are not compared with our clock).
    pub async fn try_acquire_or_renew(&self, observed: &mut Observed) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(self.lease_secs()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following {
                    holder: "unknown".into(),
                }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        let ttl = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
        let key = format!("{holder}|{:?}|{:?}", spec.renew_time, lease.metadata.resource_version);
        let stale = observed.stale(key, std::time::Instant::now(), ttl);
        if !ours && !holder.is_empty() && !stale {
            return Ok(Attempt::Following { holder });
        }
        let mut new = spec.clone();
        if !ours {
            new.holder_identity = Some(self.cfg.identity.clone());
            new.acquire_time = Some(now.clone());
            new.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        new.lease_duration_seconds = Some(self.lease_secs());
        new.renew_time = Some(now);
        lease.spec = Some(new);
        // replace() sends metadata.resourceVersion: a concurrent writer makes this a 409.
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following { holder }),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (on shutdown), so another replica need not wait for it to expire.
    pub async fn release(&self) {
        // Best effort, and bounded: an apiserver that does not answer must
        // not hold up the exit (the next leader then waits for expiry).
        if tokio::time::timeout(self.cfg.lease_duration, self.release_now())
            .await
            .is_err()
        {
            tracing::warn!("could not release the leader lease in time; it expires on its own");
        }
    }

    async fn release_now(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await {
            let Some(spec) = lease.spec.as_mut() else { return };
            if spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str()) {
                spec.holder_identity = None;
                if let Err(e) = self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
                    tracing::warn!(error = %e, "could not release the leader lease");
                }
            }
        }
    }

    /// Elect forever: publish `true` on `tx` while leading. Returns (an
    /// error) when leadership, once held, was lost or could not be renewed
    /// within the renew deadline (2/3 of the lease, counted from the start of
    /// the last successful renewal): the caller must stop writing, i.e. exit.
    /// Others take the lease only after a whole lease of silence, so there is
    /// a gap, never an overlap.
    pub async fn run(&self, tx: watch::Sender<bool>) -> anyhow::Result<()> {
        let renew_every = self.cfg.lease_duration / 3;
        let attempt_timeout = self.cfg.lease_duration / 3;
        let renew_deadline = self.cfg.lease_duration * 2 / 3;
        let retry_every = (self.cfg.lease_duration / 5).max(Duration::from_millis(200));
        let mut observed = Observed::default();
        let mut last_ok: Option<tokio::time::Instant> = None;
        loop {
            let started = tokio::time::Instant::now();
            let attempt = tokio::time::timeout(attempt_timeout, self.try_acquire_or_renew(&mut observed)).await;
            match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    if last_ok.is_none() {
                        tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "became leader");
                    }
                    last_ok = Some(started);
                    let _ = tx.send(true);
                    tokio::time::sleep(renew_every).await;
                    continue;
                }
                Ok(Ok(Attempt::Following { holder })) => {
                    if last_ok.is_some() {
                        let _ = tx.send(false);
                        anyhow::bail!("lost the leader lease to {holder}; stopping so that only one replica writes");
                    }
                    tracing::debug!(%holder, "following");
                }
                Err(_) => tracing::warn!(timeout = ?attempt_timeout, "leader lease: no answer from the API in time"),
                Ok(Err(e)) => {
                    if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        tracing::error!(
                            namespace = %self.cfg.namespace,
                            "cannot create the leader Lease: does the namespace exist? Set --lease-namespace to the operator's own namespace"
                        );
                    }
                    tracing::warn!(error = %e, "leader lease: API error");
                }
            }
            if let Some(t) = last_ok
                && t.elapsed() >= renew_deadline
            {
                let _ = tx.send(false);
                anyhow::bail!(
                    "could not renew the leader lease within {renew_deadline:?}; stopping so that only one replica writes"
                );
            }
            tokio::time::sleep(retry_every).await;
        }
    }
}

/// This replica's view of another holder's lease: what it last looked like,
/// and since when (by our monotonic clock).
#[derive(Debug, Default)]
pub struct Observed {
    key: String,
    since: Option<std::time::Instant>,
}

impl Observed {
    /// Record how the lease looks at `now`; whether it has stood unchanged
    /// for longer than `ttl` (its holder stopped renewing).
    pub fn stale(&mut self, key: String, now: std::time::Instant, ttl: Duration) -> bool {
        match self.since {
            Some(since) if self.key == key => now.duration_since(since) > ttl,
            _ => {
                self.key = key;
                self.since = Some(now);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_stale_only_after_standing_still_for_its_duration() {
        let t0 = std::time::Instant::now();
        let ttl = Duration::from_secs(15);
        let mut seen = Observed::default();
        assert!(!seen.stale("a|1".into(), t0, ttl), "first sight is never stale");
        assert!(!seen.stale("a|1".into(), t0 + Duration::from_secs(10), ttl));
        assert!(
            !seen.stale("a|2".into(), t0 + Duration::from_secs(20), ttl),
            "a renewal resets the clock"
        );
        assert!(!seen.stale("a|2".into(), t0 + Duration::from_secs(30), ttl));
        assert!(seen.stale("a|2".into(), t0 + Duration::from_secs(36), ttl));
    }
}
