//! The built-in SPIFFE certificate authority of the trust domain: its key
//! lives in a Secret in the operator's namespace (made at first start, never
//! logged), shared by every replica. It signs X.509-SVIDs (one URI SAN, the
//! SPIFFE ID; not a CA; client and server auth) and the operator's own SVID.
//! The trust bundle holds the current CA and, after a rotation, the previous
//! one, so SVIDs issued before the rotation stay valid until they expire.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::secret::{self, Contents, Decision, Kept, text};
use crate::webhook::tls::Material;
use mandate_api::names::{MANAGED_BY, MANAGED_BY_LABEL, NOT_AFTER_ANNOTATION};

/// Lifetime of a CA; it is replaced when a third of it remains.
const CA_DAYS: i64 = 365;
const CA_ROTATE_BELOW_DAYS: i64 = CA_DAYS / 3;
/// The longest SVID lifetime the CA issues.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why something was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {0}; an SVID carries exactly the agent's SPIFFE ID and nothing else")]
    CsrAsksTooMuch(String),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("the CA in the Secret is unusable: {0}")]
    Unusable(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The CA: its key and certificate, and the previous certificate during a rotation.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    key: KeyPair,
    previous_pem: Option<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish()
    }
}

fn ca_params(trust_domain: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mandate");
    dn.push(DnType::CommonName, format!("Mandate SPIFFE CA {trust_domain}"));
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn after(d: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + d
}

fn pem_ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

impl Ca {
    /// A new CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut p = ca_params(trust_domain)?;
        p.not_before = after(Duration::ZERO) - time::Duration::minutes(5);
        p.not_after = after(Duration::from_secs(CA_DAYS as u64 * 86_400));
        let cert = p.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            cert_pem: cert.pem(),
            key,
            previous_pem: None,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificates to trust: current first, then the previous one.
    pub fn bundle_pem(&self) -> String {
        let mut b = self.cert_pem.clone();
        if let Some(p) = &self.previous_pem {
            b.push_str(p);
        }
        b
    }

    pub fn bundle_der(&self) -> Vec<CertificateDer<'static>> {
        pem_ders(&self.bundle_pem())
    }

    pub fn cert_der(&self) -> Option<CertificateDer<'static>> {
        pem_ders(&self.cert_pem).into_iter().next()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::new(ca_params(&self.trust_domain)?, &self.key))
    }

    /// Sign `csr` (DER) as an X.509-SVID for `spiffe_id`, valid for `ttl`.
    /// The CSR only contributes its public key: the certificate is built
    /// here, with `spiffe_id` as its one URI SAN. A CSR asking for anything
    /// else (other SANs, a CA) is refused, not trimmed.
    pub fn sign_svid(
        &self,
        csr: &[u8],
        spiffe_id: &str,
        ttl: Duration,
    ) -> Result<(Vec<u8>, time::OffsetDateTime), CaError> {
        let parsed = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if !matches!(parsed.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CaError::CsrAsksTooMuch("to be a CA".into()));
        }
        for san in &parsed.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == spiffe_id => {}
                other => return Err(CaError::CsrAsksTooMuch(format!("the SAN {other:?}"))),
            }
        }
        if parsed.params.key_usages.contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(CaError::CsrAsksTooMuch("certificate signing".into()));
        }
        let ttl = ttl.min(MAX_SVID_TTL);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mandate");
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = after(Duration::ZERO) - time::Duration::seconds(30);
        let not_after = after(ttl);
        p.not_after = not_after;
        let cert = p.signed_by(&parsed.public_key, &self.issuer()?)?;
        Ok((cert.der().to_vec(), not_after))
    }

    /// A key and SVID for the operator itself (`spiffe://<td>/mandate/operator`),
    /// also valid for `dns` names, for its TLS servers.
    pub fn operator_svid(&self, dns: &[String], ttl: Duration) -> Result<Material, CaError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(dns.to_vec())?;
        p.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/mandate/operator", self.trust_domain).try_into()?,
        ));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = after(Duration::ZERO) - time::Duration::seconds(30);
        p.not_after = after(ttl);
        let cert = p.signed_by(&key, &self.issuer()?)?;
        Ok(Material {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            ca_pem: Some(self.bundle_pem()),
        })
    }

    /// The CA of the Secret `ns/name`, made (or rotated, keeping the old
    /// certificate in the bundle) when absent or near its end. Replicas
    /// racing here converge: writes are conditional and the loser re-reads.
    pub async fn load_or_create(client: &Client, ns: &str, name: &str, trust_domain: &str) -> Result<Self, CaError> {
        let kept = secret::keep(client, ns, name, |existing| {
            if let Some(s) = existing
                && let (Some(cert_pem), Some(key_pem)) = (text(s, "ca.crt"), text(s, "ca.key"))
            {
                let td = text(s, "trust-domain").unwrap_or_default();
                if td != trust_domain {
                    return Err(CaError::Unusable(format!(
                        "the Secret {ns}/{name} holds the CA of trust domain '{td}', not '{trust_domain}'; \
                         changing the trust domain invalidates every SVID, so delete the Secret to do it on purpose"
                    )));
                }
                let fresh = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(NOT_AFTER_ANNOTATION))
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| {
                        t.duration_since(jiff::Timestamp::now())
                            > jiff::SignedDuration::from_hours(CA_ROTATE_BELOW_DAYS * 24)
                    });
                let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Unusable(e.to_string()))?;
                if fresh {
                    return Ok(Decision::Keep(Self {
                        trust_domain: trust_domain.into(),
                        cert_pem,
                        key,
                        previous_pem: text(s, "previous.crt"),
                    }));
                }
                tracing::info!(secret = %format!("{ns}/{name}"), "the SPIFFE CA nears its end; rotating (the old CA stays in the bundle)");
            }
            let mut ca = Self::generate(trust_domain)?;
            ca.previous_pem = existing.and_then(|s| text(s, "ca.crt"));
            let not_after = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::from_hours(CA_DAYS * 24))
                .unwrap_or_else(|_| jiff::Timestamp::now());
            let mut data = vec![
                ("ca.crt", ca.cert_pem.clone()),
                ("ca.key", ca.key.serialize_pem()),
                ("trust-domain", trust_domain.to_string()),
            ];
            if let Some(p) = &ca.previous_pem {
                data.push(("previous.crt", p.clone()));
            }
            let contents = Contents {
                type_: None,
                annotations: [(NOT_AFTER_ANNOTATION.to_string(), not_after.to_string())].into(),
                data: data.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            };
            Ok(Decision::Write(contents, ca))
        })
        .await?;
        match kept {
            Kept::Read(ca) => Ok(ca),
            Kept::Written(ca) => {
                tracing::info!(secret = %format!("{ns}/{name}"), %trust_domain, "SPIFFE CA created");
                Ok(ca)
            }
            Kept::Contended => Err(CaError::Unusable(format!(
                "the Secret {ns}/{name} keeps changing under us"
            ))),
        }
    }

    /// Publish the trust bundle as ConfigMap `ns/name` (key `bundle.pem`).
    pub async fn publish_bundle(&self, client: &Client, ns: &str, name: &str) -> Result<(), kube::Error> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into()),
                ..ObjectMeta::default()
            },
            data: Some(
                [
                    ("bundle.pem".to_string(), self.bundle_pem()),
                    ("trust-domain".to_string(), self.trust_domain.clone()),
                ]
                .into(),
            ),
            ..ConfigMap::default()
        };
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(name, &PatchParams::apply(MANAGED_BY).force(), &Patch::Apply(&cm))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(sans: Vec<String>, ca: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans
            .into_iter()
            .map(|s| {
                if s.starts_with("spiffe://") {
                    SanType::URI(s.try_into().unwrap())
                } else {
                    SanType::DnsName(s.try_into().unwrap())
                }
            })
            .collect();
        if ca {
            // (rcgen cannot write basicConstraints into a CSR; a CA key usage is the same ask.)
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        }
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn signs_exactly_the_spiffe_id_and_refuses_more() {
        let ca = Ca::generate("example.org").unwrap();
        let id = "spiffe://example.org/ns/a/agent/b";
        let (der, _) = ca.sign_svid(&csr(vec![], false), id, Duration::from_secs(600)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(sans, [format!("URI({id})")]);
        assert!(!cert.is_ca());
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!((600..=700).contains(&lifetime), "{lifetime}");
        assert!(
            ca.sign_svid(&csr(vec![id.into()], false), id, Duration::from_secs(60))
                .is_ok()
        );

        for (bad, why) in [
            (
                csr(vec!["spiffe://example.org/other".into()], false),
                "another SPIFFE ID",
            ),
            (csr(vec![id.into(), "evil.example.com".into()], false), "an extra SAN"),
            (csr(vec![], true), "certificate signing"),
            (b"garbage".to_vec(), "garbage"),
        ] {
            assert!(
                ca.sign_svid(&bad, id, Duration::from_secs(60)).is_err(),
                "{why} was signed"
            );
        }
    }
}

/// The verifier in `mandate-identity`, against certificates this CA signs.
#[cfg(test)]
mod verify_tests {
    use super::Ca;
    use mandate_identity::verify::SpiffeVerifier;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::danger::ClientCertVerifier as _;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn svid(ca: &Ca, id: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        CertificateDer::from(ca.sign_svid(csr.der(), id, Duration::from_secs(600)).unwrap().0)
    }

    #[test]
    fn only_current_svids_of_the_trust_domain_and_the_expected_id_pass() {
        let ca = Ca::generate("example.org").unwrap();
        let id = "spiffe://example.org/ns/a/agent/b";
        let v = SpiffeVerifier::exactly(ca.bundle_der(), "example.org", id);
        let now = UnixTime::now();
        let good = svid(&ca, id);
        assert!(v.verify_client_cert(&good, &[], now).is_ok());
        let name = ServerName::try_from("anything").unwrap();
        assert!(v.verify_server_cert(&good, &[], &name, &[], now).is_ok());

        // Expired (checked an hour after its ten minutes).
        let later = UnixTime::since_unix_epoch(
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() + Duration::from_secs(3600),
        );
        assert!(v.verify_client_cert(&good, &[], later).is_err());
        // Another SPIFFE ID of the same domain.
        assert!(
            v.verify_client_cert(&svid(&ca, "spiffe://example.org/ns/a/agent/c"), &[], now)
                .is_err()
        );
        // Another trust domain's CA, even for the same path.
        let other = Ca::generate("other.org").unwrap();
        assert!(
            v.verify_client_cert(&svid(&other, "spiffe://other.org/ns/a/agent/b"), &[], now)
                .is_err()
        );
        let any = SpiffeVerifier::new(ca.bundle_der(), "example.org", Arc::new(|_| true));
        assert!(
            any.verify_client_cert(&svid(&other, "spiffe://example.org/ns/a/agent/b"), &[], now)
                .is_err(),
            "a certificate from a CA outside the bundle"
        );
        // Our CA, but an ID in another trust domain.
        assert!(
            any.verify_client_cert(&svid(&ca, "spiffe://other.org/x"), &[], now)
                .is_err()
        );
    }
}
