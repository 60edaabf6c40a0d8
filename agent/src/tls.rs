//! Mutual TLS: the server configuration (reloadable on SIGHUP), the client
//! certificate verifier with the deny list, and the accept loop that turns
//! TCP connections into authenticated streams carrying the peer's identity.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::audit::{AuditLog, AuditRecord};
use crate::config::TlsConfig;
use crate::identity::PeerIdentity;

/// A slow or silent client gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} {path} holds no certificate")]
    Empty { what: &'static str, path: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot read deny list {path}: {source}")]
    Deny {
        path: String,
        source: std::io::Error,
    },
}

/// Revoked certificates, by serial (hex) or SHA-256 fingerprint (hex).
#[derive(Debug, Default)]
pub struct DenyList {
    entries: HashSet<String>,
}

impl DenyList {
    /// Reads one serial or fingerprint a line; `#` starts a comment, colons
    /// and case are ignored. A missing file denies no one.
    pub fn load(path: Option<&Path>) -> Result<DenyList, TlsError> {
        let Some(path) = path else {
            return Ok(DenyList::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(TlsError::Deny {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let entries = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(normalize_hex)
            .collect();
        Ok(DenyList { entries })
    }

    pub fn denies(&self, id: &PeerIdentity) -> bool {
        self.entries.contains(&id.serial) || self.entries.contains(&id.fingerprint_sha256)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn normalize_hex(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Checks client certificates against the CA (webpki) and the deny list,
/// and audits every refusal with the identity it presented.
#[derive(Debug)]
struct CovetClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    deny: DenyList,
    audit: AuditLogHandle,
}

/// `AuditLog` is not `Debug`; the verifier must be.
struct AuditLogHandle(AuditLog);

impl std::fmt::Debug for AuditLogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditLog({})", self.0.path().display())
    }
}

impl CovetClientVerifier {
    fn refuse(&self, identity: Option<&PeerIdentity>, why: &str) {
        self.audit.0.record(
            &AuditRecord::new("tls-handshake", "refused")
                .caller(identity)
                .message(why),
        );
    }
}

impl ClientCertVerifier for CovetClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = PeerIdentity::from_der(end_entity).ok();
        if let Some(id) = &identity
            && self.deny.denies(id)
        {
            self.refuse(identity.as_ref(), "certificate is revoked (deny list)");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| self.refuse(identity.as_ref(), &describe_cert_error(e)))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn describe_cert_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "certificate has expired".to_owned()
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "certificate is not valid yet".to_owned()
        }
        // A foreign CA with the same name as ours shows as a bad signature.
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "certificate is not issued by the agent's CA".to_owned()
        }
        rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "certificate is not for client authentication".to_owned()
        }
        other => format!("certificate refused: {other}"),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Builds the server configuration from the files named in `[tls]`.
pub fn server_config(tls: &TlsConfig, audit: &AuditLog) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("CA bundle", &tls.ca)? {
        roots.add(ca)?;
    }
    let webpki =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = CovetClientVerifier {
        webpki,
        deny: DenyList::load(tls.deny.as_deref())?,
        audit: AuditLogHandle(audit.clone()),
    };
    let chain = read_certs("certificate", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|source| TlsError::Read {
        what: "key",
        path: tls.key.display().to_string(),
        source,
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls.min_version == "1.2" {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The live server configuration; new connections use the newest one.
pub struct ReloadableTls {
    tls: TlsConfig,
    audit: AuditLog,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    pub fn new(tls: TlsConfig, audit: AuditLog) -> Result<ReloadableTls, TlsError> {
        let config = server_config(&tls, &audit)?;
        Ok(ReloadableTls {
            tls,
            audit,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Re-reads certificate, key, CA and deny list. On error the previous
    /// configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.tls, &self.audit)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// What the gRPC layers know about a connection's peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    pub identity: Arc<PeerIdentity>,
}

pin_project_lite::pin_project! {
    /// A TLS stream whose client certificate has been verified and parsed.
    pub struct PeerStream {
        #[pin]
        inner: TlsStream<TcpStream>,
        info: PeerInfo,
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, runs each handshake in its own task (so one slow
/// client never holds up the others), and yields verified streams.
pub fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep listening.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let audit = tls.audit.clone();
            let streams = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => match peer_info(&stream, remote) {
                        Some(info) => {
                            let _ = streams
                                .send(Ok(PeerStream {
                                    inner: stream,
                                    info,
                                }))
                                .await;
                        }
                        None => {
                            tracing::warn!(%remote, "handshake without a usable client certificate")
                        }
                    },
                    Ok(Err(e)) => handshake_failed(&audit, remote, &e),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_info(stream: &TlsStream<TcpStream>, remote: SocketAddr) -> Option<PeerInfo> {
    let cert = stream.get_ref().1.peer_certificates()?.first()?;
    let identity = PeerIdentity::from_der(cert).ok()?;
    Some(PeerInfo {
        remote,
        identity: Arc::new(identity),
    })
}

fn handshake_failed(audit: &AuditLog, remote: SocketAddr, e: &std::io::Error) {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        // The verifier has already audited these, with the identity.
        Some(rustls::Error::InvalidCertificate(_)) => {}
        Some(rustls::Error::NoCertificatesPresented) => audit.record(
            &AuditRecord::new("tls-handshake", "refused")
                .peer(Some(remote))
                .message("no client certificate presented"),
        ),
        Some(other) => audit.record(
            &AuditRecord::new("tls-handshake", "refused")
                .peer(Some(remote))
                .message(other.to_string()),
        ),
        None => tracing::debug!(%remote, "TLS handshake failed: {e}"),
    }
}
