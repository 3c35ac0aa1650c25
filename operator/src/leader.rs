//! Leader election on a coordination.k8s.io/v1 Lease, so that of several
//! replicas exactly one runs the reconcilers (the writers of status).
//!
//! Every write carries the Lease's resourceVersion, so two replicas racing
//! for it cannot both win: the loser gets a conflict and stays a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
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
        if !ours && !holder.is_empty() && !expired(&spec, now.0) {
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
    /// error) when leadership, once held, could not be renewed within the
    /// lease duration: the caller must stop writing, i.e. exit.
    pub async fn run(&self, tx: watch::Sender<bool>) -> anyhow::Result<()> {
        let renew_every = self.cfg.lease_duration / 3;
        let retry_every = (self.cfg.lease_duration / 5).max(Duration::from_millis(200));
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    if last_renewal.is_none() {
                        tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "became leader");
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                    let _ = tx.send(true);
                    tokio::time::sleep(renew_every).await;
                    continue;
                }
                Ok(Attempt::Following { holder }) => {
                    if last_renewal.is_some() {
                        anyhow::bail!("lost the leader lease to {holder}; stopping so that only one replica writes");
                    }
                    tracing::debug!(%holder, "following");
                }
                Err(e) => {
                    if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        tracing::error!(
                            namespace = %self.cfg.namespace,
                            "cannot create the leader Lease: does the namespace exist? Set --lease-namespace to the operator's own namespace"
                        );
                    }
                    tracing::warn!(error = %e, "leader lease: API error");
                    if let Some(t) = last_renewal {
                        if t.elapsed() >= self.cfg.lease_duration {
                            anyhow::bail!(
                                "could not renew the leader lease for {:?}: {e}",
                                self.cfg.lease_duration
                            );
                        }
                    }
                }
            }
            tokio::time::sleep(retry_every).await;
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    renewed
        .0
        .saturating_add(SignedDuration::from_secs(secs))
        .map(|until| until < now)
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_duration() {
        let now = Timestamp::now();
        let spec = |ago: i64, dur: i32| LeaseSpec {
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(ago))),
            lease_duration_seconds: Some(dur),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec(5, 15), now));
        assert!(expired(&spec(20, 15), now));
        assert!(expired(&LeaseSpec::default(), now), "never renewed = free");
    }
}
