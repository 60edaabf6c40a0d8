//! Backups made faster, end to end on a real agent, PostgreSQL and files:
//! the files are archived while the database is dumped (one progress
//! total; the first failure stops the other part and leaves nothing), and a
//! real virtualenv comes back exactly from its archive.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sandbox_dir;
use pb::operation_event::Event;

const DB: &str = "covet_production";

struct World {
    agent: TestAgent,
    pg: PostgresCluster,
    app_root: PathBuf,
    _dir: tempfile::TempDir,
}

/// An agent whose app `covet` declares `paths` (under `app_root`) and the
/// database `dbname` (which need not exist).
async fn world(paths: &[&str], dbname: &str, make: impl FnOnce(&Path)) -> Option<World> {
    let dir = sandbox_dir("backup-speed");
    let pg = postgres_or_skip(&dir.path().join("pg"))?;
    let app_root = dir.path().join("opt");
    std::fs::create_dir_all(&app_root).unwrap();
    make(&app_root);
    let paths: Vec<String> = paths
        .iter()
        .map(|p| format!("{:?}", app_root.join(p).display().to_string()))
        .collect();
    let toml = format!(
        r#"
[backup]
free_space_reserve_bytes = 0
[[app]]
name = "covet"
unit = "covet.service"
paths = [{paths}]
[app.database]
kind = "postgres"
dbname = "{dbname}"
host = "{sock}"
port = {port}
user = "postgres"
os_user = "postgres"
"#,
        paths = paths.join(", "),
        sock = pg.socket_dir().display(),
        port = pg.port(),
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = TestAgent::start_with_toml(&agent_dir, toml).await;
    Some(World {
        agent,
        pg,
        app_root,
        _dir: dir,
    })
}

/// `mib` MiB that zstd cannot shrink (xorshift), so archiving takes a while.
fn write_noise(path: &Path, mib: usize, seed: u64) {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(mib << 20);
    for _ in 0..(mib << 17) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Starts a backup, runs `meanwhile` once it is under way (past the
/// preflight), and returns its operation, once over, with its events.
async fn backup(agent: &TestAgent, meanwhile: impl FnOnce()) -> (pb::Operation, Vec<Event>) {
    let mut client =
        pb::backup_service_client::BackupServiceClient::new(agent.channel("operator").await);
    let op = client
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    meanwhile();
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(agent.channel("reader").await);
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            id: op.id.clone(),
            from_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(e) = stream.message().await.unwrap() {
            events.extend(e.event);
        }
    })
    .await
    .expect("the backup ends within 2 minutes");
    let op = ops
        .get_operation(pb::GetOperationRequest { id: op.id })
        .await
        .unwrap()
        .into_inner();
    (op, events)
}

fn step<'o>(op: &'o pb::Operation, name: &str) -> &'o pb::StepRecord {
    op.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {:#?}", op.steps))
}

fn outcome(s: &pb::StepRecord) -> pb::StepOutcome {
    pb::StepOutcome::try_from(s.outcome).unwrap()
}

/// The pg_dumps still running against this test's own cluster. Tests run
/// at once and share the database name, so the cluster's socket directory
/// (in every pg_dump's argv) tells ours from theirs.
fn pg_dumps_running(pg: &PostgresCluster) -> Vec<String> {
    let socket = pg.socket_dir().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("pg_dump") && c.contains(DB) && c.contains(&socket))
        .collect()
}

