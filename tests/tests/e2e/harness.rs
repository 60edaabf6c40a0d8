//! Tests of the harness itself: real systemd user managers with journald,
//! and real PostgreSQL clusters, started and torn down per test.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use covet_tests::postgres::{PostgresCluster, postgres_or_skip};
use covet_tests::sandbox::{SystemdSandbox, sandbox_or_skip};
use covet_tests::sandbox_dir;

fn started(dir: &Path) -> Option<SystemdSandbox> {
    let t = Instant::now();
    let sandbox = sandbox_or_skip(dir)?;
    eprintln!("systemd sandbox ready in {:?}", t.elapsed());
    Some(sandbox)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[track_caller]
fn assert_ok(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A unit that prints `line` (unbuffered) and then sleeps.
fn printing_unit(line: &str) -> String {
    format!(
        "[Service]\nType=simple\nExecStart=/usr/bin/python3 -u -c \"import time; print('{line}'); time.sleep(300)\"\n"
    )
}

fn wait_active(sandbox: &SystemdSandbox, unit: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = stdout(&sandbox.systemctl(&["is-active", unit]));
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unit} is {state}, not {want}:\n{}",
            stdout(&sandbox.systemctl(&["status", unit]))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (PID, start time) of live processes whose command line contains `needle`.
fn processes_matching(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .filter_map(|pid| Some((pid, start_time(pid)?)))
        .collect()
}

/// Field 22 of /proc/PID/stat: tells a process from a later one with its PID.
fn start_time(pid: i32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); zombies have been waited for by nobody yet.
    let fields: Vec<&str> = rest.split(' ').collect();
    (fields.first() != Some(&"Z")).then(|| fields.get(19).map(|s| s.to_string()))?
}

fn still_alive(procs: &[(i32, String)]) -> Vec<i32> {
    procs
        .iter()
        .filter(|(pid, start)| start_time(*pid).as_ref() == Some(start))
        .map(|(pid, _)| *pid)
        .collect()
}

#[test]
fn sandbox_runs_a_unit_and_journals_its_output() {
    let dir = sandbox_dir("harness");
    let Some(sandbox) = started(dir.path()) else {
        return;
    };
    let address = sandbox.bus_address();
    assert_eq!(
        address,
        format!("unix:path={}/run/bus", dir.path().display())
    );

    // The bus works from outside the sandbox's namespaces.
    let out = sandbox.busctl(&[
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnits",
    ]);
    assert_ok("busctl ListUnits", &out);
    assert!(stdout(&out).contains("dbus.socket"), "{}", stdout(&out));

    sandbox
        .install_unit("hello.service", &printing_unit("hello from the sandbox"))
        .expect("install unit");
    assert_ok("start", &sandbox.systemctl(&["start", "hello.service"]));
    let t = Instant::now();
    wait_active(&sandbox, "hello.service", "active");
    let entry = sandbox
        .wait_journal(
            "hello.service",
            "hello from the sandbox",
            Duration::from_secs(5),
        )
        .expect("journal entry");
    eprintln!(
        "line visible in the journal {:?} after `systemctl start` returned",
        t.elapsed()
    );
    // Inside the sandbox the service is a system-style unit for journald: the
    // cgroup is /app.slice/hello.service relative to the namespace's root.
    assert_eq!(entry["_SYSTEMD_UNIT"], "hello.service", "{entry:#}");
    assert_eq!(entry["_TRANSPORT"], "stdout", "{entry:#}");
    assert!(entry.get("_SYSTEMD_USER_UNIT").is_none(), "{entry:#}");

    // journalctl -o json straight from the journal directory.
    let out = sandbox.journalctl(&["-u", "hello.service", "-o", "json"]);
    assert_ok("journalctl", &out);
    assert!(stdout(&out).contains("hello from the sandbox"));

    assert_ok("stop", &sandbox.systemctl(&["stop", "hello.service"]));
    wait_active(&sandbox, "hello.service", "inactive");
}

#[test]
fn two_sandboxes_do_not_interfere() {
    let (dir_a, dir_b) = (sandbox_dir("harness-a"), sandbox_dir("harness-b"));
    let Some(a) = started(dir_a.path()) else {
        return;
    };
    let Some(b) = started(dir_b.path()) else {
        return;
    };
    assert_ne!(a.bus_address(), b.bus_address());
    assert_ne!(a.cgroup(), b.cgroup());
    // The same unit name in both: separate cgroups, journals and managers.
    a.install_unit("same.service", &printing_unit("I am A"))
        .unwrap();
    b.install_unit("same.service", &printing_unit("I am B"))
        .unwrap();
    assert_ok("start in A", &a.systemctl(&["start", "same.service"]));
    assert_ok("start in B", &b.systemctl(&["start", "same.service"]));
    a.wait_journal("same.service", "I am A", Duration::from_secs(5))
        .unwrap();
    b.wait_journal("same.service", "I am B", Duration::from_secs(5))
        .unwrap();

    assert_ok("stop in A", &a.systemctl(&["stop", "same.service"]));
    wait_active(&a, "same.service", "inactive");
    wait_active(&b, "same.service", "active");

    let messages = |s: &SystemdSandbox| -> Vec<String> {
        s.journal("same.service")
            .iter()
            .filter_map(|e| e["MESSAGE"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(messages(&a), ["I am A"]);
    assert_eq!(messages(&b), ["I am B"]);
}

#[test]
fn dropping_a_sandbox_leaves_no_process() {
    let dir = sandbox_dir("harness-drop");
    let Some(sandbox) = started(dir.path()) else {
        return;
    };
    let marker = format!("covet-marker-{}", std::process::id());
    // A service with a child that leaves the service's session and process
    // group: only the namespace (or the cgroup) can still reach it.
    sandbox
        .install_unit(
            "forking.service",
            &format!(
                "[Service]\nExecStart=/usr/bin/python3 -c \"import os, time; os.fork() or os.setsid(); time.sleep(300)\" {marker}\n"
            ),
        )
        .unwrap();
    assert_ok("start", &sandbox.systemctl(&["start", "forking.service"]));
    wait_active(&sandbox, "forking.service", "active");

    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_matching(&marker).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the service and its child did not both start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // journald, the manager, dbus-daemon, the script: all in the sandbox's cgroup.
    let pids: Vec<(i32, String)> = sandbox
        .pids()
        .into_iter()
        .filter_map(|pid| Some((pid, start_time(pid)?)))
        .collect();
    assert!(pids.len() >= 6, "sandbox processes: {pids:?}");
    let cgroups: Vec<_> = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]
        .iter()
        .map(|root| Path::new(root).join(sandbox.cgroup()))
        .filter(|p| p.exists())
        .collect();
    assert!(!cgroups.is_empty(), "the sandbox has no cgroup of its own");

    let path = dir.path().to_string_lossy().into_owned();
    let mut everything = processes_matching(&marker);
    everything.extend(processes_matching(&path));
    everything.extend(pids);

    let t = Instant::now();
    drop(sandbox);
    eprintln!("sandbox torn down in {:?}", t.elapsed());
    assert_eq!(still_alive(&everything), Vec::<i32>::new(), "left behind");
    assert_eq!(processes_matching(&marker), vec![]);
    assert_eq!(processes_matching(&path), vec![]);
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
}

#[test]
fn restart_bus_closes_connections_and_the_bus_comes_back() {
    let dir = sandbox_dir("harness-bus");
    let Some(sandbox) = started(dir.path()) else {
        return;
    };
    // A connection made before the restart: `busctl monitor` exits when its
    // connection is closed.
    let mut monitor: Child = Command::new("busctl")
        .arg(format!("--address={}", sandbox.bus_address()))
        .arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busctl monitor");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        monitor.try_wait().unwrap().is_none(),
        "busctl monitor died early"
    );

    let t = Instant::now();
    sandbox.restart_bus().expect("restart the bus");
    eprintln!("bus restarted in {:?}", t.elapsed());

    let deadline = Instant::now() + Duration::from_secs(5);
    while monitor.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = monitor.kill();
            panic!("the old connection survived the bus restart");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // New connections work, and so does the manager behind them.
    sandbox
        .install_unit("after.service", &printing_unit("after the restart"))
        .expect("install after restart");
    assert_ok("start", &sandbox.systemctl(&["start", "after.service"]));
    wait_active(&sandbox, "after.service", "active");
    sandbox
        .wait_journal("after.service", "after the restart", Duration::from_secs(5))
        .unwrap();
}

fn started_pg(dir: &Path) -> Option<PostgresCluster> {
    let t = Instant::now();
    let pg = postgres_or_skip(dir)?;
    eprintln!("PostgreSQL ready in {:?}", t.elapsed());
    Some(pg)
}

#[test]
fn postgres_cluster_runs_sql() {
    let dir = sandbox_dir("harness-pg");
    let Some(pg) = started_pg(dir.path()) else {
        return;
    };
    assert!(pg.bindir().join("pg_dump").exists());
    assert!(
        pg.socket_dir()
            .join(format!(".s.PGSQL.{}", pg.port()))
            .exists()
    );
    pg.create_db("app", "app_owner").expect("create_db");
    let owner = pg
        .psql(
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'",
        )
        .unwrap();
    assert_eq!(owner.trim(), "app_owner");
    let count = pg
        .psql(
            "app",
            "CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2), (3); SELECT count(*) FROM t",
        )
        .unwrap();
    assert_eq!(count.trim(), "3");

    let err = pg.psql("app", "SELECT * FROM missing").unwrap_err();
    assert!(
        format!("{err:#}").contains("does not exist"),
        "error should carry psql's stderr: {err:#}"
    );
}

#[test]
fn two_postgres_clusters_side_by_side_and_drop_stops_them() {
    let (dir_a, dir_b) = (sandbox_dir("harness-pg-a"), sandbox_dir("harness-pg-b"));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| started_pg(dir_a.path()));
        let b = s.spawn(|| started_pg(dir_b.path()));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (Some(a), Some(b)) = (a, b) else {
        return;
    };
    // Each cluster has its own server: the same table name, different contents.
    a.psql(
        "postgres",
        "CREATE TABLE t(x int); INSERT INTO t VALUES (1)",
    )
    .unwrap();
    b.psql(
        "postgres",
        "CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2)",
    )
    .unwrap();
    assert_eq!(
        a.psql("postgres", "SELECT count(*) FROM t").unwrap().trim(),
        "1"
    );
    assert_eq!(
        b.psql("postgres", "SELECT count(*) FROM t").unwrap().trim(),
        "2"
    );

    let data_a = dir_a.path().join("pg/data").to_string_lossy().into_owned();
    let data_b = dir_b.path().join("pg/data").to_string_lossy().into_owned();
    assert_eq!(processes_matching(&data_a).len(), 1, "one postmaster for A");
    let t = Instant::now();
    drop(a);
    eprintln!("PostgreSQL stopped in {:?}", t.elapsed());
    assert_eq!(processes_matching(&data_a), vec![]);
    // B is untouched.
    assert_eq!(
        b.psql("postgres", "SELECT count(*) FROM t").unwrap().trim(),
        "2"
    );
    drop(b);
    assert_eq!(processes_matching(&data_b), vec![]);
}

/// Where `killed_test_process_leaves_nothing` tells its helper to work.
const HELPER_DIR: &str = "COVET_HARNESS_HELPER_DIR";

/// Not a test on its own: the child process of `killed_test_process_leaves_nothing`.
#[test]
#[ignore = "helper, run by killed_test_process_leaves_nothing"]
fn helper_starts_everything_and_waits_to_be_killed() {
    let Some(dir) = std::env::var_os(HELPER_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let sandbox = SystemdSandbox::start(&dir.join("s")).unwrap();
    sandbox
        .install_unit(
            "orphan.service",
            "[Service]\nExecStart=/usr/bin/python3 -c \"import os, time; os.fork() or os.setsid(); time.sleep(300)\" covet-orphan-marker\n",
        )
        .unwrap();
    assert_ok("start", &sandbox.systemctl(&["start", "orphan.service"]));
    wait_active(&sandbox, "orphan.service", "active");
    let _pg = PostgresCluster::start(&dir.join("p")).unwrap();
    fs::write(dir.join("ready"), "").unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn killed_test_process_leaves_nothing() {
    if SystemdSandbox::unavailable().is_some() || PostgresCluster::unavailable().is_some() {
        // Let the other tests report the skip (or the CI failure).
        return;
    }
    let dir = sandbox_dir("harness-kill");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness::helper_starts_everything_and_waits_to_be_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_DIR, dir.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("run the helper test");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("ready").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the helper exited with {status} before it was ready");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the helper was not ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = dir.path().to_string_lossy().into_owned();
    let mut everything = processes_matching(&path);
    everything.extend(processes_matching("covet-orphan-marker"));
    assert!(
        everything.len() >= 4,
        "script, 2 service processes, postmaster: {everything:?}"
    );

    // SIGKILL: no Drop runs; PR_SET_PDEATHSIG must do the cleaning.
    let helper = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !still_alive(&everything).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind by a killed test: {:?}",
            still_alive(&everything)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The next sandbox removes the dead helper's (empty) cgroups.
    let next_dir = sandbox_dir("harness-kill-next");
    let _next = SystemdSandbox::start(next_dir.path()).unwrap();
    let prefix = format!("covet-sandbox-{helper}-");
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"] {
        let stale: Vec<_> = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .collect();
        assert!(stale.is_empty(), "stale cgroups in {root}: {stale:?}");
    }
}
