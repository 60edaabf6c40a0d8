//! A small certificate authority for covet.
//!
//! Everything lives in one directory: `ca.crt`/`ca.key` for the CA,
//! `NAME.crt`/`NAME.key` for every issued certificate and `revoked.txt`, the
//! deny-list of serial numbers the agent refuses. Keys are ECDSA P-256 and are
//! only ever readable by their owner (mode 0600).
//!
//! The role of a client is carried in the Organization (O=) field of its
//! certificate; see [`Role`].

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the deny-list of revoked serials inside a PKI directory.
pub const REVOKED_FILE: &str = "revoked.txt";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Default lifetime of the CA certificate (10 years).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Default lifetime of an agent (server) certificate (1 year).
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Default lifetime of a client certificate (90 days).
pub const DEFAULT_CLIENT_TTL: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// Certificates start slightly in the past so that hosts whose clocks lag
/// behind the CA's accept them immediately.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::minutes(5);
const MAX_NAME_LEN: usize = 64;
const SERIAL_LEN: usize = 16;
const PRIVATE_KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const PRIVATE_DIR_MODE: u32 = 0o700;

/// Errors of the PKI commands; every message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("CA already exists at {} (refusing to overwrite)", path.display())]
    CaExists { path: PathBuf },
    #[error("no CA at {}: run `covetctl pki init --dir {}` first", path.display(), dir.display())]
    NoCa { dir: PathBuf, path: PathBuf },
    #[error("{} is not a CA certificate (basic constraints CA:TRUE missing)", path.display())]
    NotACa { path: PathBuf },
    #[error("CA key {} does not belong to CA certificate {}", key.display(), cert.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{} already exists (refusing to overwrite: remove it or choose another name)", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("invalid name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid subject alternative name `{san}`: expected an IP address or a DNS name")]
    InvalidSan { san: String },
    #[error("invalid CA common name: it must not be empty")]
    EmptyCommonName,
    #[error("invalid duration `{input}`: {reason} (examples: 90d, 12h, 1y, 30m, \"1y 6months\")")]
    InvalidTtl { input: String, reason: String },
    #[error(
        "invalid validity window: not_after ({not_after}) must be later than not_before ({not_before})"
    )]
    InvalidValidity {
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },
    #[error(transparent)]
    UnknownRole(#[from] covet_proto::UnknownRole),
    #[error("certificate {} is not valid PEM: {reason}", path.display())]
    NotPem { path: PathBuf, reason: String },
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    InvalidCertificate { what: String, reason: String },
    #[error("private key {} is unusable: {reason}", path.display())]
    InvalidKey { path: PathBuf, reason: String },
    #[error("cannot {action} {}: {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl PkiError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        move |err| PkiError::Io {
            action,
            path: path.to_path_buf(),
            err,
        }
    }

    fn invalid_certificate(what: impl fmt::Display, reason: impl fmt::Display) -> Self {
        PkiError::InvalidCertificate {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The role of a client, carried in the O= field of its certificate.
pub use covet_proto::Role;

/// How to create the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaOptions {
    pub common_name: String,
    pub validity: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            common_name: "covet CA".to_string(),
            validity: DEFAULT_CA_VALIDITY,
        }
    }
}

/// Where a certificate and its private key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Files of the CA.
pub type CaPaths = CertKeyPaths;
/// Files of an issued (agent or client) certificate.
pub type IssuedPaths = CertKeyPaths;

