//! Backups end to end: a real agent backs up real files and a real
//! PostgreSQL database, verifies, restores, prunes; and fails cleanly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sandbox_dir;
use tonic::Code;

struct World {
    agent: TestAgent,
    pg: PostgresCluster,
    app_root: PathBuf,
    _dir: tempfile::TempDir,
}

const DB: &str = "covet_production";

fn write_tree(root: &Path) {
    let app = root.join("app");
    std::fs::create_dir_all(app.join("covet/static")).unwrap();
    std::fs::write(app.join("covet/__init__.py"), "VERSION = '0.1.9'\n").unwrap();
    std::fs::write(
        app.join("covet/static/site.css"),
        "body { color: red }\n".repeat(200),
    )
    .unwrap();
    std::os::unix::fs::symlink("covet/__init__.py", app.join("entry.py")).unwrap();
    let venv = root.join("venv");
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    std::fs::write(venv.join("bin/covet"), "#!/usr/bin/env python3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        venv.join("bin/covet"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        root.join("production.env"),
        "DATABASE_URI=postgresql:///covet_production\nSECRET=s3cret\n",
    )
    .unwrap();
}

fn seed(pg: &PostgresCluster) {
    pg.create_db(DB, "covet_app").unwrap();
    pg.psql(
        DB,
        "CREATE TABLE users (id serial primary key, email text not null);
         INSERT INTO users (email) SELECT 'user' || g || '@example.com' FROM generate_series(1, 500) g;
         CREATE SCHEMA billing;
         CREATE TABLE billing.invoices (id int primary key, amount numeric);
         INSERT INTO billing.invoices SELECT g, g * 1.5 FROM generate_series(1, 120) g;",
    )
    .unwrap();
}

