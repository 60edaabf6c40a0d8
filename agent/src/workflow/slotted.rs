//! Blue-green and canary upgrades: the steps that run the new version in
//! the idle slot beside the live one and move the requests to it, and
//! their undo, which moves them back. Users see nothing before the switch:
//! a failure until then stops the idle slot and leaves the proxy alone.
//! After it, the rollback is a switch back, not a reinstall.
//!
//! What the undo needs is written to `ops/ID/slots.json` by the start step
//! before it acts ([`SlotDeploy`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::forward::Upgrade;
use super::opdir::OpDir;
use super::{Deps, PACKAGE_TIMEOUT, Step, StepError, UpgradeSpec, gate};
use crate::config::{AppConfig, DeployConfig, ProbeConfig, Strategy, TrafficConfig};
use crate::deploy::{Route, Slots, Traffic};
use crate::host::systemd::{ControlledUnit, UnitAction};
use crate::ops::OpContext;
use crate::probes::{Attempts, HttpProbeSpec, ProbeSpec};

/// What a slotted upgrade changed, for its undo. A persisted format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotDeploy {
    /// The slot the new version runs in.
    pub new_slot: String,
    /// The slot that served before; None: the app's own unit, before its
    /// first slotted deploy.
    pub old_slot: Option<String>,
    /// Where the new slot's link pointed before.
    pub new_slot_release_before: Option<PathBuf>,
    /// The upstream file before the switch (None: there was none).
    pub upstream_before: Option<String>,
    /// The new version's release virtualenv.
    pub release: PathBuf,
    /// The version the old side serves (empty: unknown).
    #[serde(default)]
    pub old_version: String,
}

/// How long the proxy may take to answer with the new version after a reload.
const VERIFY_ATTEMPTS: Attempts = Attempts {
    timeout: Duration::from_secs(2),
    retries: 40,
    interval: Duration::from_millis(250),
};

/// The app's deploy and traffic config, for an app that uses slots.
fn parts(
    app: &AppConfig,
) -> Result<(&DeployConfig, &crate::config::NginxTrafficConfig), StepError> {
    match (app.slotted(), &app.traffic) {
        (Some(d), Some(TrafficConfig::Nginx(t))) => Ok((d, t)),
        _ => Err(StepError::NotSlotted(app.name.clone())),
    }
}