impl CertKeyPaths {
    fn in_dir(dir: &Path, stem: &str) -> Self {
        CertKeyPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// Checks a certificate or context name: it becomes a file name, so only
/// `[A-Za-z0-9._-]`, at most 64 characters, not starting with '.'.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    match name_problem(name) {
        Some(reason) => Err(PkiError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Why `name` is not acceptable, if it is not; shared with the contexts file.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it must be at most 64 characters long")
    } else if name.starts_with('.') {
        Some("it must not start with '.'")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    }
}

/// Creates a new CA in `dir` (created with mode 0700 if missing).
pub fn init_ca(dir: &Path, opts: &CaOptions) -> Result<CaPaths, PkiError> {
    let paths = CaPaths::in_dir(dir, "ca");
    for path in [&paths.cert, &paths.key] {
        if exists(path)? {
            return Err(PkiError::CaExists { path: path.clone() });
        }
    }
    let common_name = opts.common_name.trim();
    if common_name.is_empty() {
        return Err(PkiError::EmptyCommonName);
    }
    let (not_before, not_after) = validity_from_now(opts.validity)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = not_before;
    params.not_after = not_after;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    ensure_private_dir(dir)?;
    write_cert_and_key(&paths, &cert.pem(), &key.serialize_pem())?;
    Ok(paths)
}

/// Issues a server certificate for the agent `name`, valid for `ttl`.
///
/// Each entry of `sans` becomes an IP SAN if it parses as an IP address and a
/// DNS SAN otherwise; `name` itself is added as a DNS SAN when it is a valid
/// DNS name.
pub fn issue_agent(
    dir: &Path,
    name: &str,
    sans: &[String],
    ttl: Duration,
) -> Result<IssuedPaths, PkiError> {
    validate_name(name)?;
    let (not_before, not_after) = validity_from_now(ttl)?;
    let mut params = leaf_params(name, None, not_before, not_after)?;
    params.subject_alt_names = agent_sans(name, sans)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue_leaf(dir, name, params)
}

/// Issues a client certificate for `name` with `role`, valid for `ttl`.
pub fn issue_client(
    dir: &Path,
    name: &str,
    role: Role,
    ttl: Duration,
) -> Result<IssuedPaths, PkiError> {
    let (not_before, not_after) = validity_from_now(ttl)?;
    issue_client_with(dir, name, Some(role.as_org()), not_before, not_after)
}

/// Issues a client certificate with an arbitrary Organization (or none) and
/// an explicit validity window; tests use it for expired or role-less
/// certificates.
pub fn issue_client_with(
    dir: &Path,
    name: &str,
    org: Option<&str>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedPaths, PkiError> {
    validate_name(name)?;
    let mut params = leaf_params(name, org, not_before, not_after)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue_leaf(dir, name, params)
}

/// Adds the serial of `cert` to `dir/revoked.txt` (once) and returns it.
pub fn revoke(dir: &Path, cert: &Path) -> Result<String, PkiError> {
    let der = read_pem_certificate(cert)?;
    let serial = serial_hex(&der)?;
    let deny_list = dir.join(REVOKED_FILE);
    if !is_listed(&deny_list, &serial)? {
        append_line(&deny_list, &serial)?;
    }
    Ok(serial)
}

/// Lists the serials in `dir/revoked.txt` (empty if there is none yet).
pub fn revoked_serials(dir: &Path) -> Result<Vec<String>, PkiError> {
    let deny_list = dir.join(REVOKED_FILE);
    Ok(read_deny_list(&deny_list)?
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_ascii_lowercase)
        .collect())
}

/// The serial number of a DER certificate in the deny-list format shared by
/// covetctl and covet-agent: the lower-case hex of the serial's bytes exactly
/// as encoded in the certificate (including any leading zero byte), with no
/// separators, e.g. `4f1c0e...` (32 digits for serials issued by covetctl).
pub fn serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::invalid_certificate("certificate DER", e))?;
    Ok(hex::encode(cert.raw_serial()))
}

/// Reads and summarizes the PEM certificate at `cert`.
pub fn show(cert: &Path) -> Result<CertSummary, PkiError> {
    let der = read_pem_certificate(cert)?;
    CertSummary::from_der(&der).map_err(|err| match err {
        PkiError::InvalidCertificate { reason, .. } => {
            PkiError::invalid_certificate(cert.display(), reason)
        }
        other => other,
    })
}

/// Parses a lifetime: `90d`, `12h`, `1y` (365 days), `30m`, `2w`, `45s`, or
/// any form humantime accepts (`1y 6months`, `2h 30m`).
pub fn parse_ttl(s: &str) -> Result<Duration, PkiError> {
    let input = s.trim();
    let invalid = |reason: String| PkiError::InvalidTtl {
        input: s.to_string(),
        reason,
    };
    let ttl = match parse_single_unit(input) {
        Some(ttl) => ttl,
        None => humantime::parse_duration(input).map_err(|e| invalid(e.to_string()))?,
    };
    if ttl.is_zero() {
        return Err(invalid("it must be longer than zero".to_string()));
    }
    Ok(ttl)
}

