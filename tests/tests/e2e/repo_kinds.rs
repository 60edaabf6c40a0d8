//! The `apt` and `dnf` package kinds for real: tiny packages of a test app
//! (`syspkg`) served by a real local repository made in the test
//! (`repos`: apt-ftparchive, createrepo_c), installed on this throwaway
//! machine through a real agent and a real systemd unit. For each kind:
//! an unknown version refused by preflight, an upgrade 1.0 -> 2.0, a broken
//! 3.0 rolled back by itself to 2.0, `covetctl rollback` to 1.0, and an
//! upgrade refused while the installed version could not be brought back;
//! for apt also a held dpkg lock waited for and a rollback from the kept
//! .deb after the repository dropped the version.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use covet_tests::agent::TestAgent;
use covet_tests::http::wait_healthy;
use covet_tests::repos::{Repo, RepoKind};
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;
use covet_tests::syspkg::{self, Installed};

const UNIT: &str = "repoapp.service";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_upgrade_rollback_and_refusals_through_the_agent() {
    upgrade_then_roll_back_through_the_agent(RepoKind::Apt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnf_upgrade_rollback_and_refusals_through_the_agent() {
    upgrade_then_roll_back_through_the_agent(RepoKind::Dnf).await;
}

/// Another process holds dpkg's frontend lock (as apt does) for `secs`;
/// returns once it holds it.
fn hold_dpkg_lock(dir: &Path, secs: u32) -> std::process::Child {
    let ready = dir.join("locked");
    let holder = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import fcntl, sys, time\n\
             f = open('/var/lib/dpkg/lock-frontend', 'w')\n\
             fcntl.lockf(f, fcntl.LOCK_EX)\n\
             open(sys.argv[1], 'w').close()\n\
             time.sleep(float(sys.argv[2]))",
        ])
        .arg(&ready)
        .arg(secs.to_string())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !ready.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no lock taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    holder
}

async fn upgrade_then_roll_back_through_the_agent(kind: RepoKind) {
    if !kind.or_skip() {
        return;
    }
    let format = kind.format();
    let dir = sandbox_dir(&format!("{}repo-e2e", kind.kind()));
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    // The same package database as the deb / rpm tests.
    let _lock = format.lock();
    let (work, repo_dir, keep) = (
        dir.path().join("work"),
        dir.path().join("repo"),
        dir.path().join("keep"),
    );
    let package = Installed::unique(format, &format!("covet-{}app", kind.kind()));
    let name = package.name.clone();
    for (version, broken) in [("1.0", false), ("2.0", false), ("3.0", true)] {
        format
            .build(&work, &repo_dir, &name, version, broken)
            .unwrap();
    }
    let repo = Repo::create(kind, &repo_dir).unwrap();
    // Installed by hand before the agent (so apt's cache has no copy).
    format
        .install(&repo_dir.join(format.file_name(&name, "1.0")))
        .unwrap();
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));
    // The operator's edit of the shipped config file survives every swap.
    let conf = Path::new("/etc").join(&name).join("app.conf");
    let edited = "# edited by the operator\ngreeting = hi\n";
    fs::write(&conf, edited).unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("notes.txt"), "kept by the backup\n").unwrap();

    let port = covet_tests::free_port();
    sandbox
        .install_unit(
            UNIT,
            &format!(
                "[Unit]\nDescription=covet-agent repository kind test app\n\n[Service]\nType=simple\n\
                 ExecStart=/usr/bin/python3 /opt/{name}/server.py {port}\nRestart=no\n"
            ),
        )
        .unwrap();
    let out = sandbox.systemctl(&["start", UNIT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_healthy(port, "1.0").await;

    let keep_line = match kind {
        RepoKind::Apt => format!("keep_dir = \"{}\"\n", keep.display()),
        RepoKind::Dnf => String::new(),
    };
    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
settle = "500ms"

[[app]]
name = "repoapp"
unit = "{UNIT}"
paths = ["{data}"]

[app.package]
kind = "{kind}"
name = "{name}"
{keep_line}
[app.health]
url = "http://127.0.0.1:{port}/health"
timeout = "2s"
retries = 8
interval = "250ms"
json_field = "status"
json_value = "ok"
"#,
        bus = sandbox.bus_address(),
        journal = sandbox.journal_dir().display(),
        data = data.display(),
        kind = kind.kind(),
    );
    let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
    let upgrade = |version: &str| {
        agent.ctl(
            "operator",
            &[
                "-o",
                "json",
                "--timeout",
                "60s",
                "upgrade",
                "repoapp",
                "--to",
                version,
            ],
        )
    };
    let kept = || -> Vec<String> {
        fs::read_dir(&keep)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };

    // Not in the repository: refused by preflight, nothing changes.
    let out = upgrade("9.9");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("9.9 is not available"),
        "{}",
        out.stderr
    );
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));
    assert!(kept().is_empty(), "{:?}", kept());

    // apt: another program holds dpkg's lock; the upgrade waits for it.
    let holder = (kind == RepoKind::Apt).then(|| hold_dpkg_lock(dir.path(), 2));
    let started = Instant::now();
    let out = upgrade("2.0");
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    if let Some(mut holder) = holder {
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "it did wait"
        );
        holder.wait().unwrap();
    }
    let op = out.json();
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(
        op["params"]["from_version"],
        format.full_version("1.0"),
        "{op:#}"
    );
    wait_healthy(port, "2.0").await;
    assert_eq!(format.installed_version(&name).as_deref(), Some("2.0"));
    if kind == RepoKind::Apt {
        // The kept 1.0 stays until the next upgrade succeeds.
        assert_eq!(kept().len(), 1, "{:?}", kept());
    }
    fs::write(data.join("notes.txt"), "written by 2.0\n").unwrap();

    let out = upgrade("3.0");
    assert_eq!(
        out.code,
        3,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    let op = out.json();
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(steps.contains(&"rollback: package"), "{steps:?}");
    wait_healthy(port, "2.0").await;
    assert_eq!(format.installed_version(&name).as_deref(), Some("2.0"));
    assert_eq!(
        fs::read_to_string(format!("/opt/{name}/server.py")).unwrap(),
        syspkg::server_script("2.0", false)
    );

    // apt: the repository drops 1.0; the kept .deb brings it back.
    if kind == RepoKind::Apt {
        fs::remove_file(repo_dir.join(format.file_name(&name, "1.0"))).unwrap();
        repo.refresh().unwrap();
    }
    let out = agent.ctl("operator", &["-o", "json", "rollback", "repoapp"]);
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    assert_eq!(out.json()["state"], "succeeded", "{}", out.stdout);
    wait_healthy(port, "1.0").await;
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));
    assert_eq!(
        fs::read_to_string(format!("/opt/{name}/server.py")).unwrap(),
        syspkg::server_script("1.0", false)
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(
        fs::read_to_string(data.join("notes.txt")).unwrap(),
        "kept by the backup\n"
    );
    assert!(kept().is_empty(), "{:?}", kept());

    // 1.0 is installed but no longer to be had (apt: nor in its cache): an
    // upgrade is refused before anything changes, saying why.
    if kind == RepoKind::Dnf {
        fs::remove_file(repo_dir.join(format.file_name(&name, "1.0"))).unwrap();
        repo.refresh().unwrap();
    }
    let out = upgrade("2.0");
    assert_ne!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("cannot keep") && said.contains("again and retry"),
        "{said}"
    );
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));
    assert!(kept().is_empty(), "{:?}", kept());
    let _ = sandbox.systemctl(&["stop", UNIT]);
    drop(agent);
    drop(repo);
}
