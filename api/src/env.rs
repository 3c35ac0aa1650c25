//! The sidecar's environment: what the injector writes and the sidecar's
//! arguments read.

/// Where X.509-SVIDs come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// The operator's built-in CA: sidecars prove their pod with a projected
    /// service-account token and get their SVID signed by the operator.
    #[default]
    Builtin,
    /// SPIRE: every workload (sidecars and the operator) gets its SVID and
    /// bundle from the SPIFFE Workload API socket.
    Spire,
}