/// What `covetctl pki show` reports about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub subject: String,
    pub common_name: String,
    pub organization: Option<String>,
    pub role: Option<Role>,
    /// Same format as [`serial_hex`].
    pub serial: String,
    pub issuer: String,
    #[serde(with = "rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "rfc3339")]
    pub not_after: OffsetDateTime,
    /// `DNS:name` and `IP:address` entries.
    pub sans: Vec<String>,
    /// Lower-case hex SHA-256 of the DER encoding.
    pub fingerprint_sha256: String,
    pub is_ca: bool,
}

impl CertSummary {
    /// Summarizes a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let invalid = |e: &dyn fmt::Display| PkiError::invalid_certificate("certificate DER", e);
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| invalid(&e))?;
        let organization = first_attribute(cert.subject().iter_organization());
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            common_name: first_attribute(cert.subject().iter_common_name()).unwrap_or_default(),
            role: organization.as_deref().and_then(Role::from_org),
            organization,
            serial: hex::encode(cert.raw_serial()),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            sans: subject_alt_names(&cert).map_err(|e| invalid(&e))?,
            fingerprint_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, der)),
            is_ca: cert.is_ca(),
        })
    }

    /// True if the certificate expires (or has expired) within `d` from now.
    pub fn expires_within(&self, d: Duration) -> bool {
        let horizon = time::Duration::try_from(d)
            .ok()
            .and_then(|d| OffsetDateTime::now_utc().checked_add(d));
        match horizon {
            Some(horizon) => self.not_after <= horizon,
            // `d` reaches beyond representable time: everything expires within it.
            None => true,
        }
    }

    /// True if the certificate's validity has ended.
    pub fn is_expired(&self) -> bool {
        self.not_after < OffsetDateTime::now_utc()
    }
}

/// (De)serializes timestamps as RFC 3339 strings for `-o json`.
mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _, ser::Error as _};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format(&Rfc3339).map_err(S::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339).map_err(D::Error::custom)
    }
}

fn distinguished_name(common_name: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

fn leaf_params(
    name: &str,
    org: Option<&str>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    if not_after <= not_before {
        return Err(PkiError::InvalidValidity {
            not_before,
            not_after,
        });
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name, org);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

fn agent_sans(name: &str, requested: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    if DnsName::try_from(name).is_ok() {
        sans.push(SanType::DnsName(name.try_into()?));
    }
    for entry in requested {
        let san = parse_san(entry.trim())?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn parse_san(entry: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if DnsName::try_from(entry).is_err() {
        return Err(PkiError::InvalidSan {
            san: entry.to_string(),
        });
    }
    Ok(SanType::DnsName(entry.try_into()?))
}

/// Signs `params` with the CA of `dir` and writes `dir/NAME.crt` and `dir/NAME.key`.
fn issue_leaf(
    dir: &Path,
    name: &str,
    mut params: CertificateParams,
) -> Result<IssuedPaths, PkiError> {
    if name == "ca" {
        return Err(PkiError::InvalidName {
            name: name.to_string(),
            reason: "`ca` is reserved for the CA's own files",
        });
    }
    let issuer = load_issuer(dir)?;
    let paths = IssuedPaths::in_dir(dir, name);
    refuse_existing(&paths)?;
    params.serial_number = Some(random_serial()?);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_cert_and_key(&paths, &cert.pem(), &key.serialize_pem())?;
    Ok(paths)
}

/// Loads the CA of `dir` as an rcgen issuer, checking that key and certificate belong together.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let paths = CaPaths::in_dir(dir, "ca");
    for path in [&paths.key, &paths.cert] {
        if !exists(path)? {
            return Err(PkiError::NoCa {
                dir: dir.to_path_buf(),
                path: path.clone(),
            });
        }
    }
    let der = read_pem_certificate(&paths.cert)?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::invalid_certificate(paths.cert.display(), e))?;
    if !ca_cert.is_ca() {
        return Err(PkiError::NotACa { path: paths.cert });
    }
    let key = read_key(&paths.key)?;
    if key.public_key_raw() != ca_cert.public_key().subject_public_key.data.as_ref() {
        return Err(PkiError::CaKeyMismatch {
            cert: paths.cert,
            key: paths.key,
        });
    }
    Ok(Issuer::new(issuer_params(&ca_cert, &paths.cert)?, key))
}

/// The parts of the CA certificate rcgen needs to name it as issuer. The
/// subject is copied attribute by attribute (string types included) so the
/// issuer field of leaves matches the CA's subject byte for byte.
fn issuer_params(
    ca_cert: &X509Certificate<'_>,
    path: &Path,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = copy_distinguished_name(ca_cert.subject())
        .map_err(|reason| PkiError::invalid_certificate(path.display(), reason))?;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(key_id) = subject_key_identifier(ca_cert) {
        params.key_identifier_method = KeyIdMethod::PreSpecified(key_id);
    }
    Ok(params)
}

fn subject_key_identifier(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(key_id) => Some(key_id.0.to_vec()),
            _ => None,
        })
}

