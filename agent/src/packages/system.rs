//! deb and rpm: system packages from a local repository directory,
//! recognized by their own control fields, installed with dpkg or rpm; the
//! restore point is a copy of the installed version's package file.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Fallback, InstallOptions, Kind, OnLine, OpId, PackageError, RestorePoint, SYSTEM_PATH, Version,
    blocking, capture, checked, fsync_dir, io_error, parent_of, remove_tree, rename, run_tool,
    sibling, with_suffix,
};
use crate::config::SystemPackageConfig;
use crate::host::process::ProcessBuilder;

/// `restore` takes no timeout; reinstalling one package file gets this long.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a package install retries while dpkg's lock is held elsewhere.
const DPKG_LOCK_RETRY: Duration = Duration::from_millis(500);
const DPKG: &str = "/usr/bin/dpkg";
const DPKG_DEB: &str = "/usr/bin/dpkg-deb";
const DPKG_QUERY: &str = "/usr/bin/dpkg-query";
const RPM: &str = "/usr/bin/rpm";
/// Where apt leaves the .debs it downloaded: a second place to find the
/// installed version's file.
pub(super) const APT_ARCHIVES: &str = "/var/cache/apt/archives";

/// The system package manager a kind drives. `Rpm` carries arguments for
/// every rpm call that touches a database: the agent passes none (the
/// system's); the unit tests pass a throwaway `--root`, since an rpm install
/// on a Debian test machine must not touch the host.
#[derive(Debug, Clone, Copy)]
pub(super) enum Manager<'a> {
    Dpkg,
    Rpm(&'a [OsString]),
}

/// A deb or rpm package of the app: its configuration and its manager.
pub(super) struct SystemPackages<'a> {
    manager: Manager<'a>,
    config: &'a SystemPackageConfig,
}

impl<'a> SystemPackages<'a> {
    pub(super) fn new(manager: Manager<'a>, config: &'a SystemPackageConfig) -> Self {
        SystemPackages { manager, config }
    }
}

impl Kind for SystemPackages<'_> {
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError> {
        self.manager
            .find(self.config, version.as_str())
            .await
            .map(|_| ())
    }

    async fn prepare_restore_point(&self, op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
        self.manager.prepare(self.config, op_id).await
    }

    async fn abandon_restore_point(&self, op_id: OpId<'_>) -> Result<(), PackageError> {
        discard(&sibling(&self.config.repo_dir, "before", op_id.as_str())).await
    }

    async fn install(
        &self,
        version: Version<'_>,
        options: &InstallOptions<'_>,
    ) -> Result<(), PackageError> {
        self.manager
            .install(
                self.config,
                version.as_str(),
                options.timeout,
                options.on_line,
            )
            .await
    }

    async fn installed_version(&self) -> Option<String> {
        self.manager
            .installed(&self.config.name)
            .await
            .ok()?
            .version()
    }

    /// The backed-up version's file is looked for in `repo_dir` again.
    fn fallback(&self) -> Fallback {
        Fallback::ReinstallBackedUpVersion
    }
}

/// Removes a keep directory (complete or `.partial`): after a successful
/// upgrade, or when its restore point was never recorded.
pub(super) async fn discard(keep_dir: &Path) -> Result<(), PackageError> {
    let keep_dir = keep_dir.to_owned();
    blocking(move || {
        remove_tree(&with_suffix(&keep_dir, ".partial"))?;
        remove_tree(&keep_dir)
    })
    .await
}

/// A package file's own fields, as its package manager reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileFields {
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
pub(super) enum Installed {
    No,
    Yes(String),
    /// Half installed, unpacked, half configured, several versions...
    Unsettled(String),
}

impl Installed {
    pub(super) fn version(self) -> Option<String> {
        match self {
            Installed::Yes(v) => Some(v),
            _ => None,
        }
    }

