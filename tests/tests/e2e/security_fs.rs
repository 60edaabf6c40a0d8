//! File-system attacks on a real agent (issue #11 items 1, 10, 13): a local
//! user racing symlinks into a restore's staging area, a release artifact
//! with a setuid root binary and a sparse bomb, and symlinks planted in a
//! backup directory in place of an archive.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use covet_tests::agent::TestAgent;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;

/// The unprivileged attacker.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An app with one declared path, `parent/app`, whose parent every user may
/// write; and a sentinel directory outside it that nothing may touch.
struct World {
    agent: TestAgent,
    parent: PathBuf,
    sentinel: PathBuf,
    _dir: tempfile::TempDir,
}

async fn world(name: &str) -> World {
    let dir = sandbox_dir(name);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let parent = dir.path().join("shared");
    let app = parent.join("app");
    std::fs::create_dir_all(app.join("lib/deep")).unwrap();
    std::fs::write(app.join("lib/deep/code.py"), "print('v1')\n").unwrap();
    std::fs::write(app.join("settings.ini"), "a = 1\n").unwrap();
    // Enough entries that each extraction leaves the racer a wide window.
    for i in 0..600 {
        std::fs::write(app.join(format!("lib/deep/m{i}.py")), "x = 1\n").unwrap();
    }
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sentinel = dir.path().join("sentinel");
    std::fs::create_dir_all(sentinel.join("inner")).unwrap();
    std::fs::write(sentinel.join("keep"), "sentinel\n").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = format!(
        r#"
[backup]
free_space_reserve_bytes = 0
[[app]]
name = "covet"
unit = "covet.service"
paths = ["{app}"]
"#,
        app = app.display()
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = TestAgent::start_with_toml(&agent_dir, toml).await;
    World {
        agent,
        parent,
        sentinel,
        _dir: dir,
    }
}

/// Names, owners, modes and contents of everything under `dir`.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mut line = format!(
            "{} {}:{} {:o} {}",
            path.display(),
            meta.uid(),
            meta.gid(),
            meta.mode(),
            meta.len()
        );
        if meta.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            line.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
        }
        out.push(line);
    }
    out.sort();
    out
}

fn backup_files_only(agent: &TestAgent) -> String {
    let out = agent.ctl(
        "operator",
        &["-o", "json", "backup", "create", "covet", "--no-db"],
    );
    let op = out.assert_ok().json();
    op["backup_id"].as_str().unwrap().to_owned()
}

/// Runs `script` (Python) as nobody, with `args`.
fn as_nobody(script: &str, args: &[&Path]) -> Child {
    Command::new("/usr/bin/setpriv")
        .args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .args(args)
        .spawn()
        .unwrap()
}

