//! covet_agent::db against a real PostgreSQL cluster: dumps, verification,
//! restore-and-swap, and the ways they fail.
//!
//! The app's database `covet_production` is owned by `covet_app`, a login
//! role that is not a superuser, and so are its tables. The client programs
//! run as the system user `postgres`, as in production.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use covet_agent::db::{self, DbError, PgTarget};
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sandbox_dir;

const APP_DB: &str = "covet_production";
const APP_ROLE: &str = "covet_app";
const LIMIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"
SET ROLE covet_app;
CREATE SCHEMA billing;
CREATE TABLE public.users (id int PRIMARY KEY, name text NOT NULL, email text);
INSERT INTO public.users
  SELECT g, 'user ' || g, CASE WHEN g % 9 = 0 THEN NULL ELSE 'u' || g || '@example.com' END
  FROM generate_series(1, 500) g;
CREATE TABLE billing.invoices (
  id bigserial PRIMARY KEY,
  user_id int NOT NULL REFERENCES public.users,
  amount numeric(10, 2) NOT NULL,
  note text);
INSERT INTO billing.invoices (user_id, amount, note)
  SELECT g % 500 + 1, g * 1.25, 'line|' || E'\n' || g FROM generate_series(1, 2000) g;
CREATE TABLE billing."Weird Name" ("a b" text, "Quote""d" int);
INSERT INTO billing."Weird Name" VALUES ('x', 1), ('y|z', 2), (NULL, 3), (E'new\nline', 4);
CREATE TABLE public.empty_one (x int);
"#;

/// Owners after a restore: the database's and its tables'.
const APP_OWNED: [&str; 5] = [
    "database=covet_app",
    "billing.Weird Name=covet_app",
    "billing.invoices=covet_app",
    "public.empty_one=covet_app",
    "public.users=covet_app",
];

