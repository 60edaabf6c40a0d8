//! SQLite as the app's database, end to end: a real agent backs up a real
//! SQLite file while a real writer process inserts (WAL mode), verifies,
//! restores (keeping the previous file), refuses damaged dumps and bad
//! configs; and the sample app on SQLite upgraded and rolled back by the
//! workflow, including kill -9 of the agent during the migration.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::http::wait_healthy;
use covet_tests::opwait::{upgrade_killed_during_migrate, upgrade_then_roll_back_broken};
use covet_tests::sampleapp::SampleApp;
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip, start_app_and_agent};
use covet_tests::sqlite_app::{self, Writer, query, script};
use covet_tests::{sandbox_dir, sqlite_app::install};

const UNIT: &str = "covet.service";

/// An agent with one app "covet" whose database is the SQLite file `db`.
struct Files {
    agent: TestAgent,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

async fn files_world(seed_rows: u32) -> Files {
    let dir = sandbox_dir("sqlite");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("app.db");
    script(
        &db,
        &format!(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE);
             CREATE TABLE \"odd \"\"name\" (x);
             CREATE INDEX users_email ON users (email);
             WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {seed_rows})
             INSERT INTO users (email) SELECT 'user' || n || '@example.com' FROM g;"
        ),
    )
    .unwrap();
    let toml = format!(
        r#"
[backup]
free_space_reserve_bytes = 0
[[app]]
name = "covet"
unit = "covet.service"
[app.database]
kind = "sqlite"
path = "{}"
"#,
        db.display()
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    Files {
        agent,
        db,
        _dir: dir,
    }
}

impl Files {
    fn create_backup(&self) -> (String, serde_json::Value) {
        let op = self
            .agent
            .ctl("operator", &["-o", "json", "backup", "create", "covet"])
            .assert_ok()
            .json();
        assert_eq!(op["state"], "succeeded", "{op:#}");
        let id = op["backup_id"].as_str().unwrap().to_owned();
        let list = self
            .agent
            .ctl("reader", &["-o", "json", "backup", "list", "covet"])
            .assert_ok()
            .json();
        let b = list["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id.as_str())
            .unwrap()
            .clone();
        (id, b)
    }

    fn dump_path(&self, id: &str) -> PathBuf {
        self.agent
            .dir
            .join("backups/covet")
            .join(id)
            .join("database.dump.zst")
    }
}

/// The dump decompressed with the zstd program into `dir/NAME`.
fn unpack(dump: &Path, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&out)
        .arg(dump)
        .status()
        .unwrap();
    assert!(status.success());
    out
}

