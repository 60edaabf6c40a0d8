//! The sample app: a stdlib-only stand-in for CovetPy, built from
//! `tests/fixtures/covetpy/` into six wheels and installed in a real
//! virtualenv, for the agent's upgrade and rollback tests.
//!
//! - 0.1.9 reads `DATABASE_URI`; migration `0001_create_users`.
//! - 0.2.0 reads `DATABASE_URL` (and refuses to start without it); adds
//!   `0002_add_users_last_login`.
//! - 0.2.1 adds `0003_add_users_flags` (it succeeds), but its `/health`
//!   answers 500: an upgrade to it must be rolled back.
//! - 0.1.10, 0.1.11 and 0.1.12 are healthy 0.1 releases (no env change) for
//!   metric analysis: 0.1.10 is good, 0.1.11 answers every request but
//!   `/health` 200 ms late, 0.1.12 fails one `/version` in 8 with a 500.
//!
//! Every release exports `/metrics` (Prometheus text):
//! `http_requests_total{code,path}`, the `http_request_duration_seconds`
//! histogram and `active_connections`; `GET /version` needs no database
//! (what load tests hit).
//!
//! `covet serve` answers `GET /health` (200 `{"status":"ok","version":V,"db":"ok"}`,
//! 503 when the database does not answer), `GET /api` (`{"version":V,"users":N}`)
//! and `GET /api/users/count` (`{"count":N}`), and logs one stdout line per request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::postgres::PostgresCluster;
use crate::sandbox::die_with_parent;

/// The interpreter that builds the wheels and the virtualenvs.
pub const PYTHON: &str = "/usr/bin/python3";
/// The releases in the wheelhouse, oldest first.
pub const VERSIONS: [&str; 6] = ["0.1.9", "0.2.0", "0.2.1", "0.1.10", "0.1.11", "0.1.12"];
/// The version [`install`] sets up.
pub const BASE_VERSION: &str = "0.1.9";
/// The pip distribution name.
pub const PACKAGE: &str = "covetpy";
/// The app's name in the agent configuration and its systemd unit.
pub const APP: &str = "covet";
pub const UNIT: &str = "covet.service";
/// The database [`install`] creates, and the role that owns it.
pub const DB_NAME: &str = "covet_production";
pub const DB_USER: &str = "covet_app";

const BUILD_TIMEOUT: Duration = Duration::from_secs(30);
const VENV_TIMEOUT: Duration = Duration::from_secs(60);
const PIP_TIMEOUT: Duration = Duration::from_secs(60);
const COVET_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `tests/fixtures/covetpy`.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/covetpy")
}

/// Builds the three wheels into `dir` (running build_wheels.py with
/// /usr/bin/python3) and returns the wheelhouse path. Not cached: a build
/// takes well under a second.
pub fn build_wheelhouse(dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(dir).context("wheelhouse dir")?;
    let mut cmd = python();
    cmd.arg(fixture_dir().join("build_wheels.py")).arg(&dir);
    check(run_bounded(&mut cmd, BUILD_TIMEOUT)?, "build_wheels.py")?;
    for version in VERSIONS {
        let wheel = dir.join(wheel_name(version));
        ensure!(
            wheel.is_file(),
            "build_wheels.py did not write {}",
            wheel.display()
        );
    }
    Ok(dir)
}

/// File name of the wheel for `version`.
pub fn wheel_name(version: &str) -> String {
    format!("{PACKAGE}-{version}-py3-none-any.whl")
}

