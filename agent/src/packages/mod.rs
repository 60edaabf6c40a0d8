//! The app's package: which version is installed, whether a version is
//! available, and how to swap one version for another and back, one module
//! per kind behind the [`Kind`] trait.
//!
//! Every kind follows the same steps: [`check_available`] (preflight),
//! [`prepare_restore_point`], [`install`], then [`restore`] on failure or
//! [`discard`] on success. Each step is safe to run again after a crash.
//!
//! - [`pip`]: the virtualenv is snapshotted aside (files hard-linked), then
//!   pip installs in place from local wheelhouses only (`--no-index`).
//!   Virtualenvs are not relocatable (absolute shebangs), so the snapshot,
//!   renamed back, is the exact way back; one whose files were written in
//!   place since is refused, and the rollback restores the venv from the
//!   upgrade's backup instead ([`Fallback::RestorePaths`]).
//! - [`release`]: trees unpacked under `releases_dir/VERSION/`, with a
//!   `current` symlink swapped atomically.
//! - [`system`] (deb, rpm): package files in `repo_dir`, recognized by their
//!   control fields (not their names), installed with `dpkg -i` / `rpm -U
//!   --oldpackage`. Before the install, the installed version's package file
//!   is copied to `REPO_PARENT/.REPO_NAME.before-OP_ID/`, so a rollback can
//!   reinstall it even if the repository changes; no copy, no upgrade.
//! - [`apt`], [`dnf`]: from the host's configured repositories (`apt-get
//!   install NAME=VERSION`, `dnf install NAME-VERSION`).
//!
//! A new kind is one file implementing [`Kind`], one [`PackageConfig`]
//! variant and one [`RestorePoint`] variant; the compiler then points at
//! the arms to add (`with_kind!`, [`restore`], [`discard`]).

mod apt;
mod dnf;
mod pip;
mod release;
mod system;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::archive::ArchiveError;
use crate::config::{AppConfig, PackageConfig};
use crate::host::process::{Output, ProcessBuilder, ProcessError};

const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// dpkg and rpm run maintainer scripts and look for helpers (ldconfig,
/// start-stop-daemon) in sbin, whatever the agent's own PATH is.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
use crate::names::MAX_VERSION_LEN;
const MAX_OP_ID_LEN: usize = 128;
/// Lines of tool output kept for the error message when the tool fails.
const OUTPUT_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{name} {version} is not available; searched: {searched}")]
    VersionMissing {
        name: String,
        version: String,
        searched: String,
    },
    #[error(
        "invalid version {0:?}: use 1 to {MAX_VERSION_LEN} letters, digits and `. + ! - _`, not starting with `-` or `.`, without `..`"
    )]
    InvalidVersion(String),
    #[error("invalid operation id {0:?}: use 1 to {MAX_OP_ID_LEN} letters, digits, `-` and `_`")]
    InvalidOperationId(String),
    #[error("package {name} (kind {kind}) needs `{field}` in the app's [package] configuration")]
    NotConfigured {
        name: String,
        kind: &'static str,
        field: &'static str,
    },
    #[error("{program} failed ({status}):\n{output}")]
    Tool {
        program: String,
        status: String,
        output: String,
    },
    #[error("{program} did not finish within {}", humantime::format_duration(*after))]
    Timeout { program: String, after: Duration },
    #[error("release artifact {} was not unpacked: {source}", artifact.display())]
    Archive {
        artifact: PathBuf,
        source: ArchiveError,
    },
    #[error(
        "not enough space in {} to copy the virtualenv: {needed} bytes needed, {available} available; free some space and retry",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("cannot restore {}: {why}", path.display())]
    CannotRestore { path: PathBuf, why: String },
    #[error(
        "cannot restore {} from its snapshot {}: files in it were changed in place after it was taken; restore the virtualenv from the upgrade's backup",
        venv.display(),
        copy.display()
    )]
    SnapshotChanged { venv: PathBuf, copy: PathBuf },
    /// What a restore point kept is no longer there (a later upgrade
    /// discarded it, or a restore already used it): the package must come
    /// back another way.
    #[error("the restore point of {name} is gone: {what}")]
    RestorePointGone { name: String, what: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{0}")]
    Unsupported(String),
    /// The runner could not run a tool (not its exit status: see `Tool`).
    #[error(transparent)]
    Process(ProcessError),
    #[error(
        "{} belongs to uid {uid}, which is no system user: pip runs as the virtualenv's owner; give the directory to the app's user",
        path.display()
    )]
    NamelessOwner { path: PathBuf, uid: u32 },
    #[error("app {0} declares no [package]")]
    NoPackage(String),
    #[error(
        "cannot keep {name} {version} for a rollback: no package file of it in {searched}; put the {kind} file of {name} {version} in repo_dir and retry (nothing was changed)"
    )]
    PreviousMissing {
        name: String,
        version: String,
        kind: &'static str,
        searched: String,
    },
    /// apt, dnf: the repositories no longer offer the installed version,
    /// so no rollback could bring it back.
    #[error(
        "cannot keep {name} {version} for a rollback: it is not to be had from {searched}; make a configured repository offer {name} {version} again and retry (nothing was changed)"
    )]
    PreviousUnavailable {
        name: String,
        version: String,
        searched: String,
    },
    #[error(
        "package {name} is in state {state:?}, not fully installed; repair it first (`dpkg --configure -a` or `apt-get -f install`; rpm: `rpm -V {name}`), then retry"
    )]
    Unsettled { name: String, state: String },
    #[error("{program} succeeded but {name} is {found}, not {wanted}")]
    WrongVersion {
        program: String,
        name: String,
        wanted: String,
        found: String,
    },
}

