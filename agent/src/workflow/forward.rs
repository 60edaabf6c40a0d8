//! What each step of an upgrade does. Each writes what its undo will need
//! to the operation's directory before it changes anything.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::gate;
use super::opdir::OpDir;
use super::preflight::{Preflight, hook_user};
use super::{Deps, PACKAGE_TIMEOUT, Step, StepError, UpgradeSpec};
use crate::analysis;
use crate::archive::Compression;
use crate::backup::CreateOptions;
use crate::config::{AppConfig, PackageConfig};
use crate::host::envfile;
use crate::host::systemd::{ControlledUnit, UnitAction};
use crate::ops::OpContext;
use crate::ops::log::OutputStream;
use crate::packages::{self, PackageError, RestorePoint};

/// One upgrade, as its steps see it.
pub struct Upgrade<'a> {
    pub deps: &'a Deps,
    pub ctx: &'a OpContext,
    pub app: &'a AppConfig,
    pub spec: &'a UpgradeSpec,
    pub pre: &'a Preflight,
    pub pkg: &'a PackageConfig,
    pub unit: &'a ControlledUnit,
    pub op_dir: OpDir,
    /// The restore point, made beside the backup (both only read the
    /// app's files); the package step records it before it installs.
    pub restore_point: std::sync::Mutex<Option<Result<RestorePoint, PackageError>>>,
    /// The analysis rules' values before the change, sampled by the
    /// preflight step when the upgrade watches.
    pub baseline: std::sync::OnceLock<analysis::Baseline>,
}

