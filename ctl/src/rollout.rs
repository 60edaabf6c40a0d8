//! `covetctl rollout`: an upgrade across a fleet. Canary nodes first, then
//! batches; each node's upgrade is the agent's own operation (it rolls its
//! node back by itself on failure). Past the failure threshold no new node
//! starts, and the nodes this rollout upgraded are rolled back, newest first.
//!
//! Every node state change is written (atomically) to a state file, so
//! `rollout resume FILE` continues after the workstation's own crash without
//! redoing a node, re-attaching to operations that were running.

use std::collections::HashMap;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use covet_proto::v1 as pb;
use futures_util::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::transport::Channel;

use crate::fleet::{Fleet, FleetArgs};
use crate::operations::{EXIT_NEEDS_HUMAN, EXIT_ROLLED_BACK, Watched, state_name, watch_to_end};
use crate::target::{Node, Target};
use crate::upgrades::EnvEditArgs;
use crate::{Global, Output, output};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: Option<RolloutCommand>,
    #[command(flatten)]
    plan: PlanArgs,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Continue the rollout recorded in FILE (after covetctl itself was interrupted).
    Resume { file: PathBuf },
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The app to upgrade on every node.
    #[arg(required = true)]
    app: Option<String>,
    /// The version to install.
    #[arg(long = "to", required = true)]
    to_version: Option<String>,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Nodes upgraded first, alone; any failure among them stops the rollout.
    #[arg(long, default_value_t = 1)]
    canary: usize,
    /// Nodes upgraded at once after the canaries: a count or a percentage of the nodes.
    #[arg(long, default_value = "1")]
    batch: Share,
    /// Failed nodes tolerated before the rollout stops: a count or a percentage.
    #[arg(long, default_value = "0")]
    max_failures: Share,
    /// Wait this long between batches.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pause_between: Duration,
    /// After each node's health gate, watch its health this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    watch: Option<Duration>,
    #[command(flatten)]
    env: EnvEditArgs,
    /// When the rollout stops, leave the nodes it upgraded as they are.
    #[arg(long)]
    no_fleet_rollback: bool,
    /// Where the rollout is recorded [default: ./covet-rollout-APP-VERSION.json].
    #[arg(long = "state", value_name = "FILE")]
    state: Option<PathBuf>,
}

/// A count of nodes, or a percentage of all of them.
#[derive(Clone, Copy)]
enum Share {
    Count(usize),
    Percent(u32),
}

impl FromStr for Share {
    type Err = String;
    fn from_str(text: &str) -> Result<Share, String> {
        let bad = || format!("{text:?}: expected a count (3) or a percentage (25%)");
        match text.strip_suffix('%') {
            Some(p) => match p.parse() {
                Ok(p) if p <= 100 => Ok(Share::Percent(p)),
                Ok(_) => Err(format!("{text:?}: a percentage is at most 100%")),
                Err(_) => Err(bad()),
            },
            None => text.parse().map(Share::Count).map_err(|_| bad()),
        }
    }
}

impl Share {
    /// How many of `total` nodes; a percentage rounds down.
    fn of(self, total: usize) -> usize {
        match self {
            Share::Count(n) => n,
            Share::Percent(p) => total * p as usize / 100,
        }
    }
}

/// Where a node is in the rollout.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Pending,
    /// The Upgrade call was sent; its operation id is not known yet.
    Starting,
    Upgrading,
    Upgraded,
    /// The upgrade did not happen: refused, unreachable, or failed and
    /// undone by the agent itself (see `upgrade_state`).
    Failed,
    NeedsHuman,
    RollingBack,
    RolledBack,
}