    /// The installed version, `None` when there is none; a package caught
    /// half way (a failed earlier run) is not a state to start from.
    pub(super) fn settled(self, name: &str) -> Result<Option<String>, PackageError> {
        match self {
            Installed::No => Ok(None),
            Installed::Yes(v) => Ok(Some(v)),
            Installed::Unsettled(state) => Err(PackageError::Unsettled {
                name: name.to_owned(),
                state,
            }),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Installed::No => "not installed".to_owned(),
            Installed::Yes(v) => format!("at {v}"),
            Installed::Unsettled(state) => state.clone(),
        }
    }
}

impl Manager<'_> {
    fn kind(self) -> &'static str {
        match self {
            Manager::Dpkg => "deb",
            Manager::Rpm(_) => "rpm",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            Manager::Dpkg => DPKG,
            Manager::Rpm(_) => RPM,
        }
    }

    fn db_args(self) -> Vec<OsString> {
        match self {
            Manager::Dpkg => Vec::new(),
            Manager::Rpm(args) => args.to_vec(),
        }
    }

    /// Besides `repo_dir`, where the installed version's file may be.
    fn caches(self) -> &'static [&'static str] {
        match self {
            Manager::Dpkg => &[APT_ARCHIVES],
            Manager::Rpm(_) => &[],
        }
    }

    async fn native_arch(self) -> Result<String, PackageError> {
        match self {
            Manager::Dpkg => {
                let out = capture(DPKG, &["--print-architecture".into()]).await?;
                Ok(checked(DPKG, &out)?.trim().to_owned())
            }
            Manager::Rpm(_) => Ok(std::env::consts::ARCH.to_owned()),
        }
    }

    fn arch_fits(self, arch: &str, native: &str) -> bool {
        arch == native
            || arch
                == if matches!(self, Manager::Dpkg) {
                    "all"
                } else {
                    "noarch"
                }
    }

    /// Reads a package file's own name, version and architecture.
    async fn fields(self, file: &Path) -> Result<FileFields, PackageError> {
        match self {
            Manager::Dpkg => {
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
            Manager::Rpm(_) => {
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
    pub(super) async fn installed(self, name: &str) -> Result<Installed, PackageError> {
        check_name(self, name)?;
        match self {
            Manager::Dpkg => {
                let args: Vec<OsString> = vec![
                    "-W".into(),
                    "-f=${db:Status-Status}\\n${Version}\\n".into(),
                    "--".into(),
                    name.into(),
                ];
                let out = capture(DPKG_QUERY, &args).await?;
                if out.status.code() == Some(1) && out.stderr.contains("no packages found") {
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
            Manager::Rpm(db) => {
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
    pub(super) async fn search(
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
        pkg: &SystemPackageConfig,
        version: &str,
    ) -> Result<(PathBuf, FileFields), PackageError> {
        let repo = pkg.repo_dir.as_path();
        check_name(self, &pkg.name)?;
        self.search(&[repo], &pkg.name, version)
            .await?
            .map_err(|searched| PackageError::VersionMissing {
                name: pkg.name.clone(),
                version: version.to_owned(),
                searched,
            })
    }

    async fn prepare(
        self,
        pkg: &SystemPackageConfig,
        op_id: OpId<'_>,
    ) -> Result<RestorePoint, PackageError> {
        let repo = pkg.repo_dir.as_path();
        check_name(self, &pkg.name)?;
        let keep_dir = sibling(repo, "before", op_id.as_str());
        if keep_dir.is_dir() {
            // A retry: what was kept then is what was installed then.
            return self.kept_point(&pkg.name, keep_dir).await;
        }
        let (version, file) = match self.installed(&pkg.name).await?.settled(&pkg.name)? {
            None => (None, None),
            Some(version) => {
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
    pub(super) async fn kept_point(
        self,
        name: &str,
        keep_dir: PathBuf,
    ) -> Result<RestorePoint, PackageError> {
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

    pub(super) fn point(
        self,
        name: &str,
        version: Option<String>,
        keep_dir: PathBuf,
        kept: Option<PathBuf>,
    ) -> RestorePoint {
        let name = name.to_owned();
        match self {
            Manager::Dpkg => RestorePoint::Deb {
                name,
                version,
                keep_dir,
                kept,
            },
            Manager::Rpm(_) => RestorePoint::Rpm {
                name,
                version,
                keep_dir,
                kept,
            },
        }
    }

    async fn install(
        self,
        pkg: &SystemPackageConfig,
        version: &str,
        timeout: Duration,
        on_line: OnLine<'_>,
    ) -> Result<(), PackageError> {
        let (file, fields) = self.find(pkg, version).await?;
        // A retry after the install went through has nothing to do.
        if self.installed(&pkg.name).await? == Installed::Yes(fields.version.clone()) {
            return Ok(());
        }
        self.install_file(&file, timeout, on_line).await?;
        self.expect(&pkg.name, Installed::Yes(fields.version)).await
    }

    pub(super) async fn restore(
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
                let verb = if matches!(self, Manager::Dpkg) {
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
        on_line: OnLine<'_>,
    ) -> Result<(), PackageError> {
        let mut args = self.db_args();
        match self {
            // confdef+confold: conffiles the operator edited are kept, the
            // others follow the package, and dpkg never asks.
            Manager::Dpkg => {
                args.extend(["--force-confdef", "--force-confold", "--install"].map(OsString::from))
            }
            // --oldpackage: rollbacks are downgrades; --replacepkgs: a
            // half-done install of the same version is redone.
            Manager::Rpm(_) => {
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
        on_line: OnLine<'_>,
    ) -> Result<(), PackageError> {
        let tool = Path::new(self.tool());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut said_waiting = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let command = ProcessBuilder::new(tool)
                .args(args)
                .envs(TOOL_ENV)
                .timeout(left);
            let result = run_tool(command, on_line).await;
            let holder = match &result {
                Err(PackageError::Tool { output, .. }) if matches!(self, Manager::Dpkg) => {
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

    pub(super) async fn expect(self, name: &str, wanted: Installed) -> Result<(), PackageError> {
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
pub(super) const TOOL_ENV: [(&str, &str); 3] = [
    ("PATH", SYSTEM_PATH),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
];

/// Package names reach dpkg and rpm as arguments: never as options.
pub(super) fn check_name(manager: Manager<'_>, name: &str) -> Result<(), PackageError> {
    if name.is_empty() || name.starts_with('-') {
        return Err(PackageError::NotConfigured {
            name: name.to_owned(),
            kind: manager.kind(),
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
pub(super) fn keep_file(
    keep_dir: &Path,
    file: Option<&Path>,
) -> Result<Option<PathBuf>, PackageError> {
    let partial = with_suffix(keep_dir, ".partial");
    remove_tree(&partial)?;
    fs::create_dir(&partial).map_err(io_error(format!("creating {}", partial.display())))?;
    let kept = match file {
        Some(file) => {
            let file_name = file.file_name().unwrap_or_default();
            let size = fs::metadata(file)
                .map_err(io_error(format!("reading {}", file.display())))?
                .len();
            let available = crate::files::free_bytes(&partial).map_err(io_error(format!(
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

#[cfg(test)]
mod tests {
    use super::super::testing::{LONG, quiet, run};
    use super::super::{discard, prepare_restore_point};
    use super::*;
    use crate::config::PackageConfig;
    use crate::files::is_root;
    use std::process::Command as StdCommand;

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
        let rpm = Manager::Rpm(&db);
        let pkg = SystemPackageConfig {
            name: name.to_owned(),
            repo_dir: repo.clone(),
        };
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

        let rp = rpm.prepare(&pkg, OpId("op-1")).await.unwrap();
        assert_eq!(
            rpm.prepare(&pkg, OpId("op-1")).await.unwrap(),
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
        let err = rpm.prepare(&pkg, OpId("op-2")).await.unwrap_err();
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
    async fn system_packages_need_a_sane_name() {
        let pkg = PackageConfig::Rpm(SystemPackageConfig {
            name: "-e".to_owned(),
            repo_dir: PathBuf::from("/nonexistent"),
        });
        let err = prepare_restore_point(&pkg, "op-1").await.unwrap_err();
        assert!(matches!(err, PackageError::NotConfigured { .. }), "{err}");
    }
}
