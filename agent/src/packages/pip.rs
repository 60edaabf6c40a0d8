//! pip: a Python distribution in a virtualenv, installed from local
//! wheelhouses only, with a hard-linked snapshot of the virtualenv as its
//! restore point and the upgrade's backup as the way back without one.

use std::ffi::OsString;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Fallback, InstallOptions, Kind, OnLine, OpId, PackageError, RestorePoint, Version, blocking,
    exists, fsync_dir, io_error, parent_of, remove_tree, rename, run_tool, sibling, with_suffix,
};
use crate::config::PipConfig;
use crate::files::{is_root, tree_fingerprint};
use crate::host::process::{ProcessBuilder, RunAs};
use crate::host::users;

impl Kind for PipConfig {
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError> {
        pip_check_available(self, version)
    }

    async fn prepare_restore_point(&self, op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
        pip_prepare(self, op_id).await
    }

    async fn abandon_restore_point(&self, op_id: OpId<'_>) -> Result<(), PackageError> {
        let copy = sibling(&self.venv, "before", op_id.as_str());
        blocking(move || {
            remove_tree(&with_suffix(&copy, ".partial"))?;
            remove_tree(&copy)
        })
        .await
    }

    async fn install(
        &self,
        version: Version<'_>,
        options: &InstallOptions<'_>,
    ) -> Result<(), PackageError> {
        pip_install(self, version, options.timeout, options.on_line).await
    }

    async fn installed_version(&self) -> Option<String> {
        pip_version(self)
    }

    /// The backup holds the virtualenv (see [`super::backup_paths`]).
    fn fallback(&self) -> Fallback {
        Fallback::RestorePaths(vec![self.venv.clone()])
    }

    async fn dry_run_argv(
        &self,
        version: Version<'_>,
        argv: &[String],
        scratch: &mut Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        scratch_argv(self, version, argv, scratch, timeout).await
    }
}

/// Puts the snapshot `copy` back as `venv` (see [`pip_restore`]).
pub(super) async fn restore(
    venv: &Path,
    copy: &Path,
    fingerprint: Option<&str>,
) -> Result<(), PackageError> {
    let (venv, copy, fingerprint) = (
        venv.to_owned(),
        copy.to_owned(),
        fingerprint.map(str::to_owned),
    );
    blocking(move || pip_restore(&venv, &copy, fingerprint.as_deref())).await
}

