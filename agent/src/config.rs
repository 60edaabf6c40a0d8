//! The agent's configuration: one TOML file, read at start and validated as a
//! whole so that `check-config` can list every problem at once.
//!
//! Everything the network may name (apps, their units, paths, databases,
//! commands, probe targets) is declared here; requests only refer to it by name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::host::systemd::{DeclaredUnits, validate_unit_name};
use crate::probes::{Attempts, HttpProbeSpec, ProbeError, ProbeSpec, TcpProbeSpec};

/// A problem found in the configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `app[0].unit` or `tls.cert`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC listener, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Where the agent keeps its operation journal, locks and audit log.
    pub state_dir: PathBuf,
    /// Where backups are written, one directory per app.
    pub backup_dir: PathBuf,
    /// Optional Prometheus text endpoint, off by default.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub systemd: SystemdConfig,
    #[serde(default)]
    pub backup: BackupDefaults,
    #[serde(default, rename = "app")]
    pub apps: Vec<AppConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]`: what one peer may hold of the agent (issue #11 items 8, 9,
/// 12). The defaults suit a production host; tests lower them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// TLS handshakes in progress, all sources together.
    pub handshakes: usize,
    /// TLS handshakes in progress from one source address.
    pub handshakes_per_source: usize,
    /// Connections open at once (handshaking or established), all sources.
    pub connections: usize,
    /// Connections open at once from one source address.
    pub connections_per_source: usize,
    /// A client must finish its handshake within this many milliseconds.
    pub handshake_timeout_ms: u64,
    /// Calls open at once on one connection (streams included).
    pub streams_per_connection: usize,
    /// Follows and watches (FollowLogs, WatchMetrics, ...) open at once by
    /// one certificate, over all its connections.
    pub follows_per_identity: usize,
    /// Refused handshakes from one source within this many milliseconds are
    /// written as one summary record with a count.
    pub refusal_audit_interval_ms: u64,
    /// An HTTP/2 PING goes to a connection idle this many milliseconds...
    pub keepalive_interval_ms: u64,
    /// ...and a peer that does not answer it within this many is dropped.
    pub keepalive_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshakes: 1024,
            handshakes_per_source: 32,
            connections: 8192,
            connections_per_source: 256,
            handshake_timeout_ms: 3000,
            streams_per_connection: 100,
            follows_per_identity: 16,
            refusal_audit_interval_ms: 60_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle that client certificates must chain to.
    pub ca: PathBuf,
    /// The agent's certificate chain and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Revoked certificates: serials (hex) or SHA-256 fingerprints, one a line.
    #[serde(default)]
    pub deny: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.3" (default) or "1.2".
    #[serde(default = "default_min_tls")]
    pub min_version: String,
}

fn default_min_tls() -> String {
    "1.3".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdConfig {
    /// `system`, `session` (or `user`), or a D-Bus address such as `unix:path=/run/bus`.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// Units other than the apps' that may be started, stopped and restarted.
    #[serde(default)]
    pub allow: Vec<String>,
    /// OpLog directory to read logs from; default: the system journal.
    #[serde(default)]
    pub journal_dir: Option<PathBuf>,
    /// How long a unit job may take before the call gives up.
    #[serde(default = "default_job_timeout", with = "duration_str")]
    pub job_timeout: Duration,
    /// After a start or restart, how long the unit must stay up before the
    /// call reports it running (a simple service may exit right after exec).
    #[serde(default = "default_settle", with = "duration_str")]
    pub settle: Duration,
}

fn default_settle() -> Duration {
    Duration::from_secs(1)
}

fn default_bus() -> String {
    "system".to_owned()
}

fn default_job_timeout() -> Duration {
    Duration::from_secs(90)
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self {
            bus: default_bus(),
            allow: Vec::new(),
            journal_dir: None,
            job_timeout: default_job_timeout(),
            settle: default_settle(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupDefaults {
    /// Free space (bytes) that must remain on the backup disk after a backup.
    #[serde(default = "default_reserve")]
    pub free_space_reserve_bytes: u64,
}

fn default_reserve() -> u64 {
    1 << 30
}

impl Default for BackupDefaults {
    fn default() -> Self {
        Self {
            free_space_reserve_bytes: default_reserve(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub name: String,
    /// The systemd unit that runs the app, e.g. `covet.service`.
    pub unit: String,
    /// System user that the app's hooks (migrations) run as.
    #[serde(default)]
    pub user: Option<String>,
    /// Lets hooks run as root when no `user` is declared (off: such an app is refused).
    #[serde(default)]
    pub run_hooks_as_root: bool,
    /// Env-file keys that upgrades may set, rename or unset, as globs
    /// (`DATABASE_*`); none when absent. Keys that change how programs load
    /// code (`LD_*`, `PYTHON*`, `PATH`, ...) are refused even when declared.
    #[serde(default)]
    pub env_keys: Vec<String>,
    /// Paths that belong to the app and are backed up and restored.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub env_file: Option<PathBuf>,
    #[serde(default)]
    pub package: Option<PackageConfig>,
    #[serde(default)]
    pub database: Option<DatabaseConfig>,
    #[serde(default)]
    pub migrate: Option<MigrateConfig>,
    #[serde(default)]
    pub health: Option<ProbeConfig>,
    #[serde(default)]
    pub smoke: Vec<ProbeConfig>,
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// How an upgrade replaces the running version (restart when absent).
    #[serde(default)]
    pub deploy: Option<DeployConfig>,
    /// The proxy in front of the app's slots, for blue-green and canary.
    #[serde(default)]
    pub traffic: Option<TrafficConfig>,
    /// `[app.metrics]`: where the app exports its Prometheus series.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// `[[app.analysis]]`: rules judged before and during `--watch`.
    #[serde(default)]
    pub analysis: Vec<AnalysisConfig>,
}

/// `[app.metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus text exposition, e.g. `http://127.0.0.1:8000/metrics`
    /// (loopback, or a host:port the app's probes declare).
    pub url: String,
    /// How often the watch step judges the rules.
    #[serde(default = "default_metrics_interval", with = "duration_str")]
    pub interval: Duration,
    /// How long the upgrade's preflight samples the baseline.
    #[serde(default = "default_baseline", with = "duration_str")]
    pub baseline: Duration,
}

fn default_metrics_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_baseline() -> Duration {
    Duration::from_secs(30)
}