fn copy_distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let [attr] = rdn.iter().collect::<Vec<_>>()[..] else {
            return Err("multi-valued RDNs in the CA subject are not supported".to_string());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("CA subject has an attribute type that is too large")?
            .collect();
        dn.push(DnType::from_oid(&oid), copy_dn_value(attr)?);
    }
    Ok(dn)
}

fn copy_dn_value(attr: &AttributeTypeAndValue<'_>) -> Result<DnValue, String> {
    let text = attr.as_str().map_err(|e| e.to_string())?;
    let unsupported = |e: rcgen::Error| e.to_string();
    Ok(match attr.attr_value().tag() {
        Tag::Utf8String => DnValue::Utf8String(text.to_string()),
        Tag::PrintableString => DnValue::PrintableString(text.try_into().map_err(unsupported)?),
        Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(unsupported)?),
        tag => {
            return Err(format!(
                "CA subject uses an unsupported string type ({tag})"
            ));
        }
    })
}

fn first_attribute<'a>(
    mut attrs: impl Iterator<Item = &'a AttributeTypeAndValue<'a>>,
) -> Option<String> {
    attrs
        .next()
        .and_then(|attr| attr.as_str().ok())
        .map(str::to_string)
}

fn subject_alt_names(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let Some(ext) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    Ok(ext
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("DNS:{dns}"),
            GeneralName::IPAddress(bytes) => format!("IP:{}", ip_from_bytes(bytes)),
            other => other.to_string(),
        })
        .collect())
}

fn ip_from_bytes(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ipv4Addr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ipv6Addr::from(v6).to_string()
    } else {
        hex::encode(bytes)
    }
}

/// 16 random bytes; the top bit is cleared so the INTEGER is positive and the
/// next one set so its DER encoding is always exactly 16 bytes.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity_from_now(ttl: Duration) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidTtl {
        input: humantime::format_duration(ttl).to_string(),
        reason: reason.to_string(),
    };
    if ttl.is_zero() {
        return Err(invalid("it must be longer than zero"));
    }
    let now = OffsetDateTime::now_utc();
    let not_after = time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| now.checked_add(ttl))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| invalid("it reaches beyond the year 9999"))?;
    Ok((now - CLOCK_SKEW_ALLOWANCE, not_after))
}

fn parse_single_unit(input: &str) -> Option<Duration> {
    let unit = input.chars().last()?;
    let digits = &input[..input.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let unit_secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 60 * 60,
        'd' => DAY.as_secs(),
        'w' => 7 * DAY.as_secs(),
        // A certificate year is 365 days, not humantime's 365.25.
        'y' => 365 * DAY.as_secs(),
        _ => return None,
    };
    let count: u64 = digits.parse().ok()?;
    count.checked_mul(unit_secs).map(Duration::from_secs)
}

