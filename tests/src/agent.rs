//! A real covet-agent process on a free loopback port, with its own state
//! directory, killed (and reaped) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use covetctl::connect::{self, ConnectError, Credentials};
use tonic::transport::Channel;

use crate::pki::TestPki;

pub struct TestAgent {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub config_path: PathBuf,
    pub pki: TestPki,
    child: Child,
}

/// How to configure the agent beyond the basics.
#[derive(Default)]
pub struct AgentOptions {
    /// TOML appended to the generated configuration (e.g. `[[app]]` tables).
    pub extra_toml: String,
    /// Serve Prometheus text on a free loopback port.
    pub metrics: bool,
    /// `[tls] min_version`.
    pub min_tls: Option<String>,
}

impl TestAgent {
    /// Creates a PKI under `dir/pki` and starts the agent.
    pub async fn start(dir: &Path, options: AgentOptions) -> TestAgent {
        let pki = TestPki::new(&dir.join("pki"));
        Self::start_with(dir, pki, options).await
    }

    /// [`TestAgent::start`] with `extra_toml` and default options.
    pub async fn start_with_toml(dir: &Path, extra_toml: String) -> TestAgent {
        let options = AgentOptions {
            extra_toml,
            ..Default::default()
        };
        Self::start(dir, options).await
    }

    pub async fn start_with(dir: &Path, pki: TestPki, options: AgentOptions) -> TestAgent {
        let state = dir.join("state");
        let metrics_addr: Option<SocketAddr> = options
            .metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], crate::free_port())));
        let mut toml = format!(
            r#"listen = "127.0.0.1:0"
state_dir = "{state}"
backup_dir = "{backups}"
{metrics}
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
deny = "{deny}"
min_version = "{min_tls}"
"#,
            state = state.display(),
            backups = dir.join("backups").display(),
            metrics = metrics_addr
                .map(|a| format!("metrics_listen = \"{a}\""))
                .unwrap_or_default(),
            ca = pki.ca().display(),
            cert = pki.dir.join("agent.crt").display(),
            key = pki.dir.join("agent.key").display(),
            deny = pki.dir.join("revoked.txt").display(),
            min_tls = options.min_tls.as_deref().unwrap_or("1.3"),
        );
        toml.push_str(&options.extra_toml);
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, toml).expect("write agent config");
        let child = spawn_agent(dir, &config_path);
        let mut agent = TestAgent {
            dir: dir.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr,
            config_path,
            pki,
            child,
        };
        agent.addr = agent.wait_for_addr(&state.join("agent.addr")).await;
        agent
    }

    /// Starts the agent again with the same configuration and state (after
    /// it was killed, say), and waits until it listens.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let addr_file = self.dir.join("state/agent.addr");
        let _ = std::fs::remove_file(&addr_file);
        self.child = spawn_agent(&self.dir, &self.config_path);
        self.addr = self.wait_for_addr(&addr_file).await;
        // covetctl contexts name the old port.
        let _ = std::fs::remove_file(self.dir.join("covetctl.toml"));
    }

    async fn wait_for_addr(&mut self, path: &Path) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(addr) = text.trim().parse()
            {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "covet-agent exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "covet-agent did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Connects with the given credentials (the agent is verified as 127.0.0.1).
    pub async fn connect(&self, creds: &Credentials) -> Result<Channel, ConnectError> {
        let tls = connect::client_tls(creds)?;
        connect::connect(&self.endpoint(), tls, None, Duration::from_secs(10)).await
    }

    /// Connects as one of the PKI's clients (`reader`, `operator`, `admin`, ...).
    pub async fn channel(&self, client: &str) -> Channel {
        self.connect(&self.pki.client(client))
            .await
            .expect("connect to agent")
    }

    /// The audit log, one JSON value a line.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("state/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Waits until an audit record matches `pred` (records are written as calls end).
    pub async fn wait_audit(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.audit().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no matching audit record in {:#?}",
                self.audit()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Writes a covetctl client configuration with one context per client
    /// name (current: the first) and returns its path.
    pub fn ctl_config(&self, clients: &[&str]) -> PathBuf {
        let mut toml = format!("current_context = \"{}\"\n", clients[0]);
        for name in clients {
            let c = self.pki.client(name);
            toml.push_str(&format!(
                "[contexts.{name}]\nendpoints = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                self.endpoint(),
                c.ca.display(),
                c.cert.display(),
                c.key.display()
            ));
        }
        let path = self.dir.join("covetctl.toml");
        std::fs::write(&path, toml).expect("write covetctl config");
        path
    }

    /// Runs covetctl as the client `context` with `args`.
    pub fn ctl(&self, context: &str, args: &[&str]) -> CtlOutput {
        let config = self.dir.join("covetctl.toml");
        if !config.exists() {
            self.ctl_config(&["reader", "operator", "admin"]);
        }
        run_ctl(&config, Some(context), args)
    }
}

fn spawn_agent(dir: &Path, config_path: &Path) -> Child {
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("agent log");
    let _ = writeln!(log, "--- covet-agent starting");
    Command::new(crate::bin("covet-agent"))
        .arg("--config")
        .arg(config_path)
        .env("COVET_LOG", "info,covet_agent=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn covet-agent")
}

/// What a covetctl run printed and how it ended.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "covetctl output is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }

    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "covetctl failed:\n{}\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

pub fn run_ctl(config: &Path, context: Option<&str>, args: &[&str]) -> CtlOutput {
    let mut cmd = Command::new(crate::bin("covetctl"));
    cmd.arg("--config").arg(config);
    if let Some(c) = context {
        cmd.arg("--context").arg(c);
    }
    let out = cmd
        .args(args)
        .env_remove("COVETCTL_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run covetctl");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
