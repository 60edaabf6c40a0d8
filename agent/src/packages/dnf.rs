//! `kind = "dnf"`: the package comes from the host's configured dnf
//! repositories. Availability is what `dnf repoquery --available` lists;
//! the install is `dnf install NAME-VERSION-RELEASE` (dnf upgrades or
//! downgrades to exactly that), and a rollback installs the previous
//! version from the repositories again, so the restore point only records
//! it and an upgrade is refused while the repositories no longer offer it.
//! The package database is rpm's (on Debian: root's `~/.rpmdb`).

use std::ffi::OsString;
use std::time::Duration;

use super::system::{Installed, Manager, TOOL_ENV, check_name};
use super::{
    Fallback, InstallOptions, Kind, OnLine, OpId, PackageError, RestorePoint, Version, checked,
    run_tool,
};
use crate::config::DnfConfig;
use crate::host::process::ProcessBuilder;

const DNF: &str = "/usr/bin/dnf";
/// `restore` takes no timeout; installing one version again gets this long.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// `VERSION-RELEASE` lines of `repoquery --qf`, each once, in order.
pub(super) fn parse_versions(text: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        let plausible = line.split_once('-').is_some_and(|(v, r)| {
            !v.is_empty() && !r.is_empty() && !line.contains(char::is_whitespace)
        });
        if plausible && !versions.iter().any(|v| v == line) {
            versions.push(line.to_owned());
        }
    }
    versions
}

/// The listed `VERSION-RELEASE` a request names: itself, or the last
/// listed release of `VERSION`.
pub(super) fn matching<'a>(listed: &'a [String], version: &str) -> Option<&'a str> {
    if let Some(exact) = listed.iter().find(|v| *v == version) {
        return Some(exact);
    }
    listed
        .iter()
        .rev()
        .find(|v| v.rsplit_once('-').is_some_and(|(ver, _)| ver == version))
        .map(String::as_str)
}

/// `dnf install` of `NAME-VERSION-RELEASE`: never a prompt, no weak
/// dependencies pulled in.
pub(super) fn install_args(name: &str, full: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--assumeyes",
        "--setopt=install_weak_deps=False",
        "install",
        "--",
    ]
    .map(OsString::from)
    .into();
    args.push(format!("{name}-{full}").into());
    args
}

async fn listed_versions(name: &str) -> Result<Vec<String>, PackageError> {
    let args: Vec<OsString> = [
        "--quiet",
        "repoquery",
        "--available",
        "--qf",
        "%{version}-%{release}",
        "--",
        name,
    ]
    .map(OsString::from)
    .into();
    let out = super::capture(DNF, &args).await?;
    Ok(parse_versions(&checked(DNF, &out)?))
}

/// The `VERSION-RELEASE` the repositories offer for the request, or what
/// they offer instead.
async fn find(name: &str, version: &str) -> Result<Result<String, String>, PackageError> {
    let listed = listed_versions(name).await?;
    Ok(match matching(&listed, version) {
        Some(found) => Ok(found.to_owned()),
        None if listed.is_empty() => Err(format!(
            "dnf's repositories (`dnf repoquery {name}` lists no version; is its repository configured?)"
        )),
        None => Err(format!(
            "dnf's repositories (`dnf repoquery {name}` lists {})",
            listed.join(", ")
        )),
    })
}

/// The app's package from dnf's repositories.
pub(super) struct Dnf<'a>(pub(super) &'a DnfConfig);

impl Kind for Dnf<'_> {
    async fn check_available(&self, version: Version<'_>) -> Result<(), PackageError> {
        Box::pin(check_available(self.0, version.as_str())).await
    }

    async fn prepare_restore_point(&self, _op_id: OpId<'_>) -> Result<RestorePoint, PackageError> {
        Box::pin(prepare(self.0)).await
    }

    /// Nothing is kept on disk.
    async fn abandon_restore_point(&self, _op_id: OpId<'_>) -> Result<(), PackageError> {
        Ok(())
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
        Manager::Rpm(&[])
            .installed(&self.0.name)
            .await
            .ok()?
            .version()
    }

    /// The backed-up version is installed again from the repositories.
    fn fallback(&self) -> Fallback {
        Fallback::ReinstallBackedUpVersion
    }
}