fn read_pem_certificate(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let pem = fs::read(path).map_err(PkiError::io("read", path))?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| PkiError::NotPem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_key(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = fs::read_to_string(path).map_err(PkiError::io("read", path))?;
    KeyPair::from_pem(&pem).map_err(|e| PkiError::InvalidKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(PkiError::io("inspect", path))
}

fn refuse_existing(paths: &CertKeyPaths) -> Result<(), PkiError> {
    for path in [&paths.cert, &paths.key] {
        if exists(path)? {
            return Err(PkiError::AlreadyExists { path: path.clone() });
        }
    }
    Ok(())
}

fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(PkiError::io("create directory", dir))
}

/// Writes the key first (0600) and then the certificate; neither may exist.
/// If the certificate cannot be written the fresh key is removed again, so a
/// retry does not trip over a half-issued pair.
fn write_cert_and_key(paths: &CertKeyPaths, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    write_new_file(&paths.key, key_pem.as_bytes(), PRIVATE_KEY_MODE)?;
    if let Err(err) = write_new_file(&paths.cert, cert_pem.as_bytes(), CERT_MODE) {
        let _ = fs::remove_file(&paths.key);
        return Err(err);
    }
    Ok(())
}

/// Creates `path` with `mode` from the start (no window in which a key is
/// readable by others) and fails if it already exists.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists => PkiError::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => PkiError::io("create", path)(err),
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(PkiError::io("write", path))
}

fn read_deny_list(path: &Path) -> Result<String, PkiError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(err) => Err(PkiError::io("read", path)(err)),
    }
}

fn is_listed(deny_list: &Path, serial: &str) -> Result<bool, PkiError> {
    Ok(read_deny_list(deny_list)?
        .lines()
        .any(|line| line.trim().eq_ignore_ascii_case(serial)))
}

