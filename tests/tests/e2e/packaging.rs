//! The packages end to end: `packaging/build` makes the .deb and .rpm files
//! from the debug binaries the test command already built; lintian accepts
//! the .debs; dpkg installs, upgrades and purges them on this machine; the
//! unit file from the package starts the packaged agent under a real systemd
//! (the test sandbox's user manager), which proves `Type=notify` readiness
//! and watchdog pings; on a booted Debian 12 (systemd-nspawn) the .deb
//! installs, the operator's steps from its own message bring it up with
//! `systemctl start`, upgrades restart it and removal stops it; the .rpm
//! files carry the right metadata and files.
//!
//! Needs root, dpkg-deb, dpkg-shlibdeps, lintian, rpm, rpmbuild,
//! debootstrap and systemd-nspawn (`scripts/test.sh` installs them). Without them the tests skip, saying
//! why; with CI set they fail instead. The install test replaces an
//! installed covet-agent only with CI set (a throwaway machine).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use covet_tests::container::{self, BootedDebian};
use covet_tests::pki::TestPki;
use covet_tests::sandbox::sandbox_or_skip;

const UNIT: &str = "covet-agent.service";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips (or, in CI, fails) when this machine cannot build and check packages.
fn skip(what: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root (dpkg, namespaces)".to_owned())
    } else {
        let mut tools = vec![("dpkg-deb", "dpkg-deb --version")];
        if what == "deb" {
            tools.extend([
                ("lintian", "lintian --version"),
                ("dpkg-shlibdeps", "dpkg-shlibdeps --version"),
            ]);
        } else {
            tools.extend([("rpm", "rpm --version"), ("rpmbuild", "rpmbuild --version")]);
        }
        tools.into_iter().find_map(|(name, probe)| {
            let argv: Vec<&str> = probe.split(' ').collect();
            let ok = Command::new(argv[0])
                .args(&argv[1..])
                .output()
                .is_ok_and(|o| o.status.success());
            (!ok).then(|| format!("{name} is missing (scripts/test.sh installs it)"))
        })
    };
    let Some(why) = why else { return false };
    assert!(
        !in_ci(),
        "packaging test cannot run and CI is set, so this is a failure: {why}"
    );
    eprintln!("SKIPPED: {why}");
    true
}

#[track_caller]
fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cargo profile of the binaries this test run uses (target/debug → dev).
fn profile() -> &'static str {
    let agent = covet_tests::bin("covet-agent");
    match agent
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("debug") => "dev",
        Some("release") => "release",
        other => panic!("cannot tell the profile of {} ({other:?})", agent.display()),
    }
}

/// `packaging/build --profile P --no-build --FORMAT [--version V] --out DIR`.
fn build(format: &str, version: Option<&str>, out: &Path) -> Vec<PathBuf> {
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("packaging/build"))
        .args(["--profile", profile(), "--no-build", "--fast"])
        .arg(format!("--{format}"))
        .arg("--out")
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    let output = cmd.output().expect("run packaging/build");
    assert!(
        output.status.success(),
        "packaging/build failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("packaging/build --{format}: {:?}", started.elapsed());
    let mut files: Vec<PathBuf> = fs::read_dir(out)
        .expect("read package dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == format))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        2,
        "two {format} packages in {}: {files:?}",
        out.display()
    );
    files
}

fn find<'a>(files: &'a [PathBuf], prefix: &str) -> &'a Path {
    files
        .iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(prefix))
                .is_some_and(|rest| {
                    // covet-agent_0.1.0-1_amd64.deb, covet-agent-0.1.0-1.x86_64.rpm
                    let mut chars = rest.chars();
                    matches!(chars.next(), Some('_' | '-'))
                        && chars.next().is_some_and(|c| c.is_ascii_digit())
                })
        })
        .unwrap_or_else(|| panic!("no {prefix} package in {files:?}"))
}

/// A scratch directory outside /tmp: the unit's PrivateTmp= would hide /tmp
/// (binary, config, notify socket) from the service.
fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("covet-{prefix}-"))
        .tempdir_in("/run")
        .expect("scratch dir in /run")
}