#[derive(Serialize, Deserialize, Clone)]
struct NodeState {
    endpoint: String,
    phase: Phase,
    #[serde(default)]
    operation_id: String,
    /// The final state of the upgrade operation (e.g. rolled_back).
    #[serde(default)]
    upgrade_state: String,
    #[serde(default)]
    backup_id: String,
    #[serde(default)]
    rollback_operation_id: String,
    /// Order in which nodes finished upgrading (fleet rollback goes newest first).
    #[serde(default)]
    upgraded_seq: u64,
    /// When the Upgrade call was sent (Unix seconds), to find its operation.
    #[serde(default)]
    started_at: u64,
    #[serde(default)]
    detail: String,
}

fn unbounded() -> usize {
    usize::MAX
}

/// The rollout, as recorded in its state file.
#[derive(Serialize, Deserialize, Clone)]
struct Rollout {
    app: String,
    to_version: String,
    #[serde(flatten)]
    env: EnvEditArgs,
    watch_seconds: Option<u64>,
    canary: usize,
    batch: usize,
    /// At most this many nodes upgrading at once (`--parallel`).
    #[serde(default = "unbounded")]
    parallel: usize,
    max_failures: usize,
    pause_between_ms: u64,
    fleet_rollback: bool,
    stopped: bool,
    nodes: Vec<NodeState>,
}

impl Rollout {
    fn from_plan(
        plan: &PlanArgs,
        app: String,
        to_version: String,
        endpoints: Vec<String>,
        parallel: usize,
    ) -> Rollout {
        let total = endpoints.len();
        Rollout {
            app,
            to_version,
            env: plan.env.clone(),
            watch_seconds: plan.watch.map(|w| w.as_secs()),
            canary: plan.canary.min(total),
            batch: plan.batch.of(total).max(1),
            parallel: parallel.max(1),
            max_failures: plan.max_failures.of(total),
            pause_between_ms: u64::try_from(plan.pause_between.as_millis()).unwrap_or(u64::MAX),
            fleet_rollback: !plan.no_fleet_rollback,
            stopped: false,
            nodes: endpoints
                .into_iter()
                .map(|endpoint| NodeState {
                    endpoint,
                    phase: Phase::Pending,
                    operation_id: String::new(),
                    upgrade_state: String::new(),
                    backup_id: String::new(),
                    rollback_operation_id: String::new(),
                    upgraded_seq: 0,
                    started_at: 0,
                    detail: String::new(),
                })
                .collect(),
        }
    }

    /// Node indexes: the canaries, then batches.
    fn groups(&self) -> Vec<Vec<usize>> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let (canaries, rest) = all.split_at(self.canary);
        let mut groups = Vec::new();
        if !canaries.is_empty() {
            groups.push(canaries.to_vec());
        }
        groups.extend(rest.chunks(self.batch).map(<[usize]>::to_vec));
        groups
    }

    fn failures(&self) -> usize {
        self.nodes.iter().filter(|n| is_failure(n)).count()
    }

    fn canary_failed(&self) -> bool {
        self.nodes[..self.canary].iter().any(is_failure)
    }

    fn should_stop(&self) -> bool {
        self.canary_failed() || self.failures() > self.max_failures
    }

    fn request(&self) -> anyhow::Result<pb::UpgradeRequest> {
        Ok(pb::UpgradeRequest {
            app: self.app.clone(),
            to_version: self.to_version.clone(),
            env_edits: self.env.to_pb()?,
            no_rollback: false,
            watch: self
                .watch_seconds
                .and_then(|s| prost_types::Duration::try_from(Duration::from_secs(s)).ok()),
            force: false,
            ..Default::default()
        })
    }

    fn exit_code(&self) -> ExitCode {
        let count = |phase| self.nodes.iter().filter(|n| n.phase == phase).count();
        if count(Phase::NeedsHuman) > 0 {
            return ExitCode::from(EXIT_NEEDS_HUMAN);
        }
        if count(Phase::Upgraded) == self.nodes.len() {
            return ExitCode::SUCCESS;
        }
        let undone_cleanly = |n: &NodeState| match n.phase {
            Phase::Pending | Phase::RolledBack => true,
            // The agent put its node back as it was (or changed nothing).
            Phase::Failed => !n.operation_id.is_empty(),
            _ => false,
        };
        if self.stopped && self.nodes.iter().all(undone_cleanly) {
            ExitCode::from(EXIT_ROLLED_BACK)
        } else {
            ExitCode::FAILURE
        }
    }
}

