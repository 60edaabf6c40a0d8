//! MySQL/MariaDB as the app's database, end to end against a real MariaDB
//! server (tests/src/mariadb.rs): covet_agent::db's dump while a real
//! writer inserts, row counts of exactly what the dump holds, verification,
//! the restore into a side schema and its one-RENAME swap (triggers, views,
//! routines and events carried, the previous tables kept), the checks that
//! refuse bad inputs before anything changes; then the agent with the
//! sample app on MariaDB: upgrade, rollback of a broken release, kill -9
//! during the migration, download.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use covet_agent::db::{ClientPrograms, DbError, Kind, MysqlTarget};
use covet_tests::mariadb::{MariaDb, mariadb_or_skip};
use covet_tests::sandbox_dir;

const APP_DB: &str = "covet_production";
const AGENT_USER: &str = "covet_agent";
const AGENT_PASSWORD: &str = "s3cret'pw";
const LIMIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"
CREATE TABLE users (id INT PRIMARY KEY AUTO_INCREMENT, email VARCHAR(200) NOT NULL UNIQUE,
  note TEXT, avatar BLOB) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE invoices (id BIGINT PRIMARY KEY AUTO_INCREMENT, user_id INT NOT NULL,
  amount DECIMAL(10,2) NOT NULL, FOREIGN KEY (user_id) REFERENCES users (id)) ENGINE=InnoDB;
CREATE TABLE `Weird ``Name` (`a b` TEXT, `x` INT) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE empty_one (x INT);
CREATE TABLE events (id BIGINT PRIMARY KEY AUTO_INCREMENT, payload TEXT NOT NULL);
INSERT INTO users (email, note, avatar)
  SELECT CONCAT('user', seq, '@example.com'),
         CASE WHEN seq % 7 = 0 THEN NULL ELSE CONCAT('it''s (', seq, '),\n;\\ "q"') END,
         CASE WHEN seq % 5 = 0 THEN X'00FF0A27' ELSE NULL END
  FROM seq_1_to_500;
INSERT INTO invoices (user_id, amount) SELECT seq % 500 + 1, seq * 1.25 FROM seq_1_to_2000;
INSERT INTO `Weird ``Name` VALUES ('x', 1), ('y|z', 2), (NULL, 3), ('new\nline', 4), ('été', 5);
CREATE VIEW big_spenders AS
  SELECT u.email, SUM(i.amount) AS total FROM users u JOIN invoices i ON i.user_id = u.id
  GROUP BY u.email HAVING SUM(i.amount) > 4000;
CREATE TRIGGER users_lower BEFORE INSERT ON users FOR EACH ROW
  BEGIN SET NEW.email = LOWER(NEW.email); END;
CREATE PROCEDURE user_count(OUT n INT) BEGIN SELECT COUNT(*) INTO n FROM users; END;
CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2;
CREATE PROCEDURE log_event() BEGIN
INSERT INTO `events` VALUES (NULL, 'a body line, not a row of the dump'); END;
CREATE EVENT purge_events ON SCHEDULE EVERY 1 DAY DISABLE DO DELETE FROM events;
"#;

/// A server with the app's database (SCHEMA, made by the app's account) and
/// the agent's account (every privilege, password in a defaults file).
struct World {
    my: MariaDb,
    target: MysqlTarget,
    dir: tempfile::TempDir,
}

fn world(prefix: &str) -> Option<World> {
    let dir = sandbox_dir(prefix);
    let my = mariadb_or_skip(dir.path())?;
    my.create_db(APP_DB, "covet_app", "app-pw").unwrap();
    // The SCHEMA's statements with bodies: one client run, `;;` ends them.
    my.sql(
        APP_DB,
        &format!("DELIMITER ;;\n{}", SCHEMA.replace(";\n", ";;\n")),
    )
    .unwrap();
    my.create_user(
        AGENT_USER,
        &AGENT_PASSWORD.replace('\'', "''"),
        &["ALL PRIVILEGES ON *.*"],
    )
    .unwrap();
    let defaults = dir.path().join("agent.cnf");
    my.defaults_file(&defaults, AGENT_USER, AGENT_PASSWORD)
        .unwrap();
    let target = MysqlTarget {
        dbname: APP_DB.into(),
        socket: None,
        host: None,
        port: None,
        user: None,
        defaults_file: Some(defaults),
        os_user: None,
        programs: ClientPrograms::discover().unwrap(),
    };
    Some(World { my, target, dir })
}

