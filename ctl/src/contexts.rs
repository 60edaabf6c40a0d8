//! The client configuration file of covetctl (like talosconfig).
//!
//! It lives at `~/.config/covet/config.toml` unless `COVETCTL_CONFIG` or an
//! explicit path says otherwise, and names "contexts": a set of agent
//! endpoints plus the CA and client certificate used to reach them.
//!
//! ```toml
//! current_context = "prod"
//! [contexts.prod]
//! endpoints = ["10.0.0.5:7443", "10.0.0.6:7443"]
//! ca = "/home/me/pki/ca.crt"
//! cert = "/home/me/pki/alice.crt"
//! key = "/home/me/pki/alice.key"
//! server_name = "agent-1" # optional
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv6Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "COVETCTL_CONFIG";

const CONFIG_MODE: u32 = 0o600;
const CONFIG_DIR_MODE: u32 = 0o700;

/// Errors of the client configuration; every message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot locate the covetctl config: set {CONFIG_ENV} or HOME")]
    NoConfigLocation,
    #[error("cannot {action} {}: {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("{} is not a valid covetctl config: {err}", path.display())]
    Parse { path: PathBuf, err: toml::de::Error },
    #[error("cannot serialize the covetctl config: {0}")]
    Serialize(#[from] toml::ser::Error),
    #[error("invalid context name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("context `{name}` already exists (pass --replace to overwrite it)")]
    DuplicateContext { name: String },
    #[error("no context named `{name}`; known contexts: {known}")]
    UnknownContext { name: String, known: String },
    #[error(
        "no context configured: run `covetctl config add-context NAME --endpoint HOST:PORT --ca CA.crt --cert CLIENT.crt --key CLIENT.key`"
    )]
    NoContexts,
    #[error("no current context: run `covetctl config use-context NAME` (known contexts: {known})")]
    NoCurrentContext { known: String },
    #[error("{what} {} does not exist", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("{what} {} is not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("a context needs at least one endpoint (HOST:PORT)")]
    NoEndpoints,
    #[error("invalid endpoint `{endpoint}`: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("invalid server name `{name}`: expected a DNS name or an IP address")]
    InvalidServerName { name: String },
}

impl ContextError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        move |err| ContextError::Io {
            action,
            path: path.to_path_buf(),
            err,
        }
    }

    fn invalid_endpoint(endpoint: &str, reason: impl Into<String>) -> Self {
        ContextError::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contexts: BTreeMap<String, Context>,
}

/// How to reach one set of agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// `HOST:PORT` entries; IPv6 hosts in brackets (`[::1]:7443`).
    pub endpoints: Vec<String>,
    /// CA certificate that signed the agents' certificates.
    pub ca: PathBuf,
    /// Client certificate (its O= field carries the role).
    pub cert: PathBuf,
    /// Private key of the client certificate.
    pub key: PathBuf,
    /// TLS name to verify when an endpoint is an IP without a matching SAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Where the config lives by default: `$COVETCTL_CONFIG`, else