fn is_failure(n: &NodeState) -> bool {
    matches!(n.phase, Phase::Failed | Phase::NeedsHuman)
        || (matches!(n.phase, Phase::Starting | Phase::Upgrading) && !n.detail.is_empty())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Writes the state next to `path` and renames it over: a crash leaves
/// either the old or the new state, never half of one.
fn save(path: &Path, rollout: &Rollout) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(rollout)?;
    let partial = path.with_extension("json.partial");
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))
}

fn load(path: &Path) -> anyhow::Result<Rollout> {
    let text = std::fs::read(path)
        .with_context(|| format!("cannot read the rollout state {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a rollout state file", path.display()))
}

pub async fn rollout(g: &Global, args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let (rollout, path) = match args.command {
        Some(RolloutCommand::Resume { file }) => (load(&file)?, file),
        None => start(g, args.plan)?,
    };
    let target = Target::resolve(g)?;
    let runner = Runner {
        g,
        tls: target.tls()?,
        view: View::new(g, &rollout),
        state: Mutex::new(rollout),
        connections: Mutex::new(HashMap::new()),
        path,
        target,
    };
    runner.run().await?;
    runner.view.clear();
    let rollout = runner.snapshot();
    print_summary(g, &rollout, &runner.path);
    Ok(rollout.exit_code())
}

/// A new rollout: its plan, recorded before any node is touched.
fn start(g: &Global, plan: PlanArgs) -> anyhow::Result<(Rollout, PathBuf)> {
    let (Some(app), Some(to_version)) = (plan.app.clone(), plan.to_version.clone()) else {
        bail!("usage: covetctl rollout APP --to VERSION --nodes … (or rollout resume FILE)");
    };
    let fleet = Fleet::resolve(g, &plan.fleet)?;
    let path = plan
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("covet-rollout-{app}-{to_version}.json")));
    if path.exists() {
        bail!(
            "a rollout is already recorded in {p}: continue it with `covetctl rollout resume {p}`, or remove the file",
            p = path.display()
        );
    }
    let rollout = Rollout::from_plan(&plan, app, to_version, fleet.endpoints, fleet.parallel);
    rollout.request()?; // refuse malformed env edits before touching anything
    save(&path, &rollout)?;
    Ok((rollout, path))
}

struct Runner<'a> {
    g: &'a Global,
    target: Target,
    /// One TLS configuration for every node: sessions are resumed.
    tls: Arc<rustls::ClientConfig>,
    state: Mutex<Rollout>,
    /// One channel per node, reused for its upgrade, watch and rollback.
    connections: Mutex<HashMap<String, Channel>>,
    path: PathBuf,
    view: View,
}

