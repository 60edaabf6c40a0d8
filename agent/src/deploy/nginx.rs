//! The nginx in front of the slots: the agent owns one file holding one
//! `upstream` block, which the operator's site includes and proxies to
//! (`proxy_pass http://NAME;`). A route is written atomically, checked
//! with the declared test command (`nginx -t`), and nginx reloaded over
//! D-Bus; a file the test refuses is replaced by the previous one at once,
//! so nginx never loads it.
//!
//! A canary's share is a server weight (each request goes to a server in
//! proportion), not `split_clients`: a share that needs no key and that
//! the reload applies to requests already queued.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::{DeployError, replace_file};
use crate::config::NginxTrafficConfig;
use crate::host::systemd::{ControlledUnit, DeclaredUnits, Systemd, UnitAction};

/// How long the declared test command may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the requests go: each port with its weight (all of them when alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub servers: Vec<(u16, u32)>,
    /// For the file's comment: which slots these are.
    pub label: String,
}

impl Route {
    /// Every request to one slot.
    pub fn only(slot: &str, port: u16) -> Route {
        Route {
            servers: vec![(port, 1)],
            label: format!("slot {slot}"),
        }
    }

    /// `percent` of the requests to `new`, the rest to `old`.
    pub fn split(old: (&str, u16), new: (&str, u16), percent: u8) -> Route {
        let percent = u32::from(percent.clamp(1, 99));
        Route {
            servers: vec![(old.1, 100 - percent), (new.1, percent)],
            label: format!(
                "{}% slot {}, {}% slot {}",
                100 - percent,
                old.0,
                percent,
                new.0
            ),
        }
    }
}

/// The proxy of one app.
pub struct Traffic<'a> {
    cfg: &'a NginxTrafficConfig,
    upstream: &'a str,
}

/// Only the declared reload unit may be reloaded from here.
struct ReloadUnit<'a>(&'a str);

impl DeclaredUnits for ReloadUnit<'_> {
    fn declares(&self, unit: &str) -> bool {
        unit == self.0
    }
}

impl<'a> Traffic<'a> {
    pub fn new(cfg: &'a NginxTrafficConfig, app: &'a str) -> Traffic<'a> {
        Traffic {
            upstream: cfg.upstream.as_deref().unwrap_or(app),
            cfg,
        }
    }

    /// The upstream file's text for `route`.
    pub fn render(&self, route: &Route) -> String {
        let mut text = format!(
            "# Written by covet-agent: {}. Do not edit; covetctl upgrade changes it.\nupstream {} {{\n",
            route.label, self.upstream
        );
        let alone = route.servers.len() == 1;
        for (port, weight) in &route.servers {
            if alone {
                text.push_str(&format!("    server 127.0.0.1:{port};\n"));
            } else {
                text.push_str(&format!("    server 127.0.0.1:{port} weight={weight};\n"));
            }
        }
        text.push_str("}\n");
        text
    }

    /// The file as it is now (None: there is none yet).
    pub fn current(&self) -> Result<Option<String>, DeployError> {
        match std::fs::read_to_string(&self.cfg.upstream_file) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(super::io_error("read", &self.cfg.upstream_file)(e)),
        }
    }

    /// Sends the requests along `route`: file, test, reload.
    pub async fn apply(
        &self,
        systemd: &Systemd,
        route: &Route,
        job_timeout: Duration,
    ) -> Result<(), DeployError> {
        self.put(systemd, Some(self.render(route)), job_timeout)
            .await
    }

    /// Writes `text` as the upstream file (None removes it), tests it and
    /// reloads nginx; a refused file is replaced by what was there.
    pub async fn put(
        &self,
        systemd: &Systemd,
        text: Option<String>,
        job_timeout: Duration,
    ) -> Result<(), DeployError> {
        let before = self.current()?;
        if before == text {
            return self.reload(systemd, job_timeout).await;
        }
        self.write(text.as_deref()).await?;
        if let Err(e) = self.test().await {
            self.write(before.as_deref()).await?;
            return Err(e);
        }
        self.reload(systemd, job_timeout).await
    }

    async fn write(&self, text: Option<&str>) -> Result<(), DeployError> {
        let path = self.cfg.upstream_file.clone();
        let text = text.map(str::to_owned);
        tokio::task::spawn_blocking(move || match text {
            Some(text) => replace_file(&path, text.as_bytes(), 0o644),
            None => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(super::io_error("remove", &path)(e)),
            },
        })
        .await?
    }

    /// Whether nginx's configuration passes the declared test now (a
    /// preflight check: a switch must not be the first to find it broken).
    pub async fn check(&self) -> Result<(), DeployError> {
        match self.test().await {
            Err(DeployError::TestFailed { command, output }) => {
                Err(DeployError::ProxyBroken { command, output })
            }
            other => other,
        }
    }

    async fn test(&self) -> Result<(), DeployError> {
        let command = self.cfg.test.join(" ");
        let lines = std::sync::Mutex::new(Vec::<String>::new());
        let keep = |_: bool, line: &str| {
            lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.to_owned());
        };
        let never = AtomicBool::new(false);
        match crate::host::process::run(&self.cfg.test, None, &[], TEST_TIMEOUT, &never, &keep)
            .await
        {
            Ok(_) => Ok(()),
            Err(crate::host::process::ProcessError::Failed { .. }) => {
                let output = lines.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                Err(DeployError::TestFailed { command, output })
            }
            Err(source) => Err(DeployError::Test { command, source }),
        }
    }

    async fn reload(&self, systemd: &Systemd, job_timeout: Duration) -> Result<(), DeployError> {
        let name = self.cfg.reload_unit.as_str();
        let reload = |source| DeployError::Reload {
            unit: name.to_owned(),
            source,
        };
        let unit = ControlledUnit::admit(&ReloadUnit(name), name).map_err(reload)?;
        let job = systemd
            .act(UnitAction::Reload, &unit, job_timeout)
            .await
            .map_err(reload)?;
        if job.result != "done" {
            return Err(DeployError::ReloadJob {
                unit: name.to_owned(),
                result: job.result,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NginxTrafficConfig {
        NginxTrafficConfig {
            upstream_file: "/etc/nginx/conf.d/covet-upstream.conf".into(),
            upstream: None,
            test: vec!["/usr/sbin/nginx".into(), "-t".into()],
            reload_unit: "nginx.service".into(),
            verify_url: "http://127.0.0.1/health".into(),
            verify_field: "version".into(),
        }
    }

    #[test]
    fn routes_render_as_one_upstream_block() {
        let cfg = cfg();
        let traffic = Traffic::new(&cfg, "covet");
        assert_eq!(
            traffic.render(&Route::only("green", 8002)),
            "# Written by covet-agent: slot green. Do not edit; covetctl upgrade changes it.\n\
             upstream covet {\n    server 127.0.0.1:8002;\n}\n"
        );
        let split = traffic.render(&Route::split(("blue", 8001), ("green", 8002), 10));
        assert!(split.contains("server 127.0.0.1:8001 weight=90;\n"));
        assert!(split.contains("server 127.0.0.1:8002 weight=10;\n"));
        assert!(split.contains("90% slot blue, 10% slot green"));
    }
}