/// A virtualenv at `venv` with covetpy==version installed from the
/// wheelhouse (python3 -m venv; pip --no-index --find-links;
/// --disable-pip-version-check; bounded time). The venv has its own pip.
///
/// With Debian's bundled pip wheel ([`DEBIAN_WHEELS`]), the venv is
/// made `--without-pip` and that wheel's pip installs itself and covetpy in
/// one run: a second faster than ensurepip, which also runs pip to install
/// pip and setuptools. Elsewhere: plain `python3 -m venv`, then pip.
pub fn make_venv(venv: &Path, wheelhouse: &Path, version: &str) -> anyhow::Result<()> {
    let bundled_pip = bundled_pip_wheel();
    let mut cmd = python();
    cmd.args(["-m", "venv"]);
    if bundled_pip.is_some() {
        cmd.arg("--without-pip");
    }
    check(run_bounded(cmd.arg(venv), VENV_TIMEOUT)?, "python3 -m venv")?;
    let Some(wheel) = bundled_pip else {
        return pip_install(venv, wheelhouse, version);
    };
    // A pip wheel runs as `python pip-X.whl/pip`: it installs itself from it.
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(wheel.join("pip"))
        .args(PIP_INSTALL)
        .arg(wheelhouse)
        .args(["--find-links", DEBIAN_WHEELS, "pip"])
        .arg(format!("{PACKAGE}=={version}"));
    clean_python_env(&mut cmd);
    check(
        run_bounded(&mut cmd, PIP_TIMEOUT)?,
        "pip install (bundled pip)",
    )?;
    Ok(())
}

/// Where Debian keeps the wheels that `python3 -m venv` seeds venvs with.
const DEBIAN_WHEELS: &str = "/usr/share/python-wheels";

/// Debian's pip wheel for venvs (package python3-pip-whl), if installed.
fn bundled_pip_wheel() -> Option<PathBuf> {
    std::fs::read_dir(DEBIAN_WHEELS)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pip-") && n.ends_with(".whl"))
        })
}

/// `pip install` flags: offline, quiet about pip itself, no cache, no config;
/// the wheelhouse (`--find-links DIR`) goes next.
const PIP_INSTALL: [&str; 7] = [
    "install",
    "--isolated",
    "--no-input",
    "--no-cache-dir",
    "--disable-pip-version-check",
    "--no-index",
    "--find-links",
];

/// Installs covetpy==version into an existing virtualenv (an upgrade or a
/// downgrade), as an operator would with the venv's pip.
pub fn pip_install(venv: &Path, wheelhouse: &Path, version: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(venv.join("bin/pip"));
    cmd.args(PIP_INSTALL)
        .arg(wheelhouse)
        .arg(format!("{PACKAGE}=={version}"));
    clean_python_env(&mut cmd);
    check(run_bounded(&mut cmd, PIP_TIMEOUT)?, "pip install")?;
    Ok(())
}

/// The systemd unit text for the app: Type=simple, ExecStart={venv}/bin/covet
/// serve, EnvironmentFile={env_file}, Environment=COVET_BIND=127.0.0.1:{port},
/// Restart=no (the agent decides); no User= (tests run as root).
pub fn unit_file(venv: &Path, env_file: &Path, port: u16) -> String {
    format!(
        "[Unit]\n\
         Description=CovetPy sample app (covet-agent tests)\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={covet} serve\n\
         EnvironmentFile={env_file}\n\
         Environment=COVET_BIND=127.0.0.1:{port}\n\
         Restart=no\n",
        covet = venv.join("bin/covet").display(),
        env_file = env_file.display(),
    )
}

