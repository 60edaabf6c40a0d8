//! Mutual-TLS connections to agents, and errors described in words a person
//! can act on ("certificate expired on …", "connection refused at …").
//!
//! One `rustls::ClientConfig` is shared by every connection a command makes,
//! so TLS sessions are resumed across nodes and reconnects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(
        "your certificate {path} (CN={cn}) expired on {expired}: issue a new one with `covetctl pki issue-client`"
    )]
    Expired {
        path: PathBuf,
        cn: String,
        expired: String,
    },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0:?} is not HOST:PORT")]
    Endpoint(String),
    #[error("{0}")]
    Transport(String),
}

/// The files a client authenticates with.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Builds the shared client TLS configuration. Refuses an expired client
/// certificate up front: the agent would refuse it with a bare alert.
pub fn client_tls(creds: &Credentials) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    build_client_tls(creds, ALL_VERSIONS, true)
}

/// As [`client_tls`], but presents the certificate even when expired (tests
/// of the agent's own checks).
pub fn client_tls_unchecked(
    creds: &Credentials,
) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    build_client_tls(creds, ALL_VERSIONS, false)
}

/// As [`client_tls`], restricted to the given TLS versions.
pub fn client_tls_versions(
    creds: &Credentials,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    build_client_tls(creds, versions, true)
}

