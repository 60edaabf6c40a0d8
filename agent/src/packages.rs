//! The app's package: which version is installed, whether a version is
//! available, and how to swap one version for another and back.
//!
//! Every kind follows the same steps: [`check_available`] (preflight),
//! [`prepare_restore_point`], [`install`], then [`restore`] on failure or
//! [`discard`] on success. Each step is safe to run again after a crash.
//!
//! - pip: the virtualenv is snapshotted aside (files hard-linked, see
//!   [`snapshot_venv`]), then pip installs in place from local wheelhouses
//!   only (`--no-index`). Virtualenvs are not relocatable (absolute
//!   shebangs), so the snapshot, renamed back, is the exact way back; one
//!   whose files were written in place since is refused, and the workflow
//!   restores the venv from the upgrade's backup instead.
//! - release: trees unpacked under `releases_dir/VERSION/`, with a `current`
//!   symlink swapped atomically.
//! - deb, rpm: package files in `repo_dir`, recognized by their control
//!   fields (not their names), installed with `dpkg -i` / `rpm -U
//!   --oldpackage`. Before the install, the installed version's package file
//!   is copied to `REPO_PARENT/.REPO_NAME.before-OP_ID/`, so a rollback can
//!   reinstall it even if the repository changes; no copy, no upgrade.
//! - apt, dnf: from the host's configured repositories (`apt-get install
//!   NAME=VERSION`, `dnf install NAME-VERSION`); see [`apt`] and [`dnf`].

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::archive::{self, ArchiveError, Compression, Progress};
use crate::config::{AppConfig, PackageConfig, PackageKind};
use crate::files::safe::{self, Dir, Staging};
use crate::files::tree_fingerprint;

mod apt;
mod dnf;

const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// `restore` takes no timeout; reinstalling one package file gets this long.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a package install retries while dpkg's lock is held elsewhere.
const DPKG_LOCK_RETRY: Duration = Duration::from_millis(500);
/// dpkg and rpm run maintainer scripts and look for helpers (ldconfig,
/// start-stop-daemon) in sbin, whatever the agent's own PATH is.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DPKG: &str = "/usr/bin/dpkg";
const DPKG_DEB: &str = "/usr/bin/dpkg-deb";
const DPKG_QUERY: &str = "/usr/bin/dpkg-query";
const RPM: &str = "/usr/bin/rpm";
/// Where apt leaves the .debs it downloaded: a second place to find the
/// installed version's file.
const APT_ARCHIVES: &str = "/var/cache/apt/archives";
const MAX_VERSION_LEN: usize = 64;
const MAX_OP_ID_LEN: usize = 128;
/// Lines of tool output kept for the error message when the tool fails.
const OUTPUT_TAIL_LINES: usize = 30;
/// Release artifacts, in the order they are looked for.
const ARTIFACT_KINDS: [(&str, Compression); 3] = [
    ("tar.gz", Compression::Gzip),
    ("tar.zst", Compression::Zstd),
    ("tar", Compression::None),
];

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
    /// (files hard-linked, see [`snapshot_venv`]); `version` is what was
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

/// The app's package configuration, or why there is none.
pub fn package_of(app: &AppConfig) -> Result<&PackageConfig, PackageError> {
    app.package
        .as_ref()
        .ok_or_else(|| PackageError::NoPackage(app.name.clone()))
}

/// Validates a version string from the network: PEP 440 / semver characters
/// only (`A-Za-z0-9.+!-_`), 1 to 64 of them, no leading `-` or `.`, no `..`
/// — so a version is always a safe file name and never an option.
pub fn validate_version(v: &str) -> Result<(), PackageError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_');
    let ok = (1..=MAX_VERSION_LEN).contains(&v.len())
        && v.chars().all(allowed)
        && !v.starts_with(['-', '.'])
        && !v.contains("..");
    if ok {
        Ok(())
    } else {
        Err(PackageError::InvalidVersion(v.to_owned()))
    }
}

/// Preflight: `version` exists in the configured source, without touching
/// the network. pip: a wheel or sdist of `name==version` in a `find_links`
/// directory. release: an artifact `NAME-VERSION.tar.gz|.tar.zst|.tar` in
/// `repo_dir` or a `find_links` directory, or an unpacked
/// `releases_dir/VERSION/`. deb, rpm: a package file in `repo_dir` whose
/// own name and version fields (not its file name) are `name` and `version`
/// (rpm: `VERSION-RELEASE` or `VERSION`), for this machine's architecture.
pub async fn check_available(pkg: &PackageConfig, version: &str) -> Result<(), PackageError> {
    validate_version(version)?;
    match pkg.kind {
        PackageKind::Pip => pip_check_available(pkg, version),
        PackageKind::Release => release_source(pkg, version).map(|_| ()),
        PackageKind::Deb => System::Deb.find(pkg, version).await.map(|_| ()),
        PackageKind::Rpm => System::Rpm(&[]).find(pkg, version).await.map(|_| ()),
        PackageKind::Apt => apt::check_available(pkg, version).await,
        PackageKind::Dnf => dnf::check_available(pkg, version).await,
    }
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
    validate_op_id(op_id)?;
    match pkg.kind {
        PackageKind::Pip => pip_prepare(pkg, op_id).await,
        PackageKind::Release => release_prepare(pkg),
        PackageKind::Deb => System::Deb.prepare(pkg, op_id).await,
        PackageKind::Rpm => System::Rpm(&[]).prepare(pkg, op_id).await,
        PackageKind::Apt => apt::prepare(pkg, op_id).await,
        PackageKind::Dnf => dnf::prepare(pkg).await,
    }
}

/// Removes what [`prepare_restore_point`] may have left for `op_id` when the
/// operation died before recording its restore point: nothing was installed
/// then, so a copy (complete or `.partial`) is only clutter. Idempotent.
pub async fn abandon_restore_point(pkg: &PackageConfig, op_id: &str) -> Result<(), PackageError> {
    validate_op_id(op_id)?;
    let copy = match pkg.kind {
        PackageKind::Pip => sibling(venv_of(pkg)?, "before", op_id),
        PackageKind::Deb | PackageKind::Rpm => sibling(repo_dir_of(pkg)?, "before", op_id),
        PackageKind::Apt => apt::keep_of(pkg, op_id)?,
        PackageKind::Release | PackageKind::Dnf => return Ok(()),
    };
    blocking(move || {
        remove_tree(&with_suffix(&copy, ".partial"))?;
        remove_tree(&with_suffix(&copy, ".download"))?;
        remove_tree(&copy)
    })
    .await
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
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
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
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> Result<(), PackageError> {
    validate_version(version)?;
    validate_op_id(op_id)?;
    match pkg.kind {
        PackageKind::Pip => pip_install(pkg, version, timeout, on_line).await,
        PackageKind::Release => release_install(pkg, app_user, version, op_id, timeout).await,
        PackageKind::Deb => System::Deb.install(pkg, version, timeout, on_line).await,
        PackageKind::Rpm => {
            System::Rpm(&[])
                .install(pkg, version, timeout, on_line)
                .await
        }
        PackageKind::Apt => apt::install(pkg, version, timeout, on_line).await,
        PackageKind::Dnf => dnf::install(pkg, version, timeout, on_line).await,
    }
}

/// Puts the package recorded in `rp` back exactly. pip: the live virtualenv
/// is moved aside (`.VENV_NAME.failed-OP_ID`), the copy renamed into place,
/// the aside tree removed. release: `current` is pointed back atomically.
/// deb, rpm: the kept file is reinstalled (or the package removed if it was
/// not installed), unless the previous version is already there.
/// Safe to run again after a crash half way; once a pip snapshot or a
/// release tree is gone (used, or discarded by a later upgrade), it fails
/// with [`PackageError::RestorePointGone`] and the caller takes the package
/// back another way (the backup).
pub async fn restore(rp: &RestorePoint) -> Result<(), PackageError> {
    match rp {
        RestorePoint::Pip {
            venv,
            copy,
            fingerprint,
            ..
        } => {
            let (venv, copy, fingerprint) = (venv.clone(), copy.clone(), fingerprint.clone());
            blocking(move || pip_restore(&venv, &copy, fingerprint.as_deref())).await
        }
        RestorePoint::Release {
            current,
            previous_target,
        } => {
            let (current, target) = (current.clone(), previous_target.clone());
            blocking(move || {
                // A relative target is read from the link's own directory.
                if !parent_of(&current).join(&target).is_dir() {
                    return Err(PackageError::RestorePointGone {
                        name: current.display().to_string(),
                        what: format!("the release tree {} it pointed at", target.display()),
                    });
                }
                point_symlink(&current, &target, "tmp-restore")
            })
            .await
        }
        RestorePoint::Deb {
            name,
            version,
            kept,
            ..
        } => System::Deb.restore(name, version, kept).await,
        RestorePoint::Rpm {
            name,
            version,
            kept,
            ..
        } => System::Rpm(&[]).restore(name, version, kept).await,
        RestorePoint::Dnf { name, version } => dnf::restore(name, version).await,
        RestorePoint::None => Ok(()),
    }
}

/// After a successful upgrade: removes the virtualenv snapshot, or the kept
/// package file. Releases keep their old tree (it is what a later rollback
/// installs).
pub async fn discard(rp: &RestorePoint) -> Result<(), PackageError> {
    match rp {
        RestorePoint::Pip { copy, .. } => {
            let copy = copy.clone();
            blocking(move || remove_tree(&copy)).await
        }
        RestorePoint::Deb { keep_dir, .. } | RestorePoint::Rpm { keep_dir, .. } => {
            let keep_dir = keep_dir.clone();
            blocking(move || {
                remove_tree(&with_suffix(&keep_dir, ".partial"))?;
                remove_tree(&keep_dir)
            })
            .await
        }
        RestorePoint::Release { .. } | RestorePoint::Dnf { .. } | RestorePoint::None => Ok(()),
    }
}

/// The installed version of the app's package, when one is declared and found.
pub async fn installed_version(app: &AppConfig) -> Option<String> {
    let pkg = app.package.as_ref()?;
    match pkg.kind {
        PackageKind::Pip => pip_version(pkg),
        PackageKind::Release => release_version(pkg),
        PackageKind::Deb | PackageKind::Apt => {
            System::Deb.installed(&pkg.name).await.ok()?.version()
        }
        PackageKind::Rpm | PackageKind::Dnf => {
            System::Rpm(&[]).installed(&pkg.name).await.ok()?.version()
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Operation ids become parts of file names.
fn validate_op_id(op_id: &str) -> Result<(), PackageError> {
    let ok = (1..=MAX_OP_ID_LEN).contains(&op_id.len())
        && op_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(PackageError::InvalidOperationId(op_id.to_owned()))
    }
}

fn required<'a>(
    pkg: &PackageConfig,
    field: &'static str,
    value: Option<&'a Path>,
) -> Result<&'a Path, PackageError> {
    value.ok_or_else(|| PackageError::NotConfigured {
        name: pkg.name.clone(),
        kind: pkg.kind.as_str(),
        field,
    })
}

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
    crate::backup::fsync_dir(dir).map_err(io_error(format!("syncing directory {}", dir.display())))
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

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// PEP 503 normalization, as wheel `.dist-info` directories compare.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut last_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_sep {
                out.push('_');
            }
            last_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_sep = false;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Running a tool