/// What is needed to put the previous package back exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestorePoint {
    /// `copy` is a complete snapshot of `venv` taken before the install
    /// (files hard-linked, see `pip::snapshot_venv`); `version` is what was
    /// installed then; `fingerprint` says what the snapshot held, so a
    /// restore refuses a snapshot whose files were changed in place since.
    Pip {
        venv: PathBuf,
        copy: PathBuf,
        version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    /// `current` pointed at `previous_target` (the link's text, as read).
    Release {
        current: PathBuf,
        previous_target: PathBuf,
    },
    /// deb: `name` was at `version` (None: not installed, so a restore
    /// removes it); `kept` is the copy of that version's .deb in `keep_dir`.
    Deb {
        name: String,
        version: Option<String>,
        keep_dir: PathBuf,
        kept: Option<PathBuf>,
    },
    /// rpm: as for deb; versions are `VERSION-RELEASE`.
    Rpm {
        name: String,
        version: Option<String>,
        keep_dir: PathBuf,
        kept: Option<PathBuf>,
    },
    /// dnf: `name` was at `version` (`VERSION-RELEASE`; None: not
    /// installed, so a restore removes it), installed again from the
    /// repositories.
    Dnf {
        name: String,
        version: Option<String>,
    },
    /// Nothing to put back.
    None,
}

/// A version that passed [`Version::parse`]: always a safe file name and
/// never an option. Only the public entry points below make one, so the
/// kinds never check again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version<'a>(&'a str);

impl<'a> Version<'a> {
    /// PEP 440 / semver characters only (`A-Za-z0-9.+!-_`), 1 to 64 of
    /// them, no leading `-` or `.`, no `..`.
    pub fn parse(v: &'a str) -> Result<Self, PackageError> {
        if crate::names::Version::is_safe(v) {
            Ok(Version(v))
        } else {
            Err(PackageError::InvalidVersion(v.to_owned()))
        }
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }
}

impl std::fmt::Display for Version<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// An operation id that may become part of a file name: 1 to 128 letters,
/// digits, `-` and `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId<'a>(&'a str);

impl<'a> OpId<'a> {
    pub fn parse(op_id: &'a str) -> Result<Self, PackageError> {
        let ok = (1..=MAX_OP_ID_LEN).contains(&op_id.len())
            && op_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if ok {
            Ok(OpId(op_id))
        } else {
            Err(PackageError::InvalidOperationId(op_id.to_owned()))
        }
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }
}

