//! The spine end to end: a real agent over mutual TLS, driven by the
//! generated Rust client and by covetctl. Refusals, roles against the table,
//! audit, reloads, metrics, probes, health and reflection.

use std::time::Duration;

use covet_agent::edge::authz::RULES;
use covet_proto::Role;
use covet_proto::v1 as pb;
use covet_tests::agent::{AgentOptions, TestAgent, run_ctl};
use covet_tests::http::{HttpServer, Reply};
use covet_tests::sandbox_dir;
use tonic::Code;

async fn agent(options: AgentOptions) -> (tempfile::TempDir, TestAgent) {
    let dir = sandbox_dir("spine");
    let agent = TestAgent::start(dir.path(), options).await;
    (dir, agent)
}

/// Calls any method with an empty request (every proto3 request decodes from
/// zero bytes) and returns the status the call ended with at its head.
async fn call_empty(channel: tonic::transport::Channel, method: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path: http::uri::PathAndQuery = method.parse().expect("method path");
    let request = tonic::Request::new(tokio_stream::once(()));
    let call = grpc.streaming(request, path, codec);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_stream)) => tonic::Status::ok(""),
        Ok(Err(status)) => status,
        Err(_) => tonic::Status::deadline_exceeded("no answer in 10s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_over_mtls_names_host_apps_and_caller() {
    let (_dir, agent) = agent(AgentOptions {
        extra_toml: r#"
[[app]]
name = "covet"
unit = "covet.service"
[app.package]
kind = "pip"
name = "covetpy"
venv = "/opt/covet/venv"
"#
        .into(),
        ..Default::default()
    })
    .await;
    let mut client = pb::info_service_client::InfoServiceClient::new(agent.channel("reader").await);
    let info = client
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.api_versions, vec!["v1"]);
    assert!(!info.hostname.is_empty());
    assert!(!info.kernel_version.is_empty());
    assert_eq!(info.boot_id.len(), 36, "boot id {:?}", info.boot_id);
    assert!(info.uptime.unwrap().seconds > 0);
    assert!(info.agent_started.is_some());
    assert_eq!(info.apps.len(), 1);
    assert_eq!(info.apps[0].name, "covet");
    assert_eq!(info.apps[0].package_kind, "pip");
    let caller = info.caller.unwrap();
    assert_eq!(caller.common_name, "reader");
    assert_eq!(caller.role(), pb::Role::Reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_the_table() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let roles = [
        ("reader", Role::Reader),
        ("operator", Role::Operator),
        ("admin", Role::Admin),
    ];
    for (client, role) in roles {
        let channel = agent.channel(client).await;
        for rule in RULES {
            let status = call_empty(channel.clone(), rule.method).await;
            if role >= rule.min_role {
                assert_ne!(
                    status.code(),
                    Code::PermissionDenied,
                    "{client} should be allowed {}: {status:?}",
                    rule.method
                );
            } else {
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{client} calling {}",
                    rule.method
                );
                assert!(
                    status
                        .message()
                        .contains(&format!("role {} may not call", role.as_org()))
                        && status.message().contains(rule.min_role.as_org()),
                    "{}",
                    status.message()
                );
            }
        }
    }
    // An RPC missing from the table is admin-only.
    let unlisted = "/covet.agent.v1.InfoService/NoSuchMethod";
    let status = call_empty(agent.channel("operator").await, unlisted).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = call_empty(agent.channel("admin").await, unlisted).await;
    assert_eq!(status.code(), Code::Unimplemented);
    // Refusals are audited with the caller's identity.
    let denied = agent
        .wait_audit(|r| r["outcome"] == "denied" && r["caller_cn"] == "reader")
        .await;
    assert_eq!(denied["role"], "reader");
    assert!(denied["caller_serial"].as_str().unwrap().len() >= 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_a_role_is_denied_and_audited() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let now = time::OffsetDateTime::now_utc();
    let creds = agent.pki.issue(
        "norole",
        Some("acme"),
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let channel = agent.connect(&creds).await.unwrap();
    let mut client = pb::info_service_client::InfoServiceClient::new(channel);
    let status = client.get_info(pb::GetInfoRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("carries no covet role"),
        "{}",
        status.message()
    );
    agent
        .wait_audit(|r| r["outcome"] == "denied" && r["caller_cn"] == "norole")
        .await;
}

/// Connects with `creds` and makes one call; the handshake or the call must fail.
async fn refused(agent: &TestAgent, creds: &covetctl::connect::Credentials) -> String {
    let tls = covetctl::connect::client_tls_unchecked(creds).expect("client tls");
    match covetctl::connect::connect(&agent.endpoint(), tls, None, Duration::from_secs(5)).await {
        Err(e) => e.to_string(),
        Ok(channel) => {
            let mut client = pb::info_service_client::InfoServiceClient::new(channel);
            let status = client
                .get_info(pb::GetInfoRequest {})
                .await
                .expect_err("the agent must refuse this certificate");
            covetctl::connect::describe_status(&agent.endpoint(), &status)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_and_missing_certificates_are_refused_and_audited() {
    let (_dir, agent) = agent(AgentOptions::default()).await;

    let foreign = agent.pki.foreign("mallory");
    let why = refused(&agent, &foreign).await;
    assert!(why.contains("not issued by the agent's CA"), "{why}");
    agent
        .wait_audit(|r| r["rpc"] == "tls-handshake" && r["claimed"]["cn"] == "mallory")
        .await;

    let expired = agent.pki.expired("old");
    let why = refused(&agent, &expired).await;
    assert!(why.contains("expired"), "{why}");
    let record = agent
        .wait_audit(|r| r["rpc"] == "tls-handshake" && r["claimed"]["cn"] == "old")
        .await;
    assert!(record["message"].as_str().unwrap().contains("expired"));

    // No client certificate at all.
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_file_iter(agent.pki.ca()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    })
    .with_no_client_auth();
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let result = covetctl::connect::connect(
        &agent.endpoint(),
        std::sync::Arc::new(tls),
        None,
        Duration::from_secs(5),
    )
    .await;
    if let Ok(channel) = result {
        let mut client = pb::info_service_client::InfoServiceClient::new(channel);
        client
            .get_info(pb::GetInfoRequest {})
            .await
            .expect_err("no client cert must be refused");
    }
    agent
        .wait_audit(|r| {
            r["rpc"] == "tls-handshake" && r["message"] == "no client certificate presented"
        })
        .await;

    // covetctl says why, before even dialling, for its own expired certificate.
    let config = agent.dir.join("expired.toml");
    std::fs::write(
        &config,
        format!(
            "current_context = \"old\"\n[contexts.old]\nendpoints = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            agent.endpoint(),
            expired.ca.display(),
            expired.cert.display(),
            expired.key.display()
        ),
    )
    .unwrap();
    let out = run_ctl(&config, None, &["info"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("expired on"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_on_sighup_without_dropping_the_listener() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let operator = agent.pki.client("operator");
    let mut client =
        pb::info_service_client::InfoServiceClient::new(agent.channel("operator").await);
    client.get_info(pb::GetInfoRequest {}).await.unwrap();

    let serial = covetctl::pki::revoke(&agent.pki.dir, &operator.cert).unwrap();
    // Not yet reloaded: still accepted.
    agent.connect(&operator).await.unwrap();
    agent.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let why = refused(&agent, &operator).await;
    assert!(why.contains("revoked") || why.contains("refused"), "{why}");
    let record = agent
        .wait_audit(|r| r["rpc"] == "tls-handshake" && r["claimed"]["serial"] == serial.as_str())
        .await;
    assert!(record["message"].as_str().unwrap().contains("revoked"));
    // Others still get in on the same listener.
    let mut reader = pb::info_service_client::InfoServiceClient::new(agent.channel("reader").await);
    reader.get_info(pb::GetInfoRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_agent_certificate() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let before = agent_cert_serial(&agent).await;
    std::fs::remove_file(agent.pki.dir.join("agent.crt")).unwrap();
    std::fs::remove_file(agent.pki.dir.join("agent.key")).unwrap();
    covetctl::pki::issue_agent(
        &agent.pki.dir,
        "agent",
        &["127.0.0.1".to_owned()],
        Duration::from_secs(3600),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = agent_cert_serial(&agent).await;
    assert_ne!(
        before, after,
        "the agent must serve the new certificate after SIGHUP"
    );
}

async fn agent_cert_serial(agent: &TestAgent) -> Vec<u8> {
    let creds = agent.pki.client("reader");
    let tls = covetctl::connect::client_tls(&creds).unwrap();
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();

    tokio_rustls_connect(tls, name, tcp).await
}

async fn tokio_rustls_connect(
    tls: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    tcp: tokio::net::TcpStream,
) -> Vec<u8> {
    let stream = covetctl::connect::tls_connect(tls, name, tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_is_refused_unless_configured() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let creds = agent.pki.client("admin");
    let tls = covetctl::connect::client_tls_versions(&creds, &[&rustls::version::TLS12]).unwrap();
    let why = match covetctl::connect::connect(&agent.endpoint(), tls, None, Duration::from_secs(5))
        .await
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("TLS 1.2 must be refused by default"),
    };
    assert!(why.contains("TLS"), "{why}");

    let (_dir2, agent12) = {
        let dir = sandbox_dir("tls12");
        let a = TestAgent::start(
            dir.path(),
            AgentOptions {
                min_tls: Some("1.2".into()),
                ..Default::default()
            },
        )
        .await;
        (dir, a)
    };
    let creds = agent12.pki.client("admin");
    let tls = covetctl::connect::client_tls_versions(&creds, &[&rustls::version::TLS12]).unwrap();
    let channel =
        covetctl::connect::connect(&agent12.endpoint(), tls, None, Duration::from_secs(5))
            .await
            .unwrap();
    let mut client = pb::info_service_client::InfoServiceClient::new(channel);
    client.get_info(pb::GetInfoRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_sane_and_watchable_and_exported_for_prometheus() {
    let (_dir, agent) = agent(AgentOptions {
        metrics: true,
        ..Default::default()
    })
    .await;
    let mut client =
        pb::metrics_service_client::MetricsServiceClient::new(agent.channel("reader").await);
    let m = client
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mem = m.memory.unwrap();
    assert!(
        mem.total_bytes > 0 && mem.available_bytes > 0 && mem.available_bytes <= mem.total_bytes
    );
    let cpu = m.cpu.unwrap();
    assert!(cpu.logical_cores >= 1);
    assert_eq!(cpu.per_core_percent.len(), cpu.logical_cores as usize);
    assert!((0.0..=100.0).contains(&cpu.usage_percent));
    let root = m
        .disks
        .iter()
        .find(|d| d.mount_point == "/")
        .expect("a disk for /");
    assert!(root.total_bytes > 0 && root.inodes_total > 0);
    assert!(m.process_count > 1);
    assert!(!m.networks.is_empty());

    let mut stream = client
        .watch_metrics(pb::WatchMetricsRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let second = stream.message().await.unwrap().unwrap();
    assert!(
        second.sampled_at.unwrap().seconds * 1_000_000_000
            + i64::from(second.sampled_at.unwrap().nanos)
            > first.sampled_at.unwrap().seconds * 1_000_000_000
                + i64::from(first.sampled_at.unwrap().nanos)
    );

    let status = client
        .watch_metrics(pb::WatchMetricsRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("interval must be between"),
        "{}",
        status.message()
    );

    let text = http_get(agent.metrics_addr.unwrap(), "/metrics").await;
    assert!(text.contains("covet_host_memory_total_bytes "), "{text}");
    assert!(text.contains("mount=\"/\""));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn app_with_health(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\nunit = \"{name}.service\"\n[app.health]\nurl = \"{url}\"\ntimeout = \"500ms\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_probes_against_a_real_http_server() {
    let server = HttpServer::start(&[
        (
            "/health",
            Reply::json(200, r#"{"status":"ok","version":"0.2.0"}"#),
        ),
        ("/broken", Reply::json(500, r#"{"status":"error"}"#)),
        ("/degraded", Reply::json(200, r#"{"status":"degraded"}"#)),
        (
            "/slow",
            Reply::json(200, r#"{"status":"ok"}"#).slow(Duration::from_secs(3)),
        ),
        ("/api", Reply::json(200, "{}")),
    ])
    .await;
    let json_ok = "json_field = \"status\"\njson_value = \"ok\"";
    let mut toml = String::new();
    toml.push_str(&app_with_health(
        "good",
        &server.url("/health"),
        &format!(
            "{json_ok}\n[[app.smoke]]\nname = \"api\"\nurl = \"{}\"",
            server.url("/api")
        ),
    ));
    toml.push_str(&app_with_health("broken", &server.url("/broken"), ""));
    toml.push_str(&app_with_health(
        "degraded",
        &server.url("/degraded"),
        json_ok,
    ));
    toml.push_str(&app_with_health(
        "slow",
        &server.url("/slow"),
        "retries = 1\ninterval = \"100ms\"",
    ));
    toml.push_str("\n[[app]]\nname = \"blind\"\nunit = \"blind.service\"\n");
    let (_dir, agent) = agent(AgentOptions {
        extra_toml: toml,
        ..Default::default()
    })
    .await;
    let mut client =
        pb::probe_service_client::ProbeServiceClient::new(agent.channel("reader").await);
    let check = |app: &str| pb::CheckAppHealthRequest {
        app: app.into(),
        include_smoke: true,
    };

    let good = client
        .check_app_health(check("good"))
        .await
        .unwrap()
        .into_inner();
    assert!(good.healthy, "{good:?}");
    assert_eq!(good.health.as_ref().unwrap().http_status, 200);
    assert_eq!(good.smoke.len(), 1);
    assert!(good.smoke[0].ok);

    let broken = client
        .check_app_health(check("broken"))
        .await
        .unwrap()
        .into_inner();
    assert!(!broken.healthy);
    let h = broken.health.unwrap();
    assert_eq!(h.http_status, 500);
    assert!(
        h.error.contains("HTTP status 500, expected 200"),
        "{}",
        h.error
    );

    let degraded = client
        .check_app_health(check("degraded"))
        .await
        .unwrap()
        .into_inner();
    assert!(!degraded.healthy);
    assert!(
        degraded
            .health
            .unwrap()
            .error
            .contains(r#"JSON field "status" is "degraded", expected "ok""#)
    );

    let slow = client
        .check_app_health(check("slow"))
        .await
        .unwrap()
        .into_inner();
    assert!(!slow.healthy);
    let h = slow.health.unwrap();
    assert_eq!(h.attempts, 2);
    assert!(h.error.contains("timed out after 500ms"), "{}", h.error);

    let status = client.check_app_health(check("nope")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status
            .message()
            .contains("declared: good, broken, degraded, slow, blind"),
        "{}",
        status.message()
    );
    let status = client.check_app_health(check("blind")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // covetctl: exit 0 when healthy, 1 when not; JSON for scripts.
    let out = agent.ctl("reader", &["health", "good", "--smoke"]);
    out.assert_ok();
    assert!(
        out.stdout.contains("good on") && out.stdout.contains("healthy"),
        "{}",
        out.stdout
    );
    let out = agent.ctl("reader", &["-o", "json", "health", "degraded"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.json()["healthy"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ad_hoc_probes_reach_loopback_and_declared_targets_only() {
    let server = HttpServer::start(&[("/health", Reply::json(200, r#"{"status":"ok"}"#))]).await;
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let mut operator =
        pb::probe_service_client::ProbeServiceClient::new(agent.channel("operator").await);
    let ok = operator
        .probe_http(pb::HttpProbe {
            url: server.url("/health"),
            json_field: "status".into(),
            json_value: "ok".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.ok, "{ok:?}");

    // Not loopback, not declared: refused before any packet is sent.
    for url in ["http://192.0.2.10/health", "http://[2001:db8::1]:80/"] {
        let status = operator
            .probe_http(pb::HttpProbe {
                url: url.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{url}");
        assert!(
            status
                .message()
                .contains("neither a loopback address nor declared"),
            "{}",
            status.message()
        );
    }
    let status = operator
        .probe_tcp(pb::TcpProbe {
            address: "192.0.2.10:22".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    for url in ["ftp://127.0.0.1/", "not a url", "https://127.0.0.1/"] {
        let status = operator
            .probe_http(pb::HttpProbe {
                url: url.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}");
    }
    let status = operator
        .probe_http(pb::HttpProbe {
            url: server.url("/"),
            retries: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let tcp = operator
        .probe_tcp(pb::TcpProbe {
            address: server.addr.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tcp.ok);
    let closed = operator
        .probe_tcp(pb::TcpProbe {
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!closed.ok && closed.error.contains("connect"), "{closed:?}");

    let out = agent.ctl("operator", &["probe", "http", &server.url("/health")]);
    out.assert_ok();
    let out = agent.ctl("reader", &["probe", "tcp", &server.addr.to_string()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("role covet:reader may not call covet.agent.v1.ProbeService/ProbeTcp"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_both_reflection_versions_are_served() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let channel = agent.channel("reader").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "",
        "covet.agent.v1.InfoService",
        "covet.agent.v1.UpgradeService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1alpha as alpha;
    let mut reflection =
        alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in covet_proto::SERVICE_NAMES {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    use tonic_reflection::pb::v1;
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "covet.agent.v1.UpgradeService".into(),
            ),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_are_audited_with_target_and_outcome() {
    let (_dir, agent) = agent(AgentOptions::default()).await;
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(agent.channel("operator").await);
    let _ = ops
        .cancel_operation(pb::CancelOperationRequest { id: "op-1".into() })
        .await
        .unwrap_err();
    let record = agent
        .wait_audit(|r| r["rpc"] == "/covet.agent.v1.OperationService/CancelOperation")
        .await;
    assert_eq!(record["caller_cn"], "operator");
    assert_eq!(record["role"], "operator");
    assert_eq!(record["outcome"], "NotFound");
    assert_eq!(record["target"], "operation=op-1");
    // Reads are not audited.
    let mut info = pb::info_service_client::InfoServiceClient::new(agent.channel("reader").await);
    info.get_info(pb::GetInfoRequest {}).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        agent
            .audit()
            .iter()
            .all(|r| r["rpc"] != "/covet.agent.v1.InfoService/GetInfo")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covetctl_end_to_end_pki_contexts_info_metrics() {
    let dir = sandbox_dir("ctl");
    let pki = dir.path().join("pki");
    let pki_s = pki.to_str().unwrap();
    let config = dir.path().join("client.toml");
    let ctl = |args: &[&str]| run_ctl(&config, None, args);

    ctl(&["pki", "init", "--dir", pki_s]).assert_ok();
    let again = ctl(&["pki", "init", "--dir", pki_s]);
    assert_eq!(
        again.code, 1,
        "a second init must refuse to overwrite the CA"
    );
    ctl(&[
        "pki",
        "issue-agent",
        "--dir",
        pki_s,
        "--name",
        "agent",
        "--san",
        "127.0.0.1",
        "localhost",
    ])
    .assert_ok();
    ctl(&[
        "pki",
        "issue-client",
        "--dir",
        pki_s,
        "--name",
        "alice",
        "--role",
        "operator",
        "--ttl",
        "30d",
    ])
    .assert_ok();
    ctl(&[
        "pki",
        "issue-client",
        "--dir",
        pki_s,
        "--name",
        "bob",
        "--role",
        "reader",
        "--ttl",
        "10d",
    ])
    .assert_ok();
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "agent.key", "alice.key"] {
        let mode = std::fs::metadata(pki.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let show = ctl(&[
        "-o",
        "json",
        "pki",
        "show",
        pki.join("alice.crt").to_str().unwrap(),
    ]);
    show.assert_ok();
    assert_eq!(show.json()["role"], "operator");
    let bob = ctl(&["pki", "show", pki.join("bob.crt").to_str().unwrap()]);
    bob.assert_ok();
    assert!(
        bob.stdout.contains("WARNING") && bob.stderr.contains("14 days"),
        "{}\n{}",
        bob.stdout,
        bob.stderr
    );

    let agent = TestAgent::start_with(
        dir.path(),
        covet_tests::pki::TestPki { dir: pki.clone() },
        AgentOptions::default(),
    )
    .await;
    let endpoint = agent.endpoint();
    let file = |n: &str| pki.join(n).to_str().unwrap().to_owned();
    ctl(&[
        "config",
        "add-context",
        "prod",
        "--endpoint",
        &endpoint,
        "--ca",
        &file("ca.crt"),
        "--cert",
        &file("alice.crt"),
        "--key",
        &file("alice.key"),
    ])
    .assert_ok();
    ctl(&[
        "config",
        "add-context",
        "ro",
        "--endpoint",
        &endpoint,
        "--ca",
        &file("ca.crt"),
        "--cert",
        &file("bob.crt"),
        "--key",
        &file("bob.key"),
    ])
    .assert_ok();
    let shown = ctl(&["-o", "json", "config", "show"]);
    assert_eq!(shown.assert_ok().json()["current_context"], "prod");

    let info = ctl(&["info"]);
    info.assert_ok();
    assert!(
        info.stdout.contains("you are:") && info.stdout.contains("CN=alice (operator)"),
        "{}",
        info.stdout
    );
    let info = ctl(&["-o", "json", "info"]);
    assert_eq!(info.assert_ok().json()["caller"]["role"], "operator");

    ctl(&["config", "use-context", "ro"]).assert_ok();
    let metrics = ctl(&["-o", "json", "metrics"]);
    let m = metrics.assert_ok().json();
    assert!(m["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(
        m["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["mount_point"] == "/")
    );
    let text = ctl(&["metrics"]);
    assert!(text.assert_ok().stdout.contains("MOUNT"), "{}", text.stdout);

    let unknown = ctl(&["config", "use-context", "nope"]);
    assert_eq!(unknown.code, 1);

    // Revoke bob through covetctl: the deny file the agent reads.
    ctl(&["pki", "revoke", "--dir", pki_s, &file("bob.crt")]).assert_ok();
    agent.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = ctl(&["info"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("revoked"), "{}", out.stderr);

    drop(agent);
    let down = ctl(&["--context", "prod", "info"]);
    assert_eq!(down.code, 1);
    assert!(
        down.stderr.contains("connection refused at"),
        "{}",
        down.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_lists_every_problem_by_key() {
    let dir = sandbox_dir("check");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
listen = "127.0.0.1:7443"
state_dir = "relative/state"
backup_dir = "/var/backups/covet"
[tls]
ca = "/nonexistent/ca.crt"
cert = "/nonexistent/agent.crt"
key = "/nonexistent/agent.key"
[systemd]
bus = "carrier-pigeon"
[[app]]
name = "covet"
unit = "../../etc/passwd"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(covet_tests::bin("covet-agent"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "state_dir:",
        "tls.ca:",
        "tls.cert:",
        "tls.key:",
        "systemd.bus:",
        "app[0].unit:",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }

    std::fs::write(&path, "listen = 5\n").unwrap();
    let out = std::process::Command::new(covet_tests::bin("covet-agent"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}