fn users(db: &Path) -> String {
    query(db, "SELECT id, email FROM users ORDER BY id").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_while_a_writer_inserts_is_one_consistent_snapshot() {
    let w = files_world(2000).await;
    let writer = Writer::start(&w.db, 3.0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (id, b) = w.create_backup();
    eprintln!("backup during writes took {:?}", started.elapsed());
    let inserted = writer.finish().unwrap();
    assert_eq!(b["database"]["format"], "sqlite+zstd");
    let counts = &b["database"]["row_counts"];
    assert_eq!(counts["main.users"], 2000);
    let events = counts["main.events"].as_u64().unwrap();
    assert!(
        events > 0 && events < inserted,
        "the snapshot is taken mid-write: {events} of {inserted}"
    );
    // The copy is whole and holds exactly what the manifest says.
    let scratch = tempfile::tempdir().unwrap();
    let copy = unpack(&w.dump_path(&id), scratch.path(), "copy.db");
    assert_eq!(query(&copy, "PRAGMA integrity_check").unwrap().trim(), "ok");
    assert_eq!(
        query(&copy, "SELECT count(*) FROM events").unwrap().trim(),
        events.to_string()
    );
    assert_eq!(
        query(&copy, "SELECT count(*) FROM users").unwrap().trim(),
        "2000"
    );
    // No scratch copy is left in the backup.
    let names: Vec<String> = std::fs::read_dir(w.dump_path(&id).parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    let verify = w.agent.ctl("operator", &["backup", "verify", &id]);
    verify.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_change_restore_gives_back_the_rows_and_keeps_the_previous_file() {
    let w = files_world(300).await;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&w.db, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&w.db, Some(65534), Some(65534)).unwrap();
    let before = users(&w.db);
    let (id, _) = w.create_backup();
    script(
        &w.db,
        "DELETE FROM users WHERE id % 3 = 0; CREATE TABLE junk (x); INSERT INTO junk VALUES (1);",
    )
    .unwrap();
    let changed = users(&w.db);
    let out = w.agent.ctl("admin", &["backup", "restore", &id]);
    out.assert_ok();
    assert!(out.stdout.contains("kept as "), "{}", out.stdout);
    assert_eq!(users(&w.db), before);
    assert!(
        query(&w.db, "SELECT name FROM sqlite_schema WHERE name = 'junk'")
            .unwrap()
            .is_empty()
    );
    let meta = std::fs::metadata(&w.db).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (65534, 65534, 0o640)
    );
    // The previous file is kept beside the live one, as it was.
    let kept: Vec<PathBuf> = std::fs::read_dir(w.db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("app.db.before-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(users(&kept[0]), changed);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(w.db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_dump_is_refused_by_verify_and_restore_and_the_live_file_is_untouched() {
    let w = files_world(500).await;
    let (id, _) = w.create_backup();
    script(&w.db, "DELETE FROM users WHERE id > 100;").unwrap();
    let live = std::fs::read(&w.db).unwrap();
    // Flip bytes in the middle of the dump.
    let dump = w.dump_path(&id);
    let mut bytes = std::fs::read(&dump).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&dump, &bytes).unwrap();
    let verify = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "verify", &id]);
    assert_ne!(verify.code, 0, "{}", verify.stdout);
    let restore = w.agent.ctl("admin", &["backup", "restore", &id]);
    assert_ne!(restore.code, 0, "{}", restore.stdout);
    assert_eq!(
        std::fs::read(&w.db).unwrap(),
        live,
        "the live file is untouched"
    );
    let names: Vec<String> = std::fs::read_dir(w.db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "app.db" && n != "app.db-wal" && n != "app.db-shm")
        .collect();
    assert!(names.is_empty(), "nothing beside the live file: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_sqlite_or_missing_is_refused_before_anything_changes() {
    let w = files_world(1).await;
    let text = b"not a database, just text\n".repeat(10);
    std::fs::write(&w.db, &text).unwrap();
    let mut backups =
        pb::backup_service_client::BackupServiceClient::new(w.agent.channel("operator").await);
    let e = backups
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is not a SQLite database"), "{e:?}");
    assert_eq!(std::fs::read(&w.db).unwrap(), text);
    std::fs::remove_file(&w.db).unwrap();
    let e = backups
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("does not exist"), "{e:?}");
    assert!(!w.db.exists());
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    assert!(list["backups"].as_array().unwrap().is_empty(), "{list:#}");

    // An unknown kind, or a relative path, is a config error naming the key.
    let base = std::fs::read_to_string(&w.agent.config_path).unwrap();
    let check = |from: &str, to: &str| {
        let path = w.agent.dir.join("check.toml");
        assert!(base.contains(from));
        std::fs::write(&path, base.replace(from, to)).unwrap();
        let out = Command::new(covet_tests::bin("covet-agent"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let unknown = check("kind = \"sqlite\"", "kind = \"oracle\"");
    assert!(
        unknown.contains("oracle") && unknown.contains("`postgres`, `sqlite`, `mysql`"),
        "{unknown}"
    );
    let relative = check(
        &format!("path = \"{}\"", w.db.display()),
        "path = \"app.db\"",
    );
    assert!(
        relative.contains("database.path") && relative.contains("absolute"),
        "{relative}"
    );
}

// ---------------------------------------------------------------------------
// The workflow with the sample app on SQLite

struct AppWorld {
    agent: TestAgent,
    sandbox: SystemdSandbox,
    app: SampleApp,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

async fn app_world() -> Option<AppWorld> {
    let dir = sandbox_dir("sqlite-app");
    let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
    let (app, db) = install(&dir.path().join("app"), 25).unwrap();
    let toml = sqlite_app::agent_toml(&app, &db);
    let agent = start_app_and_agent(&sandbox, &app, &toml, &dir.path().join("agent")).await;
    Some(AppWorld {
        agent,
        sandbox,
        app,
        db,
        _dir: dir,
    })
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: String,
    schema: String,
    migrations: String,
    env: Vec<u8>,
}

impl AppWorld {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            rows: users(&self.db),
            schema: query(
                &self.db,
                "SELECT type, name, sql FROM sqlite_schema ORDER BY 1, 2",
            )
            .unwrap(),
            migrations: query(&self.db, "SELECT name FROM covet_migrations ORDER BY 1").unwrap(),
            env: std::fs::read(&self.app.env_file).unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_an_upgrade_succeeds_then_a_broken_release_rolls_back_exactly() {
    let Some(w) = app_world().await else { return };
    upgrade_then_roll_back_broken(
        &w.agent,
        w.app.port,
        || w.snapshot(),
        |at_020| assert!(at_020.schema.contains("last_login"), "{}", at_020.schema),
    )
    .await;
    let kept = std::fs::read_dir(w.db.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("covet.db.before-")
        })
        .count();
    assert_eq!(kept, 1, "the migrated file is kept for inspection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_kill_9_during_the_migration_rolls_back_on_restart() {
    let Some(mut w) = app_world().await else {
        return;
    };
    let before = w.snapshot();
    let done = upgrade_killed_during_migrate(&mut w.agent).await;
    assert_eq!(
        pb::OperationState::try_from(done.state).unwrap(),
        pb::OperationState::RolledBack,
        "{done:?}"
    );
    let _ = w.sandbox.systemctl(&["start", UNIT]);
    wait_healthy(w.app.port, "0.1.9").await;
    assert_eq!(w.snapshot(), before);
}
