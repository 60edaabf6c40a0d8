//! Zero-downtime upgrades on one host, end to end: a real agent deploys the
//! sample app blue-green and canary behind a real nginx (a unit of the
//! test's systemd, reloaded over D-Bus), while a real load goes through
//! nginx the whole time and no request may fail.
//!
//! The app starts as an operator has it before the first slotted deploy:
//! `covet.service` on its own port, nginx's upstream pointing there. The
//! first upgrade starts slot blue, switches, drains and stops
//! `covet.service`; a rollback starts it again and switches back.

use covet_proto::v1 as pb;
use covet_tests::http::wait_healthy;
use covet_tests::load::LoadReport;
use covet_tests::nginx::Nginx;
use covet_tests::opwait::{wait_done, wait_for_step};
use covet_tests::slotted::{RENAME, UNIT, World};

/// The slotted world of this module's tests (see `covet_tests::slotted`).
async fn world(strategy: &str, extra_deploy: &str) -> Option<World> {
    World::start(strategy, extra_deploy).await
}

/// No request failed; prints the failures (and nginx's log) when some did.
fn assert_no_failures(report: &LoadReport, nginx: &Nginx, during: &str) {
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during {during}: {:?}\nnginx: {}",
        failures.len(),
        report.answers.len(),
        failures.iter().take(5).collect::<Vec<_>>(),
        nginx.error_log()
    );
    assert!(
        report.answers.len() > 10,
        "the load ran: {}",
        report.answers.len()
    );
}