/// The plan line of a slotted step.
pub fn describe(step: Step, app: &AppConfig, spec: &UpgradeSpec) -> String {
    let Ok((deploy, traffic)) = parts(app) else {
        return String::new();
    };
    let slots = Slots::new(deploy);
    let idle = slots.idle().unwrap_or_else(|_| "?".into());
    let old = match slots.live() {
        Ok(Some(live)) => format!("slot {live}"),
        _ => app.unit.clone(),
    };
    match step {
        Step::Release => {
            let dir = match &app.package {
                Some(crate::config::PackageConfig::Pip(p)) => p
                    .releases_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            format!(
                "install {} into {dir}/{}/venv; {old} keeps serving, untouched",
                spec.to_version, spec.to_version
            )
        }
        Step::Start => format!(
            "point slot {idle} at {} and start {} on port {}",
            spec.to_version,
            slots.unit(&idle),
            slots.port(&idle).unwrap_or_default()
        ),
        Step::Switch => match deploy.strategy {
            Strategy::Canary => format!(
                "send {}% of the requests to slot {idle} through {} (nginx -t, reload)",
                deploy.canary_percent,
                traffic.upstream_file.display()
            ),
            _ => format!(
                "send every request to slot {idle} through {} (nginx -t, reload), then check {} answers {}",
                traffic.upstream_file.display(),
                traffic.verify_url,
                spec.to_version
            ),
        },
        Step::Promote => format!(
            "send every request to slot {idle}, then check {} answers {}",
            traffic.verify_url, spec.to_version
        ),
        Step::Drain => format!(
            "let {old} finish for {}, then stop it",
            humantime::format_duration(deploy.drain)
        ),
        _ => String::new(),
    }
}

/// What preflight checks of a slotted app: the slots' links readable, the
/// idle slot's unit loadable, and the proxy's configuration valid now (a
/// switch must not be the first to find it broken).
pub async fn preflight(deps: &Deps, app: &AppConfig) -> Result<Vec<String>, StepError> {
    let (deploy, traffic) = parts(app)?;
    let slots = Slots::new(deploy);
    let idle = slots.idle()?;
    let unit = ControlledUnit::admit(&deps.config, &slots.unit(&idle))?;
    let state = deps.systemd.status_loaded(&unit).await?;
    if state.load_state != "loaded" {
        return Err(StepError::UnitNotLoaded {
            unit: unit.as_str().to_owned(),
            state: state.load_state,
        });
    }
    // Something else on the idle slot's port would answer its health
    // check in its place.
    let port = slots.port(&idle)?;
    if !state.is_active()
        && tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    {
        return Err(StepError::PortInUse {
            slot: idle,
            port,
            unit: unit.as_str().to_owned(),
        });
    }
    Traffic::new(traffic, &app.name).check().await?;
    Ok(vec![
        format!(
            "the new version starts in slot {idle} ({}, port {})",
            unit.as_str(),
            slots.port(&idle)?
        ),
        format!("`{}` passes", traffic.test.join(" ")),
    ])
}

/// The unit and probe of what serves now: the live slot, else the app's unit.
pub fn serving(deps: &Deps, app: &AppConfig) -> Result<(ControlledUnit, Option<u16>), StepError> {
    let (deploy, _) = parts(app)?;
    let slots = Slots::new(deploy);
    match slots.live()? {
        Some(live) => Ok((
            ControlledUnit::admit(&deps.config, &slots.unit(&live))?,
            Some(slots.port(&live)?),
        )),
        None => Ok((ControlledUnit::admit(&deps.config, &app.unit)?, None)),
    }
}

/// The migrate command as the new release runs it: a program of the app's
/// virtualenv is taken from the release's (the live venv holds the old
/// version, which knows none of the new migrations).
pub fn release_argv(app: &AppConfig, spec: &UpgradeSpec, argv: &[String]) -> Vec<String> {
    let mut argv = argv.to_vec();
    if let (Some(_), Some(pkg @ crate::config::PackageConfig::Pip(pip))) =
        (app.slotted(), &app.package)
        && let Some(venv) = crate::packages::release_venv(pkg, &spec.to_version)
        && let Some(rest) = argv
            .first()
            .and_then(|p| std::path::Path::new(p).strip_prefix(&pip.venv).ok())
    {
        argv[0] = venv.join(rest).display().to_string();
    }
    argv
}

/// A probe moved to `port` when there is one.
pub fn probe_on(cfg: &ProbeConfig, port: Option<u16>) -> ProbeConfig {
    match port {
        Some(port) => cfg.on_port(port),
        None => cfg.clone(),
    }
}

impl Upgrade<'_> {
    /// The new slot's unit and port, once the start step recorded them.
    pub(super) fn new_slot(&self) -> Result<Option<(ControlledUnit, u16)>, StepError> {
        let Some(deploy) = self.app.slotted() else {
            return Ok(None);
        };
        let rec = self.op_dir.slot_deploy()?.ok_or(StepError::NoSlotRecord)?;
        let slots = Slots::new(deploy);
        Ok(Some((
            ControlledUnit::admit(&self.deps.config, &slots.unit(&rec.new_slot))?,
            slots.port(&rec.new_slot)?,
        )))
    }

    pub(super) async fn release(&self) -> Result<String, StepError> {
        let venv = self
            .ctx
            .waiting(crate::packages::install_release(
                self.pkg,
                &self.spec.to_version,
                PACKAGE_TIMEOUT,
            ))
            .await?;
        Ok(format!(
            "{} {} in {}",
            self.pkg.name(),
            self.spec.to_version,
            venv.display()
        ))
    }

    pub(super) async fn start_slot(&self) -> Result<String, StepError> {
        let (deploy, traffic) = parts(self.app)?;
        let slots = Slots::new(deploy);
        let new_slot = slots.idle()?;
        let release =
            crate::packages::install_release(self.pkg, &self.spec.to_version, PACKAGE_TIMEOUT)
                .await?;
        let rec = SlotDeploy {
            old_slot: slots.live()?,
            new_slot_release_before: slots.release_of(&new_slot),
            upstream_before: Traffic::new(traffic, &self.app.name).current()?,
            release: release.clone(),
            new_slot: new_slot.clone(),
            old_version: crate::deploy::serving_version(self.app)
                .await
                .unwrap_or_default(),
        };
        // A start that runs again after a crash keeps the first record: it
        // holds what was there before the upgrade.
        if self.op_dir.slot_deploy()?.is_none() {
            self.op_dir.set_slot_deploy(&rec)?;
        }
        let unit = ControlledUnit::admit(&self.deps.config, &slots.unit(&new_slot))?;
        // The idle slot may still run from an earlier deploy: it must start
        // afresh from the new release.
        self.deps
            .systemd
            .act(
                UnitAction::Stop,
                &unit,
                self.deps.config.systemd.job_timeout,
            )
            .await?;
        slots.point(&new_slot, Some(&release))?;
        let detail = gate::start(self.deps, self.ctx, self.app, &unit, UnitAction::Start).await?;
        Ok(format!(
            "slot {new_slot} ({}) on port {}: {detail}",
            unit.as_str(),
            slots.port(&new_slot)?
        ))
    }

    pub(super) async fn switch(&self) -> Result<String, StepError> {
        let (deploy, traffic) = parts(self.app)?;
        let rec = self.op_dir.slot_deploy()?.ok_or(StepError::NoSlotRecord)?;
        let slots = Slots::new(deploy);
        let new = (rec.new_slot.as_str(), slots.port(&rec.new_slot)?);
        if deploy.strategy != Strategy::Canary {
            Traffic::new(traffic, &self.app.name)
                .apply(
                    &self.deps.systemd,
                    &Route::only(new.0, new.1),
                    self.deps.config.systemd.job_timeout,
                )
                .await?;
            slots.set_live(Some(&rec.new_slot))?;
            self.verify(traffic).await?;
            return Ok(format!(
                "requests: slot {}; {} answers {}",
                new.0, traffic.verify_url, self.spec.to_version
            ));
        }
        // The old side: its slot, or the app's own unit on its health port.
        let old = match &rec.old_slot {
            Some(slot) => (slot.clone(), slots.port(slot)?),
            None => (
                self.app.unit.clone(),
                self.app
                    .health
                    .as_ref()
                    .and_then(ProbeConfig::host_port)
                    .and_then(|hp| hp.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
                    .unwrap_or(0),
            ),
        };
        let (shares, wait) = match self.spec.canary.as_slice() {
            [] => (vec![deploy.canary_percent], None),
            given => (given.to_vec(), self.spec.step_wait),
        };
        let mut done = Vec::new();
        for share in shares {
            let route = Route::split((&old.0, old.1), new, share);
            Traffic::new(traffic, &self.app.name)
                .apply(
                    &self.deps.systemd,
                    &route,
                    self.deps.config.systemd.job_timeout,
                )
                .await?;
            self.ctx.note(format!("canary: {}", route.label));
            if let Some(wait) = wait {
                self.judge(new.1, wait).await?;
            }
            done.push(format!("{share}%"));
        }
        Ok(format!(
            "requests to slot {}: {}",
            new.0,
            done.join(", then ")
        ))
    }

    /// The new slot's health through one canary step: every probe must pass.
    async fn judge(&self, port: u16, wait: Duration) -> Result<(), StepError> {
        let Some(health) = &self.app.health else {
            self.ctx.pause(wait).await;
            return Ok(());
        };
        let health = health.on_port(port);
        let until = tokio::time::Instant::now() + wait;
        let every = health.interval.max(Duration::from_millis(500));
        while tokio::time::Instant::now() < until {
            if self.ctx.canceled() {
                return Err(StepError::Canceled);
            }
            self.ctx
                .pause(every.min(until.saturating_duration_since(tokio::time::Instant::now())))
                .await;
            if self.ctx.canceled() {
                return Err(StepError::Canceled);
            }
            let o = super::forward::probe(self.deps, self.ctx, self.app, "health", &health).await?;
            if !o.ok {
                return Err(StepError::Regressed(o.error));
            }
        }
        Ok(())
    }

    pub(super) async fn promote(&self) -> Result<String, StepError> {
        let (deploy, traffic) = parts(self.app)?;
        let rec = self.op_dir.slot_deploy()?.ok_or(StepError::NoSlotRecord)?;
        let slots = Slots::new(deploy);
        let route = Route::only(&rec.new_slot, slots.port(&rec.new_slot)?);
        Traffic::new(traffic, &self.app.name)
            .apply(
                &self.deps.systemd,
                &route,
                self.deps.config.systemd.job_timeout,
            )
            .await?;
        slots.set_live(Some(&rec.new_slot))?;
        self.verify(traffic).await?;
        Ok(format!("requests: {}", route.label))
    }

    async fn verify(&self, traffic: &crate::config::NginxTrafficConfig) -> Result<(), StepError> {
        verify(
            self.deps,
            self.ctx,
            self.app,
            traffic,
            &self.spec.to_version,
        )
        .await
    }

    pub(super) async fn drain(&self) -> Result<String, StepError> {
        let (deploy, _) = parts(self.app)?;
        let rec = self.op_dir.slot_deploy()?.ok_or(StepError::NoSlotRecord)?;
        let old = old_unit(self.deps, self.app, deploy, &rec)?;
        self.ctx.pause(deploy.drain).await;
        if self.ctx.canceled() {
            return Err(StepError::Canceled);
        }
        self.ctx
            .waiting(self.deps.systemd.act(
                UnitAction::Stop,
                &old,
                self.deps.config.systemd.job_timeout,
            ))
            .await?;
        Ok(format!(
            "{} stopped after {}",
            old.as_str(),
            humantime::format_duration(deploy.drain)
        ))
    }
}

/// The proxy answers with `version` (within seconds of the reload, which
/// nginx applies after the reload job is done: until then the old route
/// still takes requests).
async fn verify(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    traffic: &crate::config::NginxTrafficConfig,
    version: &str,
) -> Result<(), StepError> {
    let spec = ProbeSpec::Http(HttpProbeSpec {
        name: format!("{} through nginx", app.name),
        url: traffic.verify_url.clone(),
        expect_status: 200,
        json_field: Some(traffic.verify_field.clone()),
        json_value: Some(version.to_owned()),
        attempts: VERIFY_ATTEMPTS,
    });
    let o = ctx
        .waiting(crate::probes::probe_declared(&deps.probe_policy, &spec))
        .await?;
    if o.ok {
        Ok(())
    } else {
        Err(StepError::NotServing {
            url: traffic.verify_url.clone(),
            version: version.to_owned(),
            error: o.error,
        })
    }
}

/// The unit that served before the upgrade.
fn old_unit(
    deps: &Deps,
    app: &AppConfig,
    deploy: &DeployConfig,
    rec: &SlotDeploy,
) -> Result<ControlledUnit, StepError> {
    let name = match &rec.old_slot {
        Some(slot) => Slots::new(deploy).unit(slot),
        None => app.unit.clone(),
    };
    Ok(ControlledUnit::admit(&deps.config, &name)?)
}

/// The undo of the slotted steps, from the upgrade's record. Each is safe
/// to run again.
pub struct SlotUndo<'a> {
    pub deps: &'a Deps,
    pub ctx: &'a OpContext,
    pub app: &'a AppConfig,
    pub op_dir: &'a OpDir,
}

