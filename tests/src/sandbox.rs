//! A real `systemd --user` manager with its own user bus and journald, one
//! per test, in private mount and PID namespaces, torn down when dropped.
//!
//! `tests/sandbox/systemd-sandbox.sh` runs as PID 1 of the new PID namespace:
//! it mounts a private tmpfs on /run/systemd (so systemd believes it was
//! booted), binds `DIR/journal` on /run/log/journal, starts journald and then
//! the manager. Everything lives under the sandbox directory:
//!
//! - `DIR/run/bus`: the user bus (socket-activated dbus-daemon), reachable
//!   from outside the namespaces as `unix:path=DIR/run/bus`;
//! - `DIR/config/systemd/user/`: unit files;
//! - `DIR/journal/<machine-id>/*.journal`: what the services printed;
//! - `DIR/sandbox.log`: the script's (and the manager's) stdout and stderr.
//!
//! PIDs that this manager reports (MainPID, ExecMainPID, `_PID` in the
//! journal) are local to its PID namespace: they do not name host processes.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

const SYSTEMD: &str = "/lib/systemd/systemd";
const JOURNALD: &str = "/lib/systemd/systemd-journald";
/// From dbus-user-session: socket activation of the user bus at `$XDG_RUNTIME_DIR/bus`.
const USER_BUS_SOCKET: &str = "/usr/lib/systemd/user/dbus.socket";
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// `sun_path` holds 108 bytes: leave room for the sockets under `DIR/run/`.
const MAX_DIR_LEN: usize = 70;
/// Cgroup hierarchies the script moves itself into (hybrid, legacy, pure v2).
const CGROUP_ROOTS: [&str; 3] = [
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup/systemd",
    "/sys/fs/cgroup",
];

/// A private mount namespace (for the /run mounts) and PID namespace (so
/// that the death of its init, the script, kills every process in it).
const UNSHARE_ARGS: [&str; 7] = [
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
];

pub struct SystemdSandbox {
    dir: PathBuf,
    /// Name of the sandbox's own cgroup, under each hierarchy's root.
    cgroup: String,
    /// `unshare`, the session leader; its only child is the namespace's PID 1.
    child: Child,
}

/// What an unavailable machine lacks, or None. Probed once per process.
fn probe() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (namespaces and /run mounts need it)".into());
    }
    for (path, package) in [
        (SYSTEMD, "systemd"),
        (JOURNALD, "systemd"),
        (USER_BUS_SOCKET, "dbus-user-session"),
        ("/usr/bin/dbus-daemon", "dbus-daemon"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{path} is missing (Debian package {package})"));
        }
    }
    for tool in ["unshare", "busctl", "systemctl", "journalctl"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not on PATH"));
        }
    }
    // Namespaces may be forbidden (containers without CAP_SYS_ADMIN, seccomp).
    let probe = Command::new("unshare")
        .args(UNSHARE_ARGS)
        .arg("true")
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`unshare {} true` failed: {}",
            UNSHARE_ARGS.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// True when CI is set: a missing sandbox must then fail the test, not skip it.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The uid and gid of system user `name`, if it exists.
pub(crate) fn system_user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null result of getpwnam.
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

