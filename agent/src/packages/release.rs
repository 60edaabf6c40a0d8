//! release: versions as trees unpacked under `releases_dir/VERSION/` from
//! artifacts, the live one chosen by a `current` symlink swapped atomically;
//! the restore point is where `current` pointed.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{
    Fallback, InstallOptions, Kind, OpId, PackageError, RestorePoint, Version, blocking, fsync_dir,
    io_error, parent_of, remove_tree, rename,
};
use crate::archive::{self, Compression, Progress};
use crate::config::ReleaseConfig;
use crate::files::is_root;
use crate::files::safe::{self, Dir, Staging};

/// Release artifacts, in the order they are looked for.
const ARTIFACT_KINDS: [(&str, Compression); 3] = [
    ("tar.gz", Compression::Gzip),
    ("tar.zst", Compression::Zstd),
    ("tar", Compression::None),
];

impl Kind for ReleaseConfig {
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError> {
        release_source(self, version).map(|_| ())
    }

    async fn prepare_restore_point(&self, _op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
        release_prepare(self)
    }

    /// Recording where `current` points leaves nothing behind.
    async fn abandon_restore_point(&self, _op_id: OpId<'_>) -> Result<(), PackageError> {
        Ok(())
    }

    async fn install(
        &self,
        version: Version<'_>,
        options: &InstallOptions<'_>,
    ) -> Result<(), PackageError> {
        release_install(
            self,
            options.app_user,
            version,
            options.op_id,
            options.timeout,
        )
        .await
    }

    async fn installed_version(&self) -> Option<String> {
        release_version(self)
    }

    /// The backed-up version's tree is unpacked (or still there) and
    /// `current` pointed at it.
    fn fallback(&self) -> Fallback {
        Fallback::ReinstallBackedUpVersion
    }
}

/// Points `current` back at `previous_target`, if that tree is still there.
pub(super) async fn restore(current: &Path, previous_target: &Path) -> Result<(), PackageError> {
    let (current, target) = (current.to_owned(), previous_target.to_owned());
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

/// Where a release version comes from.
enum ReleaseSource {
    Unpacked(PathBuf),
    Artifact(PathBuf, Compression),
}

fn release_source(
    pkg: &ReleaseConfig,
    version: Version<'_>,
) -> Result<ReleaseSource, PackageError> {
    let releases_dir = pkg.releases_dir.as_path();
    let unpacked = releases_dir.join(version.as_str());
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
        version: version.to_string(),
        searched,
    })
}

fn release_prepare(pkg: &ReleaseConfig) -> Result<RestorePoint, PackageError> {
    let current = pkg.current.as_path();
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
    pkg: &ReleaseConfig,
    app_user: Option<&str>,
    version: Version<'_>,
    op_id: OpId<'_>,
    timeout: Duration,
) -> Result<(), PackageError> {
    let current = pkg.current.clone();
    let release = match release_source(pkg, version)? {
        ReleaseSource::Unpacked(dir) => dir,
        ReleaseSource::Artifact(artifact, compression) => {
            let releases_dir = pkg.releases_dir.clone();
            let owner = release_owner(app_user, &releases_dir)?;
            let unpack = Unpack {
                artifact,
                compression,
                owner,
                releases_dir,
                top_dir: format!("{}-{version}", pkg.name),
                version: version.to_string(),
            };
            unpack.run(timeout).await?
        }
    };
    let link_suffix = format!("tmp-{}", op_id.as_str());
    blocking(move || point_symlink(&current, &release, &link_suffix)).await
}

/// Who owns an unpacked release: the app's user, else `releases_dir`'s owner.
fn release_owner(app_user: Option<&str>, releases_dir: &Path) -> Result<(u32, u32), PackageError> {
    match app_user {
        Some(user) => crate::host::users::by_name(user)
            .map_err(io_error(format!("looking up user {user:?}")))?
            .map(|account| (account.uid, account.gid))
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
fn release_version(pkg: &ReleaseConfig) -> Option<String> {
    let target = fs::read_link(&pkg.current).ok()?;
    Path::new(&target)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LONG, quiet, run};
    use super::super::{
        check_available, discard, install, installed_version, prepare_restore_point, restore,
    };
    use super::*;
    use crate::config::{AppConfig, PackageConfig};

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
            let pkg = PackageConfig::Release(ReleaseConfig {
                name: "demo".to_owned(),
                releases_dir: dir.path().join("releases"),
                current: dir.path().join("current"),
                repo_dir: Some(dir.path().join("artifacts")),
                find_links: Vec::new(),
            });
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
            "name = 'demo'\nunit = 'demo.service'\n[package]\nkind = 'release'\nname = 'demo'\nreleases_dir = '{}'\ncurrent = '{}'",
            fx.path("releases").display(),
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
}
