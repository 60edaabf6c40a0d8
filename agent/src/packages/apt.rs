//! `kind = "apt"`: the package comes from the host's configured apt
//! repositories. Availability is what `apt-cache madison` lists (the host's
//! package lists, as its own `apt-get update` left them); the install is
//! `apt-get install NAME=VERSION`, waiting for dpkg's lock and keeping the
//! operator's conffiles. Before it, the installed version's .deb is kept in
//! `keep_dir/before-OP_ID/` (from apt's cache, else `apt-get download`ed
//! from the repositories), so a rollback reinstalls that very file even
//! when the repository has dropped the version since.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::system::{APT_ARCHIVES, Installed, Manager, TOOL_ENV, check_name, keep_file};
use super::{
    Fallback, InstallOptions, Kind, OnLine, OpId, PackageError, RestorePoint, SYSTEM_PATH, Version,
    blocking, checked, io_error, remove_tree, run_tool, with_suffix,
};
use crate::config::AptConfig;
use crate::host::process::ProcessBuilder;

const APT_GET: &str = "/usr/bin/apt-get";
const APT_CACHE: &str = "/usr/bin/apt-cache";
/// `apt-get download` of one package file gets this long.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// The versions `apt-cache madison` lists for `name`, as apt spells them
/// (with their epoch): lines `NAME | VERSION | SOURCE`.
pub(super) fn parse_madison(text: &str, name: &str) -> Vec<String> {
    let mut versions = Vec::new();
    for line in text.lines() {
        let mut fields = line.split('|').map(str::trim);
        let (Some(package), Some(version)) = (fields.next(), fields.next()) else {
            continue;
        };
        if package == name && !version.is_empty() && !versions.iter().any(|v| v == version) {
            versions.push(version.to_owned());
        }
    }
    versions
}

/// The listed version a request names: the same, or the same without its
/// epoch (`1:2.0` for `2.0`).
pub(super) fn matching<'a>(listed: &'a [String], version: &str) -> Option<&'a str> {
    listed
        .iter()
        .find(|v| {
            *v == version
                || v.split_once(':')
                    .is_some_and(|(epoch, rest)| rest == version && epoch.parse::<u32>().is_ok())
        })
        .map(String::as_str)
}

/// `apt-get install` of `target` (`NAME=VERSION` or a kept .deb's absolute
/// path): never a prompt, never a removal of another package, up or down,
/// dpkg's lock waited for up to `lock_wait`, edited conffiles kept.
pub(super) fn install_args(target: OsString, lock_wait: Duration) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "install",
        "--yes",
        "--quiet",
        "--no-install-recommends",
        "--no-remove",
        "--allow-downgrades",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "-o",
    ]
    .map(OsString::from)
    .into();
    args.push(format!("DPkg::Lock::Timeout={}", lock_wait.as_secs().max(1)).into());
    args.extend([OsString::from("--"), target]);
    args
}

async fn listed_versions(name: &str) -> Result<Vec<String>, PackageError> {
    let out = super::capture(APT_CACHE, &["madison".into(), "--".into(), name.into()]).await?;
    Ok(parse_madison(&checked(APT_CACHE, &out)?, name))
}

/// The version apt lists for the request, as apt spells it.
async fn find(pkg: &AptConfig, version: &str) -> Result<String, PackageError> {
    check_name(Manager::Dpkg, &pkg.name)?;
    let listed = listed_versions(&pkg.name).await?;
    match matching(&listed, version) {
        Some(found) => Ok(found.to_owned()),
        None => Err(PackageError::VersionMissing {
            name: pkg.name.clone(),
            version: version.to_owned(),
            searched: describe_listed(&pkg.name, &listed),
        }),
    }
}

fn describe_listed(name: &str, listed: &[String]) -> String {
    if listed.is_empty() {
        format!(
            "apt's package lists (`apt-cache madison {name}` lists no version; is its repository configured and `apt-get update` run?)"
        )
    } else {
        format!(
            "apt's package lists (`apt-cache madison {name}` lists {})",
            listed.join(", ")
        )
    }
}

/// The app's package from apt's repositories. Its steps are boxed: every
/// kind's future is inlined in the callers' (`with_kind!`), and apt's are
/// large enough to overflow a small test thread's stack.
pub(super) struct Apt<'a>(pub(super) &'a AptConfig);