/// Installs and starts the sample app's unit in the sandbox, waits until
/// 0.1.9 is healthy, then starts an agent in `agent_dir` for it with the
/// `[[app]]` block `app_toml` (500 ms settle).
pub async fn start_app_and_agent(
    sandbox: &SystemdSandbox,
    app: &crate::sampleapp::SampleApp,
    app_toml: &str,
    agent_dir: &Path,
) -> crate::agent::TestAgent {
    let unit = crate::sampleapp::UNIT;
    sandbox.install_unit(unit, &app.unit_file()).unwrap();
    let out = sandbox.systemctl(&["start", unit]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::http::wait_healthy(app.port, "0.1.9").await;
    let toml = format!("{}{app_toml}\n", sandbox.agent_toml(Some("500ms")));
    crate::agent::TestAgent::start_with_toml(agent_dir, toml).await
}

/// Stops a server that is this process's child: `signal` (its fast
/// shutdown), then SIGKILL after `limit`. `what` names it in the message.
pub(crate) fn stop_server(mut child: Child, signal: libc::c_int, limit: Duration, what: &str) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{what}: no shutdown within {limit:?}, killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// For tests: `start()`, or None after printing "SKIPPED: <why>" to stderr
/// when `unavailable` says this machine cannot run `what`. With CI set,
/// panics instead of skipping. Panics when the start fails.
pub(crate) fn start_or_skip<T>(
    what: &str,
    unavailable: Option<String>,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
    if let Some(why) = unavailable {
        assert!(
            !in_ci(),
            "{what} unavailable and CI is set, so this is a failure, not a skip: {why}"
        );
        eprintln!("SKIPPED: {what} unavailable: {why}");
        return None;
    }
    Some(start().unwrap_or_else(|e| panic!("start {what}: {e:#}")))
}

/// A command run as the system user `user` (a database server's) through
/// setpriv, from `/` (the user may not be able to enter the test's cwd),
/// stdin closed. setpriv sets its parent-death signal again after the uid
/// change, which clears it.
pub(crate) fn as_system_user(user: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", user, "--init-groups"])
        // Set last, after the uid change (which would clear it).
        .args(["--pdeathsig", "KILL", "--"])
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null());
    cmd
}

/// Runs a short command as `user`, killed if the test dies.
pub(crate) fn run_as_system_user(user: &str, args: &[&str]) -> io::Result<Output> {
    let mut cmd = as_system_user(user, args);
    die_with_parent(&mut cmd);
    cmd.output()
}

/// Sets up a child so that it is killed when the thread that spawns it ends
/// (a killed test process included) and leads a session of its own.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (setsid, prctl, getppid, _exit)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns a long-lived child that dies with this process, not earlier.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so
/// children spawned from a test's helper thread (`thread::scope`,
/// `spawn_blocking`) would be killed when that thread returns. Spawning them
/// all from one thread that lives as long as the process avoids that.
pub(crate) fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("covet-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the covet-spawner thread");
        Mutex::new(tx)
    });
    die_with_parent(&mut cmd);
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| io::Error::other("covet-spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("covet-spawner thread is gone"))?
}

impl SystemdSandbox {
    /// None when this machine can run sandboxes; Some(reason) otherwise.
    pub fn unavailable() -> Option<String> {
        static PROBE: OnceLock<Option<String>> = OnceLock::new();
        PROBE.get_or_init(probe).clone()
    }

    /// Starts the sandbox under `dir` and waits (at most 15 s) until the user
    /// bus answers and the manager reports `running` (or `degraded`).
    ///
    /// Its processes die with the test process (PR_SET_PDEATHSIG), even if
    /// that is SIGKILLed and Drop never runs.
    pub fn start(dir: &Path) -> anyhow::Result<SystemdSandbox> {
        if let Some(why) = Self::unavailable() {
            bail!("systemd sandbox unavailable: {why}");
        }
        let dir = std::path::absolute(dir).context("sandbox dir")?;
        let len = dir.as_os_str().len();
        ensure!(
            len <= MAX_DIR_LEN,
            "sandbox dir {} is {len} bytes long, more than {MAX_DIR_LEN}: its unix sockets would not fit",
            dir.display()
        );
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

        sweep_stale_cgroups();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let cgroup = format!(
            "covet-sandbox-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sandbox/systemd-sandbox.sh");
        let log_path = dir.join("sandbox.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new("unshare");
        cmd.args(UNSHARE_ARGS)
            .arg("/bin/sh")
            .arg(&script)
            .arg(&dir)
            .arg(&cgroup)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied_to_process(cmd).context("spawn unshare")?;
        // From here on, Drop cleans up whatever happens.
        let mut sandbox = SystemdSandbox { dir, cgroup, child };
        sandbox.wait_ready()?;
        Ok(sandbox)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let bus = self.dir.join("run/bus");
        let mut last = String::from("bus socket not there yet");
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "systemd sandbox exited with {status} before it was ready\n--- {}:\n{}",
                    self.dir.join("sandbox.log").display(),
                    self.log()
                );
            }
            if bus.exists() {
                let out = self.busctl(&[
                    "get-property",
                    "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager",
                    "SystemState",
                ]);
                let stdout = String::from_utf8_lossy(&out.stdout);
                // busctl prints `s "running"`.
                if out.status.success()
                    && (stdout.contains("\"running\"") || stdout.contains("\"degraded\""))
                {
                    return Ok(());
                }
                last = format!(
                    "SystemState: {} {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "systemd sandbox in {} not ready after {START_TIMEOUT:?} ({last})\n--- sandbox.log:\n{}",
                    self.dir.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The sandbox's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// D-Bus address of the user bus, for the agent's `[systemd] bus`.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.join("run/bus").display())
    }

