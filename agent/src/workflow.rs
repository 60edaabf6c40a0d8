//! The upgrade runbook as one journaled operation, and its rollback.
//!
//! Steps, each journaled before it acts: preflight, backup, package, config,
//! migrate, restart, health, smoke, watch. On a failure after the backup
//! (or a cancel, or an agent crash), the rollback undoes exactly the steps
//! that started, newest first: stop the unit, put back the package, the env
//! file, the database (the app's `migrate.rollback` command, else the
//! operation's dump), and any other app files that changed; start the unit
//! and check health. The outcome is exactly one of Succeeded, RolledBack
//! (with the cause) or NeedsHuman (saying what is left and where the backup is).
//!
//! What a rollback needs survives a crash: it lives in `state_dir/ops/ID/`
//! (restore point, the env file as it was, path fingerprints) and in the
//! journal (which steps started).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backup::{BackupStore, CreateOptions, archive::Compression, pg_target};
use crate::config::{AppConfig, Config};
use crate::envfile::{self, EnvEdit};
use crate::journal::{OpState, OperationRecord, OutputStream, StepOutcome};
use crate::ops::{OpContext, Outcome};
use crate::packages::{self, RestorePoint};
use crate::probes::{self, TargetPolicy};
use crate::systemd::{ControlledUnit, Systemd, UnitAction};

pub const STEP_PREFLIGHT: &str = "preflight";
pub const STEP_BACKUP: &str = "backup";
pub const STEP_PACKAGE: &str = "package";
pub const STEP_CONFIG: &str = "config";
pub const STEP_MIGRATE: &str = "migrate";
pub const STEP_RESTART: &str = "restart";
pub const STEP_HEALTH: &str = "health";
pub const STEP_SMOKE: &str = "smoke";
pub const STEP_WATCH: &str = "watch";

/// Steps that change the app: once one started, undoing needs a rollback.
pub const CHANGING_STEPS: &[&str] = &[
    STEP_PACKAGE,
    STEP_CONFIG,
    STEP_MIGRATE,
    STEP_RESTART,
    STEP_HEALTH,
    STEP_SMOKE,
    STEP_WATCH,
];

/// Whether an interrupted upgrade had started changing the app.
pub fn changed_anything(op: &OperationRecord) -> bool {
    op.steps
        .iter()
        .any(|s| CHANGING_STEPS.contains(&s.name.as_str()))
}

const PACKAGE_TIMEOUT: Duration = Duration::from_secs(900);

/// What the workflow needs of the agent.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub systemd: Arc<Systemd>,
    pub backups: BackupStore,
    pub probe_policy: TargetPolicy,
}

impl Deps {
    fn op_dir(&self, op_id: &str) -> PathBuf {
        self.config.state_dir.join("ops").join(op_id)
    }
}

/// An upgrade as asked, after validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeSpec {
    pub app: String,
    pub to_version: String,
    pub env_edits: Vec<EnvEdit>,
    pub no_rollback: bool,
    pub watch: Option<Duration>,
    pub force: bool,
}