fn nothing_left(agent: &TestAgent) {
    let list = agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    assert!(list["backups"].as_array().unwrap().is_empty(), "{list:#}");
    let leftovers: Vec<_> = std::fs::read_dir(agent.dir.join("backups/covet"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "partial backups removed: {leftovers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dump_stops_the_archive_and_leaves_nothing() {
    let Some(w) = world(&["app"], "covet_missing", |root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        for i in 0..3 {
            write_noise(&root.join(format!("app/blob{i}.bin")), 48, i + 7);
        }
    })
    .await
    else {
        return;
    };
    let (op, _) = backup(&w.agent, || {}).await;
    assert_eq!(
        pb::OperationState::try_from(op.state).unwrap(),
        pb::OperationState::Failed,
        "{op:#?}"
    );
    assert!(op.cause.contains("covet_missing"), "{}", op.cause);
    let dump = step(&op, "dump database");
    assert_eq!(outcome(dump), pb::StepOutcome::Failed);
    assert!(dump.detail.contains("covet_missing"), "{}", dump.detail);
    let archive = step(
        &op,
        &format!("archive {}", w.app_root.join("app").display()),
    );
    assert_eq!(outcome(archive), pb::StepOutcome::Failed, "{archive:#?}");
    assert_eq!(archive.detail, "stopped: the database dump failed");
    nothing_left(&w.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_archive_stops_the_dump_and_leaves_nothing() {
    let Some(w) = world(&["app", "gone"], DB, |root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(root.join("gone")).unwrap();
        write_noise(&root.join("app/blob.bin"), 16, 3);
    })
    .await
    else {
        return;
    };
    w.pg.create_db(DB, "covet_app").unwrap();
    // Enough rows that the dump is still running when the archive fails.
    w.pg.psql(
        DB,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS body \
         FROM generate_series(1, 300000) g",
    )
    .unwrap();
    // The second path vanishes while the first is being archived (after the
    // preflight measured it): archiving it fails.
    let gone = w.app_root.join("gone");
    let (op, events) = backup(&w.agent, || std::fs::remove_dir(&gone).unwrap()).await;
    assert_eq!(
        pb::OperationState::try_from(op.state).unwrap(),
        pb::OperationState::Failed,
        "{op:#?}"
    );
    let dump = step(&op, "dump database");
    assert_eq!(outcome(dump), pb::StepOutcome::Failed, "{dump:#?}");
    assert_eq!(dump.detail, "stopped: archiving the files failed");
    assert!(
        events.iter().any(|e| matches!(e, Event::StepFinished(f)
            if f.step.starts_with("archive ") && f.detail.contains("gone"))),
        "{events:#?}"
    );
    // pg_dump was killed, not left to finish (a moment for the signal).
    for _ in 0..40 {
        if pg_dumps_running(&w.pg).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pg_dumps_running(&w.pg).is_empty(),
        "{:?}",
        pg_dumps_running(&w.pg)
    );
    nothing_left(&w.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_database_are_backed_up_at_once_with_one_progress_total() {
    let Some(w) = world(&["app", "etc"], DB, |root| {
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        write_noise(&root.join("app/blob.bin"), 48, 11);
        std::fs::write(root.join("etc/app.conf"), "x = 1\n").unwrap();
    })
    .await
    else {
        return;
    };
    w.pg.create_db(DB, "covet_app").unwrap();
    w.pg.psql(
        DB,
        "CREATE TABLE users AS SELECT g AS id, 'user' || g || '@example.com' AS email \
         FROM generate_series(1, 200000) g",
    )
    .unwrap();
    let (op, events) = backup(&w.agent, || {}).await;
    assert_eq!(
        pb::OperationState::try_from(op.state).unwrap(),
        pb::OperationState::Succeeded,
        "{op:#?}"
    );
    // Both parts ran at once: the dump started before the first archive ended.
    let position = |wanted: &dyn Fn(&Event) -> bool| events.iter().position(wanted).unwrap();
    let dump_started =
        position(&|e| matches!(e, Event::StepStarted(s) if s.step == "dump database"));
    let app_archived = position(
        &|e| matches!(e, Event::StepFinished(f) if f.step.starts_with("archive ") && f.step.ends_with("/app")),
    );
    assert!(dump_started < app_archived, "{events:#?}");
    // One running total for both parts: it only grows, within its total.
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some((p.done, p.total)),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty());
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert!(
        progress.iter().all(|(done, total)| done <= total),
        "{progress:?}"
    );
    // Reported at most every 250 ms, not for every MiB of either part.
    assert!(progress.len() < 200, "{} progress events", progress.len());

    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    let files: Vec<&str> = list["backups"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        vec!["00-app.tar.zst", "01-etc.tar.zst", "database.dump.zst"]
    );
    assert_eq!(
        list["backups"][0]["database"]["row_counts"]["public.users"],
        200000
    );
    let id = op.backup_id.clone();
    w.agent
        .ctl("operator", &["backup", "verify", &id])
        .assert_ok();
    assert!(
        pg_dumps_running(&w.pg).is_empty(),
        "{:?}",
        pg_dumps_running(&w.pg)
    );
}

/// What a tree holds, path by path: kind, mode, owner, mtime, and the
/// contents or the link target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let what = if meta.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                todo.push(e.unwrap().path());
            }
            "dir".to_owned()
        } else {
            let data = std::fs::read(&path).unwrap();
            format!("file {} bytes {:x}", data.len(), fnv(&data))
        };
        let mtime = if meta.is_dir() { 0 } else { meta.mtime() };
        out.insert(
            rel,
            format!(
                "{what} mode {:o} {}:{} mtime {mtime}",
                meta.permissions().mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ),
        );
    }
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_virtualenv_comes_back_exactly() {
    let mut made = false;
    let Some(w) = world(&["venv"], DB, |root| {
        made = std::process::Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(root.join("venv"))
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            return;
        }
        // Many small files in a deep tree, like site-packages.
        let pkg = root.join("venv/lib/python3/site-packages/covet");
        for i in 0..300 {
            let dir = pkg.join(format!("mod{}/sub{}", i % 17, i % 5));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("m{i}.py")), format!("X = {i}\n").repeat(i)).unwrap();
        }
        std::fs::set_permissions(
            pkg.join("mod1/sub1/m1.py"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        std::os::unix::fs::symlink("mod2/sub2", pkg.join("alias")).unwrap();
        std::fs::create_dir_all(pkg.join("empty/dir")).unwrap();
    })
    .await
    else {
        return;
    };
    if !made {
        eprintln!("SKIPPED: python3 -m venv is not available");
        return;
    }
    w.pg.create_db(DB, "covet_app").unwrap();
    let venv = w.app_root.join("venv");
    let before = snapshot(&venv);
    assert!(before.len() > 300, "{}", before.len());
    let (op, _) = backup(&w.agent, || {}).await;
    assert_eq!(
        pb::OperationState::try_from(op.state).unwrap(),
        pb::OperationState::Succeeded,
        "{op:#?}"
    );

    // Change the tree every way a bad upgrade could.
    let pkg = venv.join("lib/python3/site-packages/covet");
    std::fs::write(pkg.join("mod3/sub3/m3.py"), "broken\n").unwrap();
    std::fs::remove_dir_all(pkg.join("mod4")).unwrap();
    std::fs::write(pkg.join("new.py"), "new\n").unwrap();
    std::fs::remove_file(pkg.join("alias")).unwrap();
    std::fs::create_dir(pkg.join("alias")).unwrap();
    std::fs::remove_dir_all(pkg.join("empty")).unwrap();
    std::fs::write(pkg.join("empty"), "now a file\n").unwrap();

    w.agent
        .ctl("admin", &["backup", "restore", &op.backup_id])
        .assert_ok();
    assert_eq!(snapshot(&venv), before);
    let leftovers: Vec<String> = std::fs::read_dir(&w.app_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