fn step_names(op: &serde_json::Value) -> Vec<String> {
    op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .filter(|n| !n.starts_with("archive ") && n != "dump database")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_fails_safe_and_switches_back_without_a_failed_request() {
    // The migrations are expand-only: a rollback keeps them, and nothing
    // users do is interrupted.
    let Some(w) = world("blue-green", "database_on_rollback = \"keep\"").await else {
        return;
    };
    let original_upstream = w.upstream();

    // 1. The first slotted deploy: 0.2.0 starts in slot blue beside
    //    covet.service, takes every request, and covet.service is drained.
    let load = w.load();
    let out = w.upgrade("0.2.0", &RENAME);
    let report = load.stop().await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let op = out.json();
    assert_eq!(op["state"], "succeeded");
    assert_eq!(
        step_names(&op),
        [
            "preflight",
            "backup",
            "release",
            "config",
            "migrate",
            "start",
            "health",
            "smoke",
            "switch",
            "drain"
        ]
    );
    assert_no_failures(&report, &w.nginx, "the switch to blue");
    assert!(report.ok_containing("0.1.9") > 0 && report.ok_containing("0.2.0") > 0);
    assert!(
        report
            .answers
            .last()
            .is_some_and(|a| format!("{:?}", a.outcome).contains("0.2.0")),
        "after the switch nginx serves 0.2.0"
    );
    assert_eq!(w.live().as_deref(), Some("blue"));
    assert!(
        w.upstream().contains(&format!("127.0.0.1:{};", w.blue)),
        "{}",
        w.upstream()
    );
    assert!(w.active("covet@blue.service"));
    assert!(!w.active(UNIT), "the old side is stopped after the drain");
    // `covetctl health` probes what serves: slot blue's port, not the old one.
    let health = w.ctl(&["-o", "json", "health", "covet"]);
    assert_eq!(health.code, 0, "{}\n{}", health.stdout, health.stderr);
    let health = health.json();
    assert_eq!(
        (health["version"].as_str(), health["slot"].as_str()),
        (Some("0.2.0"), Some("blue"))
    );
    assert!(
        health["health"]["target"]
            .as_str()
            .unwrap()
            .contains(&w.blue.to_string()),
        "{health}"
    );
    let plan = w.ctl(&["upgrade", "covet", "--to", "0.2.1", "--dry-run"]);
    assert!(
        plan.stdout.contains("slot green") && plan.stdout.contains("compatible"),
        "the plan names the idle slot and the schema rule:\n{}",
        plan.stdout
    );

    // 2. A broken release (its health answers 500) never takes a request:
    //    green is started, fails its health check, and is stopped again.
    let before = w.upstream();
    let load = w.load();
    let out = w.upgrade("0.2.1", &[]);
    let report = load.stop().await;
    assert_eq!(
        out.code, 3,
        "a clean rollback exits 3:\n{}\n{}",
        out.stdout, out.stderr
    );
    let op = out.json();
    assert!(
        op["cause"].as_str().unwrap().starts_with("health failed"),
        "{op:#}"
    );
    let names = step_names(&op);
    assert!(!names.iter().any(|n| n == "switch"), "{names:?}");
    assert!(names.iter().any(|n| n == "rollback: new slot"), "{names:?}");
    assert!(
        !names.iter().any(|n| n == "rollback: stop"),
        "the live slot is never stopped: {names:?}"
    );
    assert_no_failures(&report, &w.nginx, "the broken release");
    assert_eq!(
        report.ok_containing("0.2.1"),
        0,
        "no user saw the broken release"
    );
    assert_eq!(w.upstream(), before);
    assert_eq!(w.live().as_deref(), Some("blue"));
    assert!(!w.active("covet@green.service"));
    assert!(w.active("covet@blue.service"));

    // 3. Rolling back the good upgrade is a switch back, not a reinstall:
    //    covet.service runs again and takes every request.
    let load = w.load();
    let out = w.ctl(&["-o", "json", "rollback", "covet"]);
    let report = load.stop().await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let names = step_names(&out.json());
    for s in [
        "rollback: old slot",
        "rollback: traffic",
        "rollback: new slot",
        "rollback: config",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n == "rollback: package"), "{names:?}");
    assert_no_failures(&report, &w.nginx, "the switch back");
    assert!(
        report
            .answers
            .last()
            .is_some_and(|a| format!("{:?}", a.outcome).contains("0.1.9")),
        "after the switch back nginx serves 0.1.9"
    );
    assert_eq!(w.upstream(), original_upstream);
    assert_eq!(w.live(), None);
    assert!(w.active(UNIT));
    assert!(!w.active("covet@blue.service"));
    assert!(
        std::fs::read_to_string(&w.app.env_file)
            .unwrap()
            .contains("DATABASE_URI=")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_sends_a_share_while_watched_then_promotes() {
    let Some(w) = world("canary", "canary_percent = 30").await else {
        return;
    };
    // The canary's old side is covet.service itself.
    let load = w.load();
    let id = w.start_upgrade("0.2.0", 4).await;
    wait_for_step(&w.agent, &id, "watch").await;
    let split = w.upstream();
    assert!(
        split.contains("weight=70") && split.contains("weight=30"),
        "{split}"
    );
    let op = wait_done(&w.agent, &id).await;
    let report = load.stop().await;
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:#?}");
    let names: Vec<&str> = op
        .steps
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !n.starts_with("archive ") && *n != "dump database")
        .collect();
    assert_eq!(
        names,
        [
            "preflight",
            "backup",
            "release",
            "config",
            "migrate",
            "start",
            "health",
            "smoke",
            "switch",
            "watch",
            "promote",
            "drain"
        ]
    );
    assert_no_failures(&report, &w.nginx, "the canary");
    let (old, new) = (report.ok_containing("0.1.9"), report.ok_containing("0.2.0"));
    assert!(
        old > 0 && new > 0,
        "both versions served: {old} old, {new} new"
    );
    assert!(
        w.upstream().contains(&format!("127.0.0.1:{};", w.blue)),
        "{}",
        w.upstream()
    );
    assert!(!w.upstream().contains("weight"), "{}", w.upstream());
    assert_eq!(w.live().as_deref(), Some("blue"));
    assert!(!w.active(UNIT));
    let _ = w.green;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_switch_is_finished_by_switching_back() {
    killed_at("watch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_switch_is_finished_by_switching_back() {
    killed_at("switch").await;
}

/// kill -9 of the agent when `step` starts, under load; the restarted agent
/// finishes the upgrade by rolling back, whatever the switch had done.
async fn killed_at(step: &str) {
    let Some(mut w) = world("blue-green", "").await else {
        return;
    };
    let original_upstream = w.upstream();
    let load = w.load();
    let id = w.start_upgrade("0.2.0", 30).await;
    wait_for_step(&w.agent, &id, step).await;
    if step == "watch" {
        assert_eq!(w.live().as_deref(), Some("blue"));
    }
    w.agent.signal(libc::SIGKILL);
    w.agent.restart().await;
    let op = wait_done(&w.agent, &id).await;
    let report = load.stop().await;
    assert_eq!(op.state, pb::OperationState::RolledBack as i32, "{op:#?}");
    // By default a rollback after the switch restores the database: the
    // rename cuts its connections for a moment, and only that may fail.
    let not_the_swap: Vec<_> = report
        .failures()
        .into_iter()
        .filter(|a| !format!("{:?}", a.outcome).contains("database"))
        .collect();
    assert!(
        not_the_swap.is_empty(),
        "{not_the_swap:?}\nnginx: {}",
        w.nginx.error_log()
    );
    let columns =
        w.pg.psql(
            &w.app.db,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'",
        )
        .unwrap();
    assert!(
        !columns.contains("last_login"),
        "the database is back as it was: {columns}"
    );
    assert_eq!(w.upstream(), original_upstream);
    assert_eq!(w.live(), None);
    assert!(w.active(UNIT));
    assert!(!w.active("covet@blue.service"));
    wait_healthy(w.app.port, "0.1.9").await;
    let names: Vec<&str> = op.steps.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"rollback: database"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_config_that_fails_its_test_stops_the_upgrade_before_anything_changes() {
    let Some(w) = world("blue-green", "").await else {
        return;
    };
    // An operator's broken edit elsewhere in nginx's configuration.
    let upstream = w.upstream();
    std::fs::write(
        w.nginx.upstream_file(),
        format!("{upstream}\nthis is not nginx;\n"),
    )
    .unwrap();
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let refused = client
        .upgrade(pb::UpgradeRequest {
            app: "covet".into(),
            to_version: "0.2.0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("was refused by") || refused.message().contains("nginx"),
        "the message names the proxy's test: {}",
        refused.message()
    );
    assert!(w.operations().await.is_empty(), "no operation was started");
    assert!(w.active(UNIT));
    assert!(!w.slots_dir.join("blue").exists());
    let _ = (w.blue, w.green);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_steps_rise_to_every_request_and_an_abort_sends_them_all_back() {
    // Expand-only migrations: the abort keeps the schema, so nothing cuts
    // the database's connections (a restore's rename would, for a moment).
    let Some(w) = world("canary", "database_on_rollback = \"keep\"").await else {
        return;
    };
    let original_upstream = w.upstream();
    // Shares that do not rise to 100 are refused before anything runs.
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let refused = client
        .upgrade(pb::UpgradeRequest {
            app: "covet".into(),
            to_version: "0.2.0".into(),
            canary_percents: vec![50, 20],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("rising"),
        "{}",
        refused.message()
    );

    // 20% then 60%, each judged 3 s; the operator aborts during the second:
    // the new slot gets nothing again, and no request fails.
    let load = w.load();
    let id = w.start_canary("0.2.0", 0, &[20, 60, 100], 3).await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !w.upstream().contains("weight=60") {
        assert!(
            std::time::Instant::now() < until,
            "the 60% step never came: {}",
            w.upstream()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut ops = pb::operation_service_client::OperationServiceClient::new(
        w.agent.channel("operator").await,
    );
    ops.cancel_operation(pb::CancelOperationRequest { id: id.clone() })
        .await
        .unwrap();
    let op = wait_done(&w.agent, &id).await;
    let report = load.stop().await;
    assert_eq!(op.state, pb::OperationState::RolledBack as i32, "{op:#?}");
    assert_no_failures(&report, &w.nginx, "the canary and its abort");
    assert!(
        report.ok_containing("0.2.0") > 0,
        "the canary served some requests"
    );
    assert_eq!(w.upstream(), original_upstream);
    assert!(!w.active("covet@blue.service"));
    assert!(w.active(UNIT));

    // The same steps to the end: every request on the new version.
    let load = w.load();
    let id = w.start_canary("0.2.0", 0, &[20, 60, 100], 2).await;
    let op = wait_done(&w.agent, &id).await;
    let report = load.stop().await;
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:#?}");
    assert_no_failures(&report, &w.nginx, "the stepped canary");
    let switch = op.steps.iter().find(|s| s.name == "switch").unwrap();
    assert!(switch.detail.contains("20%, then 60%"), "{}", switch.detail);
    assert!(
        w.upstream().contains(&format!("127.0.0.1:{};", w.blue)),
        "{}",
        w.upstream()
    );
    assert_eq!(w.live().as_deref(), Some("blue"));
}