/// Preflight: the repositories offer `version` of the package.
async fn check_available(pkg: &DnfConfig, version: &str) -> Result<(), PackageError> {
    check_name(Manager::Rpm(&[]), &pkg.name)?;
    find(&pkg.name, version)
        .await?
        .map(|_| ())
        .map_err(|searched| PackageError::VersionMissing {
            name: pkg.name.clone(),
            version: version.to_owned(),
            searched,
        })
}

/// Records the installed version; refused, nothing changed, when the
/// repositories no longer offer it (a rollback could not bring it back).
async fn prepare(pkg: &DnfConfig) -> Result<RestorePoint, PackageError> {
    check_name(Manager::Rpm(&[]), &pkg.name)?;
    let version = Manager::Rpm(&[])
        .installed(&pkg.name)
        .await?
        .settled(&pkg.name)?;
    if let Some(version) = &version
        && let Err(searched) = find(&pkg.name, version).await?
    {
        return Err(PackageError::PreviousUnavailable {
            name: pkg.name.clone(),
            version: version.clone(),
            searched,
        });
    }
    Ok(RestorePoint::Dnf {
        name: pkg.name.clone(),
        version,
    })
}

/// `dnf install NAME-VERSION-RELEASE`; nothing to do when it is installed.
async fn install(
    pkg: &DnfConfig,
    version: &str,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    check_name(Manager::Rpm(&[]), &pkg.name)?;
    let full =
        find(&pkg.name, version)
            .await?
            .map_err(|searched| PackageError::VersionMissing {
                name: pkg.name.clone(),
                version: version.to_owned(),
                searched,
            })?;
    install_exactly(&pkg.name, &full, timeout, on_line).await
}

async fn install_exactly(
    name: &str,
    full: &str,
    timeout: Duration,
    on_line: OnLine<'_>,
) -> Result<(), PackageError> {
    let wanted = Installed::Yes(full.to_owned());
    if Manager::Rpm(&[]).installed(name).await? == wanted {
        return Ok(());
    }
    let args = install_args(name, full);
    let command = ProcessBuilder::new(DNF)
        .args(args)
        .envs(TOOL_ENV)
        .timeout(timeout);
    run_tool(command, on_line).await?;
    Manager::Rpm(&[]).expect(name, wanted).await
}

/// Installs the recorded version from the repositories again (up or down),
/// or removes the package when none was installed (`rpm -e`, as the rpm
/// kind does).
pub(super) async fn restore(name: &str, version: &Option<String>) -> Result<(), PackageError> {
    let Some(version) = version else {
        return Manager::Rpm(&[]).restore(name, &None, &None).await;
    };
    let log = |is_stderr: bool, line: &str| {
        tracing::info!(package = name, is_stderr, "restore: {line}");
    };
    if Manager::Rpm(&[]).installed(name).await? == Installed::Yes(version.clone()) {
        return Ok(());
    }
    if let Err(searched) = find(name, version).await? {
        return Err(PackageError::RestorePointGone {
            name: name.to_owned(),
            what: format!("{version} is no longer offered by {searched}"),
        });
    }
    install_exactly(name, version, RESTORE_TIMEOUT, &log).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repoquery_lines_give_each_version_release_once() {
        let text = "1.0-1\n2.0-1\n2.0-1\n\nUnable to detect release version\n10.2-3.el9\n";
        assert_eq!(parse_versions(text), ["1.0-1", "2.0-1", "10.2-3.el9"]);
        assert!(parse_versions("").is_empty());
        assert!(parse_versions("-1\n1.0-\n").is_empty());
    }

    #[test]
    fn a_request_names_a_version_release_or_the_last_release_of_a_version() {
        let listed: Vec<String> = ["1.0-1", "2.0-1", "2.0-2", "2.0.1-1"]
            .map(String::from)
            .into();
        assert_eq!(matching(&listed, "1.0"), Some("1.0-1"));
        assert_eq!(matching(&listed, "2.0"), Some("2.0-2"));
        assert_eq!(matching(&listed, "2.0-1"), Some("2.0-1"));
        assert_eq!(matching(&listed, "2"), None);
        assert_eq!(matching(&listed, "3.0"), None);
        assert_eq!(matching(&listed, "2.0-3"), None);
    }

    #[test]
    fn install_argv_ends_the_options_before_the_package() {
        let args = install_args("covapp", "2.0-1");
        let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(
            args,
            [
                "--assumeyes",
                "--setopt=install_weak_deps=False",
                "install",
                "--",
                "covapp-2.0-1"
            ]
        );
    }
}
