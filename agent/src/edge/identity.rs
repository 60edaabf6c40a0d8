//! Who is calling: the identity and role read from a client certificate.

use std::fmt;

use x509_parser::prelude::{FromDer, X509Certificate};

pub use covet_proto::Role;

/// A client certificate, as far as authorization and audit care.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerIdentity {
    pub common_name: String,
    /// Lower-case hex of the serial's bytes, no separators (the deny-list format).
    pub serial: String,
    pub fingerprint_sha256: String,
    /// Every O= of the subject.
    #[serde(skip)]
    pub organizations: Vec<String>,
    /// The most powerful covet role among the subject's organizations.
    pub role: Option<Role>,
    #[serde(skip)]
    pub not_after: i64,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("unparseable certificate: {e}"))?;
        let subject = cert.subject();
        let common_name = subject
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .next()
            .unwrap_or_default()
            .to_owned();
        let organizations: Vec<String> = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok().map(str::to_owned))
            .collect();
        let role = organizations.iter().filter_map(|o| Role::from_org(o)).max();
        Ok(PeerIdentity {
            common_name,
            serial: hex::encode(cert.raw_serial()),
            fingerprint_sha256: fingerprint(der),
            organizations,
            role,
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// SHA-256 of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CN={} serial={}", self.common_name, self.serial)
    }
}