async fn world_with(extra: &str, backup_dir: Option<&Path>) -> Option<World> {
    let dir = sandbox_dir("backup");
    let pg = postgres_or_skip(&dir.path().join("pg"))?;
    seed(&pg);
    let app_root = dir.path().join("opt");
    write_tree(&app_root);
    let toml = format!(
        r#"
[backup]
free_space_reserve_bytes = 0
[[app]]
name = "covet"
unit = "covet.service"
paths = ["{root}/app", "{root}/venv", "{root}/production.env"]
env_file = "{root}/production.env"
[app.database]
kind = "postgres"
dbname = "{DB}"
host = "{sock}"
port = {port}
user = "postgres"
os_user = "postgres"
{extra}
"#,
        root = app_root.display(),
        sock = pg.socket_dir().display(),
        port = pg.port(),
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    if let Some(b) = backup_dir {
        // The harness writes backup_dir = agent_dir/backups: make it the given dir.
        std::os::unix::fs::symlink(b, agent_dir.join("backups")).unwrap();
    }
    let agent = TestAgent::start_with_toml(&agent_dir, toml).await;
    Some(World {
        agent,
        pg,
        app_root,
        _dir: dir,
    })
}

async fn world() -> Option<World> {
    world_with("", None).await
}

fn dump_table(pg: &PostgresCluster, table: &str) -> String {
    pg.psql(DB, &format!("SELECT * FROM {table} ORDER BY 1"))
        .unwrap()
}

async fn wait_op(agent: &TestAgent, id: &str) -> pb::Operation {
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(agent.channel("reader").await);
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            id: id.into(),
            from_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        while stream.message().await.unwrap().is_some() {}
    })
    .await
    .expect("operation ends within 2 minutes");
    ops.get_operation(pb::GetOperationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

fn state(op: &pb::Operation) -> pb::OperationState {
    pb::OperationState::try_from(op.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_change_restore_gives_back_exactly_the_data() {
    let Some(w) = world().await else { return };
    let users_before = dump_table(&w.pg, "users");
    let invoices_before = dump_table(&w.pg, "billing.invoices");

    // covetctl follows the operation and exits 0.
    let out = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "create", "covet"]);
    let op = out.assert_ok().json();
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let id = op["backup_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("covet-"), "{id}");

    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    let b = &list["backups"][0];
    assert_eq!(b["id"], id.as_str());
    let files: Vec<&str> = b["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        vec![
            "00-app.tar.zst",
            "01-venv.tar.zst",
            "02-production.env.tar.zst",
            "database.dump.zst"
        ]
    );
    assert_eq!(b["database"]["row_counts"]["public.users"], 500);
    assert_eq!(b["database"]["row_counts"]["billing.invoices"], 120);
    assert!(
        b["database"]["server_version"]
            .as_str()
            .unwrap()
            .starts_with("15")
    );

    // GNU tar reads what we wrote.
    let backup_dir = w.agent.dir.join("backups/covet").join(&id);
    let listing = std::process::Command::new("tar")
        .args(["-I", "zstd", "-tf"])
        .arg(backup_dir.join("00-app.tar.zst"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("app/covet/__init__.py"));

    // Change everything.
    w.pg.psql(DB, "DELETE FROM users WHERE id % 3 = 0; UPDATE billing.invoices SET amount = 0; CREATE TABLE junk(x int);").unwrap();
    std::fs::write(
        w.app_root.join("app/covet/__init__.py"),
        "VERSION = '0.2.0'\n",
    )
    .unwrap();
    std::fs::write(w.app_root.join("app/covet/new.py"), "x = 1\n").unwrap();
    std::fs::write(w.app_root.join("production.env"), "DATABASE_URL=changed\n").unwrap();

    let out = w.agent.ctl("admin", &["backup", "restore", &id]);
    out.assert_ok();
    assert!(out.stdout.contains("state: succeeded"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("kept as {DB}_before_")),
        "{}",
        out.stdout
    );

    assert_eq!(dump_table(&w.pg, "users"), users_before);
    assert_eq!(dump_table(&w.pg, "billing.invoices"), invoices_before);
    assert!(
        w.pg.psql(DB, "SELECT to_regclass('public.junk') IS NULL")
            .unwrap()
            .trim()
            == "t"
    );
    assert_eq!(
        std::fs::read_to_string(w.app_root.join("app/covet/__init__.py")).unwrap(),
        "VERSION = '0.1.9'\n"
    );
    assert!(!w.app_root.join("app/covet/new.py").exists());
    assert_eq!(
        std::fs::read_link(w.app_root.join("app/entry.py")).unwrap(),
        PathBuf::from("covet/__init__.py")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(w.app_root.join("venv/bin/covet"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(
        std::fs::read_to_string(w.app_root.join("production.env"))
            .unwrap()
            .contains("DATABASE_URI=")
    );
    // No staging or replaced trees are left next to the targets.
    let leftovers: Vec<String> = std::fs::read_dir(&w.app_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The audit log names who restored what.
    let record = w
        .agent
        .wait_audit(|r| r["rpc"] == "/covet.agent.v1.BackupService/RestoreBackup")
        .await;
    assert_eq!(record["caller_cn"], "admin");
    assert_eq!(record["target"], format!("backup={id}"));
}

fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    let end = (mid + 64).min(bytes.len());
    for b in &mut bytes[mid..end] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_backup_fails_verify_and_is_refused_for_restore() {
    let Some(w) = world().await else { return };
    let op = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "create", "covet"])
        .assert_ok()
        .json();
    let id = op["backup_id"].as_str().unwrap().to_owned();
    let ok = w.agent.ctl("operator", &["backup", "verify", &id]);
    ok.assert_ok();
    assert!(ok.stdout.contains("TOC entries"), "{}", ok.stdout);

    let dir = w.agent.dir.join("backups/covet").join(&id);
    corrupt(&dir.join("database.dump.zst"));
    let bad = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "verify", &id]);
    assert_eq!(bad.code, 1);
    let op = bad.json();
    assert_eq!(op["state"], "failed");
    assert!(
        op["cause"]
            .as_str()
            .unwrap()
            .contains("database.dump.zst does not match its checksum"),
        "{op:#}"
    );

    let before = dump_table(&w.pg, "users");
    let mut client =
        pb::backup_service_client::BackupServiceClient::new(w.agent.channel("admin").await);
    let status = client
        .restore_backup(pb::RestoreBackupRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("refusing to restore"),
        "{}",
        status.message()
    );
    assert_eq!(dump_table(&w.pg, "users"), before);

    // An archive whose checksum was "fixed up" still fails its test-read.
    let op = w
        .agent
        .ctl(
            "operator",
            &["-o", "json", "backup", "create", "covet", "--no-db"],
        )
        .assert_ok()
        .json();
    let id2 = op["backup_id"].as_str().unwrap().to_owned();
    let dir2 = w.agent.dir.join("backups/covet").join(&id2);
    let archive = dir2.join("01-venv.tar.zst");
    corrupt(&archive);
    let sum = covet_agent::backup::sha256_file(&archive).await.unwrap();
    let manifest_path = dir2.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"][1]["sha256"] = sum.into();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let bad = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "verify", &id2]);
    assert_eq!(bad.code, 1);
    assert!(
        bad.json()["cause"].as_str().unwrap().contains("damaged"),
        "{}",
        bad.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_archive_in_a_backup_is_refused_and_nothing_changes() {
    let Some(w) = world().await else { return };
    let op = w
        .agent
        .ctl(
            "operator",
            &["-o", "json", "backup", "create", "covet", "--no-db"],
        )
        .assert_ok()
        .json();
    let id = op["backup_id"].as_str().unwrap().to_owned();
    let dir = w.agent.dir.join("backups/covet").join(&id);
    // Replace the app archive with one that escapes through `..`, with a matching checksum.
    let archive = dir.join("00-app.tar.zst");
    let file = std::fs::File::create(&archive).unwrap();
    let mut builder = tar::Builder::new(zstd::Encoder::new(file, 3).unwrap().auto_finish());
    let mut header = tar::Header::new_gnu();
    let evil = b"app/../../escaped.txt";
    header.as_gnu_mut().unwrap().name[..evil.len()].copy_from_slice(evil);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, &b"evil"[..]).unwrap();
    drop(builder.into_inner().unwrap());
    let sum = covet_agent::backup::sha256_file(&archive).await.unwrap();
    let manifest_path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"][0]["sha256"] = sum.into();
    manifest["files"][0]["size"] = std::fs::metadata(&archive).unwrap().len().into();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    std::fs::write(
        w.app_root.join("app/covet/__init__.py"),
        "VERSION = 'live'\n",
    )
    .unwrap();
    let out = w.agent.ctl(
        "admin",
        &["-o", "json", "backup", "restore", &id, "--files-only"],
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    let op = out.json();
    assert_eq!(op["state"], "failed");
    assert!(op["cause"].as_str().unwrap().contains(".."), "{op:#}");
    assert_eq!(
        std::fs::read_to_string(w.app_root.join("app/covet/__init__.py")).unwrap(),
        "VERSION = 'live'\n"
    );
    assert!(!w.app_root.parent().unwrap().join("escaped.txt").exists());
    assert!(!w.app_root.join("escaped.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_up_front_and_keeps_earlier_backups() {
    let dir = sandbox_dir("fulldisk");
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let Some(w) = world_with("", Some(&mnt)).await else {
        return;
    };
    // A first, small backup fits.
    let first = w
        .agent
        .ctl(
            "operator",
            &["-o", "json", "backup", "create", "covet", "--no-db"],
        )
        .assert_ok()
        .json();
    let first_id = first["backup_id"].as_str().unwrap().to_owned();
    // Then the app grows past the disk.
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(w.app_root.join("app/blob.bin"), big).unwrap();
    let mut client =
        pb::backup_service_client::BackupServiceClient::new(w.agent.channel("operator").await);
    let status = client
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            skip_database: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("not enough space"),
        "{}",
        status.message()
    );
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list"])
        .assert_ok()
        .json();
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![first_id.as_str()]);
    let partials: Vec<_> = std::fs::read_dir(mnt.join("covet"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with('.').then_some(n)
        })
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_leaves_no_valid_entry_and_the_lock_is_exclusive() {
    let Some(mut w) = world().await else { return };
    // Enough incompressible data that the backup takes a while.
    let big: Vec<u8> = (0..200_000_000u64)
        .map(|i| (i.wrapping_mul(0x9E3779B97F4A7C15) >> 29) as u8)
        .collect();
    std::fs::write(w.app_root.join("app/blob.bin"), big).unwrap();
    let mut client =
        pb::backup_service_client::BackupServiceClient::new(w.agent.channel("operator").await);
    let op = client
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = client
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains(&op.id), "{}", status.message());

    // Killed as soon as the partial backup is on disk: a fixed pause lost
    // the race on a fast run (the backup had finished).
    let partial_dir = w.agent.dir.join("backups/covet");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&partial_dir).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            std::time::Instant::now() < until,
            "no partial backup appeared"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w.agent.signal(libc::SIGKILL);
    w.agent.restart().await;
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list"])
        .assert_ok()
        .json();
    assert!(list["backups"].as_array().unwrap().is_empty(), "{list:#}");
    let leftovers: Vec<_> = std::fs::read_dir(w.agent.dir.join("backups/covet"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "partial backups are swept at start");
    let shown = w
        .agent
        .ctl("reader", &["-o", "json", "ops", "show", &op.id])
        .assert_ok()
        .json();
    assert_eq!(shown["state"], "failed");
    assert!(
        shown["cause"]
            .as_str()
            .unwrap()
            .contains("interrupted by an agent restart"),
        "{shown:#}"
    );
    // The lock died with the old process.
    let again = client_after_restart(&w.agent).await;
    assert_eq!(
        state(&wait_op(&w.agent, &again).await),
        pb::OperationState::Succeeded
    );
}

async fn client_after_restart(agent: &TestAgent) -> String {
    let mut client =
        pb::backup_service_client::BackupServiceClient::new(agent.channel("operator").await);
    std::fs::remove_file(agent_app_blob(agent)).ok();
    client
        .create_backup(pb::CreateBackupRequest {
            app: "covet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

fn agent_app_blob(agent: &TestAgent) -> PathBuf {
    agent.dir.parent().unwrap().join("opt/app/blob.bin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_prune_delete_and_gzip_mode() {
    let Some(w) = world_with("[app.retention]\nkeep_last = 1", None).await else {
        return;
    };
    let first = w
        .agent
        .ctl(
            "operator",
            &[
                "-o",
                "json",
                "backup",
                "create",
                "covet",
                "--compression",
                "gzip",
            ],
        )
        .assert_ok()
        .json();
    let first_id = first["backup_id"].as_str().unwrap().to_owned();
    let dir = w.agent.dir.join("backups/covet").join(&first_id);
    // gzip archives are plain tar.gz.
    let listing = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(dir.join("00-app.tar.gz"))
        .output()
        .unwrap();
    assert!(listing.status.success());
    assert!(String::from_utf8_lossy(&listing.stdout).contains("app/covet/static/site.css"));

    let to = w.agent.dir.join("dump.zst");
    let out = w.agent.ctl(
        "admin",
        &[
            "backup",
            "download",
            &first_id,
            "--file",
            "database.dump.zst",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    out.assert_ok();
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(dir.join("database.dump.zst")).unwrap()
    );
    let whole = w.agent.dir.join("whole.tar");
    w.agent
        .ctl(
            "admin",
            &[
                "backup",
                "download",
                &first_id,
                "--to",
                whole.to_str().unwrap(),
            ],
        )
        .assert_ok();
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&whole)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains(&format!("{first_id}/manifest.json"))
    );
    let denied = w.agent.ctl(
        "operator",
        &[
            "backup",
            "download",
            &first_id,
            "--to",
            whole.to_str().unwrap(),
        ],
    );
    assert_eq!(denied.code, 1);
    assert!(
        denied.stderr.contains("needs covet:admin"),
        "{}",
        denied.stderr
    );

    let second = w
        .agent
        .ctl(
            "operator",
            &["-o", "json", "backup", "create", "covet", "--no-db"],
        )
        .assert_ok()
        .json();
    let second_id = second["backup_id"].as_str().unwrap().to_owned();
    w.agent
        .ctl("operator", &["backup", "prune", "covet"])
        .assert_ok();
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list"])
        .assert_ok()
        .json();
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![second_id.as_str()],
        "keep_last = 1 keeps only the newest"
    );

    let out = w.agent.ctl("admin", &["backup", "delete", &second_id]);
    out.assert_ok();
    let missing = w.agent.ctl("admin", &["backup", "show", &second_id]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("no backup"), "{}", missing.stderr);
    let bad = w.agent.ctl("admin", &["backup", "show", "../../etc"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("is not a backup id"), "{}", bad.stderr);
}