impl Upgrade<'_> {
    /// Runs `step`; Ok holds the journal's detail line.
    pub async fn run(&self, step: Step) -> Result<String, StepError> {
        match step {
            Step::Preflight => self.preflight().await,
            Step::Backup => self.backup().await,
            Step::Package => self.package().await,
            Step::Release => self.release().await,
            Step::Config => self.config(),
            Step::Migrate => self.migrate().await,
            Step::Restart => self.restart().await,
            Step::Start => self.start_slot().await,
            Step::Health => self.health().await,
            Step::Smoke => self.smoke().await,
            Step::Switch => self.switch().await,
            Step::Watch => self.watch().await,
            Step::Promote => self.promote().await,
            Step::Drain => self.drain().await,
        }
    }

    /// Preflight's findings; when the upgrade watches with analysis rules,
    /// their baseline, sampled over `[app.metrics] baseline` now.
    async fn preflight(&self) -> Result<String, StepError> {
        let mut findings = self.pre.findings.join("; ");
        if self.spec.watch.is_none() || self.app.analysis.is_empty() {
            return Ok(findings);
        }
        let (rules, sources) = self.analysis_sources().await?;
        let (_, window) = analysis::timing(self.app);
        let canceled = || self.ctx.canceled();
        let baseline = self
            .ctx
            .waiting(analysis::baseline(&sources, &rules, window, &canceled))
            .await
            .map_err(StepError::Analysis)?;
        for (rule, value) in rules.iter().zip(&baseline.values) {
            let reading = analysis::baseline_reading(rule, *value);
            self.ctx
                .analysis(reading_event(Some(Step::Preflight), reading));
        }
        findings.push_str(&format!(
            "; baseline of {} analysis rule(s) over {}",
            rules.len(),
            humantime::format_duration(window)
        ));
        let _ = self.baseline.set(baseline);
        Ok(findings)
    }

    async fn analysis_sources(
        &self,
    ) -> Result<(Vec<analysis::Rule>, analysis::Sources), StepError> {
        let rules = analysis::rules_of(self.app).map_err(StepError::Analysis)?;
        let sources = analysis::Sources::of(
            self.app,
            &rules,
            self.deps.probe_policy.clone(),
            self.deps.systemd.clone(),
            self.unit.clone(),
        )
        .await
        .map_err(StepError::Analysis)?;
        Ok((rules, sources))
    }

    async fn backup(&self) -> Result<String, StepError> {
        let (deps, ctx, app) = (self.deps, self.ctx, self.app);
        self.op_dir.create()?;
        let opts = CreateOptions {
            files: true,
            database: app.database.is_some(),
            compression: Compression::Zstd,
        };
        // Fingerprints tell the rollback which other app files changed;
        // they, the archives and the package's snapshot read the same
        // unchanging files, so they are made side by side.
        let app_owned = app.clone();
        let (manifest, prints, snapshot) = tokio::join!(
            // Boxed: with a database dump it is too large for a worker's stack.
            ctx.waiting(Box::pin(deps.backups.create(
                ctx,
                app,
                opts,
                self.pre.backup_estimate
            ))),
            tokio::task::spawn_blocking(move || fingerprints(&app_owned)),
            packages::prepare_restore_point(self.pkg, &ctx.id),
        );
        let manifest = match manifest {
            Ok(manifest) => manifest,
            Err(e) => {
                if snapshot.is_ok() {
                    let _ = packages::abandon_restore_point(self.pkg, &ctx.id).await;
                }
                return Err(e.into());
            }
        };
        ctx.update(|op| op.backup_id = manifest.id.clone());
        self.op_dir.set_fingerprints(&prints?)?;
        *self.restore_point.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        Ok(format!("backup {}", manifest.id))
    }

    async fn package(&self) -> Result<String, StepError> {
        let (ctx, pkg) = (self.ctx, self.pkg);
        let made = self
            .restore_point
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let rp = match made {
            Some(rp) => rp?,
            None => packages::prepare_restore_point(pkg, &ctx.id).await?,
        };
        self.op_dir.set_restore_point(&rp)?;
        let on_line = output_to(ctx, Step::Package.name());
        ctx.waiting(packages::install_as(
            self.app.user.as_deref(),
            pkg,
            &self.spec.to_version,
            &ctx.id,
            PACKAGE_TIMEOUT,
            &on_line,
        ))
        .await?;
        Ok(format!("installed {} {}", pkg.name(), self.spec.to_version))
    }

    fn config(&self) -> Result<String, StepError> {
        let Some(env) = &self.app.env_file else {
            return Ok("no env file".into());
        };
        let diff = envfile::apply(env, &self.spec.env_edits, &self.op_dir.env_before())?;
        for line in &diff {
            self.ctx
                .output(Step::Config.name(), OutputStream::Stdout, line);
        }
        Ok(format!("{} line(s) changed", diff.len()))
    }

    async fn migrate(&self) -> Result<String, StepError> {
        let (ctx, app) = (self.ctx, self.app);
        let Some(m) = &app.migrate else {
            return Ok("no migrate command".into());
        };
        let env = app_env(app)?;
        let on_line = output_to(ctx, Step::Migrate.name());
        let cancel = ctx.cancel_flag();
        let user = hook_user(app)?;
        let command = super::slotted::release_argv(app, self.spec, &m.command);
        let report = ctx
            .waiting(crate::host::process::run(
                &command, user, &env, m.timeout, &cancel, &on_line,
            ))
            .await?;
        Ok(format!(
            "done in {}",
            humantime::format_duration(Duration::from_millis(report.took.as_millis() as u64))
        ))
    }

    async fn restart(&self) -> Result<String, StepError> {
        gate::start(
            self.deps,
            self.ctx,
            self.app,
            self.unit,
            UnitAction::Restart,
        )
        .await
    }

    async fn health(&self) -> Result<String, StepError> {
        let Some(health) = &self.app.health else {
            return Ok("no health probe".into());
        };
        let slot = self.new_slot()?;
        let (unit, health) = match &slot {
            Some((unit, port)) => (unit, health.on_port(*port)),
            None => (self.unit, health.clone()),
        };
        let attempts = gate::healthy(
            self.deps,
            self.ctx,
            self.app,
            unit,
            &health,
            gate::OnCancel::Stop,
        )
        .await?;
        Ok(format!("healthy after {attempts} attempt(s)"))
    }

    async fn smoke(&self) -> Result<String, StepError> {
        let port = self.new_slot()?.map(|(_, port)| port);
        for check in &self.app.smoke {
            let check = &super::slotted::probe_on(check, port);
            let o = probe(self.deps, self.ctx, self.app, "smoke", check).await?;
            if !o.ok {
                return Err(StepError::SmokeFailed {
                    name: o.name,
                    target: o.target,
                    error: o.error,
                });
            }
        }
        Ok(format!("{} check(s) passed", self.app.smoke.len()))
    }

    /// Probes health every health interval and, with analysis rules,
    /// judges them every metrics interval against the preflight's
    /// baseline; each reading is an event. A failed probe or rule fails.
    async fn watch(&self) -> Result<String, StepError> {
        let Some(window) = self.spec.watch else {
            return Ok("no watch window".into());
        };
        // A blue-green or canary upgrade watches its new slot.
        let slot_port = self.new_slot()?.map(|(_, port)| port);
        let until = Instant::now() + window;
        let health_every = self
            .app
            .health
            .as_ref()
            .map(|h| h.interval.max(Duration::from_millis(500)));
        let mut judged = match self.baseline.get() {
            Some(baseline) => {
                let (rules, sources) = self.analysis_sources().await?;
                let first = self.ctx.waiting(sources.snapshot(&rules)).await;
                Some((analysis::Judge::new(rules, baseline), sources, first))
            }
            None => None,
        };
        let (metrics_every, _) = analysis::timing(self.app);
        let mut next_health = health_every.map(|every| Instant::now() + every);
        let mut next_metrics = Instant::now() + metrics_every;
        let (mut probes_run, mut intervals) = (0u32, 0u32);
        loop {
            if self.ctx.canceled() {
                return Err(StepError::Canceled);
            }
            let mut wake = until;
            if let Some(at) = next_health {
                wake = wake.min(at);
            }
            if judged.is_some() {
                wake = wake.min(next_metrics);
            }
            self.ctx
                .pause(wake.saturating_duration_since(Instant::now()))
                .await;
            if self.ctx.canceled() {
                return Err(StepError::Canceled);
            }
            let now = Instant::now();
            if let (Some(at), Some(health), Some(every)) =
                (next_health, &self.app.health, health_every)
                && now >= at
            {
                let health = &super::slotted::probe_on(health, slot_port);
                let o = probe(self.deps, self.ctx, self.app, "health", health).await?;
                probes_run += 1;
                if !o.ok {
                    return Err(StepError::Regressed(o.error));
                }
                next_health = Some(Instant::now() + every);
            }
            if let Some((judge, sources, prev)) = judged.as_mut()
                && now >= next_metrics
            {
                let cur = self.ctx.waiting(sources.snapshot(judge.rules())).await;
                let readings = judge.observe(prev, &cur);
                *prev = cur;
                intervals += 1;
                for r in &readings {
                    self.ctx
                        .analysis(reading_event(Some(Step::Watch), r.clone()));
                }
                if let Some(failed) = readings.iter().find(|r| r.state == analysis::State::Failed) {
                    return Err(StepError::Analysis(failed.cause()));
                }
                next_metrics = Instant::now() + metrics_every;
            }
            if Instant::now() >= until {
                break;
            }
        }
        Ok(match judged {
            Some((judge, _, _)) => format!(
                "{probes_run} probe(s) passed; {} analysis rule(s) held for {intervals} interval(s)",
                judge.rules().len()
            ),
            None => format!("{probes_run} probe(s) passed"),
        })
    }
}

