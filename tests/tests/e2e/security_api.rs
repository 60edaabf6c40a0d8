//! Attacks on the API's own promises, against real agents: a reader flooding
//! WatchOperation with made-up ids, a reader asking for units the host does
//! not declare, an operator reaching the admin-only restore through
//! `rollback --to`, secrets in operation parameters shown to readers, and
//! files left readable under state_dir, backup_dir and covetctl's downloads.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::http::wait_healthy;
use covet_tests::postgres::postgres_or_skip;
use covet_tests::sampleapp;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;
use tonic::Code;

const APP_TOML: &str = r#"
[[app]]
name = "covet"
unit = "covet.service"
[app.package]
kind = "pip"
name = "covetpy"
venv = "/opt/covet/venv"
"#;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_made_up_operations_is_not_found_and_holds_no_memory() {
    let dir = sandbox_dir("sec-watch");
    let agent = TestAgent::start_with_toml(dir.path(), APP_TOML.into()).await;
    let channel = agent.channel("reader").await;
    let pid = agent.pid().unwrap();

    let watch = {
        let channel = channel.clone();
        move |id: String| {
            let mut client =
                pb::operation_service_client::OperationServiceClient::new(channel.clone());
            async move {
                client
                    .watch_operation(pb::WatchOperationRequest {
                        id,
                        from_sequence: 0,
                    })
                    .await
                    .map(|_| ())
            }
        }
    };
    // Warm up allocator and connection state before measuring.
    for i in 0..500 {
        let e = watch(format!("op-20260101-000000-{i:06}"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let before = rss_kib(pid);
    let ids: Vec<String> = (0..10_000)
        .map(|i| format!("op-20261201-{i:06}-ffffff"))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    // Eight at a time: under the per-identity cap on open watches.
    for chunk in ids.chunks(1250) {
        let chunk = chunk.to_vec();
        let watch = watch.clone();
        calls.spawn(async move {
            for id in chunk {
                let e = watch(id).await.unwrap_err();
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                assert!(e.message().contains("no operation"), "{e:?}");
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 5 * 1024,
        "10,000 watches of made-up ids grew the agent by {grown} KiB"
    );

    // Ids are short: a megabyte of id is refused before it goes anywhere.
    let e = watch("x".repeat(1 << 20)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 64"), "{e:?}");
    let e = watch("op-../../etc".into()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut client = pb::operation_service_client::OperationServiceClient::new(channel.clone());
    let e = client
        .get_operation(pb::GetOperationRequest {
            id: "y".repeat(100),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_only_declared_units() {
    let dir = sandbox_dir("sec-units");
    let agent = TestAgent::start_with_toml(dir.path(), APP_TOML.into()).await;
    let mut client = pb::unit_service_client::UnitServiceClient::new(agent.channel("reader").await);
    for asked in [
        vec!["sshd.service"],
        vec!["covet.service", "dbus.service"],
        vec!["systemd-journald.socket"],
    ] {
        let e = client
            .get_unit_status(pb::GetUnitStatusRequest {
                units: asked.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{asked:?}: {e:?}");
        assert!(e.message().contains("not declared on this host"), "{e:?}");
    }
    let e = client
        .get_unit_status(pb::GetUnitStatusRequest {
            units: vec!["../../x.service".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

/// Every file under `root` is 0600 (or stricter) and every directory 0700.
fn assert_private_tree(root: &Path) {
    let mut stack = vec![root.to_owned()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.path().symlink_metadata().unwrap();
            let mode = meta.mode() & 0o7777;
            seen += 1;
            if meta.is_dir() {
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
                stack.push(entry.path());
            } else if meta.is_file() {
                assert_eq!(mode & 0o177, 0, "{} is {mode:o}", entry.path().display());
            }
        }
    }
    assert!(seen > 0, "nothing under {}", root.display());
    let mode = root.metadata().unwrap().mode() & 0o7777;
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", root.display());
}

fn grep_tree(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = path.symlink_metadata().unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path.display().to_string());
                }
            }
        }
    }
    hits
}

/// One upgraded app, attacked from every role: the secret set in the
/// upgrade never reaches a reader or a file of the agent's; an operator can
/// roll back only to the last upgrade's own backup; everything the agent and
/// covetctl write is private even under umask 000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_secrets_and_modes_around_an_upgrade() {
    // The agent and covetctl inherit this: a careless umask must not matter.
    // SAFETY: umask only changes this test process's mask.
    unsafe { libc::umask(0) };
    let dir = sandbox_dir("sec-upgrade");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let Some(pg) = postgres_or_skip(&dir.path().join("pg")) else {
        return;
    };
    let app = sampleapp::install(&dir.path().join("app"), &pg, 5).unwrap();
    sandbox
        .install_unit(
            "covet.service",
            &sampleapp::unit_file(&app.venv, &app.env_file, app.port),
        )
        .unwrap();
    assert!(
        sandbox
            .systemctl(&["start", "covet.service"])
            .status
            .success()
    );
    wait_healthy(app.port, "0.1.9").await;
    let toml = format!(
        "{}{}",
        sandbox.agent_toml(Some("500ms")),
        app.agent_toml(&pg)
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;

    const SECRET: &str = "hunter2-do-not-show";
    let out = agent.ctl(
        "operator",
        &[
            "-o",
            "json",
            "--timeout",
            "60s",
            "upgrade",
            "covet",
            "--to",
            "0.2.0",
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
            "--env-set",
            &format!("DATABASE_PASSWORD={SECRET}"),
        ],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let op = out.json();
    let upgrade_backup = op["backup_id"].as_str().unwrap().to_owned();
    let op_id = op["id"].as_str().unwrap().to_owned();

    // A reader sees which keys changed, never a value.
    let shown = agent.ctl("reader", &["-o", "json", "ops", "show", &op_id]);
    shown.assert_ok();
    assert!(!shown.stdout.contains(SECRET), "{}", shown.stdout);
    assert!(
        shown.stdout.contains("set DATABASE_PASSWORD"),
        "{}",
        shown.stdout
    );
    let listed = agent.ctl("reader", &["-o", "json", "ops", "list"]);
    assert!(!listed.stdout.contains(SECRET), "{}", listed.stdout);
    let state_dir = agent.dir.join("state");
    let backup_dir = agent.dir.join("backups");
    assert_eq!(
        grep_tree(&state_dir, SECRET.as_bytes()),
        Vec::<String>::new()
    );

    // Another backup exists; naming it is a restore, which is admin's.
    let other = agent.ctl(
        "operator",
        &["-o", "json", "backup", "create", "covet", "--no-db"],
    );
    let other = other.assert_ok().json()["backup_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = agent.ctl("operator", &["rollback", "covet", "--to", &other]);
    assert_eq!(refused.code, 1, "{}\n{}", refused.stdout, refused.stderr);
    assert!(
        refused
            .stderr
            .contains("may not do rolling back to a backup other than")
            && refused.stderr.contains("admin"),
        "{}",
        refused.stderr
    );
    let audit = agent
        .wait_audit(|r| {
            r["rpc"].as_str().is_some_and(|m| m.ends_with("/Rollback")) && r["outcome"] != "ok"
        })
        .await;
    assert_eq!(audit["caller_cn"], "operator", "{audit:#}");
    // Nothing was started for the refused rollback.
    let ops = agent.ctl("reader", &["-o", "json", "ops", "list"]).json();
    assert!(
        !ops.to_string().contains("\"rollback\""),
        "a refused rollback started an operation: {ops:#}"
    );

    // The last upgrade's own backup is the operator's, named (as fleet
    // rollouts do) or not.
    let back = agent.ctl(
        "operator",
        &[
            "-o",
            "json",
            "--timeout",
            "60s",
            "rollback",
            "covet",
            "--to",
            &upgrade_backup,
        ],
    );
    assert_eq!(back.code, 0, "{}\n{}", back.stdout, back.stderr);
    wait_healthy(app.port, "0.1.9").await;

    // Downloads are 0600 and never written through a planted link.
    let download = dir.path().join("download.tar");
    let sentinel = dir.path().join("sentinel");
    std::fs::write(&sentinel, "keep me").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&sentinel, download.with_extension("partial")).unwrap();
    agent
        .ctl(
            "admin",
            &[
                "backup",
                "download",
                &upgrade_backup,
                "--to",
                download.to_str().unwrap(),
            ],
        )
        .assert_ok();
    assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "keep me");
    let meta = download.symlink_metadata().unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert!(meta.len() > 0);

    // Give the agent a moment to finish writing its records, then check
    // every file it owns.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_private_tree(&state_dir);
    assert_private_tree(&backup_dir);
}
