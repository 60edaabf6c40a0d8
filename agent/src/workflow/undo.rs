//! Every rollback through one path: the automatic one of a failed or
//! canceled upgrade, the one that finishes an upgrade interrupted by a
//! crash, and `covetctl rollback` (of the last upgrade, or `--to` a backup).
//!
//! Stop the unit; undo the steps newest first (the database while the new
//! code that knows its migrations is still installed, then the env file,
//! the package, and the other files that changed); start the unit and pass
//! the health gate. Each undo is safe to run again after a crash.

use std::path::PathBuf;

use super::forward::{app_env, fingerprint, output_to};
use super::opdir::OpDir;
use super::preflight::hook_user;
use super::slotted::SlotUndo;
use super::step::undo_order;
use super::{Deps, Step, StepError, gate, journaled};
use crate::backup::{Manifest, RestoreOptions, db_target};
use crate::config::AppConfig;
use crate::host::envfile;
use crate::host::systemd::{ControlledUnit, UnitAction};
use crate::ops::OpContext;
use crate::ops::log::OperationRecord;
use crate::packages::{self, Fallback};

/// What a rollback puts back.
#[derive(Debug, Clone)]
pub enum RollbackOf {
    /// Undo this upgrade: the steps its record shows started, with what
    /// its operation directory kept (restore point, env file, fingerprints).
    Upgrade(Box<OperationRecord>),
    /// Back to this backup (`rollback --to`): the package at the backup's
    /// version, and the env file, database and files from it.
    Backup(String),
}

impl RollbackOf {
    /// The backup the rollback takes what it puts back from.
    pub fn backup_id(&self) -> &str {
        match self {
            RollbackOf::Upgrade(op) => &op.backup_id,
            RollbackOf::Backup(id) => id,
        }
    }
}

/// Where the undo of each step takes what it puts back.
enum Source {
    /// The upgrade's own operation directory, then its backup.
    Upgrade(OpDir),
    /// The backup alone.
    Backup,
}

/// Runs the rollback: Ok when everything was put back and the app is
/// healthy, else what is left for a human, one item each.
pub async fn roll_back(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    of: &RollbackOf,
) -> Result<(), Vec<String>> {
    let backup_id = of.backup_id().to_owned();
    let (steps, source) = match of {
        RollbackOf::Upgrade(op) => (
            undo_order(op.steps.iter().filter_map(|s| Step::from_name(&s.name))),
            Source::Upgrade(OpDir::new(&deps.config.state_dir, &op.id)),
        ),
        RollbackOf::Backup(_) => (
            [
                (Step::Migrate, app.database.is_some()),
                (Step::Package, app.package.is_some()),
                (Step::Backup, true),
            ]
            .into_iter()
            .filter_map(|(step, applies)| applies.then_some(step))
            .collect(),
            Source::Backup,
        ),
    };
    let undo = Undo {
        deps,
        ctx,
        app,
        backup_id,
        source,
        steps: steps.clone(),
    };
    let mut left: Vec<String> = Vec::new();
    if app.slotted().is_some()
        && let Source::Upgrade(dir) = &undo.source
    {
        // The old side serves throughout: no stop, no start of the app.
        let slots = SlotUndo {
            deps,
            ctx,
            app,
            op_dir: dir,
        };
        // Both sides read the one env file: it is put back first, so that
        // the old side starts again with the settings it knows (the running
        // new side read its own at start).
        let mut order = undo.steps.clone();
        order.sort_by_key(|s| *s != Step::Config);
        for step in &order {
            let (Some(name), description) = (step.undo_name(), step.undo_description()) else {
                continue;
            };
            if let Err(e) = journaled(ctx, name, description, undo.undo(*step, Some(&slots))).await
            {
                left.push(undo.what_is_left(*step, &e));
            }
        }
        if let Err(e) = journaled(
            ctx,
            "rollback: health",
            "what serves now must pass its health probe",
            slots.check_serving(),
        )
        .await
        {
            left.push(format!("{} is unhealthy after the rollback: {e}", app.name));
        }
        return if left.is_empty() { Ok(()) } else { Err(left) };
    }
    let unit = ControlledUnit::admit(&deps.config, &app.unit);

    // Nothing may run half old, half new.
    match &unit {
        Ok(unit) => {
            let stopped = journaled(ctx, "rollback: stop", "stop the unit", async {
                deps.systemd
                    .act(UnitAction::Stop, unit, deps.config.systemd.job_timeout)
                    .await?;
                Ok(format!("{} stopped", unit.as_str()))
            })
            .await;
            if let Err(e) = stopped {
                left.push(format!("{} could not be stopped: {e}", app.unit));
            }
        }
        Err(e) => left.push(format!("{} cannot be controlled: {e}", app.unit)),
    }

    for step in steps {
        let (Some(name), description) = (step.undo_name(), step.undo_description()) else {
            continue;
        };
        if let Err(e) = journaled(ctx, name, description, undo.undo(step, None)).await {
            left.push(undo.what_is_left(step, &e));
        }
    }

    if let Ok(unit) = &unit {
        let started = journaled(
            ctx,
            "rollback: start",
            "start the unit",
            gate::start(deps, ctx, app, unit, UnitAction::Start),
        )
        .await;
        match (started, &app.health) {
            (Err(e), _) => left.push(format!("{} does not run after the rollback: {e}", app.unit)),
            (Ok(()), Some(health)) => {
                let healthy = journaled(
                    ctx,
                    "rollback: health",
                    "the health probe must pass while the unit stays active",
                    async {
                        gate::healthy(deps, ctx, app, unit, health, gate::OnCancel::Continue)
                            .await
                            .map(|_| "healthy".to_owned())
                    },
                )
                .await;
                if let Err(e) = healthy {
                    left.push(format!("{} is unhealthy after the rollback: {e}", app.name));
                }
            }
            (Ok(()), None) => {}
        }
    }
    if left.is_empty() { Ok(()) } else { Err(left) }
}

