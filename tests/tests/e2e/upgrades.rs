//! The upgrade runbook end to end: a real agent upgrades a real app (a
//! Python package in a virtualenv, served by a real systemd unit, on a real
//! PostgreSQL database), and rolls it back when anything fails.

use std::path::PathBuf;
use std::time::Duration;

use covet_proto::v1 as pb;
use covet_tests::agent::{CtlOutput, TestAgent};
use covet_tests::http::wait_healthy;
use covet_tests::opwait::{wait_done, wait_for_step};
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sampleapp::{self, SampleApp};
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip};
use covet_tests::sandbox_dir;
use tonic::Code;

struct World {
    agent: TestAgent,
    sandbox: SystemdSandbox,
    pg: PostgresCluster,
    app: SampleApp,
    _dir: tempfile::TempDir,
}

const UNIT: &str = "covet.service";
const RENAME: [&str; 2] = ["--env-rename", "DATABASE_URI=DATABASE_URL"];

async fn world_with(extra_app_toml: &str) -> Option<World> {
    world_edited(extra_app_toml, |toml| toml).await
}

/// A world whose agent config is `edit`ed first.
async fn world_edited(extra_app_toml: &str, edit: impl Fn(String) -> String) -> Option<World> {
    let dir = sandbox_dir("upgrade");
    let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
    let pg = postgres_or_skip(&dir.path().join("pg"))?;
    let app = sampleapp::install(&dir.path().join("app"), &pg, 25).unwrap();
    sandbox
        .install_unit(
            UNIT,
            &sampleapp::unit_file(&app.venv, &app.env_file, app.port),
        )
        .unwrap();
    let out = sandbox.systemctl(&["start", UNIT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_healthy(app.port, "0.1.9").await;
    let extra_app_toml = extra_app_toml.replace("PORT", &app.port.to_string());
    let toml = edit(format!(
        "{}{}\n{extra_app_toml}\n",
        sandbox.agent_toml(Some("500ms")),
        app.agent_toml(&pg),
    ));
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    Some(World {
        agent,
        sandbox,
        pg,
        app,
        _dir: dir,
    })
}

async fn world() -> Option<World> {
    world_with("").await
}

impl World {
    fn upgrade(&self, version: &str, extra: &[&str]) -> CtlOutput {
        let mut args = vec![
            "-o",
            "json",
            "--timeout",
            "30s",
            "upgrade",
            "covet",
            "--to",
            version,
        ];
        args.extend_from_slice(extra);
        self.agent.ctl("operator", &args)
    }

    /// What a rollback must give back exactly.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            rows: self.pg.psql(&self.app.db, "SELECT id, email FROM users ORDER BY id").unwrap(),
            columns: self
                .pg
                .psql(&self.app.db, "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' ORDER BY 1")
                .unwrap(),
            migrations: self.pg.psql(&self.app.db, "SELECT name FROM covet_migrations ORDER BY 1").unwrap(),
            env: std::fs::read(&self.app.env_file).unwrap(),
            version: covet_version(&self.app.venv),
        }
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: String,
    columns: String,
    migrations: String,
    env: Vec<u8>,
    version: String,
}

/// `venv/lib/pythonX.Y/site-packages`.
fn site_packages(venv: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages")
}

fn covet_version(venv: &std::path::Path) -> String {
    std::fs::read_dir(site_packages(venv))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("covetpy-")?
                .strip_suffix(".dist-info")
                .map(str::to_owned)
        })
        .next()
        .unwrap_or_default()
}

