//! SPIFFE workload identity: the operator's built-in CA, the SVID signing
//! service, SVID verification for rustls, and (SPIRE mode) SVIDs from the
//! SPIFFE Workload API.

pub mod ca;
pub mod signer;
pub mod verify;
pub mod workload;