impl Kind for Apt<'_> {
    /// apt's package lists offer `version` of the package.
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError> {
        Box::pin(find(self.0, version.as_str())).await.map(|_| ())
    }

    async fn prepare_restore_point(&self, op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
        Box::pin(prepare(self.0, op_id)).await
    }

    async fn abandon_restore_point(&self, op_id: OpId<'_>) -> Result<(), PackageError> {
        let download = with_suffix(&keep_of(self.0, op_id), ".download");
        blocking(move || remove_tree(&download)).await?;
        super::system::discard(&keep_of(self.0, op_id)).await
    }

    async fn install(
        &self,
        version: Version<'_>,
        options: &InstallOptions<'_>,
    ) -> Result<(), PackageError> {
        Box::pin(install(
            self.0,
            version.as_str(),
            options.timeout,
            options.on_line,
        ))
        .await
    }

    async fn installed_version(&self) -> Option<String> {
        Manager::Dpkg.installed(&self.0.name).await.ok()?.version()
    }

    /// The backed-up version is installed again from the repositories.
    fn fallback(&self) -> Fallback {
        Fallback::ReinstallBackedUpVersion
    }
}

/// `keep_dir/before-OP_ID`: one operation's kept .deb.
fn keep_of(pkg: &AptConfig, op_id: OpId<'_>) -> PathBuf {
    pkg.keep_dir.join(format!("before-{}", op_id.as_str()))
}

/// Keeps the installed version's .deb (apt's cache, else downloaded from
/// the repositories) in `keep_dir/before-OP_ID/`; none kept, no upgrade.
/// The restore point is the deb kind's: its restore reinstalls the kept
/// file with dpkg, keeping conffiles and waiting for dpkg's lock.
async fn prepare(pkg: &AptConfig, op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
    check_name(Manager::Dpkg, &pkg.name)?;
    let keep = keep_of(pkg, op_id);
    if keep.is_dir() {
        // A retry: what was kept then is what was installed then.
        return Manager::Dpkg.kept_point(&pkg.name, keep).await;
    }
    let (version, file) = match Manager::Dpkg
        .installed(&pkg.name)
        .await?
        .settled(&pkg.name)?
    {
        None => (None, None),
        Some(version) => {
            let file = previous_file(pkg, &keep, &version).await?;
            (Some(version), Some(file))
        }
    };
    let target = keep.clone();
    let source = file.clone();
    let kept = blocking(move || keep_file(&target, source.as_deref())).await;
    // A downloaded file was only a step on the way to the keep.
    if let Some(download) = file.as_deref().and_then(Path::parent)
        && download != Path::new(APT_ARCHIVES)
    {
        let download = download.to_owned();
        blocking(move || remove_tree(&download)).await?;
    }
    Ok(Manager::Dpkg.point(&pkg.name, version, keep, kept?))
}

/// The .deb of the installed `version`: in apt's cache, or fetched with
/// `apt-get download` into `KEEP.download`.
async fn previous_file(
    pkg: &AptConfig,
    keep: &Path,
    version: &str,
) -> Result<PathBuf, PackageError> {
    let cached = Manager::Dpkg
        .search(&[Path::new(APT_ARCHIVES)], &pkg.name, version)
        .await?;
    let searched = match cached {
        Ok((file, _)) => return Ok(file),
        Err(searched) => searched,
    };
    let download = with_suffix(keep, ".download");
    let dir = download.clone();
    blocking(move || {
        remove_tree(&dir)?;
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))
    })
    .await?;
    let missing = |why: String| PackageError::PreviousUnavailable {
        name: pkg.name.clone(),
        version: version.to_owned(),
        searched: format!("{searched}, apt's repositories ({why})"),
    };
    let fetched = match download_into(&download, &pkg.name, version).await {
        Ok(()) => Manager::Dpkg
            .search(&[download.as_path()], &pkg.name, version)
            .await?
            .map(|(file, _)| file)
            .map_err(|_| missing("apt-get download left no such file".to_owned())),
        Err(e) => Err(missing(e.to_string())),
    };
    if fetched.is_err() {
        let dir = download.clone();
        blocking(move || remove_tree(&dir)).await?;
    }
    fetched
}

