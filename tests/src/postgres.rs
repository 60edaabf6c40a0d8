//! A throwaway PostgreSQL cluster per test: its own data directory, run by
//! the `postgres` user (the server refuses root), reachable only through a
//! unix socket in its own directory (`listen_addresses=''`), stopped when
//! dropped.
//!
//! The postmaster is this process's own child (not daemonized by `pg_ctl`),
//! started through `setpriv --pdeathsig=KILL`, so that it dies with the test
//! even when the test process is killed.

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
const PG_USER: &str = "postgres";
/// `sun_path` holds 108 bytes; the socket is `DIR/pg/.s.PGSQL.NNNNN`.
const MAX_DIR_LEN: usize = 80;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresCluster {
    /// `DIR/pg`, owned by the postgres user: `data/`, the socket, `server.log`.
    root: PathBuf,
    port: u16,
    bindir: PathBuf,
    /// The postmaster (`setpriv` execs it in place, so this is its PID).
    postmaster: Option<Child>,
}

/// Directory with initdb, pg_ctl and psql: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The postgres user's uid and gid.
fn pg_user() -> Option<(u32, u32)> {
    system_user_ids(PG_USER)
}

fn probe() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (the server runs as `postgres` via setpriv)".into());
    }
    if pg_user().is_none() {
        return Some(format!("no `{PG_USER}` user (Debian package postgresql)"));
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        return Some("/usr/bin/setpriv is missing (Debian package util-linux)".into());
    }
    if find_bindir().is_none() {
        return Some(
            "no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin; \
             Debian package postgresql)"
                .into(),
        );
    }
    None
}

impl PostgresCluster {
    /// None when this machine can run clusters; Some(reason) otherwise.
    pub fn unavailable() -> Option<String> {
        static PROBE: OnceLock<Option<String>> = OnceLock::new();
        PROBE.get_or_init(probe).clone()
    }

    /// `initdb -A trust -U postgres` in `dir/pg/data`, then starts the server
    /// and waits (at most 30 s) until it accepts connections. `dir` is made
    /// traversable (o+x) for the postgres user.
    pub fn start(dir: &Path) -> anyhow::Result<PostgresCluster> {
        if let Some(why) = Self::unavailable() {
            bail!("PostgreSQL unavailable: {why}");
        }
        let bindir = find_bindir().context("PostgreSQL binaries")?;
        let (uid, gid) = pg_user().context("postgres user")?;
        let dir = std::path::absolute(dir).context("cluster dir")?;
        let len = dir.as_os_str().len();
        ensure!(
            len <= MAX_DIR_LEN,
            "cluster dir {} is {len} bytes long, more than {MAX_DIR_LEN}: its socket would not fit",
            dir.display()
        );
        fs::create_dir_all(&dir)?;
        // Temporary dirs are 0700: let the postgres user through (not read).
        let mode = fs::metadata(&dir)?.permissions().mode();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o001))?;
        let root = dir.join("pg");
        fs::create_dir_all(&root)?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))?;
        chown(&root, Some(uid), Some(gid))?;
        if !run_as_postgres(&["test", "-w", &root.to_string_lossy()])
            .is_ok_and(|out| out.status.success())
        {
            bail!(
                "user {PG_USER} cannot write {}: a parent directory is not traversable by it \
                 (set TMPDIR to a directory under /tmp?)",
                root.display()
            );
        }

        let mut cluster = PostgresCluster {
            root,
            port: crate::try_free_port()?,
            bindir,
            postmaster: None,
        };
        let data = cluster.data_dir();
        let initdb = cluster.bin("initdb");
        let out = run_as_postgres(&[
            &initdb,
            "-D",
            &data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .context("run initdb")?;
        ensure!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log_path = cluster.root.join("server.log");
        let log = fs::File::create(&log_path)?;
        chown(&log_path, Some(uid), Some(gid))?;
        let postgres = cluster.bin("postgres");
        let socket_dir = cluster.root.to_string_lossy().into_owned();
        let port = cluster.port.to_string();
        let mut cmd = as_postgres(&[
            &postgres,
            "-D",
            &data,
            "-p",
            &port,
            "-k",
            &socket_dir,
            "-c",
            "listen_addresses=",
            // Throwaway data: skip the disk flushes.
            "-c",
            "fsync=off",
        ]);
        cmd.stdout(log.try_clone()?).stderr(log);
        cluster.postmaster = Some(spawn_tied_to_process(cmd).context("spawn postgres")?);
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Waits until `pg_isready` says the server accepts connections.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = &mut self.postmaster
                && let Some(status) = child.try_wait()?
            {
                bail!("postgres exited with {status} at start:\n{}", self.log());
            }
            let ready = Command::new(self.bindir.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&self.root)
                .arg("-p")
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .status()
                .context("run pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres not ready after {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn bin(&self, name: &str) -> String {
        self.bindir.join(name).to_string_lossy().into_owned()
    }

    fn data_dir(&self) -> String {
        self.root.join("data").to_string_lossy().into_owned()
    }

    /// Directory of the server's unix socket (psql's `-h`, libpq's `host`).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the server and client binaries (pg_dump, pg_restore, psql...).
    pub fn bindir(&self) -> PathBuf {
        self.bindir.clone()
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// Runs SQL with psql as superuser `postgres` against `db` and returns
    /// its stdout (`-X -A -t -v ON_ERROR_STOP=1`: unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        self.psql_as("postgres", db, sql)
    }

    /// Runs `sql` on `db` as `role` (trust authentication); its output.
    pub fn psql_as(&self, role: &str, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", role, "-d", db, "-c", sql])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .context("run psql")?;
        ensure!(
            out.status.success(),
            "psql on {db} failed ({}): {sql}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Creates a login role `owner` (if missing) and a database `db` owned by it.
    pub fn create_db(&self, db: &str, owner: &str) -> anyhow::Result<()> {
        let exists = self.psql(
            "postgres",
            &format!(
                "SELECT 1 FROM pg_roles WHERE rolname = {}",
                quote_literal(owner)
            ),
        )?;
        if exists.trim().is_empty() {
            self.psql(
                "postgres",
                &format!("CREATE ROLE {} LOGIN", quote_ident(owner)),
            )?;
        }
        self.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(db),
                quote_ident(owner)
            ),
        )?;
        Ok(())
    }
}

fn as_postgres(args: &[&str]) -> Command {
    as_system_user(PG_USER, args)
}

fn run_as_postgres(args: &[&str]) -> std::io::Result<Output> {
    run_as_system_user(PG_USER, args)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown (`pg_ctl stop -m fast`); its
        // backends exit when they notice the postmaster is gone.
        if let Some(child) = self.postmaster.take() {
            let what = format!("postgres {}", self.root.display());
            stop_server(child, libc::SIGINT, STOP_TIMEOUT, &what);
        }
    }
}

/// For tests: the cluster, or None after printing "SKIPPED: <why>" to stderr
/// when this machine cannot run one. With CI set, panics instead of skipping.
/// Panics when the machine can run clusters but this one fails to start.
pub fn postgres_or_skip(dir: &Path) -> Option<PostgresCluster> {
    start_or_skip("PostgreSQL", PostgresCluster::unavailable(), || {
        PostgresCluster::start(dir)
    })
}
