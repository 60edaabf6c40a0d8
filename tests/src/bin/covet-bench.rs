//! `covet-bench`: the agent's RPC latency, throughput and idle memory, each
//! with its ratio against a peer measured in the same run.
//!
//! The peer is a bare tonic server with the same rustls mutual-TLS settings
//! serving only `grpc.health.v1.Health` (this binary re-executed with
//! `--peer-server`), so the ratios show what covet's own layers (accept loop,
//! authz, audit, services) cost over plain tonic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use covet_proto::v1 as pb;
use covet_tests::agent::{AgentOptions, TestAgent};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const LATENCY_CALLS: usize = 3000;
const THROUGHPUT_FOR: Duration = Duration::from_secs(4);
const CONNECTIONS: usize = 4;
const IN_FLIGHT_PER_CONNECTION: usize = 16;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--peer-server") {
        return peer_server(Path::new(&args[2]));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let dir = covet_tests::sandbox_dir("bench");
    let agent = TestAgent::start(dir.path(), AgentOptions::default()).await;
    let peer = PeerProcess::start(&agent.pki.dir, dir.path()).await?;
    let creds = agent.pki.client("reader");
    let tls = covetctl::connect::client_tls(&creds)?;
    let timeout = Duration::from_secs(10);
    let ours = covetctl::connect::connect(&agent.endpoint(), tls.clone(), None, timeout).await?;
    let theirs =
        covetctl::connect::connect(&peer.addr.to_string(), tls.clone(), None, timeout).await?;

    println!(
        "covet-agent {} vs bare tonic+rustls mTLS health server (same run, same machine)",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "{} cores; latency over {LATENCY_CALLS} sequential calls on one reused connection\n",
        num_cpus()
    );

    let ours_health = latency(|| health_call(ours.clone())).await?;
    let peer_health = latency(|| health_call(theirs.clone())).await?;
    let ours_info = latency(|| info_call(ours.clone())).await?;
    row("Health/Check p50", ours_health.p50, peer_health.p50);
    row("Health/Check p99", ours_health.p99, peer_health.p99);
    row(
        "GetInfo p50 (vs peer Health)",
        ours_info.p50,
        peer_health.p50,
    );
    row(
        "GetInfo p99 (vs peer Health)",
        ours_info.p99,
        peer_health.p99,
    );

    let mut channels_ours = Vec::new();
    let mut channels_peer = Vec::new();
    for _ in 0..CONNECTIONS {
        channels_ours
            .push(covetctl::connect::connect(&agent.endpoint(), tls.clone(), None, timeout).await?);
        channels_peer.push(
            covetctl::connect::connect(&peer.addr.to_string(), tls.clone(), None, timeout).await?,
        );
    }
    let ours_rps = throughput(&channels_ours, health_call).await?;
    let peer_rps = throughput(&channels_peer, health_call).await?;
    let ours_info_rps = throughput(&channels_ours, info_call).await?;
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "throughput (RPC/s, higher better)", "covet", "peer", "ratio"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>8.2}",
        "Health/Check",
        ours_rps,
        peer_rps,
        ours_rps / peer_rps
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>8.2}",
        "GetInfo (vs peer Health)",
        ours_info_rps,
        peer_rps,
        ours_info_rps / peer_rps
    );

    drop((ours, theirs, channels_ours, channels_peer));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent_pid = agent_pid(&agent)?;
    let ours_rss = rss_kib(agent_pid)?;
    let peer_rss = rss_kib(peer.child.id())?;
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "idle RSS after the run (KiB)", "covet", "peer", "ratio"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8.2}",
        "resident set",
        ours_rss,
        peer_rss,
        ours_rss as f64 / peer_rss as f64
    );
    println!("\nratios: covet / peer; for latency and memory lower is better");
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn row(what: &str, ours: Duration, peer: Duration) {
    static HEADER: std::sync::Once = std::sync::Once::new();
    HEADER.call_once(|| {
        println!(
            "{:<34} {:>12} {:>12} {:>8}",
            "latency (lower better)", "covet", "peer", "ratio"
        )
    });
    println!(
        "{:<34} {:>10}µs {:>10}µs {:>8.2}",
        what,
        ours.as_micros(),
        peer.as_micros(),
        ours.as_secs_f64() / peer.as_secs_f64()
    );
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

async fn latency<F, Fut>(mut call: F) -> anyhow::Result<Latency>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..200 {
        call().await?;
    }
    let mut samples = Vec::with_capacity(LATENCY_CALLS);
    for _ in 0..LATENCY_CALLS {
        let t = Instant::now();
        call().await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(Latency {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    })
}

async fn throughput<F, Fut>(channels: &[Channel], call: F) -> anyhow::Result<f64>
where
    F: Fn(Channel) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let deadline = started + THROUGHPUT_FOR;
    let mut tasks = Vec::new();
    for channel in channels {
        for _ in 0..IN_FLIGHT_PER_CONNECTION {
            let channel = channel.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    call(channel.clone()).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            }));
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn health_call(channel: Channel) -> anyhow::Result<()> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(())
}

async fn info_call(channel: Channel) -> anyhow::Result<()> {
    pb::info_service_client::InfoServiceClient::new(channel)
        .get_info(pb::GetInfoRequest {})
        .await?;
    Ok(())
}

fn agent_pid(agent: &TestAgent) -> anyhow::Result<u32> {
    agent.pid().context("agent pid")
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS for {pid}")
}

/// The peer, as its own process so its memory can be measured alone.
struct PeerProcess {
    child: Child,
    addr: SocketAddr,
}

impl PeerProcess {
    async fn start(pki: &Path, dir: &Path) -> anyhow::Result<PeerProcess> {
        let addr_file = dir.join("peer.addr");
        let child = Command::new(std::env::current_exe()?)
            .arg("--peer-server")
            .arg(pki)
            .arg(&addr_file)
            .stdin(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(addr) = text.trim().parse()
            {
                return Ok(PeerProcess { child, addr });
            }
            if Instant::now() > deadline {
                bail!("peer server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bare tonic + rustls (ring) with mandatory client certificates, TLS 1.3,
/// serving only gRPC health: what any tonic service costs at least.
fn peer_server(pki: &Path) -> anyhow::Result<()> {
    let addr_file: PathBuf = std::env::args().nth(3).context("addr file")?.into();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.join("ca.crt"))? {
            roots.add(c?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let chain =
            CertificateDer::pem_file_iter(pki.join("agent.crt"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(pki.join("agent.key"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        std::fs::write(&addr_file, listener.local_addr()?.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok::<_, std::io::Error>(PeerIo(s))).await;
                    }
                });
            }
        });
        let (_reporter, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        anyhow::Ok(())
    })
}

/// A TLS stream that tonic accepts as incoming IO.
struct PeerIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for PeerIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for PeerIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
