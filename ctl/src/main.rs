//! covetctl: the command-line client of covet-agent.

// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod analysis;
mod assets;
mod backups;
mod fleet;
mod nodes;
mod operations;
mod output;
mod pki_cmd;
mod rollout;
mod services;
mod target;
mod upgrades;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "covetctl",
    version,
    about = "Drive covet-agent: PKI, contexts, info, metrics, health, probes"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command understands.
#[derive(Args, Clone)]
pub struct Global {
    /// Client configuration file [default: ~/.config/covet/config.toml]
    #[arg(long, global = true, env = "COVETCTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Agent endpoint HOST:PORT, instead of the context's (with `config
    /// add-context`: the context's endpoints; repeat or separate with commas).
    #[arg(short = 'e', long = "endpoint", global = true, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Deadline for connecting and for each call, e.g. 10s.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority, agent and client certificates.
    #[command(subcommand)]
    Pki(pki_cmd::PkiCommand),
    /// Contexts: which agents to talk to, with which certificates.
    #[command(subcommand)]
    Config(pki_cmd::ConfigCommand),
    /// The agent's host identity, version and declared apps.
    Info(fleet::FleetArgs),
    /// Host metrics (CPU, memory, disks, network).
    Metrics {
        /// Print a new sample every INTERVAL (e.g. 2s) until interrupted.
        #[arg(long, value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Run an app's declared health probe (and smoke checks with --smoke).
    Health {
        app: String,
        /// Also run the app's smoke checks.
        #[arg(long)]
        smoke: bool,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Judge an app's [[app.analysis]] rules now, over one interval (no
    /// upgrade, no baseline). Exit code 1 when a rule is not ok.
    Analysis {
        app: String,
        /// The interval the rules are judged over (default: the app's).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
    },
    /// Ad-hoc probes from the agent (loopback or declared targets only).
    #[command(subcommand)]
    Probe(nodes::ProbeCommand),
    /// systemd units: status, start, stop, restart, reload.
    #[command(subcommand)]
    Service(services::ServiceCommand),
    /// Upgrade an app: backup, package, config, migrate, restart, health; rolls back on failure.
    /// Exit codes: 0 succeeded, 3 failed and rolled back cleanly, 4 needs a human, 1 refused or other error.
    Upgrade(upgrades::UpgradeArgs),
    /// Upgrade an app across nodes: canaries, then batches; stops and rolls back past a failure threshold.
    /// Exit codes: 0 all upgraded, 3 stopped and all it touched rolled back cleanly, 4 needs a human, 1 other.
    Rollout(rollout::RolloutArgs),
    /// Put an app back as it was before its last upgrade (or as in a backup).
    Rollback {
        app: String,
        /// The backup to roll back to (default: the one of the last upgrade;
        /// any other backup needs the admin role).
        #[arg(long)]
        to: Option<String>,
    },
    /// Backups of apps: create, list, verify, prune, delete, download, restore.
    #[command(subcommand)]
    Backup(backups::BackupCommand),
    /// Long-running operations: list, show, watch, cancel.
    #[command(subcommand)]
    Ops(operations::OpsCommand),
    /// A unit's journal: the last lines, or follow it.
    Logs {
        unit: String,
        /// Lines to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only lines since TIME (RFC 3339) or DURATION ago (e.g. 10m).
        #[arg(long)]
        since: Option<String>,
    },
    /// Write shell completions and the man page into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("covetctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("covetctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Pki(cmd) => pki_cmd::pki(g, cmd),
        Command::Config(cmd) => pki_cmd::config(g, cmd),
        Command::Info(fleet) => nodes::info(g, &fleet).await,
        Command::Metrics { watch, fleet } => nodes::metrics(g, watch, &fleet).await,
        Command::Health { app, smoke, fleet } => nodes::health(g, &app, smoke, &fleet).await,
        Command::Analysis { app, interval } => analysis::analysis(g, app, interval).await,
        Command::Probe(cmd) => nodes::probe(g, cmd).await,
        Command::Service(cmd) => services::service(g, cmd).await,
        Command::Backup(cmd) => backups::backup(g, cmd).await,
        Command::Upgrade(args) => upgrades::upgrade(g, args).await,
        Command::Rollout(args) => rollout::rollout(g, args).await,
        Command::Rollback { app, to } => upgrades::rollback(g, app, to).await,
        Command::Ops(cmd) => operations::ops(g, cmd).await,
        Command::Logs {
            unit,
            lines,
            follow,
            since,
        } => services::logs(g, unit, lines, follow, since).await,
        Command::GenerateAssets { dir } => {
            assets::generate::<Cli>(&dir).map(|()| ExitCode::SUCCESS)
        }
    }
}