/// Where an install's tool output goes: `on_line(is_stderr, line)`.
pub type OnLine<'a> = &'a (dyn Fn(bool, &str) + Send + Sync);

/// How one install runs.
pub struct InstallOptions<'a> {
    /// The app's user: a release artifact's files get its ownership
    /// (without one: the owner of `releases_dir`).
    pub app_user: Option<&'a str>,
    pub op_id: OpId<'a>,
    pub timeout: Duration,
    pub on_line: OnLine<'a>,
}

/// How a rollback takes the package back when its restore point cannot be
/// used (gone, or changed since it was taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// These paths come back from the upgrade's backup, which therefore
    /// always holds them (pip: the virtualenv).
    RestorePaths(Vec<PathBuf>),
    /// The version the backup was taken at is installed again.
    ReinstallBackedUpVersion,
}

/// One package kind: what the workflow asks of a package, answered for the
/// kind's own configuration. Each method is safe to run again after a crash.
pub(crate) trait Kind {
    /// Preflight: `version` exists in the configured source, without
    /// touching the network.
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError>;

    /// Records how to put the installed package back exactly; called before
    /// [`Kind::install`], and reused by a retry of the same `op_id`.
    async fn prepare_restore_point(&self, op_id: OpId<'_>) -> Result<RestorePoint, PackageError>;

    /// Removes what [`Kind::prepare_restore_point`] may have left for
    /// `op_id` when the operation died before recording it. Idempotent.
    async fn abandon_restore_point(&self, op_id: OpId<'_>) -> Result<(), PackageError>;

    /// Installs exactly `version` (up or down); nothing to do when it is
    /// installed already.
    async fn install(
        &self,
        version: Version<'_>,
        options: &InstallOptions<'_>,
    ) -> Result<(), PackageError>;

    /// The installed version, when one is found.
    async fn installed_version(&self) -> Option<String>;

    /// How a rollback takes the package back without its restore point.
    fn fallback(&self) -> Fallback;

    /// The argv a dry run of `version`'s migrations runs: `argv` as
    /// declared (this default), or one that takes its program from a
    /// scratch install of `version` made in a directory it puts in
    /// `scratch` (the caller removes it), each tool run limited to `timeout`.
    async fn dry_run_argv(
        &self,
        _version: Version<'_>,
        argv: &[String],
        _scratch: &mut Option<PathBuf>,
        _timeout: Duration,
    ) -> Result<Vec<String>, String> {
        Ok(argv.to_vec())
    }
}

/// Runs `$body` with `$kind` bound to the [`Kind`] of `$pkg`'s variant:
/// the one place that maps configuration variants to kinds. Callers box
/// the kind's future: inline, the largest kind's state would sit in every
/// caller's (a tokio worker's stack overflowed in debug builds).
macro_rules! with_kind {
    ($pkg:expr, |$kind:ident| $body:expr) => {
        match $pkg {
            PackageConfig::Pip(config) => {
                let $kind = config;
                $body
            }
            PackageConfig::Release(config) => {
                let $kind = config;
                $body
            }
            PackageConfig::Deb(config) => {
                let $kind = system::SystemPackages::new(system::Manager::Dpkg, config);
                $body
            }
            PackageConfig::Rpm(config) => {
                let $kind = system::SystemPackages::new(system::Manager::Rpm(&[]), config);
                $body
            }
            PackageConfig::Apt(config) => {
                let $kind = apt::Apt(config);
                $body
            }
            PackageConfig::Dnf(config) => {
                let $kind = dnf::Dnf(config);
                $body
            }
        }
    };
}

/// The app's package configuration, or why there is none.
pub fn package_of(app: &AppConfig) -> Result<&PackageConfig, PackageError> {
    app.package
        .as_ref()
        .ok_or_else(|| PackageError::NoPackage(app.name.clone()))
}

/// Preflight: `version` exists in the configured source, without touching
/// the network. pip: a wheel or sdist of `name==version` in a `find_links`
/// directory. release: an artifact `NAME-VERSION.tar.gz|.tar.zst|.tar` in
/// `repo_dir` or a `find_links` directory, or an unpacked
/// `releases_dir/VERSION/`. deb, rpm: a package file in `repo_dir` whose
/// own name and version fields (not its file name) are `name` and `version`
/// (rpm: `VERSION-RELEASE` or `VERSION`), for this machine's architecture.
pub async fn check_available(pkg: &PackageConfig, version: &str) -> Result<(), PackageError> {
    let version = Version::parse(version)?;
    with_kind!(pkg, |kind| Box::pin(kind.check_available(version)).await)
}

/// Records how to put the installed package back exactly; call before
/// [`install`]. pip: copies the whole virtualenv to
/// `VENV_PARENT/.VENV_NAME.before-OP_ID` (reused if a complete copy for this
/// operation exists). release: records where `current` points. deb, rpm:
/// copies the installed version's package file (from `repo_dir`, or for deb
/// `/var/cache/apt/archives`) to `REPO_PARENT/.REPO_NAME.before-OP_ID/`,
/// and fails with nothing changed when there is none (reused on a retry).
pub async fn prepare_restore_point(
    pkg: &PackageConfig,
    op_id: &str,
) -> Result<RestorePoint, PackageError> {
    let op_id = OpId::parse(op_id)?;
    with_kind!(pkg, |kind| Box::pin(kind.prepare_restore_point(op_id))
        .await)
}

/// Removes what [`prepare_restore_point`] may have left for `op_id` when the
/// operation died before recording its restore point: nothing was installed
/// then, so a copy (complete or `.partial`) is only clutter. Idempotent.
pub async fn abandon_restore_point(pkg: &PackageConfig, op_id: &str) -> Result<(), PackageError> {
    let op_id = OpId::parse(op_id)?;
    with_kind!(pkg, |kind| Box::pin(kind.abandon_restore_point(op_id))
        .await)
}

/// Installs exactly `version`, handing each line of tool output to
/// `on_line(is_stderr, line)`. pip: `pip install --no-index --find-links ...
/// NAME==VERSION` in the virtualenv, as the virtualenv's owner. release:
/// unpacks the artifact to `releases_dir/VERSION/` (unless already there),
/// then points `current` at it atomically. deb: `dpkg -i` of the file
/// [`check_available`] finds, keeping the operator's edited conffiles. rpm:
/// `rpm -U --oldpackage` of it (up or down). Both do nothing when `version`
/// is already installed.
pub async fn install(
    pkg: &PackageConfig,
    version: &str,
    op_id: &str,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    install_as(None, pkg, version, op_id, timeout, on_line).await
}

/// [`install`], with a release artifact's files owned by the app's user
/// `app_user` (without one: by the owner of `releases_dir`); setuid and
/// setgid bits of an artifact are always dropped.
pub async fn install_as(
    app_user: Option<&str>,
    pkg: &PackageConfig,
    version: &str,
    op_id: &str,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    let version = Version::parse(version)?;
    let options = InstallOptions {
        app_user,
        op_id: OpId::parse(op_id)?,
        timeout,
        on_line,
    };
    with_kind!(pkg, |kind| Box::pin(kind.install(version, &options)).await)
}

/// Installs `version` as a release of its own beside the live one, for
/// deploys that run two versions side by side: pip with `releases_dir`
/// makes `releases_dir/VERSION/venv` (kept if already complete). Returns
/// the release's virtualenv; nothing the live version uses is touched.
pub async fn install_release(
    pkg: &PackageConfig,
    version: &str,
    timeout: Duration,
) -> Result<PathBuf, PackageError> {
    let version = Version::parse(version)?;
    match pkg {
        PackageConfig::Pip(pip) => Box::pin(pip::pip_install_release(pip, version, timeout)).await,
        other => Err(PackageError::Unsupported(format!(
            "package {} is kind {:?}: only pip with releases_dir installs versions side by side",
            other.name(),
            other.kind()
        ))),
    }
}

/// Where [`install_release`] puts `version` (pip with `releases_dir`), so a
/// program of the app's venv can be run from the new release instead.
pub fn release_venv(pkg: &PackageConfig, version: &str) -> Option<PathBuf> {
    match pkg {
        PackageConfig::Pip(pip) => pip
            .releases_dir
            .as_deref()
            .map(|dir| pip::release_venv(dir, version)),
        _ => None,
    }
}

/// The version of a complete release's virtualenv ([`install_release`]).
pub fn release_version_of(venv: &Path) -> Option<String> {
    pip::release_version_of(venv)
}

/// Puts the package recorded in `rp` back exactly. pip: the live virtualenv
/// is moved aside (`.VENV_NAME.failed-OP_ID`), the copy renamed into place,
/// the aside tree removed. release: `current` is pointed back atomically.
/// deb, rpm: the kept file is reinstalled (or the package removed if it was
/// not installed), unless the previous version is already there.
/// Safe to run again after a crash half way; once a pip snapshot or a
/// release tree is gone (used, or discarded by a later upgrade), it fails
/// with [`PackageError::RestorePointGone`] and the caller takes the package
/// back another way ([`fallback`]).
pub async fn restore(rp: &RestorePoint) -> Result<(), PackageError> {
    match rp {
        RestorePoint::Pip {
            venv,
            copy,
            fingerprint,
            ..
        } => pip::restore(venv, copy, fingerprint.as_deref()).await,
        RestorePoint::Release {
            current,
            previous_target,
        } => release::restore(current, previous_target).await,
        RestorePoint::Deb {
            name,
            version,
            kept,
            ..
        } => system::Manager::Dpkg.restore(name, version, kept).await,
        RestorePoint::Rpm {
            name,
            version,
            kept,
            ..
        } => system::Manager::Rpm(&[]).restore(name, version, kept).await,
        RestorePoint::Dnf { name, version } => Box::pin(dnf::restore(name, version)).await,
        RestorePoint::None => Ok(()),
    }
}

/// After a successful upgrade: removes the virtualenv snapshot, or the kept
/// package file. Releases keep their old tree (it is what a later rollback
/// installs).
pub async fn discard(rp: &RestorePoint) -> Result<(), PackageError> {
    match rp {
        RestorePoint::Pip { copy, .. } => pip::discard(copy).await,
        RestorePoint::Deb { keep_dir, .. } | RestorePoint::Rpm { keep_dir, .. } => {
            system::discard(keep_dir).await
        }
        RestorePoint::Release { .. } | RestorePoint::Dnf { .. } | RestorePoint::None => Ok(()),
    }
}

/// The installed version of the app's package, when one is declared and found.
pub async fn installed_version(app: &AppConfig) -> Option<String> {
    let pkg = app.package.as_ref()?;
    with_kind!(pkg, |kind| Box::pin(kind.installed_version()).await)
}

/// How a rollback takes `pkg` back when its restore point cannot be used.
pub fn fallback(pkg: &PackageConfig) -> Fallback {
    with_kind!(pkg, |kind| kind.fallback())
}

/// The package's paths an app backup must hold besides the declared ones,
/// so that the [`fallback`] can put them back.
pub fn backup_paths(pkg: &PackageConfig) -> Vec<PathBuf> {
    match fallback(pkg) {
        Fallback::RestorePaths(paths) => paths,
        Fallback::ReinstallBackedUpVersion => Vec::new(),
    }
}

/// The argv a migration dry run of `version` runs (see
/// [`Kind::dry_run_argv`]); a directory left in `scratch` is the caller's
/// to remove.
pub async fn dry_run_argv(
    pkg: &PackageConfig,
    version: &str,
    argv: &[String],
    scratch: &mut Option<PathBuf>,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let version = Version::parse(version).map_err(|e| e.to_string())?;
    with_kind!(pkg, |kind| Box::pin(
        kind.dry_run_argv(version, argv, scratch, timeout)
    )
    .await)
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> PackageError {
    let context = context.into();
    move |source| PackageError::Io { context, source }
}

/// Runs file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PackageError> + Send + 'static,
) -> Result<T, PackageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PackageError::Io {
            context: "file-system task failed".to_owned(),
            source: io::Error::other(e),
        })?
}