#[test]
fn debs_pass_lintian_carry_their_files_and_the_unit_runs_under_systemd() {
    if skip("deb") {
        return;
    }
    let dir = scratch("deb");
    let debs = build("deb", None, &dir.path().join("out"));
    let agent_deb = find(&debs, "covet-agent");
    let ctl_deb = find(&debs, "covetctl");

    // lintian: no errors (warnings are reported, not fatal).
    for deb in [agent_deb, ctl_deb] {
        let out = Command::new("lintian")
            .args(["--no-tag-display-limit", "--fail-on", "error"])
            .arg(deb)
            .output()
            .expect("run lintian");
        let report = stdout(&out);
        eprintln!("lintian {}:\n{report}", deb.display());
        assert!(
            out.status.success(),
            "lintian errors:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");
    }

    // Contents, modes and conffiles.
    let contents = stdout(&run("dpkg-deb", &["-c", agent_deb.to_str().unwrap()]));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/covet-agent"),
        ("-rw-r--r--", "./etc/covet/agent.toml"),
        ("-rw-r--r--", "./lib/systemd/system/covet-agent.service"),
        ("-rw-r--r--", "./usr/lib/tmpfiles.d/covet-agent.conf"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} not in:\n{contents}"
        );
    }
    let conffiles = stdout(&run(
        "dpkg-deb",
        &["-I", agent_deb.to_str().unwrap(), "conffiles"],
    ));
    assert_eq!(conffiles.trim(), "/etc/covet/agent.toml");
    let ctl_contents = stdout(&run("dpkg-deb", &["-c", ctl_deb.to_str().unwrap()]));
    for path in [
        "./usr/bin/covetctl",
        "./usr/share/bash-completion/completions/covetctl",
        "./usr/share/zsh/vendor-completions/_covetctl",
        "./usr/share/fish/vendor_completions.d/covetctl.fish",
        "./usr/share/man/man1/covetctl.1.gz",
    ] {
        assert!(
            ctl_contents.lines().any(|l| l.ends_with(path)),
            "{path} not in:\n{ctl_contents}"
        );
    }

    // The packaged example configuration passes check-config once certificates exist.
    let root = dir.path().join("root");
    run(
        "dpkg-deb",
        &["-x", agent_deb.to_str().unwrap(), root.to_str().unwrap()],
    );
    // Depends from dpkg-shlibdeps; md5sums cover every file but the conffile.
    let control = stdout(&run(
        "dpkg-deb",
        &["-I", agent_deb.to_str().unwrap(), "control"],
    ));
    assert!(control.contains("\nDepends: libc6 (>= "), "{control}");
    assert!(
        control.contains("\nRecommends: postgresql-client\n"),
        "{control}"
    );
    let md5sums = stdout(&run(
        "dpkg-deb",
        &["-I", agent_deb.to_str().unwrap(), "md5sums"],
    ));
    assert!(!md5sums.contains("etc/covet/agent.toml"), "{md5sums}");
    let sums_file = dir.path().join("md5sums");
    fs::write(&sums_file, &md5sums).unwrap();
    let checked = Command::new("md5sum")
        .args(["--check", "--strict", "--quiet"])
        .arg(&sums_file)
        .current_dir(&root)
        .output()
        .expect("run md5sum");
    assert!(checked.status.success(), "md5sums:\n{}", stdout(&checked));
    assert!(md5sums.contains("  usr/bin/covet-agent\n"), "{md5sums}");
    let pki = TestPki::new(&dir.path().join("pki"));
    let example = fs::read_to_string(root.join("etc/covet/agent.toml")).unwrap();
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    let with_test_paths = example
        .replace(
            "/etc/covet/pki/agent.",
            &format!("{}/agent.", pki.dir.display()),
        )
        .replace("/etc/covet/pki/", &format!("{}/", pki.dir.display()))
        .replace("0.0.0.0:7443", "127.0.0.1:0")
        .replace("/var/lib/covet-agent", state.to_str().unwrap())
        .replace(
            "/var/backups/covet",
            dir.path().join("backups").to_str().unwrap(),
        );
    assert_ne!(with_test_paths, example);
    fs::write(&config, &with_test_paths).unwrap();
    let agent_bin = root.join("usr/bin/covet-agent");
    run(
        agent_bin.to_str().unwrap(),
        &["check-config", "--config", config.to_str().unwrap()],
    );

    // The unit from the package, under a real systemd manager.
    let Some(sandbox) = sandbox_or_skip(&dir.path().join("systemd")) else {
        return;
    };
    let with_bus = with_test_paths.replace(
        "bus = \"system\"",
        &format!("bus = \"{}\"", sandbox.bus_address()),
    );
    fs::write(&config, with_bus).unwrap();
    fs::create_dir_all(&state).unwrap();
    fs::create_dir_all(dir.path().join("backups")).unwrap();
    let unit = fs::read_to_string(root.join("lib/systemd/system/covet-agent.service")).unwrap();
    sandbox.install_unit(UNIT, &unit).unwrap();
    let dropin_dir = sandbox.unit_dir().join("covet-agent.service.d");
    fs::create_dir_all(&dropin_dir).unwrap();
    // Only what a test must change: its paths, a short watchdog that kills
    // the agent within seconds unless it pings, and the four options that
    // this nested user manager cannot set up (226/NAMESPACE): ProtectHome=,
    // ProtectKernelTunables=, ProtectKernelLogs=, ProtectControlGroups=.
    // The rest applies as shipped.
    fs::write(
        dropin_dir.join("test.conf"),
        format!(
            "[Service]\nExecStart=\nExecStart={bin} --config {config}\nReadWritePaths=\nReadWritePaths={dir}\nWatchdogSec=2s\nProtectHome=no\nProtectKernelTunables=no\nProtectKernelLogs=no\nProtectControlGroups=no\n",
            bin = agent_bin.display(),
            config = config.display(),
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    assert!(sandbox.systemctl(&["daemon-reload"]).status.success());
    let started = sandbox.systemctl(&["start", UNIT]);
    let show = |sandbox: &covet_tests::sandbox::SystemdSandbox| {
        stdout(&sandbox.systemctl(&[
            "show",
            UNIT,
            "--property=ActiveState,SubState,Result,StatusText,NRestarts,ExecMainStatus",
        ]))
    };
    // The journal's end (the manager logs namespace set-up errors there).
    let journal = |sandbox: &covet_tests::sandbox::SystemdSandbox| {
        let all = stdout(&sandbox.journalctl(&["-n", "40", "-o", "cat"]));
        format!("{all}\n--- sandbox:\n{}", sandbox.log())
    };
    assert!(
        started.status.success(),
        "systemctl start failed: {}\n{}\njournal:\n{}",
        String::from_utf8_lossy(&started.stderr),
        show(&sandbox),
        journal(&sandbox)
    );
    // `start` of a Type=notify unit returns once READY=1 arrived.
    let state_now = show(&sandbox);
    assert!(
        state_now.contains("ActiveState=active") && state_now.contains("SubState=running"),
        "{state_now}\njournal:\n{}",
        journal(&sandbox)
    );
    assert!(
        state_now.contains("StatusText=listening on 127.0.0.1:"),
        "{state_now}"
    );
    // Three watchdog periods later it still runs, not restarted: the pings arrive.
    std::thread::sleep(Duration::from_secs(6));
    let later = show(&sandbox);
    assert!(
        later.contains("ActiveState=active") && later.contains("NRestarts=0"),
        "{later}\njournal:\n{}",
        journal(&sandbox)
    );
    let addr = fs::read_to_string(state.join("agent.addr")).expect("agent.addr");

    // It serves mTLS: covetctl info as a reader.
    let reader = pki.client("reader");
    let ctl_config = dir.path().join("covetctl.toml");
    fs::write(
        &ctl_config,
        format!(
            "current_context = \"t\"\n[contexts.t]\nendpoints = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            addr.trim(),
            reader.ca.display(),
            reader.cert.display(),
            reader.key.display()
        ),
    )
    .unwrap();
    let info = covet_tests::agent::run_ctl(&ctl_config, None, &["info"]);
    info.assert_ok();

    // SIGHUP through ExecReload reloads and keeps it running.
    assert!(sandbox.systemctl(&["reload", UNIT]).status.success());
    sandbox
        .wait_journal(UNIT, "SIGHUP: reloaded", Duration::from_secs(10))
        .unwrap();

    let stopped = sandbox.systemctl(&["stop", UNIT]);
    assert!(stopped.status.success());
    let after = show(&sandbox);
    assert!(
        after.contains("ActiveState=inactive") && after.contains("Result=success"),
        "{after}"
    );
}

/// A new user's path, on a real booted Debian 12 whose PID 1 is systemd:
/// `dpkg -i`, the steps the package's own message gives (certificates from
/// `covetctl pki`, installed where agent.toml says), `systemctl start`, a
/// call over mTLS; then an upgrade restarts the agent, remove stops it and
/// keeps its configuration, purge drops it.
#[test]
fn on_a_booted_debian_12_the_deb_installs_and_starts_with_systemctl() {
    if skip("deb") {
        return;
    }
    if let Some(why) = container::unavailable() {
        assert!(!in_ci(), "CI is set, so this is a failure: {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = scratch("booted");
    let v1 = build("deb", Some("0.1.0-1"), &dir.path().join("v1"));
    let v2 = build("deb", Some("0.1.1-1"), &dir.path().join("v2"));
    let target = covet_tests::bin("covet-agent")
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_owned();
    let root = container::pristine_root(&target).expect("a Debian 12 root");
    let debian = BootedDebian::boot(
        &root,
        &dir.path().join("console.log"),
        &[
            (&dir.path().join("v1"), "/mnt/v1"),
            (&dir.path().join("v2"), "/mnt/v2"),
        ],
    )
    .expect("boot Debian 12");
    let inside = |files: &[PathBuf], mnt: &str, package: &str| {
        let name = find(files, package).file_name().unwrap().to_str().unwrap();
        format!("{mnt}/{name}")
    };
    let run = |argv: &[&str]| {
        debian
            .run(argv)
            .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", debian.journal(UNIT)))
    };
    assert_eq!(
        run(&["cat", "/etc/debian_version"]).split('.').next(),
        Some("12")
    );

    // Installed and enabled, not started: it says what to do first.
    let said = run(&[
        "dpkg",
        "-i",
        &inside(&v1, "/mnt/v1", "covet-agent"),
        &inside(&v1, "/mnt/v1", "covetctl"),
    ]);
    assert!(said.contains("not started"), "{said}");
    assert_eq!(run(&["systemctl", "is-enabled", UNIT]).trim(), "enabled");
    assert_eq!(
        debian.unit_property(UNIT, "ActiveState").unwrap(),
        "inactive"
    );

    // The steps the message and agent.toml's comments give.
    for argv in [
        &["covetctl", "pki", "init", "--dir", "/root/pki"][..],
        &[
            "covetctl",
            "pki",
            "issue-agent",
            "--dir",
            "/root/pki",
            "--name",
            "node1",
            "--san",
            "127.0.0.1",
            "localhost",
        ],
        &[
            "covetctl",
            "pki",
            "issue-client",
            "--dir",
            "/root/pki",
            "--name",
            "ops",
            "--role",
            "operator",
        ],
        &["install", "-d", "-m", "0700", "/etc/covet/pki"],
        &[
            "install",
            "-m",
            "0644",
            "/root/pki/ca.crt",
            "/etc/covet/pki/ca.crt",
        ],
        &[
            "install",
            "-m",
            "0644",
            "/root/pki/node1.crt",
            "/etc/covet/pki/agent.crt",
        ],
        &[
            "install",
            "-m",
            "0600",
            "/root/pki/node1.key",
            "/etc/covet/pki/agent.key",
        ],
    ] {
        run(argv);
    }
    // This container shares the host's network: listen on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let config = debian.path("/etc/covet/agent.toml");
    let example = fs::read_to_string(&config).unwrap();
    assert!(example.contains("listen = \"0.0.0.0:7443\""), "{example}");
    fs::write(
        &config,
        example.replace("0.0.0.0:7443", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    run(&[
        "covet-agent",
        "check-config",
        "--config",
        "/etc/covet/agent.toml",
    ]);
    run(&["systemctl", "start", UNIT]);
    assert_eq!(debian.unit_property(UNIT, "ActiveState").unwrap(), "active");
    assert_eq!(
        debian.unit_property(UNIT, "StatusText").unwrap(),
        format!("listening on 127.0.0.1:{port}")
    );

    // A client on the node, and one on this host, over mutual TLS.
    run(&[
        "covetctl",
        "config",
        "add-context",
        "prod",
        "-e",
        &format!("127.0.0.1:{port}"),
        "--ca",
        "/root/pki/ca.crt",
        "--cert",
        "/root/pki/ops.crt",
        "--key",
        "/root/pki/ops.key",
    ]);
    let info: serde_json::Value = serde_json::from_str(&run(&["covetctl", "-o", "json", "info"]))
        .expect("covetctl info prints JSON");
    assert!(info["hostname"].is_string(), "{info:#}");
    let host_config = dir.path().join("covetctl.toml");
    fs::write(
        &host_config,
        format!(
            "current_context = \"t\"\n[contexts.t]\nendpoints = [\"127.0.0.1:{port}\"]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            ca = debian.path("/root/pki/ca.crt").display(),
            cert = debian.path("/root/pki/ops.crt").display(),
            key = debian.path("/root/pki/ops.key").display(),
        ),
    )
    .unwrap();
    covet_tests::agent::run_ctl(&host_config, None, &["info"]).assert_ok();

    // The real manager's view of the unit's hardening.
    let security = run(&["systemd-analyze", "security", "--no-pager", UNIT]);
    let exposure = security
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for covet-agent.service: ")
                .nth(1)
        })
        .unwrap_or_else(|| panic!("{security}"));
    eprintln!("systemd-analyze security on Debian 12: {exposure}");
    // As reported in the README: 3.0 OK.
    let level: f32 = exposure
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{exposure}"));
    assert!(level <= 3.0 && exposure.contains(" OK"), "{security}");

    // An upgrade restarts the running agent.
    let pid_before = debian.unit_property(UNIT, "MainPID").unwrap();
    run(&[
        "dpkg",
        "--force-confold",
        "-i",
        &inside(&v2, "/mnt/v2", "covet-agent"),
        &inside(&v2, "/mnt/v2", "covetctl"),
    ]);
    assert_eq!(debian.unit_property(UNIT, "ActiveState").unwrap(), "active");
    let pid_after = debian.unit_property(UNIT, "MainPID").unwrap();
    assert_ne!(pid_before, pid_after, "the upgrade restarts the agent");
    run(&["covetctl", "info"]);

    // Remove stops it and keeps configuration; purge drops it.
    run(&["dpkg", "--remove", "covet-agent"]);
    assert_eq!(
        debian.unit_property(UNIT, "ActiveState").unwrap(),
        "inactive"
    );
    assert!(debian.path("/etc/covet/agent.toml").exists());
    assert!(debian.path("/var/lib/covet-agent").exists());
    run(&["dpkg", "--purge", "covet-agent"]);
    assert!(!debian.path("/etc/covet/agent.toml").exists());
    assert!(!debian.path("/var/lib/covet-agent").exists());
}

fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", package])
        .output()
        .ok()?;
    let text = stdout(&out);
    text.strip_prefix("install ok installed ")
        .map(str::to_owned)
}

fn dpkg(args: &[&str]) -> Output {
    let out = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("run dpkg");
    assert!(
        out.status.success(),
        "dpkg {args:?} failed:\n{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Purges the packages even when an assertion fails half-way.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "covet-agent", "covetctl"])
            .output();
        let _ = fs::remove_dir_all("/var/backups/covet");
    }
}

#[test]
fn debs_install_upgrade_remove_and_purge() {
    if skip("deb") {
        return;
    }
    if let Some(v) = installed_version("covet-agent").or(installed_version("covetctl"))
        && !in_ci()
    {
        eprintln!(
            "SKIPPED: covet packages {v} are installed here; set CI=1 to let this test replace them"
        );
        return;
    }
    if Path::new("/var/backups/covet").exists() && !in_ci() {
        eprintln!("SKIPPED: /var/backups/covet exists here; set CI=1 to let this test remove it");
        return;
    }
    let dir = scratch("dpkg");
    // dpkg takes one lock for the machine; other tests install too.
    let _dpkg = covet_tests::syspkg::Format::Deb.lock();
    let v1 = build("deb", Some("0.1.0-1"), &dir.path().join("v1"));
    let v2 = build("deb", Some("0.1.1-1"), &dir.path().join("v2"));
    let _purge = Purge;

    // Install: files, state dirs 0700, the unit enabled, not started (no certificates).
    let out = dpkg(&[
        "-i",
        find(&v1, "covet-agent").to_str().unwrap(),
        find(&v1, "covetctl").to_str().unwrap(),
    ]);
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("not started"),
        "postinst says how to start it:\n{said}"
    );
    assert_eq!(installed_version("covet-agent").as_deref(), Some("0.1.0-1"));
    assert_eq!(installed_version("covetctl").as_deref(), Some("0.1.0-1"));
    for d in ["/var/lib/covet-agent", "/var/backups/covet"] {
        let mode = fs::metadata(d).unwrap_or_else(|e| panic!("{d}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o7777, 0o700, "{d}");
    }
    assert!(
        fs::symlink_metadata("/etc/systemd/system/multi-user.target.wants/covet-agent.service")
            .is_ok(),
        "enabled: the WantedBy symlink exists"
    );
    run("/usr/bin/covetctl", &["--version"]);
    let version = stdout(&run("/usr/bin/covet-agent", &["--version"]));
    assert!(version.starts_with("covet-agent "), "{version}");

    // Upgrade keeps a locally edited conffile (dpkg --force-confold: no prompt).
    let edited = format!(
        "{}\n# edited by the operator\n",
        fs::read_to_string("/etc/covet/agent.toml").unwrap()
    );
    fs::write("/etc/covet/agent.toml", &edited).unwrap();
    fs::write("/var/lib/covet-agent/audit.log", "{}\n").unwrap();
    fs::write("/var/backups/covet/keep-me", "backup").unwrap();
    dpkg(&[
        "--force-confold",
        "-i",
        find(&v2, "covet-agent").to_str().unwrap(),
        find(&v2, "covetctl").to_str().unwrap(),
    ]);
    assert_eq!(installed_version("covet-agent").as_deref(), Some("0.1.1-1"));
    assert_eq!(fs::read_to_string("/etc/covet/agent.toml").unwrap(), edited);

    // Remove keeps configuration, state and backups.
    dpkg(&["--remove", "covet-agent", "covetctl"]);
    assert!(!Path::new("/usr/bin/covet-agent").exists());
    assert!(!Path::new("/usr/bin/covetctl").exists());
    assert!(Path::new("/etc/covet/agent.toml").exists());
    assert!(Path::new("/var/lib/covet-agent/audit.log").exists());

    // Purge drops configuration and state, keeps the backups.
    dpkg(&["--purge", "covet-agent", "covetctl"]);
    assert_eq!(installed_version("covet-agent"), None);
    assert!(!Path::new("/etc/covet/agent.toml").exists());
    assert!(!Path::new("/var/lib/covet-agent").exists());
    assert!(Path::new("/var/backups/covet/keep-me").exists());
    assert!(
        fs::symlink_metadata("/etc/systemd/system/multi-user.target.wants/covet-agent.service")
            .is_err(),
        "purge removes the enablement"
    );
}

#[test]
fn rpms_carry_metadata_scripts_and_files() {
    if skip("rpm") {
        return;
    }
    let dir = scratch("rpm");
    let rpms = build("rpm", None, dir.path());
    let agent = find(&rpms, "covet-agent").to_str().unwrap().to_owned();
    let ctl = find(&rpms, "covetctl").to_str().unwrap().to_owned();

    let info = stdout(&run("rpm", &["-qip", &agent]));
    for field in [
        "Name        : covet-agent",
        "License     : Apache-2.0",
        "Summary     : Host agent",
    ] {
        assert!(info.contains(field), "{field:?} not in:\n{info}");
    }
    assert!(
        info.contains(&format!("Version     : {}", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    let files = stdout(&run("rpm", &["-qlp", &agent]));
    for path in [
        "/usr/bin/covet-agent",
        "/etc/covet/agent.toml",
        "/usr/lib/systemd/system/covet-agent.service",
        "/usr/lib/tmpfiles.d/covet-agent.conf",
    ] {
        assert!(files.lines().any(|l| l == path), "{path} not in:\n{files}");
    }
    let config = stdout(&run("rpm", &["-qp", "--configfiles", &agent]));
    assert_eq!(config.trim(), "/etc/covet/agent.toml");
    let scripts = stdout(&run("rpm", &["-qp", "--scripts", &agent]));
    for needle in ["preset covet-agent.service", "disable --now", "try-restart"] {
        assert!(scripts.contains(needle), "{needle:?} not in:\n{scripts}");
    }

    let ctl_files = stdout(&run("rpm", &["-qlp", &ctl]));
    for path in [
        "/usr/bin/covetctl",
        "/usr/share/bash-completion/completions/covetctl",
        "/usr/share/zsh/site-functions/_covetctl",
        "/usr/share/fish/vendor_completions.d/covetctl.fish",
        "/usr/share/man/man1/covetctl.1.gz",
    ] {
        assert!(
            ctl_files.lines().any(|l| l == path),
            "{path} not in:\n{ctl_files}"
        );
    }
}

/// Fails unless DIR is missing or empty.
#[track_caller]
fn assert_no_packages(dir: &Path) {
    let made: Vec<_> = fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(made.is_empty(), "no packages: {made:?}");
}

/// Bad input to `packaging/build` stops it with a message and no package.
#[test]
fn packaging_build_refuses_unknown_options_and_missing_binaries() {
    let dir = scratch("badbuild");
    let out = dir.path().join("out");
    let unknown = Command::new("bash")
        .arg(workspace().join("packaging/build"))
        .args(["--no-build", "--deb", "--colour"])
        .output()
        .expect("run packaging/build");
    assert_eq!(unknown.status.code(), Some(2));
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("unknown option --colour"), "{said}");

    let missing = Command::new("bash")
        .arg(workspace().join("packaging/build"))
        .args([
            "--profile",
            "no-such-profile",
            "--no-build",
            "--fast",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run packaging/build");
    assert_eq!(missing.status.code(), Some(1));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("no-such-profile/covet-agent is missing (drop --no-build?)")
            || said.contains("is missing (packaging/build --install-tools installs it)"),
        "{said}"
    );
    assert_no_packages(&out);

    // A version dpkg cannot parse: dpkg-deb says why, nothing is left in --out.
    if skip("deb") {
        return;
    }
    let bad_version = Command::new("bash")
        .arg(workspace().join("packaging/build"))
        .args(["--profile", profile(), "--no-build", "--fast", "--deb"])
        .args(["--version", "1.0 beta"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run packaging/build");
    assert_eq!(bad_version.status.code(), Some(1));
    let said = String::from_utf8_lossy(&bad_version.stderr);
    assert!(
        said.contains("covet-agent .deb") && said.contains("dpkg-deb"),
        "{said}"
    );
    assert_no_packages(&out);
}

/// `rpm` with the packages in a scratch root (`--root`; no scriptlets, which
/// would run chrooted there, and no dependency check against Debian's empty
/// rpm database): install, upgrade keeps the edited `%config(noreplace)`,
/// erase saves it as .rpmsave and removes the rest.
#[test]
fn rpms_install_upgrade_and_erase_in_a_scratch_root() {
    if skip("rpm") {
        return;
    }
    let dir = scratch("rpmroot");
    let v1 = build("rpm", Some("0.1.0-1"), &dir.path().join("v1"));
    let v2 = build("rpm", Some("0.1.1-1"), &dir.path().join("v2"));
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let root_arg = root.to_str().unwrap();
    let rpm = |args: &[&str]| {
        let mut argv = vec!["--root", root_arg, "--nodeps", "--noscripts"];
        argv.extend_from_slice(args);
        run("rpm", &argv)
    };
    run("rpm", &["--root", root_arg, "--initdb"]);
    rpm(&[
        "-i",
        find(&v1, "covet-agent").to_str().unwrap(),
        find(&v1, "covetctl").to_str().unwrap(),
    ]);
    let query = stdout(&run("rpm", &["--root", root_arg, "-q", "covet-agent"]));
    assert!(query.starts_with("covet-agent-0.1.0-1."), "{query}");
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        ("usr/bin/covet-agent", 0o755),
        ("usr/bin/covetctl", 0o755),
        ("etc/covet/agent.toml", 0o644),
        ("usr/lib/systemd/system/covet-agent.service", 0o644),
    ] {
        let meta = fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
    }

    let config = root.join("etc/covet/agent.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        fs::read_to_string(&config).unwrap()
    );
    fs::write(&config, &edited).unwrap();
    rpm(&[
        "-U",
        find(&v2, "covet-agent").to_str().unwrap(),
        find(&v2, "covetctl").to_str().unwrap(),
    ]);
    let query = stdout(&run("rpm", &["--root", root_arg, "-q", "covet-agent"]));
    assert!(query.starts_with("covet-agent-0.1.1-1."), "{query}");
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);

    rpm(&["-e", "covet-agent", "covetctl"]);
    assert!(!root.join("usr/bin/covet-agent").exists());
    assert!(!root.join("usr/bin/covetctl").exists());
    assert!(!config.exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/covet/agent.toml.rpmsave")).unwrap(),
        edited
    );
}
