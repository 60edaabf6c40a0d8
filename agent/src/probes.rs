//! HTTP and TCP probes: an app's health gate and smoke checks, and ad-hoc
//! probes for operators.
//!
//! A probe only reaches loopback addresses, or a `host:port` that the host's
//! configuration declares for an app, so the agent never becomes a proxy into
//! the host's network. The address is resolved once, checked, and the same
//! resolved address is dialled (no second lookup between check and use).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest body a probe reads; health endpoints are small.
const MAX_BODY: usize = 64 * 1024;
const EXCERPT: usize = 512;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_RETRIES: u32 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0} is neither a loopback address nor declared by an app's health or smoke probes")]
    NotAllowed(String),
}

/// An `http://host:port/path` URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with '/'.
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, ProbeError> {
        let invalid = |why: &str| ProbeError::InvalidTarget(format!("{url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https probes are not supported; probe the app's plain HTTP port on loopback",
                ));
            }
            _ => return Err(invalid("expected http://HOST:PORT/PATH")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in URLs are not accepted"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        Ok(HttpTarget {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            path,
        })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `HOST:PORT` (IPv6 as `[::1]:PORT`).
pub fn split_host_port(address: &str) -> Result<(String, u16), ProbeError> {
    let invalid = || ProbeError::InvalidTarget(format!("{address:?} is not HOST:PORT"));
    let (host, port) = address.rsplit_once(':').ok_or_else(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if host.is_empty() || port == 0 {
        return Err(invalid());
    }
    Ok((host.to_owned(), port))
}

/// Which targets probes may reach.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    declared: BTreeSet<String>,
}

impl TargetPolicy {
    /// `declared`: `host:port` pairs from the apps' probe configuration.
    pub fn new(declared: BTreeSet<String>) -> TargetPolicy {
        TargetPolicy { declared }
    }

    /// Whether the target is allowed without resolving it: only literal
    /// addresses can be judged this early (names are judged on resolution).
    pub fn precheck(&self, host: &str, port: u16) -> Result<(), ProbeError> {
        if self.declared.contains(&format!("{host}:{port}")) {
            return Ok(());
        }
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) if !ip.is_loopback() => Err(ProbeError::NotAllowed(format!("{host}:{port}"))),
            _ => Ok(()),
        }
    }

    /// Resolves the target and checks every address it resolves to.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Failure::Attempt(format!("cannot resolve {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(Failure::Attempt(format!("{host} resolves to no address")));
        }
        let declared = self.declared.contains(&format!("{host}:{port}"));
        if !declared && addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(Failure::Refused(ProbeError::NotAllowed(format!(
                "{host}:{port}"
            ))));
        }
        Ok(addrs)
    }
}

enum Failure {
    /// Refused by policy: no attempt is made, no retry helps.
    Refused(ProbeError),
    /// This attempt failed; a retry may succeed.
    Attempt(String),
}

/// How often and how patiently to try.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    pub timeout: Duration,
    pub retries: u32,
    pub interval: Duration,
}

