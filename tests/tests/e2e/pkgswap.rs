//! The deb and rpm package backends for real: tiny packages of a test app
//! built in the test (`dpkg-deb --build`, `rpmbuild`) and installed on this
//! (throwaway) machine. First the deb backend's steps one by one, then, for
//! each format, a whole upgrade and automatic rollback through a real agent
//! and a real systemd unit. Each test removes its uniquely named package
//! when it ends, even on failure. (The rpm backend's steps one by one are
//! tested in agent/src/packages.rs against a throwaway rpm root.)

use std::fs;
use std::path::Path;
use std::time::Duration;

use covet_agent::config::{AppConfig, PackageConfig};
use covet_agent::packages::{self, PackageError, RestorePoint};
use covet_tests::agent::TestAgent;
use covet_tests::http::wait_healthy;
use covet_tests::sandbox::sandbox_or_skip;
use covet_tests::sandbox_dir;
use covet_tests::syspkg::{self, Format, Installed};

const LONG: Duration = Duration::from_secs(120);

fn quiet(_: bool, _: &str) {}

fn deb_package(name: &str, repo: &Path) -> PackageConfig {
    serde_json::from_value(serde_json::json!({
        "kind": "deb", "name": name, "repo_dir": repo,
    }))
    .unwrap()
}

fn deb_app(name: &str, repo: &Path) -> AppConfig {
    serde_json::from_value(serde_json::json!({
        "name": "pkgapp", "unit": "pkgapp.service",
        "package": {"kind": "deb", "name": name, "repo_dir": repo},
    }))
    .unwrap()
}

