//! A real nginx (Debian's nginx-light) in front of the sample app, for the
//! blue-green and canary tests: its own prefix, config and pid file under
//! the test's directory, one loopback port, run as a unit of the test's
//! systemd sandbox so the agent reloads it over D-Bus as it would
//! `nginx.service` on a host.
//!
//! The site proxies to `upstream covet`, defined in the file the agent
//! owns (`upstream.conf`); the harness writes its first version, pointing
//! at the app's own port, as an operator would before the first deploy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::sandbox::SystemdSandbox;

pub const NGINX: &str = "/usr/sbin/nginx";
/// The unit nginx runs as in the sandbox.
pub const UNIT: &str = "nginx-test.service";

pub struct Nginx {
    prefix: PathBuf,
    pub port: u16,
}

/// Whether nginx is installed (the tests install it in CI; see scripts/lib.sh).
pub fn unavailable() -> Option<String> {
    (!Path::new(NGINX).exists())
        .then(|| format!("{NGINX} is not installed (apt-get install nginx-light)"))
}

impl Nginx {
    /// Writes the config (the upstream first pointing at `first_port`),
    /// installs the unit in `sandbox`, starts it and waits until it answers.
    pub fn start(sandbox: &SystemdSandbox, dir: &Path, first_port: u16) -> anyhow::Result<Nginx> {
        let prefix = std::path::absolute(dir).context("nginx dir")?;
        std::fs::create_dir_all(prefix.join("tmp")).context("nginx tmp dir")?;
        let nginx = Nginx {
            port: crate::try_free_port()?,
            prefix,
        };
        std::fs::write(
            nginx.upstream_file(),
            format!("upstream covet {{\n    server 127.0.0.1:{first_port};\n}}\n"),
        )
        .context("write upstream.conf")?;
        std::fs::write(nginx.conf(), nginx.conf_text()).context("write nginx.conf")?;
        let unit = format!(
            "[Unit]\nDescription=nginx in front of the sample app (covet-agent tests)\n\n\
             [Service]\nType=simple\n\
             ExecStart={NGINX} -p {p}/ -c {c} -g 'daemon off;'\n\
             ExecReload=/bin/kill -HUP $MAINPID\n\
             Restart=no\n",
            p = nginx.prefix.display(),
            c = nginx.conf().display(),
        );
        sandbox.install_unit(UNIT, &unit)?;
        let out = sandbox.systemctl(&["start", UNIT]);
        ensure!(
            out.status.success(),
            "starting nginx: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", nginx.port)).is_err() {
            if Instant::now() > until {
                bail!(
                    "nginx does not listen on {}: {}",
                    nginx.port,
                    std::fs::read_to_string(nginx.prefix.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    fn conf(&self) -> PathBuf {
        self.prefix.join("nginx.conf")
    }

    /// The file the agent writes.
    pub fn upstream_file(&self) -> PathBuf {
        self.prefix.join("upstream.conf")
    }

    /// `nginx -t` of this nginx, as the agent's `[app.traffic] test`.
    pub fn test_argv(&self) -> Vec<String> {
        vec![
            NGINX.into(),
            "-p".into(),
            format!("{}/", self.prefix.display()),
            "-c".into(),
            self.conf().display().to_string(),
            "-t".into(),
            "-q".into(),
        ]
    }

    /// `[app.traffic]` for this nginx.
    pub fn traffic_toml(&self) -> String {
        let test: Vec<String> = self.test_argv().iter().map(|a| format!("{a:?}")).collect();
        format!(
            "[app.traffic]\nkind = \"nginx\"\nupstream_file = {:?}\nupstream = \"covet\"\n\
             test = [{}]\nreload_unit = \"{UNIT}\"\nverify_url = \"http://127.0.0.1:{}/health\"\n",
            self.upstream_file().display().to_string(),
            test.join(", "),
            self.port
        )
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    fn conf_text(&self) -> String {
        let p = self.prefix.display();
        // A failed or refused upstream connection is retried on the next
        // server (a canary's other slot); keepalive off so each request
        // shows which slot served it.
        format!(
            "worker_processes 1;\n\
             pid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {p}/tmp/body;\n\
             \x20   proxy_temp_path {p}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {p}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {p}/tmp/scgi;\n\
             \x20   include {upstream};\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://covet;\n\
             \x20           proxy_next_upstream error timeout http_502;\n\
             \x20           proxy_connect_timeout 2s;\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            upstream = self.upstream_file().display(),
            port = self.port,
        )
    }
}
