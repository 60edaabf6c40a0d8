//! The one runner of external programs against real programs: the database
//! client programs see exactly the environment the agent gives them (not
//! the agent's own), and a run ends at its time limit even when a
//! grandchild keeps its output open.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use covet_agent::db::{self, PgTarget};
use covet_agent::host::process::{ProcessBuilder, ProcessError};
use covet_tests::postgres::postgres_or_skip;
use covet_tests::sandbox_dir;

const LIMIT: Duration = Duration::from_secs(60);
/// Makes every libpq connection fail at startup: the server refuses the value.
const POISON_OPTIONS: &str = "-c statement_timeout=nonsense";

/// Environment variables that would steer libpq if they reached it.
const POISON: [(&str, &str); 4] = [
    ("PGOPTIONS", POISON_OPTIONS),
    ("PGDATABASE", "no_such_covet_db"),
    ("PGUSER", "no_such_covet_role"),
    ("PGCONNECT_TIMEOUT", "nonsense"),
];

/// A dump, its listing and a restore-and-swap all succeed although the
/// agent's own environment holds libpq variables that break any connection
/// (proved first on the same cluster): the client programs get only PATH,
/// HOME and USER of their os_user, and what the agent sets itself.
#[tokio::test(flavor = "current_thread")]
async fn db_programs_do_not_see_the_agents_environment() {
    let dir = sandbox_dir("proc-db-env");
    let Some(pg) = postgres_or_skip(dir.path()) else {
        return;
    };
    pg.create_db("covet_env", "covet_env").unwrap();
    pg.psql(
        "covet_env",
        "SET ROLE covet_env; CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .unwrap();
    let psql_with = |env: &[(&str, &str)]| {
        Command::new(pg.bindir().join("psql"))
            .args(["-X", "-A", "-t", "-c", "SELECT 1", "-h"])
            .arg(pg.socket_dir())
            .args([
                "-p",
                &pg.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert!(psql_with(&[]).status.success());
    let poisoned = psql_with(&POISON[..1]);
    assert!(!poisoned.status.success(), "the poison must work");
    assert!(
        String::from_utf8_lossy(&poisoned.stderr).contains("statement_timeout"),
        "{}",
        String::from_utf8_lossy(&poisoned.stderr)
    );

    // SAFETY: a current-thread runtime, and nothing of this test has
    // started a thread yet: no one reads the environment concurrently.
    unsafe {
        for (key, value) in POISON {
            std::env::set_var(key, value);
        }
    }
    let t = PgTarget {
        dbname: "covet_env".into(),
        host: Some(pg.socket_dir().to_string_lossy().into_owned()),
        port: Some(pg.port()),
        user: Some("covet_env".into()),
        os_user: Some("postgres".into()),
        bindir: pg.bindir(),
    };
    let counts = db::row_counts(&t, LIMIT).await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([("public.t".to_owned(), 100)]),
        "{}",
        pg.log()
    );
    let dump = dir.path().join("env.dump.zst");
    let never = AtomicBool::new(false);
    db::dump(&t, &dump, LIMIT, &|_| {}, &never).await.unwrap();
    let listed = db::list_dump(&t, &dump, LIMIT).await.unwrap();
    assert!(
        listed.iter().any(|l| l.contains("TABLE public t")),
        "{listed:?}"
    );
    let outcome = db::restore_swap(&t, &dump, "envtest", &counts, LIMIT)
        .await
        .unwrap();
    assert_eq!(outcome.kept_as, "covet_env_before_envtest");
    // SAFETY: as above; the blocking threads of the dump are idle.
    unsafe {
        for (key, _) in POISON {
            std::env::remove_var(key);
        }
    }
    assert_eq!(
        pg.psql("covet_env", "SELECT count(*) FROM t")
            .unwrap()
            .trim(),
        "100"
    );
}

/// A program that leaves a grandchild holding its stdout open still ends
/// at the time limit (killed, reaped), not when the grandchild lets go,
/// and the error names the limit.
#[tokio::test]
async fn the_time_limit_holds_when_a_grandchild_keeps_the_output_open() {
    let started = Instant::now();
    let e = ProcessBuilder::new("/bin/sh")
        .stdin_bytes("/bin/sleep 5 &\necho started\nexec /bin/sleep 30\n")
        .timeout(Duration::from_millis(300))
        .run(&|_, _| {})
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(e, ProcessError::Timeout { .. }), "{e}");
    assert_eq!(e.to_string(), "/bin/sh did not finish within 300ms");
}

/// A failing program's error carries the end of what it said, whichever
/// stream it used, and a line-streaming caller saw every line on the way.
#[tokio::test]
async fn failures_carry_the_tail_of_their_output() {
    let seen = std::sync::Mutex::new(Vec::new());
    let e = ProcessBuilder::new("/bin/sh")
        .stdin_bytes(
            "for i in $(seq 1 500); do echo line $i; done\necho fatal: broken >&2\nexit 7\n",
        )
        .tail_lines(2)
        .run(&|is_stderr, line| seen.lock().unwrap().push((is_stderr, line.to_owned())))
        .await
        .unwrap_err();
    // Each stream in order; how the two interleave is the pipes' business.
    let seen = seen.into_inner().unwrap();
    let of = |stderr: bool| -> Vec<String> {
        seen.iter()
            .filter(|(is_stderr, _)| *is_stderr == stderr)
            .map(|(_, line)| line.clone())
            .collect()
    };
    let stdout: Vec<String> = (1..=500).map(|i| format!("line {i}")).collect();
    assert_eq!(of(false), stdout);
    assert_eq!(of(true), vec!["fatal: broken"]);
    assert_eq!(
        e.to_string(),
        "/bin/sh exited with exit status: 7: fatal: broken"
    );
}
