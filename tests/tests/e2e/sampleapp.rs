//! The sample app fixture itself (tests/fixtures/covetpy, covet_tests::sampleapp):
//! its wheels install and upgrade with pip, its migrations run against a real
//! PostgreSQL, and it serves /health under a real systemd manager.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use covet_agent::config::Config;
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sampleapp::{
    self, PYTHON, SampleApp, UNIT, VERSIONS, build_wheelhouse, database_url, make_venv,
    pip_install, wheel_name,
};
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;

const START: Duration = Duration::from_secs(10);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn covet(venv: &Path, args: &[&str]) -> Output {
    Command::new(venv.join("bin/covet"))
        .args(args)
        .output()
        .expect("run covet")
}

/// Checks every RECORD line of a wheel: the sha256 and size of each file.
const VERIFY_RECORD: &str = r#"
import base64, csv, hashlib, io, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    record = next(n for n in whl.namelist() if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(whl.read(record).decode())))
    assert {r[0] for r in rows} == set(whl.namelist()), "RECORD lists other files"
    for path, digest, size in rows:
        if path == record:
            continue
        data = whl.read(path)
        want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert digest == "sha256=" + want.decode(), path
        assert int(size) == len(data), path
"#;

#[test]
fn wheels_install_and_upgrade_with_pip() {
    let dir = sandbox_dir("sampleapp-pip");
    let wheelhouse = build_wheelhouse(&dir.path().join("wheelhouse")).unwrap();
    let again = build_wheelhouse(&dir.path().join("again")).unwrap();
    for version in VERSIONS {
        let wheel = wheelhouse.join(wheel_name(version));
        let out = Command::new(PYTHON)
            .args(["-c", VERIFY_RECORD])
            .arg(&wheel)
            .output()
            .unwrap();
        assert_ok(&out, &format!("RECORD of {}", wheel.display()));
        assert_eq!(
            std::fs::read(&wheel).unwrap(),
            std::fs::read(again.join(wheel_name(version))).unwrap(),
            "{version}: wheels are not reproducible"
        );
    }

    let venv = dir.path().join("venv");
    make_venv(&venv, &wheelhouse, "0.1.9").unwrap();
    let pip = Command::new(venv.join("bin/pip"))
        .arg("--version")
        .output()
        .unwrap();
    assert_ok(&pip, "venv/bin/pip --version");
    let help = assert_ok(&covet(&venv, &["--help"]), "covet --help");
    assert!(help.contains("serve") && help.contains("migrate"), "{help}");
    let version = assert_ok(&covet(&venv, &["--version"]), "covet --version");
    assert_eq!(version.trim(), "covet 0.1.9");

    pip_install(&venv, &wheelhouse, "0.2.0").unwrap();
    let version = assert_ok(&covet(&venv, &["--version"]), "covet --version");
    assert_eq!(version.trim(), "covet 0.2.0");
    // The agent reads the installed version from the dist-info directory.
    let site = venv.join("lib/python3.11/site-packages");
    assert!(site.join("covetpy-0.2.0.dist-info").is_dir());
    assert!(!site.join("covetpy-0.1.9.dist-info").exists());
}

fn applied(pg: &PostgresCluster) -> String {
    pg.psql(
        sampleapp::DB_NAME,
        "SELECT string_agg(name, ',' ORDER BY name) FROM covet_migrations",
    )
    .unwrap()
    .trim()
    .to_owned()
}

