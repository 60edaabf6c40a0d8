//! The upgrade runbook as one journaled operation, and every rollback.
//!
//! The runbook is the list of typed steps in [`Step`]: preflight, backup,
//! package, config, migrate, restart, health, smoke, watch. An upgrade runs
//! the ones that apply (`forward.rs`), each journaled before it acts. Every
//! rollback goes through `undo.rs`: the automatic one after a failure or a
//! cancel, the one that finishes an upgrade interrupted by a crash
//! ([`finish_interrupted`], the crash policy), and `covetctl rollback`
//! ([`run_rollback`]), which undoes the last succeeded upgrade the same way
//! from what that upgrade kept, or goes back to a named backup.
//!
//! An upgrade ends exactly one of Succeeded, RolledBack (with the cause) or
//! NeedsHuman (saying what is left and where the backup is).
//!
//! What a rollback needs survives a crash: it lives in `state_dir/ops/ID/`
//! (`opdir.rs`: restore point, the env file as it was, path fingerprints)
//! and in the journal (which steps started). The last succeeded upgrade's
//! restore point is kept until the next upgrade succeeds, so rolling it
//! back is a swap, not an extraction.

mod error;
mod forward;
mod gate;
mod opdir;
mod preflight;
mod slotted;
mod step;
mod undo;
pub(crate) mod unit_action;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use error::StepError;
pub use forward::reading_event;
pub use preflight::{Preflight, PreflightError, migration_dry_run, preflight};
pub use step::Step;
pub use undo::RollbackOf;

use crate::backup::BackupStore;
use crate::config::{AppConfig, Config};
use crate::host::envfile::EnvEdit;
use crate::host::systemd::{ControlledUnit, Systemd};
use crate::ops::log::{OpKind, OpLog, OpState, OperationRecord, StepOutcome};
use crate::ops::{OpContext, Outcome};
use crate::probes::TargetPolicy;

const PACKAGE_TIMEOUT: Duration = Duration::from_secs(900);

/// What the workflow needs of the agent.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub systemd: Arc<Systemd>,
    pub backups: BackupStore,
    pub probe_policy: TargetPolicy,
    pub oplog: Arc<OpLog>,
}

/// An upgrade as asked, after validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeSpec {
    pub app: String,
    pub to_version: crate::names::Version,
    pub env_edits: Vec<EnvEdit>,
    pub no_rollback: bool,
    pub watch: Option<Duration>,
    pub force: bool,
    /// Canary: the new slot's share at each step below 100 (empty: the
    /// app's `canary_percent`, with no wait of its own).
    #[serde(default)]
    pub canary: Vec<u8>,
    /// Canary: how long each of those steps is judged.
    #[serde(default)]
    pub step_wait: Option<Duration>,
}