/// Keeps replacing every dot-entry of the parent (staging, before- and
/// temp names) and every directory it can reach inside them with symlinks
/// to the sentinel, and plants links under guessable names, for `secs`.
const RACER: &str = r#"
import os, sys, time
parent, sentinel, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + secs
n = 0
while time.time() < end:
    for guess in (".app.restore", ".app.restore-x", ".app.before"):
        try: os.symlink(sentinel, os.path.join(parent, guess))
        except OSError: pass
    try: names = os.listdir(parent)
    except OSError: continue
    for name in names:
        if not name.startswith("."): continue
        p = os.path.join(parent, name)
        if os.path.islink(p): continue
        try:
            os.rename(p, p + ".moved%d" % n); n += 1
            os.symlink(sentinel, p)
        except OSError: pass
        for sub in ("app", "app/lib", "app/lib/deep"):
            q = os.path.join(p + ".moved%d" % (n - 1), sub)
            try:
                os.rename(q, q + ".x"); os.symlink(sentinel, q)
            except OSError: pass
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_racing_symlinks_in_the_parent_never_touches_anything_outside() {
    if !is_root() {
        eprintln!("skipped: needs root to run the attacker as another user");
        return;
    }
    let w = world("fs-race").await;
    let id = backup_files_only(&w.agent);
    let sentinel_before = snapshot(&w.sentinel);
    let app = w.parent.join("app");
    let started = Instant::now();
    let mut racer = as_nobody(RACER, &[&w.parent, &w.sentinel, Path::new("4")]);
    let mut outcomes = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        std::fs::write(app.join("settings.ini"), "changed\n").ok();
        let out = w.agent.ctl(
            "admin",
            &["-o", "json", "backup", "restore", &id, "--files-only"],
        );
        outcomes.push(out.code);
        if out.code == 0 {
            // Succeeded: the target holds exactly the backup.
            assert_eq!(
                std::fs::read_to_string(app.join("settings.ini")).unwrap(),
                "a = 1\n"
            );
            assert_eq!(
                std::fs::read_to_string(app.join("lib/deep/code.py")).unwrap(),
                "print('v1')\n"
            );
        } else {
            // Failed cleanly: an operation that says why.
            assert!(
                out.stdout.contains("failed") || !out.stderr.is_empty(),
                "{}",
                out.stdout
            );
        }
    }
    let _ = racer.wait();
    assert!(!outcomes.is_empty());
    assert_eq!(
        snapshot(&w.sentinel),
        sentinel_before,
        "the sentinel changed; outcomes {outcomes:?}"
    );
    // Nothing root-owned or chowned was left for the attacker to use.
    for e in std::fs::read_dir(&w.parent).unwrap() {
        let e = e.unwrap();
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() && meta.uid() == NOBODY {
            panic!(
                "{} is a directory owned by the attacker",
                e.path().display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_refuse_symlinks_planted_in_a_backup_directory() {
    let w = world("fs-download").await;
    // check-config warns about the parent every user can write, and passes.
    let out = Command::new(covet_tests::bin("covet-agent"))
        .arg("check-config")
        .arg("--config")
        .arg(&w.agent.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: app[0].paths[0]")
            && stderr.contains(&w.parent.display().to_string())
            && stderr.contains("every user"),
        "{stderr}"
    );
    let id = backup_files_only(&w.agent);
    let backup = w.agent.dir.join("backups/covet").join(&id);
    let archive = std::fs::read_dir(&backup)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("00-"))
        .unwrap();
    let secret = w.sentinel.join("shadow");
    std::fs::write(&secret, "root:SECRET-HASH:19000::::::\n").unwrap();
    std::fs::remove_file(backup.join(&archive)).unwrap();
    std::os::unix::fs::symlink(&secret, backup.join(&archive)).unwrap();

    let to = w.agent.dir.join("one.out");
    let out = w.agent.ctl(
        "admin",
        &[
            "backup",
            "download",
            &id,
            "--file",
            &archive,
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("symlink"), "{}", out.stderr);
    assert!(
        !std::fs::read(&to)
            .unwrap_or_default()
            .windows(11)
            .any(|w| w == b"SECRET-HASH"),
        "bytes of the link's target leaked"
    );

    let whole = w.agent.dir.join("whole.tar");
    let out = w.agent.ctl(
        "admin",
        &["backup", "download", &id, "--to", whole.to_str().unwrap()],
    );
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("symlink"), "{}", out.stderr);
    assert!(
        !std::fs::read(&whole)
            .unwrap_or_default()
            .windows(11)
            .any(|w| w == b"SECRET-HASH"),
        "bytes of the link's target leaked"
    );
    // Over gRPC: FAILED_PRECONDITION, before any byte is streamed.
    let mut client = covet_proto::v1::backup_service_client::BackupServiceClient::new(
        w.agent.channel("admin").await,
    );
    for file in [archive.as_str(), ""] {
        let status = client
            .download_backup(covet_proto::v1::DownloadBackupRequest {
                id: id.clone(),
                file: file.to_owned(),
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("symlink"), "{}", status.message());
    }
}

/// A release tarball `relapp-VERSION.tar` (GNU format, sparse-aware) with a
/// healthy server, a setuid-root `bin/helper`, and a sparse file of
/// apparent size `sparse_bytes`.
fn make_release(repo: &Path, version: &str, sparse_bytes: u64) {
    let work = repo.join(format!("build-{version}"));
    let tree = work.join(format!("relapp-{version}"));
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(
        tree.join("server.py"),
        r#"import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"status": "ok"}')
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#,
    )
    .unwrap();
    std::fs::write(tree.join("bin/helper"), "#!/bin/sh\nid\n").unwrap();
    std::fs::set_permissions(
        tree.join("bin/helper"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let sparse = std::fs::File::create(tree.join("data.bin")).unwrap();
    sparse.set_len(sparse_bytes).unwrap();
    let out = Command::new("tar")
        .args(["--format=gnu", "--sparse", "--owner=0", "--group=0", "-cf"])
        .arg(repo.join(format!("relapp-{version}.tar")))
        .arg("-C")
        .arg(&work)
        .arg(format!("relapp-{version}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&work).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_artifacts_lose_setuid_belong_to_the_app_user_and_bombs_are_refused() {
    if !is_root() {
        return;
    }
    let dir = sandbox_dir("fs-release");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let root = dir.path().join("srv");
    let repo = root.join("repo");
    let releases = root.join("releases");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(releases.join("1.0")).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    make_release(&repo, "2.0", 64 << 20);
    // Apparent size beyond any free space here; a few KiB on disk.
    let free = {
        // SAFETY: an all-zero statvfs is a valid out-value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(root.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    };
    make_release(&repo, "3.0", (free + (1 << 30)).min(15 << 40));
    let current = root.join("current");
    let port = covet_tests::free_port();
    std::fs::write(
        releases.join("1.0/server.py"),
        "import http.server, os\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200); self.end_headers(); self.wfile.write(b'{\"status\": \"ok\"}')\nhttp.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(releases.join("1.0"), &current).unwrap();
    sandbox
        .install_unit(
            "relapp.service",
            &format!(
                "[Service]\nExecStart=/usr/bin/python3 -u {}/server.py\nEnvironment=PORT={port}\n",
                current.display()
            ),
        )
        .unwrap();
    assert!(
        sandbox
            .systemctl(&["start", "relapp.service"])
            .status
            .success()
    );
    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
settle = "300ms"
[[app]]
name = "relapp"
unit = "relapp.service"
user = "nobody"
paths = ["{current}"]
[app.package]
kind = "release"
name = "relapp"
releases_dir = "{releases}"
current = "{current}"
repo_dir = "{repo}"
[app.health]
url = "http://127.0.0.1:{port}/health"
timeout = "1s"
retries = 10
interval = "250ms"
json_field = "status"
json_value = "ok"
"#,
        bus = sandbox.bus_address(),
        journal = sandbox.journal_dir().display(),
        current = current.display(),
        releases = releases.display(),
        repo = repo.display(),
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;

    let out = agent.ctl(
        "operator",
        &["-o", "json", "upgrade", "relapp", "--to", "2.0"],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let helper = std::fs::metadata(releases.join("2.0/bin/helper")).unwrap();
    assert_eq!(
        helper.mode() & 0o7777,
        0o755,
        "setuid and setgid are dropped"
    );
    assert_eq!(
        (helper.uid(), helper.gid()),
        (NOBODY, 65534),
        "owned by the app's user"
    );
    for d in ["2.0", "2.0/bin"] {
        assert_eq!(
            std::fs::metadata(releases.join(d)).unwrap().uid(),
            NOBODY,
            "{d}"
        );
    }
    let data = std::fs::metadata(releases.join("2.0/data.bin")).unwrap();
    assert_eq!(data.len(), 64 << 20);
    assert!(
        data.blocks() * 512 < 1 << 20,
        "holes stay holes: {} blocks",
        data.blocks()
    );

    let started = Instant::now();
    let out = agent.ctl(
        "operator",
        &["-o", "json", "upgrade", "relapp", "--to", "3.0"],
    );
    assert_ne!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(started.elapsed() < Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("apparent size") && text.contains("free"),
        "{text}"
    );
    assert!(!releases.join("3.0").exists(), "nothing unpacked");
    let stray: Vec<String> = std::fs::read_dir(&releases)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert_eq!(std::fs::read_link(&current).unwrap(), releases.join("2.0"));
}
