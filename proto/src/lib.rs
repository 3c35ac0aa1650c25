//! Mandate's own gRPC API, generated from the `.proto` files beside this
//! crate (`mandate/...`).

/// `mandate.identity.v1`: SVID signing by the operator's SPIFFE CA.
pub mod identity {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        tonic::include_proto!("mandate.identity.v1");
    }
}

/// `mandate.policy.v1`: policy sets pushed to sidecars.
pub mod policy {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        tonic::include_proto!("mandate.policy.v1");
    }
}

/// The SPIFFE Workload API (X.509 part, server side only), written from the
/// SPIFFE specification for tests that stand up a Workload API of their own.
/// Mandate's sidecar and operator are clients through the `spiffe` crate.
pub mod spiffe_workload {
    #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
    // The specification's proto has no package.
    tonic::include_proto!("_");
}