impl World {
    fn dump_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn q(&self, db: &str, sql: &str) -> String {
        self.my.sql(db, sql).unwrap()
    }

    /// Everything a restore must give back, table by table, as text.
    fn contents(&self, db: &str) -> BTreeMap<String, String> {
        let tables = self.q(
            "",
            &format!(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' \
                 AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1"
            ),
        );
        tables
            .lines()
            .map(|t| {
                let q = t.replace('`', "``");
                let rows = self.q(db, &format!("SELECT * FROM `{q}` ORDER BY 1"));
                let def = self.q(db, &format!("SHOW CREATE TABLE `{q}`"));
                // AUTO_INCREMENT counters differ with the writer's rows.
                let def: String = def
                    .split(' ')
                    .filter(|w| !w.starts_with("AUTO_INCREMENT="))
                    .collect::<Vec<_>>()
                    .join(" ");
                let checksum = self.q(db, &format!("CHECKSUM TABLE `{q}`"));
                let checksum = checksum.split('\t').nth(1).unwrap_or_default().to_owned();
                (t.to_owned(), format!("{def}\n{rows}\nchecksum {checksum}"))
            })
            .collect()
    }

    /// The schema's triggers, views, routines and events, by name.
    fn objects(&self, db: &str) -> String {
        self.q(
            "",
            &format!(
                "SELECT 'trigger', TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS \
                   WHERE TRIGGER_SCHEMA = '{db}' \
                 UNION ALL SELECT 'view', TABLE_NAME, '' FROM information_schema.VIEWS \
                   WHERE TABLE_SCHEMA = '{db}' \
                 UNION ALL SELECT ROUTINE_TYPE, ROUTINE_NAME, '' FROM information_schema.ROUTINES \
                   WHERE ROUTINE_SCHEMA = '{db}' \
                 UNION ALL SELECT 'event', EVENT_NAME, STATUS FROM information_schema.EVENTS \
                   WHERE EVENT_SCHEMA = '{db}' ORDER BY 1, 2"
            ),
        )
    }

    fn schemas(&self) -> Vec<String> {
        self.q(
            "",
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'covet%' \
             ORDER BY 1",
        )
        .lines()
        .map(str::to_owned)
        .collect()
    }

