//! covet-agent: `covet-agent --config FILE` serves; `covet-agent check-config
//! --config FILE` validates the configuration and lists every problem.

// A panic on a daemon or CLI path loses the operation: errors are returned.
// Test code (compiled only under cfg(test)) may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use covet_agent::config::{Config, ConfigError};
use covet_agent::host::notify::NotifyEnv;
use covet_agent::server::Agent;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "covet-agent",
    version,
    about = "Host agent for audited, resumable upgrades and rollbacks"
)]
struct Cli {
    /// The agent's TOML configuration.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/covet/agent.toml",
        env = "COVET_AGENT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (the default).
    Run,
    /// Validate the configuration; exit non-zero listing every problem by key.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&cli.config),
        Command::Run => {
            // SAFETY: no thread has been started yet (tracing and the runtime come next).
            let notify = unsafe { NotifyEnv::take() };
            init_tracing();
            covet_agent::edge::limits::raise_open_files_limit();
            let notify = notify.unwrap_or_else(|e| {
                tracing::warn!("NOTIFY_SOCKET unusable, not notifying systemd: {e}");
                NotifyEnv::default()
            });
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                // Deep async state machines (the upgrade workflow) need more
                // than the default 2 MiB of stack in unoptimized builds.
                .thread_stack_size(8 << 20)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("covet-agent: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(&cli.config, &notify)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("covet-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            // The analysis rules' metrics, from the apps' endpoints if they answer.
            let (problems, warnings) = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(config.metric_problems()),
                Err(e) => {
                    eprintln!("covet-agent: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if !problems.is_empty() {
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
                for p in problems {
                    eprintln!("  {p}");
                }
                return ExitCode::FAILURE;
            }
            for w in config.warnings().into_iter().chain(warnings) {
                eprintln!("  warning: {w}");
            }
            println!(
                "{}: ok ({} app(s), listening on {})",
                path.display(),
                config.apps.len(),
                config.listen
            );
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid { path, problems }) => {
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to journald when systemd connected our output to it, else to stderr.
fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

async fn run(config_path: &Path, notify: &NotifyEnv) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let state_dir = config.state_dir.clone();
    let agent = Agent::bind(config).await?;
    let addr = agent.local_addr()?;
    write_addr_file(&state_dir.join("agent.addr"), &addr.to_string())?;
    tracing::info!(%addr, metrics = ?agent.metrics_addr(), "covet-agent {} listening", env!("CARGO_PKG_VERSION"));
    // Type=notify: the unit is started once clients can connect.
    notify.notify(&format!("READY=1\nSTATUS=listening on {addr}"));
    let _watchdog = notify.spawn_watchdog();

    let tls = agent.tls();
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: reloaded certificate, key, CA and deny list"),
                Err(e) => tracing::error!(
                    "SIGHUP: reload failed, keeping the previous TLS configuration: {e}"
                ),
            }
        }
    });

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let notify = notify.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        notify.notify("STOPPING=1");
    };
    agent.serve(shutdown).await
}

/// Where the agent really listens (useful with port 0), written atomically.
fn write_addr_file(path: &Path, addr: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("addr.tmp");
    covet_agent::files::private::write_synced(&tmp, format!("{addr}\n").as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}
