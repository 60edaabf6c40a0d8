//! UpgradeService: an app's upgrade to a version (with env edits), its
//! plan (a dry run that changes nothing), and the rollback of the last
//! upgrade or to a backup. The runbook itself is `workflow`'s.

use std::time::Duration;

use covet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::operations::operation_to_pb;
use super::{
    AgentState, backup_error, caller_record, duration_arg, name_error, op_error, oplog_error,
};
use crate::backup::BackupStore;
use crate::config::{AppConfig, Config};
use crate::edge::audit::set_target;
use crate::edge::authz;
use crate::host::envfile::{self, EnvEdit};
use crate::names::{AppName, BackupId, Version};
use crate::ops::OpSpec;
use crate::ops::log::OpKind;
use crate::workflow::{self, PreflightError, TargetError, UpgradeSpec};

pub struct UpgradeApi(pub AgentState);

/// Longest post-upgrade watch a request may ask for.
const MAX_WATCH: Duration = Duration::from_secs(24 * 3600);

/// Upgrade and PlanUpgrade: a declared app, a well-formed version, env
/// edits the app allows.
#[derive(Debug)]
struct Upgrade {
    app: AppName,
    spec: UpgradeSpec,
}

fn parse_upgrade(req: pb::UpgradeRequest, config: &Config) -> Result<Upgrade, Status> {
    let app = AppName::declared(config, &req.app).map_err(name_error)?;
    if req.to_version.is_empty() {
        return Err(Status::invalid_argument("to_version is required"));
    }
    let version = Version::parse(&req.to_version).map_err(name_error)?;
    let watch = match req.watch {
        Some(w) => Some(duration_arg(
            "watch",
            Some(w),
            Duration::ZERO,
            Duration::from_secs(1),
            MAX_WATCH,
        )?)
        .filter(|d| !d.is_zero()),
        None => None,
    };
    let (canary, step_wait) = parse_canary(app.config(), &req.canary_percents, req.step_wait)?;
    let spec = UpgradeSpec {
        app: app.as_str().to_owned(),
        to_version: version,
        env_edits: parse_env_edits(app.config(), req.env_edits)?,
        no_rollback: req.no_rollback,
        watch,
        force: req.force,
        canary,
        step_wait,
    };
    Ok(Upgrade { app, spec })
}

/// Canary steps: rising shares ending at 100 (kept without it), and the
/// wait of each; only for an app whose strategy is canary.
fn parse_canary(
    app: &AppConfig,
    percents: &[u32],
    step_wait: Option<prost_types::Duration>,
) -> Result<(Vec<u8>, Option<Duration>), Status> {
    if percents.is_empty() && step_wait.is_none() {
        return Ok((Vec::new(), None));
    }
    let canary = app
        .slotted()
        .is_some_and(|d| d.strategy == crate::config::Strategy::Canary);
    if !canary {
        return Err(Status::invalid_argument(format!(
            "canary_percents and step_wait need [app.deploy] strategy = \"canary\"; app {} deploys {}",
            app.name,
            app.deploy
                .as_ref()
                .map_or("restart", |d| d.strategy.as_str())
        )));
    }
    let rising = percents.windows(2).all(|w| w[0] < w[1]);
    let ends_at_100 = percents.last().is_none_or(|last| *last == 100);
    if !rising || !ends_at_100 || percents.first().is_some_and(|p| *p == 0) || percents.len() > 10 {
        return Err(Status::invalid_argument(format!(
            "canary_percents {percents:?}: give at most 10 rising shares from 1 to 100, ending at 100 (e.g. 10,50,100)"
        )));
    }
    let shares: Vec<u8> = percents
        .iter()
        .filter(|p| **p < 100)
        .filter_map(|p| u8::try_from(*p).ok())
        .collect();
    let wait = duration_arg(
        "step_wait",
        step_wait,
        Duration::from_secs(30),
        Duration::from_secs(1),
        Duration::from_secs(3600),
    )?;
    Ok((shares, Some(wait)))
}

fn env_edits_from_pb(edits: Vec<pb::EnvEdit>) -> Result<Vec<EnvEdit>, Status> {
    use pb::env_edit::Edit;
    edits
        .into_iter()
        .map(|e| match e.edit {
            Some(Edit::Set(s)) => Ok(EnvEdit::Set {
                key: s.key,
                value: s.value,
            }),
            Some(Edit::Rename(r)) => Ok(EnvEdit::Rename {
                from: r.from,
                to: r.to,
            }),
            Some(Edit::Unset(u)) => Ok(EnvEdit::Unset { key: u.key }),
            None => Err(Status::invalid_argument(
                "an env edit must be set, rename or unset",
            )),
        })
        .collect()
}

/// The request's env edits, if well-formed and allowed by the app's `env_keys`.
fn parse_env_edits(app: &AppConfig, edits: Vec<pb::EnvEdit>) -> Result<Vec<EnvEdit>, Status> {
    let edits = env_edits_from_pb(edits)?;
    envfile::validate(&edits).map_err(|e| Status::invalid_argument(e.to_string()))?;
    envfile::check_editable(&app.env_keys, &edits)
        .map_err(|e| Status::permission_denied(format!("app {}: {e}", app.name)))?;
    Ok(edits)
}

