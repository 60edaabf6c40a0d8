//! Service control and logs end to end: a real agent talks D-Bus to a real
//! systemd user manager (in its own sandbox) and reads its real journald.

use std::time::Duration;

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip};
use covet_tests::sandbox_dir;
use tonic::Code;

const WEB: &str = "web.service";
const CRASHY: &str = "crashy.service";

struct World {
    agent: TestAgent,
    sandbox: SystemdSandbox,
    port: u16,
    _dir: tempfile::TempDir,
}

/// A sandbox with a small HTTP server unit and a unit that dies at once, and
/// an agent that may control both (and nothing else).
async fn world() -> Option<World> {
    let dir = sandbox_dir("units");
    let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
    let port = covet_tests::free_port();
    sandbox
        .install_unit(
            WEB,
            &format!(
                "[Unit]\nDescription=covet test web server\n[Service]\nExecStart=/usr/bin/python3 -u -m http.server --bind 127.0.0.1 {port}\n"
            ),
        )
        .unwrap();
    sandbox
        .install_unit(
            CRASHY,
            "[Unit]\nDescription=exits at once\n[Service]\nExecStart=/usr/bin/python3 -u -c \"print('boom: config missing'); raise SystemExit(3)\"\n",
        )
        .unwrap();
    sandbox
        .install_unit("other.service", "[Service]\nExecStart=/bin/sleep 300\n")
        .unwrap();
    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
allow = ["{CRASHY}"]
[[app]]
name = "web"
unit = "{WEB}"
"#,
        bus = sandbox.bus_address(),
        journal = sandbox.journal_dir().display(),
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    Some(World {
        agent,
        sandbox,
        port,
        _dir: dir,
    })
}

fn action(unit: &str) -> pb::UnitActionRequest {
    pb::UnitActionRequest {
        unit: unit.into(),
        ..Default::default()
    }
}

async fn units(
    w: &World,
    client: &str,
) -> pb::unit_service_client::UnitServiceClient<tonic::transport::Channel> {
    pb::unit_service_client::UnitServiceClient::new(w.agent.channel(client).await)
}

