//! Real local package repositories made in the test, for the agent's `apt`
//! and `dnf` kinds: a flat `file:` apt repository indexed with
//! `apt-ftparchive` and a dnf repository indexed with `createrepo_c`, each
//! made known to the host's package manager by a uniquely named
//! `/etc/apt/sources.list.d/covet-test-*.list` or
//! `/etc/yum.repos.d/covet-test-*.repo` that is removed when the value is
//! dropped, with the lists and caches made for it. Nothing reaches the
//! network: apt's `update` reads only the test's own source.
//!
//! The packages are [`crate::syspkg`]'s (.debs and .rpms built in the
//! test); on Debian, dnf installs into rpm's own database (root's
//! `~/.rpmdb`) as the rpm kind does, so no sandbox root is needed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::syspkg::Format;

/// A kind of repository the agent takes packages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Apt,
    Dnf,
}

impl RepoKind {
    /// `package.kind` in the agent's configuration.
    pub fn kind(self) -> &'static str {
        match self {
            RepoKind::Apt => "apt",
            RepoKind::Dnf => "dnf",
        }
    }

    /// The package format the repository holds.
    pub fn format(self) -> Format {
        match self {
            RepoKind::Apt => Format::Deb,
            RepoKind::Dnf => Format::Rpm,
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            RepoKind::Apt => &[
                "/usr/bin/apt-get",
                "/usr/bin/apt-cache",
                "/usr/bin/apt-ftparchive",
            ],
            RepoKind::Dnf => &["/usr/bin/dnf", "/usr/bin/createrepo_c"],
        }
    }

    /// Why this machine cannot run real tests of this kind, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        if let Some(why) = self.format().unavailable() {
            return Some(why);
        }
        self.tools()
            .iter()
            .find(|p| !Path::new(p).exists())
            .map(|p| format!("{p} is missing"))
    }

    /// True when the test may go on; else prints "SKIPPED: why". With CI
    /// set, panics instead of skipping (`scripts/test.sh` installs
    /// `apt-utils`, `dnf` and `createrepo-c`).
    pub fn or_skip(self) -> bool {
        crate::syspkg::go_on_or_skip(self.unavailable())
    }
}

/// A local repository of the package files in `dir`, known to the host's
/// package manager until dropped.
pub struct Repo {
    pub kind: RepoKind,
    pub dir: PathBuf,
    /// The `.list` or `.repo` file that names it.
    source: PathBuf,
    id: String,
}

impl Repo {
    /// Indexes the package files in `dir` and makes the repository known
    /// (apt: and reads its index, for this source only).
    pub fn create(kind: RepoKind, dir: &Path) -> anyhow::Result<Repo> {
        let id = format!("covet-test-{}", unique_suffix());
        // apt reads a `file:` source as its `_apt` user where it can.
        for open in [dir, dir.parent().unwrap_or(dir)] {
            fs::set_permissions(open, fs::Permissions::from_mode(0o755))?;
        }
        let dir = dir.canonicalize()?;
        let source = match kind {
            RepoKind::Apt => PathBuf::from(format!("/etc/apt/sources.list.d/{id}.list")),
            RepoKind::Dnf => {
                fs::create_dir_all("/etc/yum.repos.d")?;
                PathBuf::from(format!("/etc/yum.repos.d/{id}.repo"))
            }
        };
        let text = match kind {
            RepoKind::Apt => format!("deb [trusted=yes] file:{} ./\n", dir.display()),
            // metadata_expire=0: every query sees what `refresh` indexed.
            RepoKind::Dnf => format!(
                "[{id}]\nname=covet test repository\nbaseurl=file://{}\ngpgcheck=0\nenabled=1\nmetadata_expire=0\n",
                dir.display()
            ),
        };
        let repo = Repo {
            kind,
            dir,
            source,
            id,
        };
        fs::write(&repo.source, text)
            .with_context(|| format!("write {}", repo.source.display()))?;
        repo.refresh()?;
        Ok(repo)
    }

    /// Indexes the package files again (after some were added or removed)
    /// and, for apt, updates the package lists of this source only.
    pub fn refresh(&self) -> anyhow::Result<()> {
        match self.kind {
            RepoKind::Apt => {
                for (what, file) in [("packages", "Packages"), ("release", "Release")] {
                    // Release is made last, from the Packages just written.
                    let out = Command::new("/usr/bin/apt-ftparchive")
                        .args([what, "."])
                        .current_dir(&self.dir)
                        .output()
                        .context("run apt-ftparchive")?;
                    let index = checked("apt-ftparchive", out)?;
                    fs::write(self.dir.join(file), index)?;
                }
                let out = Command::new("/usr/bin/apt-get")
                    .args(["update", "-q", "-o"])
                    .arg(format!("Dir::Etc::sourcelist={}", self.source.display()))
                    .args([
                        "-o",
                        "Dir::Etc::sourceparts=-",
                        "-o",
                        "APT::Get::List-Cleanup=0",
                    ])
                    .output()
                    .context("run apt-get update")?;
                checked("apt-get update of the test source", out)?;
            }
            RepoKind::Dnf => {
                let out = Command::new("/usr/bin/createrepo_c")
                    .arg("--quiet")
                    .arg(&self.dir)
                    .output()
                    .context("run createrepo_c")?;
                checked("createrepo_c", out)?;
                // dnf may trust its copy of an index made the same second.
                self.forget_caches();
            }
        }
        Ok(())
    }

    /// Apt's name for this source's lists in `/var/lib/apt/lists/`: the
    /// URI with `/` as `_`.
    fn apt_lists_prefix(&self) -> String {
        format!("{}/./", self.dir.display()).replace('/', "_")
    }
}

impl Repo {
    /// Removes the lists (apt) or metadata caches (dnf) made for this
    /// repository.
    fn forget_caches(&self) {
        let (cache, prefix) = match self.kind {
            RepoKind::Apt => ("/var/lib/apt/lists", self.apt_lists_prefix()),
            RepoKind::Dnf => ("/var/cache/dnf", format!("{}-", self.id)),
        };
        let Ok(entries) = fs::read_dir(cache) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                let _ = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
            }
        }
        // dnf keeps a solv file per repository beside the metadata.
        for solv in ["solv", "solvx"] {
            let _ = fs::remove_file(format!("/var/cache/dnf/{}.{solv}", self.id));
            let _ = fs::remove_file(format!("/var/cache/dnf/{}-filenames.{solv}", self.id));
        }
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.source);
        self.forget_caches();
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

fn checked(what: &str, out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