/// `DIR/.NAME.TAG-OP_ID`, next to `path` so renames stay on one file system.
fn sibling(path: &Path, tag: &str, op_id: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{tag}-{op_id}"))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), PackageError> {
    crate::files::fsync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Removes a file, symlink or tree; a missing path is fine (retries).
fn remove_tree(path: &Path) -> Result<(), PackageError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(io_error(format!("removing {}", path.display())))
}

fn rename(from: &Path, to: &Path) -> Result<(), PackageError> {
    fs::rename(from, to).map_err(io_error(format!(
        "renaming {} to {}",
        from.display(),
        to.display()
    )))
}

// ---------------------------------------------------------------------------
// Running a tool
// ---------------------------------------------------------------------------

/// Runs a package tool through the one runner to its end, streaming its
/// output lines; a failure keeps its last [`OUTPUT_TAIL_LINES`] lines.
async fn run_tool(command: ProcessBuilder, on_line: OnLine<'_>) -> Result<(), PackageError> {
    Box::pin(command.tail_lines(OUTPUT_TAIL_LINES).run(on_line))
        .await
        .map(|_| ())
        .map_err(PackageError::from)
}

impl From<ProcessError> for PackageError {
    /// A tool's failure and time-out read as before the one runner.
    fn from(e: ProcessError) -> Self {
        match e {
            ProcessError::Timeout { program, after } => PackageError::Timeout { program, after },
            ProcessError::Failed {
                program,
                status,
                tail,
            } => PackageError::Tool {
                program,
                status: status.to_string(),
                output: tail.join("\n"),
            },
            other => PackageError::Process(other),
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs a query program (absolute path) in the C locale, so its answers
/// can be parsed; killed after [`QUERY_TIMEOUT`].
async fn capture(program: &str, args: &[OsString]) -> Result<Output, PackageError> {
    ProcessBuilder::new(program)
        .args(args)
        .env("PATH", SYSTEM_PATH)
        .env("LC_ALL", "C")
        .timeout(QUERY_TIMEOUT)
        .output()
        .await
        .map_err(|e| match e {
            ProcessError::Spawn { source, .. } => PackageError::Io {
                context: format!("running {program} (is its package installed?)"),
                source,
            },
            other => PackageError::from(other),
        })
}

/// Standard output of a query that succeeded, else its error output.
fn checked(program: &str, out: &Output) -> Result<String, PackageError> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = out.stderr.trim().to_owned();
    Err(PackageError::Tool {
        program: program.to_owned(),
        status: out.status.to_string(),
        output: if stderr.is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            stderr
        },
    })
}

/// What the kinds' unit tests share.
#[cfg(test)]
mod testing {
    use std::time::Duration;