fn users_columns(pg: &PostgresCluster) -> String {
    pg.psql(
        sampleapp::DB_NAME,
        "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) \
         FROM information_schema.columns WHERE table_name = 'users'",
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// The agent accepts the `[[app]]` block: no problem under `app[0]`.
fn assert_agent_accepts(app: &SampleApp, pg: &PostgresCluster, dir: &Path) {
    let path = dir.join("agent.toml");
    let base = r#"
listen = "127.0.0.1:0"
state_dir = "/var/lib/covet-agent"
backup_dir = "/var/backups/covet"
[tls]
ca = "/nonexistent/ca.crt"
cert = "/nonexistent/agent.crt"
key = "/nonexistent/agent.key"
"#;
    std::fs::write(&path, format!("{base}{}", app.agent_toml(pg))).unwrap();
    let config = Config::parse_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let problems: Vec<String> = config
        .problems()
        .iter()
        .filter(|p| p.key.starts_with("app"))
        .map(ToString::to_string)
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let declared = config.app("covet").expect("app covet");
    assert_eq!(declared.unit, UNIT);
    let Some(covet_agent::config::DatabaseConfig::Postgres(db)) = &declared.database else {
        panic!("not a PostgreSQL database: {:?}", declared.database);
    };
    assert_eq!(db.port, Some(pg.port()));
}

#[test]
fn migrations_run_against_postgres() {
    let dir = sandbox_dir("sampleapp-pg");
    let Some(pg) = postgres_or_skip(&dir.path().join("pg")) else {
        return;
    };
    let app = sampleapp::install(&dir.path().join("app"), &pg, 3).unwrap();
    assert_eq!(applied(&pg), "0001_create_users");
    assert_eq!(users_columns(&pg), "id,email,created_at");
    let count = pg.psql(&app.db, "SELECT count(*) FROM users").unwrap();
    assert_eq!(count.trim(), "3");
    let again = assert_ok(&app.covet(&["migrate"]).unwrap(), "covet migrate");
    assert!(again.contains("no pending migrations"), "{again}");
    assert_agent_accepts(&app, &pg, dir.path());

    // 0.2.0 with the 0.1.x env file: a clear refusal, as in the guide.
    app.pip_install("0.2.0").unwrap();
    for args in [&["migrate"][..], &["serve"]] {
        let out = app.covet(args).unwrap();
        assert!(
            !out.status.success(),
            "covet {args:?} ran without DATABASE_URL"
        );
        let err = text(&out.stderr);
        assert!(err.contains("KeyError: 'DATABASE_URL'"), "{err}");
        assert!(err.contains("DATABASE_URI is set"), "{err}");
    }

    app.set_env("DATABASE_URL", &database_url(&pg, &app.db, &app.db_user))
        .unwrap();
    let dry = assert_ok(
        &app.covet(&["migrate", "--dry-run"]).unwrap(),
        "covet migrate --dry-run",
    );
    assert!(
        dry.contains("would apply 0002_add_users_last_login"),
        "{dry}"
    );
    assert_eq!(applied(&pg), "0001_create_users");
    assert_eq!(users_columns(&pg), "id,email,created_at");

    let out = assert_ok(&app.covet(&["migrate"]).unwrap(), "covet migrate");
    assert!(out.contains("applying 0002_add_users_last_login"), "{out}");
    assert_eq!(applied(&pg), "0001_create_users,0002_add_users_last_login");
    assert_eq!(users_columns(&pg), "id,email,created_at,last_login");

    // A failing migration: non-zero exit, a clear message, nothing recorded.
    app.pip_install("0.2.1").unwrap();
    pg.psql(&app.db, "ALTER TABLE users ADD COLUMN flags text")
        .unwrap();
    let out = app.covet(&["migrate"]).unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("migration 0003_add_users_flags failed") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(applied(&pg), "0001_create_users,0002_add_users_last_login");
}

#[test]
fn serves_health_under_systemd() {
    let dir = sandbox_dir("sampleapp-sd");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let Some(pg) = postgres_or_skip(&dir.path().join("pg")) else {
        return;
    };
    let app = sampleapp::install(&dir.path().join("app"), &pg, 5).unwrap();
    sandbox.install_unit(UNIT, &app.unit_file()).unwrap();
    let systemctl = |args: &[&str]| {
        let out = sandbox.systemctl(args);
        assert_ok(&out, &format!("systemctl {args:?}"));
    };

    systemctl(&["start", UNIT]);
    let (status, health) = app.wait_json("/health", START).unwrap();
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], "0.1.9");
    assert_eq!(health["db"], "ok");
    let (status, api) = app.wait_json("/api", START).unwrap();
    assert_eq!((status, &api["users"]), (200, &5.into()), "{api}");
    let (status, count) = app.wait_json("/api/users/count", START).unwrap();
    assert_eq!((status, &count["count"]), (200, &5.into()), "{count}");
    let serving = format!("covet 0.1.9 serving on 127.0.0.1:{}", app.port);
    sandbox.wait_journal(UNIT, &serving, START).unwrap();
    sandbox
        .wait_journal(UNIT, "\"GET /health HTTP/1.0\" 200", START)
        .unwrap();

    // 0.2.1: its migration succeeds, its health check does not.
    systemctl(&["stop", UNIT]);
    app.pip_install("0.2.1").unwrap();
    app.set_env("DATABASE_URL", &database_url(&pg, &app.db, &app.db_user))
        .unwrap();
    let out = assert_ok(&app.covet(&["migrate"]).unwrap(), "covet migrate");
    assert!(out.contains("applying 0003_add_users_flags"), "{out}");
    systemctl(&["start", UNIT]);
    let (status, health) = app.wait_json("/health", START).unwrap();
    assert_eq!(status, 500, "{health}");
    assert_eq!(health["status"], "error");
    assert_eq!(health["version"], "0.2.1");
    assert!(health["reason"].as_str().is_some_and(|r| !r.is_empty()));

    // No database: 503 with the reason.
    systemctl(&["stop", UNIT]);
    app.set_env(
        "DATABASE_URL",
        "postgresql://covet_app@/covet_production?host=/nonexistent&port=5432",
    )
    .unwrap();
    systemctl(&["start", UNIT]);
    let (status, health) = app.wait_json("/health", START).unwrap();
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["db"], "error");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("No such file"), "{reason}");
}
