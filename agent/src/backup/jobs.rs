//! Backup operations as the operation runner runs them: each notes what it
//! did in the operation log and ends in an [`Outcome`], a cancel told apart
//! from a failure.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::backup::{BackupError, BackupStore, CreateOptions, Manifest, RestoreOptions, db_target};
use crate::config::AppConfig;
use crate::ops::log::StepOutcome;
use crate::ops::{OpContext, Outcome};

/// Outcome of a failed backup operation, canceled or not.
fn failed(ctx: &OpContext, e: BackupError) -> Outcome {
    if ctx.canceled() || matches!(e, BackupError::Canceled) {
        Outcome::Canceled(format!("canceled; nothing was changed ({e})"))
    } else {
        Outcome::Failed(e.to_string())
    }
}

/// Creates a backup of `app` (`estimate` from [`BackupStore::preflight`]).
pub async fn create(
    store: BackupStore,
    ctx: OpContext,
    app: AppConfig,
    opts: CreateOptions,
    estimate: u64,
) -> Outcome {
    match store.create(&ctx, &app, opts, estimate).await {
        Ok(m) => {
            ctx.update(|op| op.backup_id = m.id.clone());
            ctx.note(format!(
                "backup {} is complete ({} bytes)",
                m.id, m.total_bytes
            ));
            Outcome::Succeeded
        }
        Err(e) => failed(&ctx, e),
    }
}

/// Verifies backup `m` in `dir`: checksums, archives, and the dump against
/// the app's database server.
pub async fn verify(
    store: BackupStore,
    ctx: OpContext,
    app: AppConfig,
    dir: PathBuf,
    m: Manifest,
) -> Outcome {
    ctx.update(|op| op.backup_id = m.id.clone());
    let pg = match db_target(&app) {
        Ok(pg) => pg,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match store.verify(&ctx, &dir, &m, pg.as_ref()).await {
        Ok(()) => Outcome::Succeeded,
        Err(e) => failed(&ctx, e),
    }
}

/// Applies the app's retention, never deleting a `referenced` backup.
pub async fn prune(
    store: BackupStore,
    ctx: OpContext,
    app: AppConfig,
    referenced: HashSet<String>,
) -> Outcome {
    let Some(retention) = &app.retention else {
        ctx.note(format!(
            "app {} declares no [app.retention]: nothing is pruned",
            app.name
        ));
        return Outcome::Succeeded;
    };
    ctx.step_started("prune", "apply keep_last and keep_days");
    match store.prune(&app.name, retention, &referenced) {
        Ok(deleted) => {
            ctx.step_finished(
                "prune",
                StepOutcome::Succeeded,
                if deleted.is_empty() {
                    "nothing to delete".to_owned()
                } else {
                    format!("deleted {}", deleted.join(", "))
                },
            );
            Outcome::Succeeded
        }
        Err(e) => {
            ctx.step_finished("prune", StepOutcome::Failed, e.to_string());
            Outcome::Failed(e.to_string())
        }
    }
}

/// Restores backup `m` in `dir` over `app` (its checksums checked before).
pub async fn restore(
    store: BackupStore,
    ctx: OpContext,
    app: AppConfig,
    dir: PathBuf,
    m: Manifest,
    opts: RestoreOptions,
) -> Outcome {
    ctx.update(|op| op.backup_id = m.id.clone());
    match store.restore(&ctx, &app, &dir, &m, opts).await {
        Ok(report) => {
            if let Some(kept) = report.database_kept_as {
                ctx.note(format!("the database as it was before is kept as {kept}"));
            }
            Outcome::Succeeded
        }
        Err(e) => failed(&ctx, e),
    }
}