fn serves(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_restart_stop_a_real_unit_and_wait_for_each_job() {
    let Some(w) = world().await else { return };
    let mut client = units(&w, "operator").await;

    let started = client.start_unit(action(WEB)).await.unwrap().into_inner();
    assert_eq!(started.job_result, "done");
    let status = started.status.unwrap();
    assert_eq!(
        (status.active_state.as_str(), status.sub_state.as_str()),
        ("active", "running")
    );
    assert!(status.main_pid > 0);
    assert!(started.journal_tail.is_empty());
    assert!(serves(w.port), "the unit serves when start returns");

    let restarted = client.restart_unit(action(WEB)).await.unwrap().into_inner();
    assert_eq!(restarted.job_result, "done");
    let after = restarted.status.unwrap();
    assert_eq!(after.active_state, "active");
    assert_ne!(
        after.main_pid, status.main_pid,
        "restart made a new process"
    );
    assert!(serves(w.port), "the unit serves again when restart returns");

    // An undeclared unit, installed or not, refuses the whole call.
    for undeclared in ["other.service", "nosuch.service"] {
        let refused = client
            .get_unit_status(pb::GetUnitStatusRequest {
                units: vec![WEB.into(), undeclared.into()],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    }
    let listed = client
        .get_unit_status(pb::GetUnitStatusRequest {
            units: vec![WEB.into(), CRASHY.into()],
        })
        .await
        .unwrap()
        .into_inner()
        .units;
    assert_eq!(listed[0].main_pid, after.main_pid);
    assert!(
        listed[0].fragment_path.ends_with(WEB),
        "{:?}",
        listed[0].fragment_path
    );
    assert!(listed[0].since.is_some());
    assert_eq!(listed[1].name, CRASHY);
    // No names: every controllable unit.
    let all = client
        .get_unit_status(pb::GetUnitStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .units;
    let names: Vec<&str> = all.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, vec![CRASHY, WEB]);

    let stopped = client.stop_unit(action(WEB)).await.unwrap().into_inner();
    assert_eq!(stopped.job_result, "done");
    assert_eq!(stopped.status.unwrap().active_state, "inactive");
    assert!(!serves(w.port));

    let record = w
        .agent
        .wait_audit(|r| r["rpc"] == "/covet.agent.v1.UnitService/StopUnit")
        .await;
    assert_eq!(record["target"], format!("unit={WEB}"));
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["caller_cn"], "operator");

    // Each action was journaled as an operation under the app's lock.
    let ops = w
        .agent
        .ctl("reader", &["-o", "json", "ops", "list"])
        .assert_ok()
        .json();
    let actions: Vec<(String, String)> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["params"]["action"].as_str().unwrap_or("").to_owned(),
                o["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("stop".to_owned(), "succeeded".to_owned()),
            ("restart".to_owned(), "succeeded".to_owned()),
            ("start".to_owned(), "succeeded".to_owned()),
        ]
    );
    assert!(
        ops["operations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["kind"] == "unit_action" && o["app"] == "web")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_dies_at_once_is_reported_failed_with_its_journal() {
    let Some(w) = world().await else { return };
    let mut client = units(&w, "operator").await;
    let r = client
        .restart_unit(action(CRASHY))
        .await
        .unwrap()
        .into_inner();
    let status = r.status.unwrap();
    assert_ne!(status.active_state, "active", "{status:?}");
    assert!(
        r.journal_tail
            .iter()
            .any(|l| l.message.contains("boom: config missing")),
        "journal tail: {:#?}",
        r.journal_tail
    );

    // covetctl exits non-zero and shows the journal tail.
    let out = w.agent.ctl("operator", &["service", "restart", CRASHY]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("boom: config missing"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("restart of crashy.service failed"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_and_malformed_units_are_refused_before_dbus() {
    let Some(w) = world().await else { return };
    let mut admin = units(&w, "admin").await;
    let status = admin
        .restart_unit(action("other.service"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("other.service is not declared on this host"),
        "{}",
        status.message()
    );
    for bad in [
        "../../etc/passwd",
        "web",
        "a b.service",
        "getty@.service",
        "-x.service",
        "",
    ] {
        let status = admin.stop_unit(action(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
    }
    // A template's instance is a unit name like any other: undeclared, refused.
    let status = admin
        .stop_unit(action("getty@tty1.service"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Nothing was started behind our back.
    let out = w.sandbox.systemctl(&["is-active", "other.service"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "inactive");
    // Logs of undeclared units are refused too.
    let mut logs = pb::log_service_client::LogServiceClient::new(w.agent.channel("reader").await);
    let status = logs
        .tail_logs(pb::TailLogsRequest {
            unit: "other.service".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let w_refusal = w
        .agent
        .wait_audit(|r| r["outcome"] == "denied" || r["outcome"] == "PermissionDenied")
        .await;
    assert!(w_refusal["caller_cn"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_and_follow_return_the_units_real_output() {
    let Some(w) = world().await else { return };
    let mut client = units(&w, "operator").await;
    client.start_unit(action(WEB)).await.unwrap();
    w.sandbox
        .wait_journal(WEB, "Serving HTTP", Duration::from_secs(10))
        .unwrap();

    let mut logs = pb::log_service_client::LogServiceClient::new(w.agent.channel("reader").await);
    let tail = logs
        .tail_logs(pb::TailLogsRequest {
            unit: WEB.into(),
            lines: 20,
            since: None,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        tail.iter()
            .any(|e| e.message.contains("Serving HTTP on 127.0.0.1")),
        "{tail:#?}"
    );

    let mut follow = logs
        .follow_logs(pb::TailLogsRequest {
            unit: WEB.into(),
            lines: 1,
            since: None,
        })
        .await
        .unwrap()
        .into_inner();
    // http.server logs each request: make one and see it arrive.
    assert!(serves(w.port));
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(e) = follow.message().await.unwrap() {
            if e.message.contains("\"GET / HTTP/1.0\" 200") {
                return e;
            }
        }
        panic!("follow stream ended");
    })
    .await
    .expect("the request's log line arrives on the follow stream");
    assert!(seen.pid > 0);
    drop(follow);

    let out = w.agent.ctl("reader", &["logs", WEB, "-n", "5"]);
    out.assert_ok();
    assert!(out.stdout.contains("GET / HTTP/1.0"), "{}", out.stdout);

    let status = logs
        .tail_logs(pb::TailLogsRequest {
            unit: WEB.into(),
            lines: 1_000_000,
            since: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_the_bus_restarting() {
    let Some(w) = world().await else { return };
    let mut client = units(&w, "operator").await;
    client.start_unit(action(WEB)).await.unwrap();
    w.sandbox.restart_bus().unwrap();
    let status = client
        .get_unit_status(pb::GetUnitStatusRequest {
            units: vec![WEB.into()],
        })
        .await
        .expect("the agent reconnects to the new bus")
        .into_inner();
    assert_eq!(status.units[0].active_state, "active");
    let r = client.restart_unit(action(WEB)).await.unwrap().into_inner();
    assert_eq!(r.job_result, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covetctl_service_commands() {
    let Some(w) = world().await else { return };
    let out = w.agent.ctl("operator", &["service", "start", WEB]);
    out.assert_ok();
    assert!(
        out.stdout.contains("start web.service: job done")
            && out.stdout.contains("now active/running"),
        "{}",
        out.stdout
    );
    let out = w
        .agent
        .ctl("operator", &["-o", "json", "service", "restart", WEB]);
    let json = out.assert_ok().json();
    assert_eq!(json["job_result"], "done");
    assert_eq!(json["ok"], true);
    assert_eq!(json["status"]["active_state"], "active");
    let out = w.agent.ctl("reader", &["service", "status"]);
    out.assert_ok();
    assert!(
        out.stdout.contains("web.service") && out.stdout.contains("running"),
        "{}",
        out.stdout
    );
    let out = w.agent.ctl("reader", &["service", "stop", WEB]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("role covet:reader may not call covet.agent.v1.UnitService/StopUnit"),
        "{}",
        out.stderr
    );
    w.agent
        .ctl("operator", &["service", "stop", WEB])
        .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bus_is_unavailable_with_the_reason() {
    let dir = sandbox_dir("nobus");
    let toml = format!(
        "\n[systemd]\nbus = \"unix:path={}/no-such-bus\"\n[[app]]\nname = \"web\"\nunit = \"{WEB}\"\n",
        dir.path().display()
    );
    let agent = TestAgent::start_with_toml(dir.path(), toml).await;
    let mut client =
        pb::unit_service_client::UnitServiceClient::new(agent.channel("operator").await);
    let status = client.restart_unit(action(WEB)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("systemd is unreachable on bus unix:path="),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_reload_picks_up_a_changed_unit_file() {
    let Some(w) = world().await else { return };
    let mut admin = units(&w, "admin").await;
    admin.start_unit(action(WEB)).await.unwrap();
    let before = admin
        .get_unit_status(pb::GetUnitStatusRequest {
            units: vec![WEB.into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.units[0].description, "covet test web server");
    // Write the new file directly: install_unit would reload by itself.
    let path = w.sandbox.unit_dir().join(WEB);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("covet test web server", "covet test web server, edited");
    std::fs::write(&path, text).unwrap();
    admin
        .daemon_reload(pb::DaemonReloadRequest {})
        .await
        .unwrap();
    let after = admin
        .get_unit_status(pb::GetUnitStatusRequest {
            units: vec![WEB.into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.units[0].description, "covet test web server, edited");
    let record = w
        .agent
        .wait_audit(|r| r["rpc"] == "/covet.agent.v1.UnitService/DaemonReload")
        .await;
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["caller_cn"], "admin");
}