impl UpgradeSpec {
    /// The spec as operation parameters, which every reader may see: env
    /// edits by key name only, never a value (`DATABASE_PASSWORD=...`).
    pub fn to_params(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("to_version".into(), self.to_version.clone());
        let edits: Vec<String> = self
            .env_edits
            .iter()
            .map(|edit| match edit {
                EnvEdit::Set { key, .. } => format!("set {key}"),
                EnvEdit::Rename { from, to } => format!("rename {from} to {to}"),
                EnvEdit::Unset { key } => format!("unset {key}"),
            })
            .collect();
        if !edits.is_empty() {
            p.insert("env".into(), edits.join(", "));
        }
        if let Some(watch) = self.watch {
            p.insert(
                "watch".into(),
                humantime::format_duration(watch).to_string(),
            );
        }
        for (flag, on) in [("no_rollback", self.no_rollback), ("force", self.force)] {
            if on {
                p.insert(flag.into(), "true".into());
            }
        }
        p
    }
}

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
    packages::validate_version(&spec.to_version).map_err(|e| invalid(e.to_string()))?;
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
    findings.push(format!("{} {} is available", pkg.name, spec.to_version));
    let from_version = packages::installed_version(app).await.unwrap_or_default();
    if from_version == spec.to_version {
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
    let unit = ControlledUnit::admit(&deps.config, &app.unit)
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    let status = deps
        .systemd
        .status(&unit)
        .await
        .map_err(|e| PreflightError::Precondition(e.to_string()))?;
    if status.load_state != "loaded" {
        return Err(PreflightError::Precondition(format!(
            "unit {} is not loaded ({}): is it installed?",
            app.unit, status.load_state
        )));
    }
    findings.push(format!("unit {} is {}", app.unit, status.active_state));
    if !spec.force
        && let Some(health) = &app.health
    {
        let outcome = probes::probe_declared(&deps.probe_policy, &app.name, "health", health)
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
    let opts = CreateOptions {
        files: true,
        database: app.database.is_some(),
        compression: Compression::Zstd,
    };
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
        Some(p) => crate::envfile::read_values(p).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    apply_in_memory(&mut env, &spec.env_edits);
    let user = hook_user(app)?;
    let mut scratch = None;
    let result = async {
        let argv = target_argv(app, spec, argv, &mut scratch).await?;
        let never = std::sync::atomic::AtomicBool::new(false);
        crate::process::run(&argv, user, &env, m.timeout, &never, &|_, _| {})
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
pub fn hook_user(app: &AppConfig) -> Result<Option<&str>, String> {
    match (&app.user, app.run_hooks_as_root) {
        (Some(user), _) => Ok(Some(user.as_str())),
        (None, true) => Ok(None),
        (None, false) => Err(format!(
            "app {} declares no user for its hooks and hooks never run as root: set \
             user (or run_hooks_as_root = true) in its [[app]] config",
            app.name
        )),
    }
}

/// A fresh scratch directory for the dry run's virtualenv, next to the app's
/// venv (so its owner can reach it, unlike the 0700 state dir), with an
/// unpredictable name, created without following links, owned by `owner`.
fn scratch_dir_for(venv: &Path, owner: (u32, u32)) -> Result<PathBuf, String> {
    let parent = venv.parent().unwrap_or(Path::new("/var/tmp"));
    let mut random = [0u8; 12];
    getrandom_fill(&mut random)?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let dir = parent.join(format!(".covet-plan-{suffix}"));
    crate::private::create_dir(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let owned = std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1)).and_then(|()| {
        // Holds only the target version's code, which the hook's user must read.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
    });
    if let Err(e) = owned {
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("cannot hand {} to its user: {e}", dir.display()));
    }
    Ok(dir)
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))
}