impl SlotUndo<'_> {
    fn record(
        &self,
    ) -> Result<
        Option<(
            &DeployConfig,
            &crate::config::NginxTrafficConfig,
            SlotDeploy,
        )>,
        StepError,
    > {
        let (deploy, traffic) = parts(self.app)?;
        Ok(self.op_dir.slot_deploy()?.map(|rec| (deploy, traffic, rec)))
    }

    /// Drain's undo: the old side running and healthy again.
    pub async fn old_slot(&self) -> Result<String, StepError> {
        let Some((deploy, _, rec)) = self.record()? else {
            return Ok("nothing was started".into());
        };
        let unit = old_unit(self.deps, self.app, deploy, &rec)?;
        let state = self.deps.systemd.status(&unit).await?;
        if !state.is_active() {
            gate::start(self.deps, self.ctx, self.app, &unit, UnitAction::Start).await?;
        }
        if let Some(health) = &self.app.health {
            let port = match &rec.old_slot {
                Some(slot) => Some(Slots::new(deploy).port(slot)?),
                None => None,
            };
            gate::healthy(
                self.deps,
                self.ctx,
                self.app,
                &unit,
                &probe_on(health, port),
                gate::OnCancel::Continue,
            )
            .await?;
        }
        Ok(format!("{} runs and is healthy", unit.as_str()))
    }

    /// Switch's undo: the upstream file as it was, and the old live slot.
    pub async fn traffic(&self) -> Result<String, StepError> {
        let Some((deploy, traffic, rec)) = self.record()? else {
            return Ok("the requests were never moved".into());
        };
        Traffic::new(traffic, &self.app.name)
            .put(
                &self.deps.systemd,
                rec.upstream_before.clone(),
                self.deps.config.systemd.job_timeout,
            )
            .await?;
        Slots::new(deploy).set_live(rec.old_slot.as_deref())?;
        // The new slot is stopped next: not before nginx routes new
        // requests away from it, and its old workers had `drain` to finish
        // the ones they already took.
        if !rec.old_version.is_empty() {
            verify(self.deps, self.ctx, self.app, traffic, &rec.old_version).await?;
        }
        tokio::time::sleep(deploy.drain).await;
        Ok(match &rec.old_slot {
            Some(slot) => format!("requests back to slot {slot}"),
            None => format!("requests back to {}", self.app.unit),
        })
    }

    /// Start's undo: the new slot stopped and pointed back.
    pub async fn new_slot(&self) -> Result<String, StepError> {
        let Some((deploy, _, rec)) = self.record()? else {
            return Ok("no slot was started".into());
        };
        let slots = Slots::new(deploy);
        let unit = ControlledUnit::admit(&self.deps.config, &slots.unit(&rec.new_slot))?;
        self.ctx
            .waiting(self.deps.systemd.act(
                UnitAction::Stop,
                &unit,
                self.deps.config.systemd.job_timeout,
            ))
            .await?;
        slots.point(&rec.new_slot, rec.new_slot_release_before.as_deref())?;
        Ok(format!("{} stopped", unit.as_str()))
    }

    /// After the undo: whatever serves now answers its health probe.
    pub async fn check_serving(&self) -> Result<String, StepError> {
        let (unit, port) = serving(self.deps, self.app)?;
        if let Some(health) = &self.app.health {
            gate::healthy(
                self.deps,
                self.ctx,
                self.app,
                &unit,
                &probe_on(health, port),
                gate::OnCancel::Continue,
            )
            .await?;
        }
        Ok(format!("{} serves and is healthy", unit.as_str()))
    }
}
