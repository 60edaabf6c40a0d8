//! Fleets: read commands fanned out over several agents, and rollouts
//! (canary, batches, failure threshold, fleet rollback, resume after
//! covetctl itself is killed). Each agent manages its own copy of the sample
//! app (own unit, port, virtualenv and database) in one shared systemd
//! sandbox and one PostgreSQL cluster; all agents share one PKI.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use covet_tests::agent::{AgentOptions, CtlOutput, TestAgent, run_ctl};
use covet_tests::pki::TestPki;
use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sampleapp::{self, SampleApp};
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip};
use covet_tests::sandbox_dir;

const RENAME: &str = "--env-rename=DATABASE_URI=DATABASE_URL";

/// Agents sharing one PKI, and a covetctl configuration that reaches them all.
pub(crate) struct Agents {
    pub(crate) agents: Vec<TestAgent>,
    pub(crate) config: PathBuf,
}

impl Agents {
    pub(crate) fn endpoints(&self) -> Vec<String> {
        self.agents.iter().map(TestAgent::endpoint).collect()
    }

    fn ctl(&self, args: &[&str]) -> CtlOutput {
        run_ctl(&self.config, None, args)
    }
}

/// Writes a covetctl config whose context (operator) names every agent.
fn ctl_config(dir: &Path, pki: &TestPki, endpoints: &[String]) -> PathBuf {
    let c = pki.client("operator");
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let toml = format!(
        "current_context = \"fleet\"\n[contexts.fleet]\nendpoints = [{}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        list.join(", "),
        c.ca.display(),
        c.cert.display(),
        c.key.display()
    );
    let path = dir.join("covetctl.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// An agent in its own directory, with the shared PKI.
async fn start_agent(dir: &Path, pki: &TestPki, options: AgentOptions) -> TestAgent {
    std::fs::create_dir_all(dir).unwrap();
    let shared = TestPki {
        dir: pki.dir.clone(),
    };
    TestAgent::start_with(dir, shared, options).await
}

pub(crate) async fn bare_agents(dir: &Path, count: usize) -> Agents {
    let pki = TestPki::new(&dir.join("pki"));
    let mut agents = Vec::new();
    for i in 0..count {
        agents.push(
            start_agent(
                &dir.join(format!("agent-{i}")),
                &pki,
                AgentOptions::default(),
            )
            .await,
        );
    }
    let endpoints: Vec<String> = agents.iter().map(TestAgent::endpoint).collect();
    let config = ctl_config(dir, &pki, &endpoints);
    Agents { agents, config }
}

pub(crate) fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reports_every_node_and_a_down_node_does_not_block_the_others() {
    let dir = sandbox_dir("fleet-fanout");
    let fleet = bare_agents(dir.path(), 3).await;
    let dead = dead_endpoint();
    let mut nodes = fleet.endpoints();
    nodes.insert(1, dead.clone());
    let list = nodes.join(",");

    let started = Instant::now();
    let out = fleet.ctl(&["-o", "json", "--timeout", "3s", "info", "--nodes", &list]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let rows = out.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for (row, endpoint) in rows.iter().zip(&nodes) {
        assert_eq!(row["endpoint"], endpoint.as_str());
        if *endpoint == dead {
            assert_eq!(row["ok"], false);
            assert!(
                row["error"]
                    .as_str()
                    .unwrap()
                    .contains("connection refused"),
                "{row}"
            );
        } else {
            assert_eq!(row["ok"], true, "{row}");
            assert!(row["error"].is_null());
            assert_eq!(row["caller"]["role"], "operator");
        }
    }

    // Text: one table, a row per node, the dead one with its error.
    let out = fleet.ctl(&["--timeout", "3s", "info", "--nodes", &list]);
    assert_eq!(out.code, 1);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].ends_with("ERROR"),
        "{}",
        out.stdout
    );
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert!(lines[2].starts_with(&dead) && lines[2].contains("connection refused"));

    // The context's endpoints, and a nodes file; all up: exit 0.
    let out = fleet.ctl(&["-o", "json", "ops", "list"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json().as_array().unwrap().len(), 3);
    let file = dir.path().join("nodes.txt");
    std::fs::write(
        &file,
        format!("# fleet\n{}\n\n", fleet.endpoints().join("\n")),
    )
    .unwrap();
    for args in [
        vec!["metrics"],
        vec!["backup", "list"],
        vec!["service", "status"],
        vec!["ops", "list", "--active"],
    ] {
        let mut full = vec!["-o", "json"];
        full.extend(args.iter().copied());
        full.extend(["--parallel", "2", "--nodes-file", file.to_str().unwrap()]);
        let out = fleet.ctl(&full);
        assert_eq!(out.code, 0, "{args:?}\n{}\n{}", out.stdout, out.stderr);
        let rows = out.json();
        assert_eq!(rows.as_array().unwrap().len(), 3, "{args:?}");
    }

    // One node: the single-node output, unchanged.
    let one = fleet.endpoints()[0].clone();
    let out = fleet.ctl(&["-e", &one, "info"]);
    out.assert_ok();
    assert!(out.stdout.starts_with("endpoint:"), "{}", out.stdout);
    let out = fleet.ctl(&["-o", "json", "info", "--nodes", &one]);
    out.assert_ok();
    assert_eq!(out.json()["endpoint"], one.as_str());
}

/// A fleet of agents, each with its own copy of the sample app at 0.1.9.
pub(crate) struct World {
    pub(crate) fleet: Agents,
    pub(crate) pg: PostgresCluster,
    pub(crate) apps: Vec<SampleApp>,
    _sandbox: SystemdSandbox,
    pub(crate) dir: tempfile::TempDir,
}

fn unit_name(i: usize) -> String {
    format!("covet-{i}.service")
}

fn install_app(root: &Path, wheelhouse: &Path, pg: &PostgresCluster, i: usize) -> SampleApp {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = SampleApp {
        root: root.to_owned(),
        venv: root.join("venv"),
        env_file: root.join("covet.env"),
        wheelhouse: wheelhouse.to_owned(),
        port,
        db: format!("covet_{i}"),
        db_user: sampleapp::DB_USER.to_owned(),
    };
    std::fs::create_dir_all(root).unwrap();
    sampleapp::make_venv(&app.venv, wheelhouse, sampleapp::BASE_VERSION).unwrap();
    pg.create_db(&app.db, &app.db_user).unwrap();
    sampleapp::write_env_file(&app.env_file, pg, &app.db, &app.db_user).unwrap();
    let out = app.covet(&["migrate"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app
}

pub(crate) async fn world(count: usize) -> Option<World> {
    let dir = sandbox_dir("fleet");
    let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
    let pg = postgres_or_skip(&dir.path().join("pg"))?;
    let wheelhouse = sampleapp::build_wheelhouse(&dir.path().join("wheelhouse")).unwrap();
    let pki = TestPki::new(&dir.path().join("pki"));
    let mut apps = Vec::new();
    let mut agents = Vec::new();
    for i in 0..count {
        let app = install_app(&dir.path().join(format!("app-{i}")), &wheelhouse, &pg, i);
        let unit = unit_name(i);
        sandbox.install_unit(&unit, &app.unit_file()).unwrap();
        let out = sandbox.systemctl(&["start", &unit]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let toml = format!(
            "{}{}\n",
            sandbox.agent_toml(Some("500ms")),
            app.agent_toml(&pg).replace(
                &format!("unit = \"{}\"", sampleapp::UNIT),
                &format!("unit = \"{unit}\""),
            ),
        );
        let options = AgentOptions {
            extra_toml: toml,
            ..Default::default()
        };
        agents.push(start_agent(&dir.path().join(format!("agent-{i}")), &pki, options).await);
        apps.push(app);
    }
    for app in &apps {
        wait_version(app, "0.1.9").await;
    }
    let endpoints: Vec<String> = agents.iter().map(TestAgent::endpoint).collect();
    let config = ctl_config(dir.path(), &pki, &endpoints);
    Some(World {
        fleet: Agents { agents, config },
        pg,
        apps,
        _sandbox: sandbox,
        dir,
    })
}

pub(crate) async fn wait_version(app: &SampleApp, version: &str) {
    for _ in 0..100 {
        if let Ok((200, body)) = app.get("/health")
            && serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|b| b["version"] == version)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{} did not serve {version}: {:?}",
        app.url("/health"),
        app.get("/health")
    );
}

impl World {
    /// The agents' logs, for failure messages.
    pub(crate) fn logs(&self) -> String {
        self.fleet
            .agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.endpoint(), a.log()))
            .collect()
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rollout_args(&self, version: &str, state: &Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "-o",
            "json",
            "--timeout",
            "60s",
            "rollout",
            "covet",
            "--to",
            version,
            RENAME,
            "--state",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(state.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `covetctl -o json rollout resume STATE`.
    fn resume(&self, state: &Path) -> CtlOutput {
        self.fleet.ctl(&[
            "-o",
            "json",
            "--timeout",
            "60s",
            "rollout",
            "resume",
            state.to_str().unwrap(),
        ])
    }

    fn rollout(&self, version: &str, state: &Path, extra: &[&str]) -> CtlOutput {
        let args = self.rollout_args(version, state, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.fleet.ctl(&args)
    }

    /// The operations the agent of node `i` ran, oldest first, as JSON.
    pub(crate) fn operation_records(&self, i: usize) -> Vec<serde_json::Value> {
        let out = run_ctl(
            &self.fleet.config,
            None,
            &[
                "-o",
                "json",
                "-e",
                &self.fleet.agents[i].endpoint(),
                "ops",
                "list",
            ],
        );
        out.assert_ok();
        let mut ops = out.json()["operations"].as_array().unwrap().clone();
        ops.reverse(); // oldest first
        ops
    }

    /// The upgrade and rollback operations the agent of node `i` ran.
    pub(crate) fn operations(&self, i: usize) -> Vec<(String, String)> {
        self.operation_records(i)
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap().to_owned(),
                    o["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

fn node_states(summary: &serde_json::Value) -> Vec<String> {
    summary["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["state"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) fn op(kind: &str, state: &str) -> (String, String) {
    (kind.to_owned(), state.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_stops_the_rollout_before_any_other_node() {
    let Some(w) = world(3).await else { return };
    let state = w.state_file("canary.json");
    // 0.2.1 fails its health gate: the canary's agent rolls its node back.
    let out = w.rollout("0.2.1", &state, &["--batch", "2"]);
    assert_eq!(out.code, 3, "{}\n{}\n{}", out.stdout, out.stderr, w.logs());
    let summary = out.json();
    assert_eq!(node_states(&summary), ["failed", "pending", "pending"]);
    assert_eq!(summary["nodes"][0]["upgrade_state"], "rolled_back");
    assert_eq!(summary["stopped"], true);
    assert_eq!(w.operations(0), [op("upgrade", "rolled_back")]);
    for i in 1..3 {
        assert!(w.operations(i).is_empty(), "node {i} was touched");
    }
    for app in &w.apps {
        wait_version(app, "0.1.9").await;
    }
    // The state file says the same, and a second rollout refuses to overwrite it.
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["stopped"], true);
    let again = w.rollout("0.2.1", &state, &[]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("rollout resume"), "{}", again.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_past_the_threshold_roll_back_the_upgraded_nodes_newest_first() {
    let Some(w) = world(4).await else { return };
    // Node 2 (the second batch) has the column 0.2.0's migration adds: it fails there.
    w.pg.psql(
        &w.apps[2].db,
        "ALTER TABLE users ADD COLUMN last_login timestamptz",
    )
    .unwrap();
    let state = w.state_file("batches.json");
    // Batches of two, one node at a time: node 2 fails, node 3 never starts.
    let out = w.rollout(
        "0.2.0",
        &state,
        &[
            "--canary",
            "1",
            "--batch",
            "2",
            "--parallel",
            "1",
            "--pause-between",
            "1s",
        ],
    );
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("pausing 1s before the next batch"),
        "{}",
        out.stderr
    );
    let summary = out.json();
    assert_eq!(
        node_states(&summary),
        ["rolled_back", "rolled_back", "failed", "pending"]
    );
    assert_eq!(summary["rolled_back"], 2);
    assert_eq!(summary["not_started"], 1);
    for i in 0..2 {
        assert_eq!(
            w.operations(i),
            [op("upgrade", "succeeded"), op("rollback", "succeeded")],
            "node {i}"
        );
    }
    assert_eq!(w.operations(2), [op("upgrade", "rolled_back")]);
    assert!(w.operations(3).is_empty());
    // Newest first: node 1's rollback ran before node 0's.
    let rollback_created = |i: usize| {
        let out = run_ctl(
            &w.fleet.config,
            None,
            &[
                "-o",
                "json",
                "-e",
                &w.fleet.agents[i].endpoint(),
                "ops",
                "list",
            ],
        );
        out.json()["operations"][0]["created"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(rollback_created(1) <= rollback_created(0));
    // The pause came between the canary and the batch, and the batch ran
    // one node at a time (whole-second timestamps, so strictly later by 1s
    // means at least the pause).
    let at = |i: usize, field: &str| {
        let text = w.operation_records(i)[0][field]
            .as_str()
            .unwrap()
            .to_owned();
        time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).unwrap()
    };
    assert!(
        at(1, "created") - at(0, "finished") >= time::Duration::seconds(1),
        "no pause between the canary and the first batch"
    );
    assert!(
        at(2, "created") >= at(1, "finished"),
        "--parallel 1 started node 2 before node 1 finished"
    );
    for app in &w.apps {
        wait_version(app, "0.1.9").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rollout_resumes_without_redoing_any_node() {
    let Some(w) = world(3).await else { return };
    let state = w.state_file("resume.json");
    let args = w.rollout_args("0.2.0", &state, &["--batch", "1"]);
    let mut child = Command::new(covet_tests::bin("covetctl"))
        .arg("--config")
        .arg(&w.fleet.config)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill covetctl as soon as the canary's operation is recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recorded: Option<serde_json::Value> = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if recorded.is_some_and(|r| {
            r["nodes"][0]["operation_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the canary's operation was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(recorded["nodes"][0]["phase"], "upgrading");

    let out = w.resume(&state);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        node_states(&out.json()),
        ["upgraded", "upgraded", "upgraded"]
    );
    for (i, app) in w.apps.iter().enumerate() {
        assert_eq!(w.operations(i), [op("upgrade", "succeeded")], "node {i}");
        wait_version(app, "0.2.0").await;
    }
    // Resuming a finished rollout changes nothing.
    let out = w
        .fleet
        .ctl(&["-o", "json", "rollout", "resume", state.to_str().unwrap()]);
    assert_eq!(out.code, 0);
    for i in 0..3 {
        assert_eq!(w.operations(i).len(), 1);
    }
}

/// covetctl died after the threshold stopped the rollout while a node's
/// upgrade was still running: the resume follows that node to its end
/// (upgraded) and then rolls it back with the rest of the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stopped_rollout_follows_a_running_node_then_rolls_it_back() {
    let Some(w) = world(2).await else { return };
    let node0 = w.fleet.agents[0].endpoint();
    let out = w.fleet.ctl(&[
        "-o", "json", "-e", &node0, "upgrade", "covet", "--to", "0.2.0", RENAME, "--detach",
    ]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let id = out.json()["id"].as_str().unwrap().to_owned();
    // The state file as that covetctl left it.
    let state = w.state_file("stopped.json");
    let recorded = serde_json::json!({
        "app": "covet", "to_version": "0.2.0",
        "env_set": [], "env_rename": ["DATABASE_URI=DATABASE_URL"], "env_unset": [],
        "watch_seconds": null, "canary": 1, "batch": 1, "max_failures": 0,
        "pause_between_ms": 0, "fleet_rollback": true, "stopped": true,
        "nodes": [
            {"endpoint": node0, "phase": "upgrading", "operation_id": id},
            {"endpoint": w.fleet.agents[1].endpoint(), "phase": "pending"},
        ],
    });
    std::fs::write(&state, serde_json::to_vec_pretty(&recorded).unwrap()).unwrap();
    let out = w.resume(&state);
    assert_eq!(out.code, 3, "{}\n{}\n{}", out.stdout, out.stderr, w.logs());
    assert_eq!(node_states(&out.json()), ["rolled_back", "pending"]);
    assert_eq!(
        w.operations(0),
        [op("upgrade", "succeeded"), op("rollback", "succeeded")]
    );
    assert!(w.operations(1).is_empty(), "node 1 was touched");
    for app in &w.apps {
        wait_version(app, "0.1.9").await;
    }
}
