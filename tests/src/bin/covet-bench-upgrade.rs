//! `covet-bench-upgrade`: the upgrade runbook and its rollback, three ways,
//! on ONE sandbox app in one run, with ratios:
//!
//! - covetctl: `covetctl upgrade covet --to 0.2.0 --env-rename
//!   DATABASE_URI=DATABASE_URL` and `covetctl rollback covet`, each timed
//!   from process start to exit (both follow the operation to its end);
//! - Ansible: `scripts/bench/upgrade.yml` and `rollback.yml` with
//!   `ansible-playbook -i localhost, -c local` (the venv given by `--ansible`);
//! - bare: the same external commands run one after another from here (tar,
//!   pg_dump, pip, the env edit in Rust, migrate, systemctl, a health poll),
//!   the "shell script" floor.
//!
//! Each round runs the three pairs in a rotating order. After every leg the
//! app is checked (the version /health serves, the env key, the schema, the
//! rows); a leg that did not do what it claims fails the benchmark.
//!
//! Usage: `covet-bench-upgrade --ansible DIR [--rounds N] [--playbooks DIR]`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use covet_tests::agent::TestAgent;
use covet_tests::postgres::PostgresCluster;
use covet_tests::sampleapp::{self, SampleApp};
use covet_tests::sandbox::SystemdSandbox;

const OLD_VERSION: &str = sampleapp::BASE_VERSION;
const NEW_VERSION: &str = "0.2.0";
const OLD_KEY: &str = "DATABASE_URI";
const NEW_KEY: &str = "DATABASE_URL";
/// Users in the sample database (as in `covet-demo --bench`).
const ROWS: u32 = 1000;
/// The agent's overhead target per upgrade (issue #12).
const OVERHEAD_TARGET_MS: u64 = 150;
/// The speed-up over Ansible that issue #12 asks for, upgrade and rollback.
const SPEEDUP_TARGET: f64 = 5.0;
/// Any one leg (a covetctl run, a playbook, a bare command) gets this long.
const LEG_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the bare leg polls /health (a script's `sleep 0.05` loop).
const BARE_POLL: Duration = Duration::from_millis(50);
/// How long the app may take to serve after a restart.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);

struct Args {
    rounds: u32,
    ansible: PathBuf,
    playbooks: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut rounds = 3;
    let mut ansible = None;
    let mut playbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench");
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => rounds = value.parse().context("--rounds: a number")?,
            "--ansible" => ansible = Some(PathBuf::from(value)),
            "--playbooks" => playbooks = PathBuf::from(value),
            other => bail!(
                "unknown flag {other} (usage: covet-bench-upgrade --ansible VENV [--rounds N] [--playbooks DIR])"
            ),
        }
    }
    ensure!(rounds > 0, "--rounds must be at least 1");
    let ansible = std::path::absolute(ansible.context(
        "--ansible VENV is required: a virtualenv with ansible-playbook (scripts/bench.sh makes one)",
    )?)?;
    ensure!(
        ansible.join("bin/ansible-playbook").is_file(),
        "{} has no bin/ansible-playbook",
        ansible.display()
    );
    let playbooks = std::path::absolute(&playbooks)?;
    for file in ["upgrade.yml", "rollback.yml", "ansible.cfg"] {
        ensure!(
            playbooks.join(file).is_file(),
            "{} is missing",
            playbooks.join(file).display()
        );
    }
    Ok(Args {
        rounds,
        ansible,
        playbooks,
    })
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ncovet-bench-upgrade: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sandbox, the app, the agent and where each peer keeps its files.
struct Bench {
    root: PathBuf,
    // Dropped in this order: agent, app's unit (with the sandbox), database.
    agent: TestAgent,
    sandbox: SystemdSandbox,
    pg: PostgresCluster,
    app: SampleApp,
    ansible: PathBuf,
    playbooks: PathBuf,
    /// What the app looks like before an upgrade and after a rollback.
    original: AppState,
    /// A log per external run: `NNN-what.log`.
    runs: std::cell::Cell<u32>,
    /// How long each bare command took, over the rounds.
    bare_steps: std::cell::RefCell<StepTimes>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Peer {
    Covetctl,
    Ansible,
    Bare,
}

const PEERS: [Peer; 3] = [Peer::Covetctl, Peer::Ansible, Peer::Bare];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Covetctl => "covetctl",
            Peer::Ansible => "ansible",
            Peer::Bare => "bare",
        }
    }
}