    /// Directory of journal files, for `journalctl --directory` (the agent's
    /// `[systemd] journal_dir`). Files are in its `<machine-id>/` subdirectory.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// The agent's `[systemd]` section for this sandbox: its bus, its
    /// journal, and `settle` when given (the time a started unit must stay up).
    pub fn agent_toml(&self, settle: Option<&str>) -> String {
        let mut toml = format!(
            "\n[systemd]\nbus = \"{}\"\njournal_dir = \"{}\"\n",
            self.bus_address(),
            self.journal_dir().display()
        );
        if let Some(settle) = settle {
            toml.push_str(&format!("settle = \"{settle}\"\n"));
        }
        toml
    }

    /// Where unit files go.
    pub fn unit_dir(&self) -> PathBuf {
        self.dir.join("config/systemd/user")
    }

    /// What the sandbox script and the manager printed.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sandbox.log")).unwrap_or_default()
    }

    /// Writes a unit file into the manager's unit dir and reloads the manager.
    pub fn install_unit(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        ensure!(
            !name.is_empty() && !name.contains('/') && name.contains('.'),
            "bad unit name {name:?}"
        );
        let path = self.unit_dir().join(name);
        fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        let out = self.systemctl(&["daemon-reload"]);
        ensure!(
            out.status.success(),
            "systemctl --user daemon-reload failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Runs the real `systemctl --user ARGS` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        // Without XDG_RUNTIME_DIR, `systemctl --user` goes through the user bus
        // at DBUS_SESSION_BUS_ADDRESS. With it, systemctl would use the
        // manager's private socket, which resets connections from outside the
        // PID namespace.
        Command::new("systemctl")
            .arg("--user")
            .arg("--no-pager")
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", self.bus_address())
            .env_remove("XDG_RUNTIME_DIR")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .expect("run systemctl")
    }

    /// Runs `journalctl --directory=JOURNAL_DIR --no-pager ARGS`.
    pub fn journalctl(&self, args: &[&str]) -> Output {
        Command::new("journalctl")
            .arg(format!("--directory={}", self.journal_dir().display()))
            .arg("--no-pager")
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .expect("run journalctl")
    }

    /// Runs `busctl --address=BUS ARGS` (e.g. `call`, `get-property`).
    pub fn busctl(&self, args: &[&str]) -> Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.bus_address()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run busctl")
    }

    /// The journal entries of `unit` (`journalctl -u UNIT -o json`).
    pub fn journal(&self, unit: &str) -> Vec<serde_json::Value> {
        let out = self.journalctl(&["-u", unit, "-o", "json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `unit` logged a MESSAGE containing `needle`, and returns that entry.
    pub fn wait_journal(
        &self,
        unit: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.journal(unit);
            if let Some(e) = entries
                .iter()
                .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains(needle)))
            {
                return Ok(e.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "{unit} did not log {needle:?} within {timeout:?}; its journal: {entries:#?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts the user bus: `systemctl --user restart --no-block dbus.service`
    /// (a new dbus-daemon; every existing connection is closed; dbus.socket
    /// keeps listening, so new connections wait for the new daemon), then
    /// waits until the new daemon runs and calls to the manager work again.
    pub fn restart_bus(&self) -> anyhow::Result<()> {
        let before = self.dbus_invocation()?;
        // --no-block: the reply must not depend on the daemon being replaced.
        let out = self.systemctl(&["restart", "--no-block", "dbus.service"]);
        ensure!(
            out.status.success(),
            "systemctl --user restart dbus.service failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.dbus_invocation();
            if let Ok(ref id) = now
                && *id != before
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the user bus did not come back within 10 s (last: {now:?})");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// InvocationID of a running dbus.service: it changes on every restart.
    fn dbus_invocation(&self) -> anyhow::Result<String> {
        let out = self.systemctl(&[
            "show",
            "dbus.service",
            "--property=ActiveState,InvocationID",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains("ActiveState=active"),
            "dbus.service not active: {} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        text.lines()
            .find_map(|l| l.strip_prefix("InvocationID="))
            .map(str::to_owned)
            .context("no InvocationID")
    }

    /// Name of the sandbox's cgroup (`covet-sandbox-PID-N`) under each hierarchy.
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// Host PIDs of every process of the sandbox (the namespace's init,
    /// journald, the manager, dbus-daemon, services), from its cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Some(root) = self.cgroup_dirs().first() {
            collect_procs(root, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The sandbox's cgroup directories that exist.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        CGROUP_ROOTS
            .iter()
            .map(|root| Path::new(root).join(&self.cgroup))
            .filter(|p| p.is_dir())
            .collect()
    }

    /// PID (host) of the namespace's init, i.e. of the sandbox script.
    fn init_pid(&self) -> Option<libc::pid_t> {
        let pid = self.child.id();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), pids);
            }
        }
    }
}

/// Removes a cgroup tree, leaves first (rmdir fails while a cgroup has processes).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes the cgroups of sandboxes whose test process died without Drop
/// (their processes died with it). A live process's cgroups are left alone.
fn sweep_stale_cgroups() {
    for root in CGROUP_ROOTS {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.strip_prefix("covet-sandbox-"))
                .and_then(|n| n.split('-').next())
            else {
                continue;
            };
            if !Path::new("/proc").join(owner).exists() {
                remove_cgroup(&e.path());
            }
        }
    }
}

impl Drop for SystemdSandbox {
    fn drop(&mut self) {
        // SIGTERM to the script: the manager stops its services and exits,
        // then the script exits, and the kernel kills what is left in the
        // PID namespace.
        if let Some(init) = self.init_pid() {
            // SAFETY: kill(2); `init` is unshare's unreaped child, so the PID
            // cannot have been reused.
            unsafe { libc::kill(init, libc::SIGTERM) };
        }
        if !self.wait_exit(STOP_TIMEOUT) {
            eprintln!(
                "systemd sandbox {}: no clean stop within {STOP_TIMEOUT:?}, killing it",
                self.dir.display()
            );
            // unshare --kill-child SIGKILLs the namespace's init, and with it the namespace.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // Belt and braces: nothing can leave the PID namespace, but kill
        // anything still in the cgroup, then remove it.
        let dirs = self.cgroup_dirs();
        if let Some(unified) = dirs.iter().find(|d| d.join("cgroup.kill").exists()) {
            let _ = fs::write(unified.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in dirs {
            remove_cgroup(&dir);
        }
    }
}

/// For tests: the sandbox, or None after printing "SKIPPED: <why>" to stderr
/// when this machine cannot run one. With CI set, panics instead of skipping.
/// Panics when the machine can run sandboxes but this one fails to start.
pub fn sandbox_or_skip(dir: &Path) -> Option<SystemdSandbox> {
    if let Some(why) = SystemdSandbox::unavailable() {
        assert!(
            !in_ci(),
            "systemd sandbox unavailable and CI is set, so this is a failure, not a skip: {why}"
        );
        eprintln!("SKIPPED: systemd sandbox unavailable: {why}");
        return None;
    }
    Some(SystemdSandbox::start(dir).unwrap_or_else(|e| panic!("start systemd sandbox: {e:#}")))
}