/// One `[[app.analysis]]` rule: exactly one of `ratio`, `quantile`,
/// `postgres`, `unit`, and one of `max`, `max_increase`
/// (`analysis::Rule::from_config` types it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisConfig {
    pub name: String,
    #[serde(default)]
    pub ratio: Option<RatioConfig>,
    #[serde(default)]
    pub quantile: Option<QuantileConfig>,
    /// "connections", "ungranted_locks" or "mean_query_ms".
    #[serde(default)]
    pub postgres: Option<String>,
    /// "memory_bytes" or "cpu_percent".
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Against the baseline: "50%".
    #[serde(default)]
    pub max_increase: Option<String>,
    /// Consecutive bad intervals that fail the rule.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_failures() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatioConfig {
    pub num: String,
    pub den: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantileConfig {
    pub histogram: String,
    pub q: f64,
}

/// The app's package, by `kind`: each kind takes only its own fields, and
/// the ones it needs are required (a missing or foreign key fails the parse
/// with an error naming it).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PackageConfig {
    Pip(PipConfig),
    Release(ReleaseConfig),
    Deb(SystemPackageConfig),
    Rpm(SystemPackageConfig),
    Apt(AptConfig),
    Dnf(DnfConfig),
}

/// `kind = "pip"`: a Python distribution installed in a virtualenv.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipConfig {
    pub name: String,
    /// The virtualenv the package is installed in.
    pub venv: PathBuf,
    /// Local wheelhouses (`--no-index --find-links`).
    #[serde(default)]
    pub find_links: Vec<PathBuf>,
    /// Where blue-green and canary deploys install each version in its own
    /// virtualenv (`releases_dir/VERSION/venv`), so two run side by side.
    #[serde(default)]
    pub releases_dir: Option<PathBuf>,
}

/// `kind = "release"`: unpacked release trees and a `current` symlink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    pub name: String,
    /// Directory holding `VERSION/` trees.
    pub releases_dir: PathBuf,
    /// The symlink that points at the live release.
    pub current: PathBuf,
    /// A directory of release artifacts (`NAME-VERSION.tar.gz` ...).
    #[serde(default)]
    pub repo_dir: Option<PathBuf>,
    /// More directories of release artifacts.
    #[serde(default)]
    pub find_links: Vec<PathBuf>,
}

/// `kind = "deb"` or `"rpm"`: a system package from a local repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemPackageConfig {
    pub name: String,
    /// A local repository directory of package files.
    pub repo_dir: PathBuf,
}

/// `kind = "apt"`: a deb from the host's configured apt repositories
/// (`apt-get install NAME=VERSION`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AptConfig {
    /// The package name, as apt knows it.
    pub name: String,
    /// Where the installed version's .deb is kept for a rollback, in
    /// `KEEP_DIR/before-OP_ID/` (apt's repositories may drop old versions).
    pub keep_dir: PathBuf,
}

/// `kind = "dnf"`: an rpm from the host's configured dnf repositories
/// (`dnf install NAME-VERSION`); a rollback installs the previous version
/// from them again, so nothing is kept on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnfConfig {
    /// The package name, as dnf knows it.
    pub name: String,
}

/// `[app.database]`, by `kind` (an unknown kind is refused when the config
/// is read, with an error naming it).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DatabaseConfig {
    Postgres(PostgresConfig),
    Sqlite(SqliteConfig),
    Mysql(MysqlConfig),
}

/// `kind = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub dbname: String,
    /// Socket directory (absolute path) or host name.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Database role the client programs connect as.
    #[serde(default)]
    pub user: Option<String>,
    /// System user that runs pg_dump / pg_restore.
    #[serde(default)]
    pub os_user: Option<String>,
}

/// `kind = "sqlite"`: the database file (absolute path). A restore writes
/// beside it, so its directory needs room for a second copy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    pub path: PathBuf,
}

/// `kind = "mysql"` (MySQL or MariaDB): the server by `socket` or
/// `host`/`port`; the password only in `defaults_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    pub dbname: String,
    /// The server's unix socket (absolute path).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// A TCP host name or address (instead of `socket`).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// The account the client programs log in as.
    #[serde(default)]
    pub user: Option<String>,
    /// An option file (`[client] user= password= socket=`), mode 0600, read
    /// by the client programs with `--defaults-extra-file`.
    #[serde(default)]
    pub defaults_file: Option<PathBuf>,
    /// System user that runs mariadb-dump / mariadb.
    #[serde(default)]
    pub os_user: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateConfig {
    pub command: Vec<String>,
    #[serde(default)]
    pub dry_run: Option<Vec<String>>,
    #[serde(default)]
    pub rollback: Option<Vec<String>>,
    #[serde(default = "default_migrate_timeout", with = "duration_str")]
    pub timeout: Duration,
}

fn default_migrate_timeout() -> Duration {
    Duration::from_secs(600)
}

/// A declared probe: `url` for HTTP, or `address` (HOST:PORT) for TCP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_probe_timeout", with = "duration_str")]
    pub timeout: Duration,
    #[serde(default)]
    pub retries: u32,
    #[serde(default = "default_probe_interval", with = "duration_str")]
    pub interval: Duration,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    #[serde(default)]
    pub json_field: Option<String>,
    #[serde(default)]
    pub json_value: Option<String>,
}

impl ProbeConfig {
    /// The same probe of another port on the same host: a slot's, for
    /// blue-green and canary (an address or URL that does not parse is
    /// kept as it is, and fails as it would have).
    pub fn on_port(&self, port: u16) -> ProbeConfig {
        let mut moved = self.clone();
        if let Some(url) = &self.url
            && let Ok(t) = crate::probes::HttpTarget::parse(url)
        {
            let host = if t.host.contains(':') {
                format!("[{}]", t.host)
            } else {
                t.host
            };
            moved.url = Some(format!("http://{host}:{port}{}", t.path));
        }
        if let Some(address) = &self.address
            && let Ok((host, _)) = crate::probes::split_host_port(address)
        {
            moved.address = Some(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            });
        }
        moved
    }

    /// The probe this declares, named `APP KIND` unless `name` says otherwise.
    /// INVALID when it has neither `url` nor `address` (check-config says so too).
    pub fn spec(&self, app: &str, kind: &str) -> Result<ProbeSpec, ProbeError> {
        let name = self.name.clone().unwrap_or_else(|| format!("{app} {kind}"));
        let attempts = Attempts {
            timeout: self.timeout,
            retries: self.retries,
            interval: self.interval,
        };
        if let Some(url) = &self.url {
            return Ok(ProbeSpec::Http(HttpProbeSpec {
                name,
                url: url.clone(),
                expect_status: self.expect_status,
                json_field: self.json_field.clone(),
                json_value: self.json_value.clone(),
                attempts,
            }));
        }
        match &self.address {
            Some(address) => Ok(ProbeSpec::Tcp(TcpProbeSpec {
                name,
                address: address.clone(),
                attempts,
            })),
            None => Err(ProbeError::InvalidTarget(format!(
                "the {kind} probe of {app} has neither url nor address"
            ))),
        }
    }
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_expect_status() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub keep_days: Option<u32>,
}