/// One leg's wall time and the CPU time it cost.
#[derive(Clone, Copy)]
struct Leg {
    wall: Duration,
    cpu: Duration,
}

/// The timings of one peer over the rounds.
#[derive(Default)]
struct Samples {
    upgrade: Vec<Duration>,
    rollback: Vec<Duration>,
    upgrade_cpu: Vec<Duration>,
    rollback_cpu: Vec<Duration>,
}

/// covetctl's operations, as the agent reported them.
#[derive(Default)]
struct AgentReport {
    overhead_ms: Vec<u64>,
    /// covetctl's wall time minus the operation's own total (connect, TLS,
    /// following the events, process start and exit).
    client_ms: Vec<u64>,
    upgrade_steps: StepTimes,
    rollback_steps: StepTimes,
}

/// Step name → its durations over the rounds, in the order steps first ran.
#[derive(Default)]
struct StepTimes(Vec<(String, Vec<u64>)>);

impl StepTimes {
    fn add(&mut self, op: &serde_json::Value) -> String {
        let mut line = Vec::new();
        for step in op["steps"].as_array().into_iter().flatten() {
            let (Some(name), Some(ms)) = (step["name"].as_str(), step["duration_ms"].as_u64())
            else {
                continue;
            };
            // "archive /tmp/covet-bench-upgrade-XXXX/app/venv" -> "archive venv".
            let name = short_step_name(name);
            let name = name.as_str();
            line.push(format!("{name} {ms}"));
            self.push(name, ms);
        }
        line.join(", ")
    }