struct Undo<'a> {
    deps: &'a Deps,
    ctx: &'a OpContext,
    app: &'a AppConfig,
    backup_id: String,
    source: Source,
    /// Every step this rollback undoes, to know what each one covers.
    steps: Vec<Step>,
}

impl Undo<'_> {
    /// Undoes `step`; `slots` has the slot undos of a blue-green or canary upgrade.
    async fn undo(&self, step: Step, slots: Option<&SlotUndo<'_>>) -> Result<String, StepError> {
        match (step, slots) {
            (Step::Migrate, _) => self.database().await,
            (Step::Config, _) => self.env_file(),
            (Step::Package, _) => self.package().await,
            (Step::Backup, _) => self.files().await,
            (Step::Drain, Some(s)) => s.old_slot().await,
            (Step::Switch, Some(s)) => s.traffic().await,
            (Step::Start, Some(s)) => s.new_slot().await,
            (Step::Drain | Step::Switch | Step::Start, None) => Ok("no slots to undo".into()),
            (
                Step::Preflight
                | Step::Release
                | Step::Restart
                | Step::Health
                | Step::Smoke
                | Step::Watch
                | Step::Promote,
                _,
            ) => Ok(String::new()),
        }
    }

    /// What the operator must know when `step`'s undo failed.
    fn what_is_left(&self, step: Step, e: &StepError) -> String {
        match step {
            Step::Package => format!("the package is in an unknown state: {e}"),
            Step::Config => format!(
                "{} may hold the new settings: {e}; the original is {}",
                self.app
                    .env_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new("the env file"))
                    .display(),
                match &self.source {
                    Source::Upgrade(dir) => dir.env_before().display().to_string(),
                    Source::Backup => format!("in backup {}", self.backup_id),
                }
            ),
            Step::Migrate => format!(
                "the database may hold the new schema: {e}; its backup is {} in {}",
                self.backup_id,
                self.backup_dir().display()
            ),
            Step::Backup => format!("app files may have changed: {e}"),
            Step::Start => format!("the new slot may still run: {e}"),
            Step::Switch => format!("the requests may still go to the new slot: {e}"),
            Step::Drain => format!("the old slot may be stopped: {e}"),
            Step::Preflight
            | Step::Release
            | Step::Restart
            | Step::Health
            | Step::Smoke
            | Step::Watch
            | Step::Promote => e.to_string(),
        }
    }

    fn backup_dir(&self) -> PathBuf {
        self.deps
            .config
            .backup_dir
            .join(&self.app.name)
            .join(&self.backup_id)
    }

    fn backup(&self) -> Result<(PathBuf, Manifest), StepError> {
        if self.backup_id.is_empty() {
            return Err(StepError::NoBackup("the app's files"));
        }
        Ok(self
            .deps
            .backups
            .find(&[self.app.name.as_str()], &self.backup_id)?)
    }

    /// The app's own down-migration (an upgrade's undo only), else the
    /// backup's dump (no listing pass first: an upgrade's own dump, or one
    /// whose checksums the rollback's RPC verified).
    async fn database(&self) -> Result<String, StepError> {
        let (ctx, app) = (self.ctx, self.app);
        if let (Some(deploy), Source::Upgrade(_)) = (app.slotted(), &self.source) {
            // Before the switch users never left the live version, which
            // runs on the migrated schema: restoring under it would break it.
            if !self.steps.contains(&Step::Switch) {
                return Ok(format!(
                    "kept as migrated: the live version never stopped serving on it; backup {} holds the data as it was",
                    self.backup_id
                ));
            }
            if deploy.database_on_rollback == crate::config::DatabaseOnRollback::Keep {
                return Ok(format!(
                    "kept as migrated (database_on_rollback = \"keep\"); backup {} holds the data as it was",
                    self.backup_id
                ));
            }
        }
        if let (Source::Upgrade(_), Some(m)) = (&self.source, &app.migrate)
            && let Some(argv) = &m.rollback
        {
            let env = app_env(app).unwrap_or_default();
            let never = std::sync::atomic::AtomicBool::new(false);
            let on_line = output_to(ctx, "rollback: database");
            let user = hook_user(app)?;
            match ctx
                .waiting(crate::host::process::run(
                    argv, user, &env, m.timeout, &never, &on_line,
                ))
                .await
            {
                Ok(_) => return Ok("the app's migrate rollback command succeeded".into()),
                Err(e) => ctx.note(format!(
                    "the migrate rollback command failed ({e}); restoring the dump instead"
                )),
            }
        }
        let Some(pg) = db_target(app)? else {
            return Ok("no database declared".into());
        };
        let (dir, manifest) = self.backup()?;
        let Some(db) = &manifest.database else {
            return Err(StepError::NotInBackup {
                backup: self.backup_id.clone(),
                what: "a database dump".into(),
            });
        };
        let rid = ctx
            .id
            .rsplit('-')
            .next()
            .unwrap_or("rb")
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        crate::backup::check_dump_kind(db, &pg)?;
        let outcome = ctx
            .waiting(pg.restore_swap_checked(
                &dir.join(crate::backup::DUMP_FILE),
                &rid,
                &db.row_counts,
                std::time::Duration::from_secs(3600),
            ))
            .await?;
        Ok(format!(
            "restored from {}; {}",
            self.backup_id,
            outcome.describe()
        ))
    }

    /// The env file as the config step kept it.
    fn env_file(&self) -> Result<String, StepError> {
        let (Some(env), Source::Upgrade(dir)) = (&self.app.env_file, &self.source) else {
            return Ok("the env file was not changed".into());
        };
        let keep = dir.env_before();
        if !keep.exists() {
            return Ok("the env file was not changed".into());
        }
        envfile::restore(env, &keep)?;
        Ok(format!("{} restored", env.display()))
    }

    /// The package: the restore point when it is intact, else the way back
    /// its kind names (the backup's copy of its paths, or the backup's
    /// version installed again).
    async fn package(&self) -> Result<String, StepError> {
        let ctx = self.ctx;
        let Some(pkg) = &self.app.package else {
            return Ok("no package declared".into());
        };
        if let Source::Upgrade(dir) = &self.source {
            match dir.restore_point()? {
                Some(rp) => match ctx.waiting(packages::restore(&rp)).await {
                    Ok(()) => {
                        let _ = packages::discard(&rp).await;
                        return Ok("previous package restored from its restore point".into());
                    }
                    Err(e) => {
                        let e = StepError::from(e);
                        if !e.restore_point_unusable() {
                            return Err(e);
                        }
                        ctx.note(format!("{e}; putting the package back from the backup"));
                        let _ = packages::discard(&rp).await;
                    }
                },
                // Never recorded: the install never began; only a copy made
                // for it may be left.
                None => {
                    packages::abandon_restore_point(pkg, &ctx.id).await?;
                    return Ok("nothing was installed".into());
                }
            }
        }
        let (_, manifest) = self.backup()?;
        match packages::fallback(pkg) {
            Fallback::RestorePaths(paths) => self.restore_paths(&paths).await,
            Fallback::ReinstallBackedUpVersion => {
                let version = &manifest.package_version;
                if version.is_empty() {
                    return Err(StepError::NotInBackup {
                        backup: self.backup_id.clone(),
                        what: format!("the version of {} it was taken at", pkg.name()),
                    });
                }
                let on_line = output_to(ctx, "rollback: package");
                ctx.waiting(packages::install_as(
                    self.app.user.as_deref(),
                    pkg,
                    version,
                    &ctx.id,
                    super::PACKAGE_TIMEOUT,
                    &on_line,
                ))
                .await?;
                Ok(format!("{} {version} installed again", pkg.name()))
            }
        }
    }

    /// The backed-up paths that changed since the backup (an upgrade's
    /// undo), or all of them (`--to` a backup), except what the package's
    /// and the env file's own undo put back.
    async fn files(&self) -> Result<String, StepError> {
        let before = match &self.source {
            Source::Upgrade(dir) => Some(dir.fingerprints()?),
            Source::Backup => None,
        };
        let paths: Vec<PathBuf> = crate::backup::paths_of(self.app)
            .into_iter()
            .filter(|p| !self.handled_elsewhere(p))
            .filter(|p| match &before {
                Some(prints) => prints
                    .get(&p.display().to_string())
                    .is_some_and(|f| *f != fingerprint(p)),
                None => true,
            })
            .collect();
        if paths.is_empty() {
            return Ok("no other app file changed".into());
        }
        self.restore_paths(&paths).await
    }

    /// Paths another undo of this rollback puts back.
    fn handled_elsewhere(&self, path: &std::path::Path) -> bool {
        let pkg = self.app.package.as_ref();
        let env_undone =
            self.steps.contains(&Step::Config) && matches!(self.source, Source::Upgrade(_));
        let package_undone = self.steps.contains(&Step::Package);
        (env_undone && Some(path) == self.app.env_file.as_deref())
            || (package_undone
                && pkg.is_some_and(|p| p.app_paths().iter().any(|(_, own)| *own == path)))
    }

    /// Restores `paths` (backed-up app paths) from the backup, each by
    /// staging and swap.
    async fn restore_paths(&self, paths: &[PathBuf]) -> Result<String, StepError> {
        let (dir, manifest) = self.backup()?;
        let mut only = manifest.clone();
        only.files.retain(|f| {
            paths
                .iter()
                .any(|c| c.display().to_string() == f.source_path)
        });
        let listed = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if only.files.len() < paths.len() {
            return Err(StepError::NotInBackup {
                backup: self.backup_id.clone(),
                what: format!("all of {listed}"),
            });
        }
        only.database = None;
        self.ctx
            .waiting(self.deps.backups.restore(
                self.ctx,
                self.app,
                &dir,
                &only,
                RestoreOptions {
                    files: true,
                    database: false,
                },
            ))
            .await?;
        Ok(format!("restored {listed} from backup {}", self.backup_id))
    }
}

/// Removes what the restore points of `ops` still keep (a venv snapshot, a
/// kept package file): called when a newer upgrade succeeded, so only the
/// last upgrade's restore point is kept.
pub async fn discard_restore_points(deps: &Deps, ctx: &OpContext, ops: &[OperationRecord]) {
    for op in ops {
        let dir = OpDir::new(&deps.config.state_dir, &op.id);
        if let Ok(Some(rp)) = dir.restore_point()
            && let Err(e) = packages::discard(&rp).await
        {
            ctx.note(format!(
                "could not remove the restore point of {}: {e}",
                op.id
            ));
        }
    }
}