fn append_line(path: &Path, line: &str) -> Result<(), PkiError> {
    // Keep one serial per line even if someone left the file without a final newline.
    let needs_newline = read_deny_list(path)?
        .chars()
        .last()
        .is_some_and(|c| c != '\n');
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(CERT_MODE)
        .open(path)
        .map_err(PkiError::io("open", path))?;
    let text = if needs_newline {
        format!("\n{line}\n")
    } else {
        format!("{line}\n")
    };
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(PkiError::io("append to", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;
    use tempfile::TempDir;

    fn ca_dir() -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &CaOptions::default()).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn der_of(path: &Path) -> CertificateDer<'static> {
        read_pem_certificate(path).unwrap()
    }

    /// Verifies `leaf`'s signature with the CA's public key (x509-parser's
    /// `verify_signature` needs its `verify` feature, so use ring directly).
    fn verify_signed_by(leaf: &X509Certificate<'_>, ca: &X509Certificate<'_>) {
        let ca_key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        );
        ca_key
            .verify(
                leaf.tbs_certificate.as_ref(),
                leaf.signature_value.data.as_ref(),
            )
            .unwrap();
    }

    #[test]
    fn init_ca_writes_a_ca_and_refuses_to_overwrite_it() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let paths = init_ca(&pki, &CaOptions::default()).unwrap();
        assert_eq!(mode(&pki), 0o700);
        assert_eq!(mode(&paths.key), 0o600);

        let ca = show(&paths.cert).unwrap();
        assert!(ca.is_ca);
        assert_eq!(ca.common_name, "covet CA");
        assert!(!ca.expires_within(9 * 365 * DAY));

        let der = der_of(&paths.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let constraints = cert.basic_constraints().unwrap().unwrap().value;
        assert_eq!(constraints.path_len_constraint, Some(0));
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());

        let err = init_ca(&pki, &CaOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"));
    }

    #[test]
    fn issue_without_ca_says_how_to_create_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_client(dir.path(), "alice", Role::Reader, DAY).unwrap_err();
        assert!(matches!(err, PkiError::NoCa { .. }));
        assert!(err.to_string().contains("covetctl pki init --dir"), "{err}");
    }

    #[test]
    fn issue_client_carries_the_role_and_verifies_against_the_ca() {
        let dir = ca_dir();
        let paths = issue_client(dir.path(), "alice", Role::Operator, DEFAULT_CLIENT_TTL).unwrap();
        assert_eq!(mode(&paths.key), 0o600);

        let summary = show(&paths.cert).unwrap();
        assert_eq!(summary.common_name, "alice");
        assert_eq!(summary.organization.as_deref(), Some("covet:operator"));
        assert_eq!(summary.role, Some(Role::Operator));
        assert!(!summary.is_ca);
        assert!(!summary.is_expired());
        assert!(summary.expires_within(91 * DAY));
        assert!(!summary.expires_within(89 * DAY));
        assert_eq!(summary.serial.len(), 2 * SERIAL_LEN);

        let ca_der = der_of(&dir.path().join(CA_CERT_FILE));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let leaf_der = der_of(&paths.cert);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        assert_eq!(summary.issuer, ca.subject().to_string());
        verify_signed_by(&leaf, &ca);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn issued_certificates_are_accepted_by_rustls() {
        let dir = ca_dir();
        let client = issue_client(dir.path(), "bob", Role::Admin, DAY).unwrap();
        let agent = issue_agent(dir.path(), "agent-1", &["127.0.0.1".into()], DAY).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(der_of(&dir.path().join(CA_CERT_FILE))).unwrap();
        let roots = std::sync::Arc::new(roots);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let now = rustls_pki_types::UnixTime::now();

        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        client_verifier
            .verify_client_cert(&der_of(&client.cert), &[], now)
            .unwrap();

        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .unwrap();
        for name in ["agent-1", "127.0.0.1"] {
            let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
            server_verifier
                .verify_server_cert(&der_of(&agent.cert), &[], &server_name, &[], now)
                .unwrap();
        }
    }

    #[test]
    fn issue_agent_has_ip_and_dns_sans_without_duplicates() {
        let dir = ca_dir();
        let sans = ["127.0.0.1", "localhost", "agent-1", "::1"].map(String::from);
        let paths = issue_agent(dir.path(), "agent-1", &sans, DEFAULT_AGENT_TTL).unwrap();
        assert_eq!(mode(&paths.key), 0o600);
        let summary = show(&paths.cert).unwrap();
        assert_eq!(
            summary.sans,
            ["DNS:agent-1", "IP:127.0.0.1", "DNS:localhost", "IP:::1"]
        );
        assert_eq!(summary.role, None);

        let der = der_of(&paths.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    }

    #[test]
    fn issue_agent_rejects_garbage_sans() {
        let dir = ca_dir();
        let err = issue_agent(dir.path(), "agent-1", &["not a name".into()], DAY).unwrap_err();
        assert!(matches!(err, PkiError::InvalidSan { .. }), "{err}");
    }

    #[test]
    fn issuing_twice_refuses_and_names_the_file() {
        let dir = ca_dir();
        issue_client(dir.path(), "alice", Role::Reader, DAY).unwrap();
        let err = issue_client(dir.path(), "alice", Role::Admin, DAY).unwrap_err();
        assert!(matches!(err, PkiError::AlreadyExists { .. }));
        assert!(err.to_string().contains("alice.crt"), "{err}");
    }

    #[test]
    fn revoke_appends_the_serial_once() {
        let dir = ca_dir();
        let paths = issue_client(dir.path(), "mallory", Role::Admin, DAY).unwrap();
        let serial = revoke(dir.path(), &paths.cert).unwrap();
        assert_eq!(serial, show(&paths.cert).unwrap().serial);
        assert_eq!(serial, serial_hex(&der_of(&paths.cert)).unwrap());
        assert!(
            serial
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );

        assert_eq!(revoke(dir.path(), &paths.cert).unwrap(), serial);
        let deny_list = dir.path().join(REVOKED_FILE);
        assert_eq!(
            fs::read_to_string(&deny_list).unwrap(),
            format!("{serial}\n")
        );
        assert_eq!(mode(&deny_list), 0o644);
        assert_eq!(revoked_serials(dir.path()).unwrap(), [serial]);
    }

    #[test]
    fn serial_hex_matches_x509_parser_formatting() {
        let dir = ca_dir();
        let paths = issue_client(dir.path(), "carol", Role::Reader, DAY).unwrap();
        let der = der_of(&paths.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let expected = cert
            .raw_serial_as_string()
            .replace(':', "")
            .to_ascii_lowercase();
        assert_eq!(serial_hex(&der).unwrap(), expected);
    }

    #[test]
    fn revoke_keeps_one_serial_per_line() {
        let dir = ca_dir();
        fs::write(dir.path().join(REVOKED_FILE), "00ff").unwrap();
        let paths = issue_client(dir.path(), "dave", Role::Reader, DAY).unwrap();
        let serial = revoke(dir.path(), &paths.cert).unwrap();
        assert_eq!(
            revoked_serials(dir.path()).unwrap(),
            ["00ff".to_string(), serial]
        );
    }

    #[test]
    fn issue_client_with_expired_window_and_unknown_org() {
        let dir = ca_dir();
        let now = OffsetDateTime::now_utc();
        let expired = issue_client_with(
            dir.path(),
            "old",
            Some("covet:reader"),
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
        assert!(show(&expired.cert).unwrap().is_expired());

        let acme = issue_client_with(
            dir.path(),
            "acme",
            Some("acme"),
            now,
            now + time::Duration::days(1),
        )
        .unwrap();
        let summary = show(&acme.cert).unwrap();
        assert_eq!(summary.organization.as_deref(), Some("acme"));
        assert_eq!(summary.role, None);

        let none = issue_client_with(dir.path(), "anon", None, now, now + time::Duration::days(1))
            .unwrap();
        assert_eq!(show(&none.cert).unwrap().organization, None);

        let err = issue_client_with(dir.path(), "backwards", None, now, now).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }));
    }

    #[test]
    fn invalid_names_are_refused() {
        let dir = ca_dir();
        let long = "a".repeat(65);
        for name in [
            "",
            ".hidden",
            "a/b",
            "../x",
            "spa ce",
            "é",
            long.as_str(),
            "ca",
        ] {
            let err = issue_client(dir.path(), name, Role::Reader, DAY).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
        assert!(validate_name(&"a".repeat(64)).is_ok());
        assert!(validate_name("node-1.prod_eu").is_ok());
    }

    #[test]
    fn parse_ttl_accepts_short_and_humantime_forms() {
        assert_eq!(parse_ttl("90d").unwrap(), 90 * DAY);
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_ttl("1y").unwrap(), 365 * DAY);
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(30 * 60));
        assert_eq!(parse_ttl(" 2w ").unwrap(), 14 * DAY);
        assert_eq!(parse_ttl("2h 30m").unwrap(), Duration::from_secs(9000));
        assert_eq!(parse_ttl("1day").unwrap(), DAY);
        for bad in ["", "0d", "abc", "-5d", "d", "5x"] {
            assert!(
                matches!(parse_ttl(bad), Err(PkiError::InvalidTtl { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn roles_parse_and_display() {
        assert_eq!("reader".parse::<Role>().unwrap(), Role::Reader);
        assert_eq!("covet:admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
        assert_eq!(Role::Operator.to_string(), "operator");
        assert_eq!(Role::Operator.as_org(), "covet:operator");
        assert_eq!(Role::from_org("operator"), None);
    }

    #[test]
    fn summary_serializes_timestamps_as_rfc3339() {
        let dir = ca_dir();
        let summary = show(&dir.path().join(CA_CERT_FILE)).unwrap();
        let json = serde_json::to_value(&summary).unwrap();
        let not_after = json["not_after"].as_str().unwrap();
        assert!(not_after.ends_with('Z'), "{not_after}");
        let back: CertSummary = serde_json::from_value(json).unwrap();
        assert_eq!(back, summary);
    }

    #[test]
    fn show_rejects_non_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.crt");
        fs::write(&path, "hello").unwrap();
        let err = show(&path).unwrap_err();
        assert!(matches!(err, PkiError::NotPem { .. }));
        assert!(err.to_string().contains("is not valid PEM"), "{err}");
    }
}