/// Rollback: a declared app, and the backup asked for if any (none: the
/// app's last upgrade).
#[derive(Debug)]
struct Rollback {
    app: AppName,
    backup: Option<BackupId>,
}

fn parse_rollback(req: &pb::RollbackRequest, config: &Config) -> Result<Rollback, Status> {
    let app = AppName::declared(config, &req.app).map_err(name_error)?;
    let backup = if req.backup_id.is_empty() {
        None
    } else {
        Some(BackupId::parse(&req.backup_id).map_err(name_error)?)
    };
    Ok(Rollback { app, backup })
}

fn preflight_error(e: PreflightError) -> Status {
    match e {
        PreflightError::Invalid(m) => Status::invalid_argument(m),
        PreflightError::Precondition(m) => Status::failed_precondition(m),
    }
}

fn target_error(e: TargetError) -> Status {
    match e {
        TargetError::NoUpgrade(_) => Status::failed_precondition(e.to_string()),
        TargetError::OpLog(e) => oplog_error(e),
    }
}

#[tonic::async_trait]
impl pb::upgrade_service_server::UpgradeService for UpgradeApi {
    async fn upgrade(
        &self,
        request: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(
            &request,
            format!(
                "app={} version={}",
                request.get_ref().app,
                request.get_ref().to_version
            ),
        );
        let caller = caller_record(&request);
        let Upgrade { app, spec } = parse_upgrade(request.into_inner(), &self.0.config)?;
        let app = app.into_config();
        self.0.ops.ensure_free(&app.name).map_err(op_error)?;
        let deps = self.0.workflow_deps();
        let pre = workflow::preflight(&deps, &app, &spec)
            .await
            .map_err(preflight_error)?;
        let mut params = spec.to_params();
        params.insert("from_version".into(), pre.from_version.clone());
        let op_spec = OpSpec {
            kind: OpKind::Upgrade,
            app: app.name.clone(),
            caller,
            params,
            exclusive: true,
        };
        let op = self
            .0
            .ops
            .start(op_spec, move |ctx| {
                Box::pin(workflow::run_upgrade(deps, ctx, app, spec, pre))
            })
            .map_err(op_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }

    async fn plan_upgrade(
        &self,
        request: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::UpgradePlan>, Status> {
        set_target(
            &request,
            format!(
                "app={} version={}",
                request.get_ref().app,
                request.get_ref().to_version
            ),
        );
        let Upgrade { app, spec } = parse_upgrade(request.into_inner(), &self.0.config)?;
        let app = app.into_config();
        let deps = self.0.workflow_deps();
        let mut plan = pb::UpgradePlan {
            app: app.name.clone(),
            to_version: spec.to_version.to_string(),
            ..Default::default()
        };
        if let Some(holder) = self.0.ops.holder(&app.name) {
            plan.blockers
                .push(format!("operation {holder} holds the app's lock"));
        }
        match workflow::preflight(&deps, &app, &spec).await {
            Ok(pre) => {
                plan.from_version = pre.from_version;
                plan.env_diff = pre
                    .findings
                    .iter()
                    .filter_map(|f| f.strip_prefix("env: ").map(str::to_owned))
                    .collect();
            }
            Err(PreflightError::Invalid(m)) => {
                return Err(Status::invalid_argument(m));
            }
            Err(PreflightError::Precondition(m)) => plan.blockers.push(m),
        }
        plan.steps = workflow::plan_lines(&app, &spec, &plan.from_version);
        plan.migration_dry_run = match workflow::migration_dry_run(&deps, &app, &spec).await {
            Ok(lines) => lines,
            Err(e) => {
                plan.blockers
                    .push(format!("the migration dry run failed: {e}"));
                Vec::new()
            }
        };
        Ok(Response::new(plan))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("app={}", request.get_ref().app));
        let caller = caller_record(&request);
        let Rollback { app, backup } = parse_rollback(request.get_ref(), &self.0.config)?;
        let app = app.into_config();
        self.0.ops.ensure_free(&app.name).map_err(op_error)?;
        let asked = backup.as_ref().map_or("", BackupId::as_str);
        let (target, last_upgrade) =
            workflow::rollback_target(self.0.ops.oplog(), &app.name, asked)
                .map_err(target_error)?;
        // The last upgrade is the operator's to undo (fleet rollouts name
        // its backup); going back to any other backup is a restore.
        if !last_upgrade {
            if app.slotted().is_some() {
                return Err(Status::failed_precondition(format!(
                    "{} deploys in slots: a rollback switches back from its last upgrade \
                     (`covetctl rollback {}` without --to); restore files and data from backup \
                     {asked} with `covetctl backup restore`",
                    app.name, app.name
                )));
            }
            authz::require(&request, authz::Power::RollbackToAnyBackup)?;
        }
        let backup_id = target.backup_id().to_owned();
        let (dir, manifest) = self
            .0
            .backups
            .find(&[app.name.as_str()], &backup_id)
            .map_err(backup_error)?;
        BackupStore::verify_checksums(&dir, &manifest)
            .await
            .map_err(|e| {
                Status::failed_precondition(format!("{e}; refusing to roll back to it"))
            })?;
        let deps = self.0.workflow_deps();
        let params = workflow::rollback_params(&target);
        let op_spec = OpSpec {
            kind: OpKind::Rollback,
            app: app.name.clone(),
            caller,
            params,
            exclusive: true,
        };
        let op = self
            .0
            .ops
            .start(op_spec, move |ctx| {
                workflow::run_rollback(deps, ctx, app, target)
            })
            .map_err(op_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, refused, secs};
    use super::*;
    use pb::env_edit::Edit;
    use tonic::Code;

    fn upgrade(app: &str, to_version: &str) -> pb::UpgradeRequest {
        pb::UpgradeRequest {
            app: app.into(),
            to_version: to_version.into(),
            ..Default::default()
        }
    }

    fn set(key: &str, value: &str) -> pb::EnvEdit {
        pb::EnvEdit {
            edit: Some(Edit::Set(pb::EnvSet {
                key: key.into(),
                value: value.into(),
            })),
        }
    }

    #[test]
    fn an_upgrade_names_a_declared_app_and_a_safe_version() {
        let config = config();
        let mut req = upgrade("covet", "0.2.0");
        req.env_edits = vec![set("FEATURE_X", "1")];
        req.watch = secs(600);
        req.no_rollback = true;
        let Upgrade { app, spec } = parse_upgrade(req, &config).unwrap();
        assert_eq!(app.as_str(), "covet");
        assert_eq!(
            (spec.app.as_str(), spec.to_version.as_str()),
            ("covet", "0.2.0")
        );
        assert_eq!(
            spec.env_edits,
            [EnvEdit::Set {
                key: "FEATURE_X".into(),
                value: "1".into()
            }]
        );
        assert_eq!(spec.watch, Some(Duration::from_secs(600)));
        assert!(spec.no_rollback && !spec.force);
        let mut unwatched = upgrade("covet", "0.2.0");
        unwatched.watch = secs(0);
        assert_eq!(parse_upgrade(unwatched, &config).unwrap().spec.watch, None);
    }

    #[test]
    fn an_upgrade_with_a_bad_app_version_watch_or_edit_is_refused() {
        let config = config();
        refused(
            parse_upgrade(upgrade("", "0.2.0"), &config),
            Code::InvalidArgument,
            "app is required",
        );
        refused(
            parse_upgrade(upgrade("nope", "0.2.0"), &config),
            Code::NotFound,
            "app \"nope\"",
        );
        refused(
            parse_upgrade(upgrade("covet", ""), &config),
            Code::InvalidArgument,
            "to_version is required",
        );
        for bad in ["0.2.0/../x", "-rf", ".1", "1..2", "1 2", &"1".repeat(65)] {
            refused(
                parse_upgrade(upgrade("covet", bad), &config),
                Code::InvalidArgument,
                "invalid version",
            );
        }
        for watch in [secs(-1), secs(24 * 3600 + 1)] {
            let mut req = upgrade("covet", "0.2.0");
            req.watch = watch;
            refused(parse_upgrade(req, &config), Code::InvalidArgument, "watch");
        }
        let mut empty_edit = upgrade("covet", "0.2.0");
        empty_edit.env_edits = vec![pb::EnvEdit { edit: None }];
        refused(
            parse_upgrade(empty_edit, &config),
            Code::InvalidArgument,
            "set, rename or unset",
        );
        let mut undeclared = upgrade("covet", "0.2.0");
        undeclared.env_edits = vec![set("DATABASE_URL", "x")];
        refused(
            parse_upgrade(undeclared, &config),
            Code::PermissionDenied,
            "DATABASE_URL",
        );
        let mut bare = upgrade("bare", "0.2.0");
        bare.env_edits = vec![set("FEATURE_X", "1")];
        refused(
            parse_upgrade(bare, &config),
            Code::PermissionDenied,
            "app bare",
        );
    }

    #[test]
    fn a_rollback_names_a_declared_app_and_maybe_a_backup() {
        let config = config();
        let rollback = |app: &str, backup_id: &str| {
            parse_rollback(
                &pb::RollbackRequest {
                    app: app.into(),
                    backup_id: backup_id.into(),
                },
                &config,
            )
        };
        let last = rollback("covet", "").unwrap();
        assert_eq!((last.app.as_str(), last.backup), ("covet", None));
        let to = rollback("covet", "covet-20261201-221500").unwrap();
        assert_eq!(to.backup.unwrap().as_str(), "covet-20261201-221500");
        refused(rollback("", ""), Code::InvalidArgument, "app is required");
        refused(rollback("nope", ""), Code::NotFound, "app \"nope\"");
        refused(
            rollback("covet", "../x"),
            Code::InvalidArgument,
            "not a backup id",
        );
    }
}