/// An analysis reading as the journal keeps it (and AnalyzeApp answers it,
/// with no step).
pub fn reading_event(step: Option<Step>, r: analysis::Reading) -> crate::ops::log::AnalysisEvent {
    crate::ops::log::AnalysisEvent {
        step: step.map(Step::name).unwrap_or_default().to_owned(),
        rule: r.rule,
        description: r.description,
        baseline: r.baseline,
        value: r.value,
        limit: r.limit,
        state: r.state.to_string(),
        missing: r.missing,
        failures: r.failures,
    }
}

/// Hands a program's output lines to the journal under `step`.
pub fn output_to<'a>(ctx: &'a OpContext, step: &'a str) -> impl Fn(bool, &str) + Send + Sync + 'a {
    move |is_stderr: bool, line: &str| {
        let stream = if is_stderr {
            OutputStream::Stderr
        } else {
            OutputStream::Stdout
        };
        ctx.output(step, stream, line)
    }
}

/// The app's env file as its hooks see it.
pub fn app_env(app: &AppConfig) -> Result<Vec<(String, String)>, StepError> {
    match &app.env_file {
        Some(p) => Ok(envfile::read_values(p)?),
        None => Ok(Vec::new()),
    }
}

/// Runs one of the app's declared probes; its time counts as waiting on the app.
pub async fn probe(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    kind: &str,
    cfg: &crate::config::ProbeConfig,
) -> Result<crate::probes::ProbeOutcome, StepError> {
    Ok(ctx
        .waiting(crate::probes::probe_declared(
            &deps.probe_policy,
            &cfg.spec(&app.name, kind)?,
        ))
        .await?)
}

/// The path's [`crate::files::tree_fingerprint`], so the rollback restores
/// only paths that changed. A path that cannot be read (e.g. gone)
/// fingerprints as empty: changed, unless it could not be read before the
/// upgrade either.
pub fn fingerprint(path: &Path) -> String {
    crate::files::tree_fingerprint(path).unwrap_or_default()
}

fn fingerprints(app: &AppConfig) -> BTreeMap<String, String> {
    crate::backup::paths_of(app)
        .iter()
        .map(|p| (p.display().to_string(), fingerprint(p)))
        .collect()
}
