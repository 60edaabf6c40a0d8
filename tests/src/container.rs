//! A booted Debian 12 for tests that need a real *system* manager: PID 1 is
//! systemd, with its own journald and system bus, as on a server.
//!
//! The root file system is debootstrapped once per target directory
//! (`target/covet-debian12/root`, minbase + systemd + dbus, about 40 s) and
//! never changed afterwards: each [`BootedDebian`] boots it with
//! `systemd-nspawn --volatile=overlay`, so everything a test writes lands in a
//! tmpfs layer that vanishes with the container. The container shares the
//! host's network namespace, so a service listening on 127.0.0.1 inside is
//! reachable from the test. Never boot `systemd --system` on the host's own
//! root: its early-boot units would act on the host.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const SUITE: &str = "bookworm";
/// The base system plus the libraries the packages depend on (dpkg -i does
/// not fetch dependencies): libsqlite3-0 for the agent's SQLite kind.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,libsqlite3-0";

/// Why this machine cannot boot a test container, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("booting a container needs root".to_owned());
    }
    ["/usr/sbin/debootstrap", "/usr/bin/systemd-nspawn"]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| {
            format!("{p} is missing (scripts/test.sh installs debootstrap and systemd-container)")
        })
}

/// The Debian mirror this machine's apt uses (so the test goes wherever apt
/// may), else deb.debian.org.
fn mirror() -> String {
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = sources
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| u.ends_with("/debian"));
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_list = list
        .lines()
        .filter(|l| l.starts_with("deb "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|u| u.ends_with("/debian"));
    from_deb822
        .or(from_list)
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

/// The pristine root under `target`, debootstrapped on first use. Tests in
/// parallel processes wait for each other on a lock; a half-made root from
/// an interrupted run is made again.
pub fn pristine_root(target: &Path) -> anyhow::Result<PathBuf> {
    let base = target.join("covet-debian12");
    fs::create_dir_all(&base)?;
    let lock = File::create(base.join("lock"))?;
    // SAFETY: `lock` is an open descriptor for the duration of the call.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock: {}", std::io::Error::last_os_error());
    }
    let root = base.join("root");
    // The marker names the packages, so a changed list makes the root again.
    let complete = base.join("complete");
    if fs::read_to_string(&complete).is_ok_and(|made| made == PACKAGES) {
        return Ok(root);
    }
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("remove {}", root.display()))?;
    }
    let started = Instant::now();
    let out = Command::new("/usr/sbin/debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&root)
        .arg(mirror())
        .output()
        .context("run debootstrap")?;
    if !out.status.success() {
        bail!(
            "debootstrap {SUITE}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(&complete, PACKAGES)?;
    eprintln!(
        "debootstrapped {} in {:?}",
        root.display(),
        started.elapsed()
    );
    Ok(root)
}

/// A booted container; powered off (and, failing that, killed) when dropped.
pub struct BootedDebian {
    nspawn: Child,
    leader: u32,
    log: PathBuf,
}

impl BootedDebian {
    /// Boots `root` with `binds` (host path, container path) mounted
    /// read-only, and waits until the system is running.
    pub fn boot(root: &Path, log: &Path, binds: &[(&Path, &str)]) -> anyhow::Result<BootedDebian> {
        let mut cmd = Command::new("/usr/bin/systemd-nspawn");
        cmd.arg("--directory")
            .arg(root)
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
            ])
            .arg(format!("--machine=covet-test-{}", std::process::id()));
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let console = File::create(log)?;
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("run systemd-nspawn")?;
        let mut booted = BootedDebian {
            leader: 0,
            nspawn,
            log: log.to_owned(),
        };
        booted.leader = booted.find_leader()?;
        // Until its bus is up, systemctl inside cannot even ask.
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let out = booted.exec(&["systemctl", "is-system-running", "--wait"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if matches!(
                state.as_str(),
                "running" | "degraded" | "maintenance" | "stopping"
            ) || Instant::now() > deadline
            {
                break state;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if state != "running" {
            let failed = booted.exec(&["systemctl", "--failed", "--no-pager"])?;
            bail!(
                "the container booted {state:?}, not running:\n{}\n{}",
                String::from_utf8_lossy(&failed.stdout),
                booted.console()
            );
        }
        Ok(booted)
    }

    /// The container's PID 1, seen from the host: nspawn's child.
    fn find_leader(&mut self) -> anyhow::Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let nspawn = self.nspawn.id();
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                bail!("systemd-nspawn exited with {status}:\n{}", self.console());
            }
            let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                .unwrap_or_default();
            let leader = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|pid| {
                    fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                });
            if let Some(pid) = leader {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "no systemd inside the container after 30s:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a program inside the container (all its namespaces), as root.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        Command::new("/usr/bin/nsenter")
            .arg("--target")
            .arg(self.leader.to_string())
            .args([
                "--mount", "--uts", "--ipc", "--pid", "--root", "--wdns=/", "--",
            ])
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("nsenter {argv:?}"))
    }

    /// Like [`BootedDebian::exec`], failing unless the program succeeds;
    /// returns what it printed (stdout and stderr).
    pub fn run(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv)?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{argv:?} in the container: {}\n{said}", out.status);
        }
        Ok(said)
    }

    /// A path inside the container, as the host reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.leader)).join(inside.trim_start_matches('/'))
    }

    /// One property of a unit (`systemctl show --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> anyhow::Result<String> {
        Ok(self
            .run(&[
                "systemctl",
                "show",
                unit,
                "--value",
                &format!("--property={property}"),
            ])?
            .trim()
            .to_owned())
    }

    /// The unit's journal, for failure messages.
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&[
            "journalctl",
            "-u",
            unit,
            "--no-pager",
            "-n",
            "60",
            "-o",
            "cat",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| e.to_string())
    }

    /// What the container printed on its console.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BootedDebian {
    fn drop(&mut self) {
        // SIGTERM makes nspawn ask the container's systemd to power off.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing the container's PID 1 ends everything in its namespace.
        // SAFETY: kill(2) with a pid we found under our child.
        unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
