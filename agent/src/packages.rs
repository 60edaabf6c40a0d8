//! The app's package: which version is installed (and, with the upgrade
//! workflow, how to swap it).

use std::path::Path;
use std::time::Duration;

use crate::config::{AppConfig, PackageConfig, PackageKind};

const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// The installed version of the app's package, when one is declared and found.
pub async fn installed_version(app: &AppConfig) -> Option<String> {
    let pkg = app.package.as_ref()?;
    match pkg.kind {
        PackageKind::Pip => pip_version(pkg),
        PackageKind::Release => release_version(pkg),
        PackageKind::Deb => query("/usr/bin/dpkg-query", &["-W", "-f=${Version}", &pkg.name]).await,
        PackageKind::Rpm => {
            query(
                "/usr/bin/rpm",
                &["-q", "--qf", "%{VERSION}-%{RELEASE}", &pkg.name],
            )
            .await
        }
    }
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

/// Reads the version from `venv/lib/python*/site-packages/NAME-VERSION.dist-info`.
fn pip_version(pkg: &PackageConfig) -> Option<String> {
    let venv = pkg.venv.as_deref()?;
    let want = normalize(&pkg.name);
    for lib in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
        let site = lib.path().join("site-packages");
        let Ok(entries) = std::fs::read_dir(&site) else {
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

/// The release the `current` symlink points at.
fn release_version(pkg: &PackageConfig) -> Option<String> {
    let target = std::fs::read_link(pkg.current.as_deref()?).ok()?;
    Path::new(&target)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

async fn query(program: &str, args: &[&str]) -> Option<String> {
    let output = tokio::time::timeout(
        QUERY_TIMEOUT,
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_pep_503() {
        assert_eq!(normalize("CovetPy"), "covetpy");
        assert_eq!(normalize("covet-py.core"), "covet_py_core");
        assert_eq!(normalize("a__b"), "a_b");
    }
}
