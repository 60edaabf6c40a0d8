//! Tiny real .deb packages of a test app, built with `dpkg-deb --build`:
//! `/opt/NAME/VERSION`, `/opt/NAME/server.py` (an HTTP server whose
//! `/health` answers its version, or 500 when built broken) and a conffile
//! `/etc/NAME/app.conf`. [`Installed`] purges the package when dropped, even
//! on panic; [`dpkg_lock`] keeps tests that run dpkg from colliding.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Why this machine cannot run real dpkg tests, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("dpkg -i needs root".to_owned());
    }
    ["/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-query"]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| format!("{p} is missing"))
}

/// True when the test may go on; else prints "SKIPPED: why". With CI set,
/// panics instead of skipping.
pub fn deb_or_skip() -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(!ci, "CI is set, so this is a failure, not a skip: {why}");
    eprintln!("SKIPPED: {why}");
    false
}

/// A package name no other test run uses.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Held for a whole test: dpkg takes one lock for the machine, and tests run
/// in parallel processes.
pub fn dpkg_lock() -> File {
    let file = File::create("/tmp/covet-tests-dpkg.lock").expect("create the test dpkg lock");
    // SAFETY: `file` is an open descriptor for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    file
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

/// The conffile a package of `version` ships.
pub fn conffile_text(version: &str) -> String {
    format!("# shipped by {version}\ngreeting = hello\n")
}

/// Builds `repo/NAME_VERSION_all.deb` (staging its tree under `work`).
pub fn build(
    work: &Path,
    repo: &Path,
    name: &str,
    version: &str,
    broken: bool,
) -> anyhow::Result<PathBuf> {
    let tree = work.join(format!("{name}_{version}"));
    let opt = tree.join("opt").join(name);
    let etc = tree.join("etc").join(name);
    for dir in [tree.join("DEBIAN"), opt.clone(), etc.clone()] {
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
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
    fs::write(opt.join("VERSION"), version)?;
    fs::write(opt.join("server.py"), server_script(version, broken))?;
    fs::write(etc.join("app.conf"), conffile_text(version))?;
    fs::create_dir_all(repo)?;
    let deb = repo.join(format!("{name}_{version}_all.deb"));
    let out = Command::new("/usr/bin/dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .context("run dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --build {}: {}",
            tree.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(deb)
}

/// `dpkg -i FILE`, as an operator would have done before the agent.
pub fn dpkg_install(deb: &Path) -> anyhow::Result<()> {
    let out = Command::new("/usr/bin/dpkg")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-i")
        .arg(deb)
        .output()
        .context("run dpkg")?;
    if !out.status.success() {
        bail!(
            "dpkg -i {}: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What dpkg says is installed: `Some(version)` only when fully installed.
pub fn dpkg_version(name: &str) -> Option<String> {
    let out = Command::new("/usr/bin/dpkg-query")
        .args(["-W", "-f=${db:Status-Status} ${Version}", "--", name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("installed ").map(str::to_owned)
}

/// Purges package `0` when dropped, so a failed test leaves nothing behind.
pub struct Installed(pub String);

impl Drop for Installed {
    fn drop(&mut self) {
        let out = Command::new("/usr/bin/dpkg")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["--purge", "--", &self.0])
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "dpkg --purge {}: {}",
                self.0,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("dpkg --purge {}: {e}", self.0),
        }
    }
}
