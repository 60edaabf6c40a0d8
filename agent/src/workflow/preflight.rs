//! Checks before an upgrade is accepted, and the migration dry run of
//! PlanUpgrade: nothing here changes the app.

use std::path::PathBuf;

use super::{Deps, PACKAGE_TIMEOUT, StepError, UpgradeSpec};
use crate::analysis;
use crate::archive::Compression;
use crate::backup::CreateOptions;
use crate::config::AppConfig;
use crate::host::envfile::{self, EnvEdit};
use crate::host::systemd::ControlledUnit;
use crate::packages;
use crate::probes;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
}

/// What preflight found.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub from_version: String,
    pub backup_estimate: u64,
    pub findings: Vec<String>,
}

/// Checks made before an upgrade is accepted: nothing is changed.
pub async fn preflight(
    deps: &Deps,
    app: &AppConfig,
    spec: &UpgradeSpec,
) -> Result<Preflight, PreflightError> {
    let invalid = |m: String| PreflightError::Invalid(m);
    envfile::validate(&spec.env_edits).map_err(|e| invalid(e.to_string()))?;
    let Some(pkg) = &app.package else {
        return Err(PreflightError::Precondition(format!(
            "app {} declares no [app.package]: nothing to upgrade",
            app.name
        )));
    };
    if !spec.env_edits.is_empty() && app.env_file.is_none() {
        return Err(PreflightError::Precondition(format!(
            "env edits were asked but app {} declares no env_file",
            app.name
        )));
    }
    let mut findings = Vec::new();
    packages::check_available(pkg, &spec.to_version)
        .await
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    findings.push(format!("{} {} is available", pkg.name(), spec.to_version));
    let from_version = crate::deploy::serving_version(app)
        .await
        .unwrap_or_default();
    if from_version == *spec.to_version {
        return Err(PreflightError::Precondition(format!(
            "{} is already at {}",
            app.name, spec.to_version
        )));
    }
    if let Some(env) = &app.env_file {
        let diff = envfile::plan(env, &spec.env_edits)
            .map_err(|e| PreflightError::Precondition(e.to_string()))?;
        findings.extend(diff.into_iter().map(|d| format!("env: {d}")));
    }
    let precondition = |e: StepError| PreflightError::Precondition(e.to_string());
    let (unit, port) = match app.slotted() {
        Some(_) => {
            findings.extend(
                super::slotted::preflight(deps, app)
                    .await
                    .map_err(precondition)?,
            );
            super::slotted::serving(deps, app).map_err(precondition)?
        }
        None => (
            ControlledUnit::admit(&deps.config, &app.unit)
                .map_err(|e| PreflightError::Precondition(e.to_string()))?,
            None,
        ),
    };
    let status = deps
        .systemd
        .status(&unit)
        .await
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    if status.load_state != "loaded" {
        return Err(PreflightError::Precondition(format!(
            "unit {} is not loaded ({}): is it installed?",
            unit.as_str(),
            status.load_state
        )));
    }
    findings.push(format!("unit {} is {}", unit.as_str(), status.active_state));
    if !spec.force
        && let Some(health) = &app.health
    {
        let outcome = async {
            let health = super::slotted::probe_on(health, port).spec(&app.name, "health")?;
            probes::probe_declared(&deps.probe_policy, &health).await
        }
        .await
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
        if !outcome.ok {
            return Err(PreflightError::Precondition(format!(
                "{} is not healthy now ({}); fix it first or pass --force",
                app.name, outcome.error
            )));
        }
        findings.push(format!("{} is healthy", app.name));
    }
    if spec.watch.is_some() && !app.analysis.is_empty() {
        findings.push(analysis_ready(deps, app, &unit).await?);
    }
    let opts = CreateOptions {
        files: true,
        database: app.database.is_some(),
        compression: Compression::Zstd,
    };
    crate::backup::check_database(app)
        .await
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    let store = deps.backups.clone();
    let reserve = deps.config.backup.free_space_reserve_bytes;
    let app_owned = app.clone();
    let backup_estimate =
        tokio::task::spawn_blocking(move || store.preflight(&app_owned, opts, reserve))
            .await
            .map_err(|e| PreflightError::Precondition(e.to_string()))?
            .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    findings.push(format!("backup needs up to {backup_estimate} bytes"));
    Ok(Preflight {
        from_version,
        backup_estimate,
        findings,
    })
}

