//! SPIFFE workload identity in the operator: the built-in CA and the SVID
//! signing service. Verification and the Workload API are in
//! `mandate-identity`, which the sidecar shares.

pub mod ca;
pub mod signer;
