//! A throwaway MariaDB server per test, from Debian's packages
//! (`mariadb-server`, `mariadb-client`): its own data directory, run by the
//! `mysql` user (as the packaged service is), reachable only through a unix
//! socket in its own directory (`--skip-networking`), stopped when dropped.
//!
//! `mariadb-install-db` runs once per server version into a template data
//! directory, copied for each server (an install takes seconds). The server
//! is this process's own child, started through `setpriv --pdeathsig=KILL`,
//! so that it dies with the test even when the test process is killed.
//! root logs in by unix-socket authentication (the tests run as root); the
//! accounts the tests make have passwords, given to the agent in a
//! defaults file.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::sandbox::{
    as_system_user, run_as_system_user, spawn_tied_to_process, start_or_skip, stop_server,
    system_user_ids,
};

/// The OS user that runs the server.
const MY_USER: &str = "mysql";
/// `sun_path` holds 108 bytes; the socket is `DIR/my/sock`.
const MAX_DIR_LEN: usize = 90;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const SQL_TIMEOUT: Duration = Duration::from_secs(60);
const SERVER: &str = "/usr/sbin/mariadbd";
const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const CLIENT: &str = "/usr/bin/mariadb";

pub struct MariaDb {
    /// `DIR/my`, owned by the mysql user: `data/`, the socket, `server.log`.
    root: PathBuf,
    server: Option<Child>,
}

fn my_user() -> Option<(u32, u32)> {
    system_user_ids(MY_USER)
}

fn probe() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (the server runs as `mysql` via setpriv)".into());
    }
    if my_user().is_none() {
        return Some(format!(
            "no `{MY_USER}` user (Debian package mariadb-server)"
        ));
    }
    for (path, package) in [
        (SERVER, "mariadb-server"),
        (INSTALL_DB, "mariadb-server"),
        (CLIENT, "mariadb-client"),
        ("/usr/bin/mariadb-dump", "mariadb-client"),
        ("/usr/bin/setpriv", "util-linux"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{path} is missing (Debian package {package})"));
        }
    }
    None
}

