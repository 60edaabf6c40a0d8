//! A sample app deployed in slots behind a real nginx, for the blue-green
//! and canary tests and their benchmark: the app as an operator has it
//! before the first slotted deploy (`covet.service` on its own port,
//! nginx's upstream pointing there), the slot template installed, and an
//! agent whose `[app.deploy]` names the strategy.

use std::path::PathBuf;

use covet_proto::v1 as pb;

use crate::agent::{CtlOutput, TestAgent};
use crate::http::wait_healthy;
use crate::load::Load;
use crate::nginx::{self, Nginx};
use crate::postgres::{PostgresCluster, postgres_or_skip};
use crate::sampleapp::{self, SampleApp};
use crate::sandbox::{SystemdSandbox, sandbox_or_skip};
use crate::{free_port, sandbox_dir};

/// The app's own unit, which serves before the first slotted deploy.
pub const UNIT: &str = "covet.service";
/// Requests per second through nginx in the tests.
pub const RATE: u32 = 40;
/// The env edit 0.2.0 needs.
pub const RENAME: [&str; 2] = ["--env-rename", "DATABASE_URI=DATABASE_URL"];

pub struct World {
    pub agent: TestAgent,
    pub sandbox: SystemdSandbox,
    pub pg: PostgresCluster,
    pub app: SampleApp,
    pub nginx: Nginx,
    pub slots_dir: PathBuf,
    pub blue: u16,
    pub green: u16,
    pub _dir: tempfile::TempDir,
}

/// The app as before its first slotted deploy, nginx in front, and an agent
/// whose `[app.deploy]` says `strategy` (the body's extra lines appended).
impl World {
    /// The app as before its first slotted deploy, nginx in front, and an
    /// agent whose `[app.deploy]` says `strategy` (`extra_deploy` appended).
    pub async fn start(strategy: &str, extra_deploy: &str) -> Option<World> {
        if let Some(why) = nginx::unavailable() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = sandbox_dir("bluegreen");
        let sandbox = sandbox_or_skip(&dir.path().join("systemd"))?;
        let pg = postgres_or_skip(&dir.path().join("pg"))?;
        let app = sampleapp::install(&dir.path().join("app"), &pg, 10).unwrap();
        sandbox
            .install_unit(
                UNIT,
                &sampleapp::unit_file(&app.venv, &app.env_file, app.port),
            )
            .unwrap();
        let slots_dir = dir.path().join("slots");
        let releases_dir = dir.path().join("releases");
        // What an operator installs once: the template the slots run as.
        sandbox
            .install_unit(
                "covet@.service",
                &format!(
                    "[Unit]\nDescription=CovetPy slot %i (covet-agent tests)\n\n\
                 [Service]\nType=simple\n\
                 EnvironmentFile={env}\n\
                 EnvironmentFile={slots}/%i.env\n\
                 ExecStart=/usr/bin/env COVET_BIND=127.0.0.1:${{PORT}} {slots}/%i/bin/covet serve\n\
                 Restart=no\n",
                    env = app.env_file.display(),
                    slots = slots_dir.display(),
                ),
            )
            .unwrap();
        let out = sandbox.systemctl(&["start", UNIT]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_healthy(app.port, "0.1.9").await;
        let nginx = Nginx::start(&sandbox, &dir.path().join("nginx"), app.port).unwrap();
        let (blue, green) = (free_port(), free_port());
        let app_toml = app.agent_toml(&pg).replace(
            "[app.package]\nkind = \"pip\"\n",
            &format!(
                "[app.package]\nkind = \"pip\"\nreleases_dir = {:?}\n",
                releases_dir.display().to_string()
            ),
        );
        let toml = format!(
            "{}{app_toml}\n[app.deploy]\nstrategy = \"{strategy}\"\nunit_template = \"covet@.service\"\n\
         slots = {{ blue = {blue}, green = {green} }}\ndrain = \"1s\"\nslots_dir = {:?}\n{extra_deploy}\n{}",
            sandbox.agent_toml(Some("500ms")),
            slots_dir.display().to_string(),
            nginx.traffic_toml(),
        );
        let agent = TestAgent::start_with_toml(&dir.path().join("agent"), toml).await;
        Some(World {
            agent,
            sandbox,
            pg,
            app,
            nginx,
            slots_dir,
            blue,
            green,
            _dir: dir,
        })
    }
}

impl World {
    /// covetctl, off the runtime's worker (the load runs on it meanwhile).
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        tokio::task::block_in_place(|| self.agent.ctl("operator", args))
    }

    pub fn upgrade(&self, version: &str, extra: &[&str]) -> CtlOutput {
        let mut args = vec![
            "-o",
            "json",
            "--timeout",
            "60s",
            "upgrade",
            "covet",
            "--to",
            version,
        ];
        args.extend_from_slice(extra);
        self.ctl(&args)
    }

    /// Starts an upgrade with the env rename and a watch window; its id.
    pub async fn start_upgrade(&self, version: &str, watch_seconds: i64) -> String {
        self.start_canary(version, watch_seconds, &[], 0).await
    }

    /// [`World::start_upgrade`] with canary steps, each judged `step_wait` seconds.
    pub async fn start_canary(
        &self,
        version: &str,
        watch_seconds: i64,
        percents: &[u32],
        step_wait: i64,
    ) -> String {
        let mut client = pb::upgrade_service_client::UpgradeServiceClient::new(
            self.agent.channel("operator").await,
        );
        let op = client
            .upgrade(pb::UpgradeRequest {
                app: "covet".into(),
                to_version: version.into(),
                env_edits: vec![pb::EnvEdit {
                    edit: Some(pb::env_edit::Edit::Rename(pb::EnvRename {
                        from: "DATABASE_URI".into(),
                        to: "DATABASE_URL".into(),
                    })),
                }],
                watch: Some(prost_types::Duration {
                    seconds: watch_seconds,
                    nanos: 0,
                }),
                canary_percents: percents.to_vec(),
                step_wait: (step_wait > 0).then_some(prost_types::Duration {
                    seconds: step_wait,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        op.id
    }

    pub async fn operations(&self) -> Vec<pb::Operation> {
        let mut ops = pb::operation_service_client::OperationServiceClient::new(
            self.agent.channel("reader").await,
        );
        ops.list_operations(pb::ListOperationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .operations
    }

    pub fn active(&self, unit: &str) -> bool {
        self.sandbox
            .systemctl(&["is-active", unit])
            .status
            .success()
    }

    pub fn live(&self) -> Option<String> {
        std::fs::read_link(self.slots_dir.join("live"))
            .ok()
            .map(|p| p.display().to_string())
    }

    pub fn upstream(&self) -> String {
        std::fs::read_to_string(self.nginx.upstream_file()).unwrap()
    }

    /// A load on /health through nginx at the tests' rate.
    pub fn load(&self) -> Load {
        self.load_at(RATE)
    }

    pub fn load_at(&self, rate: u32) -> Load {
        Load::start(self.nginx.port, "/health", rate)
    }
}
