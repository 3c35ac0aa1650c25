//! Workload identity, with no Kubernetes client (the sidecar links this):
//!
//! - [`verify`]: X.509-SVID verification for rustls, pinned to a trust
//!   domain and, where asked, to one SPIFFE ID;
//! - [`certs`]: certificates being served, swapped whole on rotation;
//! - [`workload`]: SVIDs and bundles from the SPIFFE Workload API (SPIRE).

pub mod certs;
pub mod verify;
pub mod workload;