    fn push(&mut self, name: &str, ms: u64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(ms),
            None => self.0.push((name.to_owned(), vec![ms])),
        }
    }

    fn medians(&self) -> String {
        self.0
            .iter()
            .map(|(name, v)| format!("{name} {} ms", median_u64(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(why) = SystemdSandbox::unavailable() {
        bail!("this machine cannot run the sandbox: {why}");
    }
    if let Some(why) = PostgresCluster::unavailable() {
        bail!("this machine cannot run a throwaway PostgreSQL: {why}");
    }
    // COVET_KEEP_SANDBOX=1 keeps it, with every run's output in logs/.
    let dir = covet_tests::sandbox_dir("bench-upgrade");
    let bench = setup(dir.path(), &args).await?;
    println!(
        "one sandbox app (covetpy {OLD_VERSION} -> {NEW_VERSION}, {ROWS} users), {} rounds; each leg is checked",
        args.rounds
    );
    println!("load average before: {}", load_average());
    let mut samples: Vec<Samples> = PEERS.iter().map(|_| Samples::default()).collect();
    let mut report = AgentReport::default();
    for round in 0..args.rounds {
        println!("\nround {}", round + 1);
        // Rotate who goes first, so that no peer always runs on warm caches.
        for i in 0..PEERS.len() {
            let index = (i + round as usize) % PEERS.len();
            let peer = PEERS[index];
            let (up, back) = bench.leg_pair(peer, &mut report)?;
            println!(
                "  {:<9} upgrade {:>7} (CPU {:>7})   rollback {:>7} (CPU {:>7})",
                peer.name(),
                secs(up.wall),
                secs(up.cpu),
                secs(back.wall),
                secs(back.cpu)
            );
            let peer_samples = &mut samples[index];
            peer_samples.upgrade.push(up.wall);
            peer_samples.upgrade_cpu.push(up.cpu);
            peer_samples.rollback.push(back.wall);
            peer_samples.rollback_cpu.push(back.cpu);
        }
    }
    println!("\nload average after: {}", load_average());
    print_table(&samples, &report, args.rounds);
    println!(
        "bare commands (upgrade, then rollback), medians: {}",
        bench.bare_steps.borrow().medians()
    );
    drop(bench);
    Ok(())
}

async fn setup(root: &Path, args: &Args) -> anyhow::Result<Bench> {
    let sandbox = SystemdSandbox::start(&root.join("systemd"))?;
    let pg = PostgresCluster::start(&root.join("pg"))?;
    let app = sampleapp::install(&root.join("app"), &pg, ROWS)?;
    sandbox.install_unit(sampleapp::UNIT, &app.unit_file())?;
    let started = sandbox.systemctl(&["start", sampleapp::UNIT]);
    ensure!(
        started.status.success(),
        "cannot start {}: {}",
        sampleapp::UNIT,
        String::from_utf8_lossy(&started.stderr)
    );
    let toml = format!("{}{}\n", sandbox.agent_toml(None), app.agent_toml(&pg));
    let agent = TestAgent::start_with_toml(&root.join("agent"), toml).await;
    agent.ctl_config(&["operator"]);
    for dir in ["logs", "backup-ansible", "backup-bare", "ansible-home"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    // An empty XDG_RUNTIME_DIR for systemctl --user (see upgrade.yml).
    let runtime = root.join("systemctl-runtime");
    std::fs::create_dir_all(&runtime)?;
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let mut bench = Bench {
        root: root.to_owned(),
        agent,
        sandbox,
        pg,
        app,
        ansible: args.ansible.clone(),
        playbooks: args.playbooks.clone(),
        original: AppState::default(),
        runs: std::cell::Cell::new(0),
        bare_steps: Default::default(),
    };
    bench.wait_healthy(OLD_VERSION)?;
    bench.original = bench.state()?;
    ensure!(
        bench.original.env.contains(&format!("\n{OLD_KEY}=")),
        "the sample app's env file has no {OLD_KEY}"
    );
    bench.write_ansible_vars()?;
    Ok(bench)
}

/// What a leg must leave behind, read from the app itself.
#[derive(Default, Clone, PartialEq)]
struct AppState {
    env: String,
    columns: String,
    rows: String,
}

impl Bench {
    /// Upgrade then rollback with one peer; both timed (wall and CPU), both checked.
    fn leg_pair(&self, peer: Peer, report: &mut AgentReport) -> anyhow::Result<(Leg, Leg)> {
        let up = self.measured(|| match peer {
            Peer::Covetctl => self.covetctl_upgrade(report),
            Peer::Ansible => self.ansible_playbook("upgrade.yml"),
            Peer::Bare => self.bare_upgrade(),
        })?;
        self.check_upgraded(peer)?;
        let back = self.measured(|| match peer {
            Peer::Covetctl => {
                let (took, op) = self.covetctl(&["rollback", sampleapp::APP])?;
                let steps = report.rollback_steps.add(&op);
                println!("  covetctl rollback steps (ms): {steps}");
                Ok(took)
            }
            Peer::Ansible => self.ansible_playbook("rollback.yml"),
            Peer::Bare => self.bare_rollback(),
        })?;
        self.check_original(peer)?;
        Ok((up, back))
    }

    /// Runs a leg that returns its wall time; adds the CPU time it cost.
    fn measured(&self, leg: impl FnOnce() -> anyhow::Result<Duration>) -> anyhow::Result<Leg> {
        let before = self.cpu_used();
        let wall = leg()?;
        Ok(Leg {
            wall,
            cpu: self.cpu_used().saturating_sub(before),
        })
    }

    /// `covetctl upgrade`, with the agent's overhead and steps noted.
    fn covetctl_upgrade(&self, report: &mut AgentReport) -> anyhow::Result<Duration> {
        let (took, op) = self.covetctl(&[
            "upgrade",
            sampleapp::APP,
            "--to",
            NEW_VERSION,
            "--env-rename",
            &format!("{OLD_KEY}={NEW_KEY}"),
        ])?;
        let param = |k: &str| op["params"][k].as_str().and_then(|v| v.parse::<u64>().ok());
        let overhead = param("overhead_ms")
            .context("the upgrade operation has no params.overhead_ms (an older agent?)")?;
        report.overhead_ms.push(overhead);
        if let Some(total) = param("total_ms") {
            let wall = u64::try_from(took.as_millis())?;
            report.client_ms.push(wall.saturating_sub(total));
        }
        let steps = report.upgrade_steps.add(&op);
        println!("  covetctl upgrade steps (ms): {steps}; agent overhead {overhead} ms");
        Ok(took)
    }

    /// CPU time (user + system) used so far by this process's finished
    /// children (covetctl, ansible-playbook and its modules, bare commands)
    /// and by the agent with its finished children (pip, pg_dump, tar...).
    /// Less sensitive to a busy machine than wall time. Not counted, for
    /// every peer alike: the app, systemd and PostgreSQL's server.
    fn cpu_used(&self) -> Duration {
        // SAFETY: getrusage(2) fills the struct we own; zeroed is a valid rusage.
        let children = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            usage
        };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        tv(children.ru_utime) + tv(children.ru_stime) + self.agent_cpu()
    }

    /// The agent's utime + stime + cutime + cstime from /proc/PID/stat.
    fn agent_cpu(&self) -> Duration {
        let Some(pid) = self.agent.pid() else {
            return Duration::ZERO;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) end with ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime is field 14 of the whole line, i.e. index 11 after ')'.
        let ticks: u64 = fields
            .iter()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf(3) has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// Runs `covetctl -o json ARGS` as the operator; its wall time and the
    /// final operation it printed. Anything but exit 0 fails the bench.
    fn covetctl(&self, args: &[&str]) -> anyhow::Result<(Duration, serde_json::Value)> {
        let mut cmd = Command::new(covet_tests::bin("covetctl"));
        cmd.arg("--config")
            .arg(self.agent.dir.join("covetctl.toml"))
            .args(["--context", "operator", "-o", "json"])
            .args(args)
            .env_remove("COVETCTL_CONFIG");
        let what = format!("covetctl-{}", args[0]);
        let (took, log) = self.run_logged(cmd, &what)?;
        let stdout = std::fs::read_to_string(&log.stdout)?;
        let op: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("covetctl {} printed no JSON: {stdout}", args.join(" ")))?;
        // Exit 0 is covetctl's "succeeded" (3 rolled back, 4 needs a human).
        Ok((took, op))
    }

    /// Runs one playbook of the Ansible peer; its wall time.
    fn ansible_playbook(&self, playbook: &str) -> anyhow::Result<Duration> {
        let mut cmd = Command::new(self.ansible.join("bin/ansible-playbook"));
        cmd.args(["-i", "localhost,", "-c", "local"])
            .arg(self.playbooks.join(playbook))
            .arg("-e")
            .arg(format!(
                "@{}",
                self.root.join("ansible-vars.json").display()
            ))
            .env("ANSIBLE_CONFIG", self.playbooks.join("ansible.cfg"))
            .env("ANSIBLE_HOME", self.root.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", self.root.join("ansible-home/tmp"))
            .env("ANSIBLE_NOCOLOR", "1");
        for var in [
            "DBUS_SESSION_BUS_ADDRESS",
            "XDG_RUNTIME_DIR",
            "PYTHONPATH",
            "PYTHONHOME",
            "VIRTUAL_ENV",
            "PIP_CONFIG_FILE",
        ] {
            cmd.env_remove(var);
        }
        let what = format!("ansible-{}", playbook.trim_end_matches(".yml"));
        Ok(self.run_logged(cmd, &what)?.0)
    }

    /// What the playbooks are told (`-e @ansible-vars.json`).
    fn write_ansible_vars(&self) -> anyhow::Result<()> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let url = sampleapp::database_url(&self.pg, &self.app.db, &self.app.db_user);
        let vars = serde_json::json!({
            "ansible_python_interpreter": path(&self.ansible.join("bin/python")),
            "venv": path(&self.app.venv),
            "env_file": path(&self.app.env_file),
            "wheelhouse": path(&self.app.wheelhouse),
            "backup_dir": path(&self.root.join("backup-ansible")),
            "package": sampleapp::PACKAGE,
            "old_version": OLD_VERSION,
            "new_version": NEW_VERSION,
            "env_old_key": OLD_KEY,
            "env_new_key": NEW_KEY,
            // What the env file will say once renamed: the migration's environment.
            "migrate_env": { NEW_KEY: url },
            "db_name": self.app.db,
            "pg_socket_dir": path(&self.pg.socket_dir()),
            "pg_port": self.pg.port(),
            "unit": sampleapp::UNIT,
            "bus_address": self.sandbox.bus_address(),
            "systemctl_runtime_dir": path(&self.root.join("systemctl-runtime")),
            "health_url": self.app.url("/health"),
            "api_url": self.app.url("/api"),
        });
        std::fs::write(
            self.root.join("ansible-vars.json"),
            serde_json::to_string_pretty(&vars)?,
        )?;
        Ok(())
    }

    /// The upgrade as bare commands: tar, pg_dump, pip, the env rename
    /// (in Rust, as a `sed -i` would), migrate, systemctl restart, /health.
    fn bare_upgrade(&self) -> anyhow::Result<Duration> {
        let backup = self.root.join("backup-bare");
        let started = Instant::now();
        self.bare("tar", self.tar_venv(&backup.join("venv.tar.zst")))?;
        std::fs::copy(&self.app.env_file, backup.join("app.env"))?;
        let mut dump = self.pg_tool("pg_dump");
        dump.arg("-Fc")
            .arg("-f")
            .arg(backup.join("db.pgc"))
            .arg(&self.app.db);
        self.bare("pg_dump", dump)?;
        self.bare("pip", self.pip(NEW_VERSION))?;
        rename_env_key(&self.app.env_file, OLD_KEY, NEW_KEY)?;
        let mut migrate = Command::new(self.app.venv.join("bin/covet"));
        migrate.arg("migrate").env_clear().envs(self.app.env()?);
        self.bare("migrate", migrate)?;
        self.bare("restart", self.systemctl("restart"))?;
        let polled = Instant::now();
        self.poll_health(NEW_VERSION)?;
        self.bare_step("health", polled.elapsed());
        let (status, _) = self.app.get("/api")?;
        ensure!(status == 200, "bare: GET /api answered {status}");
        Ok(started.elapsed())
    }

    /// The rollback as bare commands: stop, pip back, the kept env file,
    /// pg_restore --clean, start, /health.
    fn bare_rollback(&self) -> anyhow::Result<Duration> {
        let backup = self.root.join("backup-bare");
        let started = Instant::now();
        self.bare("stop", self.systemctl("stop"))?;
        self.bare("pip back", self.pip(OLD_VERSION))?;
        let staged = self.app.env_file.with_extension("env.restore");
        std::fs::copy(backup.join("app.env"), &staged)?;
        std::fs::rename(&staged, &self.app.env_file)?;
        let mut restore = self.pg_tool("pg_restore");
        restore
            .args(["--clean", "--if-exists", "-d", &self.app.db])
            .arg(backup.join("db.pgc"));
        self.bare("pg_restore", restore)?;
        self.bare("start", self.systemctl("start"))?;
        let polled = Instant::now();
        self.poll_health(OLD_VERSION)?;
        self.bare_step("health back", polled.elapsed());
        Ok(started.elapsed())
    }

    fn tar_venv(&self, archive: &Path) -> Command {
        let mut cmd = Command::new("tar");
        cmd.args(["--zstd", "-cf"])
            .arg(archive)
            .arg("-C")
            .arg(self.app.venv.parent().unwrap_or(Path::new("/")))
            .arg(self.app.venv.file_name().unwrap_or_default());
        cmd
    }

    /// `pg_dump`/`pg_restore` connected as `postgres` over the cluster's
    /// socket: `TOOL -h SOCKET -p PORT -U postgres`; the caller adds the rest.
    fn pg_tool(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.pg.bindir().join(tool));
        cmd.arg("-h").arg(self.pg.socket_dir()).args([
            "-p",
            &self.pg.port().to_string(),
            "-U",
            "postgres",
        ]);
        cmd
    }

    fn pip(&self, version: &str) -> Command {
        let mut cmd = Command::new(self.app.venv.join("bin/pip"));
        cmd.args([
            "install",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
        ])
        .arg(&self.app.wheelhouse)
        .arg(format!("{}=={version}", sampleapp::PACKAGE))
        .env_remove("PIP_CONFIG_FILE")
        .env_remove("VIRTUAL_ENV");
        cmd
    }

    /// `systemctl --user VERB covet.service` over the sandbox's bus.
    fn systemctl(&self, verb: &str) -> Command {
        let mut cmd = Command::new("systemctl");
        cmd.args(["--user", "--no-pager", verb, sampleapp::UNIT])
            .env("DBUS_SESSION_BUS_ADDRESS", self.sandbox.bus_address())
            .env_remove("XDG_RUNTIME_DIR");
        cmd
    }

    fn bare(&self, what: &str, cmd: Command) -> anyhow::Result<()> {
        let (took, _) = self.run_logged(cmd, &format!("bare-{}", what.replace(' ', "-")))?;
        self.bare_step(what, took);
        Ok(())
    }

    fn bare_step(&self, what: &str, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        self.bare_steps.borrow_mut().push(what, ms);
    }

    /// Runs `cmd` with its output in `logs/NNN-what.{out,err}`, bounded by
    /// [`LEG_TIMEOUT`]; its wall time. A non-zero exit fails with the log.
    fn run_logged(&self, mut cmd: Command, what: &str) -> anyhow::Result<(Duration, RunLog)> {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let base = self.root.join("logs").join(format!("{n:03}-{what}"));
        let log = RunLog {
            stdout: base.with_extension("out"),
            stderr: base.with_extension("err"),
        };
        cmd.stdin(Stdio::null())
            .stdout(File::create(&log.stdout)?)
            .stderr(File::create(&log.stderr)?);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > LEG_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} did not finish within {LEG_TIMEOUT:?}\n{}",
                    log.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = started.elapsed();
        ensure!(status.success(), "{what} failed ({status})\n{}", log.tail());
        Ok((took, log))
    }

    /// Polls /health until it serves `version` with status ok.
    fn poll_health(&self, version: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Ok((200, body)) = self.app.get("/health")
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&body)
                && json["status"] == "ok"
                && json["version"] == version
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "/health did not serve {version} within {HEALTH_TIMEOUT:?}"
            );
            std::thread::sleep(BARE_POLL);
        }
    }

    fn wait_healthy(&self, version: &str) -> anyhow::Result<()> {
        self.poll_health(version).with_context(|| {
            format!(
                "the sample app before the bench ({})",
                self.app.url("/health")
            )
        })
    }

    fn state(&self) -> anyhow::Result<AppState> {
        Ok(AppState {
            env: std::fs::read_to_string(&self.app.env_file)?,
            columns: self.pg.psql(
                &self.app.db,
                "SELECT column_name FROM information_schema.columns \
                 WHERE table_name = 'users' ORDER BY 1",
            )?,
            rows: self.pg.psql(
                &self.app.db,
                "SELECT count(*), md5(string_agg(id || email, ',' ORDER BY id)) FROM users",
            )?,
        })
    }

    /// After an upgrade leg: 0.2.0 serves and is healthy, the env file names
    /// the new key only, the migration added users.last_login, no row was lost.
    fn check_upgraded(&self, peer: Peer) -> anyhow::Result<()> {
        let who = peer.name();
        self.expect_serving(who, NEW_VERSION)?;
        let now = self.state()?;
        ensure!(
            now.env.contains(&format!("\n{NEW_KEY}=")) && !now.env.contains(&format!("{OLD_KEY}=")),
            "{who} upgrade: the env file does not name {NEW_KEY} instead of {OLD_KEY}:\n{}",
            now.env
        );
        ensure!(
            now.columns.lines().any(|c| c == "last_login"),
            "{who} upgrade: users.last_login is missing (the migration did not run)"
        );
        ensure!(
            now.rows == self.original.rows,
            "{who} upgrade: the users changed: {} -> {}",
            self.original.rows.trim(),
            now.rows.trim()
        );
        Ok(())
    }

    /// After a rollback leg: 0.1.9 serves, and the env file (byte for
    /// byte), the schema and the rows are as before the upgrade.
    fn check_original(&self, peer: Peer) -> anyhow::Result<()> {
        let who = peer.name();
        self.expect_serving(who, OLD_VERSION)?;
        let now = self.state()?;
        ensure!(
            now.env == self.original.env,
            "{who} rollback: the env file is not as before:\n{}",
            now.env
        );
        ensure!(
            now.columns == self.original.columns,
            "{who} rollback: the users table's columns are {:?}, were {:?}",
            now.columns,
            self.original.columns
        );
        ensure!(
            now.rows == self.original.rows,
            "{who} rollback: the users are not as before"
        );
        Ok(())
    }

    fn expect_serving(&self, who: &str, version: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .app
            .get("/health")
            .with_context(|| format!("{who}: GET /health"))?;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        ensure!(
            status == 200 && json["status"] == "ok" && json["version"] == version,
            "{who}: /health answers {status} {body}, expected {version} and status ok"
        );
        let active = self.sandbox.systemctl(&["is-active", sampleapp::UNIT]);
        ensure!(
            String::from_utf8_lossy(&active.stdout).trim() == "active",
            "{who}: {} is not active",
            sampleapp::UNIT
        );
        Ok(())
    }
}