impl Config {
    /// Reads, parses and validates the file; any problem is an error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Self::parse_file(path)?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Reads and parses the file without semantic checks.
    pub fn parse_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// Every problem in the configuration, by key; empty when it is valid.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Problems::default();
        self.check_paths(&mut out);
        self.check_tls(&mut out);
        self.check_systemd(&mut out);
        let mut names = BTreeSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let key = format!("app[{i}]");
            if !names.insert(app.name.as_str()) {
                out.add(
                    format!("{key}.name"),
                    format!("app {:?} is declared twice", app.name),
                );
            }
            app.check(&key, &mut out);
        }
        out.0
    }

    fn check_paths(&self, out: &mut Problems) {
        out.absolute("state_dir", &self.state_dir);
        out.absolute("backup_dir", &self.backup_dir);
        if self.metrics_listen == Some(self.listen) {
            out.add("metrics_listen", "must differ from listen");
        }
    }

    fn check_tls(&self, out: &mut Problems) {
        for (key, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            out.readable_file(key, path);
        }
        // A missing deny file denies no one, but a deny path that is a directory is a mistake.
        if let Some(deny) = &self.tls.deny
            && deny.is_dir()
        {
            out.add("tls.deny", format!("{} is a directory", deny.display()));
        }
        if !matches!(self.tls.min_version.as_str(), "1.2" | "1.3") {
            out.add(
                "tls.min_version",
                format!("{:?} is not \"1.2\" or \"1.3\"", self.tls.min_version),
            );
        }
    }

    fn check_systemd(&self, out: &mut Problems) {
        let bus = self.systemd.bus.as_str();
        if !matches!(bus, "system" | "session" | "user") && !bus.contains('=') {
            out.add(
                "systemd.bus",
                format!("{bus:?} is not \"system\", \"session\" or a D-Bus address like \"unix:path=/run/bus\""),
            );
        }
        for (i, unit) in self.systemd.allow.iter().enumerate() {
            if let Err(e) = validate_unit_name(unit) {
                out.add(format!("systemd.allow[{i}]"), e);
            }
        }
        if let Some(dir) = &self.systemd.journal_dir {
            out.absolute("systemd.journal_dir", dir);
        }
    }

    /// Units that may be acted on: every app's unit and `[systemd] allow`.
    pub fn controllable_units(&self) -> BTreeSet<String> {
        self.apps
            .iter()
            .flat_map(AppConfig::units)
            .chain(self.systemd.allow.iter().cloned())
            .collect()
    }

    /// The app that runs `unit` (its own unit or one of its slots).
    pub fn app_running(&self, unit: &str) -> Option<&AppConfig> {
        self.apps
            .iter()
            .find(|a| a.units().iter().any(|u| u == unit))
    }

    /// `host:port` pairs that the apps' probes declare; ad-hoc probes may reach
    /// these besides loopback.
    pub fn declared_probe_targets(&self) -> BTreeSet<String> {
        self.apps
            .iter()
            .flat_map(|a| a.health.iter().chain(a.smoke.iter()))
            .filter_map(ProbeConfig::host_port)
            .collect()
    }
}

impl AppConfig {
    /// The systemd units that run the app: its `unit`, and with a deploy
    /// strategy that uses slots, each slot's instance of `unit_template`.
    pub fn units(&self) -> Vec<String> {
        let mut units = vec![self.unit.clone()];
        if let Some(d) = self.slotted() {
            units.extend(d.slots.keys().map(|slot| d.instance(slot)));
        }
        units
    }

    /// The deploy config when the strategy runs the app in slots.
    pub fn slotted(&self) -> Option<&DeployConfig> {
        self.deploy
            .as_ref()
            .filter(|d| d.strategy != Strategy::Restart)
    }

    fn check(&self, key: &str, out: &mut Problems) {
        if let Err(e) = validate_name(&self.name) {
            out.add(format!("{key}.name"), e);
        }
        if let Err(e) = validate_unit_name(&self.unit) {
            out.add(format!("{key}.unit"), e);
        }
        if let Some(user) = &self.user
            && let Err(e) = validate_name(user)
        {
            out.add(format!("{key}.user"), e);
        }
        for (i, p) in self.paths.iter().enumerate() {
            out.absolute(&format!("{key}.paths[{i}]"), p);
        }
        if let Some(p) = &self.env_file {
            out.absolute(&format!("{key}.env_file"), p);
        }
        if let Some(pkg) = &self.package {
            pkg.check(&format!("{key}.package"), out);
        }
        if let Some(db) = &self.database {
            db.check(&format!("{key}.database"), out);
        }
        for (i, pattern) in self.env_keys.iter().enumerate() {
            if let Err(e) = crate::host::envfile::validate_key_pattern(pattern) {
                out.add(format!("{key}.env_keys[{i}]"), e);
            }
        }
        if self.migrate.is_some() && self.user.is_none() && !self.run_hooks_as_root {
            out.add(
                format!("{key}.user"),
                "an app with [app.migrate] hooks must declare the user they run as \
                 (hooks never run as root unless run_hooks_as_root = true)",
            );
        }
        if let Some(m) = &self.migrate {
            let k = format!("{key}.migrate");
            check_argv(&format!("{k}.command"), &m.command, out);
            if let Some(argv) = &m.dry_run {
                check_argv(&format!("{k}.dry_run"), argv, out);
            }
            if let Some(argv) = &m.rollback {
                check_argv(&format!("{k}.rollback"), argv, out);
            }
        }
        if let Some(h) = &self.health {
            h.check(&format!("{key}.health"), out);
        }
        for (i, s) in self.smoke.iter().enumerate() {
            s.check(&format!("{key}.smoke[{i}]"), out);
        }
        if let Some(d) = &self.deploy {
            d.check(&format!("{key}.deploy"), out);
        }
        if let Some(t) = &self.traffic {
            t.check(&format!("{key}.traffic"), out);
        }
        if self.slotted().is_some() {
            self.check_slotted(key, out);
        }
        self.check_analysis(key, out);
    }

