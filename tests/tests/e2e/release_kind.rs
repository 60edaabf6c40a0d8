//! The `release` package kind end to end: releases unpacked into
//! `releases/VERSION`, the `current` symlink swapped atomically, and swapped
//! back by the automatic rollback when the new release is unhealthy.

use std::path::Path;
use std::time::Duration;

use covet_tests::agent::TestAgent;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;

const UNIT: &str = "relapp.service";

/// A release tarball `relapp-VERSION.tar.gz` holding `relapp-VERSION/server.py`,
/// which serves /health with its version (500 when `healthy` is false).
fn make_release(repo: &Path, version: &str, healthy: bool) {
    let work = repo.join(format!("build-{version}"));
    let tree = work.join(format!("relapp-{version}"));
    std::fs::create_dir_all(&tree).unwrap();
    let status = if healthy { 200 } else { 500 };
    std::fs::write(
        tree.join("server.py"),
        format!(
            r#"import http.server, json, os, sys
VERSION = "{version}"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"status": "ok" if {status} == 200 else "error", "version": VERSION}}).encode()
        self.send_response({status})
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("relapp", VERSION, "serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#
        ),
    )
    .unwrap();
    let out = std::process::Command::new("tar")
        .arg("-czf")
        .arg(repo.join(format!("relapp-{version}.tar.gz")))
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

fn version_served(port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body: serde_json::Value = serde_json::from_str(out.split("\r\n\r\n").nth(1)?).ok()?;
    Some((status, body["version"].as_str()?.to_owned()))
}

async fn wait_serving(port: u16, version: &str) {
    for _ in 0..100 {
        if version_served(port) == Some((200, version.to_owned())) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{version} is not serving: {:?}", version_served(port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_upgrade_swaps_current_and_rolls_back_by_swapping_it_back() {
    let dir = sandbox_dir("release");
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let root = dir.path().join("srv");
    let repo = root.join("repo");
    let releases = root.join("releases");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&releases).unwrap();
    make_release(&repo, "1.0", true);
    make_release(&repo, "2.0", true);
    make_release(&repo, "3.0", false);
    // 1.0 is installed by hand, as an operator would have.
    let out = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(repo.join("relapp-1.0.tar.gz"))
        .arg("-C")
        .arg(&releases)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::rename(releases.join("relapp-1.0"), releases.join("1.0")).unwrap();
    let current = root.join("current");
    std::os::unix::fs::symlink(releases.join("1.0"), &current).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    sandbox
        .install_unit(
            UNIT,
            &format!(
                "[Service]\nExecStart=/usr/bin/python3 -u {}/server.py\nEnvironment=PORT={port}\n",
                current.display()
            ),
        )
        .unwrap();
    assert!(sandbox.systemctl(&["start", UNIT]).status.success());
    wait_serving(port, "1.0").await;

    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
settle = "500ms"
[[app]]
name = "relapp"
unit = "{UNIT}"
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
retries = 8
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
    assert_eq!(out.json()["params"]["from_version"], "1.0");
    wait_serving(port, "2.0").await;
    assert_eq!(std::fs::read_link(&current).unwrap(), releases.join("2.0"));
    assert!(
        releases.join("1.0/server.py").exists(),
        "earlier releases stay for a quick way back"
    );

    let out = agent.ctl(
        "operator",
        &["-o", "json", "upgrade", "relapp", "--to", "3.0"],
    );
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    let op = out.json();
    assert_eq!(op["state"], "rolled_back");
    wait_serving(port, "2.0").await;
    assert_eq!(
        std::fs::read_link(&current).unwrap(),
        releases.join("2.0"),
        "current points back at 2.0"
    );
    // No temporary links or staging trees are left behind.
    let stray: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .chain(std::fs::read_dir(&releases).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.contains(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // `covetctl rollback` undoes the last succeeded upgrade (1.0 -> 2.0):
    // the link goes back, nothing is unpacked.
    let out = agent.ctl("operator", &["-o", "json", "rollback", "relapp"]);
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    assert_eq!(out.json()["state"], "succeeded");
    wait_serving(port, "1.0").await;
    assert_eq!(std::fs::read_link(&current).unwrap(), releases.join("1.0"));
    let out = agent.ctl("operator", &["rollback", "relapp"]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("no successful upgrade"),
        "{}",
        out.stderr
    );

    // Going forward again and then back when the old tree was removed: the
    // release comes back from its artifact.
    let out = agent.ctl(
        "operator",
        &["-o", "json", "upgrade", "relapp", "--to", "2.0"],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    wait_serving(port, "2.0").await;
    std::fs::remove_dir_all(releases.join("1.0")).unwrap();
    let out = agent.ctl("operator", &["-o", "json", "rollback", "relapp"]);
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    wait_serving(port, "1.0").await;
    assert_eq!(std::fs::read_link(&current).unwrap(), releases.join("1.0"));
    let _ = sandbox.systemctl(&["stop", UNIT]);
}