/// Where one run's output went.
struct RunLog {
    stdout: PathBuf,
    stderr: PathBuf,
}

impl RunLog {
    /// The last lines of both, for an error message.
    fn tail(&self) -> String {
        let last = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- {}:\n{}\n--- {}:\n{}",
            self.stdout.display(),
            last(&self.stdout),
            self.stderr.display(),
            last(&self.stderr)
        )
    }
}

/// A step name without the sandbox's directories in it.
fn short_step_name(name: &str) -> String {
    name.split(' ')
        .map(|word| match word.rsplit_once('/') {
            Some((_, last)) if word.starts_with('/') => last,
            _ => word,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Renames `old=` to `new=` on every line that sets `old`, as `sed -i
/// 's/^OLD=/NEW=/'` would (written beside and renamed over).
fn rename_env_key(path: &Path, old: &str, new: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let prefix = format!("{old}=");
    let renamed: String = text
        .split_inclusive('\n')
        .map(|line| match line.strip_prefix(&prefix) {
            Some(rest) => format!("{new}={rest}"),
            None => line.to_owned(),
        })
        .collect();
    let staged = path.with_extension("env.edit");
    std::fs::write(&staged, renamed)?;
    std::fs::set_permissions(&staged, std::fs::metadata(path)?.permissions())?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

fn print_table(samples: &[Samples], report: &AgentReport, rounds: u32) {
    let [ctl, ansible, bare] = [0, 1, 2].map(|i| &samples[i]);
    println!(
        "\nmedians of {rounds} rounds (min-max); wall time from process start to exit, \
         CPU time of the leg's processes (see cpu_used):"
    );
    println!(
        "| leg | covetctl | ansible-playbook | bare commands | ansible / covetctl | covetctl / bare |"
    );
    println!("|---|---|---|---|---|---|");
    type Pick = fn(&Samples) -> &Vec<Duration>;
    let rows: [(&str, Pick); 4] = [
        ("upgrade", |s| &s.upgrade),
        ("rollback", |s| &s.rollback),
        ("upgrade, CPU time", |s| &s.upgrade_cpu),
        ("rollback, CPU time", |s| &s.rollback_cpu),
    ];
    for (leg, pick) in rows {
        let (c, a, b) = (median(pick(ctl)), median(pick(ansible)), median(pick(bare)));
        // The targets are on wall time.
        let target = if leg.contains("CPU") {
            String::new()
        } else {
            let met = if ratio(a, c) >= SPEEDUP_TARGET {
                "met"
            } else {
                "not met"
            };
            format!(" (target >= {SPEEDUP_TARGET:.0}x: {met})")
        };
        println!(
            "| {leg} | {} | {} | {} | {:.2}x{target} | {:.2} |",
            spread(pick(ctl)),
            spread(pick(ansible)),
            spread(pick(bare)),
            ratio(a, c),
            ratio(c, b),
        );
    }
    let overhead = median_u64(&report.overhead_ms);
    let (lo, hi) = min_max_u64(&report.overhead_ms);
    println!(
        "\nagent overhead per upgrade (params.overhead_ms: total − waiting on programs, systemd, the app): \
         {overhead} ms median ({lo}–{hi}); target < {OVERHEAD_TARGET_MS} ms; ratio to target {:.2} ({})",
        overhead as f64 / OVERHEAD_TARGET_MS as f64,
        if overhead < OVERHEAD_TARGET_MS {
            "met"
        } else {
            "not met"
        }
    );
    if !report.client_ms.is_empty() {
        println!(
            "covetctl outside the operation (process, mTLS connect, following events): {} ms median",
            median_u64(&report.client_ms)
        );
    }
    println!(
        "covetctl upgrade steps, medians: {}",
        report.upgrade_steps.medians()
    );
    println!(
        "covetctl rollback steps, medians: {}",
        report.rollback_steps.medians()
    );
}

/// `/proc/loadavg`'s first three fields: a busy machine slows every peer,
/// Ansible's Python most.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn min_max_u64(v: &[u64]) -> (u64, u64) {
    (
        v.iter().copied().min().unwrap_or_default(),
        v.iter().copied().max().unwrap_or_default(),
    )
}

fn spread(v: &[Duration]) -> String {
    let lo = v.iter().min().copied().unwrap_or_default();
    let hi = v.iter().max().copied().unwrap_or_default();
    format!("{} ({}–{})", secs(median(v)), secs(lo), secs(hi))
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