/// `$XDG_CONFIG_HOME/covet/config.toml`, else `$HOME/.config/covet/config.toml`.
pub fn default_path() -> Result<PathBuf, ContextError> {
    default_path_from(
        std::env::var_os(CONFIG_ENV),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

/// `explicit` if given (e.g. `--config`), else [`default_path`].
pub fn resolve_path(explicit: Option<&Path>) -> Result<PathBuf, ContextError> {
    match explicit {
        Some(path) => Ok(path.to_path_buf()),
        None => default_path(),
    }
}

/// [`default_path`] with the environment passed in, so it can be tested
/// without mutating process-global state.
fn default_path_from(
    config_env: Option<OsString>,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, ContextError> {
    let non_empty = |value: Option<OsString>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = non_empty(config_env) {
        return Ok(path);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(xdg) = non_empty(xdg_config_home).filter(|p| p.is_absolute()) {
        return Ok(xdg.join("covet").join("config.toml"));
    }
    non_empty(home)
        .map(|home| home.join(".config").join("covet").join("config.toml"))
        .ok_or(ContextError::NoConfigLocation)
}

/// Checks a `HOST:PORT` endpoint and returns the host (without IPv6
/// brackets) and the port.
pub fn split_endpoint(endpoint: &str) -> Result<(&str, u16), ContextError> {
    let invalid = |reason: &str| ContextError::invalid_endpoint(endpoint, reason);
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| invalid("expected [IPV6]:PORT, e.g. [::1]:7443"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| invalid("the bracketed host is not an IPv6 address"))?;
        (host, port)
    } else {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected HOST:PORT, e.g. 10.0.0.5:7443"))?;
        if host.contains(':') {
            return Err(invalid("put IPv6 addresses in brackets, e.g. [::1]:7443"));
        }
        if ServerName::try_from(host).is_err() {
            return Err(invalid("the host is neither an IP address nor a DNS name"));
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?;
    Ok((host, port))
}

impl ClientConfig {
    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ContextError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(err) => return Err(ContextError::io("read", path)(err)),
        };
        toml::from_str(&text).map_err(|err| ContextError::Parse {
            path: path.to_path_buf(),
            err,
        })
    }

    /// Writes the config to `path` atomically with mode 0600, creating
    /// missing parent directories with mode 0700.
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let text = toml::to_string_pretty(self)?;
        let dir = parent_dir(path);
        DirBuilder::new()
            .recursive(true)
            .mode(CONFIG_DIR_MODE)
            .create(dir)
            .map_err(ContextError::io("create directory", dir))?;
        write_atomically(path, dir, text.as_bytes())
    }

    /// Adds context `name`, refusing to overwrite an existing one unless
    /// `replace`. Relative file paths are resolved against the current
    /// directory; all three files must exist. The first context becomes the
    /// current one.
    pub fn add_context(
        &mut self,
        name: &str,
        ctx: Context,
        replace: bool,
    ) -> Result<(), ContextError> {
        let cwd = std::env::current_dir().map_err(ContextError::io(
            "determine",
            Path::new("the current directory"),
        ))?;
        self.add_context_relative_to(name, ctx, replace, &cwd)
    }

    /// Makes `name` the current context.
    pub fn use_context(&mut self, name: &str) -> Result<(), ContextError> {
        if !self.contexts.contains_key(name) {
            return Err(self.unknown_context(name));
        }
        self.current_context = Some(name.to_string());
        Ok(())
    }

    /// The current context and its name.
    pub fn current(&self) -> Result<(&str, &Context), ContextError> {
        let Some(name) = self.current_context.as_deref() else {
            return Err(if self.contexts.is_empty() {
                ContextError::NoContexts
            } else {
                ContextError::NoCurrentContext {
                    known: self.known_contexts(),
                }
            });
        };
        self.contexts
            .get_key_value(name)
            .map(|(name, ctx)| (name.as_str(), ctx))
            .ok_or_else(|| self.unknown_context(name))
    }

    fn add_context_relative_to(
        &mut self,
        name: &str,
        mut ctx: Context,
        replace: bool,
        base: &Path,
    ) -> Result<(), ContextError> {
        if let Some(reason) = crate::pki::name_problem(name) {
            return Err(ContextError::InvalidName {
                name: name.to_string(),
                reason,
            });
        }
        if !replace && self.contexts.contains_key(name) {
            return Err(ContextError::DuplicateContext {
                name: name.to_string(),
            });
        }
        ctx.validate_endpoints()?;
        ctx.validate_server_name()?;
        ctx.ca = absolute_existing_file("CA certificate", &ctx.ca, base)?;
        ctx.cert = absolute_existing_file("client certificate", &ctx.cert, base)?;
        ctx.key = absolute_existing_file("client key", &ctx.key, base)?;

        self.contexts.insert(name.to_string(), ctx);
        if self.current_context.is_none() {
            self.current_context = Some(name.to_string());
        }
        Ok(())
    }

    fn unknown_context(&self, name: &str) -> ContextError {
        ContextError::UnknownContext {
            name: name.to_string(),
            known: self.known_contexts(),
        }
    }

    fn known_contexts(&self) -> String {
        if self.contexts.is_empty() {
            "(none)".to_string()
        } else {
            self.contexts
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

impl Context {
    fn validate_endpoints(&self) -> Result<(), ContextError> {
        if self.endpoints.is_empty() {
            return Err(ContextError::NoEndpoints);
        }
        self.endpoints
            .iter()
            .try_for_each(|endpoint| split_endpoint(endpoint).map(drop))
    }

    fn validate_server_name(&self) -> Result<(), ContextError> {
        match &self.server_name {
            Some(name) if ServerName::try_from(name.as_str()).is_err() => {
                Err(ContextError::InvalidServerName { name: name.clone() })
            }
            _ => Ok(()),
        }
    }
}

/// Relative paths are canonicalized against `base`; absolute ones are kept
/// as given (so a symlink the user rotates keeps working). Either way the
/// file must exist.
fn absolute_existing_file(
    what: &'static str,
    path: &Path,
    base: &Path,
) -> Result<PathBuf, ContextError> {
    let joined = base.join(path);
    let metadata = match fs::metadata(&joined) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(ContextError::MissingFile { what, path: joined });
        }
        Err(err) => return Err(ContextError::io("inspect", &joined)(err)),
    };
    if !metadata.is_file() {
        return Err(ContextError::NotAFile { what, path: joined });
    }
    if path.is_absolute() {
        return Ok(joined);
    }
    fs::canonicalize(&joined).map_err(ContextError::io("resolve", &joined))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Temp file in the same directory + fsync + rename, so readers see either
/// the old or the new config, never a torn one.
fn write_atomically(path: &Path, dir: &Path, contents: &[u8]) -> Result<(), ContextError> {
    let tmp = temp_path_for(path, dir);
    let result = write_new_private_file(&tmp, contents)
        .and_then(|()| fs::rename(&tmp, path).map_err(ContextError::io("replace", path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself; without this a crash may resurrect the old file.
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(ContextError::io("sync directory", dir))
}

fn temp_path_for(path: &Path, dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".to_string());
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{file_name}.tmp-{}-{unique}", std::process::id()))
}

fn write_new_private_file(path: &Path, contents: &[u8]) -> Result<(), ContextError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(CONFIG_MODE)
        .open(path)
        .map_err(ContextError::io("create", path))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(ContextError::io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tempfile::TempDir;

    /// A directory holding empty ca.crt, alice.crt and alice.key files.
    fn pki_files() -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in ["ca.crt", "alice.crt", "alice.key"] {
            fs::write(dir.path().join(file), "x").unwrap();
        }
        dir
    }

    fn context_in(dir: &Path, endpoints: &[&str]) -> Context {
        Context {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ca: dir.join("ca.crt"),
            cert: dir.join("alice.crt"),
            key: dir.join("alice.key"),
            server_name: None,
        }
    }

    #[test]
    fn first_context_becomes_current() {
        let pki = pki_files();
        let mut config = ClientConfig::default();
        assert!(matches!(config.current(), Err(ContextError::NoContexts)));
        let err = config.current().unwrap_err().to_string();
        assert!(err.contains("covetctl config add-context"), "{err}");

        config
            .add_context("prod", context_in(pki.path(), &["10.0.0.5:7443"]), false)
            .unwrap();
        config
            .add_context("staging", context_in(pki.path(), &["[::1]:7443"]), false)
            .unwrap();
        let (name, ctx) = config.current().unwrap();
        assert_eq!(name, "prod");
        assert_eq!(ctx.endpoints, ["10.0.0.5:7443"]);

        config.use_context("staging").unwrap();
        assert_eq!(config.current().unwrap().0, "staging");
    }

    #[test]
    fn duplicate_context_needs_replace() {
        let pki = pki_files();
        let mut config = ClientConfig::default();
        let ctx = context_in(pki.path(), &["a.example:7443"]);
        config.add_context("prod", ctx.clone(), false).unwrap();
        let err = config.add_context("prod", ctx.clone(), false).unwrap_err();
        assert!(matches!(err, ContextError::DuplicateContext { .. }));

        let mut replacement = ctx;
        replacement.endpoints = vec!["b.example:7443".into()];
        config.add_context("prod", replacement, true).unwrap();
        assert_eq!(config.contexts["prod"].endpoints, ["b.example:7443"]);
    }

    #[test]
    fn use_context_unknown_lists_known_ones() {
        let pki = pki_files();
        let mut config = ClientConfig::default();
        config
            .add_context("prod", context_in(pki.path(), &["h:1"]), false)
            .unwrap();
        let err = config.use_context("nope").unwrap_err();
        assert!(matches!(err, ContextError::UnknownContext { .. }));
        assert!(err.to_string().contains("known contexts: prod"), "{err}");
        assert_eq!(config.current_context.as_deref(), Some("prod"));
    }

    #[test]
    fn dangling_current_context_is_reported() {
        let config = ClientConfig {
            current_context: Some("gone".into()),
            contexts: BTreeMap::new(),
        };
        let err = config.current().unwrap_err();
        assert!(matches!(err, ContextError::UnknownContext { .. }), "{err}");
    }

    #[test]
    fn save_and_load_round_trip_with_private_mode() {
        let pki = pki_files();
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("nested/covet/config.toml");

        let mut config = ClientConfig::default();
        let mut ctx = context_in(pki.path(), &["10.0.0.5:7443", "10.0.0.6:7443"]);
        ctx.server_name = Some("agent-1".into());
        config.add_context("prod", ctx, false).unwrap();
        config.save(&path).unwrap();

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(ClientConfig::load(&path).unwrap(), config);

        // Saving again replaces the file and leaves no temp files behind.
        config.use_context("prod").unwrap();
        config.save(&path).unwrap();
        let entries = fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(entries, 1);
    }

    #[test]
    fn missing_config_is_empty_and_malformed_one_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(ClientConfig::load(&path).unwrap(), ClientConfig::default());

        fs::write(&path, "current_context = \"x\"\nbogus = 1\n").unwrap();
        let err = ClientConfig::load(&path).unwrap_err();
        assert!(matches!(err, ContextError::Parse { .. }));
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("bogus"), "{message}");
    }

    #[test]
    fn parses_the_documented_format() {
        let text = r#"
            current_context = "prod"
            [contexts.prod]
            endpoints = ["10.0.0.5:7443", "10.0.0.6:7443"]
            ca = "/home/me/pki/ca.crt"
            cert = "/home/me/pki/alice.crt"
            key = "/home/me/pki/alice.key"
        "#;
        let config: ClientConfig = toml::from_str(text).unwrap();
        let (name, ctx) = config.current().unwrap();
        assert_eq!(name, "prod");
        assert_eq!(ctx.key, Path::new("/home/me/pki/alice.key"));
        assert_eq!(ctx.server_name, None);
    }

    #[test]
    fn relative_paths_are_canonicalized_against_the_base() {
        let pki = pki_files();
        let mut config = ClientConfig::default();
        let ctx = Context {
            endpoints: vec!["localhost:7443".into()],
            ca: "ca.crt".into(),
            cert: "./sub/../alice.crt".into(),
            key: "alice.key".into(),
            server_name: None,
        };
        fs::create_dir(pki.path().join("sub")).unwrap();
        config
            .add_context_relative_to("dev", ctx, false, pki.path())
            .unwrap();
        let base = fs::canonicalize(pki.path()).unwrap();
        let ctx = &config.contexts["dev"];
        assert_eq!(ctx.ca, base.join("ca.crt"));
        assert_eq!(ctx.cert, base.join("alice.crt"));
        assert_eq!(ctx.key, base.join("alice.key"));
    }

    #[test]
    fn missing_files_are_named() {
        let pki = pki_files();
        let mut ctx = context_in(pki.path(), &["h:1"]);
        ctx.key = pki.path().join("bob.key");
        let err = ClientConfig::default()
            .add_context("prod", ctx, false)
            .unwrap_err();
        assert!(matches!(
            err,
            ContextError::MissingFile {
                what: "client key",
                ..
            }
        ));
        assert!(err.to_string().contains("bob.key"), "{err}");
    }

    #[test]
    fn invalid_names_and_server_names_are_refused() {
        let pki = pki_files();
        let mut config = ClientConfig::default();
        for name in ["", ".x", "a b", "a/b"] {
            let err = config
                .add_context(name, context_in(pki.path(), &["h:1"]), false)
                .unwrap_err();
            assert!(matches!(err, ContextError::InvalidName { .. }), "{name:?}");
        }
        let mut ctx = context_in(pki.path(), &["h:1"]);
        ctx.server_name = Some("not a name".into());
        let err = config.add_context("prod", ctx, false).unwrap_err();
        assert!(matches!(err, ContextError::InvalidServerName { .. }));
    }

    #[test]
    fn endpoints_are_validated() {
        assert_eq!(split_endpoint("10.0.0.5:7443").unwrap(), ("10.0.0.5", 7443));
        assert_eq!(split_endpoint("agent-1.lan:1").unwrap(), ("agent-1.lan", 1));
        assert_eq!(split_endpoint("[::1]:7443").unwrap(), ("::1", 7443));
        assert_eq!(split_endpoint("localhost:65535").unwrap().1, 65535);
        for bad in [
            "",
            "host",
            "host:",
            ":7443",
            "host:0",
            "host:65536",
            "host:x",
            "::1:7443",
            "[::1]",
            "[nope]:1",
            "bad host:1",
        ] {
            let err = split_endpoint(bad).unwrap_err();
            assert!(
                matches!(err, ContextError::InvalidEndpoint { .. }),
                "{bad:?}"
            );
        }

        let pki = pki_files();
        let err = ClientConfig::default()
            .add_context("prod", context_in(pki.path(), &[]), false)
            .unwrap_err();
        assert!(matches!(err, ContextError::NoEndpoints));
    }

    #[test]
    fn default_path_prefers_env_then_xdg_then_home() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            default_path_from(some("/etc/covet.toml"), some("/xdg"), some("/home/me")).unwrap(),
            Path::new("/etc/covet.toml")
        );
        assert_eq!(
            default_path_from(None, some("/xdg"), some("/home/me")).unwrap(),
            Path::new("/xdg/covet/config.toml")
        );
        assert_eq!(
            default_path_from(some(""), some("relative"), some("/home/me")).unwrap(),
            Path::new("/home/me/.config/covet/config.toml")
        );
        assert!(matches!(
            default_path_from(None, None, None),
            Err(ContextError::NoConfigLocation)
        ));
        assert_eq!(
            resolve_path(Some(Path::new("/explicit.toml"))).unwrap(),
            Path::new("/explicit.toml")
        );
    }
}