/// Writes the env file for 0.1.9 (DATABASE_URI=postgresql://...) for the
/// cluster and database.
pub fn write_env_file(
    path: &Path,
    pg: &PostgresCluster,
    db: &str,
    user: &str,
) -> anyhow::Result<()> {
    let text = format!(
        "# CovetPy 0.1.x settings (written by covet-tests)\n\
         DATABASE_URI={}\n",
        database_url(pg, db, user)
    );
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The database URL for a cluster/db/user (the value that goes in
/// DATABASE_URI / DATABASE_URL): `postgresql://USER@/DB?host=SOCKET_DIR&port=PORT`
/// (unix socket, no password: trust authentication).
pub fn database_url(pg: &PostgresCluster, db: &str, user: &str) -> String {
    format!(
        "postgresql://{}@/{}?host={}&port={}",
        percent_encode(user),
        percent_encode(db),
        percent_encode(&pg.socket_dir().to_string_lossy()),
        pg.port()
    )
}

/// Escapes all but unreserved characters and `/` (the app decodes with `parse_qs`).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A complete installed app for a test (see [`install`]).
#[derive(Debug, Clone)]
pub struct SampleApp {
    pub root: PathBuf,
    pub venv: PathBuf,
    pub env_file: PathBuf,
    pub wheelhouse: PathBuf,
    pub port: u16,
    pub db: String,
    pub db_user: String,
}

/// A complete installed app at 0.1.9 for a test: wheelhouse, venv, env file,
/// database created (owner `user`) and migrated (runs `covet migrate` with
/// the env), with `rows` users inserted; returns paths and the port.
///
/// Layout: `root/{wheelhouse,venv,covet.env}`; database [`DB_NAME`] owned by
/// [`DB_USER`]; the port is free on 127.0.0.1 (nothing listens yet).
pub fn install(root: &Path, pg: &PostgresCluster, rows: u32) -> anyhow::Result<SampleApp> {
    let root = std::path::absolute(root).context("app root")?;
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let app = SampleApp {
        wheelhouse: build_wheelhouse(&root.join("wheelhouse"))?,
        venv: root.join("venv"),
        env_file: root.join("covet.env"),
        port: crate::try_free_port()?,
        db: DB_NAME.to_owned(),
        db_user: DB_USER.to_owned(),
        root,
    };
    make_venv(&app.venv, &app.wheelhouse, BASE_VERSION)?;
    pg.create_db(&app.db, &app.db_user)?;
    write_env_file(&app.env_file, pg, &app.db, &app.db_user)?;
    check(app.covet(&["migrate"])?, "covet migrate")?;
    if rows > 0 {
        pg.psql(
            &app.db,
            &format!(
                "INSERT INTO users (email) \
                 SELECT 'user' || g || '@example.com' FROM generate_series(1, {rows}) g"
            ),
        )?;
    }
    Ok(app)
}

impl SampleApp {
    /// The `[[app]]` TOML block for the agent config: name "covet", unit
    /// "covet.service", paths [venv, env_file], env_file, [app.package],
    /// [app.database] (socket dir as host, os_user "postgres"), [app.migrate]
    /// (absolute commands), [app.health] (JSON `status` must be `ok`) and one
    /// [[app.smoke]] on /api.
    pub fn agent_toml(&self, pg: &PostgresCluster) -> String {
        self.agent_toml_with(&format!(
            r#"kind = "postgres"
dbname = {db}
host = {host}
port = {pg_port}
user = {db_user}
os_user = "postgres""#,
            db = toml_str(&self.db),
            host = toml_path(&pg.socket_dir()),
            pg_port = pg.port(),
            db_user = toml_str(&self.db_user),
        ))
    }

    /// [`SampleApp::agent_toml`] with `database` as the body of [app.database].
    pub fn agent_toml_with(&self, database: &str) -> String {
        let venv = toml_path(&self.venv);
        let env_file = toml_path(&self.env_file);
        let covet = toml_path(&self.venv.join("bin/covet"));
        format!(
            r#"
[[app]]
name = "{APP}"
unit = "{UNIT}"
paths = [{venv}, {env_file}]
env_file = {env_file}
env_keys = ["DATABASE_*", "COVET_*"]
run_hooks_as_root = true

[app.package]
kind = "pip"
name = "{PACKAGE}"
venv = {venv}
find_links = [{wheelhouse}]

[app.database]
{database}

[app.migrate]
command = [{covet}, "migrate"]
dry_run = [{covet}, "migrate", "--dry-run"]
timeout = "60s"

[app.health]
url = "{health}"
timeout = "2s"
retries = 20
interval = "250ms"
json_field = "status"
json_value = "ok"

[[app.smoke]]
name = "api"
url = "{api}"
timeout = "2s"
"#,
            wheelhouse = toml_path(&self.wheelhouse),
            health = self.url("/health"),
            api = self.url("/api"),
        )
    }

    /// `[app.metrics]` (this app's `/metrics`, judged every 2 s after a 4 s
    /// baseline) and three `[[app.analysis]]` rules: "error rate" (5xx
    /// share, max 2%), "p99 latency" (at most 10x the baseline) and "db
    /// connections" (max 50). Appended after [`SampleApp::agent_toml`].
    pub fn analysis_toml(&self) -> String {
        format!(
            r#"
[app.metrics]
url = "{metrics}"
interval = "2s"
baseline = "4s"

[[app.analysis]]
name = "error rate"
ratio = {{ num = 'http_requests_total{{code=~"5.."}}', den = "http_requests_total" }}
max = 0.02

[[app.analysis]]
name = "p99 latency"
quantile = {{ histogram = "http_request_duration_seconds", q = 0.99 }}
max_increase = "900%"

[[app.analysis]]
name = "db connections"
postgres = "connections"
max = 50
"#,
            metrics = self.url("/metrics"),
        )
    }

    /// The unit text for this app ([`unit_file`]).
    pub fn unit_file(&self) -> String {
        unit_file(&self.venv, &self.env_file, self.port)
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Installs another version into the venv with pip (no migration, no restart).
    pub fn pip_install(&self, version: &str) -> anyhow::Result<()> {
        pip_install(&self.venv, &self.wheelhouse, version)
    }

    /// Runs `venv/bin/covet ARGS` with exactly the env file's variables for
    /// the database (as systemd would pass them) and bounded time.
    pub fn covet(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(self.venv.join("bin/covet"));
        cmd.args(args)
            .env_remove("DATABASE_URI")
            .env_remove("DATABASE_URL")
            .env_remove("COVET_BIND");
        clean_python_env(&mut cmd);
        cmd.envs(self.env()?);
        run_bounded(&mut cmd, COVET_TIMEOUT)
    }

    /// The env file's `KEY=VALUE` lines (comments and blank lines skipped).
    pub fn env(&self) -> anyhow::Result<Vec<(String, String)>> {
        let text = std::fs::read_to_string(&self.env_file)
            .with_context(|| format!("read {}", self.env_file.display()))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect())
    }

    /// Sets `key=value` in the env file, replacing a line for `key` if there is one.
    pub fn set_env(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.env_file)
            .with_context(|| format!("read {}", self.env_file.display()))?;
        let line = format!("{key}={value}");
        let mut found = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| match l.split_once('=') {
                Some((k, _)) if k.trim() == key => {
                    found = true;
                    line.clone()
                }
                _ => l.to_owned(),
            })
            .collect();
        if !found {
            lines.push(line);
        }
        std::fs::write(&self.env_file, lines.join("\n") + "\n")
            .with_context(|| format!("write {}", self.env_file.display()))
    }

    /// `GET path` on the app: status and body.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.port, path)
    }

    /// `GET path` as JSON, retried until the app answers (it may still be
    /// starting) or `timeout` passes. Any status counts as an answer.
    pub fn wait_json(
        &self,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.get(path) {
                Ok((status, body)) => {
                    let json = serde_json::from_str(&body)
                        .with_context(|| format!("GET {path} -> {status}: not JSON: {body}"))?;
                    return Ok((status, json));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("GET {path}: no answer within {timeout:?}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A minimal HTTP/1.0 `GET http://127.0.0.1:{port}{path}`: status and body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed HTTP status line: {head:?}"))?;
    Ok((status, body.to_owned()))
}

pub(crate) fn python() -> Command {
    let mut cmd = Command::new(PYTHON);
    clean_python_env(&mut cmd);
    cmd
}

/// Keeps the caller's Python settings (an activated venv, PYTHONPATH, pip
/// configuration) out of the fixture's interpreters.
fn clean_python_env(cmd: &mut Command) {
    for var in ["PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_CONFIG_FILE"] {
        cmd.env_remove(var);
    }
}

fn toml_str(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(crate) fn toml_path(path: &Path) -> String {
    toml_str(&path.to_string_lossy())
}

/// Fails with the command's output unless it exited 0.
pub(crate) fn check(out: Output, what: &str) -> anyhow::Result<Output> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Runs `cmd` to completion with captured output, killing it after `timeout`
/// (or when the test process dies).
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}