#[tokio::test]
async fn deb_backend_installs_keeps_and_restores_exactly() {
    if !Format::Deb.or_skip() {
        return;
    }
    let _lock = Format::Deb.lock();
    let dir = sandbox_dir("debswap");
    let (work, repo) = (dir.path().join("work"), dir.path().join("repo"));
    let package = Installed::unique(Format::Deb, "covet-debtest");
    let name = package.name.clone();
    for version in ["1.0", "2.0"] {
        Format::Deb
            .build(&work, &repo, &name, version, false)
            .unwrap();
    }
    // Named like 9.9, really 1.0: the control fields decide, not the name.
    let fake = repo.join(format!("{name}_9.9_all.deb"));
    fs::copy(repo.join(format!("{name}_1.0_all.deb")), &fake).unwrap();
    fs::write(repo.join("README.deb"), "not a package").unwrap();
    let pkg = deb_package(&name, &repo);
    let app = deb_app(&name, &repo);
    let opt = Path::new("/opt").join(&name);
    let conf = Path::new("/etc").join(&name).join("app.conf");

    packages::check_available(&pkg, "2.0").await.unwrap();
    let err = packages::check_available(&pkg, "9.9").await.unwrap_err();
    assert!(matches!(err, PackageError::VersionMissing { .. }), "{err}");
    assert!(err.to_string().contains(&*repo.to_string_lossy()), "{err}");
    assert_eq!(packages::installed_version(&app).await, None);

    // Nothing installed yet: the restore point says so and restores nothing.
    let rp = packages::prepare_restore_point(&pkg, "op-0").await.unwrap();
    let RestorePoint::Deb {
        version: None,
        kept: None,
        ..
    } = &rp
    else {
        panic!("{rp:?}");
    };
    packages::discard(&rp).await.unwrap();

    packages::install(&pkg, "1.0", "op-0", LONG, &quiet)
        .await
        .unwrap();
    assert_eq!(
        packages::installed_version(&app).await.as_deref(),
        Some("1.0")
    );
    assert_eq!(fs::read_to_string(opt.join("VERSION")).unwrap(), "1.0");
    // The operator edits the conffile: no install or restore may undo that.
    let edited = "# edited by the operator\ngreeting = hi\n";
    fs::write(&conf, edited).unwrap();

    let rp = packages::prepare_restore_point(&pkg, "op-1").await.unwrap();
    assert_eq!(
        packages::prepare_restore_point(&pkg, "op-1").await.unwrap(),
        rp,
        "a retry reuses what was kept"
    );
    let RestorePoint::Deb {
        version,
        kept: Some(kept),
        keep_dir,
        ..
    } = &rp
    else {
        panic!("{rp:?}");
    };
    assert_eq!(version.as_deref(), Some("1.0"));
    assert_eq!(keep_dir, &dir.path().join(".repo.before-op-1"));
    assert!(kept.starts_with(keep_dir) && kept.is_file(), "{kept:?}");
    // The repository loses 1.0 (both files): the kept copy brings it back.
    fs::remove_file(repo.join(format!("{name}_1.0_all.deb"))).unwrap();
    fs::remove_file(&fake).unwrap();

    packages::install(&pkg, "2.0", "op-1", LONG, &quiet)
        .await
        .unwrap();
    packages::install(&pkg, "2.0", "op-1", LONG, &quiet)
        .await
        .unwrap();
    assert_eq!(
        packages::installed_version(&app).await.as_deref(),
        Some("2.0")
    );
    assert_eq!(Format::Deb.installed_version(&name).as_deref(), Some("2.0"));
    assert_eq!(fs::read_to_string(opt.join("VERSION")).unwrap(), "2.0");
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);

    packages::restore(&rp).await.unwrap();
    packages::restore(&rp).await.unwrap();
    assert_eq!(
        packages::installed_version(&app).await.as_deref(),
        Some("1.0")
    );
    assert_eq!(fs::read_to_string(opt.join("VERSION")).unwrap(), "1.0");
    assert_eq!(
        fs::read_to_string(opt.join("server.py")).unwrap(),
        syspkg::server_script("1.0", false)
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);

    packages::discard(&rp).await.unwrap();
    packages::discard(&rp).await.unwrap();
    assert!(!keep_dir.exists());

    // 1.0 is installed but its file is nowhere now: the next upgrade is
    // refused before anything changes.
    let err = packages::prepare_restore_point(&pkg, "op-2")
        .await
        .unwrap_err();
    assert!(matches!(err, PackageError::PreviousMissing { .. }), "{err}");
    assert!(err.to_string().contains("/var/cache/apt/archives"), "{err}");
    assert!(!dir.path().join(".repo.before-op-2").exists());
    assert!(!dir.path().join(".repo.before-op-2.partial").exists());
    assert_eq!(Format::Deb.installed_version(&name).as_deref(), Some("1.0"));
}

/// apt or unattended-upgrades holding dpkg's lock: the install waits for
/// it (saying so) instead of failing.
#[tokio::test]
async fn an_install_waits_for_a_held_dpkg_lock() {
    if !Format::Deb.or_skip() {
        return;
    }
    let _lock = Format::Deb.lock();
    let dir = sandbox_dir("dpkglock");
    let (work, repo) = (dir.path().join("work"), dir.path().join("repo"));
    let package = Installed::unique(Format::Deb, "covet-locktest");
    let name = package.name.clone();
    Format::Deb
        .build(&work, &repo, &name, "1.0", false)
        .unwrap();
    // Another process takes dpkg's frontend lock (as apt does) for 2 s.
    let ready = dir.path().join("locked");
    let mut holder = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import fcntl, sys, time\n\
             f = open('/var/lib/dpkg/lock-frontend', 'w')\n\
             fcntl.lockf(f, fcntl.LOCK_EX)\n\
             open(sys.argv[1], 'w').close()\n\
             time.sleep(2)",
        ])
        .arg(&ready)
        .spawn()
        .unwrap();
    while !ready.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = std::sync::Mutex::new(Vec::new());
    let collect = |_: bool, line: &str| lines.lock().unwrap().push(line.to_owned());
    let started = std::time::Instant::now();
    packages::install(&deb_package(&name, &repo), "1.0", "op-1", LONG, &collect)
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "it did wait");
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("waiting for the dpkg lock: dpkg frontend lock")),
        "{:?}",
        lines.lock().unwrap()
    );
    assert_eq!(Format::Deb.installed_version(&name).as_deref(), Some("1.0"));
    holder.wait().unwrap();
}