impl UpgradeSpec {
    /// The spec as operation parameters, which every reader may see: env
    /// edits by key name only, never a value (`DATABASE_PASSWORD=...`).
    pub fn to_params(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("to_version".into(), self.to_version.to_string());
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
        if !self.canary.is_empty() {
            let shares: Vec<String> = self.canary.iter().map(u8::to_string).collect();
            p.insert("canary".into(), format!("{},100", shares.join(",")));
        }
        if let Some(wait) = self.step_wait {
            p.insert(
                "step_wait".into(),
                humantime::format_duration(wait).to_string(),
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

/// The plan as PlanUpgrade prints it: one line per step this upgrade runs.
pub fn plan_lines(app: &AppConfig, spec: &UpgradeSpec, from_version: &str) -> Vec<String> {
    Step::plan(app, spec)
        .into_iter()
        .map(|s| format!("{s}: {}", s.describe(app, spec, from_version)))
        .collect()
}

/// Whether an interrupted upgrade had started changing the app.
pub fn changed_anything(op: &OperationRecord) -> bool {
    op.steps
        .iter()
        .filter_map(|s| Step::from_name(&s.name))
        .any(Step::changes_app)
}

/// Why a step failed.
struct StepFailure {
    step: Step,
    error: StepError,
}

/// Runs a whole upgrade in its operation.
pub async fn run_upgrade(
    deps: Deps,
    ctx: OpContext,
    app: AppConfig,
    spec: UpgradeSpec,
    pre: Preflight,
) -> Outcome {
    ctx.update(|op| {
        op.params
            .insert("from_version".into(), pre.from_version.clone());
    });
    let started = Instant::now();
    // Boxed: the whole runbook is one large future.
    let result = Box::pin(forward(&deps, &ctx, &app, &spec, &pre)).await;
    let outcome = match result {
        Ok(()) => {
            finish_success(&deps, &ctx, &app).await;
            Outcome::Succeeded
        }
        // No step that changes the app started: nothing to undo, but a
        // snapshot made beside the backup may be left.
        Err(f) if !ctx.record().is_some_and(|r| changed_anything(&r)) => {
            abandon_snapshot(&ctx, &app).await;
            if ctx.canceled() {
                Outcome::Canceled(format!("canceled during {}; nothing was changed", f.step))
            } else {
                Outcome::Failed(format!(
                    "{} failed: {}; nothing was changed",
                    f.step, f.error
                ))
            }
        }
        Err(f) => {
            let cause = format!("{} failed: {}", f.step, f.error);
            if spec.no_rollback {
                ctx.note("--no-rollback: leaving the app as it is");
                Outcome::Failed(format!("{cause}; not rolled back (--no-rollback)"))
            } else {
                match ctx.record() {
                    Some(record) => Box::pin(undo_upgrade(&deps, &ctx, &app, record, &cause)).await,
                    None => Outcome::NeedsHuman {
                        cause: format!("{cause}; the operation's record cannot be read"),
                        what_is_left: "nothing was rolled back".into(),
                    },
                }
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

async fn forward(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    spec: &UpgradeSpec,
    pre: &Preflight,
) -> Result<(), StepFailure> {
    let at_preflight = |error: StepError| StepFailure {
        step: Step::Preflight,
        error,
    };
    let pkg = app
        .package
        .as_ref()
        .ok_or_else(|| at_preflight(StepError::NoPackage(app.name.clone())))?;
    let unit = ControlledUnit::admit(&deps.config, &app.unit)
        .map_err(|e| at_preflight(StepError::Systemd(e)))?;
    let upgrade = forward::Upgrade {
        deps,
        ctx,
        app,
        spec,
        pre,
        pkg,
        unit: &unit,
        op_dir: opdir::OpDir::new(&deps.config.state_dir, &ctx.id),
        restore_point: std::sync::Mutex::new(None),
        baseline: std::sync::OnceLock::new(),
    };
    for step in Step::plan(app, spec) {
        if ctx.canceled() {
            return Err(StepFailure {
                step,
                error: StepError::Canceled,
            });
        }
        // Boxed: every step's future is in it, too large for a worker's stack.
        let run = async {
            Box::pin(upgrade.run(step))
                .await
                .map_err(|e| e.canceled_if(ctx.canceled()))
        };
        journaled(
            ctx,
            step.name(),
            &step.describe(app, spec, &pre.from_version),
            run,
        )
        .await
        .map_err(|error| StepFailure { step, error })?;
    }
    Ok(())
}

/// Journals a step's (or an undo's) start and end around it.
async fn journaled<F>(
    ctx: &OpContext,
    name: &str,
    description: &str,
    work: F,
) -> Result<(), StepError>
where
    F: std::future::Future<Output = Result<String, StepError>>,
{
    ctx.step_started(name, description);
    match work.await {
        Ok(detail) => {
            ctx.step_finished(name, StepOutcome::Succeeded, detail);
            Ok(())
        }
        Err(e) => {
            ctx.step_finished(name, StepOutcome::Failed, e.to_string());
            Err(e)
        }
    }
}

/// Removes a restore point's snapshot that no install used.
async fn abandon_snapshot(ctx: &OpContext, app: &AppConfig) {
    if let Some(pkg) = &app.package
        && let Err(e) = crate::packages::abandon_restore_point(pkg, &ctx.id).await
    {
        ctx.note(format!("could not remove the unused package snapshot: {e}"));
    }
}

/// Only the last succeeded upgrade's restore point is kept: the earlier
/// ones of the app are discarded now.
async fn finish_success(deps: &Deps, ctx: &OpContext, app: &AppConfig) {
    let earlier: Vec<OperationRecord> = match deps.oplog.list() {
        Ok(ops) => ops
            .into_iter()
            .filter(|op| op.app == app.name && op.kind == OpKind::Upgrade && op.id != ctx.id)
            .filter(|op| op.state.is_final())
            .collect(),
        Err(e) => {
            ctx.note(format!(
                "cannot list earlier upgrades to discard their restore points: {e}"
            ));
            return;
        }
    };
    undo::discard_restore_points(deps, ctx, &earlier).await;
}

/// Rolls back the upgrade `record` inside its own operation: Ok is
/// RolledBack with the cause.
async fn undo_upgrade(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    record: OperationRecord,
    cause: &str,
) -> Outcome {
    ctx.state(OpState::RollingBack, cause);
    let backup_id = record.backup_id.clone();
    match Box::pin(undo::roll_back(
        deps,
        ctx,
        app,
        &RollbackOf::Upgrade(Box::new(record)),
    ))
    .await
    {
        Ok(()) => Outcome::RolledBack(cause.to_owned()),
        Err(left) => Outcome::NeedsHuman {
            cause: format!("{cause}; the rollback did not complete"),
            what_is_left: format!(
                "{}; {}",
                left.join("; "),
                backup_place(deps, app, &backup_id)
            ),
        },
    }
}

fn backup_place(deps: &Deps, app: &AppConfig, backup_id: &str) -> String {
    if backup_id.is_empty() {
        "no backup was made".to_owned()
    } else {
        format!(
            "backup {backup_id} is in {}",
            deps.config
                .backup_dir
                .join(&app.name)
                .join(backup_id)
                .display()
        )
    }
}

/// Why `covetctl rollback` has nothing to go back to.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "no successful upgrade of {0} to roll back; an admin may name a backup with --to BACKUP_ID"
    )]
    NoUpgrade(String),
    #[error(transparent)]
    OpLog(#[from] crate::ops::log::OpLogError),
}

/// What `covetctl rollback APP [--to BACKUP]` goes back to: the app's last
/// succeeded upgrade that no rollback has undone yet (whether or not its
/// backup is named), else the named backup. The bool says whether the
/// target is that last upgrade (an operator's to undo) rather than a backup
/// (an admin's restore).
pub fn rollback_target(
    oplog: &OpLog,
    app: &str,
    asked_backup: &str,
) -> Result<(RollbackOf, bool), TargetError> {
    let last = oplog.list()?.into_iter().find(|op| {
        op.app == app
            && op.kind == OpKind::Upgrade
            && op.state == OpState::Succeeded
            && !op.backup_id.is_empty()
            && !op.params.contains_key(UNDONE_BY)
    });
    match last {
        Some(op) if asked_backup.is_empty() || asked_backup == op.backup_id => {
            Ok((RollbackOf::Upgrade(Box::new(op)), true))
        }
        _ if !asked_backup.is_empty() => Ok((RollbackOf::Backup(asked_backup.to_owned()), false)),
        _ => Err(TargetError::NoUpgrade(app.to_owned())),
    }
}

/// The upgrade param naming the rollback that undid it.
const UNDONE_BY: &str = "undone_by";
/// The rollback param naming the upgrade it undoes.
const UNDOES: &str = "undoes";

/// A rollback operation's params, which let a crash resume it.
pub fn rollback_params(of: &RollbackOf) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    match of {
        RollbackOf::Upgrade(op) => {
            params.insert("backup".into(), op.backup_id.clone());
            params.insert(UNDOES.into(), op.id.clone());
            if let Some(from) = op.params.get("from_version") {
                params.insert("to_version".into(), from.clone());
            }
        }
        RollbackOf::Backup(id) => {
            params.insert("backup".into(), id.clone());
        }
    }
    params
}

/// `covetctl rollback APP [--to BACKUP]`: the app back as it was before
/// its last succeeded upgrade, or as in the named backup.
pub async fn run_rollback(deps: Deps, ctx: OpContext, app: AppConfig, of: RollbackOf) -> Outcome {
    let backup_id = of.backup_id().to_owned();
    ctx.update(|op| op.backup_id = backup_id.clone());
    if app.slotted().is_some() && matches!(of, RollbackOf::Backup(_)) {
        return Outcome::Failed(format!(
            "{} deploys in slots: a rollback switches back from its last upgrade \
             (`covetctl rollback {}` without --to); take files and data from backup \
             {backup_id} with `covetctl backup restore`; nothing was changed",
            app.name, app.name
        ));
    }
    if let RollbackOf::Backup(id) = &of
        && let Err(e) = deps.backups.find(&[app.name.as_str()], id)
    {
        return Outcome::Failed(format!("{e}; nothing was changed"));
    }
    match Box::pin(undo::roll_back(&deps, &ctx, &app, &of)).await {
        Ok(()) => {
            let version = match &of {
                RollbackOf::Upgrade(op) => {
                    // Undone once: the next `rollback` goes further back.
                    let by = ctx.id.clone();
                    if let Err(e) = deps
                        .oplog
                        .update(&op.id, |u| drop(u.params.insert(UNDONE_BY.into(), by)))
                    {
                        ctx.note(format!("cannot mark {} as undone: {e}", op.id));
                    }
                    op.params.get("from_version").cloned().unwrap_or_default()
                }
                RollbackOf::Backup(id) => deps
                    .backups
                    .find(&[app.name.as_str()], id)
                    .map(|(_, m)| m.package_version)
                    .unwrap_or_default(),
            };
            ctx.note(format!(
                "{} is back at {} from backup {backup_id}",
                app.name,
                if version.is_empty() {
                    "its backed-up version"
                } else {
                    &version
                }
            ));
            Outcome::Succeeded
        }
        Err(left) => Outcome::NeedsHuman {
            cause: "the rollback did not complete".into(),
            what_is_left: format!(
                "{}; {}",
                left.join("; "),
                backup_place(&deps, &app, &backup_id)
            ),
        },
    }
}

/// The crash policy: whether the workflow finishes an operation the agent
/// found unfinished at its start (upgrades and rollbacks; the rest end
/// Failed).
pub fn takes_over(op: &OperationRecord) -> bool {
    matches!(op.kind, OpKind::Upgrade | OpKind::Rollback)
}

/// Finishes an operation interrupted by a crash: an upgrade that had
/// changed the app is rolled back (one that had not ends Failed, nothing
/// changed); a rollback is run again (each undo is safe to repeat).
pub async fn finish_interrupted(
    deps: Deps,
    ctx: OpContext,
    app: AppConfig,
    record: OperationRecord,
) -> Outcome {
    let cause = format!(
        "interrupted by an agent restart during step {:?}",
        record.current_step
    );
    match record.kind {
        OpKind::Upgrade => {
            ctx.note("the agent restarted while this operation ran; finishing it by rolling back");
            if !changed_anything(&record) {
                abandon_snapshot(&ctx, &app).await;
                return Outcome::Failed(format!("{cause}; nothing was changed"));
            }
            Box::pin(undo_upgrade(&deps, &ctx, &app, record, &cause)).await
        }
        OpKind::Rollback => {
            ctx.note("the agent restarted during this rollback; running it again");
            let of = match record.params.get(UNDOES) {
                Some(upgrade) => match deps.oplog.get(upgrade) {
                    Ok(op) => RollbackOf::Upgrade(Box::new(op)),
                    Err(e) => return Outcome::Failed(format!("{cause}; {e}")),
                },
                None if !record.backup_id.is_empty() => {
                    RollbackOf::Backup(record.backup_id.clone())
                }
                None => return Outcome::Failed(format!("{cause}; it names no backup")),
            };
            run_rollback(deps, ctx, app, of).await
        }
        _ => Outcome::Failed(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn upgrade(id: &str, state: OpState, backup: &str, age_s: u64) -> OperationRecord {
        let at = SystemTime::now() - Duration::from_secs(age_s);
        OperationRecord {
            id: id.into(),
            kind: OpKind::Upgrade,
            app: "covet".into(),
            state,
            created: at,
            updated: at,
            finished: Some(at),
            requested_by: crate::ops::log::Caller {
                common_name: "alice".into(),
                serial: "01".into(),
                role: "operator".into(),
            },
            cause: String::new(),
            needs_human: String::new(),
            backup_id: backup.into(),
            current_step: String::new(),
            last_sequence: 0,
            params: [("from_version".to_owned(), "0.1.9".to_owned())].into(),
            steps: Vec::new(),
        }
    }

    fn target(oplog: &OpLog, asked: &str) -> Result<(String, bool), String> {
        rollback_target(oplog, "covet", asked)
            .map(|(of, last)| {
                let what = match of {
                    RollbackOf::Upgrade(op) => format!("upgrade {}", op.id),
                    RollbackOf::Backup(id) => format!("backup {id}"),
                };
                (what, last)
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rollback_goes_to_the_last_succeeded_upgrade_not_yet_undone() {
        let dir = tempfile::tempdir().unwrap();
        let oplog = OpLog::open(&dir.path().join("journal.redb")).unwrap();
        assert!(
            target(&oplog, "")
                .unwrap_err()
                .contains("no successful upgrade of covet")
        );
        for op in [
            upgrade("up-1", OpState::Succeeded, "b1", 300),
            upgrade("up-2", OpState::Succeeded, "b2", 200),
            // Newer, but it rolled itself back: not the app's state.
            upgrade("up-3", OpState::RolledBack, "b3", 100),
        ] {
            oplog.create(&op).unwrap();
        }
        let mut other_app = upgrade("up-9", OpState::Succeeded, "x9", 10);
        other_app.app = "other".into();
        oplog.create(&other_app).unwrap();

        assert_eq!(target(&oplog, ""), Ok(("upgrade up-2".into(), true)));
        // Naming the last upgrade's own backup is the same (fleet rollouts do).
        assert_eq!(target(&oplog, "b2"), Ok(("upgrade up-2".into(), true)));
        // Any other backup is a restore of that backup.
        assert_eq!(target(&oplog, "b1"), Ok(("backup b1".into(), false)));
        assert_eq!(target(&oplog, "x9"), Ok(("backup x9".into(), false)));

        // Once undone, the next rollback goes one upgrade further back.
        oplog
            .update("up-2", |op| {
                op.params.insert(UNDONE_BY.into(), "rb-1".into());
            })
            .unwrap();
        assert_eq!(target(&oplog, ""), Ok(("upgrade up-1".into(), true)));
        assert_eq!(target(&oplog, "b2"), Ok(("backup b2".into(), false)));
    }

    #[test]
    fn a_rollbacks_params_say_what_it_undoes() {
        let op = upgrade("up-1", OpState::Succeeded, "b1", 0);
        let params = rollback_params(&RollbackOf::Upgrade(Box::new(op)));
        assert_eq!(params.get("backup").map(String::as_str), Some("b1"));
        assert_eq!(params.get(UNDOES).map(String::as_str), Some("up-1"));
        assert_eq!(params.get("to_version").map(String::as_str), Some("0.1.9"));
        let params = rollback_params(&RollbackOf::Backup("b7".into()));
        assert_eq!(params.get("backup").map(String::as_str), Some("b7"));
        assert!(!params.contains_key(UNDOES));
    }
}