    /// What blue-green and canary need besides `[app.deploy]` itself.
    fn check_slotted(&self, key: &str, out: &mut Problems) {
        let strategy = self.deploy.as_ref().map_or("", |d| d.strategy.as_str());
        if self.traffic.is_none() {
            out.add(
                format!("{key}.traffic"),
                format!(
                    "strategy {strategy:?} needs [app.traffic] to switch requests between slots"
                ),
            );
        }
        match &self.package {
            Some(PackageConfig::Pip(p)) if p.releases_dir.is_some() => {}
            Some(PackageConfig::Pip(_)) => out.add(
                format!("{key}.package.releases_dir"),
                format!("strategy {strategy:?} installs each version in its own virtualenv: declare releases_dir"),
            ),
            _ => out.add(
                format!("{key}.package.kind"),
                format!("strategy {strategy:?} runs two versions side by side: it needs kind = \"pip\" with releases_dir"),
            ),
        }
        match &self.health {
            Some(h) if h.url.is_some() => {}
            _ => out.add(
                format!("{key}.health.url"),
                format!("strategy {strategy:?} checks the new slot on its own port before the switch: declare an HTTP health probe"),
            ),
        }
    }

    fn check_analysis(&self, key: &str, out: &mut Problems) {
        if let Some(m) = &self.metrics {
            let k = format!("{key}.metrics");
            match crate::probes::HttpTarget::parse(&m.url) {
                Err(e) => out.add(format!("{k}.url"), e.to_string()),
                Ok(t) => {
                    let declared = self
                        .health
                        .iter()
                        .chain(self.smoke.iter())
                        .filter_map(ProbeConfig::host_port)
                        .any(|hp| hp == format!("{}:{}", t.host, t.port));
                    let loopback = t.host == "localhost"
                        || t.host
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback());
                    if !declared && !loopback {
                        out.add(
                            format!("{k}.url"),
                            format!(
                                "{}:{} is neither a loopback address nor the host:port of the app's health or smoke probes",
                                t.host, t.port
                            ),
                        );
                    }
                }
            }
            if m.interval < Duration::from_millis(500) {
                out.add(format!("{k}.interval"), "must be at least 500ms");
            }
            if m.baseline < m.interval {
                out.add(
                    format!("{k}.baseline"),
                    "must be at least one interval long",
                );
            }
        }
        let mut names = BTreeSet::new();
        for (i, rule) in self.analysis.iter().enumerate() {
            let k = format!("{key}.analysis[{i}]");
            if !names.insert(rule.name.as_str()) {
                out.add(
                    format!("{k}.name"),
                    format!("rule {:?} is declared twice", rule.name),
                );
            }
            match crate::analysis::Rule::from_config(rule) {
                Err(problems) => {
                    for (field, message) in problems {
                        let at = if field.is_empty() {
                            k.clone()
                        } else {
                            format!("{k}.{field}")
                        };
                        out.add(at, message);
                    }
                }
                Ok(r) => {
                    if r.scrapes() && self.metrics.is_none() {
                        out.add(k, "reads the app's metrics: declare [app.metrics] url");
                    } else if matches!(r.kind, crate::analysis::Kind::Postgres(_))
                        && !matches!(self.database, Some(DatabaseConfig::Postgres(_)))
                    {
                        out.add(
                            format!("{k}.postgres"),
                            "the app declares no [app.database] of kind \"postgres\"",
                        );
                    }
                }
            }
        }
    }
}

impl Config {
    /// What only the apps' running metrics endpoints can tell, for
    /// `check-config`: problems (a rule's metric the app does not export, a
    /// `quantile` over a non-histogram), by key, and warnings (an endpoint
    /// that does not answer now, so its rules were not checked).
    pub async fn metric_problems(&self) -> (Vec<Problem>, Vec<Problem>) {
        let (mut problems, mut warnings) = (Problems::default(), Problems::default());
        let policy = crate::probes::TargetPolicy::new(self.declared_probe_targets());
        for (i, app) in self.apps.iter().enumerate() {
            let Some(m) = &app.metrics else { continue };
            let rules: Vec<(usize, crate::analysis::Rule)> = app
                .analysis
                .iter()
                .enumerate()
                .filter_map(|(j, c)| Some((j, crate::analysis::Rule::from_config(c).ok()?)))
                .filter(|(_, r)| r.scrapes())
                .collect();
            if rules.is_empty() {
                continue;
            }
            let e = match crate::analysis::scrape(&policy, &m.url).await {
                Ok(e) => e,
                Err(why) => {
                    warnings.add(
                        format!("app[{i}].metrics.url"),
                        format!("{why}; the analysis rules' metrics were not checked"),
                    );
                    continue;
                }
            };
            for (j, rule) in rules {
                for (field, why) in rule.problems_against(&e) {
                    problems.add(format!("app[{i}].analysis[{j}].{field}"), why);
                }
            }
        }
        (problems.0, warnings.0)
    }

    /// What `check-config` reports without failing: declared paths with an
    /// ancestor directory that a user other than root and the app's user
    /// can write (that user could swap what the agent unpacks there).
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Problems::default();
        for (i, app) in self.apps.iter().enumerate() {
            let app_uid = app
                .user
                .as_deref()
                .and_then(|u| crate::host::users::by_name(u).ok().flatten())
                .map(|account| account.uid);
            let package_paths = app.package.as_ref().map(PackageConfig::app_paths);
            let declared = app
                .paths
                .iter()
                .enumerate()
                .map(|(j, p)| (format!("paths[{j}]"), p.as_path()))
                .chain(
                    app.env_file
                        .as_ref()
                        .map(|p| ("env_file".to_owned(), p.as_path())),
                )
                .chain(
                    package_paths
                        .into_iter()
                        .flatten()
                        .map(|(field, p)| (format!("package.{field}"), p)),
                );
            for (field, path) in declared {
                for (dir, why) in crate::files::untrusted_ancestors(path, app_uid) {
                    out.add(
                        format!("app[{i}].{field}"),
                        format!(
                            "{} is under {}, which another user can write: {why}; make it writable only by root and the app's user",
                            path.display(),
                            dir.display()
                        ),
                    );
                }
            }
        }
        out.0
    }
}

impl PackageConfig {
    /// The package's name, whatever its kind.
    pub fn name(&self) -> &str {
        match self {
            PackageConfig::Pip(c) => &c.name,
            PackageConfig::Release(c) => &c.name,
            PackageConfig::Deb(c) | PackageConfig::Rpm(c) => &c.name,
            PackageConfig::Apt(c) => &c.name,
            PackageConfig::Dnf(c) => &c.name,
        }
    }

