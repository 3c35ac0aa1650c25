//! Mandate's own gRPC API: policy distribution, SVID signing and approvals.
//!
//! Not built yet: the `.proto` files and their generated Rust arrive with the
//! issues that define those services (SVID signing, policy distribution).
//! Envoy's ext_authz types come from the `envoy-types` crate, never from here.