fn step_names(op: &serde_json::Value) -> Vec<String> {
    op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_succeeds_then_a_broken_release_rolls_back_to_exactly_what_was_there() {
    let Some(w) = world().await else { return };
    let out = w.upgrade("0.2.0", &RENAME);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let op = out.json();
    assert_eq!(op["state"], "succeeded");
    let names = step_names(&op);
    let main: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.starts_with("archive ") && *n != "dump database")
        .collect();
    assert_eq!(
        main,
        vec![
            "preflight",
            "backup",
            "package",
            "config",
            "migrate",
            "restart",
            "health",
            "smoke"
        ]
    );
    assert!(names.iter().any(|n| n == "dump database"), "{names:?}");
    assert_eq!(op["params"]["from_version"], "0.1.9");
    assert!(!op["backup_id"].as_str().unwrap().is_empty());
    wait_healthy(w.app.port, "0.2.0").await;
    let env = std::fs::read_to_string(&w.app.env_file).unwrap();
    assert!(
        env.contains("DATABASE_URL=") && !env.contains("DATABASE_URI="),
        "{env}"
    );
    assert!(w.snapshot().columns.contains("last_login"));
    assert_eq!(covet_version(&w.app.venv), "0.2.0");

    let before = w.snapshot();
    let out = w.upgrade("0.2.1", &[]);
    assert_eq!(
        out.code, 3,
        "a clean rollback exits 3:\n{}\n{}",
        out.stdout, out.stderr
    );
    let op = out.json();
    assert_eq!(op["state"], "rolled_back");
    assert!(
        op["cause"].as_str().unwrap().starts_with("health failed"),
        "{op:#}"
    );
    let names = step_names(&op);
    for s in [
        "rollback: stop",
        "rollback: package",
        "rollback: database",
        "rollback: start",
        "rollback: health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    wait_healthy(w.app.port, "0.2.0").await;
    assert_eq!(
        w.snapshot(),
        before,
        "code, env file and database are exactly as before"
    );
    let kept =
        w.pg.psql(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE '%_before_%'",
        )
        .unwrap();
    assert!(
        !kept.trim().is_empty(),
        "the migrated database is kept for inspection"
    );

    // The event stream of a finished operation can be resumed from any point and ends.
    let id = op["id"].as_str().unwrap();
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(w.agent.channel("reader").await);
    let all: Vec<pb::OperationEvent> = collect(&mut ops, id, 1).await;
    let tail: Vec<pb::OperationEvent> = collect(&mut ops, id, 10).await;
    assert_eq!(tail.first().unwrap().sequence, 10);
    assert_eq!(tail.len(), all.len() - 9);
    assert!(
        all.windows(2).all(|p| p[1].sequence == p[0].sequence + 1),
        "no gaps"
    );
    let watch = w.agent.ctl("reader", &["ops", "watch", id, "--from", "5"]);
    assert_eq!(watch.code, 3, "{}", watch.stdout);
    assert!(
        watch.stdout.contains("state: rolled_back"),
        "{}",
        watch.stdout
    );

    // And `covetctl rollback` takes the app back before its last upgrade.
    let out = w
        .agent
        .ctl("operator", &["-o", "json", "rollback", "covet"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    wait_healthy(w.app.port, "0.1.9").await;
    assert!(!w.snapshot().columns.contains("last_login"));
    assert!(
        std::fs::read_to_string(&w.app.env_file)
            .unwrap()
            .contains("DATABASE_URI=")
    );
}

/// The case, as a new user would meet it: the env file and the
/// venv are declared but not listed in `paths`. `covetctl rollback` puts
/// back everything the last upgrade changed (a venv swap, the env file, the
/// database), once; an admin's `rollback --to` goes to any backup's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_rollback_puts_back_everything_the_last_upgrade_changed() {
    let Some(mut w) = world_edited("", |toml| {
        let start = toml.find("paths = [").unwrap();
        let end = start + toml[start..].find('\n').unwrap();
        format!("{}paths = []{}", &toml[..start], &toml[end..])
    })
    .await
    else {
        return;
    };
    let before = w.snapshot();
    let out = w.upgrade("0.2.0", &RENAME);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let upgrade = out.json();
    wait_healthy(w.app.port, "0.2.0").await;
    // The restore point is kept until the next upgrade.
    let parent = w.app.venv.parent().unwrap();
    let snapshot_name = format!(".venv.before-{}", upgrade["id"].as_str().unwrap());
    assert!(parent.join(&snapshot_name).is_dir(), "{snapshot_name}");
    let at_020 = w.snapshot();
    let backup = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "create", "covet"])
        .assert_ok()
        .json();
    let backup_020 = backup["backup_id"].as_str().unwrap().to_owned();

    // The rollback, with the agent killed after it put the package back:
    // started again, it runs the rollback again (each undo is safe to
    // repeat) and ends as if nothing had happened.
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let rb = client
        .rollback(pb::RollbackRequest {
            app: "covet".into(),
            backup_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.params["undoes"], upgrade["id"].as_str().unwrap());
    assert_eq!(rb.params["to_version"], "0.1.9");
    wait_for_step(&w.agent, &rb.id, "rollback: files").await;
    w.agent.signal(libc::SIGKILL);
    w.agent.restart().await;
    let done = wait_done(&w.agent, &rb.id).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::Succeeded,
        "{done:?}"
    );
    let names: Vec<&str> = done
        .steps
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| n.starts_with("rollback: "))
        .collect();
    let last_run = names.iter().rposition(|n| *n == "rollback: stop").unwrap();
    assert_eq!(
        names[last_run..],
        [
            "rollback: stop",
            "rollback: database",
            "rollback: config",
            "rollback: package",
            "rollback: files",
            "rollback: start",
            "rollback: health"
        ],
        "newest first: {names:?}"
    );
    // The first run swapped the kept venv back in (no extraction); the
    // second found it used and took the venv from the backup.
    let package = done
        .steps
        .iter()
        .find(|s| s.name == "rollback: package")
        .unwrap();
    assert!(
        package.detail.contains("from its restore point"),
        "{package:?}"
    );
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(
        w.snapshot(),
        before,
        "code, env file and database as before"
    );
    assert!(!parent.join(&snapshot_name).exists());

    // Undone once: a second rollback has no upgrade left to undo and
    // changes nothing.
    let out = w.agent.ctl("operator", &["rollback", "covet"]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("no successful upgrade"),
        "{}",
        out.stderr
    );
    assert_eq!(w.snapshot(), before);

    // Any other backup is an admin's: back to 0.2.0 from the backup alone.
    let out = w.agent.ctl(
        "admin",
        &["-o", "json", "rollback", "covet", "--to", &backup_020],
    );
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        w.agent.log()
    );
    wait_healthy(w.app.port, "0.2.0").await;
    assert_eq!(w.snapshot(), at_020);
}