// ---------------------------------------------------------------------------

/// Runs `program` (absolute path) with `args`, streaming its output lines,
/// killed when `timeout` passes. `owner` is the uid/gid to run as; `env`
/// is set on top of the agent's environment.
async fn run_tool(
    program: &Path,
    args: &[OsString],
    owner: Option<(u32, u32)>,
    env: &[(&str, &str)],
    timeout: Duration,
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> Result<(), PackageError> {
    let name = program.display().to_string();
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The agent's own environment must not steer pip or Python.
    for (key, _) in std::env::vars_os() {
        let key_bytes = key.as_bytes();
        if key_bytes.starts_with(b"PIP_") || key_bytes.starts_with(b"PYTHON") {
            command.env_remove(&key);
        }
    }
    command.envs(env.iter().copied());
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    let mut child = command
        .spawn()
        .map_err(io_error(format!("starting {name}")))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let finished = tokio::time::timeout(timeout, async {
        let (out_tail, err_tail) = tokio::join!(
            stream_lines(stdout, false, on_line),
            stream_lines(stderr, true, on_line)
        );
        (child.wait().await, out_tail, err_tail)
    })
    .await;
    let Ok((status, out_tail, err_tail)) = finished else {
        let _ = child.kill().await;
        return Err(PackageError::Timeout {
            program: name,
            after: timeout,
        });
    };
    let status = status.map_err(io_error(format!("waiting for {name}")))?;
    if status.success() {
        return Ok(());
    }
    let tail = if err_tail.is_empty() {
        out_tail
    } else {
        err_tail
    };
    Err(PackageError::Tool {
        program: name,
        status: status.to_string(),
        output: Vec::from(tail).join("\n"),
    })
}

/// Hands each line to `on_line`; returns the last lines for error messages.
async fn stream_lines(
    stream: Option<impl AsyncRead + Unpin>,
    is_stderr: bool,
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> VecDeque<String> {
    let mut tail = VecDeque::new();
    let Some(stream) = stream else { return tail };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        on_line(is_stderr, line);
        if tail.len() == OUTPUT_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }
    tail
}

// ---------------------------------------------------------------------------
// pip
// ---------------------------------------------------------------------------

fn pip_check_available(pkg: &PackageConfig, version: &str) -> Result<(), PackageError> {
    let mut searched = Vec::new();
    for dir in &pkg.find_links {
        match fs::read_dir(dir) {
            Ok(entries) => {
                let found = entries.flatten().any(|entry| {
                    is_distribution_of(&entry.file_name().to_string_lossy(), &pkg.name, version)
                });
                if found {
                    return Ok(());
                }
                searched.push(dir.display().to_string());
            }
            Err(e) => searched.push(format!("{} (unreadable: {e})", dir.display())),
        }
    }
    if searched.is_empty() {
        searched.push(
            "nothing: no find_links directories are configured (package indexes are never used)"
                .to_owned(),
        );
    }
    Err(PackageError::VersionMissing {
        name: pkg.name.clone(),
        version: version.to_owned(),
        searched: searched.join(", "),
    })
}

/// Whether `file` is a wheel (`NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl`,
/// `-` escaped to `_` inside fields) or an sdist (`NAME-VERSION.tar.gz` or
/// `.zip`) of `name` at `version`.
fn is_distribution_of(file: &str, name: &str, version: &str) -> bool {
    if let Some(stem) = file.strip_suffix(".whl") {
        let fields: Vec<&str> = stem.split('-').collect();
        return matches!(fields.len(), 5 | 6)
            && normalize(fields[0]) == normalize(name)
            && fields[1].eq_ignore_ascii_case(&version.replace('-', "_"));
    }
    [".tar.gz", ".zip"].iter().any(|ext| {
        file.strip_suffix(ext)
            .and_then(|stem| stem.strip_suffix(version))
            .and_then(|rest| rest.strip_suffix('-'))
            .is_some_and(|dist| normalize(dist) == normalize(name))
    })
}

fn venv_of(pkg: &PackageConfig) -> Result<&Path, PackageError> {
    required(pkg, "venv", pkg.venv.as_deref())
}

async fn pip_prepare(pkg: &PackageConfig, op_id: &str) -> Result<RestorePoint, PackageError> {
    let venv = venv_of(pkg)?.to_owned();
    let copy = sibling(&venv, "before", op_id);
    let version = pip_version(pkg);
    let (source, target) = (venv.clone(), copy.clone());
    let fingerprint = blocking(move || snapshot_venv(&source, &target)).await?;
    Ok(RestorePoint::Pip {
        venv,
        copy,
        version,
        fingerprint: Some(fingerprint),
    })
}

/// Snapshots `venv` as `copy` by way of `copy.partial`, so that only a
/// complete snapshot ever carries the final name; an existing complete one
/// is reused. Returns the snapshot's [`tree_fingerprint`]: pip unlinking the
/// live venv's name for an inode leaves it as it was; writing into it moves it.
///
/// Directories and symlinks are made anew; regular files are hard links to
/// the venv's own inodes. Creating an inode costs far more than linking one
/// (about 0.6 ms against 20 µs on the CI machine's ext4, for ~1,600 files),
/// and the linked inodes keep the old contents because pip never writes an
/// installed file in place: it unlinks a file before writing its new
/// version, and its uninstall moves files away. Anything else that wrote in
/// place would change the fingerprint, and the restore refuses then.
fn snapshot_venv(venv: &Path, copy: &Path) -> Result<String, PackageError> {
    if !copy.is_dir() {
        let partial = with_suffix(copy, ".partial");
        remove_tree(&partial)?;
        link_tree(venv, &partial).map_err(io_error(format!(
            "snapshotting virtualenv {} as {}",
            venv.display(),
            partial.display()
        )))?;
        // No syncfs: it would flush every other writer on the file system
        // (seconds on a busy host). Links and directories are metadata,
        // which ext4 and XFS journal in order, and the fingerprint recorded
        // with the restore point catches a snapshot a crash left short.
        rename(&partial, copy)?;
        fsync_dir(parent_of(copy))?;
    }
    tree_fingerprint(copy).map_err(io_error(format!("reading snapshot {}", copy.display())))
}

/// Recursive snapshot: directories and symlinks recreated with their modes,
/// times, and owners when running as root; regular files hard-linked (or
/// copied where a link is refused, e.g. at a link-count limit).
fn link_tree(source: &Path, target: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(source)?;
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(source)?, target)?;
    } else if file_type.is_dir() {
        fs::create_dir(target)?;
        // Writable while it fills, whatever the source's mode.
        fs::set_permissions(target, Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(source)? {
            let entry = entry?;
            link_tree(&entry.path(), &target.join(entry.file_name()))?;
        }
    } else if file_type.is_file() {
        match fs::hard_link(source, target) {
            // Same inode: its owner, mode and times are already the source's.
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMLINK | libc::EXDEV | libc::EPERM)
                ) =>
            {
                // A copy has data of its own to make durable.
                fs::copy(source, target)?;
                fs::File::open(target)?.sync_all()?;
            }
            Err(e) => return Err(e),
        }
    } else {
        return Err(io::Error::other(format!(
            "{} is not a file, directory or symlink",
            source.display()
        )));
    }
    copy_attributes(target, &meta)
}