const ALL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn build_client_tls(
    creds: &Credentials,
    versions: &[&'static rustls::SupportedProtocolVersion],
    refuse_expired: bool,
) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    let read = |what: &'static str, path: &Path, e: &dyn std::fmt::Display| ConnectError::Read {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&creds.ca)
        .map_err(|e| read("CA", &creds.ca, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read("CA", &creds.ca, &e))?;
    for ca in cas {
        roots.add(ca)?;
    }
    let chain = CertificateDer::pem_file_iter(&creds.cert)
        .map_err(|e| read("certificate", &creds.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read("certificate", &creds.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&creds.key).map_err(|e| read("key", &creds.key, &e))?;
    if refuse_expired
        && let Ok(summary) = pki::show(&creds.cert)
        && summary.is_expired()
    {
        return Err(ConnectError::Expired {
            path: creds.cert.clone(),
            cn: summary.common_name,
            expired: summary
                .not_after
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a channel to `endpoint` (HOST:PORT). `server_name` overrides the
/// name checked against the agent's certificate (default: HOST).
pub async fn connect(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    connect_with(endpoint, tls, server_name, timeout, timeout).await
}

/// As [`connect`], with separate deadlines for connecting and for each call.
pub async fn connect_with(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<&str>,
    timeout: Duration,
    call_timeout: Duration,
) -> Result<Channel, ConnectError> {
    let (host, _port) = split_endpoint(endpoint)?;
    let name = ServerName::try_from(server_name.unwrap_or(host).to_owned())
        .map_err(|_| ConnectError::Endpoint(endpoint.to_owned()))?;
    let uri = format!("http://{endpoint}");
    let addr = endpoint.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let name = name.clone();
        let addr = addr.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(tls_connect_confirmed(tls, name, tcp).await?))
        }
    });
    Endpoint::from_shared(uri)
        .map_err(|_| ConnectError::Endpoint(endpoint.to_owned()))?
        .connect_timeout(timeout)
        .timeout(call_timeout)
        .tcp_nodelay(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| ConnectError::Transport(describe_error(endpoint, &e)))
}

/// The TLS handshake over an open TCP connection.
pub async fn tls_connect(
    tls: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// TLS and the agent's first bytes. Under TLS 1.3 the agent judges our
/// certificate after our side considers the handshake done, so a refusal
/// would otherwise surface later as a bare "broken pipe". An HTTP/2 server
/// speaks first (its SETTINGS frame), so reading that turns a refusal into
/// the agent's alert, here; the bytes read are replayed to HTTP/2.
async fn tls_connect_confirmed(
    tls: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> std::io::Result<Replay<tokio_rustls::client::TlsStream<TcpStream>>> {
    use tokio::io::AsyncReadExt;
    let mut stream = tls_connect(tls, name, tcp).await?;
    let mut first = vec![0u8; 4096];
    let n = stream.read(&mut first).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the agent closed the connection right after the TLS handshake",
        ));
    }
    first.truncate(n);
    Ok(Replay {
        inner: stream,
        buffered: first,
        offset: 0,
    })
}

pin_project_lite::pin_project! {
    /// A stream that first yields bytes already read from it.
    pub struct Replay<S> {
        #[pin]
        inner: S,
        buffered: Vec<u8>,
        offset: usize,
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Replay<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        if *this.offset < this.buffered.len() {
            let rest = &this.buffered[*this.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            *this.offset += n;
            if *this.offset == this.buffered.len() {
                *this.buffered = Vec::new();
                *this.offset = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Replay<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn split_endpoint(endpoint: &str) -> Result<(&str, u16), ConnectError> {
    let bad = || ConnectError::Endpoint(endpoint.to_owned());
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

/// Describes a failed call in words: the gRPC message for errors the agent
/// sent, and the root cause for transport failures.
pub fn describe_status(endpoint: &str, status: &tonic::Status) -> String {
    use std::error::Error as _;
    match status.source() {
        Some(source) => describe_error(endpoint, source),
        _ => {
            let code = status.code();
            let message = status.message();
            // TLS 1.3 delivers the agent's verdict on our certificate on the first read.
            if let Some(tls) = describe_tls_text(message) {
                return format!("{endpoint}: {tls}");
            }
            format!(
                "{endpoint}: {} ({code:?})",
                if message.is_empty() {
                    code.description()
                } else {
                    message
                }
            )
        }
    }
}

/// Walks an error's sources for the cause a person can act on.
pub fn describe_error(endpoint: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut last = error.to_string();
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return format!("{endpoint}: {}", describe_rustls(tls));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return format!("{endpoint}: {}", describe_rustls(tls));
            }
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return format!(
                        "connection refused at {endpoint}: is covet-agent running and listening there?"
                    );
                }
                std::io::ErrorKind::TimedOut => return format!("{endpoint}: timed out connecting"),
                _ => {}
            }
        }
        last = e.to_string();
        current = e.source();
    }
    if let Some(tls) = describe_tls_text(&last) {
        return format!("{endpoint}: {tls}");
    }
    format!("{endpoint}: {last}")
}

fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the agent's certificate is not issued by your CA (check the context's ca)".to_owned()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the agent's certificate does not name this endpoint (issue it with --san, or set server_name in the context)".to_owned()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the agent's certificate has expired".to_owned()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the agent refused your certificate: it has expired".to_owned()
        }
        E::AlertReceived(A::CertificateRevoked) => {
            "the agent refused your certificate: it is revoked".to_owned()
        }
        // A CA of the same name as the agent's shows as a signature failure.
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::DecryptError) => {
            "the agent refused your certificate: it is not issued by the agent's CA".to_owned()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the agent requires a client certificate".to_owned()
        }
        E::AlertReceived(A::ProtocolVersion) => {
            "the agent refused the TLS version (it requires TLS 1.3)".to_owned()
        }
        other => format!("TLS failed: {other}"),
    }
}

/// Alerts that reach us only as text inside an h2/hyper error.
fn describe_tls_text(text: &str) -> Option<String> {
    let known = [
        (
            "CertificateExpired",
            "the agent refused your certificate: it has expired",
        ),
        (
            "CertificateRevoked",
            "the agent refused your certificate: it is revoked",
        ),
        (
            "UnknownCA",
            "the agent refused your certificate: it is not issued by the agent's CA",
        ),
        (
            "BadCertificate",
            "the agent refused your certificate: it is not issued by the agent's CA",
        ),
        (
            "DecryptError",
            "the agent refused your certificate: it is not issued by the agent's CA",
        ),
        (
            "CertificateRequired",
            "the agent requires a client certificate",
        ),
    ];
    known
        .iter()
        .find(|(needle, _)| text.contains(needle))
        .map(|(_, words)| (*words).to_owned())
}
