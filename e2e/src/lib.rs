//! Test support for Mandate's cluster tests.
//!
//! A test gets a [`Cluster`] (a kube [`Client`](kube::Client) for the local test
//! cluster that `hack/cluster.sh up` started), a fresh [`TestNamespace`] that is
//! deleted afterwards, and waits that end at a deadline instead of sleeping.
//! When a wait times out, or a test fails or panics, the namespace's pods,
//! events and container logs are printed, so the failure explains itself.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use mandate_e2e::Cluster;
//! let cluster = Cluster::connect().await?;
//! cluster
//!     .with_namespace("example", async |ns| {
//!         // ns.create(pod).await?; ns.wait_pod_running("name", secs(60)).await?;
//!         Ok(())
//!     })
//!     .await
//! # }
//! ```
//!
//! Errors here are for a person reading a failed test, so they are
//! `anyhow::Error`s with context rather than a typed enum.

mod cluster;
mod namespace;
pub mod pods;
mod wait;

pub use cluster::{Cluster, ClusterInfo, Mode};
pub use namespace::TestNamespace;
pub use wait::{Check, wait_until};

/// `Duration::from_secs`, shorter to read in deadlines.
pub fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}