    /// `kind` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            PackageConfig::Pip(_) => "pip",
            PackageConfig::Release(_) => "release",
            PackageConfig::Deb(_) => "deb",
            PackageConfig::Rpm(_) => "rpm",
            PackageConfig::Apt(_) => "apt",
            PackageConfig::Dnf(_) => "dnf",
        }
    }

    /// The app's own paths the package lives in, by field name: the
    /// package's undo puts them back, and check-config warns when another
    /// user can write above them. (A deb or rpm lives in system paths.)
    pub fn app_paths(&self) -> Vec<(&'static str, &Path)> {
        match self {
            PackageConfig::Pip(c) => vec![("venv", c.venv.as_path())],
            PackageConfig::Release(c) => vec![
                ("releases_dir", c.releases_dir.as_path()),
                ("current", c.current.as_path()),
            ],
            PackageConfig::Deb(_)
            | PackageConfig::Rpm(_)
            | PackageConfig::Apt(_)
            | PackageConfig::Dnf(_) => Vec::new(),
        }
    }

    /// Every path the configuration declares, by field name (`find_links[0]`).
    fn declared_paths(&self) -> Vec<(String, &Path)> {
        let mut paths: Vec<(String, &Path)> = self
            .app_paths()
            .into_iter()
            .map(|(field, p)| (field.to_owned(), p))
            .collect();
        let (repo_dir, find_links): (Option<&PathBuf>, &[PathBuf]) = match self {
            PackageConfig::Pip(c) => (None, &c.find_links),
            PackageConfig::Release(c) => (c.repo_dir.as_ref(), &c.find_links),
            PackageConfig::Deb(c) | PackageConfig::Rpm(c) => (Some(&c.repo_dir), &[]),
            PackageConfig::Apt(_) | PackageConfig::Dnf(_) => (None, &[]),
        };
        paths.extend(repo_dir.map(|p| ("repo_dir".to_owned(), p.as_path())));
        if let PackageConfig::Apt(c) = self {
            paths.push(("keep_dir".to_owned(), c.keep_dir.as_path()));
        }
        paths.extend(
            find_links
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("find_links[{i}]"), p.as_path())),
        );
        paths
    }

    fn check(&self, key: &str, out: &mut Problems) {
        let name = self.name();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
        {
            out.add(
                format!("{key}.name"),
                format!("{name:?} is not a package name"),
            );
        }
        for (field, path) in self.declared_paths() {
            out.absolute(&format!("{key}.{field}"), path);
        }
    }
}

impl DatabaseConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        match self {
            DatabaseConfig::Postgres(pg) => pg.check(key, out),
            DatabaseConfig::Sqlite(lite) => lite.check(key, out),
            DatabaseConfig::Mysql(my) => my.check(key, out),
        }
    }
}

/// Each set value must be a plain name ([`validate_name`]).
fn check_optional_names<const N: usize>(
    key: &str,
    fields: [(&str, &Option<String>); N],
    out: &mut Problems,
) {
    for (field, value) in fields {
        if let Some(v) = value
            && let Err(e) = validate_name(v)
        {
            out.add(format!("{key}.{field}"), e);
        }
    }
}

impl PostgresConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        if let Err(e) = validate_name(&self.dbname) {
            out.add(format!("{key}.dbname"), e);
        }
        check_optional_names(key, [("user", &self.user), ("os_user", &self.os_user)], out);
    }
}

impl MysqlConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        if let Err(e) = validate_name(&self.dbname) {
            out.add(format!("{key}.dbname"), e);
        } else if self.dbname.contains(['-', '.']) {
            out.add(
                format!("{key}.dbname"),
                format!(
                    "{:?}: only letters, digits and _ (restores name schemas after it)",
                    self.dbname
                ),
            );
        }
        check_optional_names(key, [("user", &self.user), ("os_user", &self.os_user)], out);
        for (field, path) in [
            ("socket", &self.socket),
            ("defaults_file", &self.defaults_file),
        ] {
            if let Some(p) = path {
                out.absolute(&format!("{key}.{field}"), p);
            }
        }
        if self.socket.is_some() && (self.host.is_some() || self.port.is_some()) {
            out.add(
                format!("{key}.socket"),
                "give either socket or host/port, not both",
            );
        }
        if let Some(host) = &self.host
            && (host.is_empty()
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
        {
            out.add(
                format!("{key}.host"),
                format!("{host:?} is not a host name or address"),
            );
        }
    }
}

impl SqliteConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        let key = format!("{key}.path");
        out.absolute(&key, &self.path);
        // The restore names its side and kept files after the file's name.
        match self.path.file_name().and_then(|n| n.to_str()) {
            Some(name) if !name.starts_with('.') => {}
            _ => out.add(
                key,
                format!(
                    "{} must end in a file name (UTF-8, not starting with `.`)",
                    self.path.display()
                ),
            ),
        }
    }
}

impl ProbeConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        match (&self.url, &self.address) {
            (Some(url), None) => {
                if let Err(e) = crate::probes::HttpTarget::parse(url) {
                    out.add(format!("{key}.url"), e.to_string());
                }
            }
            (None, Some(addr)) => {
                if let Err(e) = crate::probes::split_host_port(addr) {
                    out.add(format!("{key}.address"), e.to_string());
                }
            }
            _ => out.add(key, "needs exactly one of url (HTTP) or address (TCP)"),
        }
        if self.timeout.is_zero() {
            out.add(format!("{key}.timeout"), "must be more than 0s");
        }
    }

    /// `host:port` this probe reaches, if it parses.
    pub fn host_port(&self) -> Option<String> {
        if let Some(url) = &self.url {
            let t = crate::probes::HttpTarget::parse(url).ok()?;
            return Some(format!("{}:{}", t.host, t.port));
        }
        let (host, port) = crate::probes::split_host_port(self.address.as_deref()?).ok()?;
        Some(format!("{host}:{port}"))
    }
}

fn check_argv(key: &str, argv: &[String], out: &mut Problems) {
    match argv.first() {
        None => out.add(key, "is empty: give the program and its arguments"),
        Some(prog) if !prog.starts_with('/') => out.add(
            key,
            format!("{prog:?} must be an absolute path (no shell, no PATH lookup)"),
        ),
        Some(_) => {}
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn absolute(&mut self, key: &str, path: &Path) {
        if !path.is_absolute() {
            self.add(key, format!("{} must be an absolute path", path.display()));
        }
    }

    fn readable_file(&mut self, key: &str, path: &Path) {
        if let Err(e) = std::fs::File::open(path) {
            self.add(key, format!("cannot read {}: {e}", path.display()));
        }
    }
}

/// Names of apps, users and databases: they end up in paths and argv.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-63 of A-Z a-z 0-9 _ - ., not starting with - or .)"
        ))
    }
}

/// The units the agent may control: the apps' own and `[systemd] allow`.
impl DeclaredUnits for Config {
    fn declares(&self, unit: &str) -> bool {
        self.controllable_units().contains(unit)
    }
}

