//! Mutual TLS: the server configuration (reloadable on SIGHUP), the client
//! certificate verifier with the deny list, and the accept loop that turns
//! TCP connections into authenticated streams carrying the peer's identity.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
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
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{LimitsConfig, TlsConfig};
use crate::edge::audit::{AuditLog, AuditRecord, Claimed, RefusalAudit};
use crate::edge::identity::PeerIdentity;

tokio::task_local! {
    /// Why the verifier refused this connection's certificate and whom it
    /// claimed to be: the verifier does not know the peer address, the
    /// accept task that runs the handshake does, and audits both.
    static REFUSAL: RefCell<Option<(Option<Claimed>, String)>>;
}

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
    deny: Arc<DenyList>,
}

impl CovetClientVerifier {
    /// Hands the refusal to the accept task (see [`REFUSAL`]).
    fn refuse(&self, identity: Option<&PeerIdentity>, why: &str) {
        let claimed = identity.map(Claimed::from_identity);
        let _ = REFUSAL.try_with(|r| *r.borrow_mut() = Some((claimed, why.to_owned())));
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
pub fn server_config(tls: &TlsConfig, deny: Arc<DenyList>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("CA bundle", &tls.ca)? {
        roots.add(ca)?;
    }
    let webpki =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = CovetClientVerifier { webpki, deny };
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
    limits: LimitsConfig,
    audit: AuditLog,
    current: RwLock<Arc<ServerConfig>>,
    /// The deny list in force; open connections watch it (see `limits`).
    deny: watch::Sender<Arc<DenyList>>,
}

impl ReloadableTls {
    pub fn new(
        tls: TlsConfig,
        limits: LimitsConfig,
        audit: AuditLog,
    ) -> Result<ReloadableTls, TlsError> {
        let deny = Arc::new(DenyList::load(tls.deny.as_deref())?);
        let config = server_config(&tls, deny.clone())?;
        Ok(ReloadableTls {
            tls,
            limits,
            audit,
            current: RwLock::new(Arc::new(config)),
            deny: watch::Sender::new(deny),
        })
    }

    /// Re-reads certificate, key, CA and deny list. On error the previous
    /// configuration stays in force. Open connections of newly denied
    /// certificates are refused from now on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let deny = Arc::new(DenyList::load(self.tls.deny.as_deref())?);
        let config = server_config(&self.tls, deny.clone())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.deny.send_replace(deny);
        Ok(())
    }

    /// The deny list in force, changing on every reload.
    pub fn deny_list(&self) -> watch::Receiver<Arc<DenyList>> {
        self.deny.subscribe()
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
    /// Calls open on this connection (see `limits::LimitLayer`).
    pub open_calls: Arc<AtomicUsize>,
}

pin_project_lite::pin_project! {
    /// A TLS stream whose client certificate has been verified and parsed.
    pub struct PeerStream {
        #[pin]
        inner: TlsStream<TcpStream>,
        info: PeerInfo,
        // Given back when the connection ends.
        _connection: SourceSlot,
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

/// Slots for something connections hold (a handshake in progress, an open
/// connection), all together and per source address, so one source (or many
/// idle sockets) cannot hold every slot or file descriptor.
struct SourceSlots {
    /// What a slot stands for, in refusals: "TLS handshakes in progress".
    what: &'static str,
    all: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_source_max: usize,
}

/// One slot; released on drop.
struct SourceSlot {
    slots: Arc<SourceSlots>,
    source: IpAddr,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl SourceSlots {
    fn new(what: &'static str, all: usize, per_source: usize) -> Arc<SourceSlots> {
        Arc::new(SourceSlots {
            what,
            all: Arc::new(Semaphore::new(all.max(1))),
            per_source: Mutex::default(),
            per_source_max: per_source.max(1),
        })
    }

    fn try_take(self: &Arc<Self>, source: IpAddr) -> Result<SourceSlot, String> {
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("too many {}", self.what))?;
        let mut per_source = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_source.entry(source).or_default();
        if *count >= self.per_source_max {
            return Err(format!("too many {} from this address", self.what));
        }
        *count += 1;
        Ok(SourceSlot {
            slots: self.clone(),
            source,
            _all: all,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut per_source = self
            .slots
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Accepts TCP connections, runs each handshake in its own task (so one slow
/// client never holds up the others) within the handshake limits, and yields
/// verified streams. Refusals are audited with the peer address, aggregated
/// per source.
pub fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(64);
    let limits = tls.limits.clone();
    let slots = SourceSlots::new(
        "TLS handshakes in progress",
        limits.handshakes,
        limits.handshakes_per_source,
    );
    // Held for a connection's whole life, handshake included.
    let connections = SourceSlots::new(
        "open connections",
        limits.connections,
        limits.connections_per_source,
    );
    let handshake_timeout = Duration::from_millis(limits.handshake_timeout_ms.max(1));
    let refusals = RefusalAudit::new(tls.audit.clone());
    {
        let refusals = refusals.clone();
        let every = Duration::from_millis(limits.refusal_audit_interval_ms.max(10));
        let streams = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while !streams.is_closed() {
                tick.tick().await;
                refusals.flush();
            }
        });
    }
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => {
                    backoff = Duration::from_millis(10);
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off (up to
                    // 1 s) instead of spinning, keep listening.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let taken = connections
                .try_take(remote.ip())
                .and_then(|connection| Ok((connection, slots.try_take(remote.ip())?)));
            let (connection, slot) = match taken {
                Ok(taken) => taken,
                Err(why) => {
                    // Closing at once frees the descriptor; audited, aggregated.
                    drop(tcp);
                    refusals.refused(
                        AuditRecord::new("tls-handshake", "refused")
                            .peer(Some(remote))
                            .message(why),
                    );
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let refusals = refusals.clone();
            let streams = tx.clone();
            tokio::spawn(REFUSAL.scope(RefCell::new(None), async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(stream)) => match peer_info(&stream, remote) {
                        Some(info) => {
                            let _ = streams
                                .send(Ok(PeerStream {
                                    inner: stream,
                                    info,
                                    _connection: connection,
                                }))
                                .await;
                        }
                        None => {
                            tracing::warn!(%remote, "handshake without a usable client certificate")
                        }
                    },
                    Ok(Err(e)) => {
                        let verdict = REFUSAL.with(|r| r.borrow_mut().take());
                        handshake_failed(&refusals, remote, verdict, &e)
                    }
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            }));
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
        open_calls: Arc::default(),
    })
}

fn handshake_failed(
    refusals: &RefusalAudit,
    remote: SocketAddr,
    verdict: Option<(Option<Claimed>, String)>,
    e: &std::io::Error,
) {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let refused = AuditRecord::new("tls-handshake", "refused").peer(Some(remote));
    match (verdict, rustls_error) {
        // The verifier said why, and whom the certificate claims to be.
        (Some((claimed, why)), _) => refusals.refused(refused.claimed(claimed).message(why)),
        (None, Some(rustls::Error::NoCertificatesPresented)) => {
            refusals.refused(refused.message("no client certificate presented"))
        }
        (None, Some(other)) => refusals.refused(refused.message(other.to_string())),
        (None, None) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
    }
}

#[cfg(test)]
mod handshake_slot_tests {
    use super::*;

    #[test]
    fn handshakes_are_bounded_per_source_and_in_all() {
        let slots = SourceSlots::new("TLS handshakes in progress", 3, 2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let c: IpAddr = [127, 0, 0, 4].into();
        let first = slots.try_take(a).unwrap();
        let _second = slots.try_take(a).unwrap();
        let err = slots.try_take(a).err().unwrap();
        assert!(err.contains("from this address"), "{err}");
        let _other = slots.try_take(b).unwrap();
        let err = slots.try_take(c).err().unwrap();
        assert_eq!(err, "too many TLS handshakes in progress");
        drop(first);
        slots.try_take(a).unwrap();
        // Slots given back leave no entry behind.
        drop(_second);
        drop(_other);
        assert!(slots.per_source.lock().unwrap().is_empty());
    }

    #[test]
    fn refusals_name_what_ran_out() {
        let connections = SourceSlots::new("open connections", 10, 1);
        let a: IpAddr = [127, 0, 0, 2].into();
        let _held = connections.try_take(a).unwrap();
        let err = connections.try_take(a).err().unwrap();
        assert_eq!(err, "too many open connections from this address");
    }
}