/// Owner first (chown clears setuid bits), then mode, then times last
/// (a directory's mtime changes while it fills).
fn copy_attributes(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if is_root() {
        std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    }
    if !meta.file_type().is_symlink() {
        fs::set_permissions(path, Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    set_times_nofollow(path, meta)
}

fn set_times_nofollow(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    crate::files::set_times_nofollow(
        path,
        (meta.atime(), meta.atime_nsec()),
        (meta.mtime(), meta.mtime_nsec()),
    )
}

async fn pip_install(
    pkg: &PackageConfig,
    version: &str,
    timeout: Duration,
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> Result<(), PackageError> {
    let venv = venv_of(pkg)?;
    // A clear "missing" beats pip's resolver output.
    pip_check_available(pkg, version)?;
    let python = venv.join("bin/python");
    // No `--upgrade`: an exact pin makes pip replace whatever version is
    // installed (up or down), while leaving satisfied dependencies alone.
    let mut args: Vec<OsString> = [
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--no-index",
    ]
    .map(OsString::from)
    .to_vec();
    for dir in &pkg.find_links {
        args.push("--find-links".into());
        args.push(dir.into());
    }
    args.push(format!("{}=={version}", pkg.name).into());
    run_tool(&python, &args, venv_owner(venv)?, &[], timeout, on_line).await?;
    let installed = pip_version(pkg);
    if !installed
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case(version))
    {
        tracing::warn!(package = %pkg.name, wanted = version, ?installed, "pip reports success but the installed version differs");
    }
    Ok(())
}

/// Files pip writes must belong to whoever owns the virtualenv, not root.
fn venv_owner(venv: &Path) -> Result<Option<(u32, u32)>, PackageError> {
    let meta =
        fs::metadata(venv).map_err(io_error(format!("reading virtualenv {}", venv.display())))?;
    Ok((is_root() && meta.uid() != 0).then(|| (meta.uid(), meta.gid())))
}

/// Each state a crash can leave is resumed: (live, copy) → (aside, copy)
/// → (live restored, aside) → (live restored).
fn pip_restore(venv: &Path, copy: &Path, fingerprint: Option<&str>) -> Result<(), PackageError> {
    let aside = aside_of(venv, copy)?;
    let parent = parent_of(venv);
    if exists(copy) {
        // Restore points recorded before snapshots were fingerprinted have none.
        if let Some(taken) = fingerprint {
            let now = tree_fingerprint(copy)
                .map_err(io_error(format!("reading snapshot {}", copy.display())))?;
            if taken != now {
                return Err(PackageError::SnapshotChanged {
                    venv: venv.to_owned(),
                    copy: copy.to_owned(),
                });
            }
        }
        if exists(venv) {
            // Any earlier aside tree is a failed install too.
            remove_tree(&aside)?;
            rename(venv, &aside)?;
        }
        rename(copy, venv)?;
        fsync_dir(parent)?;
    } else if !exists(venv) {
        return Err(PackageError::CannotRestore {
            path: venv.to_owned(),
            why: format!(
                "neither the virtualenv nor its copy {} exists",
                copy.display()
            ),
        });
    } else if !exists(&aside) {
        // No restore of this copy was under way: the copy was discarded
        // (a later upgrade) or used by an earlier restore.
        return Err(PackageError::RestorePointGone {
            name: venv.display().to_string(),
            what: format!("its snapshot {}", copy.display()),
        });
    }
    remove_tree(&aside)
}

/// `.NAME.failed-OP_ID` for a copy named `.NAME.before-OP_ID`.
fn aside_of(venv: &Path, copy: &Path) -> Result<PathBuf, PackageError> {
    let venv_name = venv.file_name().unwrap_or_default().to_string_lossy();
    let copy_name = copy.file_name().unwrap_or_default().to_string_lossy();
    copy_name
        .strip_prefix(&format!(".{venv_name}.before-"))
        .filter(|_| parent_of(copy) == parent_of(venv))
        .map(|op_id| sibling(venv, "failed", op_id))
        .ok_or_else(|| PackageError::CannotRestore {
            path: venv.to_owned(),
            why: format!("{} is not a copy made for it", copy.display()),
        })
}

/// Reads the version from `venv/lib/python*/site-packages/NAME-VERSION.dist-info`.
fn pip_version(pkg: &PackageConfig) -> Option<String> {
    let venv = pkg.venv.as_deref()?;
    let want = normalize(&pkg.name);
    for lib in fs::read_dir(venv.join("lib")).ok()?.flatten() {
        let site = lib.path().join("site-packages");
        let Ok(entries) = fs::read_dir(&site) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".dist-info") else {
                continue;
            };
            if let Some((name, version)) = stem.rsplit_once('-')
                && normalize(name) == want
            {
                return Some(version.to_owned());
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// release
// ---------------------------------------------------------------------------

/// Where a release version comes from.
enum ReleaseSource {
    Unpacked(PathBuf),
    Artifact(PathBuf, Compression),
}

fn releases_dir_of(pkg: &PackageConfig) -> Result<&Path, PackageError> {
    required(pkg, "releases_dir", pkg.releases_dir.as_deref())
}

fn current_of(pkg: &PackageConfig) -> Result<&Path, PackageError> {
    required(pkg, "current", pkg.current.as_deref())
}

fn release_source(pkg: &PackageConfig, version: &str) -> Result<ReleaseSource, PackageError> {
    let releases_dir = releases_dir_of(pkg)?;
    let unpacked = releases_dir.join(version);
    if unpacked.is_dir() {
        return Ok(ReleaseSource::Unpacked(unpacked));
    }
    let artifact_dirs: Vec<&Path> = pkg
        .repo_dir
        .iter()
        .chain(&pkg.find_links)
        .map(PathBuf::as_path)
        .collect();
    for dir in &artifact_dirs {
        for (extension, compression) in ARTIFACT_KINDS {
            let artifact = dir.join(format!("{}-{version}.{extension}", pkg.name));
            if artifact.is_file() {
                return Ok(ReleaseSource::Artifact(artifact, compression));
            }
        }
    }
    let searched = std::iter::once(releases_dir)
        .chain(artifact_dirs)
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(PackageError::VersionMissing {
        name: pkg.name.clone(),
        version: version.to_owned(),
        searched,
    })
}

fn release_prepare(pkg: &PackageConfig) -> Result<RestorePoint, PackageError> {
    let current = current_of(pkg)?;
    let previous_target = fs::read_link(current).map_err(|e| PackageError::CannotRestore {
        path: current.to_owned(),
        why: format!(
            "it must be a symlink to the live release, so that the upgrade can return to it ({e})"
        ),
    })?;
    Ok(RestorePoint::Release {
        current: current.to_owned(),
        previous_target,
    })
}

async fn release_install(
    pkg: &PackageConfig,
    app_user: Option<&str>,
    version: &str,
    op_id: &str,
    timeout: Duration,
) -> Result<(), PackageError> {
    let current = current_of(pkg)?.to_owned();
    let release = match release_source(pkg, version)? {
        ReleaseSource::Unpacked(dir) => dir,
        ReleaseSource::Artifact(artifact, compression) => {
            let releases_dir = releases_dir_of(pkg)?.to_owned();
            let owner = release_owner(app_user, &releases_dir)?;
            let unpack = Unpack {
                artifact,
                compression,
                owner,
                releases_dir,
                top_dir: format!("{}-{version}", pkg.name),
                version: version.to_owned(),
            };
            unpack.run(timeout).await?
        }
    };
    let link_suffix = format!("tmp-{op_id}");
    blocking(move || point_symlink(&current, &release, &link_suffix)).await
}

/// Who owns an unpacked release: the app's user, else `releases_dir`'s owner.
fn release_owner(app_user: Option<&str>, releases_dir: &Path) -> Result<(u32, u32), PackageError> {
    match app_user {
        Some(user) => crate::files::user_ids(user)
            .map_err(io_error(format!("looking up user {user:?}")))?
            .ok_or_else(|| PackageError::CannotRestore {
                path: releases_dir.to_owned(),
                why: format!("the app's user {user:?} does not exist on this host"),
            }),
        None => {
            let meta = fs::metadata(releases_dir)
                .map_err(io_error(format!("reading {}", releases_dir.display())))?;
            Ok((meta.uid(), meta.gid()))
        }
    }
}

/// Unpacking one release artifact into `releases_dir/VERSION/`.
struct Unpack {
    artifact: PathBuf,
    compression: Compression,
    /// uid and gid every unpacked object gets.
    owner: (u32, u32),
    releases_dir: PathBuf,
    /// Conventional single top directory (`NAME-VERSION/`), hoisted if present.
    top_dir: String,
    version: String,
}

impl Unpack {
    /// Extracts into a staging directory, then renames it into place, so a
    /// `releases_dir/VERSION/` tree is always complete.
    async fn run(self, timeout: Duration) -> Result<PathBuf, PackageError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let canceled = cancel.clone();
        let artifact = self.artifact.clone();
        let mut task = tokio::task::spawn_blocking(move || self.unpack(&canceled));
        let Ok(joined) = tokio::time::timeout(timeout, &mut task).await else {
            cancel.store(true, Ordering::Relaxed);
            // Let the extraction stop and clean up before reporting.
            let _ = task.await;
            return Err(PackageError::Timeout {
                program: format!("unpacking {}", artifact.display()),
                after: timeout,
            });
        };
        joined.map_err(|e| PackageError::Io {
            context: format!("unpacking {}", artifact.display()),
            source: io::Error::other(e),
        })?
    }

    /// The staging directory has an unpredictable name, is checked with
    /// fstat, and is used (extraction, the rename into place) only through
    /// descriptors, so a user who can write `releases_dir` cannot redirect
    /// any of it.
    fn unpack(&self, cancel: &AtomicBool) -> Result<PathBuf, PackageError> {
        let target = self.releases_dir.join(&self.version);
        let releases = Dir::open(&self.releases_dir)
            .map_err(io_error(format!("opening {}", self.releases_dir.display())))?;
        let staging = Staging::create(releases, &format!("{}.staging", self.version)).map_err(
            io_error(format!(
                "making a staging directory in {}",
                self.releases_dir.display()
            )),
        )?;
        let staging_path = self.releases_dir.join(&staging.name);
        let progress = Progress {
            cancel,
            ..Progress::silent()
        };
        // A release artifact comes from elsewhere: it is measured first.
        let options = archive::ExtractOptions {
            owner: Some(self.owner),
            known_size: None,
        };
        let extracted = archive::extract_into(
            &self.artifact,
            self.compression,
            &staging.dir,
            &staging_path,
            options,
            &progress,
        )
        .map_err(|source| PackageError::Archive {
            artifact: self.artifact.clone(),
            source,
        })
        .and_then(|_| self.move_into_place(&staging, &target));
        if extracted.is_err() {
            // Best effort: the error at hand says more than a cleanup failure.
            let _ = staging.remove();
        }
        extracted?;
        staging
            .parent
            .sync()
            .map_err(io_error(format!("syncing {}", self.releases_dir.display())))?;
        Ok(target)
    }

    fn move_into_place(&self, staging: &Staging, target: &Path) -> Result<(), PackageError> {
        let renaming = |e| {
            io_error(format!(
                "renaming {} to {}",
                staging.name.to_string_lossy(),
                target.display()
            ))(e)
        };
        let version = std::ffi::OsStr::new(&self.version);
        let top = std::ffi::OsStr::new(&self.top_dir);
        let names = staging.dir.names().map_err(renaming)?;
        let hoisted = names.len() == 1
            && names[0] == top
            && staging
                .dir
                .stat_at(top)
                .map_err(renaming)?
                .is_some_and(|st| safe::is_dir(&st));
        if hoisted {
            staging
                .dir
                .rename(top, &staging.parent, version)
                .map_err(renaming)?;
            return staging.remove().map_err(renaming);
        }
        // The staging directory itself becomes the release: readable by
        // all, owned like its contents, then renamed by name, so check that
        // the name still is this directory.
        let root = staging.dir.as_file().map_err(renaming)?;
        if is_root() {
            std::os::unix::fs::fchown(&root, Some(self.owner.0), Some(self.owner.1))
                .map_err(renaming)?;
        }
        root.set_permissions(fs::Permissions::from_mode(0o755))
            .map_err(renaming)?;
        if !staging.still_in_place() {
            return Err(PackageError::CannotRestore {
                path: target.to_owned(),
                why: format!(
                    "the staging directory {} was moved or replaced while unpacking",
                    staging.name.to_string_lossy()
                ),
            });
        }
        staging
            .parent
            .rename(&staging.name, &staging.parent, version)
            .map_err(renaming)
    }
}

/// Points `link` at `target` atomically: a new symlink `LINK.SUFFIX` is
/// renamed over `link`, so readers see the old or the new target, never none.
fn point_symlink(link: &Path, target: &Path, suffix: &str) -> Result<(), PackageError> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let mut temp = link.as_os_str().to_owned();
    temp.push(format!(".{suffix}"));
    let temp = PathBuf::from(temp);
    remove_tree(&temp)?;
    std::os::unix::fs::symlink(target, &temp).map_err(io_error(format!(
        "creating symlink {} -> {}",
        temp.display(),
        target.display()
    )))?;
    if let Err(e) = rename(&temp, link) {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    fsync_dir(parent_of(link))
}

/// The release the `current` symlink points at.
fn release_version(pkg: &PackageConfig) -> Option<String> {
    let target = fs::read_link(pkg.current.as_deref()?).ok()?;
    Path::new(&target)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------
// deb, rpm
// ---------------------------------------------------------------------------

/// A system package manager. `Rpm` carries arguments for every rpm call that
/// touches a database: the agent passes none (the system's); the unit tests
/// pass a throwaway `--root`, since an rpm install on a Debian test machine
/// must not touch the host.
#[derive(Debug, Clone, Copy)]
enum System<'a> {
    Deb,
    Rpm(&'a [OsString]),
}

/// A package file's own fields, as its package manager reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileFields {
    name: String,
    /// deb: `Version` (with its epoch, if any); rpm: `VERSION-RELEASE`.
    version: String,
    /// Another spelling a request may use: deb without the epoch; rpm `VERSION`.
    short: String,
    arch: String,
}

impl FileFields {
    fn is(&self, name: &str, version: &str) -> bool {
        self.name == name && (self.version == version || self.short == version)
    }
}

/// What the package database says about one package.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Installed {
    No,
    Yes(String),
    /// Half installed, unpacked, half configured, several versions...
    Unsettled(String),
}

impl Installed {
    fn version(self) -> Option<String> {
        match self {
            Installed::Yes(v) => Some(v),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Installed::No => "not installed".to_owned(),
            Installed::Yes(v) => format!("at {v}"),
            Installed::Unsettled(state) => state.clone(),
        }
    }
}

impl System<'_> {
    fn kind(self) -> &'static str {
        match self {
            System::Deb => "deb",
            System::Rpm(_) => "rpm",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            System::Deb => DPKG,
            System::Rpm(_) => RPM,
        }
    }

    fn db_args(self) -> Vec<OsString> {
        match self {
            System::Deb => Vec::new(),
            System::Rpm(args) => args.to_vec(),
        }
    }

    /// Besides `repo_dir`, where the installed version's file may be.
    fn caches(self) -> &'static [&'static str] {
        match self {
            System::Deb => &[APT_ARCHIVES],
            System::Rpm(_) => &[],
        }
    }

    async fn native_arch(self) -> Result<String, PackageError> {
        match self {
            System::Deb => {
                let out = capture(DPKG, &["--print-architecture".into()]).await?;
                Ok(checked(DPKG, &out)?.trim().to_owned())
            }
            System::Rpm(_) => Ok(std::env::consts::ARCH.to_owned()),
        }
    }

    fn arch_fits(self, arch: &str, native: &str) -> bool {
        arch == native
            || arch
                == if matches!(self, System::Deb) {
                    "all"
                } else {
                    "noarch"
                }
    }

    /// Reads a package file's own name, version and architecture.
    async fn fields(self, file: &Path) -> Result<FileFields, PackageError> {
        match self {
            System::Deb => {
                let args: Vec<OsString> = vec![
                    "-f".into(),
                    file.into(),
                    "Package".into(),
                    "Version".into(),
                    "Architecture".into(),
                ];
                let out = capture(DPKG_DEB, &args).await?;
                let text = checked(DPKG_DEB, &out)?;
                let field = |key: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                        .map(|v| v.trim().to_owned())
                        .unwrap_or_default()
                };
                let version = field("Version");
                let short = version
                    .split_once(':')
                    .map_or(version.as_str(), |(_, v)| v)
                    .to_owned();
                Ok(FileFields {
                    name: field("Package"),
                    version,
                    short,
                    arch: field("Architecture"),
                })
            }
            System::Rpm(_) => {
                // Reading a file needs no database, so no `--root`: the path is the host's.
                let args: Vec<OsString> = vec![
                    "-qp".into(),
                    "--qf".into(),
                    "%{NAME}\\n%{VERSION}-%{RELEASE}\\n%{VERSION}\\n%{ARCH}\\n".into(),
                    "--".into(),
                    file.into(),
                ];
                let out = capture(RPM, &args).await?;
                let text = checked(RPM, &out)?;
                let mut lines = text.lines().map(|l| l.trim().to_owned());
                let mut next = || lines.next().unwrap_or_default();
                Ok(FileFields {
                    name: next(),
                    version: next(),
                    short: next(),
                    arch: next(),
                })
            }
        }
    }

    /// The package's state in the database (`LC_ALL=C`, so the "not
    /// installed" answers can be recognized).
    async fn installed(self, name: &str) -> Result<Installed, PackageError> {
        check_name(self, name)?;
        match self {
            System::Deb => {
                let args: Vec<OsString> = vec![
                    "-W".into(),
                    "-f=${db:Status-Status}\\n${Version}\\n".into(),
                    "--".into(),
                    name.into(),
                ];
                let out = capture(DPKG_QUERY, &args).await?;
                if out.status.code() == Some(1)
                    && String::from_utf8_lossy(&out.stderr).contains("no packages found")
                {
                    return Ok(Installed::No);
                }
                let text = checked(DPKG_QUERY, &out)?;
                let mut lines = text.lines().map(str::trim);
                let (state, version) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
                Ok(match state {
                    "installed" | "triggers-pending" | "triggers-awaited" => {
                        Installed::Yes(version.to_owned())
                    }
                    "not-installed" | "config-files" => Installed::No,
                    other => Installed::Unsettled(format!("{other} at {version}")),
                })
            }
            System::Rpm(db) => {
                let mut args = db.to_vec();
                args.extend(
                    ["-q", "--qf", "%{VERSION}-%{RELEASE}\\n", "--", name].map(OsString::from),
                );
                let out = capture(RPM, &args).await?;
                if out.status.code() == Some(1)
                    && String::from_utf8_lossy(&out.stdout).contains("is not installed")
                {
                    return Ok(Installed::No);
                }
                let text = checked(RPM, &out)?;
                let versions: Vec<&str> = text.lines().map(str::trim).collect();
                Ok(match versions[..] {
                    [one] => Installed::Yes(one.to_owned()),
                    _ => Installed::Unsettled(format!(
                        "installed in several versions ({})",
                        versions.join(", ")
                    )),
                })
            }
        }
    }

    /// The file of `name` at `version` in `dirs`, or what was searched.
    async fn search(
        self,
        dirs: &[&Path],
        name: &str,
        version: &str,
    ) -> Result<Result<(PathBuf, FileFields), String>, PackageError> {
        let native = self.native_arch().await?;
        let mut searched = Vec::new();
        for dir in dirs {
            let files = match candidates(dir, self.kind(), name) {
                Ok(files) => files,
                Err(e) => {
                    searched.push(format!("{} (unreadable: {e})", dir.display()));
                    continue;
                }
            };
            let mut notes = Vec::new();
            for file in files {
                match self.fields(&file).await {
                    Ok(fields) if fields.is(name, version) => {
                        if self.arch_fits(&fields.arch, &native) {
                            return Ok(Ok((file, fields)));
                        }
                        notes.push(format!(
                            "{} is for {}, not {native}",
                            file.display(),
                            fields.arch
                        ));
                    }
                    Ok(_) => {}
                    // One broken file must not hide the others.
                    Err(_) => notes.push(format!("{} is not a readable package", file.display())),
                }
            }
            searched.push(if notes.is_empty() {
                dir.display().to_string()
            } else {
                format!("{} ({})", dir.display(), notes.join("; "))
            });
        }
        Ok(Err(searched.join(", ")))
    }

    async fn find(
        self,
        pkg: &PackageConfig,
        version: &str,
    ) -> Result<(PathBuf, FileFields), PackageError> {
        let repo = repo_dir_of(pkg)?;
        check_name(self, &pkg.name)?;
        self.search(&[repo], &pkg.name, version)
            .await?
            .map_err(|searched| PackageError::VersionMissing {
                name: pkg.name.clone(),
                version: version.to_owned(),
                searched,
            })
    }

    async fn prepare(self, pkg: &PackageConfig, op_id: &str) -> Result<RestorePoint, PackageError> {
        let repo = repo_dir_of(pkg)?;
        check_name(self, &pkg.name)?;
        let keep_dir = sibling(repo, "before", op_id);
        if keep_dir.is_dir() {
            // A retry: what was kept then is what was installed then.
            return self.kept_point(&pkg.name, keep_dir).await;
        }
        let (version, file) = match self.installed(&pkg.name).await? {
            Installed::No => (None, None),
            Installed::Unsettled(state) => {
                return Err(PackageError::Unsettled {
                    name: pkg.name.clone(),
                    state,
                });
            }
            Installed::Yes(version) => {
                let dirs: Vec<&Path> = std::iter::once(repo)
                    .chain(self.caches().iter().map(Path::new))
                    .collect();
                match self.search(&dirs, &pkg.name, &version).await? {
                    Ok((file, _)) => (Some(version), Some(file)),
                    Err(searched) => {
                        return Err(PackageError::PreviousMissing {
                            name: pkg.name.clone(),
                            version,
                            kind: self.kind(),
                            searched,
                        });
                    }
                }
            }
        };
        let target = keep_dir.clone();
        let kept = blocking(move || keep_file(&target, file.as_deref())).await?;
        Ok(self.point(&pkg.name, version, keep_dir, kept))
    }

    /// The restore point a complete `keep_dir` stands for: its one package
    /// file, or none when the package was not installed.
    async fn kept_point(self, name: &str, keep_dir: PathBuf) -> Result<RestorePoint, PackageError> {
        let files = candidates(&keep_dir, self.kind(), name)
            .map_err(io_error(format!("listing {}", keep_dir.display())))?;
        let (version, kept) = match &files[..] {
            [] => (None, None),
            [file] => {
                let fields = self.fields(file).await?;
                if fields.name != name {
                    return Err(PackageError::CannotRestore {
                        path: file.clone(),
                        why: format!("it is a package of {}, not {name}", fields.name),
                    });
                }
                (Some(fields.version), Some(file.clone()))
            }
            _ => {
                return Err(PackageError::CannotRestore {
                    path: keep_dir,
                    why: "it holds several package files; remove it and retry".to_owned(),
                });
            }
        };
        Ok(self.point(name, version, keep_dir, kept))
    }

    fn point(
        self,
        name: &str,
        version: Option<String>,
        keep_dir: PathBuf,
        kept: Option<PathBuf>,
    ) -> RestorePoint {
        let name = name.to_owned();
        match self {
            System::Deb => RestorePoint::Deb {
                name,
                version,
                keep_dir,
                kept,
            },
            System::Rpm(_) => RestorePoint::Rpm {
                name,
                version,
                keep_dir,
                kept,
            },
        }
    }

    async fn install(
        self,
        pkg: &PackageConfig,
        version: &str,
        timeout: Duration,
        on_line: &(dyn Fn(bool, &str) + Send + Sync),
    ) -> Result<(), PackageError> {
        let (file, fields) = self.find(pkg, version).await?;
        // A retry after the install went through has nothing to do.
        if self.installed(&pkg.name).await? == Installed::Yes(fields.version.clone()) {
            return Ok(());
        }
        self.install_file(&file, timeout, on_line).await?;
        self.expect(&pkg.name, Installed::Yes(fields.version)).await
    }

    async fn restore(
        self,
        name: &str,
        version: &Option<String>,
        kept: &Option<PathBuf>,
    ) -> Result<(), PackageError> {
        let log = |is_stderr: bool, line: &str| {
            tracing::info!(package = name, is_stderr, "restore: {line}");
        };
        let now = self.installed(name).await?;
        match (version, kept) {
            (Some(version), Some(kept)) => {
                let wanted = Installed::Yes(version.clone());
                if now == wanted {
                    return Ok(());
                }
                if !kept.is_file() {
                    return Err(PackageError::RestorePointGone {
                        name: name.to_owned(),
                        what: format!("the kept package file {} of {version}", kept.display()),
                    });
                }
                self.install_file(kept, RESTORE_TIMEOUT, &log).await?;
                self.expect(name, wanted).await
            }
            (None, _) => {
                if now == Installed::No {
                    return Ok(());
                }
                let mut args = self.db_args();
                // dpkg --remove keeps conffiles: an operator's edits survive.
                let verb = if matches!(self, System::Deb) {
                    "--remove"
                } else {
                    "-e"
                };
                args.extend([OsString::from(verb), "--".into(), name.into()]);
                self.run_writing(&args, RESTORE_TIMEOUT, &log).await?;
                self.expect(name, Installed::No).await
            }
            (Some(version), None) => Err(PackageError::RestorePointGone {
                name: name.to_owned(),
                what: format!("it keeps no package file of {version}"),
            }),
        }
    }

    async fn install_file(
        self,
        file: &Path,
        timeout: Duration,
        on_line: &(dyn Fn(bool, &str) + Send + Sync),
    ) -> Result<(), PackageError> {
        let mut args = self.db_args();
        match self {
            // confdef+confold: conffiles the operator edited are kept, the
            // others follow the package, and dpkg never asks.
            System::Deb => {
                args.extend(["--force-confdef", "--force-confold", "--install"].map(OsString::from))
            }
            // --oldpackage: rollbacks are downgrades; --replacepkgs: a
            // half-done install of the same version is redone.
            System::Rpm(_) => {
                args.extend(["-U", "--oldpackage", "--replacepkgs"].map(OsString::from))
            }
        }
        args.extend([OsString::from("--"), file.into()]);
        self.run_writing(&args, timeout, on_line).await
    }

    /// Runs the package manager on its database. dpkg refuses at once while
    /// another program (apt, unattended-upgrades) holds its lock, so the run
    /// is retried until the lock is free or `timeout` has passed in all; rpm
    /// waits for its transaction lock by itself.
    async fn run_writing(
        self,
        args: &[OsString],
        timeout: Duration,
        on_line: &(dyn Fn(bool, &str) + Send + Sync),
    ) -> Result<(), PackageError> {
        let tool = Path::new(self.tool());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut said_waiting = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let result = run_tool(tool, args, None, &TOOL_ENV, left, on_line).await;
            let holder = match &result {
                Err(PackageError::Tool { output, .. }) if matches!(self, System::Deb) => {
                    dpkg_lock_holder(output)
                }
                _ => None,
            };
            let Some(holder) = holder else {
                return result;
            };
            if tokio::time::Instant::now() + DPKG_LOCK_RETRY >= deadline {
                return result;
            }
            if !said_waiting {
                on_line(true, &format!("waiting for the dpkg lock: {holder}"));
                said_waiting = true;
            }
            tokio::time::sleep(DPKG_LOCK_RETRY).await;
        }
    }

    async fn expect(self, name: &str, wanted: Installed) -> Result<(), PackageError> {
        let found = self.installed(name).await?;
        if found == wanted {
            return Ok(());
        }
        Err(PackageError::WrongVersion {
            program: self.tool().to_owned(),
            name: name.to_owned(),
            wanted: wanted.describe(),
            found: found.describe(),
        })
    }
}