/// `[app.deploy]`: how an upgrade replaces the running version.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// A template unit (`covet@.service`); each slot runs as its instance
    /// (`covet@blue.service`).
    pub unit_template: String,
    /// Each slot's name and port (exactly two: the live one and the idle one).
    pub slots: BTreeMap<String, u16>,
    /// How long the old slot keeps serving after the switch.
    #[serde(default = "default_drain", with = "duration_str")]
    pub drain: Duration,
    /// Where the agent writes each slot's `SLOT.env` and `SLOT` link to its
    /// release, and `live`, the slot that takes the requests.
    pub slots_dir: PathBuf,
    /// Canary: the share of requests the new slot gets while it is watched.
    #[serde(default = "default_canary_percent")]
    pub canary_percent: u8,
    /// What a rollback after the switch does with the migrated database.
    #[serde(default)]
    pub database_on_rollback: DatabaseOnRollback,
}

/// `[app.deploy] database_on_rollback`. Before the switch the database is
/// always kept: the live version serves on it (the compatible-schema rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseOnRollback {
    /// The app's down-migration, else the backup's dump restored (what was
    /// written since the backup is lost; connections are cut for the swap).
    #[default]
    Restore,
    /// The migrated schema stays: for expand/contract migrations, which the
    /// old version runs on; nothing written is lost.
    Keep,
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

fn default_canary_percent() -> u8 {
    10
}

/// `[app.deploy] strategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The one unit restarted in place.
    #[default]
    Restart,
    /// The new version started in the idle slot, all traffic switched to it.
    BlueGreen,
    /// Like blue-green, but the new slot first takes `canary_percent` of the
    /// requests while it is watched.
    Canary,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Restart => "restart",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

impl DeployConfig {
    /// The unit that runs `slot`: `covet@.service` -> `covet@blue.service`.
    pub fn instance(&self, slot: &str) -> String {
        match self.unit_template.split_once("@.") {
            Some((prefix, suffix)) => format!("{prefix}@{slot}.{suffix}"),
            None => self.unit_template.clone(),
        }
    }

    fn check(&self, key: &str, out: &mut Problems) {
        let template_ok = self
            .unit_template
            .split_once("@.")
            .is_some_and(|(prefix, suffix)| !prefix.is_empty() && suffix == "service");
        if !template_ok {
            out.add(
                format!("{key}.unit_template"),
                format!(
                    "{:?} must be a template service like \"covet@.service\"",
                    self.unit_template
                ),
            );
        }
        if self.slots.len() != 2 {
            out.add(
                format!("{key}.slots"),
                format!(
                    "needs exactly two slots (the live one and the idle one), got {}",
                    self.slots.len()
                ),
            );
        }
        let mut ports = BTreeSet::new();
        for (slot, port) in &self.slots {
            let k = format!("{key}.slots.{slot}");
            if let Err(e) = validate_name(slot) {
                out.add(k.clone(), e);
            } else if slot == "live" {
                out.add(
                    k.clone(),
                    "\"live\" names the live-slot link; choose another name",
                );
            } else if template_ok && let Err(e) = validate_unit_name(&self.instance(slot)) {
                out.add(k.clone(), e);
            }
            if *port == 0 || !ports.insert(*port) {
                out.add(
                    k,
                    format!("port {port} must be non-zero and differ from the other slot's"),
                );
            }
        }
        out.absolute(&format!("{key}.slots_dir"), &self.slots_dir);
        // nginx applies a reload to new connections at once, but its old
        // workers finish the requests they took: they need some time.
        if self.drain < Duration::from_secs(1) || self.drain > Duration::from_secs(3600) {
            out.add(
                format!("{key}.drain"),
                "must be between 1s and 1h (the old side finishes the requests it took)",
            );
        }
        if !(1..=99).contains(&self.canary_percent) {
            out.add(format!("{key}.canary_percent"), "must be between 1 and 99");
        }
    }
}

/// `[app.traffic]`: the proxy that sends requests to the live slot.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TrafficConfig {
    Nginx(NginxTrafficConfig),
}

/// `kind = "nginx"`: an `upstream` block in a file nginx includes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxTrafficConfig {
    /// The file the agent writes (atomically) with the upstream block.
    pub upstream_file: PathBuf,
    /// The upstream's name (`proxy_pass http://NAME`); the app's name when absent.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Checks nginx's whole configuration (`nginx -t`) before a reload.
    pub test: Vec<String>,
    /// Reloaded over D-Bus after the file changed.
    pub reload_unit: String,
    /// A URL through nginx whose answer names the serving version
    /// (`/health`): after a switch it must name the new one.
    pub verify_url: String,
    /// The JSON field of `verify_url`'s answer that names the version.
    #[serde(default = "default_verify_field")]
    pub verify_field: String,
}

fn default_verify_field() -> String {
    "version".into()
}

impl TrafficConfig {
    fn check(&self, key: &str, out: &mut Problems) {
        match self {
            TrafficConfig::Nginx(n) => {
                out.absolute(&format!("{key}.upstream_file"), &n.upstream_file);
                if let Some(name) = &n.upstream
                    && let Err(e) = validate_name(name)
                {
                    out.add(format!("{key}.upstream"), e);
                }
                check_argv(&format!("{key}.test"), &n.test, out);
                if let Err(e) = validate_unit_name(&n.reload_unit) {
                    out.add(format!("{key}.reload_unit"), e);
                }
                if let Err(e) = crate::probes::HttpTarget::parse(&n.verify_url) {
                    out.add(format!("{key}.verify_url"), e.to_string());
                }
            }
        }
    }
}

/// Durations written as humantime strings: "30s", "5m", "1h 30m".
mod duration_str {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"30s\": {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    const BASE: &str = r#"
        listen = "127.0.0.1:7443"
        state_dir = "/var/lib/covet-agent"
        backup_dir = "/var/backups/covet"
        [tls]
        ca = "/nonexistent/ca.crt"
        cert = "/nonexistent/agent.crt"
        key = "/nonexistent/agent.key"
    "#;

    #[test]
    fn lists_every_problem_by_key() {
        let text = format!(
            "{BASE}\n{}",
            r#"
            [systemd]
            bus = "nonsense"
            allow = ["../etc/passwd"]
            [[app]]
            name = "covet"
            unit = "covet"
            paths = ["relative/path"]
            [app.package]
            kind = "pip"
            name = "covetpy"
            venv = "relative/venv"
            find_links = ["wheels"]
            [app.migrate]
            command = ["covet", "migrate"]
            [app.health]
            url = "ftp://localhost/health"
            "#
        );
        let problems = parse(&text).problems();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "tls.ca",
            "tls.cert",
            "tls.key",
            "systemd.bus",
            "systemd.allow[0]",
            "app[0].unit",
            "app[0].paths[0]",
            "app[0].package.venv",
            "app[0].package.find_links[0]",
            "app[0].migrate.command",
            "app[0].health.url",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
    }