    pub const LONG: Duration = Duration::from_secs(120);

    pub fn quiet(_: bool, _: &str) {}

    pub fn run(program: &str, args: &[&str]) {
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?}: {status}");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{LONG, quiet};
    use super::*;

    /// Restore points are kept as JSON in `ops/ID/restore_point.json`:
    /// those written before the split into kind modules still read.
    #[test]
    fn restore_points_written_before_still_parse() {
        let old = [
            (
                r#"{"Pip":{"venv":"/opt/app/venv","copy":"/opt/app/.venv.before-op-1","version":"1.0","fingerprint":"abc"}}"#,
                RestorePoint::Pip {
                    venv: "/opt/app/venv".into(),
                    copy: "/opt/app/.venv.before-op-1".into(),
                    version: Some("1.0".into()),
                    fingerprint: Some("abc".into()),
                },
            ),
            (
                r#"{"Pip":{"venv":"/v","copy":"/.v.before-x","version":null}}"#,
                RestorePoint::Pip {
                    venv: "/v".into(),
                    copy: "/.v.before-x".into(),
                    version: None,
                    fingerprint: None,
                },
            ),
            (
                r#"{"Release":{"current":"/srv/current","previous_target":"releases/1.0"}}"#,
                RestorePoint::Release {
                    current: "/srv/current".into(),
                    previous_target: "releases/1.0".into(),
                },
            ),
            (
                r#"{"Deb":{"name":"app","version":"1.0","keep_dir":"/r/.repo.before-op","kept":"/r/.repo.before-op/app_1.0_all.deb"}}"#,
                RestorePoint::Deb {
                    name: "app".into(),
                    version: Some("1.0".into()),
                    keep_dir: "/r/.repo.before-op".into(),
                    kept: Some("/r/.repo.before-op/app_1.0_all.deb".into()),
                },
            ),
            (
                r#"{"Rpm":{"name":"app","version":null,"keep_dir":"/r/.k","kept":null}}"#,
                RestorePoint::Rpm {
                    name: "app".into(),
                    version: None,
                    keep_dir: "/r/.k".into(),
                    kept: None,
                },
            ),
            (r#""None""#, RestorePoint::None),
        ];
        for (json, want) in old {
            let parsed: RestorePoint = serde_json::from_str(json).unwrap();
            assert_eq!(parsed, want, "{json}");
            let again: RestorePoint =
                serde_json::from_str(&serde_json::to_string(&want).unwrap()).unwrap();
            assert_eq!(again, want);
        }
    }

    /// Whatever the network sends, an accepted version or operation id is
    /// one plain file name: no separator, no `..`, never an option, and the
    /// sibling it names stays in the same directory.
    #[test]
    fn fuzz_accepted_versions_and_op_ids_are_plain_file_names() {
        use proptest::prelude::*;
        let text = prop_oneof!["[-.+!_/a-zA-Z0-9 ]{0,70}", "\\PC{0,70}"];
        crate::fuzzing::run(2000, text, |v: String| {
            let plain = |name: &str| {
                let mut parts = Path::new(name).components();
                matches!(parts.next(), Some(std::path::Component::Normal(_)))
                    && parts.next().is_none()
                    && !name.starts_with('-')
                    && !name.contains("..")
            };
            if let Ok(version) = Version::parse(&v) {
                prop_assert!(plain(version.as_str()), "{v:?}");
            }
            if let Ok(op_id) = OpId::parse(&v) {
                prop_assert!(plain(op_id.as_str()) || op_id.as_str().starts_with('-'));
                let copy = sibling(Path::new("/srv/app/venv"), "before", op_id.as_str());
                prop_assert_eq!(copy.parent(), Some(Path::new("/srv/app")));
            }
            Ok(())
        });
    }

    #[test]
    fn op_ids_are_file_name_parts() {
        assert!(OpId::parse("op-1_a").is_ok());
        for bad in ["", "../op", "a/b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(OpId::parse(bad), Err(PackageError::InvalidOperationId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn validates_versions() {
        for good in [
            "0.2.0",
            "1.0rc1",
            "1!2.0",
            "1.0+local.7",
            "2.0.0-beta_1",
            "v3",
        ] {
            assert!(Version::parse(good).is_ok(), "{good:?}");
        }
        let too_long = "1".repeat(65);
        for bad in [
            "", "../x", "1.0/..", "-rf", ".1", "1..2", "1.0 ", "1 0", "a/b", "1;rm", "é", &too_long,
        ] {
            assert!(
                matches!(Version::parse(bad), Err(PackageError::InvalidVersion(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn tool_failure_reports_status_and_last_error_lines() {
        let seen = std::sync::Mutex::new(Vec::new());
        let collect =
            |is_stderr: bool, line: &str| seen.lock().unwrap().push((is_stderr, line.to_owned()));
        let script =
            "import sys; print('working'); print('ERROR: no luck', file=sys.stderr); sys.exit(3)";
        let command = ProcessBuilder::new("/usr/bin/python3")
            .args(["-c", script])
            .timeout(LONG);
        let err = run_tool(command, &collect).await.unwrap_err();
        let PackageError::Tool { status, output, .. } = &err else {
            panic!("{err}");
        };
        assert!(status.contains('3'), "{err}");
        assert_eq!(output, "ERROR: no luck");
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(
            seen,
            [
                (false, "working".to_owned()),
                (true, "ERROR: no luck".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn tool_timeout_kills_the_program() {
        let started = std::time::Instant::now();
        let command = ProcessBuilder::new("/bin/sleep")
            .arg("30")
            .timeout(Duration::from_millis(200));
        let err = run_tool(command, &quiet).await.unwrap_err();
        assert!(matches!(err, PackageError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
