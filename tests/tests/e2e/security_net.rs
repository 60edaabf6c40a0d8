//! Attacks on the agent's network edge, against real agents: a revoked
//! certificate that keeps its open channel and streams, an idle-connection
//! flood from many loopback addresses, a reader opening hundreds of
//! follows, and thousands of refused handshakes filling the audit log.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use covet_proto::v1 as pb;
use covet_tests::agent::{AgentOptions, TestAgent};
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;
use tonic::Code;

const WEB: &str = "web.service";

/// The open-files soft limit raised to the hard limit, for holding
/// thousands of sockets in this test process.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_loses_its_open_channel_and_streams_within_a_second() {
    let dir = sandbox_dir("net-revoke");
    let agent = TestAgent::start(dir.path(), AgentOptions::default()).await;
    let operator = agent.pki.client("operator");
    let channel = agent.channel("operator").await;
    let mut info = pb::info_service_client::InfoServiceClient::new(channel.clone());
    info.get_info(pb::GetInfoRequest {}).await.unwrap();
    let mut metrics = pb::metrics_service_client::MetricsServiceClient::new(channel.clone());
    let mut stream = metrics
        .watch_metrics(pb::WatchMetricsRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first sample");
    // A reader's stream is not affected by the operator's revocation.
    let mut reader_metrics =
        pb::metrics_service_client::MetricsServiceClient::new(agent.channel("reader").await);
    let mut reader_stream = reader_metrics
        .watch_metrics(pb::WatchMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let serial = covetctl::pki::revoke(&agent.pki.dir, &operator.cert).unwrap();
    agent.signal(libc::SIGHUP);
    let reloaded = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the revoked identity's stream ends");
    let took = reloaded.elapsed();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    assert!(took < Duration::from_secs(1), "ended after {took:?}");

    // Unary calls on the same, already open channel are refused now.
    let status = info.get_info(pb::GetInfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&serial), "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    agent
        .wait_audit(|r| {
            r["rpc"] == "/covet.agent.v1.InfoService/GetInfo"
                && r["outcome"] == "denied"
                && r["caller_serial"] == serial.as_str()
        })
        .await;
    agent
        .wait_audit(|r| {
            r["rpc"] == "/covet.agent.v1.MetricsService/WatchMetrics"
                && r["outcome"] == "denied"
                && r["caller_serial"] == serial.as_str()
        })
        .await;

    let sample = tokio::time::timeout(Duration::from_secs(5), reader_stream.message())
        .await
        .expect("reader stream keeps flowing");
    assert!(sample.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_lock_out_covetctl() {
    raise_nofile();
    let dir = sandbox_dir("net-flood");
    let agent = TestAgent::start(dir.path(), AgentOptions::default()).await;
    agent.ctl_config(&["reader"]);
    let started = Instant::now();
    let mut held = Vec::with_capacity(2000);
    // 20 from the legitimate client's own address, the rest from 20 others.
    for i in 0..2000u32 {
        let from = if i < 20 {
            Ipv4Addr::new(127, 0, 0, 1)
        } else {
            Ipv4Addr::new(127, 0, 0, 2 + (i % 20) as u8)
        };
        held.push(connect_from(from, agent.addr).await);
    }
    for n in 0..20 {
        let t = Instant::now();
        let out = agent.ctl("reader", &["info"]);
        let took = t.elapsed();
        assert_eq!(out.code, 0, "call {n}: {}", out.stderr);
        assert!(took < Duration::from_secs(1), "call {n} took {took:?}");
    }
    assert_eq!(held.len(), 2000);
    // Handshakes past the per-source cap were closed at once: the agent
    // holds far fewer descriptors than the flood's 2,000 (its old 1,024).
    let pid = agent.pid().unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 1000, "the agent holds {fds} descriptors");
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(
        !log.contains("Too many open files"),
        "agent ran out of files"
    );
    // Refusals of the flood are audited with the source, aggregated.
    let refusals: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|r| r["rpc"] == "tls-handshake")
        .collect();
    assert!(
        refusals.iter().all(|r| r["peer"].is_string()),
        "{refusals:#?}"
    );
    assert!(refusals.len() <= 60, "{} refusal records", refusals.len());
    assert!(
        refusals.iter().any(|r| r["message"]
            .as_str()
            .is_some_and(|m| m.contains("from this address"))),
        "{refusals:#?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Children of `pid` named `journalctl`.
fn journalctl_children(pid: u32) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == pid && comm.ends_with("(journalctl") {
            n += 1;
        }
    }
    n
}

async fn follow(
    channel: &tonic::transport::Channel,
) -> Result<tonic::Streaming<pb::LogEntry>, tonic::Status> {
    pb::log_service_client::LogServiceClient::new(channel.clone())
        .follow_logs(pb::TailLogsRequest {
            unit: WEB.into(),
            lines: 1,
            since: None,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_are_capped_per_connection_and_per_identity() {
    let dir = sandbox_dir("net-follow");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    sandbox
        .install_unit(WEB, "[Service]\nExecStart=/bin/sleep 300\n")
        .unwrap();
    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
[[app]]
name = "web"
unit = "{WEB}"
[limits]
streams_per_connection = 10
"#,
        bus = sandbox.bus_address(),
        journal = sandbox.journal_dir().display(),
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    let pid = agent.pid().unwrap();

    // One connection, 150 follows: 10 admitted, the rest RESOURCE_EXHAUSTED.
    let first = agent.channel("reader").await;
    let mut open = Vec::new();
    let mut per_connection = 0;
    for _ in 0..150 {
        match follow(&first).await {
            Ok(s) => open.push(s),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("this connection"), "{status:?}");
                per_connection += 1;
            }
        }
    }
    assert_eq!((open.len(), per_connection), (10, 140));

    // Other connections of the same identity: 16 follows in all.
    let mut per_identity = 0;
    for _ in 0..3 {
        let channel = agent.channel("reader").await;
        for _ in 0..5 {
            match follow(&channel).await {
                Ok(s) => open.push(s),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("CN=reader"), "{status:?}");
                    per_identity += 1;
                }
            }
        }
    }
    assert_eq!((open.len(), per_identity), (16, 9));
    assert!(
        journalctl_children(pid) <= 16,
        "{}",
        journalctl_children(pid)
    );
    // Another identity is not held up by the reader's follows.
    let operator = agent.channel("operator").await;
    let other = follow(&operator).await.unwrap();

    drop(open);
    drop(other);
    let deadline = Instant::now() + Duration::from_secs(5);
    while journalctl_children(pid) > 0 {
        assert!(Instant::now() < deadline, "journalctl children stay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follow(&first).await.expect("follows are admitted again");
}

fn no_cert_client(agent: &TestAgent) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(agent.pki.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
}

/// A handshake without a client certificate, waited for until the agent
/// has answered (its alert or EOF).
async fn refused_handshake(connector: &tokio_rustls::TlsConnector, from: Ipv4Addr, to: SocketAddr) {
    use tokio::io::AsyncReadExt;
    let tcp = connect_from(from, to).await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_audited_with_the_peer_and_aggregated() {
    let dir = sandbox_dir("net-refusals");
    let options = AgentOptions {
        extra_toml: "[limits]\nrefusal_audit_interval_ms = 1000\n".into(),
        ..Default::default()
    };
    let agent = TestAgent::start(dir.path(), options).await;
    let audit_path = dir.path().join("state/audit.log");
    let before = std::fs::metadata(&audit_path).map(|m| m.len()).unwrap_or(0);

    // A foreign CA's certificate: the claimed identity is marked unverified.
    let foreign = agent.pki.foreign("mallory");
    assert!(agent.connect(&foreign).await.is_err());
    let record = agent
        .wait_audit(|r| r["rpc"] == "tls-handshake" && r["claimed"]["cn"] == "mallory")
        .await;
    assert_eq!(record["claimed"]["verified"], false);
    assert!(
        record["caller_cn"].is_null() && record["role"].is_null(),
        "{record}"
    );
    assert!(record["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    // 3,000 handshakes without a certificate from two sources, 16 at a time.
    let connector = no_cert_client(&agent);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16u32 {
        let connector = connector.clone();
        let to = agent.addr;
        tasks.spawn(async move {
            let from = Ipv4Addr::new(127, 0, 0, 2 + (worker % 2) as u8);
            for _ in 0..(3000 / 16 + u32::from(worker < 3000 % 16)) {
                refused_handshake(&connector, from, to).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // Past one interval the summaries are written.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let counted: u64 = agent
            .audit()
            .iter()
            .filter(|r| {
                r["rpc"] == "tls-handshake"
                    && r["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("no client certificate presented"))
            })
            .map(|r| {
                let peer = r["peer"].as_str().unwrap();
                assert!(
                    peer.starts_with("127.0.0.2:") || peer.starts_with("127.0.0.3:"),
                    "{r}"
                );
                r["count"].as_u64().unwrap()
            })
            .sum();
        if counted >= 3000 || Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(counted, 3000);
    let grown = std::fs::metadata(&audit_path).unwrap().len() - before;
    assert!(grown < 20_000, "the audit log grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_audited_with_their_caller() {
    let dir = sandbox_dir("net-probe");
    let agent = TestAgent::start(dir.path(), AgentOptions::default()).await;
    let mut probes =
        pb::probe_service_client::ProbeServiceClient::new(agent.channel("operator").await);
    probes
        .probe_tcp(pb::TcpProbe {
            address: agent.addr.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let record = agent
        .wait_audit(|r| r["rpc"] == "/covet.agent.v1.ProbeService/ProbeTcp")
        .await;
    assert_eq!(record["caller_cn"], "operator");
    assert_eq!(record["outcome"], "ok");
    assert!(record["peer"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_is_pinged_and_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = sandbox_dir("net-keepalive");
    let options = AgentOptions {
        extra_toml: "[limits]\nkeepalive_interval_ms = 300\nkeepalive_timeout_ms = 300\n".into(),
        ..Default::default()
    };
    let agent = TestAgent::start(dir.path(), options).await;
    let tls = covetctl::connect::client_tls(&agent.pki.client("reader")).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    // A valid HTTP/2 start, then silence: no SETTINGS ack, no PING ack.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the silent peer was not dropped");
    // Frames: 3 bytes length, type, flags, 4 bytes stream id, payload.
    let mut pinged = false;
    let mut at = 0;
    while at + 9 <= received.len() {
        let len = usize::from(received[at]) << 16
            | usize::from(received[at + 1]) << 8
            | usize::from(received[at + 2]);
        let (kind, flags) = (received[at + 3], received[at + 4]);
        pinged |= kind == 0x6 && flags & 0x1 == 0;
        at += 9 + len;
    }
    assert!(pinged, "no PING from the agent in {received:02x?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_source_are_bounded_and_given_back() {
    let dir = sandbox_dir("net-conns");
    let agent = TestAgent::start(
        dir.path(),
        AgentOptions {
            // The connection cap bites before the handshake cap, and idle
            // sockets stay within their handshake time for the whole test.
            extra_toml: "[limits]\nconnections_per_source = 5\nhandshakes_per_source = 100\nhandshake_timeout_ms = 30000\n".into(),
            ..Default::default()
        },
    )
    .await;
    agent.ctl_config(&["reader"]);
    let attacker = Ipv4Addr::new(127, 0, 0, 9);
    let held = idle_connections(attacker, agent.addr, 5).await;
    // The sixth from that address is closed at once.
    let mut sixth = connect_from(attacker, agent.addr).await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut sixth, &mut buf),
    )
    .await
    .expect("the agent closes a connection over the per-source cap at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Others are not held up.
    agent.ctl("reader", &["info"]).assert_ok();
    agent
        .wait_audit(|r| {
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.9:"))
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("too many open connections from this address"))
        })
        .await;
    // Slots come back when connections end.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(attacker, agent.addr).await;
    let read = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(&mut again, &mut buf),
    )
    .await;
    assert!(
        read.is_err(),
        "a connection after the others ended was closed: {read:?}"
    );
}

/// `n` idle TCP connections from `from`.
async fn idle_connections(from: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(connect_from(from, to).await);
    }
    held
}