impl Default for Attempts {
    fn default() -> Self {
        Attempts {
            timeout: Duration::from_secs(5),
            retries: 0,
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpProbeSpec {
    pub name: String,
    pub url: String,
    pub expect_status: u16,
    /// Dotted path into the JSON body, e.g. `status` or `db.state`.
    pub json_field: Option<String>,
    pub json_value: Option<String>,
    pub attempts: Attempts,
}

#[derive(Debug, Clone)]
pub struct TcpProbeSpec {
    pub name: String,
    pub address: String,
    pub attempts: Attempts,
}

/// What a probe found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeOutcome {
    pub name: String,
    pub target: String,
    pub ok: bool,
    pub attempts: u32,
    pub latency: Duration,
    pub http_status: u16,
    /// Why the last attempt failed; empty when ok.
    pub error: String,
    pub body_excerpt: String,
}

/// A probe of either kind, as an app's configuration declares it.
#[derive(Debug, Clone)]
pub enum ProbeSpec {
    Http(HttpProbeSpec),
    Tcp(TcpProbeSpec),
}

/// Runs a declared probe, HTTP or TCP.
pub async fn probe_declared(
    policy: &TargetPolicy,
    spec: &ProbeSpec,
) -> Result<ProbeOutcome, ProbeError> {
    match spec {
        ProbeSpec::Http(spec) => probe_http(policy, spec).await,
        ProbeSpec::Tcp(spec) => probe_tcp(policy, spec).await,
    }
}

/// An app's declared health probe and, only once it passes, its smoke checks.
#[derive(Debug, Clone, PartialEq)]
pub struct AppHealth {
    pub healthy: bool,
    pub health: ProbeOutcome,
    pub smoke: Vec<ProbeOutcome>,
}

/// Probes an app through `health`, then through its `smoke` checks: they
/// only mean something once the app is healthy.
pub async fn check_app(
    policy: &TargetPolicy,
    health: &ProbeSpec,
    smoke_checks: &[ProbeSpec],
) -> Result<AppHealth, ProbeError> {
    let health = probe_declared(policy, health).await?;
    let mut healthy = health.ok;
    let mut smoke = Vec::new();
    if healthy {
        for check in smoke_checks {
            let outcome = probe_declared(policy, check).await?;
            healthy &= outcome.ok;
            smoke.push(outcome);
        }
    }
    Ok(AppHealth {
        healthy,
        health,
        smoke,
    })
}

/// Probes an HTTP endpoint. `Err` only when the target is malformed or not
/// allowed; a failing endpoint is an `Ok` outcome with `ok == false`.
pub async fn probe_http(
    policy: &TargetPolicy,
    spec: &HttpProbeSpec,
) -> Result<ProbeOutcome, ProbeError> {
    let target = HttpTarget::parse(&spec.url)?;
    policy.precheck(&target.host, target.port)?;
    let mut outcome = ProbeOutcome {
        name: spec.name.clone(),
        target: spec.url.clone(),
        ..Default::default()
    };
    retry(spec.attempts, &mut outcome, || {
        http_attempt(policy, &target, spec)
    })
    .await?;
    Ok(outcome)
}

/// Probes that a TCP connection can be opened.
pub async fn probe_tcp(
    policy: &TargetPolicy,
    spec: &TcpProbeSpec,
) -> Result<ProbeOutcome, ProbeError> {
    let (host, port) = split_host_port(&spec.address)?;
    policy.precheck(&host, port)?;
    let mut outcome = ProbeOutcome {
        name: spec.name.clone(),
        target: spec.address.clone(),
        ..Default::default()
    };
    retry(spec.attempts, &mut outcome, || async {
        let result = match policy.resolve(&host, port).await {
            Ok(addrs) => connect(&addrs).await.map(drop),
            Err(e) => Err(e),
        };
        (Observed::default(), result)
    })
    .await?;
    Ok(outcome)
}

/// Runs `attempt` until it succeeds or the retries are spent, recording the
/// last attempt's latency and error in `outcome`.
async fn retry<F, Fut>(
    attempts: Attempts,
    outcome: &mut ProbeOutcome,
    mut attempt: F,
) -> Result<(), ProbeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (Observed, Result<(), Failure>)>,
{
    let timeout = attempts
        .timeout
        .clamp(Duration::from_millis(1), MAX_TIMEOUT);
    for n in 0..=attempts.retries.min(MAX_RETRIES) {
        if n > 0 {
            tokio::time::sleep(attempts.interval).await;
        }
        outcome.attempts = n + 1;
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, attempt()).await;
        outcome.latency = started.elapsed();
        let result = result.map(|(observed, result)| {
            outcome.http_status = observed.http_status;
            outcome.body_excerpt = observed.body_excerpt;
            result
        });
        match result {
            Ok(Ok(())) => {
                outcome.ok = true;
                outcome.error.clear();
                return Ok(());
            }
            Ok(Err(Failure::Refused(e))) => return Err(e),
            Ok(Err(Failure::Attempt(why))) => outcome.error = why,
            Err(_) => {
                outcome.error = format!("timed out after {}", humantime::format_duration(timeout))
            }
        }
    }
    outcome.ok = false;
    Ok(())
}

async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, Failure> {
    let mut last = String::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(Failure::Attempt(last))
}

/// What one attempt saw of the server, kept even when the attempt fails.
#[derive(Default)]
struct Observed {
    http_status: u16,
    body_excerpt: String,
}

async fn http_attempt(
    policy: &TargetPolicy,
    target: &HttpTarget,
    spec: &HttpProbeSpec,
) -> (Observed, Result<(), Failure>) {
    let mut observed = Observed::default();
    let result = http_exchange(policy, target, spec, &mut observed).await;
    (observed, result)
}

/// `GET url` within the policy's targets: the status and up to `max_body`
/// bytes of the body (metric analysis reads the app's exposition so).
pub async fn http_get(
    policy: &TargetPolicy,
    url: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Bytes), String> {
    let target = HttpTarget::parse(url).map_err(|e| e.to_string())?;
    policy
        .precheck(&target.host, target.port)
        .map_err(|e| e.to_string())?;
    let mut status = 0;
    let exchange = get(policy, &target, max_body, &mut status);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(body)) => Ok((status, body)),
        Ok(Err(Failure::Refused(e))) => Err(e.to_string()),
        Ok(Err(Failure::Attempt(why))) => Err(why),
        Err(_) => Err(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// One GET of `target`: the body; `status` is set once the head arrived.
async fn get(
    policy: &TargetPolicy,
    target: &HttpTarget,
    max_body: usize,
    status: &mut u16,
) -> Result<Bytes, Failure> {
    let addrs = policy.resolve(&target.host, target.port).await?;
    let stream = connect(&addrs).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Attempt(format!("HTTP handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, target.host_header())
        .header(
            http::header::USER_AGENT,
            concat!("covet-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Attempt(format!("building request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Attempt(format!("HTTP request: {e}")))?;
    *status = response.status().as_u16();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| Failure::Attempt(format!("reading body: {e}")))?
        .to_bytes();
    conn.abort();
    Ok(body)
}

async fn http_exchange(
    policy: &TargetPolicy,
    target: &HttpTarget,
    spec: &HttpProbeSpec,
    outcome: &mut Observed,
) -> Result<(), Failure> {
    let body = get(policy, target, MAX_BODY, &mut outcome.http_status).await?;
    let status = outcome.http_status;
    outcome.body_excerpt = excerpt(&body);
    if status != spec.expect_status {
        return Err(Failure::Attempt(format!(
            "HTTP status {status}, expected {}",
            spec.expect_status
        )));
    }
    if let Some(field) = &spec.json_field {
        check_json_field(&body, field, spec.json_value.as_deref().unwrap_or(""))
            .map_err(Failure::Attempt)?;
    }
    Ok(())
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT)]);
    text.into_owned()
}

/// Checks that the dotted `field` of a JSON body equals `want`: strings are
/// compared by their text, anything else by its JSON form (`true`, `3`, `null`).
fn check_json_field(body: &[u8], field: &str, want: &str) -> Result<(), String> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let mut value = &json;
    for part in field.split('.') {
        value = value
            .get(part)
            .ok_or_else(|| format!("JSON field {field:?} is missing"))?;
    }
    let got = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "JSON field {field:?} is {got:?}, expected {want:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = HttpTarget::parse("http://127.0.0.1:8000/health?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8000, "/health?x=1")
        );
        let t = HttpTarget::parse("http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert!(HttpTarget::parse("https://localhost/").is_err());
        assert!(HttpTarget::parse("file:///etc/passwd").is_err());
        assert!(HttpTarget::parse("http://user:pw@localhost/").is_err());
    }

    #[test]
    fn policy_allows_loopback_and_declared_only() {
        let policy = TargetPolicy::new(["10.1.2.3:8000".to_owned()].into());
        assert!(policy.precheck("127.0.0.1", 1).is_ok());
        assert!(policy.precheck("::1", 1).is_ok());
        assert!(policy.precheck("10.1.2.3", 8000).is_ok());
        assert_eq!(
            policy.precheck("10.1.2.3", 8001),
            Err(ProbeError::NotAllowed("10.1.2.3:8001".into()))
        );
    }

    #[test]
    fn json_fields() {
        let body = br#"{"status":"ok","db":{"up":true,"n":3}}"#;
        assert!(check_json_field(body, "status", "ok").is_ok());
        assert!(check_json_field(body, "db.up", "true").is_ok());
        assert!(check_json_field(body, "db.n", "3").is_ok());
        assert!(check_json_field(body, "status", "bad").is_err());
        assert!(check_json_field(body, "missing", "x").is_err());
        assert!(check_json_field(b"nope", "status", "ok").is_err());
    }

    #[tokio::test]
    async fn names_resolving_elsewhere_are_refused() {
        let policy = TargetPolicy::default();
        // "localhost" resolves to loopback and is allowed to be tried.
        let spec = TcpProbeSpec {
            name: "t".into(),
            address: "localhost:1".into(),
            attempts: Attempts::default(),
        };
        let out = probe_tcp(&policy, &spec).await.unwrap();
        assert!(!out.ok);
        assert!(out.error.contains("connect"), "{}", out.error);
    }
}