async fn collect(
    ops: &mut pb::operation_service_client::OperationServiceClient<tonic::transport::Channel>,
    id: &str,
    from: u64,
) -> Vec<pb::OperationEvent> {
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            id: id.into(),
            from_sequence: from,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = stream.message().await.unwrap() {
            out.push(e);
        }
    })
    .await
    .expect("the stream of a finished operation ends");
    out
}

/// Runs an upgrade that must fail at `step` and roll back to the snapshot.
async fn fails_and_rolls_back(
    w: &World,
    version: &str,
    extra: &[&str],
    step: &str,
) -> serde_json::Value {
    let before = w.snapshot();
    let out = w.upgrade(version, extra);
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    let op = out.json();
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    // An empty `step`: the test checks the cause itself.
    assert!(
        step.is_empty()
            || op["cause"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{step} failed")),
        "{op:#}"
    );
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_package_is_refused_before_anything_changes() {
    let Some(w) = world().await else { return };
    let before = w.snapshot();
    let out = w.upgrade("9.9.9", &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("9.9.9"), "{}", out.stderr);
    let out = w.upgrade("../../etc", &[]);
    assert_eq!(out.code, 1);
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let status = client
        .upgrade(pb::UpgradeRequest {
            app: "covet".into(),
            to_version: "9.9.9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = client
        .upgrade(pb::UpgradeRequest {
            app: "nope".into(),
            to_version: "0.2.0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .upgrade(pb::UpgradeRequest {
            app: "covet".into(),
            to_version: "0.2.0/../x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(w.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let Some(w) = world().await else { return };
    let before = w.snapshot();
    let out = w.agent.ctl(
        "operator",
        &[
            "upgrade",
            "covet",
            "--to",
            "0.2.0",
            "--dry-run",
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
        ],
    );
    out.assert_ok();
    assert!(
        out.stdout.contains("would apply 0002_add_users_last_login"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("- DATABASE_URI="), "{}", out.stdout);
    assert!(
        out.stdout.contains("nothing blocks this upgrade"),
        "{}",
        out.stdout
    );
    assert_eq!(w.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_rolls_back() {
    let Some(w) = world().await else { return };
    // The column 0002 adds is already there: the migration fails.
    w.pg.psql(
        &w.app.db,
        "ALTER TABLE users ADD COLUMN last_login timestamptz",
    )
    .unwrap();
    let op = fails_and_rolls_back(&w, "0.2.0", &RENAME, "migrate").await;
    assert!(step_names(&op).contains(&"rollback: database".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_does_not_start_rolls_back() {
    let Some(w) = world().await else { return };
    // The env file overrides the unit's Environment=: 0.2.0 cannot bind and exits.
    let op = fails_and_rolls_back(
        &w,
        "0.2.0",
        &[
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
            "--env-set",
            "COVET_BIND=256.0.0.1:1",
        ],
        "",
    )
    .await;
    // No settle wait: the unit's exit is seen at once, right after its
    // start or while the health gate follows it.
    let cause = op["cause"].as_str().unwrap();
    assert!(
        (cause.starts_with("restart failed") || cause.starts_with("health failed"))
            && cause.contains("covet.service is failed/failed"),
        "{op:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_smoke_checks_roll_back() {
    let Some(w) = world_with(
        "[[app.smoke]]\nname = \"missing page\"\nurl = \"http://127.0.0.1:PORT/nope\"\n",
    )
    .await
    else {
        return;
    };
    let op = fails_and_rolls_back(&w, "0.2.0", &RENAME, "smoke").await;
    assert!(
        op["cause"].as_str().unwrap().contains("missing page"),
        "{op:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_regression_in_the_watch_window_rolls_back() {
    let Some(w) = world().await else { return };
    let before = w.snapshot();
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let op = client
        .upgrade(renaming_upgrade("0.2.0", Some(60)))
        .await
        .unwrap()
        .into_inner();
    wait_for_step(&w.agent, &op.id, "watch").await;
    // Someone breaks the app while it is watched.
    w.sandbox.systemctl(&["stop", UNIT]);
    let done = wait_done(&w.agent, &op.id).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::RolledBack,
        "{done:?}"
    );
    assert!(done.cause.contains("watch failed"), "{}", done.cause);
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_and_cancel() {
    let Some(w) = world().await else { return };
    let before = w.snapshot();
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let request = renaming_upgrade("0.2.0", Some(120));
    let op = client.upgrade(request.clone()).await.unwrap().into_inner();
    let status = client.upgrade(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains(&op.id), "{}", status.message());
    let mut backups =
        pb::backup_service_client::BackupServiceClient::new(w.agent.channel("operator").await);
    let status = backups
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    // A manual restart of the app's unit must not land in the middle of it.
    let mut units =
        pb::unit_service_client::UnitServiceClient::new(w.agent.channel("operator").await);
    let status = units
        .restart_unit(pb::UnitActionRequest {
            unit: UNIT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains(&op.id), "{}", status.message());

    wait_for_step(&w.agent, &op.id, "watch").await;
    w.agent
        .ctl("operator", &["ops", "cancel", &op.id])
        .assert_ok();
    let done = wait_done(&w.agent, &op.id).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::RolledBack,
        "{done:?}"
    );
    assert!(done.cause.contains("cancel"), "{}", done.cause);
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
    let status = pb::operation_service_client::OperationServiceClient::new(
        w.agent.channel("operator").await,
    )
    .cancel_operation(pb::CancelOperationRequest { id: op.id.clone() })
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_cannot_complete_needs_a_human() {
    let Some(w) = world().await else { return };
    let out = w.upgrade("0.2.0", &RENAME);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let op = client
        .upgrade(pb::UpgradeRequest {
            app: "covet".into(),
            to_version: "0.2.1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Once the migration runs, the operation's dump disappears: the
    // database cannot be put back.
    wait_for_step(&w.agent, &op.id, "migrate").await;
    let backup = wait_record(&w.agent, &op.id).await.backup_id;
    let dump = w
        .agent
        .dir
        .join("backups/covet")
        .join(&backup)
        .join("database.dump.zst");
    std::fs::remove_file(&dump).unwrap();
    let done = wait_done(&w.agent, &op.id).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::NeedsHuman,
        "{done:?}"
    );
    assert!(
        done.needs_human.contains("database"),
        "{}",
        done.needs_human
    );
    assert!(done.needs_human.contains(&backup), "{}", done.needs_human);
    let out = w.agent.ctl("reader", &["ops", "watch", &op.id]);
    assert_eq!(out.code, 4, "{}", out.stdout);
    assert!(out.stdout.contains("NEEDS A HUMAN"), "{}", out.stdout);
}

/// The venv's snapshot shares its files' inodes with the live venv. A file
/// written in place during the upgrade changes the snapshot too: the
/// rollback notices and restores the venv from the upgrade's backup instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_venv_snapshot_changed_in_place_falls_back_to_the_backup() {
    let Some(w) = world().await else { return };
    // A file of a package the upgrade does not touch.
    let untouched = site_packages(&w.app.venv).join("pip/__init__.py");
    let original = std::fs::read(&untouched).unwrap();
    let before = w.snapshot();
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let op = client
        .upgrade(renaming_upgrade("0.2.1", None))
        .await
        .unwrap()
        .into_inner();
    wait_for_step(&w.agent, &op.id, "migrate").await;
    // Opened for writing, not replaced: the snapshot's inode changes too.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&untouched)
        .unwrap();
    std::io::Write::write_all(&mut file, b"# written in place\n").unwrap();
    drop(file);
    let done = wait_done(&w.agent, &op.id).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::RolledBack,
        "{done:?}"
    );
    let package = done
        .steps
        .iter()
        .find(|s| s.name == "rollback: package")
        .unwrap_or_else(|| panic!("{done:?}"));
    assert!(
        package
            .detail
            .contains(&format!("from backup {}", done.backup_id)),
        "{package:?}"
    );
    assert_eq!(std::fs::read(&untouched).unwrap(), original);
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
    // No snapshot or aside tree is left next to the venv.
    let leftovers: Vec<String> = std::fs::read_dir(w.app.venv.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".venv."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An upgrade of covet to `version` with 0.2.0's env rename, watched for
/// `watch_seconds` after its health gate.
fn renaming_upgrade(version: &str, watch_seconds: Option<i64>) -> pb::UpgradeRequest {
    pb::UpgradeRequest {
        app: "covet".into(),
        to_version: version.into(),
        env_edits: vec![pb::EnvEdit {
            edit: Some(pb::env_edit::Edit::Rename(pb::EnvRename {
                from: "DATABASE_URI".into(),
                to: "DATABASE_URL".into(),
            })),
        }],
        watch: watch_seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    }
}

async fn wait_record(agent: &TestAgent, id: &str) -> pb::Operation {
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(agent.channel("reader").await);
    ops.get_operation(pb::GetOperationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// kill -9 of the agent when `step` starts; on restart the agent finishes
/// the operation by rolling back, and the app is as it was.
async fn killed_at(step: &str) {
    let Some(mut w) = world().await else { return };
    let before = w.snapshot();
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(w.agent.channel("operator").await);
    let op = client
        .upgrade(renaming_upgrade("0.2.0", Some(30)))
        .await
        .unwrap()
        .into_inner();
    wait_for_step(&w.agent, &op.id, step).await;
    w.agent.signal(libc::SIGKILL);
    w.agent.restart().await;
    let done = wait_done(&w.agent, &op.id).await;
    let state = pb::OperationState::try_from(done.state).unwrap();
    if step == "backup" {
        assert_eq!(state, pb::OperationState::Failed, "{done:?}");
        assert!(done.cause.contains("nothing was changed"), "{}", done.cause);
    } else {
        assert_eq!(state, pb::OperationState::RolledBack, "{done:?}");
        assert!(
            done.cause.contains("interrupted by an agent restart"),
            "{}",
            done.cause
        );
    }
    // No step is left running: the one the kill cut short ended
    // interrupted, with an end time.
    let outcomes: Vec<pb::StepOutcome> = done
        .steps
        .iter()
        .map(|s| pb::StepOutcome::try_from(s.outcome).unwrap())
        .collect();
    assert!(!outcomes.contains(&pb::StepOutcome::Running), "{done:?}");
    assert!(outcomes.contains(&pb::StepOutcome::Interrupted), "{done:?}");
    assert!(done.steps.iter().all(|s| s.finished.is_some()), "{done:?}");
    // The app may have been stopped by the rollback or never touched.
    let _ = w.sandbox.systemctl(&["start", UNIT]);
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(w.app.venv.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

macro_rules! kill_tests {
    ($($name:ident => $step:literal),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            killed_at($step).await;
        }
    )*};
}

kill_tests! {
    kill_9_at_backup => "backup",
    kill_9_at_package => "package",
    kill_9_at_config => "config",
    kill_9_at_migrate => "migrate",
    kill_9_at_restart => "restart",
    kill_9_at_health => "health",
    kill_9_at_smoke => "smoke",
    kill_9_at_watch => "watch",
}