    async fn dump(&self, dest: &Path) -> covet_agent::db::Dumped {
        let progress = std::sync::Mutex::new(0u64);
        let on_bytes = |n: u64| *progress.lock().unwrap() = n;
        let dumped = self
            .target
            .dump(dest, LIMIT, &on_bytes, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(
            *progress.lock().unwrap(),
            dumped.stats.uncompressed_bytes,
            "progress reaches the end"
        );
        assert_eq!(
            dumped.stats.compressed_bytes,
            std::fs::metadata(dest).unwrap().len()
        );
        dumped
    }
}

/// Inserts batches of 20 rows into `events`, one transaction each, until
/// stopped; the rows it inserted.
fn writer(my: &MariaDb, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let socket = my.socket();
    std::thread::spawn(move || {
        let mut n = 0;
        let batch: Vec<String> = (0..20).map(|i| format!("(REPEAT('w{i}', 50))")).collect();
        let sql = format!(
            "START TRANSACTION; INSERT INTO events (payload) VALUES {}; COMMIT;",
            batch.join(", ")
        );
        while !stop.load(Ordering::SeqCst) {
            let status = std::process::Command::new("/usr/bin/mariadb")
                .args(["--no-defaults", "--user=root", "--database", APP_DB])
                .arg(format!("--socket={}", socket.display()))
                .args(["-e", &sql])
                .status()
                .unwrap();
            assert!(status.success());
            n += 20;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_while_a_writer_inserts_counts_what_it_holds_and_the_restore_swaps_it_in() {
    let Some(w) = world("mysql-roundtrip") else {
        return;
    };
    assert!(w.target.check(LIMIT).await.unwrap().contains("MariaDB"));
    let stop = Arc::new(AtomicBool::new(false));
    let inserting = writer(&w.my, Arc::clone(&stop));
    while w.q(APP_DB, "SELECT COUNT(*) FROM events").trim() == "0" {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dest = w.dump_path("db.sql.zst");
    let dumped = w.dump(&dest).await;
    stop.store(true, Ordering::SeqCst);
    let inserted = inserting.join().unwrap();
    let counts = &dumped.row_counts;
    assert_eq!(counts["users"], 500);
    assert_eq!(counts["invoices"], 2000);
    assert_eq!(counts["Weird `Name"], 5);
    assert_eq!(counts["empty_one"], 0);
    let events = counts["events"];
    assert!(
        events > 0 && events < inserted && events % 20 == 0,
        "the dump is one snapshot taken mid-write: {events} of {inserted}, whole transactions"
    );
    assert!(!counts.contains_key("big_spenders"), "views are not tables");
    assert_eq!(
        covet_agent::db::mysql::verify_dump(&dest, counts)
            .await
            .unwrap(),
        5
    );
    let mut wrong = counts.clone();
    wrong.insert("users".into(), 499);
    assert!(matches!(
        covet_agent::db::mysql::verify_dump(&dest, &wrong).await,
        Err(DbError::CountMismatch { .. })
    ));

    // What the dump holds, then changes after it.
    // The writer's rows after the snapshot go: the ids are in commit order.
    let last = w.q(
        APP_DB,
        &format!(
            "SELECT id FROM events ORDER BY id LIMIT 1 OFFSET {}",
            events - 1
        ),
    );
    w.q(
        APP_DB,
        &format!("DELETE FROM events WHERE id > {}", last.trim()),
    );
    let before = w.contents(APP_DB);
    let before_objects = w.objects(APP_DB);
    w.q(
        APP_DB,
        "DELETE FROM invoices WHERE id % 3 = 0; UPDATE users SET note = 'changed' WHERE id < 50; \
         CREATE TABLE added_later (y TEXT); INSERT INTO added_later VALUES ('after'); \
         DROP TRIGGER users_lower; \
         CREATE TRIGGER users_upper BEFORE INSERT ON users FOR EACH ROW SET NEW.email = UPPER(NEW.email); \
         DROP VIEW big_spenders; CREATE VIEW late_view AS SELECT y FROM added_later; \
         DROP FUNCTION twice;",
    );
    let changed = w.contents(APP_DB);
    let changed_objects = w.objects(APP_DB);
    assert_ne!(changed, before);

    let outcome = w
        .target
        .restore_swap(&dest, "r1", counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(outcome.kept_as, "covet_production_before_r1");
    assert_eq!(
        w.contents(APP_DB),
        before,
        "the rows and tables of the dump"
    );
    assert_eq!(
        w.objects(APP_DB),
        before_objects,
        "its triggers, views, routines, events"
    );
    // They work on the live tables.
    w.q(
        APP_DB,
        "INSERT INTO users (email) VALUES ('LOUD@EXAMPLE.COM')",
    );
    assert_eq!(
        w.q(
            APP_DB,
            "SELECT COUNT(*) FROM users WHERE email = 'loud@example.com'"
        )
        .trim(),
        "1"
    );
    assert_eq!(w.q(APP_DB, "SELECT twice(21)").trim(), "42");
    assert_eq!(w.q(APP_DB, "CALL user_count(@n); SELECT @n").trim(), "501");
    assert!(
        !w.q(APP_DB, "SELECT COUNT(*) FROM big_spenders")
            .trim()
            .is_empty()
    );
    // The previous tables, their triggers and views, kept as they were.
    let kept = &outcome.kept_as;
    assert_eq!(w.contents(kept), changed);
    let kept_objects = w.objects(kept);
    assert!(kept_objects.contains("users_upper"), "{kept_objects}");
    assert!(kept_objects.contains("late_view"), "{kept_objects}");
    assert!(
        !kept_objects.lines().any(|l| l.starts_with("event\t")),
        "no events in the kept schema: {kept_objects}"
    );
    assert!(changed_objects.contains("users_upper"));
    w.q(kept, "INSERT INTO users (email) VALUES ('Kept@x')");
    assert_eq!(
        w.q(kept, "SELECT COUNT(*) FROM users WHERE email = 'KEPT@X'")
            .trim(),
        "1",
        "the kept trigger is on the kept table"
    );
    assert_eq!(w.q(kept, "SELECT COUNT(*) FROM late_view").trim(), "1");
    assert_eq!(
        w.schemas(),
        [APP_DB, "covet_production_before_r1"],
        "the restore schema is gone"
    );
    // Run again with the same id (a crash after the swap): nothing happens.
    let again = w
        .target
        .restore_swap(&dest, "r1", counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(again.kept_as, outcome.kept_as);
    assert_eq!(w.contents(kept).len(), changed.len());
    w.target.drop_kept(kept, LIMIT).await.unwrap();
    assert_eq!(w.schemas(), [APP_DB]);
    assert!(matches!(
        w.target.drop_kept("covet_production", LIMIT).await,
        Err(DbError::InvalidName { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_swap_is_finished_or_undone_by_a_run_with_the_same_id() {
    let Some(w) = world("mysql-resume") else {
        return;
    };
    let dest = w.dump_path("db.sql.zst");
    let dumped = w.dump(&dest).await;
    let before = w.contents(APP_DB);
    let objects = w.objects(APP_DB);
    // A restore that failed after it wrote its plan and dropped the live
    // triggers and views (as a crash there leaves it).
    w.q(APP_DB, "DELETE FROM invoices WHERE id > 10");
    let changed = w.contents(APP_DB);
    let counts_now = BTreeMap::from([("invoices".to_owned(), 10u64)]);
    let err = w
        .target
        .restore_swap_checked(&dest, "r2", &counts_now, LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::CountMismatch { .. }), "{err}");
    assert_eq!(
        w.contents(APP_DB),
        changed,
        "a refused restore changes nothing"
    );
    assert_eq!(w.objects(APP_DB), objects);
    assert_eq!(w.schemas(), [APP_DB], "nothing left beside it");

    // A crash between the drop of the live triggers and views and the
    // rename: the plan of that run in its restore schema, the trigger and
    // the view gone from the live schema. A run with the same id puts them
    // back, then restores.
    w.q(
        "",
        "CREATE DATABASE covet_production_restore_r3; \
         CREATE TABLE covet_production_restore_r3._covet_swap (seq INT PRIMARY KEY, \
           phase VARCHAR(16) NOT NULL, db VARCHAR(64) NOT NULL, sql_mode TEXT NOT NULL, \
           stmt LONGTEXT NOT NULL); \
         CREATE TABLE covet_production_restore_r3.users (id INT); \
         INSERT INTO covet_production_restore_r3._covet_swap VALUES \
           (0, 'live_table', '', '', 'users'), (1, 'fresh_table', '', '', 'users'), \
           (2, 'undo', 'covet_production', '', 'CREATE TRIGGER users_lower BEFORE INSERT ON users \
              FOR EACH ROW BEGIN SET NEW.email = LOWER(NEW.email); END'), \
           (3, 'undo', 'covet_production', '', 'CREATE VIEW big_spenders AS SELECT 1 AS x'); \
         DROP TRIGGER covet_production.users_lower; DROP VIEW covet_production.big_spenders;",
    );
    assert_ne!(w.objects(APP_DB), objects);
    let restored = w
        .target
        .restore_swap_checked(&dest, "r3", &dumped.row_counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(restored.kept_as, "covet_production_before_r3");
    assert_eq!(w.contents(APP_DB), before);
    assert_eq!(w.objects(APP_DB), objects);
    assert_eq!(w.contents(&restored.kept_as), changed);
    let kept_objects = w.objects(&restored.kept_as);
    assert!(kept_objects.contains("users_lower"), "{kept_objects}");
    assert!(kept_objects.contains("big_spenders"), "{kept_objects}");

    // A crash right after the rename: the tables moved, the plan's last
    // steps not run. A run with the same id runs them and is done, without
    // restoring again.
    w.q(
        "",
        "CREATE DATABASE covet_production_before_r4; \
         RENAME TABLE covet_production.events TO covet_production_before_r4.events; \
         CREATE TABLE covet_production.events (id BIGINT PRIMARY KEY, payload TEXT NOT NULL); \
         INSERT INTO covet_production.events VALUES (7, 'moved in'); \
         CREATE DATABASE covet_production_restore_r4; \
         CREATE TABLE covet_production_restore_r4._covet_swap (seq INT PRIMARY KEY, \
           phase VARCHAR(16) NOT NULL, db VARCHAR(64) NOT NULL, sql_mode TEXT NOT NULL, \
           stmt LONGTEXT NOT NULL); \
         INSERT INTO covet_production_restore_r4._covet_swap VALUES \
           (0, 'live_table', '', '', 'events'), (1, 'fresh_table', '', '', 'events'), \
           (2, 'after', 'covet_production', '', 'DROP VIEW IF EXISTS recent_events'), \
           (3, 'after', 'covet_production', '', 'CREATE VIEW recent_events AS SELECT id FROM events');",
    );
    let finished = w
        .target
        .restore_swap_checked(&dest, "r4", &dumped.row_counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(finished.kept_as, "covet_production_before_r4");
    assert_eq!(w.q(APP_DB, "SELECT id FROM recent_events").trim(), "7");
    assert!(
        !w.schemas()
            .contains(&"covet_production_restore_r4".to_owned()),
        "{:?}",
        w.schemas()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_servers_privileges_and_dumps_are_refused_before_anything_changes() {
    let Some(w) = world("mysql-bad") else {
        return;
    };
    let before = w.contents(APP_DB);
    let with = |change: &dyn Fn(&mut MysqlTarget)| {
        let mut t = w.target.clone();
        change(&mut t);
        t
    };
    let cnf = |name: &str, user: &str, password: &str| {
        let path = w.dir.path().join(name);
        w.my.defaults_file(&path, user, password).unwrap();
        path
    };
    // A wrong password.
    let wrong = cnf("wrong.cnf", AGENT_USER, "not-it");
    let e = with(&|t| t.defaults_file = Some(wrong.clone()))
        .check(LIMIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Access denied for user 'covet_agent'"), "{e}");
    // No server on that socket.
    let e = with(&|t| t.socket = Some(w.dir.path().join("no-such.sock")))
        .check(LIMIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Can't connect") && e.contains("no-such.sock"),
        "{e}"
    );
    // A reader that may not see the triggers, routines and events.
    w.my.create_user("reader", "r-pw", &["SELECT ON covet_production.*"])
        .unwrap();
    let reader = cnf("reader.cnf", "reader", "r-pw");
    let e = with(&|t| t.defaults_file = Some(reader.clone()))
        .check(LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::MysqlPrivileges { .. }), "{e}");
    assert!(
        e.to_string().contains("cannot dump covet_production"),
        "{e}"
    );
    // An unknown database.
    let e = with(&|t| t.dbname = "covet_nope".into())
        .check(LIMIT)
        .await
        .unwrap_err();
    assert!(
        matches!(e, DbError::NoSuchDatabase(ref n) if n == "covet_nope"),
        "{e}"
    );
    // A credentials file others can read.
    let open = cnf("open.cnf", AGENT_USER, AGENT_PASSWORD);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = with(&|t| t.defaults_file = Some(open.clone()))
        .check(LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::NotPrivate(_)), "{e}");
    // A failed dump leaves no file.
    let dest = w.dump_path("failed.sql.zst");
    let e = with(&|t| t.defaults_file = Some(wrong.clone()))
        .dump(&dest, LIMIT, &|_| {}, &AtomicBool::new(false))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Access denied"), "{e}");
    assert!(!dest.exists());

    // Format options in an option file do not change what the dump is.
    let odd = cnf("odd.cnf", AGENT_USER, AGENT_PASSWORD);
    let mut text = std::fs::read_to_string(&odd).unwrap();
    text.push_str(
        "force\n[mysqldump]\ncomplete-insert\ninsert-ignore\nskip-comments\nskip-extended-insert\n",
    );
    std::fs::write(&odd, text).unwrap();
    let dest = w.dump_path("odd.sql.zst");
    let dumped = with(&|t| t.defaults_file = Some(odd.clone()))
        .dump(&dest, LIMIT, &|_| {}, &AtomicBool::new(false))
        .await
        .unwrap();
    assert_eq!(dumped.row_counts["users"], 500);
    assert_eq!(dumped.row_counts["invoices"], 2000);

    // A damaged dump: refused by verify and restore, the live db untouched.
    let dest = w.dump_path("db.sql.zst");
    let dumped = w.dump(&dest).await;
    let mut bytes = std::fs::read(&dest).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&dest, &bytes).unwrap();
    let e = w
        .target
        .restore_swap(&dest, "bad", &dumped.row_counts, LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(e, DbError::CorruptDump { .. }), "{e}");
    assert_eq!(w.contents(APP_DB), before);
    assert_eq!(w.schemas(), [APP_DB]);
}

// ---------------------------------------------------------------------------
// The agent, with the sample app on MariaDB

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::http::wait_healthy;
use covet_tests::mysql_app;
use covet_tests::opwait::{
    ctl_upgrade, upgrade_killed_during_migrate, upgrade_then_roll_back_broken,
};
use covet_tests::sampleapp::{DB_NAME, SampleApp};
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip, start_app_and_agent};

const UNIT: &str = "covet.service";
const RENAME: [&str; 2] = ["--env-rename", "DATABASE_URI=DATABASE_URL"];

struct AppWorld {
    agent: TestAgent,
    sandbox: SystemdSandbox,
    app: SampleApp,
    my: MariaDb,
    _dir: tempfile::TempDir,
}

async fn app_world(prefix: &str) -> Option<AppWorld> {
    let dir = sandbox_dir(prefix);
    let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
    let my = mariadb_or_skip(dir.path())?;
    let (app, defaults) = mysql_app::install(&dir.path().join("app"), &my, 25).unwrap();
    let toml = mysql_app::agent_toml(&app, &defaults);
    let agent = start_app_and_agent(&sandbox, &app, &toml, &dir.path().join("agent")).await;
    Some(AppWorld {
        agent,
        sandbox,
        app,
        my,
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
        let q = |sql: &str| self.my.sql(DB_NAME, sql).unwrap();
        Snapshot {
            rows: q("SELECT * FROM users ORDER BY id"),
            schema: q("SHOW CREATE TABLE users")
                .split(' ')
                .filter(|w| !w.starts_with("AUTO_INCREMENT="))
                .collect::<Vec<_>>()
                .join(" "),
            migrations: q("SELECT name FROM covet_migrations ORDER BY 1"),
            env: std::fs::read(&self.app.env_file).unwrap(),
        }
    }

    fn upgrade(&self, version: &str, extra: &[&str]) -> covet_tests::agent::CtlOutput {
        ctl_upgrade(&self.agent, version, extra)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb_an_upgrade_succeeds_then_a_broken_release_rolls_back_exactly() {
    let Some(w) = app_world("mysql-app").await else {
        return;
    };
    upgrade_then_roll_back_broken(
        &w.agent,
        w.app.port,
        || w.snapshot(),
        |at_020| assert!(at_020.schema.contains("last_login"), "{}", at_020.schema),
    )
    .await;
    let kept =
        w.my.sql(
            "",
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
             WHERE SCHEMA_NAME LIKE 'covet\\_production\\_before\\_%'",
        )
        .unwrap();
    assert_eq!(
        kept.lines().count(),
        1,
        "the migrated tables are kept: {kept}"
    );
    let flags =
        w.my.sql(
            "",
            &format!(
                "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = '{}' \
                 AND TABLE_NAME = 'users' AND COLUMN_NAME = 'flags'",
                kept.trim()
            ),
        )
        .unwrap();
    assert_eq!(
        flags.trim(),
        "1",
        "the kept users table is the migrated one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb_kill_9_during_the_migration_rolls_back_on_restart() {
    let Some(mut w) = app_world("mysql-kill").await else {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb_backup_verify_restore_download_and_bad_credentials_through_the_agent() {
    let Some(w) = app_world("mysql-agent").await else {
        return;
    };
    let op = w
        .agent
        .ctl("operator", &["-o", "json", "backup", "create", "covet"])
        .assert_ok()
        .json();
    assert_eq!(op["state"], "succeeded", "{op:#}");
    let id = op["backup_id"].as_str().unwrap().to_owned();
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    let b = &list["backups"][0];
    assert_eq!(b["database"]["format"], "mysqldump-sql+zstd", "{b:#}");
    assert_eq!(b["database"]["row_counts"]["users"], 25, "{b:#}");
    assert_eq!(b["database"]["row_counts"]["covet_migrations"], 1, "{b:#}");
    w.agent
        .ctl("operator", &["backup", "verify", &id])
        .assert_ok();
    let before = w.snapshot();
    w.my.sql(DB_NAME, "DELETE FROM users WHERE id % 2 = 0")
        .unwrap();
    let _ = w.sandbox.systemctl(&["stop", UNIT]);
    let out = w.agent.ctl("admin", &["backup", "restore", &id]);
    out.assert_ok();
    assert!(
        out.stdout.contains("kept as covet_production_before_"),
        "{}",
        out.stdout
    );
    assert_eq!(w.snapshot(), before);

    let to = w.agent.dir.join("dump.zst");
    w.agent
        .ctl(
            "admin",
            &[
                "backup",
                "download",
                &id,
                "--file",
                "database.dump.zst",
                "--to",
                to.to_str().unwrap(),
            ],
        )
        .assert_ok();
    let sql = std::process::Command::new("zstd")
        .args(["-q", "-d", "-c"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(sql.status.success());
    let sql = String::from_utf8_lossy(&sql.stdout);
    assert!(sql.contains("CREATE TABLE `users`"), "a plain SQL dump");
    assert!(
        sql.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("-- Dump completed")
    );

    // A wrong password in the defaults file: refused before anything runs.
    let cnf = w.app.root.join("agent.cnf");
    w.my.defaults_file(&cnf, mysql_app::AGENT_USER, "wrong")
        .unwrap();
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
    assert!(e.message().contains("Access denied"), "{e:?}");
    let _ = w.sandbox.systemctl(&["start", UNIT]);
    wait_healthy(w.app.port, "0.1.9").await;
    let out = w.upgrade("0.2.0", &RENAME);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("Access denied"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(w.snapshot(), before, "nothing changed");
    let list = w
        .agent
        .ctl("reader", &["-o", "json", "backup", "list", "covet"])
        .assert_ok()
        .json();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list:#}");

    // check-config names the key of a bad value.
    let base = std::fs::read_to_string(&w.agent.config_path).unwrap();
    let path = w.agent.dir.join("check.toml");
    std::fs::write(
        &path,
        base.replace(
            "dbname = \"covet_production\"",
            "dbname = \"covet-production\"\nsocket = \"rel/sock\"",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(covet_tests::bin("covet-agent"))
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("database.dbname"), "{text}");
    assert!(
        text.contains("database.socket") && text.contains("absolute"),
        "{text}"
    );
}