    #[test]
    fn a_slotted_deploy_needs_its_parts_and_says_which_key_is_wrong() {
        let text = format!(
            "{BASE}\n{}",
            r#"
            [[app]]
            name = "covet"
            unit = "covet.service"
            [app.package]
            kind = "pip"
            name = "covetpy"
            venv = "/srv/covet/venv"
            [app.deploy]
            strategy = "blue-green"
            unit_template = "covet.service"
            slots = { blue = 8001, live = 8001, "a/b" = 8003 }
            slots_dir = "slots"
            drain = "2h"
            canary_percent = 0
            "#
        );
        let problems = parse(&text).problems();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "app[0].deploy.unit_template",
            "app[0].deploy.slots",
            "app[0].deploy.slots.live",
            "app[0].deploy.slots.a/b",
            "app[0].deploy.slots_dir",
            "app[0].deploy.drain",
            "app[0].deploy.canary_percent",
            "app[0].traffic",
            "app[0].package.releases_dir",
            "app[0].health.url",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
        // The same port twice is named at the second slot.
        assert!(
            problems.iter().any(|p| p.message.contains("port 8001")),
            "{problems:?}"
        );

        let good = format!(
            "{BASE}\n{}",
            r#"
            [[app]]
            name = "covet"
            unit = "covet.service"
            [app.package]
            kind = "pip"
            name = "covetpy"
            venv = "/srv/covet/venv"
            releases_dir = "/srv/covet/releases"
            [app.health]
            url = "http://127.0.0.1:8000/health"
            [app.deploy]
            strategy = "blue-green"
            unit_template = "covet@.service"
            slots = { blue = 8001, green = 8002 }
            slots_dir = "/srv/covet/slots"
            [app.traffic]
            kind = "nginx"
            upstream_file = "/etc/nginx/conf.d/covet-upstream.conf"
            test = ["/usr/sbin/nginx", "-t"]
            reload_unit = "nginx.service"
            verify_url = "http://127.0.0.1/health"
            "#
        );
        let config = parse(&good);
        let deploy_problems: Vec<Problem> = config
            .problems()
            .into_iter()
            .filter(|p| p.key.starts_with("app[0]"))
            .collect();
        assert!(deploy_problems.is_empty(), "{deploy_problems:?}");
        assert!(config.declares("covet@green.service"));
        assert!(!config.declares("covet@red.service"));
        assert_eq!(
            config
                .app_running("covet@blue.service")
                .map(|a| a.name.as_str()),
            Some("covet")
        );
        // Unknown strategies and traffic kinds fail the parse, naming the value.
        let bad = good.replace("\"blue-green\"", "\"rolling\"");
        assert!(
            toml::from_str::<Config>(&bad)
                .unwrap_err()
                .to_string()
                .contains("rolling")
        );
        let bad = good.replace("kind = \"nginx\"", "kind = \"haproxy\"");
        assert!(
            toml::from_str::<Config>(&bad)
                .unwrap_err()
                .to_string()
                .contains("haproxy")
        );
    }

    #[test]
    fn a_mysql_database_is_checked_by_key() {
        let app =
            "[[app]]\nname = \"covet\"\nunit = \"covet.service\"\n[app.database]\nkind = \"mysql\"";
        let problems = |db: &str| {
            let c = parse(&format!("{BASE}\n{app}\n{db}"));
            let mut keys: Vec<String> = c
                .problems()
                .into_iter()
                .map(|p| p.key)
                .filter(|k| k.contains("database"))
                .collect();
            keys.sort();
            keys
        };
        let good = "dbname = \"covet_production\"\nsocket = \"/run/mysqld/mysqld.sock\"\n\
                    defaults_file = \"/etc/covet/mysql.cnf\"\nos_user = \"mysql\"";
        assert!(problems(good).is_empty(), "{:?}", problems(good));
        assert!(problems("dbname = \"shop\"\nhost = \"db.internal\"\nport = 3306").is_empty());
        assert_eq!(
            problems(
                "dbname = \"covet-production\"\nsocket = \"run/sock\"\nport = 3306\n\
                 defaults_file = \"my.cnf\"\nuser = \"a b\""
            ),
            [
                "app[0].database.dbname",
                "app[0].database.defaults_file",
                "app[0].database.socket",
                "app[0].database.socket",
                "app[0].database.user",
            ]
        );
        let text = format!("{BASE}\n{app}\ndbname = \"x\"\npassword = \"no\"");
        let e = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(e.contains("unknown field `password`"), "{e}");
    }