/// dpkg's line when another process holds its lock ("dpkg frontend lock was
/// locked by another process with pid 123", "dpkg status database is locked
/// by another process"), if `output` has one.
fn dpkg_lock_holder(output: &str) -> Option<&str> {
    output
        .lines()
        .find(|l| l.starts_with("dpkg: error:") && l.contains("locked by another process"))
        .map(|l| l.trim_start_matches("dpkg: error:").trim())
}

/// Environment for dpkg and rpm: maintainer scripts never prompt.
const TOOL_ENV: [(&str, &str); 3] = [
    ("PATH", SYSTEM_PATH),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
];

fn repo_dir_of(pkg: &PackageConfig) -> Result<&Path, PackageError> {
    required(pkg, "repo_dir", pkg.repo_dir.as_deref())
}

/// Package names reach dpkg and rpm as arguments: never as options.
fn check_name(system: System<'_>, name: &str) -> Result<(), PackageError> {
    if name.is_empty() || name.starts_with('-') {
        return Err(PackageError::NotConfigured {
            name: name.to_owned(),
            kind: system.kind(),
            field: "name (a package name, not starting with `-`)",
        });
    }
    Ok(())
}

/// `*.EXT` files in `dir`, those named like the package (`NAME_…`,
/// `NAME-…`) first: names are only a hint, the fields decide.
fn candidates(dir: &Path, ext: &str, name: &str) -> io::Result<Vec<PathBuf>> {
    let suffix = format!(".{ext}");
    let mut files: Vec<(bool, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        if !file_name.ends_with(&suffix) || !path.is_file() {
            continue;
        }
        let named_like = file_name
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(['_', '-']));
        files.push((!named_like, path));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// Fills `keep_dir` by way of `keep_dir.partial`, so that only a complete
/// keep carries the final name: with a copy of `file`, or empty when the
/// package was not installed.
fn keep_file(keep_dir: &Path, file: Option<&Path>) -> Result<Option<PathBuf>, PackageError> {
    let partial = with_suffix(keep_dir, ".partial");
    remove_tree(&partial)?;
    fs::create_dir(&partial).map_err(io_error(format!("creating {}", partial.display())))?;
    let kept = match file {
        Some(file) => {
            let file_name = file.file_name().unwrap_or_default();
            let size = fs::metadata(file)
                .map_err(io_error(format!("reading {}", file.display())))?
                .len();
            let available = crate::backup::free_bytes(&partial).map_err(io_error(format!(
                "checking free space in {}",
                partial.display()
            )))?;
            if size > available {
                let _ = remove_tree(&partial);
                return Err(PackageError::NoSpace {
                    dir: partial,
                    needed: size,
                    available,
                });
            }
            let copy = partial.join(file_name);
            let copied = fs::copy(file, &copy)
                .and_then(|_| fs::File::open(&copy)?.sync_all())
                .map_err(io_error(format!(
                    "copying {} to {}",
                    file.display(),
                    copy.display()
                )));
            if let Err(e) = copied {
                let _ = remove_tree(&partial);
                return Err(e);
            }
            Some(keep_dir.join(file_name))
        }
        None => None,
    };
    fsync_dir(&partial)?;
    rename(&partial, keep_dir)?;
    fsync_dir(parent_of(keep_dir))?;
    Ok(kept)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs a query program (absolute path) in the C locale, so its answers
/// can be parsed; killed after [`QUERY_TIMEOUT`].
async fn capture(program: &str, args: &[OsString]) -> Result<std::process::Output, PackageError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("PATH", SYSTEM_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(QUERY_TIMEOUT, command.output()).await {
        Err(_) => Err(PackageError::Timeout {
            program: program.to_owned(),
            after: QUERY_TIMEOUT,
        }),
        Ok(output) => output.map_err(io_error(format!(
            "running {program} (is its package installed?)"
        ))),
    }
}

/// Standard output of a query that succeeded, else its error output.
fn checked(program: &str, out: &std::process::Output) -> Result<String, PackageError> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command as StdCommand;

    const LONG: Duration = Duration::from_secs(120);

    fn quiet(_: bool, _: &str) {}

    fn package(kind: PackageKind, name: &str) -> PackageConfig {
        PackageConfig {
            kind,
            name: name.to_owned(),
            venv: None,
            find_links: Vec::new(),
            releases_dir: None,
            current: None,
            repo_dir: None,
            keep_dir: None,
        }
    }

    fn run(program: &str, args: &[&str]) {
        let status = StdCommand::new(program).args(args).status().unwrap();
        assert!(status.success(), "{program} {args:?}: {status}");
    }

    #[test]
    fn normalizes_like_pep_503() {
        assert_eq!(normalize("CovetPy"), "covetpy");
        assert_eq!(normalize("covet-py.core"), "covet_py_core");
        assert_eq!(normalize("a__b"), "a_b");
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
            assert!(validate_version(good).is_ok(), "{good:?}");
        }
        let too_long = "1".repeat(65);
        for bad in [
            "", "../x", "1.0/..", "-rf", ".1", "1..2", "1.0 ", "1 0", "a/b", "1;rm", "é", &too_long,
        ] {
            assert!(
                matches!(validate_version(bad), Err(PackageError::InvalidVersion(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn recognizes_wheels_and_sdists() {
        let yes = [
            "covetpy-0.2.0-py3-none-any.whl",
            "CovetPy-0.2.0-1-py3-none-any.whl",
            "covetpy-0.2.0.tar.gz",
            "covetpy-0.2.0.zip",
        ];
        for file in yes {
            assert!(is_distribution_of(file, "covetpy", "0.2.0"), "{file}");
        }
        assert!(is_distribution_of(
            "covet_py-1.0-py3-none-any.whl",
            "covet-py",
            "1.0"
        ));
        assert!(is_distribution_of("covet-py-1.0.tar.gz", "Covet.Py", "1.0"));
        let no = [
            "covetpy-0.2.01-py3-none-any.whl",
            "covetpy-0.2.0.whl",
            "covetpy_extra-0.2.0-py3-none-any.whl",
            "covetpy-0.2.0.tar.bz",
            "xcovetpy-0.2.0.tar.gz",
        ];
        for file in no {
            assert!(!is_distribution_of(file, "covetpy", "0.2.0"), "{file}");
        }
    }

    #[tokio::test]
    async fn pip_availability_scans_find_links() {
        let empty = tempfile::tempdir().unwrap();
        let wheels = tempfile::tempdir().unwrap();
        fs::write(wheels.path().join("covetpy-0.2.0-py3-none-any.whl"), "").unwrap();
        let mut pkg = package(PackageKind::Pip, "CovetPy");
        pkg.find_links = vec![empty.path().to_owned(), wheels.path().to_owned()];

        check_available(&pkg, "0.2.0").await.unwrap();
        let err = check_available(&pkg, "0.3.0").await.unwrap_err();
        let PackageError::VersionMissing { searched, .. } = &err else {
            panic!("{err}");
        };
        assert!(searched.contains(&*empty.path().to_string_lossy()), "{err}");
        assert!(
            searched.contains(&*wheels.path().to_string_lossy()),
            "{err}"
        );

        pkg.find_links.clear();
        let err = check_available(&pkg, "0.2.0").await.unwrap_err();
        assert!(err.to_string().contains("no find_links"), "{err}");
    }

    /// A release layout in a temp dir: artifacts, releases, `current`.
    struct ReleaseFixture {
        dir: tempfile::TempDir,
        pkg: PackageConfig,
    }

    impl ReleaseFixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for sub in ["artifacts", "releases", "src"] {
                fs::create_dir(dir.path().join(sub)).unwrap();
            }
            let mut pkg = package(PackageKind::Release, "demo");
            pkg.repo_dir = Some(dir.path().join("artifacts"));
            pkg.releases_dir = Some(dir.path().join("releases"));
            pkg.current = Some(dir.path().join("current"));
            ReleaseFixture { dir, pkg }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        /// `demo-VERSION.tar.gz` with the files at the top level (`./VERSION`).
        fn flat_artifact(&self, version: &str) {
            let src = self.path(&format!("src/{version}"));
            fs::create_dir_all(src.join("bin")).unwrap();
            fs::write(src.join("VERSION"), version).unwrap();
            fs::write(src.join("bin/app"), "#!/bin/true\n").unwrap();
            let artifact = self.path(&format!("artifacts/demo-{version}.tar.gz"));
            run(
                "/usr/bin/tar",
                &[
                    "-czf",
                    artifact.to_str().unwrap(),
                    "-C",
                    src.to_str().unwrap(),
                    ".",
                ],
            );
        }

        /// `demo-VERSION.tar` with everything under `demo-VERSION/`.
        fn nested_artifact(&self, version: &str) {
            let top = format!("demo-{version}");
            let src = self.path(&format!("src/{top}"));
            fs::create_dir_all(&src).unwrap();
            fs::write(src.join("VERSION"), version).unwrap();
            let artifact = self.path(&format!("artifacts/{top}.tar"));
            let parent = self.path("src");
            run(
                "/usr/bin/tar",
                &[
                    "-cf",
                    artifact.to_str().unwrap(),
                    "-C",
                    parent.to_str().unwrap(),
                    &top,
                ],
            );
        }

        fn current_target(&self) -> PathBuf {
            fs::read_link(self.path("current")).unwrap()
        }

        fn live_version(&self) -> String {
            fs::read_to_string(self.path("current/VERSION")).unwrap()
        }
    }

    #[tokio::test]
    async fn release_install_restore_end_to_end() {
        let fx = ReleaseFixture::new();
        fx.flat_artifact("1.0");
        fx.nested_artifact("2.0");
        check_available(&fx.pkg, "2.0").await.unwrap();
        let err = check_available(&fx.pkg, "3.0").await.unwrap_err();
        assert!(err.to_string().contains("artifacts"), "{err}");

        install(&fx.pkg, "1.0", "op-1", LONG, &quiet).await.unwrap();
        assert_eq!(fx.live_version(), "1.0");
        assert!(fx.path("releases/1.0/bin/app").is_file());

        let rp = prepare_restore_point(&fx.pkg, "op-2").await.unwrap();
        install(&fx.pkg, "2.0", "op-2", LONG, &quiet).await.unwrap();
        // A retry of the same step changes nothing.
        install(&fx.pkg, "2.0", "op-2", LONG, &quiet).await.unwrap();
        assert_eq!(fx.current_target(), fx.path("releases/2.0"));
        assert_eq!(fx.live_version(), "2.0");
        let app: AppConfig = toml::from_str(&format!(
            "name = 'demo'\nunit = 'demo.service'\n[package]\nkind = 'release'\nname = 'demo'\ncurrent = '{}'",
            fx.path("current").display()
        ))
        .unwrap();
        assert_eq!(installed_version(&app).await.as_deref(), Some("2.0"));

        restore(&rp).await.unwrap();
        assert_eq!(fx.current_target(), fx.path("releases/1.0"));
        restore(&rp).await.unwrap();
        assert_eq!(fx.live_version(), "1.0");
        discard(&rp).await.unwrap();

        let mut names: Vec<_> = fs::read_dir(fx.path("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["1.0", "2.0"], "no staging or temp leftovers");
        assert!(!fx.path("current.tmp-op-2").exists());
    }

    #[tokio::test]
    async fn hostile_release_is_refused_and_current_is_kept() {
        let fx = ReleaseFixture::new();
        fx.flat_artifact("1.0");
        install(&fx.pkg, "1.0", "op-1", LONG, &quiet).await.unwrap();

        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        let name = b"../evil";
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        header.set_size(4);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &b"pwnd"[..]).unwrap();
        let evil = builder.into_inner().unwrap();
        fs::write(fx.path("artifacts/demo-6.6.tar"), evil).unwrap();

        let err = install(&fx.pkg, "6.6", "op-2", LONG, &quiet)
            .await
            .unwrap_err();
        assert!(matches!(err, PackageError::Archive { .. }), "{err}");
        assert_eq!(fx.current_target(), fx.path("releases/1.0"));
        assert!(!fx.path("releases/evil").exists() && !fx.path("evil").exists());
        assert!(!fx.path("releases/6.6").exists());
        assert_eq!(fs::read_dir(fx.path("releases")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn release_restore_point_needs_a_current_symlink() {
        let fx = ReleaseFixture::new();
        let err = prepare_restore_point(&fx.pkg, "op-1").await.unwrap_err();
        assert!(matches!(err, PackageError::CannotRestore { .. }), "{err}");
        let err = prepare_restore_point(&fx.pkg, "../op").await.unwrap_err();
        assert!(matches!(err, PackageError::InvalidOperationId(_)), "{err}");
    }

    const WHEEL_SCRIPT: &str = r#"
import base64, hashlib, sys, zipfile

def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"

out, version = sys.argv[1], sys.argv[2]
info = f"demo_pkg-{version}.dist-info"
files = {
    "demo_pkg/__init__.py": f'VERSION = "{version}"\n'.encode(),
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n".encode(),
    f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: covet-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = "\n".join([record_line(p, d) for p, d in files.items()] + [f"{info}/RECORD,,", ""])
with zipfile.ZipFile(f"{out}/demo_pkg-{version}-py3-none-any.whl", "w") as wheel:
    for path, data in files.items():
        wheel.writestr(path, data)
    wheel.writestr(f"{info}/RECORD", record)
"#;

    /// Relative path -> (kind, mode, mtime, content digest or link target).
    fn tree_listing(root: &Path) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let what = if meta.is_symlink() {
                    format!("link {}", fs::read_link(&path).unwrap().display())
                } else if meta.is_dir() {
                    walk(root, &path, out);
                    "dir".to_owned()
                } else {
                    let digest =
                        ring::digest::digest(&ring::digest::SHA256, &fs::read(&path).unwrap());
                    format!("file {}", hex::encode(digest))
                };
                let entry = format!(
                    "{what} {:o} {}.{}",
                    meta.mode(),
                    meta.mtime(),
                    meta.mtime_nsec()
                );
                out.insert(path.strip_prefix(root).unwrap().to_owned(), entry);
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    #[tokio::test]
    async fn pip_install_restore_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        let script = dir.path().join("make_wheel.py");
        fs::write(&script, WHEEL_SCRIPT).unwrap();
        for version in ["1.0", "2.0"] {
            run(
                "/usr/bin/python3",
                &[script.to_str().unwrap(), wheels.to_str().unwrap(), version],
            );
        }
        let venv = dir.path().join("venv");
        run("/usr/bin/python3", &["-m", "venv", venv.to_str().unwrap()]);

        let mut pkg = package(PackageKind::Pip, "demo-pkg");
        pkg.venv = Some(venv.clone());
        pkg.find_links = vec![wheels];
        let app: AppConfig = toml::from_str(&format!(
            "name = 'demo'\nunit = 'demo.service'\n[package]\nkind = 'pip'\nname = 'demo-pkg'\nvenv = '{}'",
            venv.display()
        ))
        .unwrap();

        let lines = std::sync::Mutex::new(Vec::new());
        let collect = |_: bool, line: &str| lines.lock().unwrap().push(line.to_owned());
        install(&pkg, "1.0", "op-1", LONG, &collect).await.unwrap();
        assert!(
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("Successfully installed demo-pkg-1.0")),
            "{:?}",
            lines.lock().unwrap()
        );
        assert_eq!(installed_version(&app).await.as_deref(), Some("1.0"));
        let before = tree_listing(&venv);

        let rp = prepare_restore_point(&pkg, "op-2").await.unwrap();
        // A retry reuses the complete copy.
        assert_eq!(prepare_restore_point(&pkg, "op-2").await.unwrap(), rp);
        let RestorePoint::Pip { copy, version, .. } = &rp else {
            panic!("{rp:?}");
        };
        assert_eq!(version.as_deref(), Some("1.0"));
        assert_eq!(copy, &dir.path().join(".venv.before-op-2"));
        assert_eq!(tree_listing(copy), before);
        // Files are the venv's own inodes, not copies.
        let python_files = |root: &Path| -> Vec<PathBuf> {
            let mut found = Vec::new();
            let mut stack = vec![root.to_owned()];
            while let Some(d) = stack.pop() {
                for e in fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    let m = fs::symlink_metadata(&p).unwrap();
                    if m.is_dir() {
                        stack.push(p);
                    } else if m.is_file() {
                        found.push(p.strip_prefix(root).unwrap().to_owned());
                    }
                }
            }
            found
        };
        let files = python_files(&venv);
        assert!(files.len() > 100, "{}", files.len());
        for f in &files {
            assert_eq!(
                fs::metadata(venv.join(f)).unwrap().ino(),
                fs::metadata(copy.join(f)).unwrap().ino(),
                "{f:?}"
            );
        }

        install(&pkg, "2.0", "op-2", LONG, &quiet).await.unwrap();
        // pip wrote 2.0 without touching the inodes the snapshot holds.
        assert_eq!(tree_listing(copy), before);
        assert_eq!(installed_version(&app).await.as_deref(), Some("2.0"));
        let err = install(&pkg, "3.0", "op-2", LONG, &quiet)
            .await
            .unwrap_err();
        assert!(matches!(err, PackageError::VersionMissing { .. }), "{err}");

        restore(&rp).await.unwrap();
        // Used up: a second restore cannot vouch for the venv any more.
        assert!(matches!(
            restore(&rp).await,
            Err(PackageError::RestorePointGone { .. })
        ));
        assert_eq!(installed_version(&app).await.as_deref(), Some("1.0"));
        assert_eq!(tree_listing(&venv), before);
        let output = StdCommand::new(venv.join("bin/python"))
            .args(["-c", "import demo_pkg; print(demo_pkg.VERSION)"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1.0");

        discard(&rp).await.unwrap();
        assert!(!copy.exists());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn pip_restore_resumes_after_a_crash_half_way() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        let copy = dir.path().join(".venv.before-op-1");
        let aside = dir.path().join(".venv.failed-op-1");
        fs::create_dir(&copy).unwrap();
        fs::write(copy.join("marker"), "old").unwrap();
        // Crashed after moving the live venv aside.
        fs::create_dir(&aside).unwrap();
        let rp = RestorePoint::Pip {
            venv: venv.clone(),
            copy: copy.clone(),
            version: None,
            fingerprint: None,
        };
        restore(&rp).await.unwrap();
        assert_eq!(fs::read_to_string(venv.join("marker")).unwrap(), "old");
        assert!(!copy.exists() && !aside.exists());
        // Used once, the restore point cannot be used again: a second
        // restore must not claim the old version is back.
        assert!(matches!(
            restore(&rp).await,
            Err(PackageError::RestorePointGone { .. })
        ));

        let foreign = RestorePoint::Pip {
            venv,
            copy: dir.path().join("elsewhere"),
            version: None,
            fingerprint: None,
        };
        assert!(matches!(
            restore(&foreign).await,
            Err(PackageError::CannotRestore { .. })
        ));
    }

    fn restore_point_fingerprint_now(copy: &Path) -> String {
        tree_fingerprint(copy).unwrap()
    }

    fn fingerprint_of(rp: &RestorePoint) -> &String {
        match rp {
            RestorePoint::Pip {
                fingerprint: Some(f),
                ..
            } => f,
            other => panic!("{other:?}"),
        }
    }

    /// A snapshot file written in place (the one thing hard links cannot
    /// survive) is caught: the restore refuses and moves nothing.
    #[tokio::test]
    async fn a_snapshot_changed_in_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        fs::create_dir_all(venv.join("lib")).unwrap();
        fs::write(venv.join("lib/mod.py"), "VERSION = '1.0'\n").unwrap();
        fs::write(venv.join("lib/other.py"), "X = 1\n").unwrap();
        std::os::unix::fs::symlink("lib/mod.py", venv.join("link")).unwrap();
        let pkg: PackageConfig = toml::from_str(&format!(
            "kind = 'pip'\nname = 'demo'\nvenv = '{}'",
            venv.display()
        ))
        .unwrap();
        let rp = prepare_restore_point(&pkg, "op-1").await.unwrap();
        let RestorePoint::Pip {
            copy,
            fingerprint: Some(_),
            ..
        } = &rp
        else {
            panic!("{rp:?}");
        };
        assert!(
            fs::symlink_metadata(copy.join("link"))
                .unwrap()
                .is_symlink()
        );
        // pip's way: unlink, write anew. The snapshot keeps 1.0.
        fs::remove_file(venv.join("lib/mod.py")).unwrap();
        fs::write(venv.join("lib/mod.py"), "VERSION = '2.0'\n").unwrap();
        assert_eq!(
            fs::read_to_string(copy.join("lib/mod.py")).unwrap(),
            "VERSION = '1.0'\n"
        );
        assert_eq!(restore_point_fingerprint_now(copy), *fingerprint_of(&rp));
        // Something else's way: in place, so through the inode both share.
        fs::write(venv.join("lib/other.py"), "X = 2\n").unwrap();
        assert_eq!(
            fs::read_to_string(copy.join("lib/other.py")).unwrap(),
            "X = 2\n"
        );
        let err = restore(&rp).await.unwrap_err();
        assert!(matches!(err, PackageError::SnapshotChanged { .. }), "{err}");
        assert!(err.to_string().contains("backup"), "{err}");
        assert_eq!(
            fs::read_to_string(venv.join("lib/mod.py")).unwrap(),
            "VERSION = '2.0'\n",
            "nothing moved"
        );
        assert!(copy.is_dir());
    }

    #[test]
    fn dpkg_lock_messages_are_recognized() {
        let frontend = "dpkg: error: dpkg frontend lock was locked by another process with pid 42\nNote: removing the lock file is always wrong";
        assert_eq!(
            dpkg_lock_holder(frontend),
            Some("dpkg frontend lock was locked by another process with pid 42")
        );
        assert!(
            dpkg_lock_holder("dpkg: error: dpkg status database is locked by another process")
                .is_some()
        );
        assert_eq!(
            dpkg_lock_holder("dpkg: error: cannot access archive 'x.deb': No such file"),
            None
        );
    }

    #[tokio::test]
    async fn tool_failure_reports_status_and_last_error_lines() {
        let seen = std::sync::Mutex::new(Vec::new());
        let collect =
            |is_stderr: bool, line: &str| seen.lock().unwrap().push((is_stderr, line.to_owned()));
        let script =
            "import sys; print('working'); print('ERROR: no luck', file=sys.stderr); sys.exit(3)";
        let err = run_tool(
            Path::new("/usr/bin/python3"),
            &["-c".into(), script.into()],
            None,
            &[],
            LONG,
            &collect,
        )
        .await
        .unwrap_err();
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
        let err = run_tool(
            Path::new("/bin/sleep"),
            &["30".into()],
            None,
            &[],
            Duration::from_millis(200),
            &quiet,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PackageError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// rpm and rpmbuild, or None after saying why the test is skipped; with
    /// CI set, installs the `rpm` package instead of skipping.
    fn rpm_tools() -> Option<()> {
        if !is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI must run as root");
            eprintln!("SKIPPED: rpm backend tests need root (rpm --root chroots)");
            return None;
        }
        if !Path::new("/usr/bin/rpmbuild").exists() {
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED: rpmbuild is missing (apt-get install rpm)");
                return None;
            }
            run("/usr/bin/apt-get", &["install", "-y", "-q", "rpm"]);
        }
        Some(())
    }

    const RPM_SPEC: &str = "Name: %{pkgname}
Version: %{ver}
Release: 1
Summary: covet-agent rpm backend test package
License: MIT
BuildArch: noarch
AutoReqProv: no

%description
covet-agent rpm backend test package

%install
mkdir -p %{buildroot}/opt/%{pkgname}
printf %{ver} > %{buildroot}/opt/%{pkgname}/VERSION

%files
/opt/%{pkgname}/VERSION
";

    /// Builds `NAME-VERSION-1.noarch.rpm` into `repo` with rpmbuild in a
    /// scratch topdir.
    fn build_rpm(dir: &Path, repo: &Path, name: &str, version: &str) {
        let spec = dir.join("test.spec");
        fs::write(&spec, RPM_SPEC).unwrap();
        let top = dir.join(format!("top-{version}"));
        let output = StdCommand::new("/usr/bin/rpmbuild")
            .args(["-bb", "--quiet", "--define"])
            .arg(format!("_topdir {}", top.display()))
            .args(["--define", &format!("pkgname {name}")])
            .args(["--define", &format!("ver {version}")])
            .arg(&spec)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "rpmbuild: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let file = format!("{name}-{version}-1.noarch.rpm");
        fs::copy(top.join("RPMS/noarch").join(&file), repo.join(&file)).unwrap();
    }

    /// The rpm backend against a throwaway `--root` (files and database
    /// inside it): the same steps the agent runs, minus the host.
    #[tokio::test]
    async fn rpm_install_restore_in_a_throwaway_root() {
        let Some(()) = rpm_tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (repo, root) = (dir.path().join("repo"), dir.path().join("root"));
        fs::create_dir(&repo).unwrap();
        fs::create_dir(&root).unwrap();
        let name = "covet-rpmtest";
        for version in ["1.0", "2.0"] {
            build_rpm(dir.path(), &repo, name, version);
        }
        // A file named like 3.0 that is really 1.0: names are not trusted.
        fs::copy(
            repo.join("covet-rpmtest-1.0-1.noarch.rpm"),
            repo.join("covet-rpmtest-3.0-1.noarch.rpm"),
        )
        .unwrap();
        let db: Vec<OsString> = vec![
            "--root".into(),
            root.clone().into(),
            "--dbpath".into(),
            "/rpmdb".into(),
        ];
        let rpm = System::Rpm(&db);
        let mut pkg = package(PackageKind::Rpm, name);
        pkg.repo_dir = Some(repo.clone());
        let live = root.join("opt/covet-rpmtest/VERSION");

        assert_eq!(rpm.find(&pkg, "2.0").await.unwrap().1.version, "2.0-1");
        assert_eq!(rpm.find(&pkg, "1.0-1").await.unwrap().1.short, "1.0");
        let err = rpm.find(&pkg, "3.0").await.unwrap_err();
        assert!(matches!(err, PackageError::VersionMissing { .. }), "{err}");
        assert_eq!(rpm.installed(name).await.unwrap(), Installed::No);

        rpm.install(&pkg, "1.0", LONG, &quiet).await.unwrap();
        assert_eq!(fs::read_to_string(&live).unwrap(), "1.0");
        assert_eq!(
            rpm.installed(name).await.unwrap(),
            Installed::Yes("1.0-1".into())
        );

        let rp = rpm.prepare(&pkg, "op-1").await.unwrap();
        assert_eq!(
            rpm.prepare(&pkg, "op-1").await.unwrap(),
            rp,
            "a retry reuses the keep"
        );
        let RestorePoint::Rpm {
            version,
            kept,
            keep_dir,
            ..
        } = &rp
        else {
            panic!("{rp:?}");
        };
        assert_eq!(version.as_deref(), Some("1.0-1"));
        assert_eq!(keep_dir, &dir.path().join(".repo.before-op-1"));
        let kept = kept.clone().unwrap();
        assert!(kept.starts_with(keep_dir) && kept.is_file());

        rpm.install(&pkg, "2.0", LONG, &quiet).await.unwrap();
        rpm.install(&pkg, "2.0", LONG, &quiet).await.unwrap();
        assert_eq!(fs::read_to_string(&live).unwrap(), "2.0");
        // The repository loses 1.0: the kept copy is what brings it back.
        fs::remove_file(repo.join("covet-rpmtest-1.0-1.noarch.rpm")).unwrap();
        let RestorePoint::Rpm {
            name: n,
            version: v,
            kept: k,
            ..
        } = &rp
        else {
            unreachable!()
        };
        rpm.restore(n, v, k).await.unwrap();
        rpm.restore(n, v, k).await.unwrap();
        assert_eq!(fs::read_to_string(&live).unwrap(), "1.0");
        assert_eq!(
            rpm.installed(name).await.unwrap(),
            Installed::Yes("1.0-1".into())
        );
        discard(&rp).await.unwrap();
        assert!(!keep_dir.exists());

        // 1.0 is no longer anywhere (the mislabeled file was a 1.0 too): the
        // next upgrade is refused up front.
        fs::remove_file(repo.join("covet-rpmtest-3.0-1.noarch.rpm")).unwrap();
        let err = rpm.prepare(&pkg, "op-2").await.unwrap_err();
        assert!(matches!(err, PackageError::PreviousMissing { .. }), "{err}");
        assert!(!dir.path().join(".repo.before-op-2").exists());
        assert!(!dir.path().join(".repo.before-op-2.partial").exists());

        // Not installed before: the restore removes it.
        rpm.restore(n, &None, &None).await.unwrap();
        assert_eq!(rpm.installed(name).await.unwrap(), Installed::No);
        assert!(!live.exists());
        rpm.restore(n, &None, &None).await.unwrap();
    }

    #[test]
    fn candidates_put_files_named_like_the_package_first() {
        let dir = tempfile::tempdir().unwrap();
        for file in [
            "a_1.0_all.deb",
            "app_2.0_all.deb",
            "app-extra_1_all.deb",
            "app_1.0_all.rpm",
            "notes.txt",
        ] {
            fs::write(dir.path().join(file), "").unwrap();
        }
        fs::create_dir(dir.path().join("dir.deb")).unwrap();
        let names: Vec<String> = candidates(dir.path(), "deb", "app")
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["app-extra_1_all.deb", "app_2.0_all.deb", "a_1.0_all.deb"]
        );
    }

    #[tokio::test]
    async fn system_packages_need_a_repo_dir_and_a_sane_name() {
        let err = check_available(&package(PackageKind::Deb, "app"), "1.0")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("repo_dir"), "{err}");
        let mut pkg = package(PackageKind::Rpm, "-e");
        pkg.repo_dir = Some(PathBuf::from("/nonexistent"));
        let err = prepare_restore_point(&pkg, "op-1").await.unwrap_err();
        assert!(matches!(err, PackageError::NotConfigured { .. }), "{err}");
    }
}