fn expected_counts() -> BTreeMap<String, u64> {
    [
        ("billing.Weird Name", 4),
        ("billing.invoices", 2000),
        ("public.empty_one", 0),
        ("public.users", 500),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The cluster with the app's database, or None when skipping.
fn app_cluster(dir: &Path) -> Option<PostgresCluster> {
    let pg = postgres_or_skip(dir)?;
    pg.create_db(APP_DB, APP_ROLE).unwrap();
    pg.psql(APP_DB, SCHEMA).unwrap();
    Some(pg)
}

fn target(pg: &PostgresCluster, dbname: &str, user: Option<&str>) -> PgTarget {
    PgTarget {
        dbname: dbname.to_owned(),
        host: Some(pg.socket_dir().to_string_lossy().into_owned()),
        port: Some(pg.port()),
        user: user.map(str::to_owned),
        os_user: Some("postgres".to_owned()),
        bindir: pg.bindir(),
    }
}

fn app_target(pg: &PostgresCluster) -> PgTarget {
    target(pg, APP_DB, Some(APP_ROLE))
}

/// Every row of every user table (and the sequence's position), as text.
fn contents(pg: &PostgresCluster, db: &str) -> BTreeMap<String, String> {
    let tables = pg
        .psql(
            db,
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1",
        )
        .unwrap();
    let mut all: BTreeMap<String, String> = tables
        .lines()
        .map(|table| {
            let rows = pg
                .psql(
                    db,
                    &format!("SELECT t::text FROM {table} t ORDER BY t::text COLLATE \"C\""),
                )
                .unwrap();
            (table.to_owned(), rows)
        })
        .collect();
    if all.contains_key("billing.invoices") {
        let seq = pg
            .psql(
                db,
                "SELECT last_value, is_called FROM billing.invoices_id_seq",
            )
            .unwrap();
        all.insert("sequence billing.invoices_id_seq".into(), seq);
    }
    all
}

fn databases(pg: &PostgresCluster) -> Vec<String> {
    pg.psql(
        "postgres",
        "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1",
    )
    .unwrap()
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Owners of the database and of its tables, "name=owner" each.
fn owners(pg: &PostgresCluster, db: &str) -> Vec<String> {
    let mut found = vec![
        pg.psql(
            "postgres",
            &format!(
                "SELECT 'database=' || pg_get_userbyid(datdba) FROM pg_database \
                 WHERE datname = '{db}'"
            ),
        )
        .unwrap(),
    ];
    found.extend(
        pg.psql(
            db,
            "SELECT schemaname || '.' || tablename || '=' || tableowner FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        )
        .unwrap()
        .lines()
        .map(str::to_owned),
    );
    found.iter().map(|s| s.trim().to_owned()).collect()
}

async fn take_dump(t: &PgTarget, dest: &Path) -> db::DumpStats {
    let progress = Mutex::new(Vec::new());
    let on_bytes = |n: u64| progress.lock().unwrap().push(n);
    let stats = db::dump(t, dest, LIMIT, &on_bytes, &AtomicBool::new(false))
        .await
        .unwrap();
    let progress = progress.into_inner().unwrap();
    assert_eq!(progress.last(), Some(&stats.uncompressed_bytes));
    assert!(progress.is_sorted(), "progress goes forward: {progress:?}");
    assert_eq!(
        stats.compressed_bytes,
        std::fs::metadata(dest).unwrap().len()
    );
    assert!(
        stats.compressed_bytes < stats.uncompressed_bytes,
        "{stats:?}"
    );
    stats
}

fn change_data(pg: &PostgresCluster) {
    pg.psql(
        APP_DB,
        "SET ROLE covet_app; \
         INSERT INTO public.users VALUES (1001, 'late', NULL); \
         DELETE FROM billing.invoices WHERE id % 3 = 0; \
         UPDATE public.users SET name = 'renamed' WHERE id < 50; \
         UPDATE billing.\"Weird Name\" SET \"a b\" = 'changed'; \
         INSERT INTO billing.invoices (user_id, amount) VALUES (1, 1); \
         CREATE TABLE public.added_later (y text); \
         INSERT INTO public.added_later VALUES ('after the backup');",
    )
    .unwrap();
}

/// A session on `db` that sits there until it is ended.
fn idle_session(pg: &PostgresCluster, db: &str) -> std::process::Child {
    let child = Command::new(pg.bindir().join("psql"))
        .args(["-X", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "-d", db])
        .args(["-c", "SELECT pg_sleep(600)"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let query = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep%' \
         AND pid <> pg_backend_pid()"
    );
    while pg.psql("postgres", &query).unwrap().trim() != "1" {
        assert!(
            Instant::now() < deadline,
            "the idle session did not connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn dump_path(dir: &Path) -> PathBuf {
    dir.join("db.dump.zst")
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_change_restore_swap_and_drop_kept() {
    let dir = sandbox_dir("db-roundtrip");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let t = app_target(&pg);
    let before = contents(&pg, APP_DB);
    let counts = db::row_counts(&t, LIMIT).await.unwrap();
    assert_eq!(counts, expected_counts());
    let dest = dump_path(dir.path());
    take_dump(&t, &dest).await;
    let toc = db::list_dump(&t, &dest, LIMIT).await.unwrap();
    assert!(
        toc.iter()
            .any(|l| l.contains("TABLE DATA billing invoices")),
        "{toc:#?}"
    );

    change_data(&pg);
    let changed = contents(&pg, APP_DB);
    assert_ne!(changed, before);
    let mut session = idle_session(&pg, APP_DB);

    let outcome = db::restore_swap(&t, &dest, "r1", &counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(outcome.kept_as, "covet_production_before_r1");
    assert!(
        wait_exit(&mut session, Duration::from_secs(10)),
        "the session on the old live database was not ended"
    );
    assert_eq!(contents(&pg, APP_DB), before, "the data is back exactly");
    assert_eq!(
        contents(&pg, &outcome.kept_as),
        changed,
        "the old db is kept"
    );
    assert_eq!(owners(&pg, APP_DB), APP_OWNED);
    assert_eq!(
        databases(&pg),
        ["covet_production", "covet_production_before_r1", "postgres"]
    );

    // The same id again (a rollback resumed after a crash): its swap
    // committed, so it is done, and nothing is touched.
    let again = db::restore_swap(&t, &dest, "r1", &counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(again.kept_as, "covet_production_before_r1");
    assert_eq!(contents(&pg, APP_DB), before);
    assert_eq!(contents(&pg, &outcome.kept_as), changed);

    db::drop_kept(&t, &outcome.kept_as, LIMIT).await.unwrap();
    assert_eq!(databases(&pg), ["covet_production", "postgres"]);
    // Idempotent: a kept db already dropped is fine.
    db::drop_kept(&t, &outcome.kept_as, LIMIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn superuser_restore_keeps_the_recorded_owners() {
    let dir = sandbox_dir("db-superuser");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    // No `user`: everything as the os_user's role, the superuser postgres.
    let t = target(&pg, APP_DB, None);
    let before = contents(&pg, APP_DB);
    let dest = dump_path(dir.path());
    take_dump(&t, &dest).await;
    change_data(&pg);
    let outcome = db::restore_swap(&t, &dest, "su", &expected_counts(), LIMIT)
        .await
        .unwrap();
    assert_eq!(contents(&pg, APP_DB), before);
    // Created by postgres, then given back to covet_app by pg_restore.
    assert_eq!(owners(&pg, APP_DB), APP_OWNED);
    assert_eq!(outcome.kept_as, "covet_production_before_su");
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_dumps_are_refused_and_nothing_changes() {
    let dir = sandbox_dir("db-corrupt");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let t = app_target(&pg);
    let good = dump_path(dir.path());
    take_dump(&t, &good).await;
    let bytes = std::fs::read(&good).unwrap();
    change_data(&pg);
    let live = contents(&pg, APP_DB);

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    for b in &mut flipped[middle..middle + 16] {
        *b ^= 0x5a;
    }
    let truncated = bytes[..bytes.len() * 3 / 4].to_vec();
    let last_byte_missing = bytes[..bytes.len() - 1].to_vec();
    for (name, damaged) in [
        ("flipped", flipped),
        ("truncated", truncated),
        ("last-byte", last_byte_missing),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, damaged).unwrap();
        let listed = db::list_dump(&t, &path, LIMIT).await;
        assert!(
            matches!(listed, Err(DbError::CorruptDump { .. })),
            "{name}: {listed:?}"
        );
        let restored = db::restore_swap(
            &t,
            &path,
            name.replace('-', "_").as_str(),
            &expected_counts(),
            LIMIT,
        )
        .await;
        assert!(
            matches!(restored, Err(DbError::CorruptDump { .. })),
            "{name}: {restored:?}"
        );
        assert_eq!(contents(&pg, APP_DB), live, "{name}: live db untouched");
        assert_eq!(databases(&pg), ["covet_production", "postgres"], "{name}");
        // Without the listing pass (a rollback's own dump), pg_restore
        // fails in the new database and the live one is untouched too.
        let restored = db::restore_swap_checked(
            &t,
            &path,
            &format!("{}_checked", name.replace('-', "_")),
            &expected_counts(),
            LIMIT,
        )
        .await;
        assert!(restored.is_err(), "{name}: {restored:?}");
        assert_eq!(contents(&pg, APP_DB), live, "{name}: live db untouched");
        assert_eq!(databases(&pg), ["covet_production", "postgres"], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_row_counts_abandon_the_restore() {
    let dir = sandbox_dir("db-counts");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let t = app_target(&pg);
    let dest = dump_path(dir.path());
    take_dump(&t, &dest).await;
    change_data(&pg);
    let live = contents(&pg, APP_DB);

    let mut wrong = expected_counts();
    wrong.insert("billing.invoices".into(), 1999);
    let restored = db::restore_swap(&t, &dest, "c1", &wrong, LIMIT).await;
    match restored {
        Err(DbError::CountMismatch {
            table,
            expected,
            got,
        }) => assert_eq!(
            (table.as_str(), expected, got),
            ("billing.invoices", 1999, 2000)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(contents(&pg, APP_DB), live);
    assert_eq!(databases(&pg), ["covet_production", "postgres"]);

    let mut missing = expected_counts();
    missing.insert("public.added_later".into(), 1);
    let restored = db::restore_swap(&t, &dest, "c2", &missing, LIMIT).await;
    assert!(
        matches!(&restored, Err(DbError::MissingTable { table, .. }) if table == "public.added_later"),
        "{restored:?}"
    );
    assert_eq!(contents(&pg, APP_DB), live);
    assert_eq!(databases(&pg), ["covet_production", "postgres"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_canceled_and_late_dumps_leave_no_file() {
    let dir = sandbox_dir("db-dumpfail");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let dest = dump_path(dir.path());
    let nowhere = target(&pg, "no_such_db", Some(APP_ROLE));
    let failed = db::dump(&nowhere, &dest, LIMIT, &|_| {}, &AtomicBool::new(false)).await;
    match failed {
        Err(DbError::Tool {
            program, stderr, ..
        }) => {
            assert_eq!(program, "pg_dump");
            assert!(stderr.contains("no_such_db"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!dest.exists());

    let t = app_target(&pg);
    let canceled = db::dump(&t, &dest, LIMIT, &|_| {}, &AtomicBool::new(true)).await;
    assert!(matches!(canceled, Err(DbError::Canceled)), "{canceled:?}");
    assert!(!dest.exists());

    let late = db::dump(
        &t,
        &dest,
        Duration::from_millis(1),
        &|_| {},
        &AtomicBool::new(false),
    )
    .await;
    assert!(matches!(late, Err(DbError::Timeout { .. })), "{late:?}");
    assert!(!dest.exists());

    // An existing file is never overwritten, nor removed.
    std::fs::write(&dest, "precious").unwrap();
    let exists = db::dump(&t, &dest, LIMIT, &|_| {}, &AtomicBool::new(false)).await;
    assert!(matches!(exists, Err(DbError::Io { .. })), "{exists:?}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_version_and_row_counts() {
    let dir = sandbox_dir("db-info");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let t = app_target(&pg);
    let version = db::server_version(&t, LIMIT).await.unwrap();
    assert_eq!(
        version,
        pg.psql("postgres", "SHOW server_version").unwrap().trim()
    );
    assert_eq!(db::row_counts(&t, LIMIT).await.unwrap(), expected_counts());
    let empty = target(&pg, "postgres", None);
    assert_eq!(
        db::row_counts(&empty, LIMIT).await.unwrap(),
        BTreeMap::new()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_are_validated() {
    let dir = sandbox_dir("db-names");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    let t = app_target(&pg);
    for kept in [
        "postgres",
        "covet_production",
        "covet_production_restore_x",
        "covet_production_before_",
        "covet_production_before_x\"; DROP DATABASE postgres; --",
        "other_before_x",
    ] {
        let refused = db::drop_kept(&t, kept, LIMIT).await;
        assert!(
            matches!(refused, Err(DbError::InvalidName { .. })),
            "{kept}: {refused:?}"
        );
    }
    let dest = dump_path(dir.path());
    let long_id = "x".repeat(50);
    for id in ["", "a-b", "a b", long_id.as_str()] {
        let refused = db::restore_swap(&t, &dest, id, &BTreeMap::new(), LIMIT).await;
        assert!(
            matches!(refused, Err(DbError::InvalidName { .. })),
            "{id:?}: {refused:?}"
        );
    }
    assert_eq!(databases(&pg), ["covet_production", "postgres"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pg_restore_leaves_the_live_db_alone() {
    let dir = sandbox_dir("db-restorefail");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    // A table the app role may not give to its owner: restoring as covet_app fails.
    pg.psql(
        APP_DB,
        "CREATE ROLE covet_other; CREATE TABLE public.foreign_owned (z int); \
         ALTER TABLE public.foreign_owned OWNER TO covet_other;",
    )
    .unwrap();
    let dest = dump_path(dir.path());
    take_dump(&target(&pg, APP_DB, None), &dest).await;
    change_data(&pg);
    let live = contents(&pg, APP_DB);

    let restored = db::restore_swap(&app_target(&pg), &dest, "f1", &expected_counts(), LIMIT).await;
    match restored {
        Err(DbError::Tool {
            program, stderr, ..
        }) => {
            assert_eq!(program, "pg_restore");
            assert!(stderr.contains("covet_other"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(contents(&pg, APP_DB), live);
    assert_eq!(databases(&pg), ["covet_production", "postgres"]);
}

/// What belongs to the database itself, comparably: settings per role,
/// comment, connection limit and privileges.
fn db_properties(pg: &PostgresCluster, db: &str) -> String {
    pg.psql(
        "postgres",
        &format!(
            "SELECT coalesce(pg_get_userbyid(s.setrole), '-') || ': ' || \
               array_to_string(ARRAY(SELECT c FROM unnest(s.setconfig) c ORDER BY c), ' | ') \
             FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
             WHERE d.datname = '{db}' ORDER BY 1; \
             SELECT shobj_description(oid, 'pg_database'), datconnlimit, \
               ARRAY(SELECT a FROM unnest(datacl) a ORDER BY a::text)::text \
             FROM pg_database WHERE datname = '{db}';"
        ),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_comment_limit_and_privileges_follow_the_restore() {
    let dir = sandbox_dir("db-properties");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    pg.psql("postgres", "CREATE ROLE covet_reporter LOGIN")
        .unwrap();
    for sql in [
        "ALTER DATABASE covet_production SET search_path TO \"$user\", public, \"Odd \"\"Schema\"",
        "ALTER DATABASE covet_production SET app.tenant TO 'it''s, a test'",
        "ALTER DATABASE covet_production SET statement_timeout TO '5s'",
        "ALTER ROLE covet_app IN DATABASE covet_production SET work_mem TO '8MB'",
        "COMMENT ON DATABASE covet_production IS 'the shop''s data'",
        "ALTER DATABASE covet_production CONNECTION LIMIT 50",
        "REVOKE CONNECT, TEMPORARY ON DATABASE covet_production FROM PUBLIC",
        "GRANT CONNECT ON DATABASE covet_production TO covet_reporter WITH GRANT OPTION",
    ] {
        pg.psql("postgres", sql).unwrap();
    }
    let before = db_properties(&pg, APP_DB);
    assert!(before.contains("Odd"), "{before}");
    let t = app_target(&pg);
    let dest = dump_path(dir.path());
    take_dump(&t, &dest).await;
    change_data(&pg);

    let outcome = db::restore_swap(&t, &dest, "p1", &expected_counts(), LIMIT)
        .await
        .unwrap();
    assert_eq!(outcome.not_carried, Vec::<String>::new());
    assert_eq!(db_properties(&pg, APP_DB), before);
    assert_eq!(
        db_properties(&pg, &outcome.kept_as),
        before,
        "the kept database keeps them too"
    );
    // In effect for a new session of the app's role.
    let session = pg
        .psql_as(
            APP_ROLE,
            APP_DB,
            "SHOW search_path; SHOW work_mem; SHOW app.tenant;",
        )
        .unwrap();
    assert_eq!(
        session.lines().collect::<Vec<_>>(),
        [
            "\"$user\", public, \"Odd \"\"Schema\"",
            "8MB",
            "it's, a test"
        ]
    );
}

/// An admin role that may not set everything (here the owner itself, with
/// CREATEDB but not CREATEROLE): the restore goes through, carries what it
/// may, and names what stays on the kept database.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_admin_may_not_carry_is_named_not_fatal() {
    let dir = sandbox_dir("db-not-carried");
    let Some(pg) = app_cluster(dir.path()) else {
        return;
    };
    for sql in [
        "ALTER ROLE covet_app CREATEDB",
        "CREATE ROLE covet_reporter LOGIN",
        "ALTER ROLE covet_reporter IN DATABASE covet_production SET work_mem TO '8MB'",
        "COMMENT ON DATABASE covet_production IS 'kept by the owner'",
    ] {
        pg.psql("postgres", sql).unwrap();
    }
    let t = PgTarget {
        os_user: None,
        ..app_target(&pg)
    };
    let dest = dump_path(dir.path());
    take_dump(&t, &dest).await;
    let outcome = db::restore_swap(&t, &dest, "n1", &expected_counts(), LIMIT)
        .await
        .unwrap();
    assert_eq!(outcome.not_carried.len(), 1, "{:?}", outcome.not_carried);
    assert!(
        outcome.not_carried[0].starts_with("SET work_mem for role covet_reporter (")
            && outcome.not_carried[0].contains("permission denied"),
        "{:?}",
        outcome.not_carried
    );
    eprintln!("{}", outcome.describe());
    assert!(
        outcome
            .describe()
            .contains("still on covet_production_before_n1")
    );
    let now = db_properties(&pg, APP_DB);
    assert!(now.contains("kept by the owner"), "{now}");
    assert!(!now.contains("work_mem"), "{now}");
    assert!(db_properties(&pg, &outcome.kept_as).contains("work_mem=8MB"));
}