/// The analysis rules' sources answer and every rule finds its series now
/// (an unreachable metrics URL is a precondition error); the baseline
/// itself is sampled by the preflight step, inside the operation.
async fn analysis_ready(
    deps: &Deps,
    app: &AppConfig,
    unit: &ControlledUnit,
) -> Result<String, PreflightError> {
    let fail = |e: String| PreflightError::Precondition(format!("metric analysis: {e}"));
    let rules = analysis::rules_of(app).map_err(fail)?;
    let sources = analysis::Sources::of(
        app,
        &rules,
        deps.probe_policy.clone(),
        deps.systemd.clone(),
        unit.clone(),
    )
    .await
    .map_err(fail)?;
    analysis::check(&sources, &rules).await.map_err(fail)?;
    Ok(format!(
        "{} analysis rule(s) read their series",
        rules.len()
    ))
}

/// The target version's migrations, dry-run, without touching the app: for
/// pip, the version is installed, as the venv's owner, into a scratch
/// virtualenv next to the app's venv and the declared dry-run program is
/// run from there as the hook user (with the env edits
/// applied in memory); other kinds run the declared command as it is.
pub async fn migration_dry_run(
    _deps: &Deps,
    app: &AppConfig,
    spec: &UpgradeSpec,
) -> Result<Vec<String>, String> {
    let Some(m) = &app.migrate else {
        return Ok(vec!["(no migrate command declared)".into()]);
    };
    let Some(argv) = &m.dry_run else {
        return Ok(vec![
            "(no dry_run form of the migrate command declared)".into(),
        ]);
    };
    let mut env = match &app.env_file {
        Some(p) => crate::host::envfile::read_values(p).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    apply_in_memory(&mut env, &spec.env_edits);
    let user = hook_user(app).map_err(|e| e.to_string())?;
    let mut scratch = None;
    let result = async {
        let argv = target_argv(app, spec, argv, &mut scratch).await?;
        let never = std::sync::atomic::AtomicBool::new(false);
        crate::host::process::run(&argv, user, &env, m.timeout, &never, &|_, _| {})
            .await
            .map(|r| r.lines)
            .map_err(|e| e.to_string())
    }
    .await;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// The user an app's hooks run as: its `user`, or root only when the config
/// says `run_hooks_as_root = true` (check-config refuses anything else).
pub fn hook_user(app: &AppConfig) -> Result<Option<&str>, StepError> {
    match (&app.user, app.run_hooks_as_root) {
        (Some(user), _) => Ok(Some(user.as_str())),
        (None, true) => Ok(None),
        (None, false) => Err(StepError::NoHookUser {
            app: app.name.clone(),
        }),
    }
}

/// The dry-run argv as the target version would run it, as the package's
/// kind makes it (pip: from a scratch install of the target version).
async fn target_argv(
    app: &AppConfig,
    spec: &UpgradeSpec,
    argv: &[String],
    scratch_slot: &mut Option<PathBuf>,
) -> Result<Vec<String>, String> {
    let Some(pkg) = &app.package else {
        return Ok(argv.to_vec());
    };
    packages::dry_run_argv(pkg, &spec.to_version, argv, scratch_slot, PACKAGE_TIMEOUT).await
}

/// The env edits applied to variables, as the config step would apply them to the file.
fn apply_in_memory(env: &mut Vec<(String, String)>, edits: &[EnvEdit]) {
    for edit in edits {
        match edit {
            EnvEdit::Set { key, value } => match env.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = value.clone(),
                None => env.push((key.clone(), value.clone())),
            },
            EnvEdit::Rename { from, to } => {
                if let Some(entry) = env.iter_mut().find(|(k, _)| k == from) {
                    entry.0 = to.clone();
                }
            }
            EnvEdit::Unset { key } => env.retain(|(k, _)| k != key),
        }
    }
}
