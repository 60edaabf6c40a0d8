//! `covet-demo`: a real upgrade and a real automatic rollback, end to end, in
//! a throwaway sandbox (a systemd user manager with journald, a PostgreSQL
//! cluster, a PKI, the agent, and the sample app at 0.1.9), narrated. It
//! checks what it shows and exits non-zero if anything is not as promised.
//! Then a blue-green upgrade and its rollback behind a real nginx, under load.
//! Everything is torn down at the end.

use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail, ensure};
use covet_tests::agent::TestAgent;
use covet_tests::postgres::PostgresCluster;
use covet_tests::sampleapp;
use covet_tests::sandbox::SystemdSandbox;

const UNIT: &str = "covet.service";

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("covet-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bench_rounds = std::env::args()
        .skip_while(|a| a != "--bench")
        .nth(1)
        .and_then(|n| n.parse::<u32>().ok());
    let result = match bench_rounds {
        Some(rounds) => runtime.block_on(bench(rounds)),
        None => runtime.block_on(demo()),
    };
    match result {
        Ok(()) => {
            println!("\n\x1b[1mdemo finished: every check passed; the sandbox is gone\x1b[0m");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ncovet-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn check(ok: bool, what: &str) -> anyhow::Result<()> {
    ensure!(ok, "expected: {what}");
    println!("    \x1b[32m✓\x1b[0m {what}");
    Ok(())
}

/// Runs covetctl as `context`, showing its output as it comes.
fn covetctl(agent: &TestAgent, context: &str, args: &[&str]) -> anyhow::Result<i32> {
    println!("$ covetctl {}", args.join(" "));
    let status = Command::new(covet_tests::bin("covetctl"))
        .arg("--config")
        .arg(agent.dir.join("covetctl.toml"))
        .args(["--context", context])
        .args(args)
        .stdin(Stdio::null())
        .status()
        .context("run covetctl")?;
    Ok(status.code().unwrap_or(-1))
}

struct DbState {
    rows: String,
    schema: String,
}

fn db_state(pg: &PostgresCluster, db: &str) -> anyhow::Result<DbState> {
    Ok(DbState {
        rows: pg.psql(db, "SELECT id, email FROM users ORDER BY id")?,
        schema: pg.psql(db, "SELECT column_name FROM information_schema.columns WHERE table_name = 'users' ORDER BY 1")?,
    })
}

async fn demo() -> anyhow::Result<()> {
    if let Some(why) = SystemdSandbox::unavailable() {
        bail!(
            "this machine cannot run the sandbox: {why} (run as root on Debian 12 with systemd, dbus-user-session and util-linux)"
        );
    }
    if let Some(why) = PostgresCluster::unavailable() {
        bail!("this machine cannot run a throwaway PostgreSQL: {why}");
    }
    let dir = tempfile::Builder::new().prefix("covet-demo-").tempdir()?;
    let root = dir.path();

    say(
        "A sandbox: a real systemd user manager with its own journald, and a throwaway PostgreSQL cluster",
    );
    let sandbox = SystemdSandbox::start(&root.join("systemd"))?;
    println!("    systemd bus: {}", sandbox.bus_address());
    let pg = PostgresCluster::start(&root.join("pg"))?;
    println!(
        "    PostgreSQL on {} port {}",
        pg.socket_dir().display(),
        pg.port()
    );

    say("The app: CovetPy 0.1.9 in a virtualenv, its database with 25 users, behind covet.service");
    let app = sampleapp::install(&root.join("app"), &pg, 25)?;
    sandbox.install_unit(
        UNIT,
        &sampleapp::unit_file(&app.venv, &app.env_file, app.port),
    )?;
    ensure!(
        sandbox.systemctl(&["start", UNIT]).status.success(),
        "cannot start {UNIT}"
    );
    check(
        covet_tests::http::serving(app.port, "0.1.9").await,
        "covet 0.1.9 answers /health",
    )?;
    println!(
        "    env file {}:\n{}",
        app.env_file.display(),
        indent(&std::fs::read_to_string(&app.env_file)?)
    );

    say("A PKI and the agent, over mutual TLS, allowed to control covet.service only");
    let toml = format!(
        "{}{}\n{}",
        sandbox.agent_toml(None),
        app.agent_toml(&pg),
        app.analysis_toml()
    );
    let agent = TestAgent::start_with_toml(&root.join("agent"), toml).await;
    agent.ctl_config(&["operator", "reader", "admin"]);
    println!("    agent listening on {}", agent.endpoint());
    covetctl(&agent, "reader", &["info"])?;
    covetctl(&agent, "reader", &["service", "status", UNIT])?;
    covetctl(&agent, "reader", &["health", "covet", "--smoke"])?;

    say("The plan first: a dry run changes nothing");
    let code = covetctl(
        &agent,
        "operator",
        &[
            "upgrade",
            "covet",
            "--to",
            "0.2.0",
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
            "--dry-run",
        ],
    )?;
    check(code == 0, "the dry run finds nothing blocking")?;

    say(
        "Upgrade to 0.1.11 under load, watched: healthy, but 200 ms slower; the analysis rolls it back",
    );
    let load = covet_tests::load::Load::start(app.port, "/version", 25);
    let code = tokio::task::block_in_place(|| {
        covetctl(
            &agent,
            "operator",
            &["upgrade", "covet", "--to", "0.1.11", "--watch", "20s"],
        )
    })?;
    load.stop().await;
    check(
        code == 3,
        "covetctl upgrade exits 3: the p99 latency rule failed and it was rolled back",
    )?;
    check(
        covet_tests::http::serving(app.port, "0.1.9").await,
        "covet 0.1.9 is serving again",
    )?;

    say(
        "Upgrade to 0.2.0: backup, pip install, DATABASE_URI -> DATABASE_URL, migrate, restart, health, smoke",
    );
    let code = covetctl(
        &agent,
        "operator",
        &[
            "upgrade",
            "covet",
            "--to",
            "0.2.0",
            "--env-rename",
            "DATABASE_URI=DATABASE_URL",
        ],
    )?;
    check(code == 0, "covetctl upgrade exits 0 (succeeded)")?;
    check(
        covet_tests::http::serving(app.port, "0.2.0").await,
        "covet 0.2.0 answers /health",
    )?;
    let env = std::fs::read_to_string(&app.env_file)?;
    check(
        env.contains("DATABASE_URL=") && !env.contains("DATABASE_URI="),
        "the env file now names DATABASE_URL",
    )?;
    let before = db_state(&pg, &app.db)?;
    check(
        before.schema.contains("last_login"),
        "the migration added users.last_login",
    )?;

    say("Upgrade to 0.2.1, a broken release: its migration succeeds, then /health fails");
    let code = covetctl(&agent, "operator", &["upgrade", "covet", "--to", "0.2.1"])?;
    check(
        code == 3,
        "covetctl upgrade exits 3: failed and rolled back cleanly",
    )?;
    check(
        covet_tests::http::serving(app.port, "0.2.0").await,
        "covet 0.2.0 is serving again",
    )?;
    let after = db_state(&pg, &app.db)?;
    check(
        after.rows == before.rows,
        "the database has exactly the rows it had",
    )?;
    check(
        after.schema == before.schema,
        "the database has exactly the schema it had (no users.flags)",
    )?;
    check(
        std::fs::read_to_string(&app.env_file)? == env,
        "the env file is as before",
    )?;

    say("What happened, as the agent journaled and audited it");
    covetctl(&agent, "reader", &["ops", "list"])?;
    covetctl(&agent, "reader", &["backup", "list"])?;
    covetctl(&agent, "reader", &["logs", UNIT, "-n", "8"])?;
    println!(
        "$ tail -n 4 {}",
        agent.dir.join("state/audit.log").display()
    );
    let audit = std::fs::read_to_string(agent.dir.join("state/audit.log"))?;
    for line in audit
        .lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("    {line}");
    }
    say("Tearing down: agent, unit, systemd, PostgreSQL, files");
    drop(agent);
    drop(sandbox);
    drop(pg);
    blue_green().await
}

/// Zero downtime: the same upgrade blue-green behind a real nginx while a
/// load of 200 requests/s goes through it, then its rollback, a switch back.
async fn blue_green() -> anyhow::Result<()> {
    use covet_tests::slotted::{RENAME, UNIT as OWN_UNIT, World};
    say(
        "Zero downtime: a fresh sandbox with nginx in front of covet.service (0.1.9), strategy blue-green",
    );
    let w = World::start("blue-green", "database_on_rollback = \"keep\"")
        .await
        .context("no systemd sandbox or PostgreSQL for the blue-green scene")?;
    w.agent.ctl_config(&["operator"]);
    let run = |args: &[&str]| tokio::task::block_in_place(|| covetctl(&w.agent, "operator", args));
    say("Upgrading to 0.2.0 in slot blue while 200 requests/s go through nginx");
    let load = w.load_at(200);
    let mut args = vec!["upgrade", "covet", "--to", "0.2.0"];
    args.extend_from_slice(&RENAME);
    let code = run(&args)?;
    let report = load.stop().await;
    check(
        code == 0,
        "the upgrade succeeded: started, checked on its own port, switched, drained",
    )?;
    check(
        report.failures().is_empty(),
        &format!(
            "none of the {} requests through nginx failed",
            report.answers.len()
        ),
    )?;
    check(
        report.ok_containing("0.1.9") > 0 && report.ok_containing("0.2.0") > 0,
        "users were served 0.1.9, then 0.2.0",
    )?;
    check(
        w.live().as_deref() == Some("blue") && !w.active(OWN_UNIT),
        "slot blue is live; covet.service is stopped",
    )?;
    say("Rolling it back under the same load: a switch back, not a reinstall");
    let load = w.load_at(200);
    let code = run(&["rollback", "covet"])?;
    let report = load.stop().await;
    check(code == 0, "the rollback succeeded")?;
    check(
        report.failures().is_empty(),
        &format!(
            "none of the {} requests through nginx failed",
            report.answers.len()
        ),
    )?;
    check(
        w.live().is_none() && w.active(OWN_UNIT),
        "covet.service serves 0.1.9 again",
    )?;
    say("Tearing down: agent, nginx, units, systemd, PostgreSQL, files");
    drop(w);
    Ok(())
}

/// `covet-demo --bench N`: the agent's own overhead in an upgrade (the
/// operation's total time minus the time it waited on external programs,
/// systemd and the app), over N upgrade + rollback rounds.
async fn bench(rounds: u32) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("covet-bench-upgrade-")
        .tempdir()?;
    let root = dir.path();
    let sandbox = SystemdSandbox::start(&root.join("systemd"))?;
    let pg = PostgresCluster::start(&root.join("pg"))?;
    let app = sampleapp::install(&root.join("app"), &pg, 1000)?;
    sandbox.install_unit(
        UNIT,
        &sampleapp::unit_file(&app.venv, &app.env_file, app.port),
    )?;
    ensure!(
        sandbox.systemctl(&["start", UNIT]).status.success(),
        "cannot start {UNIT}"
    );
    ensure!(
        covet_tests::http::serving(app.port, "0.1.9").await,
        "the app does not serve"
    );
    let toml = format!("{}{}\n", sandbox.agent_toml(None), app.agent_toml(&pg));
    let agent = TestAgent::start_with_toml(&root.join("agent"), toml).await;
    agent.ctl_config(&["operator"]);
    let mut samples = Vec::new();
    for round in 1..=rounds {
        let out = agent.ctl(
            "operator",
            &[
                "-o",
                "json",
                "upgrade",
                "covet",
                "--to",
                "0.2.0",
                "--env-rename",
                "DATABASE_URI=DATABASE_URL",
            ],
        );
        ensure!(
            out.code == 0,
            "upgrade failed:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        let op = out.json();
        let ms = |k: &str| {
            op["params"][k]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (total, waited, overhead) = (ms("total_ms"), ms("waited_ms"), ms("overhead_ms"));
        println!(
            "round {round}: upgrade took {total} ms, waiting on programs/systemd/app {waited} ms, agent overhead {overhead} ms"
        );
        // Where the time went, step by step (own work and waiting together).
        let steps: Vec<String> = op["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some(format!(
                    "{} {} ms",
                    s["name"].as_str()?,
                    s["duration_ms"].as_u64()?
                ))
            })
            .collect();
        println!("  steps: {}", steps.join(", "));
        samples.push(overhead);
        let back = agent.ctl("operator", &["-o", "json", "rollback", "covet"]);
        ensure!(
            back.code == 0,
            "rollback failed:\n{}\n{}",
            back.stdout,
            back.stderr
        );
    }
    samples.sort_unstable();
    let median = samples[samples.len() / 2];
    println!(
        "\nagent overhead per upgrade (median of {rounds}): {median} ms; target < 150 ms; ratio to target {:.2}",
        median as f64 / 150.0
    );
    println!(
        "(overhead = total − waiting on pg_dump, pip, the migration, systemd jobs, probes and the backup itself, counted once where they overlap)"
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