/// The dry-run argv as the target version would run it: for pip, the
/// version is installed into a scratch virtualenv at `scratch/venv` and a
/// program of the app's venv is replaced by the same one from there.
async fn target_argv(
    app: &AppConfig,
    spec: &UpgradeSpec,
    argv: &[String],
    scratch_slot: &mut Option<PathBuf>,
) -> Result<Vec<String>, String> {
    let mut argv = argv.to_vec();
    let pkg = app
        .package
        .as_ref()
        .filter(|p| p.kind == crate::config::PackageKind::Pip);
    let (Some(pkg), Some(venv)) = (pkg, pkg.and_then(|p| p.venv.clone())) else {
        return Ok(argv);
    };
    use std::os::unix::fs::MetadataExt;
    // Python and pip run as the venv's owner (an sdist's setup.py is code),
    // in a scratch dir that owner owns.
    let meta = std::fs::metadata(&venv)
        .map_err(|e| format!("cannot read virtualenv {}: {e}", venv.display()))?;
    let owner = (meta.uid(), meta.gid());
    let owner_name = match owner.0 {
        0 => None,
        uid => Some(crate::process::user_name(uid).ok_or_else(|| {
            format!(
                "the owner (uid {uid}) of {} is no system user",
                venv.display()
            )
        })?),
    };
    let scratch = scratch_slot.insert(scratch_dir_for(&venv, owner)?);
    let scratch_venv = scratch.join("venv");
    let never = std::sync::atomic::AtomicBool::new(false);
    let make_venv = [
        venv.join("bin/python").display().to_string(),
        "-m".into(),
        "venv".into(),
        scratch_venv.display().to_string(),
    ];
    crate::process::run(
        &make_venv,
        owner_name.as_deref(),
        &[],
        Duration::from_secs(120),
        &never,
        &|_, _| {},
    )
    .await
    .map_err(|e| format!("cannot make a scratch virtualenv: {e}"))?;
    let mut scratch_pkg = pkg.clone();
    scratch_pkg.venv = Some(scratch_venv.clone());
    packages::install(
        &scratch_pkg,
        &spec.to_version,
        "plan",
        PACKAGE_TIMEOUT,
        &|_, _| {},
    )
    .await
    .map_err(|e| {
        format!(
            "cannot install {} {} into a scratch virtualenv: {e}",
            pkg.name, spec.to_version
        )
    })?;
    if let Some(rest) = argv
        .first()
        .and_then(|p| Path::new(p).strip_prefix(&venv).ok().map(Path::to_owned))
    {
        argv[0] = scratch_venv.join(rest).display().to_string();
    }
    Ok(argv)
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

/// Why a step failed, to decide the outcome.
struct StepFailure {
    step: &'static str,
    cause: String,
}

/// Runs a whole upgrade in its operation.
pub async fn run_upgrade(
    deps: Deps,
    ctx: OpContext,
    app: AppConfig,
    spec: UpgradeSpec,
    pre: Preflight,
) -> Outcome {
    ctx.step_started(
        STEP_PREFLIGHT,
        "version available, unit loaded, app healthy, disk space",
    );
    ctx.step_finished(
        STEP_PREFLIGHT,
        StepOutcome::Succeeded,
        pre.findings.join("; "),
    );
    ctx.update(|op| {
        op.params
            .insert("from_version".into(), pre.from_version.clone());
    });
    let started = Instant::now();
    // Boxed: the whole runbook is one large future.
    let result = Box::pin(forward(&deps, &ctx, &app, &spec, &pre)).await;
    let outcome = match result {
        Ok(()) => {
            finish_success(&deps, &ctx).await;
            Outcome::Succeeded
        }
        Err(f) if f.step == STEP_BACKUP || f.step == STEP_PREFLIGHT => {
            // Nothing of the app was changed yet.
            if ctx.canceled() {
                Outcome::Canceled(format!("canceled during {}; nothing was changed", f.step))
            } else {
                Outcome::Failed(format!(
                    "{} failed: {}; nothing was changed",
                    f.step, f.cause
                ))
            }
        }
        Err(f) => {
            let cause = format!("{} failed: {}", f.step, f.cause);
            if spec.no_rollback {
                ctx.note("--no-rollback: leaving the app as it is");
                Outcome::Failed(format!("{cause}; not rolled back (--no-rollback)"))
            } else {
                let record = ctx.record();
                Box::pin(rollback_after(&deps, &ctx, &app, record.as_ref(), &cause)).await
            }
        }
    };
    // What the agent itself cost, apart from the programs and units it
    // waited on (the overhead benchmark reads these).
    let total = started.elapsed();
    let waited = ctx.waited();
    ctx.update(|op| {
        op.params
            .insert("total_ms".into(), total.as_millis().to_string());
        op.params
            .insert("waited_ms".into(), waited.as_millis().to_string());
        op.params.insert(
            "overhead_ms".into(),
            total.saturating_sub(waited).as_millis().to_string(),
        );
    });
    outcome
}

/// A step: journal its start, run it, journal its end.
async fn step<T, F>(
    ctx: &OpContext,
    name: &'static str,
    description: &str,
    f: F,
) -> Result<T, StepFailure>
where
    F: std::future::Future<Output = Result<(T, String), String>>,
{
    if ctx.canceled() {
        return Err(StepFailure {
            step: name,
            cause: "canceled".into(),
        });
    }
    ctx.step_started(name, description);
    match f.await {
        Ok((value, detail)) => {
            ctx.step_finished(name, StepOutcome::Succeeded, detail);
            Ok(value)
        }
        Err(cause) => {
            let cause = if ctx.canceled() {
                format!("canceled ({cause})")
            } else {
                cause
            };
            ctx.step_finished(name, StepOutcome::Failed, cause.clone());
            Err(StepFailure { step: name, cause })
        }
    }
}

async fn forward(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    spec: &UpgradeSpec,
    pre: &Preflight,
) -> Result<(), StepFailure> {
    let op_dir = deps.op_dir(&ctx.id);
    let pkg = app.package.clone().ok_or_else(|| StepFailure {
        step: STEP_PREFLIGHT,
        cause: "no package declared".into(),
    })?;
    let unit = ControlledUnit::admit(&deps.config, &app.unit).map_err(|e| StepFailure {
        step: STEP_PREFLIGHT,
        cause: e.to_string(),
    })?;

    step(
        ctx,
        STEP_BACKUP,
        "files and database, as `backup create` does",
        async {
            crate::private::create_dir_all(&op_dir)
                .map_err(|e| format!("cannot create {}: {e}", op_dir.display()))?;
            let opts = CreateOptions {
                files: true,
                database: app.database.is_some(),
                compression: Compression::Zstd,
            };
            let manifest = ctx
                .waiting(deps.backups.create(ctx, app, opts, pre.backup_estimate))
                .await
                .map_err(|e| e.to_string())?;
            ctx.update(|op| op.backup_id = manifest.id.clone());
            // Fingerprints tell the rollback which other app files changed.
            let prints = fingerprints(app);
            write_json(&op_dir.join("fingerprints.json"), &prints)?;
            Ok(((), format!("backup {}", manifest.id)))
        },
    )
    .await?;

    step(
        ctx,
        STEP_PACKAGE,
        &format!("{} {} -> {}", pkg.name, pre.from_version, spec.to_version),
        async {
            let rp = packages::prepare_restore_point(&pkg, &ctx.id)
                .await
                .map_err(|e| e.to_string())?;
            write_json(&op_dir.join("restore_point.json"), &rp)?;
            let on_line = |err: bool, line: &str| {
                ctx.output(
                    STEP_PACKAGE,
                    if err {
                        OutputStream::Stderr
                    } else {
                        OutputStream::Stdout
                    },
                    line,
                )
            };
            ctx.waiting(packages::install_as(
                app.user.as_deref(),
                &pkg,
                &spec.to_version,
                &ctx.id,
                PACKAGE_TIMEOUT,
                &on_line,
            ))
            .await
            .map_err(|e| e.to_string())?;
            Ok(((), format!("installed {} {}", pkg.name, spec.to_version)))
        },
    )
    .await?;

    if let Some(env) = &app.env_file
        && !spec.env_edits.is_empty()
    {
        step(
            ctx,
            STEP_CONFIG,
            &format!("edit {}", env.display()),
            async {
                let diff = envfile::apply(env, &spec.env_edits, &op_dir.join("env.before"))
                    .map_err(|e| e.to_string())?;
                for line in &diff {
                    ctx.output(STEP_CONFIG, OutputStream::Stdout, line);
                }
                Ok(((), format!("{} line(s) changed", diff.len())))
            },
        )
        .await?;
    }

    if let Some(m) = &app.migrate {
        step(ctx, STEP_MIGRATE, &m.command.join(" "), async {
            let env = match &app.env_file {
                Some(p) => crate::envfile::read_values(p).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            let on_line = |err: bool, line: &str| {
                ctx.output(
                    STEP_MIGRATE,
                    if err {
                        OutputStream::Stderr
                    } else {
                        OutputStream::Stdout
                    },
                    line,
                )
            };
            let cancel = ctx.cancel_flag();
            let user = hook_user(app)?;
            let report = ctx
                .waiting(crate::process::run(
                    &m.command, user, &env, m.timeout, &cancel, &on_line,
                ))
                .await
                .map_err(|e| e.to_string())?;
            Ok((
                (),
                format!("done in {}", humantime::format_duration(round(report.took))),
            ))
        })
        .await?;
    }

    step(ctx, STEP_RESTART, &format!("restart {}", app.unit), async {
        restart_and_settle(deps, ctx, &unit).await.map(|d| ((), d))
    })
    .await?;

    if let Some(health) = &app.health {
        step(ctx, STEP_HEALTH, "the health probe must pass", async {
            let o = probe(deps, ctx, app, "health", health).await?;
            if o.ok {
                Ok(((), format!("healthy after {} attempt(s)", o.attempts)))
            } else {
                Err(format!(
                    "{} after {} attempt(s): {}",
                    o.target, o.attempts, o.error
                ))
            }
        })
        .await?;
    }
    if !app.smoke.is_empty() {
        step(ctx, STEP_SMOKE, "smoke checks", async {
            for check in &app.smoke {
                let o = probe(deps, ctx, app, "smoke", check).await?;
                if !o.ok {
                    return Err(format!("{} ({}): {}", o.name, o.target, o.error));
                }
            }
            Ok(((), format!("{} check(s) passed", app.smoke.len())))
        })
        .await?;
    }
    if let (Some(window), Some(health)) = (spec.watch, &app.health) {
        step(
            ctx,
            STEP_WATCH,
            &format!("probe health for {}", humantime::format_duration(window)),
            async {
                let until = Instant::now() + window;
                let every = health.interval.max(Duration::from_millis(500));
                let mut probes_run = 0u32;
                while Instant::now() < until {
                    if ctx.canceled() {
                        return Err("canceled during the watch window".into());
                    }
                    tokio::time::sleep(every.min(until.saturating_duration_since(Instant::now())))
                        .await;
                    let o = probe(deps, ctx, app, "health", health).await?;
                    probes_run += 1;
                    if !o.ok {
                        return Err(format!(
                            "health regressed during the watch window: {}",
                            o.error
                        ));
                    }
                }
                Ok(((), format!("{probes_run} probe(s) passed")))
            },
        )
        .await?;
    }
    Ok(())
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

async fn restart_and_settle(
    deps: &Deps,
    ctx: &OpContext,
    unit: &ControlledUnit,
) -> Result<String, String> {
    let job = ctx
        .waiting(
            deps.systemd
                .act(UnitAction::Restart, unit, deps.config.systemd.job_timeout),
        )
        .await
        .map_err(|e| e.to_string())?;
    if job.result != "done" {
        return Err(format!("the restart job ended {:?}", job.result));
    }
    let deadline = Instant::now() + deps.config.systemd.settle;
    loop {
        let state = deps.systemd.status(unit).await.map_err(|e| e.to_string())?;
        if !state.is_active() {
            return Err(format!(
                "{} is {}/{} after the restart",
                unit.as_str(),
                state.active_state,
                state.sub_state
            ));
        }
        if Instant::now() >= deadline {
            return Ok(format!("running as pid {}", state.main_pid));
        }
        ctx.waiting(tokio::time::sleep(Duration::from_millis(100)))
            .await;
    }
}

/// After success the restore point's copy is no longer needed.
async fn finish_success(deps: &Deps, ctx: &OpContext) {
    let op_dir = deps.op_dir(&ctx.id);
    if let Ok(rp) = read_json::<RestorePoint>(&op_dir.join("restore_point.json"))
        && let Err(e) = packages::discard(&rp).await
    {
        ctx.note(format!("could not remove the previous package copy: {e}"));
    }
}

/// Rolls back an upgrade whose record shows which steps started.
pub async fn rollback_after(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    record: Option<&OperationRecord>,
    cause: &str,
) -> Outcome {
    ctx.state(OpState::RollingBack, cause);
    let started = |name: &str| record.is_some_and(|r| r.steps.iter().any(|s| s.name == name));
    let backup_id = record.map(|r| r.backup_id.clone()).unwrap_or_default();
    let op_dir = deps.op_dir(&ctx.id);
    let mut left: Vec<String> = Vec::new();
    let unit = ControlledUnit::admit(&deps.config, &app.unit);

    // 1. Stop the unit so nothing runs half-old, half-new.
    if let Ok(unit) = &unit
        && let Err(e) = rb_step(ctx, "rollback: stop", "stop the unit", async {
            deps.systemd
                .act(UnitAction::Stop, unit, deps.config.systemd.job_timeout)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!("{} stopped", unit.as_str()))
        })
        .await
    {
        left.push(format!("{} could not be stopped: {e}", app.unit));
    }

    // 2. The package.
    if started(STEP_PACKAGE) {
        let result = rb_step(
            ctx,
            "rollback: package",
            "put back the previous package",
            async {
                match read_json::<RestorePoint>(&op_dir.join("restore_point.json")) {
                    Ok(rp) => match packages::restore(&rp).await {
                        Ok(()) => Ok("previous package restored".to_owned()),
                        // The venv's snapshot cannot be trusted: its archive
                        // in the upgrade's backup can.
                        Err(e @ packages::PackageError::SnapshotChanged { .. }) => {
                            let RestorePoint::Pip { venv, .. } = &rp else {
                                return Err(e.to_string());
                            };
                            ctx.note(format!("{e}; restoring it from backup {backup_id}"));
                            let done = restore_from_backup(
                                deps,
                                ctx,
                                app,
                                &backup_id,
                                std::slice::from_ref(venv),
                            )
                            .await
                            .map_err(|why| format!("{e}; and from the backup: {why}"))?;
                            packages::discard(&rp).await.map_err(|e| e.to_string())?;
                            Ok(done)
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    // The restore point was never recorded: the install never
                    // began; only a copy made for it may be left.
                    Err(_) => {
                        if let Some(pkg) = &app.package {
                            packages::abandon_restore_point(pkg, &ctx.id)
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                        Ok("nothing was installed".to_owned())
                    }
                }
            },
        )
        .await;
        if let Err(e) = result {
            left.push(format!("the package is in an unknown state: {e}"));
        }
    }

    // 3. The env file.
    if started(STEP_CONFIG)
        && let Some(env) = &app.env_file
    {
        let keep = op_dir.join("env.before");
        let result = rb_step(
            ctx,
            "rollback: config",
            &format!("put back {}", env.display()),
            async {
                if keep.exists() {
                    envfile::restore(env, &keep).map_err(|e| e.to_string())?;
                    Ok("env file restored".to_owned())
                } else {
                    Ok("the env file was not changed".to_owned())
                }
            },
        )
        .await;
        if let Err(e) = result {
            left.push(format!(
                "{} may hold the new settings: {e}; the original is {}",
                env.display(),
                keep.display()
            ));
        }
    }

    // 4. The database: the app's own down-migration, else the operation's dump.
    if started(STEP_MIGRATE) {
        let result = rb_step(ctx, "rollback: database", "undo the migrations", async {
            if let Some(argv) = app.migrate.as_ref().and_then(|m| m.rollback.clone()) {
                let env = match &app.env_file {
                    Some(p) => crate::envfile::read_values(p).unwrap_or_default(),
                    None => Vec::new(),
                };
                let never = std::sync::atomic::AtomicBool::new(false);
                let timeout = app
                    .migrate
                    .as_ref()
                    .map_or(Duration::from_secs(600), |m| m.timeout);
                let on_line = |err: bool, line: &str| {
                    ctx.output(
                        "rollback: database",
                        if err {
                            OutputStream::Stderr
                        } else {
                            OutputStream::Stdout
                        },
                        line,
                    )
                };
                let user = hook_user(app)?;
                match crate::process::run(&argv, user, &env, timeout, &never, &on_line).await {
                    Ok(_) => return Ok("the app's migrate rollback command succeeded".to_owned()),
                    Err(e) => ctx.note(format!(
                        "the migrate rollback command failed ({e}); restoring the dump instead"
                    )),
                }
            }
            restore_database(deps, app, &backup_id, &ctx.id).await
        })
        .await;
        if let Err(e) = result {
            left.push(format!(
                "the database may hold the new schema: {e}; its backup is {backup_id} in {}",
                deps.config
                    .backup_dir
                    .join(&app.name)
                    .join(&backup_id)
                    .display()
            ));
        }
    }

    // 5. Other app files that changed since the backup.
    if started(STEP_BACKUP) && !backup_id.is_empty() {
        let result = rb_step(
            ctx,
            "rollback: files",
            "restore app files that changed",
            async { restore_changed_files(deps, ctx, app, &backup_id, &op_dir).await },
        )
        .await;
        if let Err(e) = result {
            left.push(format!("app files may have changed: {e}"));
        }
    }

    // 6. Start and check.
    if let Ok(unit) = &unit {
        let result = rb_step(ctx, "rollback: start", "start the unit", async {
            restart_and_settle(deps, ctx, unit).await
        })
        .await;
        if let Err(e) = result {
            left.push(format!("{} does not run after the rollback: {e}", app.unit));
        } else if let Some(health) = &app.health {
            let result = rb_step(
                ctx,
                "rollback: health",
                "the health probe must pass",
                async {
                    let o = probe(deps, ctx, app, "health", health).await?;
                    if o.ok {
                        Ok("healthy".to_owned())
                    } else {
                        Err(o.error)
                    }
                },
            )
            .await;
            if let Err(e) = result {
                left.push(format!("{} is unhealthy after the rollback: {e}", app.name));
            }
        }
    }

    if left.is_empty() {
        if let Ok(rp) = read_json::<RestorePoint>(&op_dir.join("restore_point.json")) {
            let _ = packages::discard(&rp).await;
        }
        Outcome::RolledBack(cause.to_owned())
    } else {
        let backup = if backup_id.is_empty() {
            "no backup was made".to_owned()
        } else {
            format!(
                "backup {backup_id} is in {}",
                deps.config
                    .backup_dir
                    .join(&app.name)
                    .join(&backup_id)
                    .display()
            )
        };
        Outcome::NeedsHuman {
            cause: format!("{cause}; the rollback did not complete"),
            what_is_left: format!("{}; {backup}", left.join("; ")),
        }
    }
}

/// Runs one of the app's declared probes; its time counts as waiting on the app.
async fn probe(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    kind: &str,
    cfg: &crate::config::ProbeConfig,
) -> Result<probes::ProbeOutcome, String> {
    ctx.waiting(probes::probe_declared(
        &deps.probe_policy,
        &app.name,
        kind,
        cfg,
    ))
    .await
    .map_err(|e| e.to_string())
}

async fn rb_step<F>(ctx: &OpContext, name: &str, description: &str, f: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<String, String>>,
{
    ctx.step_started(name, description);
    match f.await {
        Ok(detail) => {
            ctx.step_finished(name, StepOutcome::Succeeded, detail);
            Ok(())
        }
        Err(e) => {
            ctx.step_finished(name, StepOutcome::Failed, e.clone());
            Err(e)
        }
    }
}

async fn restore_database(
    deps: &Deps,
    app: &AppConfig,
    backup_id: &str,
    op_id: &str,
) -> Result<String, String> {
    let Some(pg) = pg_target(app).map_err(|e| e.to_string())? else {
        return Ok("no database declared".to_owned());
    };
    let (dir, manifest) = deps
        .backups
        .find(&[app.name.as_str()], backup_id)
        .map_err(|e| e.to_string())?;
    let Some(db) = &manifest.database else {
        return Err(format!("backup {backup_id} holds no database dump"));
    };
    let rid = op_id
        .rsplit('-')
        .next()
        .unwrap_or("rb")
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let outcome = crate::db::restore_swap(
        &pg,
        &dir.join(crate::backup::DUMP_FILE),
        &rid,
        &db.row_counts,
        Duration::from_secs(3600),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(format!("restored from {backup_id}; {}", outcome.describe()))
}

/// The path's [`tree_fingerprint`], so the rollback restores only paths that
/// changed. A path that cannot be read (e.g. gone) fingerprints as empty:
/// changed, unless it could not be read before the upgrade either.
fn fingerprint(path: &Path) -> String {
    crate::fsutil::tree_fingerprint(path).unwrap_or_default()
}

fn fingerprints(app: &AppConfig) -> BTreeMap<String, String> {
    app.paths
        .iter()
        .map(|p| (p.display().to_string(), fingerprint(p)))
        .collect()
}

/// Paths handled by their own rollback step (the package, the env file).
fn handled_elsewhere(app: &AppConfig, path: &Path) -> bool {
    let pkg = app.package.as_ref();
    Some(path) == app.env_file.as_deref()
        || pkg.and_then(|p| p.venv.as_deref()) == Some(path)
        || pkg.and_then(|p| p.current.as_deref()) == Some(path)
        || pkg.and_then(|p| p.releases_dir.as_deref()) == Some(path)
}

async fn restore_changed_files(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    backup_id: &str,
    op_dir: &Path,
) -> Result<String, String> {
    let before: BTreeMap<String, String> =
        read_json(&op_dir.join("fingerprints.json")).unwrap_or_default();
    let changed: Vec<PathBuf> = app
        .paths
        .iter()
        .filter(|p| !handled_elsewhere(app, p))
        .filter(|p| {
            before
                .get(&p.display().to_string())
                .is_some_and(|f| *f != fingerprint(p))
        })
        .cloned()
        .collect();
    if changed.is_empty() {
        return Ok("no other app file changed".to_owned());
    }
    restore_from_backup(deps, ctx, app, backup_id, &changed).await
}

/// Restores `paths` (declared app paths) from the upgrade's backup, each by
/// staging and swap.
async fn restore_from_backup(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    backup_id: &str,
    paths: &[PathBuf],
) -> Result<String, String> {
    let (dir, manifest) = deps
        .backups
        .find(&[app.name.as_str()], backup_id)
        .map_err(|e| e.to_string())?;
    let mut only = manifest.clone();
    only.files.retain(|f| {
        paths
            .iter()
            .any(|c| c.display().to_string() == f.source_path)
    });
    if only.files.len() < paths.len() {
        return Err(format!(
            "backup {backup_id} does not hold all of {}",
            display_paths(paths)
        ));
    }
    only.database = None;
    deps.backups
        .restore(
            ctx,
            app,
            &dir,
            &only,
            crate::backup::RestoreOptions {
                files: true,
                database: false,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "restored {} from backup {backup_id}",
        display_paths(paths)
    ))
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `covetctl rollback APP [--to BACKUP]`: stop, restore files and database
/// from the backup, start, check health.
pub async fn run_rollback(
    deps: Deps,
    ctx: OpContext,
    app: AppConfig,
    backup_id: String,
) -> Outcome {
    let result = async {
        let (dir, manifest) = deps
            .backups
            .find(&[app.name.as_str()], &backup_id)
            .map_err(|e| ("find backup", e.to_string()))?;
        let unit =
            ControlledUnit::admit(&deps.config, &app.unit).map_err(|e| ("unit", e.to_string()))?;
        rb_step(&ctx, "stop", "stop the unit", async {
            deps.systemd
                .act(UnitAction::Stop, &unit, deps.config.systemd.job_timeout)
                .await
                .map_err(|e| e.to_string())?;
            Ok("stopped".to_owned())
        })
        .await
        .map_err(|e| ("stop", e))?;
        deps.backups
            .restore(
                &ctx,
                &app,
                &dir,
                &manifest,
                crate::backup::RestoreOptions {
                    files: true,
                    database: true,
                },
            )
            .await
            .map_err(|e| ("restore", e.to_string()))?;
        rb_step(&ctx, "start", "start the unit", async {
            restart_and_settle(&deps, &ctx, &unit).await
        })
        .await
        .map_err(|e| ("start", e))?;
        if let Some(health) = &app.health {
            rb_step(&ctx, "health", "the health probe must pass", async {
                let o = probe(&deps, &ctx, &app, "health", health).await?;
                if o.ok {
                    Ok("healthy".to_owned())
                } else {
                    Err(o.error)
                }
            })
            .await
            .map_err(|e| ("health", e))?;
        }
        Ok::<_, (&str, String)>(manifest.package_version)
    }
    .await;
    match result {
        Ok(version) => {
            ctx.note(format!(
                "{} is back at {} from backup {backup_id}",
                app.name,
                if version.is_empty() {
                    "its backed-up version".to_owned()
                } else {
                    version
                }
            ));
            Outcome::Succeeded
        }
        Err((step, e)) if step == "find backup" || step == "unit" || step == "stop" => {
            Outcome::Failed(format!("{step}: {e}"))
        }
        Err((step, e)) => Outcome::NeedsHuman {
            cause: format!("rollback failed at {step}: {e}"),
            what_is_left: format!(
                "{} may be partly restored; backup {backup_id} is in {}",
                app.name,
                deps.config
                    .backup_dir
                    .join(&app.name)
                    .join(&backup_id)
                    .display()
            ),
        },
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    crate::private::write_synced(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}
