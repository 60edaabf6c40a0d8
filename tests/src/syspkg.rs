//! Tiny real system packages of a test app, in either format: .debs built
//! with `dpkg-deb --build`, .rpms with `rpmbuild`. Each ships
//! `/opt/NAME/VERSION`, `/opt/NAME/server.py` (an HTTP server whose
//! `/health` answers its version, or 500 when built broken) and a config file
//! `/etc/NAME/app.conf` (a dpkg conffile; rpm `%config(noreplace)`).
//! [`Installed`] removes the package when dropped, even on panic; [`lock`]
//! keeps tests that use the same package database from colliding.
//!
//! On Debian, rpm keeps its own database (root's `~/.rpmdb`), apart from
//! dpkg's: installing a dependency-free test rpm there touches only `/opt`
//! and `/etc` paths named after the unique package.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A package format the agent swaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Deb,
    Rpm,
}

impl Format {
    /// `package.kind` in the agent's configuration.
    pub fn kind(self) -> &'static str {
        match self {
            Format::Deb => "deb",
            Format::Rpm => "rpm",
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Format::Deb => &["/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-query"],
            Format::Rpm => &["/usr/bin/rpm", "/usr/bin/rpmbuild"],
        }
    }

    /// Why this machine cannot run real tests of this format, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some(format!("installing a .{} needs root", self.kind()));
        }
        self.tools()
            .iter()
            .find(|p| !Path::new(p).exists())
            .map(|p| format!("{p} is missing"))
    }

    /// True when the test may go on; else prints "SKIPPED: why". With CI
    /// set, panics instead of skipping (`scripts/test.sh` installs `rpm`).
    pub fn or_skip(self) -> bool {
        go_on_or_skip(self.unavailable())
    }

    /// Held for a whole test: a package database takes one lock for the
    /// machine, and tests run in parallel processes.
    pub fn lock(self) -> File {
        let path = format!("/tmp/covet-tests-{}.lock", self.kind());
        let file = File::create(&path).expect("create the test package lock");
        // SAFETY: `file` is an open descriptor for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
        file
    }

    /// The file name `build` gives the package of `version`.
    pub fn file_name(self, name: &str, version: &str) -> String {
        match self {
            Format::Deb => format!("{name}_{version}_all.deb"),
            Format::Rpm => format!("{name}-{version}-1.noarch.rpm"),
        }
    }

    /// How the package database spells `version` once installed (rpm adds
    /// the release).
    pub fn full_version(self, version: &str) -> String {
        match self {
            Format::Deb => version.to_owned(),
            Format::Rpm => format!("{version}-1"),
        }
    }

    /// Builds `repo/`[`Format::file_name`] (staging its tree under `work`).
    pub fn build(
        self,
        work: &Path,
        repo: &Path,
        name: &str,
        version: &str,
        broken: bool,
    ) -> anyhow::Result<PathBuf> {
        let tree = work.join(format!("{name}_{version}.{}", self.kind()));
        let opt = tree.join("opt").join(name);
        let etc = tree.join("etc").join(name);
        for dir in [opt.clone(), etc.clone()] {
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        fs::write(opt.join("VERSION"), version)?;
        fs::write(opt.join("server.py"), server_script(version, broken))?;
        fs::write(etc.join("app.conf"), conffile_text(version))?;
        fs::create_dir_all(repo)?;
        let file = repo.join(self.file_name(name, version));
        match self {
            Format::Deb => build_deb(&tree, name, version, &file)?,
            Format::Rpm => build_rpm(work, &tree, name, version, &file)?,
        }
        Ok(file)
    }

    /// Installs a package file as an operator would have before the agent.
    pub fn install(self, file: &Path) -> anyhow::Result<()> {
        let mut cmd = match self {
            Format::Deb => {
                let mut c = Command::new("/usr/bin/dpkg");
                c.env("DEBIAN_FRONTEND", "noninteractive").arg("-i");
                c
            }
            Format::Rpm => {
                let mut c = Command::new("/usr/bin/rpm");
                c.arg("-U");
                c
            }
        };
        let out = cmd.arg(file).output().context("run the package manager")?;
        if !out.status.success() {
            bail!(
                "installing {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// What the package database says is installed, spelled as given to
    /// `build`: `Some(version)` only when fully installed.
    pub fn installed_version(self, name: &str) -> Option<String> {
        match self {
            Format::Deb => {
                let out = Command::new("/usr/bin/dpkg-query")
                    .args(["-W", "-f=${db:Status-Status} ${Version}", "--", name])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.strip_prefix("installed ").map(str::to_owned)
            }
            Format::Rpm => {
                let out = Command::new("/usr/bin/rpm")
                    .args(["-q", "--qf", "%{VERSION}\n", "--", name])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                // Two lines when two versions are installed: not settled.
                let lines: Vec<&str> = text.lines().collect();
                match (out.status.success(), lines.as_slice()) {
                    (true, [one]) => Some((*one).to_owned()),
                    _ => None,
                }
            }
        }
    }
}

/// A package name no other test run uses.
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn build_deb(tree: &Path, name: &str, version: &str, file: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(tree.join("DEBIAN"))?;
    fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: covet tests <tests@covet.invalid>\nDescription: covet-agent deb backend test app\n"
        ),
    )?;
    fs::write(
        tree.join("DEBIAN/conffiles"),
        format!("/etc/{name}/app.conf\n"),
    )?;
    let out = Command::new("/usr/bin/dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(tree)
        .arg(file)
        .output()
        .context("run dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --build {}: {}",
            tree.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The spec copies the staged tree; `AutoReqProv: no` keeps the package free
/// of dependencies, which Debian's empty rpm database could not satisfy.
const RPM_SPEC: &str = "Name: %{pkgname}
Version: %{ver}
Release: 1
Summary: covet-agent rpm backend test app
License: MIT
BuildArch: noarch
AutoReqProv: no

%description
covet-agent rpm backend test app

%install
cp -a %{tree}/. %{buildroot}/

%files
%defattr(-,root,root,-)
/opt/%{pkgname}
%config(noreplace) /etc/%{pkgname}/app.conf
";

fn build_rpm(
    work: &Path,
    tree: &Path,
    name: &str,
    version: &str,
    file: &Path,
) -> anyhow::Result<()> {
    let spec = work.join(format!("{name}-{version}.spec"));
    fs::write(&spec, RPM_SPEC)?;
    let top = work.join(format!("rpmbuild-{version}"));
    let out = Command::new("/usr/bin/rpmbuild")
        .args(["-bb", "--quiet"])
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("--define")
        .arg(format!("pkgname {name}"))
        .arg("--define")
        .arg(format!("ver {version}"))
        .arg("--define")
        .arg(format!("tree {}", tree.display()))
        .arg(&spec)
        .output()
        .context("run rpmbuild")?;
    if !out.status.success() {
        bail!(
            "rpmbuild {}: {}",
            spec.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built = top
        .join("RPMS/noarch")
        .join(Format::Rpm.file_name(name, version));
    fs::copy(&built, file).with_context(|| format!("copy {}", built.display()))?;
    Ok(())
}

const SERVER: &str = r#"import http.server, json, sys
VERSION = "@VERSION@"
BROKEN = @BROKEN@

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            code = 500 if BROKEN else 200
            body = {"status": "broken" if BROKEN else "ok", "version": VERSION}
        else:
            code, body = 404, {"error": "not found"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// The server script a package of `version` ships.
pub fn server_script(version: &str, broken: bool) -> String {
    SERVER
        .replace("@VERSION@", version)
        .replace("@BROKEN@", if broken { "True" } else { "False" })
}

/// The config file a package of `version` ships.
pub fn conffile_text(version: &str) -> String {
    format!("# shipped by {version}\ngreeting = hello\n")
}

/// Removes package `name` when dropped (dpkg: purges), so a failed test
/// leaves nothing behind.
pub struct Installed {
    pub format: Format,
    pub name: String,
}

impl Installed {
    /// A package name no other test run uses, starting with `prefix`,
    /// removed when this is dropped.
    pub fn unique(format: Format, prefix: &str) -> Installed {
        Installed {
            format,
            name: unique_name(prefix),
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = match self.format {
            Format::Deb => Command::new("/usr/bin/dpkg")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["--purge", "--", &self.name])
                .output(),
            Format::Rpm => Command::new("/usr/bin/rpm")
                .args(["-e", "--allmatches", "--", &self.name])
                .output(),
        };
        match out {
            Ok(out) if out.status.success() => {}
            // A test that failed before installing anything.
            Ok(out) if String::from_utf8_lossy(&out.stderr).contains("is not installed") => {}
            Ok(out) => eprintln!(
                "removing {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("removing {}: {e}", self.name),
        }
        // rpm -e keeps an edited %config(noreplace) file as .rpmsave.
        let _ = fs::remove_dir_all(Path::new("/etc").join(&self.name));
        let _ = fs::remove_dir_all(Path::new("/opt").join(&self.name));
    }
}

/// True when `why` is None; else prints "SKIPPED: why", or, with CI set,
/// panics: CI installs every tool, so a missing one is a failure.
pub fn go_on_or_skip(why: Option<String>) -> bool {
    let Some(why) = why else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(!ci, "CI is set, so this is a failure, not a skip: {why}");
    eprintln!("SKIPPED: {why}");
    false
}