impl Runner<'_> {
    fn snapshot(&self) -> Rollout {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes a node's state, records it, and shows it.
    fn update(&self, i: usize, change: impl FnOnce(&mut NodeState)) -> anyhow::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut state.nodes[i]);
        if state.nodes[i].phase == Phase::Upgraded && state.nodes[i].upgraded_seq == 0 {
            let seq = state
                .nodes
                .iter()
                .map(|n| n.upgraded_seq)
                .max()
                .unwrap_or(0)
                + 1;
            state.nodes[i].upgraded_seq = seq;
        }
        save(&self.path, &state)?;
        self.view.phase(&state.nodes[i], i);
        Ok(())
    }

    async fn run(&self) -> anyhow::Result<()> {
        let rollout = self.snapshot();
        let pause = Duration::from_millis(rollout.pause_between_ms);
        // On resume, nodes whose upgrade was already sent are followed to
        // their end first, even in a stopped rollout: the fleet rollback
        // must know whether they were upgraded.
        let in_flight: Vec<usize> = (0..rollout.nodes.len())
            .filter(|&i| self.in_flight(i))
            .collect();
        let mut started_any = !in_flight.is_empty();
        futures_util::future::join_all(in_flight.into_iter().map(|i| self.upgrade_node(i)))
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()?;
        self.stop_if_past_threshold()?;
        for group in rollout.groups() {
            if self.snapshot().stopped {
                break;
            }
            let todo: Vec<usize> = group
                .into_iter()
                .filter(|&i| self.snapshot().nodes[i].phase == Phase::Pending)
                .collect();
            if todo.is_empty() {
                continue;
            }
            if started_any && !pause.is_zero() {
                self.view.note(&format!(
                    "pausing {} before the next batch",
                    humantime::format_duration(pause)
                ));
                tokio::time::sleep(pause).await;
            }
            started_any = true;
            // At most `parallel` at once; once past the threshold, the
            // batch's nodes that have not started yet stay pending.
            futures_util::stream::iter(todo.into_iter().map(|i| self.upgrade_unless_stopped(i)))
                .buffer_unordered(rollout.parallel.max(1))
                .collect::<Vec<anyhow::Result<()>>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<()>>>()?;
        }
        if self.snapshot().stopped && rollout.fleet_rollback {
            self.roll_back_upgraded().await?;
        }
        Ok(())
    }

    async fn upgrade_unless_stopped(&self, i: usize) -> anyhow::Result<()> {
        if self.snapshot().stopped {
            return Ok(());
        }
        self.upgrade_node(i).await?;
        self.stop_if_past_threshold()
    }

    fn in_flight(&self, i: usize) -> bool {
        matches!(
            self.snapshot().nodes[i].phase,
            Phase::Starting | Phase::Upgrading
        )
    }

    fn stop_if_past_threshold(&self) -> anyhow::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.stopped && state.should_stop() {
            state.stopped = true;
            save(&self.path, &state)?;
            self.view.note(&format!(
                "stopping: {} failed (tolerated: {}{})",
                state.failures(),
                state.max_failures,
                if state.canary_failed() {
                    ", a canary failed"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }

    async fn node(&self, endpoint: &str) -> anyhow::Result<Node> {
        let cached = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(endpoint)
            .cloned();
        let channel = match cached {
            Some(channel) => channel,
            None => {
                let node = self
                    .target
                    .connect(
                        endpoint,
                        Arc::clone(&self.tls),
                        self.g.timeout,
                        self.g.timeout,
                    )
                    .await?;
                self.connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(endpoint.to_owned(), node.channel.clone());
                node.channel
            }
        };
        Ok(Node {
            endpoint: endpoint.to_owned(),
            channel,
        })
    }

    /// Upgrades one node (or re-attaches to its running upgrade) and records
    /// how it ended. Only a failure to record is an error.
    async fn upgrade_node(&self, i: usize) -> anyhow::Result<()> {
        let node_state = self.snapshot().nodes[i].clone();
        let node = match self.node(&node_state.endpoint).await {
            Ok(node) => node,
            Err(e) => return self.unreachable(i, &node_state, &e),
        };
        let id = match self.operation_to_follow(i, &node, &node_state).await {
            Ok(id) => id,
            Err(e) => {
                return self.update(i, |n| {
                    n.phase = Phase::Failed;
                    n.detail = format!("{e:#}");
                });
            }
        };
        let watched = watch_to_end(&node, &id, 1, |w| {
            if let Watched::Event(e) = w {
                self.view.event(i, e);
            }
        })
        .await;
        match watched {
            Ok(op) => self.record_upgrade_end(i, &op),
            // Still running as far as we know: `rollout resume` re-attaches.
            Err(e) => self.update(i, |n| n.detail = format!("lost track of {id}: {e:#}")),
        }
    }

    /// A node we could not reach: nothing started there unless we had
    /// started it before (then it stays in flight for `rollout resume`).
    fn unreachable(&self, i: usize, before: &NodeState, e: &anyhow::Error) -> anyhow::Result<()> {
        let in_flight = matches!(before.phase, Phase::Starting | Phase::Upgrading);
        self.update(i, |n| {
            if !in_flight {
                n.phase = Phase::Failed;
            }
            n.detail = format!("{e:#}");
        })
    }

    /// The upgrade operation of this node: the one recorded, the one a
    /// previous run started but did not record, or a new one.
    async fn operation_to_follow(
        &self,
        i: usize,
        node: &Node,
        before: &NodeState,
    ) -> anyhow::Result<String> {
        match before.phase {
            Phase::Upgrading => return Ok(before.operation_id.clone()),
            Phase::Starting => {
                if let Some(id) = self.find_started(node, before.started_at).await? {
                    self.update(i, |n| {
                        n.phase = Phase::Upgrading;
                        n.operation_id = id.clone();
                    })?;
                    return Ok(id);
                }
            }
            _ => {}
        }
        let request = self.snapshot().request()?;
        self.update(i, |n| {
            n.phase = Phase::Starting;
            n.started_at = unix_now();
        })?;
        let mut client =
            pb::upgrade_service_client::UpgradeServiceClient::new(node.channel.clone());
        let op = client
            .upgrade(request)
            .await
            .map_err(|s| node.fail(s))?
            .into_inner();
        self.update(i, |n| {
            n.phase = Phase::Upgrading;
            n.operation_id = op.id.clone();
            n.detail.clear();
        })?;
        Ok(op.id)
    }

    /// An upgrade to our version started on the node at or after `since`.
    async fn find_started(&self, node: &Node, since: u64) -> anyhow::Result<Option<String>> {
        let rollout = self.snapshot();
        let mut client =
            pb::operation_service_client::OperationServiceClient::new(node.channel.clone());
        let ops = client
            .list_operations(pb::ListOperationsRequest {
                app: rollout.app.clone(),
                active_only: false,
                limit: 10,
            })
            .await
            .map_err(|s| node.fail(s))?
            .into_inner()
            .operations;
        Ok(ops
            .into_iter()
            .find(|op| {
                op.kind == pb::OperationKind::Upgrade as i32
                    && op.params.get("to_version") == Some(&rollout.to_version)
                    && op
                        .created
                        .is_some_and(|t| u64::try_from(t.seconds).unwrap_or(0) >= since)
            })
            .map(|op| op.id))
    }

    fn record_upgrade_end(&self, i: usize, op: &pb::Operation) -> anyhow::Result<()> {
        let state = pb::OperationState::try_from(op.state).ok();
        self.update(i, |n| {
            n.upgrade_state = state_name(op.state);
            n.backup_id = op.backup_id.clone();
            n.detail = op.cause.clone();
            n.phase = match state {
                Some(pb::OperationState::Succeeded) => Phase::Upgraded,
                Some(pb::OperationState::NeedsHuman) => {
                    n.detail = op.needs_human.clone();
                    Phase::NeedsHuman
                }
                _ => Phase::Failed,
            };
        })
    }

    /// Rolls back, newest first, the nodes this rollout upgraded (and
    /// re-attaches to rollbacks a previous run started).
    async fn roll_back_upgraded(&self) -> anyhow::Result<()> {
        let mut nodes: Vec<(usize, NodeState)> = self
            .snapshot()
            .nodes
            .into_iter()
            .enumerate()
            .filter(|(_, n)| matches!(n.phase, Phase::Upgraded | Phase::RollingBack))
            .collect();
        nodes.sort_by_key(|(_, n)| std::cmp::Reverse(n.upgraded_seq));
        for (i, before) in nodes {
            self.roll_back_node(i, &before).await?;
        }
        Ok(())
    }

    async fn roll_back_node(&self, i: usize, before: &NodeState) -> anyhow::Result<()> {
        let needs_human = |detail: String| {
            move |n: &mut NodeState| {
                n.phase = Phase::NeedsHuman;
                n.detail = detail;
            }
        };
        let node = match self.node(&before.endpoint).await {
            Ok(node) => node,
            Err(e) => return self.update(i, needs_human(format!("cannot roll back: {e:#}"))),
        };
        let id = if before.phase == Phase::RollingBack {
            before.rollback_operation_id.clone()
        } else {
            let mut client =
                pb::upgrade_service_client::UpgradeServiceClient::new(node.channel.clone());
            let request = pb::RollbackRequest {
                app: self.snapshot().app,
                backup_id: before.backup_id.clone(),
            };
            match client.rollback(request).await {
                Ok(op) => op.into_inner().id,
                Err(s) => {
                    let e = node.fail(s);
                    return self.update(i, needs_human(format!("cannot roll back: {e:#}")));
                }
            }
        };
        self.update(i, |n| {
            n.phase = Phase::RollingBack;
            n.rollback_operation_id = id.clone();
        })?;
        let watched = watch_to_end(&node, &id, 1, |w| {
            if let Watched::Event(e) = w {
                self.view.event(i, e);
            }
        })
        .await;
        match watched {
            Ok(op) if op.state == pb::OperationState::Succeeded as i32 => self.update(i, |n| {
                n.phase = Phase::RolledBack;
                n.detail.clear();
            }),
            Ok(op) => self.update(
                i,
                needs_human(format!(
                    "rollback {id} ended {}: {}{}",
                    state_name(op.state),
                    op.cause,
                    op.needs_human
                )),
            ),
            Err(e) => self.update(i, |n| {
                n.detail = format!("lost track of rollback {id}: {e:#}")
            }),
        }
    }
}

/// The live view: a line per node on a terminal, plain lines otherwise.
struct View {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    endpoints: Vec<String>,
    /// Plain lines go to stderr when stdout carries JSON.
    to_stderr: bool,
}

impl View {
    fn new(g: &Global, rollout: &Rollout) -> View {
        let endpoints: Vec<String> = rollout.nodes.iter().map(|n| n.endpoint.clone()).collect();
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let style = ProgressStyle::with_template("{spinner} {prefix:<24} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let bars = rollout
                .nodes
                .iter()
                .map(|n| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(style.clone());
                    bar.set_prefix(n.endpoint.clone());
                    bar.set_message(phase_name(n.phase));
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                })
                .collect();
            (multi, bars)
        });
        View {
            bars,
            endpoints,
            to_stderr: g.output == Output::Json,
        }
    }

    fn say(&self, i: usize, text: String) {
        match &self.bars {
            Some((_, bars)) => bars[i].set_message(text),
            None => self.line(&format!("{}: {text}", self.endpoints[i])),
        }
    }

    fn line(&self, text: &str) {
        if self.to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    fn note(&self, text: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(text);
            }
            None => self.line(text),
        }
    }

    fn phase(&self, n: &NodeState, i: usize) {
        let mut text = phase_name(n.phase);
        if !n.operation_id.is_empty() && n.phase == Phase::Upgrading {
            text = format!("{text} (operation {})", n.operation_id);
        }
        if !n.detail.is_empty() {
            text = format!("{text}: {}", n.detail);
        }
        self.say(i, text);
    }

    fn event(&self, i: usize, e: &pb::OperationEvent) {
        use pb::operation_event::Event;
        if let Some(Event::StepStarted(s)) = &e.event {
            self.say(i, format!("step {}", s.step));
        }
    }

    fn clear(&self) {
        if let Some((_, bars)) = &self.bars {
            bars.iter().for_each(ProgressBar::finish_and_clear);
        }
    }
}

