//! `covetctl upgrade …` and `covetctl rollback …`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use covet_proto::v1 as pb;
use serde_json::json;

use crate::operations::follow;
use crate::output;
use crate::target::{connect_node, connect_node_with};
use crate::{Global, Output};

#[derive(clap::Args)]
pub struct UpgradeArgs {
    app: String,
    /// The version to install.
    #[arg(long = "to")]
    to_version: String,
    #[command(flatten)]
    env: EnvEditArgs,
    /// Run the preflight and the migration's dry run, print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// On failure, leave the app as it is instead of rolling back.
    #[arg(long)]
    no_rollback: bool,
    /// After the health gate, watch health this long; a regression rolls back.
    #[arg(long, value_parser = humantime::parse_duration)]
    watch: Option<Duration>,
    /// Upgrade even if the app is unhealthy now.
    #[arg(long)]
    force: bool,
    /// Canary apps: the new version's share at each step, rising to 100
    /// (e.g. 10,50,100).
    #[arg(long, value_delimiter = ',', value_name = "PERCENTS")]
    canary: Vec<u32>,
    /// Canary apps: how long each step is judged by health (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    step_wait: Option<Duration>,
    /// Print the operation id and return instead of following it.
    #[arg(long)]
    detach: bool,
}

fn pair(flag: &str, text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((a, b)) if !a.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => bail!("{flag} {text:?}: expected A=B"),
    }
}

/// The env-file edits an upgrade or a rollout asks for. A rollout's state
/// file records them under these field names.
#[derive(clap::Args, Clone, serde::Serialize, serde::Deserialize)]
pub struct EnvEditArgs {
    /// Set KEY=VALUE in the env file (repeatable).
    #[arg(long = "env-set", value_name = "KEY=VALUE")]
    env_set: Vec<String>,
    /// Rename OLD=NEW in the env file, keeping the value (repeatable).
    #[arg(long = "env-rename", value_name = "OLD=NEW")]
    env_rename: Vec<String>,
    /// Remove KEY from the env file (repeatable).
    #[arg(long = "env-unset", value_name = "KEY")]
    env_unset: Vec<String>,
}

impl EnvEditArgs {
    /// The edits of `--env-set`, `--env-rename` and `--env-unset`, in that order.
    pub fn to_pb(&self) -> anyhow::Result<Vec<pb::EnvEdit>> {
        use pb::env_edit::Edit;
        let mut edits = Vec::new();
        for s in &self.env_set {
            let (key, value) = pair("--env-set", s)?;
            edits.push(Edit::Set(pb::EnvSet { key, value }));
        }
        for r in &self.env_rename {
            let (from, to) = pair("--env-rename", r)?;
            edits.push(Edit::Rename(pb::EnvRename { from, to }));
        }
        for key in &self.env_unset {
            edits.push(Edit::Unset(pb::EnvUnset { key: key.clone() }));
        }
        Ok(edits
            .into_iter()
            .map(|e| pb::EnvEdit { edit: Some(e) })
            .collect())
    }
}

pub async fn upgrade(g: &Global, a: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let request = pb::UpgradeRequest {
        app: a.app.clone(),
        to_version: a.to_version.clone(),
        env_edits: a.env.to_pb()?,
        no_rollback: a.no_rollback,
        watch: a
            .watch
            .and_then(|w| prost_types::Duration::try_from(w).ok()),
        force: a.force,
        canary_percents: a.canary.clone(),
        step_wait: a
            .step_wait
            .and_then(|w| prost_types::Duration::try_from(w).ok()),
    };
    // A dry run installs the target into a scratch environment and runs the
    // migration's dry run: give it time.
    let call_timeout = if a.dry_run {
        g.timeout.max(Duration::from_secs(600))
    } else {
        g.timeout
    };
    let node = connect_node_with(g, call_timeout).await?;
    let mut client = pb::upgrade_service_client::UpgradeServiceClient::new(node.channel.clone());
    if a.dry_run {
        let mut req = tonic::Request::new(request);
        // The migration's dry run may take a while.
        req.set_timeout(Duration::from_secs(600));
        let plan = client
            .plan_upgrade(req)
            .await
            .map_err(|s| node.fail(s))?
            .into_inner();
        if g.output == Output::Json {
            output::json(&json!({
                "app": plan.app,
                "from_version": plan.from_version,
                "to_version": plan.to_version,
                "steps": plan.steps,
                "migration_dry_run": plan.migration_dry_run,
                "env_diff": plan.env_diff,
                "blockers": plan.blockers,
            }));
        } else {
            println!(
                "plan: upgrade {} from {} to {} on {}",
                plan.app,
                if plan.from_version.is_empty() {
                    "?"
                } else {
                    &plan.from_version
                },
                plan.to_version,
                node.endpoint
            );
            for (i, s) in plan.steps.iter().enumerate() {
                println!("  {}. {s}", i + 1);
            }
            if !plan.env_diff.is_empty() {
                println!("env file changes:");
                plan.env_diff.iter().for_each(|d| println!("  {d}"));
            }
            println!("migration dry run:");
            plan.migration_dry_run
                .iter()
                .for_each(|l| println!("  | {l}"));
            if plan.blockers.is_empty() {
                println!("nothing blocks this upgrade; nothing was changed");
            } else {
                println!("BLOCKED:");
                plan.blockers.iter().for_each(|b| println!("  - {b}"));
            }
        }
        return Ok(if plan.blockers.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let op = client
        .upgrade(request)
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    if a.detach {
        if g.output == Output::Json {
            println!("{}", serde_json::json!({ "id": op.id }));
        } else {
            println!("{}", op.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(g, &node, op, 1).await
}

pub async fn rollback(g: &Global, app: String, to: Option<String>) -> anyhow::Result<ExitCode> {
    let node = connect_node(g).await?;
    let mut client = pb::upgrade_service_client::UpgradeServiceClient::new(node.channel.clone());
    let op = client
        .rollback(pb::RollbackRequest {
            app,
            backup_id: to.unwrap_or_default(),
        })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    follow(g, &node, op, 1).await
}