/// A data directory made by `mariadb-install-db` once per server version
/// (kept in the temporary directory, shared by the test processes: nextest
/// runs each test in its own), owned by the mysql user; servers start from
/// copies of it.
fn template() -> anyhow::Result<PathBuf> {
    let out = Command::new(SERVER)
        .arg("--version")
        .output()
        .context("mariadbd --version")?;
    let version: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .take(80)
        .collect();
    let dir = std::env::temp_dir().join(format!("covet-mariadb-template-{version}"));
    if dir.join("data/mysql").is_dir() {
        return Ok(dir.join("data"));
    }
    let (uid, gid) = my_user().context("mysql user")?;
    // Made aside, then renamed in place: a concurrent test makes its own.
    let work = std::env::temp_dir().join(format!(
        "covet-mariadb-template-{version}.{}.tmp",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    fs::set_permissions(&work, fs::Permissions::from_mode(0o711))?;
    let data = work.join("data");
    fs::create_dir_all(&data)?;
    chown(&data, Some(uid), Some(gid))?;
    let out = run_as_mysql(&[
        INSTALL_DB,
        "--no-defaults",
        &format!("--datadir={}", data.display()),
        "--auth-root-authentication-method=socket",
        "--auth-root-socket-user=root",
        "--skip-test-db",
        "--skip-name-resolve",
    ])
    .context("run mariadb-install-db")?;
    ensure!(
        out.status.success(),
        "mariadb-install-db failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if fs::rename(&work, &dir).is_err() {
        // Another test was first.
        let _ = fs::remove_dir_all(&work);
    }
    ensure!(
        dir.join("data/mysql").is_dir(),
        "no template in {}",
        dir.display()
    );
    Ok(dir.join("data"))
}

impl MariaDb {
    /// None when this machine can run servers; Some(reason) otherwise.
    pub fn unavailable() -> Option<String> {
        static PROBE: OnceLock<Option<String>> = OnceLock::new();
        PROBE.get_or_init(probe).clone()
    }

    /// A server in `dir/my` from a copy of the template data directory;
    /// waits (at most 60 s) until it answers.
    pub fn start(dir: &Path) -> anyhow::Result<MariaDb> {
        if let Some(why) = Self::unavailable() {
            bail!("MariaDB unavailable: {why}");
        }
        let (uid, gid) = my_user().context("mysql user")?;
        let dir = std::path::absolute(dir).context("server dir")?;
        let len = dir.as_os_str().len();
        ensure!(
            len <= MAX_DIR_LEN,
            "server dir {} is {len} bytes long, more than {MAX_DIR_LEN}: its socket would not fit",
            dir.display()
        );
        fs::create_dir_all(&dir)?;
        let mode = fs::metadata(&dir)?.permissions().mode();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o001))?;
        let root = dir.join("my");
        fs::create_dir_all(&root)?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        chown(&root, Some(uid), Some(gid))?;
        let template = template()?;
        let data = root.join("data");
        let out = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .output()
            .context("copy the template data directory")?;
        ensure!(
            out.status.success(),
            "cp -a {}: {}",
            template.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let log_path = root.join("server.log");
        fs::File::create(&log_path)?;
        chown(&log_path, Some(uid), Some(gid))?;
        let mut server = MariaDb { root, server: None };
        let mut cmd = as_mysql(&[
            SERVER,
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            &format!("--socket={}", server.socket().display()),
            &format!("--pid-file={}", server.root.join("pid").display()),
            &format!("--log-error={}", log_path.display()),
            "--skip-networking",
            "--skip-name-resolve",
            "--skip-log-bin",
            // Throwaway data: skip the disk flushes, stay small.
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=32M",
            "--performance-schema=OFF",
        ]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        server.server = Some(spawn_tied_to_process(cmd).context("spawn mariadbd")?);
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = &mut self.server
                && let Some(status) = child.try_wait()?
            {
                bail!("mariadbd exited with {status} at start:\n{}", self.log());
            }
            if self.socket().exists() && self.sql("", "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd not ready after {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The server's error log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// Runs `sql` as root (unix-socket authentication) on `db` (none if
    /// empty); its output, tab-separated, no column names, raw values
    /// (invalid UTF-8 replaced).
    pub fn sql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let mut cmd = Command::new(CLIENT);
        cmd.args(["--no-defaults", "--batch", "--raw", "--skip-column-names"])
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--user=root", "--default-character-set=utf8mb4"]);
        if !db.is_empty() {
            cmd.arg(format!("--database={db}"));
        }
        cmd.args(["-e", sql]).stdin(Stdio::null());
        let out = crate::sampleapp::run_bounded(&mut cmd, SQL_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "mariadb on {db:?} failed ({}): {sql}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Binary columns are not text: lossy (compare them with CHECKSUM TABLE).
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates database `db` and account `user`@`localhost` with
    /// `password`, given every privilege on `db` only.
    pub fn create_db(&self, db: &str, user: &str, password: &str) -> anyhow::Result<()> {
        self.sql(
            "",
            &format!(
                "CREATE DATABASE `{db}`; CREATE USER IF NOT EXISTS '{user}'@'localhost' \
                 IDENTIFIED BY '{password}'; GRANT ALL ON `{db}`.* TO '{user}'@'localhost';"
            ),
        )
        .map(drop)
    }

    /// An account with `password` and the given GRANT clauses
    /// (`"ALL ON *.*"`, `"SELECT ON shop.*"`...).
    pub fn create_user(&self, user: &str, password: &str, grants: &[&str]) -> anyhow::Result<()> {
        let mut sql =
            format!("CREATE USER IF NOT EXISTS '{user}'@'localhost' IDENTIFIED BY '{password}';");
        for g in grants {
            sql.push_str(&format!(" GRANT {g} TO '{user}'@'localhost';"));
        }
        self.sql("", &sql).map(drop)
    }

    /// Writes an option file (mode 0600) for `user`: `[client] user=
    /// password= socket=`.
    pub fn defaults_file(&self, path: &Path, user: &str, password: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        write!(
            file,
            "[client]\nuser={user}\npassword={password}\nsocket={}\n",
            self.socket().display()
        )?;
        Ok(())
    }
}

fn as_mysql(args: &[&str]) -> Command {
    as_system_user(MY_USER, args)
}

fn run_as_mysql(args: &[&str]) -> std::io::Result<Output> {
    run_as_system_user(MY_USER, args)
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(child) = self.server.take() {
            let what = format!("mariadbd {}", self.root.display());
            stop_server(child, libc::SIGTERM, STOP_TIMEOUT, &what);
        }
    }
}

/// For tests: a server, or None after printing "SKIPPED: <why>" to stderr
/// when this machine cannot run one. With CI set, panics instead of skipping.
pub fn mariadb_or_skip(dir: &Path) -> Option<MariaDb> {
    start_or_skip("MariaDB", MariaDb::unavailable(), || MariaDb::start(dir))
}