fn phase_name(phase: Phase) -> String {
    match phase {
        Phase::Pending => "not started",
        Phase::Starting => "starting",
        Phase::Upgrading => "upgrading",
        Phase::Upgraded => "upgraded",
        Phase::Failed => "failed",
        Phase::NeedsHuman => "NEEDS A HUMAN",
        Phase::RollingBack => "rolling back",
        Phase::RolledBack => "rolled back",
    }
    .to_owned()
}

fn node_json(n: &NodeState) -> serde_json::Value {
    json!({
        "endpoint": n.endpoint,
        "state": n.phase,
        "operation_id": n.operation_id,
        "upgrade_state": n.upgrade_state,
        "backup_id": n.backup_id,
        "rollback_operation_id": n.rollback_operation_id,
        "detail": n.detail,
    })
}

fn print_summary(g: &Global, rollout: &Rollout, path: &Path) {
    let count = |phase| rollout.nodes.iter().filter(|n| n.phase == phase).count();
    let failed = count(Phase::Failed) + count(Phase::NeedsHuman);
    if g.output == Output::Json {
        output::json(&json!({
            "app": rollout.app,
            "to_version": rollout.to_version,
            "state_file": path,
            "stopped": rollout.stopped,
            "nodes": rollout.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "upgraded": count(Phase::Upgraded),
            "rolled_back": count(Phase::RolledBack),
            "failed": failed,
            "not_started": count(Phase::Pending),
        }));
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = rollout
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.endpoint.clone(),
                phase_name(n.phase),
                n.operation_id.clone(),
                n.detail.clone(),
            ]
        })
        .collect();
    output::table(&["NODE", "STATE", "OPERATION", "DETAIL"], &rows);
    println!(
        "\n{} to {}: {} upgraded, {} rolled back, {} failed, {} not started{} (state: {})",
        rollout.app,
        rollout.to_version,
        count(Phase::Upgraded),
        count(Phase::RolledBack),
        failed,
        count(Phase::Pending),
        if rollout.stopped { "; stopped" } else { "" },
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    /// The rollout `covetctl rollout covet --to 2.0 ARGS` plans over `nodes`.
    fn plan(nodes: usize, args: &[&str]) -> Rollout {
        let cli = Cli::try_parse_from(["rollout", "covet", "--to", "2.0"].iter().chain(args))
            .unwrap_or_else(|e| panic!("{e}"));
        let endpoints = (0..nodes).map(|i| format!("node{i}:7443")).collect();
        Rollout::from_plan(
            &cli.plan,
            "covet".into(),
            "2.0".into(),
            endpoints,
            cli.plan.fleet.parallel as usize,
        )
    }

    fn parse_error(args: &[&str]) -> String {
        match Cli::try_parse_from(["rollout", "covet", "--to", "2.0"].iter().chain(args)) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn with_phases(mut rollout: Rollout, phases: &[Phase]) -> Rollout {
        for (node, &phase) in rollout.nodes.iter_mut().zip(phases) {
            node.phase = phase;
            if phase != Phase::Pending {
                node.operation_id = "op".into();
            }
        }
        rollout
    }

    #[test]
    fn canaries_first_then_batches_by_count_or_percentage() {
        let r = plan(5, &[]);
        assert_eq!(r.groups(), [vec![0], vec![1], vec![2], vec![3], vec![4]]);
        let r = plan(5, &["--canary", "2", "--batch", "2"]);
        assert_eq!(r.groups(), [vec![0, 1], vec![2, 3], vec![4]]);
        // 50% of 5 rounds down to 2; a percentage below one node is one node.
        let r = plan(5, &["--canary", "0", "--batch", "50%"]);
        assert_eq!(r.groups(), [vec![0, 1], vec![2, 3], vec![4]]);
        let r = plan(3, &["--batch", "10%"]);
        assert_eq!(r.batch, 1);
        let r = plan(4, &["--canary", "1", "--batch", "100%"]);
        assert_eq!(r.groups(), [vec![0], vec![1, 2, 3]]);
        // More canaries than nodes: all of them are canaries.
        let r = plan(2, &["--canary", "5"]);
        assert_eq!(r.groups(), [vec![0, 1]]);
    }

    #[test]
    fn parallel_and_pause_are_recorded_in_the_plan() {
        let r = plan(4, &["--parallel", "2", "--pause-between", "1m 30s"]);
        assert_eq!(r.parallel, 2);
        assert_eq!(r.pause_between_ms, 90_000);
        // A state file from before `parallel` was recorded: unbounded.
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("parallel");
        let old: Rollout = serde_json::from_value(json).unwrap();
        assert_eq!(old.parallel, usize::MAX);
    }

    #[test]
    fn bad_shares_are_refused_with_the_expected_form() {
        assert!(
            parse_error(&["--batch", "many"])
                .contains("expected a count (3) or a percentage (25%)")
        );
        assert!(parse_error(&["--batch", "x%"]).contains("expected a count"));
        assert!(parse_error(&["--max-failures", "150%"]).contains("at most 100%"));
        assert!(parse_error(&["--parallel", "0"]).contains("0"));
    }

    #[test]
    fn the_failure_threshold_counts_or_takes_a_percentage() {
        use Phase::*;
        // Tolerates 1 of 4 (25%); the canary is a success.
        let r = plan(4, &["--max-failures", "25%"]);
        assert_eq!(r.max_failures, 1);
        assert!(!with_phases(r.clone(), &[Upgraded, Failed, Pending, Pending]).should_stop());
        assert!(with_phases(r.clone(), &[Upgraded, Failed, NeedsHuman, Pending]).should_stop());
        // Any failed canary stops, whatever the threshold.
        let r = plan(4, &["--max-failures", "3"]);
        assert!(with_phases(r, &[Failed, Pending, Pending, Pending]).should_stop());
        // An unreachable node that never answered counts as a failure.
        let mut r = with_phases(plan(2, &["--canary", "0"]), &[Starting, Pending]);
        r.nodes[0].detail = "connection refused".into();
        assert!(r.should_stop());
    }

    #[test]
    fn exit_codes_tell_success_rolled_back_needs_human_and_partial() {
        use Phase::*;
        let code = |r: &Rollout| format!("{:?}", r.exit_code());
        let ok = format!("{:?}", ExitCode::SUCCESS);
        let rolled_back = format!("{:?}", ExitCode::from(EXIT_ROLLED_BACK));
        let needs_human = format!("{:?}", ExitCode::from(EXIT_NEEDS_HUMAN));
        let failure = format!("{:?}", ExitCode::FAILURE);

        let r = plan(3, &[]);
        assert_eq!(
            code(&with_phases(r.clone(), &[Upgraded, Upgraded, Upgraded])),
            ok
        );
        let mut stopped = with_phases(r.clone(), &[RolledBack, Failed, Pending]);
        stopped.stopped = true;
        assert_eq!(code(&stopped), rolled_back);
        // One node needs a person: that wins over everything else.
        let mut stuck = with_phases(r.clone(), &[RolledBack, NeedsHuman, Pending]);
        stuck.stopped = true;
        assert_eq!(code(&stuck), needs_human);
        // Stopped with --no-fleet-rollback: a node stays upgraded.
        let mut partial = with_phases(r.clone(), &[Upgraded, Failed, Pending]);
        partial.stopped = true;
        assert_eq!(code(&partial), failure);
        // A node refused before any operation began was not "undone".
        let mut refused = with_phases(r, &[Failed, Pending, Pending]);
        refused.nodes[0].operation_id.clear();
        refused.stopped = true;
        assert_eq!(code(&refused), failure);
    }
}