    #[test]
    fn analysis_problems_are_listed_by_key() {
        let text = format!(
            "{BASE}\n{}",
            r#"
            [[app]]
            name = "covet"
            unit = "covet.service"
            [app.health]
            url = "http://10.0.0.5:8000/health"
            [app.metrics]
            url = "http://10.0.0.6:8000/metrics"
            interval = "100ms"
            [[app.analysis]]
            name = "error rate"
            ratio = { num = 'http_requests_total{code=~"5.."', den = "http_requests_total" }
            max = 0.01
            [[app.analysis]]
            name = "p99"
            quantile = { histogram = "http_request_duration_seconds", q = 0.99 }
            [[app.analysis]]
            name = "db"
            postgres = "connections"
            max = 80
            [[app.analysis]]
            name = "db"
            unit = "memory_bytes"
            postgres = "connections"
            max_increase = "100%"
            "#
        );
        let problems: Vec<Problem> = parse(&text)
            .problems()
            .into_iter()
            .filter(|p| p.key.starts_with("app["))
            .collect();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "app[0].metrics.url",
                "app[0].metrics.interval",
                "app[0].analysis[0].ratio.num",
                "app[0].analysis[1]",
                "app[0].analysis[2].postgres",
                "app[0].analysis[3].name",
                "app[0].analysis[3]",
            ],
            "{problems:?}"
        );
        assert!(problems[3].message.contains("no threshold"), "{problems:?}");
        // The metrics endpoint may be the host:port a probe declares.
        let ok = text
            .replace("10.0.0.6", "10.0.0.5")
            .replace("100ms", "2s")
            .replace(r#"5..""#, r#"5.."}"#);
        let keys: Vec<String> = parse(&ok).problems().into_iter().map(|p| p.key).collect();
        assert!(
            !keys.iter().any(|k| k.starts_with("app[0].metrics")),
            "{keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k == "app[0].analysis[0].ratio.num"),
            "{keys:?}"
        );
        // An unknown rule kind fails the parse, naming it.
        let e = toml::from_str::<Config>(&text.replace(
            "postgres = \"connections\"\n            max = 80",
            "gauge = \"x\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("gauge"), "{e}");
    }

    fn package_error(package: &str) -> String {
        let text = format!(
            "{BASE}\n[[app]]\nname = \"covet\"\nunit = \"covet.service\"\n[app.package]\n{package}"
        );
        toml::from_str::<Config>(&text).unwrap_err().to_string()
    }

    #[test]
    fn each_package_kind_takes_its_own_fields() {
        let pip = "kind = \"pip\"\nname = \"covetpy\"\nvenv = \"/opt/covet/venv\"";
        let c = parse(&format!(
            "{BASE}\n[[app]]\nname = \"covet\"\nunit = \"covet.service\"\n[app.package]\n{pip}"
        ));
        let pkg = c.apps[0].package.as_ref().unwrap();
        assert_eq!((pkg.kind(), pkg.name()), ("pip", "covetpy"));
        assert_eq!(pkg.app_paths(), [("venv", Path::new("/opt/covet/venv"))]);
        // A field another kind uses is refused, by name.
        for (package, key) in [
            (format!("{pip}\nrepo_dir = \"/srv/repo\""), "repo_dir"),
            (format!("{pip}\ncurrent = \"/srv/current\""), "current"),
            (
                "kind = \"deb\"\nname = \"app\"\nrepo_dir = \"/r\"\nvenv = \"/v\"".to_owned(),
                "venv",
            ),
            (
                "kind = \"rpm\"\nname = \"app\"\nrepo_dir = \"/r\"\nfind_links = [\"/w\"]"
                    .to_owned(),
                "find_links",
            ),
            (
                "kind = \"release\"\nname = \"a\"\nreleases_dir = \"/r\"\ncurrent = \"/c\"\nvenv = \"/v\""
                    .to_owned(),
                "venv",
            ),
        ] {
            let err = package_error(&package);
            assert!(err.contains("unknown field") && err.contains(key), "{key}: {err}");
        }
        // What a kind needs is required, by name.
        for (package, key) in [
            ("kind = \"pip\"\nname = \"covetpy\"", "venv"),
            ("kind = \"deb\"\nname = \"app\"", "repo_dir"),
            ("kind = \"rpm\"\nname = \"app\"", "repo_dir"),
            (
                "kind = \"release\"\nname = \"a\"\ncurrent = \"/c\"",
                "releases_dir",
            ),
            (
                "kind = \"release\"\nname = \"a\"\nreleases_dir = \"/r\"",
                "current",
            ),
            ("name = \"app\"\nrepo_dir = \"/r\"", "kind"),
        ] {
            let err = package_error(package);
            assert!(
                err.contains("missing field") && err.contains(key),
                "{key}: {err}"
            );
        }
        let err = package_error("kind = \"msi\"\nname = \"app\"");
        assert!(err.contains("msi") && err.contains("pip"), "{err}");
    }

    #[test]
    fn repository_kinds_take_a_name_and_apt_a_keep_dir_only() {
        let c = parse(&format!(
            "{BASE}\n[[app]]\nname = \"a\"\nunit = \"a.service\"\n[app.package]\nkind = \"apt\"\nname = \"covet-app\"\nkeep_dir = \"/var/lib/covet-agent/apt\"\n\
             [[app]]\nname = \"b\"\nunit = \"b.service\"\n[app.package]\nkind = \"dnf\"\nname = \"covet-app\""
        ));
        let kinds: Vec<(&str, &str)> = c
            .apps
            .iter()
            .filter_map(|a| a.package.as_ref())
            .map(|p| (p.kind(), p.name()))
            .collect();
        assert_eq!(kinds, [("apt", "covet-app"), ("dnf", "covet-app")]);
        let package_problems: Vec<Problem> = c
            .problems()
            .into_iter()
            .filter(|p| p.key.contains(".package"))
            .collect();
        assert!(package_problems.is_empty(), "{package_problems:?}");
        // No path from elsewhere: a repository or an option is not a key.
        for (package, key) in [
            (
                "kind = \"apt\"\nname = \"a\"\nkeep_dir = \"/k\"\nrepo_dir = \"/r\"",
                "repo_dir",
            ),
            (
                "kind = \"dnf\"\nname = \"a\"\nkeep_dir = \"/k\"",
                "keep_dir",
            ),
            (
                "kind = \"dnf\"\nname = \"a\"\nrepo_dir = \"/r\"",
                "repo_dir",
            ),
        ] {
            let err = package_error(package);
            assert!(
                err.contains("unknown field") && err.contains(key),
                "{key}: {err}"
            );
        }
        let err = package_error("kind = \"apt\"\nname = \"a\"");
        assert!(
            err.contains("missing field") && err.contains("keep_dir"),
            "{err}"
        );
        let relative = parse(&format!(
            "{BASE}\n[[app]]\nname = \"a\"\nunit = \"a.service\"\n[app.package]\nkind = \"apt\"\nname = \"a\"\nkeep_dir = \"keep\""
        ));
        let keys: Vec<String> = relative.problems().into_iter().map(|p| p.key).collect();
        assert!(
            keys.contains(&"app[0].package.keep_dir".to_owned()),
            "{keys:?}"
        );
    }

    #[test]
    fn package_paths_must_be_absolute() {
        let text = format!(
            "{BASE}\n{}",
            r#"
            [[app]]
            name = "a"
            unit = "a.service"
            [app.package]
            kind = "release"
            name = "a"
            releases_dir = "releases"
            current = "/srv/a/current"
            repo_dir = "artifacts"
            [[app]]
            name = "b"
            unit = "b.service"
            [app.package]
            kind = "deb"
            name = "b"
            repo_dir = "repo"
            "#
        );
        let problems = parse(&text).problems();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "app[0].package.releases_dir",
            "app[0].package.repo_dir",
            "app[1].package.repo_dir",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
        assert!(!keys.contains(&"app[0].package.current"), "{keys:?}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>(&format!("{BASE}\nlisten_addr = 1")).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn durations_parse() {
        let text = format!(
            "{BASE}\n{}",
            r#"
            [[app]]
            name = "covet"
            unit = "covet.service"
            [app.health]
            url = "http://127.0.0.1:8000/health"
            timeout = "2s"
            interval = "250ms"
            "#
        );
        let c = parse(&text);
        let h = c.apps[0].health.as_ref().unwrap();
        assert_eq!(h.timeout, Duration::from_secs(2));
        assert_eq!(h.interval, Duration::from_millis(250));
        assert_eq!(
            c.declared_probe_targets().into_iter().collect::<Vec<_>>(),
            vec!["127.0.0.1:8000".to_owned()]
        );
    }
}