const UNIT: &str = "pkgapp.service";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deb_upgrade_succeeds_then_a_broken_release_rolls_back_through_the_agent() {
    upgrade_then_roll_back_through_the_agent(Format::Deb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_upgrade_succeeds_then_a_broken_release_rolls_back_through_the_agent() {
    upgrade_then_roll_back_through_the_agent(Format::Rpm).await;
}

/// 1.0 installed by hand; the agent upgrades to 2.0 (success), then to 3.0,
/// whose health check fails, and rolls the package back to 2.0 by itself.
async fn upgrade_then_roll_back_through_the_agent(format: Format) {
    if !format.or_skip() {
        return;
    }
    let dir = sandbox_dir(&format!("{}swap-e2e", format.kind()));
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let _lock = format.lock();
    let (work, repo) = (dir.path().join("work"), dir.path().join("repo"));
    let package = Installed::unique(format, &format!("covet-{}app", format.kind()));
    let name = package.name.clone();
    for (version, broken) in [("1.0", false), ("2.0", false), ("3.0", true)] {
        format.build(&work, &repo, &name, version, broken).unwrap();
    }
    format
        .install(&repo.join(format.file_name(&name, "1.0")))
        .unwrap();
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
                "[Unit]\nDescription=covet-agent package swap test app\n\n[Service]\nType=simple\n\
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

    let toml = format!(
        r#"
[systemd]
bus = "{bus}"
journal_dir = "{journal}"
settle = "500ms"

[[app]]
name = "pkgapp"
unit = "{UNIT}"
paths = ["{data}"]

[app.package]
kind = "{kind}"
name = "{name}"
repo_dir = "{repo}"

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
        repo = repo.display(),
        kind = format.kind(),
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
                "pkgapp",
                "--to",
                version,
            ],
        )
    };

    // Not in the repository: refused, nothing changes.
    let out = upgrade("9.9");
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));

    let out = upgrade("2.0");
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    let op = out.json();
    assert_eq!(op["state"], "succeeded", "{op:#}");
    assert_eq!(
        op["params"]["from_version"],
        format.full_version("1.0"),
        "{op:#}"
    );
    wait_healthy(port, "2.0").await;
    assert_eq!(format.installed_version(&name).as_deref(), Some("2.0"));
    // The kept 1.0 stays until the next upgrade succeeds: rolling back
    // this one needs no repository.
    let kept_dirs = || -> Vec<String> {
        fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".repo.before-"))
            .collect()
    };
    assert_eq!(kept_dirs().len(), 1, "{:?}", kept_dirs());
    // App data the new version changed is put back by the standalone rollback.
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
        fs::read_to_string(format!("/opt/{name}/VERSION")).unwrap(),
        "2.0"
    );
    assert_eq!(
        fs::read_to_string(format!("/opt/{name}/server.py")).unwrap(),
        syspkg::server_script("2.0", false)
    );

    // `covetctl rollback` undoes the last succeeded upgrade (1.0 -> 2.0)
    // through the same steps: the kept 1.0 package, then the app's data.
    fs::remove_file(repo.join(format.file_name(&name, "1.0"))).unwrap();
    let out = agent.ctl("operator", &["-o", "json", "rollback", "pkgapp"]);
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    let op = out.json();
    assert_eq!(op["state"], "succeeded", "{op:#}");
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
    assert!(kept_dirs().is_empty(), "{:?}", kept_dirs());
    // Undone once: there is no succeeded upgrade left to undo.
    let out = agent.ctl("operator", &["rollback", "pkgapp"]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("no successful upgrade"),
        "{}",
        out.stderr
    );
    assert_eq!(format.installed_version(&name).as_deref(), Some("1.0"));
    let _ = sandbox.systemctl(&["stop", UNIT]);
}