/// Removes the snapshot once the upgrade succeeded.
pub(super) async fn discard(copy: &Path) -> Result<(), PackageError> {
    let copy = copy.to_owned();
    blocking(move || remove_tree(&copy)).await
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

fn pip_check_available(pkg: &PipConfig, version: Version<'_>) -> Result<(), PackageError> {
    let mut searched = Vec::new();
    for dir in &pkg.find_links {
        match fs::read_dir(dir) {
            Ok(entries) => {
                let found = entries.flatten().any(|entry| {
                    is_distribution_of(
                        &entry.file_name().to_string_lossy(),
                        &pkg.name,
                        version.as_str(),
                    )
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
        version: version.to_string(),
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

async fn pip_prepare(pkg: &PipConfig, op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
    let venv = pkg.venv.clone();
    let copy = sibling(&venv, "before", op_id.as_str());
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
    pkg: &PipConfig,
    version: Version<'_>,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    let venv = &pkg.venv;
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
    let mut command = ProcessBuilder::new(&python).args(&args).timeout(timeout);
    if let Some(owner) = venv_owner(venv)? {
        command = command.user(owner);
    }
    run_tool(command, on_line).await?;
    let installed = pip_version(pkg);
    if !installed
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case(version.as_str()))
    {
        tracing::warn!(package = %pkg.name, wanted = version.as_str(), ?installed, "pip reports success but the installed version differs");
    }
    Ok(())
}

/// Files pip writes must belong to whoever owns the virtualenv, not root.
fn venv_owner(venv: &Path) -> Result<Option<RunAs>, PackageError> {
    let meta =
        fs::metadata(venv).map_err(io_error(format!("reading virtualenv {}", venv.display())))?;
    if !is_root() || meta.uid() == 0 {
        return Ok(None);
    }
    let name = users::name_of(meta.uid()).ok_or_else(|| PackageError::NamelessOwner {
        path: venv.to_owned(),
        uid: meta.uid(),
    })?;
    Ok(Some(RunAs::lookup(&name)?))
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
fn pip_version(pkg: &PipConfig) -> Option<String> {
    let venv = &pkg.venv;
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

/// The dry-run argv as the target version would run it: `version` is
/// installed into a scratch virtualenv at `scratch/venv` and a program of
/// the app's venv is replaced by the same one from there.
async fn scratch_argv(
    pkg: &PipConfig,
    version: Version<'_>,
    argv: &[String],
    scratch_slot: &mut Option<PathBuf>,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let mut argv = argv.to_vec();
    let venv = pkg.venv.clone();
    // Python and pip run as the venv's owner (an sdist's setup.py is code),
    // in a scratch dir that owner owns.
    let meta = std::fs::metadata(&venv)
        .map_err(|e| format!("cannot read virtualenv {}: {e}", venv.display()))?;
    let owner = (meta.uid(), meta.gid());
    let owner_name = match owner.0 {
        0 => None,
        uid => Some(users::name_of(uid).ok_or_else(|| {
            format!(
                "the owner (uid {uid}) of {} is no system user",
                venv.display()
            )
        })?),
    };
    let scratch = scratch_slot.insert(scratch_dir_for(&venv, owner)?);
    let scratch_venv = scratch.join("venv");
    fresh_venv(pkg, &scratch_venv, version, owner_name.as_deref(), timeout)
        .await
        .map_err(|e| format!("scratch virtualenv: {e}"))?;
    if let Some(rest) = argv
        .first()
        .and_then(|p| Path::new(p).strip_prefix(&venv).ok().map(Path::to_owned))
    {
        argv[0] = scratch_venv.join(rest).display().to_string();
    }
    Ok(argv)
}

/// A new virtualenv at `dest` (made by the app venv's Python) with `version`
/// installed from the wheelhouses, as `owner`: the app's pip installs into
/// it (`pip --python`, pip 22.3 and later), which spares ensurepip's
/// seconds; an older pip seeds it with its own.
async fn fresh_venv(
    pkg: &PipConfig,
    dest: &Path,
    version: Version<'_>,
    owner: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let never = std::sync::atomic::AtomicBool::new(false);
    let as_owner = |argv: Vec<String>, timeout: Duration| {
        let never = &never;
        async move { crate::host::process::run(&argv, owner, &[], timeout, never, &|_, _| {}).await }
    };
    let python = pkg.venv.join("bin/python").display().to_string();
    let dest_python = dest.join("bin/python").display().to_string();
    as_owner(
        vec![
            python.clone(),
            "-m".into(),
            "venv".into(),
            "--without-pip".into(),
            dest.display().to_string(),
        ],
        Duration::from_secs(120),
    )
    .await
    .map_err(|e| format!("cannot make a virtualenv at {}: {e}", dest.display()))?;
    let mut pip_from_app = vec![
        python,
        "-m".into(),
        "pip".into(),
        "--python".into(),
        dest_python.clone(),
        "install".into(),
        "--no-input".into(),
        "--disable-pip-version-check".into(),
        "--no-cache-dir".into(),
        "--no-index".into(),
    ];
    for dir in &pkg.find_links {
        pip_from_app.push("--find-links".into());
        pip_from_app.push(dir.display().to_string());
    }
    pip_from_app.push(format!("{}=={version}", pkg.name));
    if let Err(e) = as_owner(pip_from_app, timeout).await {
        tracing::debug!(
            "pip --python into {} failed ({e}); using ensurepip",
            dest.display()
        );
        as_owner(
            vec![dest_python, "-m".into(), "ensurepip".into()],
            Duration::from_secs(120),
        )
        .await
        .map_err(|e| format!("cannot seed {} with pip: {e}", dest.display()))?;
        let dest_pkg = PipConfig {
            venv: dest.to_owned(),
            ..pkg.clone()
        };
        pip_install(&dest_pkg, version, timeout, &|_, _| {})
            .await
            .map_err(|e| {
                format!(
                    "cannot install {} {version} into {}: {e}",
                    pkg.name,
                    dest.display()
                )
            })?;
    }
    Ok(())
}

/// The marker that says a release's virtualenv is complete.
const RELEASE_COMPLETE: &str = ".covet-release-complete";

/// `releases_dir/VERSION/venv` with `version` installed, made if it is not
/// there yet (a partial one, left by a crash or a failed pip, is made
/// again); the release directory belongs to the app venv's owner. Two
/// versions' releases run side by side (blue-green, canary).
pub(super) async fn pip_install_release(
    pkg: &PipConfig,
    version: Version<'_>,
    timeout: Duration,
) -> Result<PathBuf, PackageError> {
    let releases = pkg
        .releases_dir
        .clone()
        .ok_or(PackageError::NotConfigured {
            name: pkg.name.clone(),
            kind: "pip",
            field: "releases_dir",
        })?;
    pip_check_available(pkg, version)?;
    let venv = release_venv(&releases, version.as_str());
    let release = parent_of(&venv).to_owned();
    if release.join(RELEASE_COMPLETE).is_file() {
        return Ok(venv);
    }
    let meta = fs::metadata(&pkg.venv).map_err(io_error(format!(
        "reading virtualenv {}",
        pkg.venv.display()
    )))?;
    let owner = match meta.uid() {
        0 => None,
        uid => Some(
            users::name_of(uid).ok_or_else(|| PackageError::NamelessOwner {
                path: pkg.venv.clone(),
                uid,
            })?,
        ),
    };
    {
        let (releases, release) = (releases.clone(), release.clone());
        let ids = (meta.uid(), meta.gid());
        blocking(move || {
            fs::create_dir_all(&releases)
                .map_err(io_error(format!("creating {}", releases.display())))?;
            if fs::symlink_metadata(&release).is_ok() {
                remove_tree(&release)?;
            }
            fs::create_dir(&release)
                .map_err(io_error(format!("creating {}", release.display())))?;
            std::os::unix::fs::chown(&release, Some(ids.0), Some(ids.1)).map_err(io_error(format!(
                "handing {} to the venv's owner",
                release.display()
            )))
        })
        .await?;
    }
    fresh_venv(pkg, &venv, version, owner.as_deref(), timeout)
        .await
        .map_err(|output| PackageError::Tool {
            program: "pip".into(),
            status: "failed".into(),
            output,
        })?;
    let marker = release.join(RELEASE_COMPLETE);
    blocking(move || {
        fs::write(&marker, version_line(&marker))
            .map_err(io_error(format!("writing {}", marker.display())))?;
        fsync_dir(parent_of(&marker))
    })
    .await?;
    Ok(venv)
}

fn version_line(marker: &Path) -> String {
    let version = parent_of(marker)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    format!("{version}\n")
}

/// Where [`pip_install_release`] puts `version`: `releases_dir/VERSION/venv`.
pub(super) fn release_venv(releases_dir: &Path, version: &str) -> PathBuf {
    releases_dir.join(version).join("venv")
}

/// The version of the release a virtualenv under `releases_dir` belongs to.
pub(super) fn release_version_of(venv: &Path) -> Option<String> {
    let release = venv.parent()?;
    release
        .join(RELEASE_COMPLETE)
        .is_file()
        .then(|| {
            release
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .flatten()
}

/// A fresh scratch directory for the dry run's virtualenv, next to the app's
/// venv (so its owner can reach it, unlike the 0700 state dir), with an
/// unpredictable name, created without following links, owned by `owner`.
fn scratch_dir_for(venv: &Path, owner: (u32, u32)) -> Result<PathBuf, String> {
    let parent = venv.parent().unwrap_or(Path::new("/var/tmp"));
    let mut random = [0u8; 12];
    getrandom_fill(&mut random)?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let dir = parent.join(format!(".covet-plan-{suffix}"));
    crate::files::private::create_dir(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let owned = std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1)).and_then(|()| {
        // Holds only the target version's code, which the hook's user must read.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
    });
    if let Err(e) = owned {
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("cannot hand {} to its user: {e}", dir.display()));
    }
    Ok(dir)
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LONG, quiet, run};
    use super::super::{
        check_available, discard, install, installed_version, prepare_restore_point, restore,
    };
    use super::*;
    use crate::config::{AppConfig, PackageConfig};
    use std::collections::BTreeMap;
    use std::process::Command as StdCommand;

    fn pip_package(name: &str, venv: &Path, find_links: Vec<PathBuf>) -> PackageConfig {
        PackageConfig::Pip(PipConfig {
            name: name.to_owned(),
            venv: venv.to_owned(),
            find_links,
            releases_dir: None,
        })
    }

    #[test]
    fn normalizes_like_pep_503() {
        assert_eq!(normalize("CovetPy"), "covetpy");
        assert_eq!(normalize("covet-py.core"), "covet_py_core");
        assert_eq!(normalize("a__b"), "a_b");
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
        let venv = Path::new("/nonexistent/venv");
        let pkg = pip_package(
            "CovetPy",
            venv,
            vec![empty.path().to_owned(), wheels.path().to_owned()],
        );

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

        let pkg = pip_package("CovetPy", venv, Vec::new());
        let err = check_available(&pkg, "0.2.0").await.unwrap_err();
        assert!(err.to_string().contains("no find_links"), "{err}");
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

        let pkg = pip_package("demo-pkg", &venv, vec![wheels]);
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
}
