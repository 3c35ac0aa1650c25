//! SPIFFE workload identity: the operator's built-in CA, the SVID signing
//! service, and SVID verification for rustls.

pub mod ca;
pub mod signer;
pub mod verify;