/// `apt-get download NAME=VERSION`, which writes into its working directory.
async fn download_into(dir: &Path, name: &str, version: &str) -> Result<(), PackageError> {
    let out = ProcessBuilder::new(APT_GET)
        .args(["download", "--quiet", "--"])
        .arg(format!("{name}={version}"))
        .current_dir(dir)
        .env("PATH", SYSTEM_PATH)
        .env("LC_ALL", "C")
        .timeout(DOWNLOAD_TIMEOUT)
        .output()
        .await?;
    checked(APT_GET, &out).map(|_| ())
}

/// `apt-get install NAME=VERSION`; nothing to do when it is installed.
/// Preflight has asked apt for the version; apt's own refusal of one it
/// does not know is still told as [`PackageError::VersionMissing`].
async fn install(
    pkg: &AptConfig,
    version: &str,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    check_name(Manager::Dpkg, &pkg.name)?;
    let is_wanted = |now: &Installed| match now {
        Installed::Yes(v) => matching(std::slice::from_ref(v), version).is_some(),
        _ => false,
    };
    if is_wanted(&Manager::Dpkg.installed(&pkg.name).await?) {
        return Ok(());
    }
    let args = install_args(format!("{}={version}", pkg.name).into(), timeout);
    let command = ProcessBuilder::new(APT_GET)
        .args(args)
        .envs(TOOL_ENV)
        .timeout(timeout);
    let ran = run_tool(command, on_line).await;
    let not_found = format!("Version '{version}' for '{}' was not found", pkg.name);
    if let Err(PackageError::Tool { output, .. }) = &ran
        && output.contains(&not_found)
    {
        return Err(PackageError::VersionMissing {
            name: pkg.name.clone(),
            version: version.to_owned(),
            searched: describe_listed(&pkg.name, &listed_versions(&pkg.name).await?),
        });
    }
    ran?;
    let found = Manager::Dpkg.installed(&pkg.name).await?;
    if is_wanted(&found) {
        return Ok(());
    }
    Err(PackageError::WrongVersion {
        program: APT_GET.to_owned(),
        name: pkg.name.clone(),
        wanted: format!("at {version}"),
        found: found.describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madison_lines_give_the_versions_of_that_package_only() {
        let text = "   covapp |    3.0 | file:/srv/repo ./ Packages\n\
                    \x20  covapp |  1:2.0 | http://deb.example/debian bookworm/main amd64 Packages\n\
                    \x20  covapp |    3.0 | http://mirror.example/debian bookworm/main amd64 Packages\n\
                    covapp-doc |    3.0 | file:/srv/repo ./ Packages\n\
                    N: Unable to locate package other\n";
        assert_eq!(parse_madison(text, "covapp"), ["3.0", "1:2.0"]);
        assert!(parse_madison("", "covapp").is_empty());
        assert!(parse_madison("N: Unable to locate package covapp\n", "covapp").is_empty());
    }

    #[test]
    fn a_request_matches_with_or_without_the_epoch() {
        let listed = vec!["3.0".to_owned(), "1:2.0".to_owned(), "x:1.0".to_owned()];
        assert_eq!(matching(&listed, "3.0"), Some("3.0"));
        assert_eq!(matching(&listed, "2.0"), Some("1:2.0"));
        assert_eq!(matching(&listed, "1:2.0"), Some("1:2.0"));
        assert_eq!(matching(&listed, "1.0"), None, "x is no epoch");
        assert_eq!(matching(&listed, "3"), None);
        assert_eq!(matching(&[], "3.0"), None);
    }

    #[test]
    fn install_argv_is_explicit_and_ends_the_options_before_the_target() {
        let args = install_args("covapp=2.0".into(), Duration::from_secs(90));
        let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(args.first(), Some(&"install"));
        assert_eq!(args[args.len() - 2..], ["--", "covapp=2.0"]);
        for wanted in [
            "--yes",
            "--no-remove",
            "--allow-downgrades",
            "Dpkg::Options::=--force-confold",
            "DPkg::Lock::Timeout=90",
        ] {
            assert!(args.contains(&wanted), "{wanted} in {args:?}");
        }
        let short = install_args("/k/a.deb".into(), Duration::from_millis(10));
        assert!(short.iter().any(|a| a == "DPkg::Lock::Timeout=1"));
    }
}
