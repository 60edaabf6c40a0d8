//! `covetctl service …` and `covetctl logs …`: systemd units through the agent.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use clap::Subcommand;
use covet_proto::v1 as pb;
use serde_json::json;

use crate::fleet::{Fleet, FleetArgs, Report};
use crate::output;
use crate::target::{Node, connect_node, connect_node_with};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Status of units (default: every unit the agent may control).
    Status {
        units: Vec<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Start a unit and wait for the job.
    Start(ActionArgs),
    /// Stop a unit and wait for the job.
    Stop(ActionArgs),
    /// Restart a unit, wait for the job, and show the new state.
    Restart(ActionArgs),
    /// Reload a unit's configuration.
    Reload(ActionArgs),
}

#[derive(clap::Args)]
pub struct ActionArgs {
    unit: String,
    /// How long the agent waits for the job.
    #[arg(long = "job-timeout", value_parser = humantime::parse_duration)]
    job_timeout: Option<Duration>,
    /// OpLog lines to show when the unit is not running afterwards.
    #[arg(short = 'n', long, default_value_t = 20)]
    lines: u32,
}

pub async fn service(g: &Global, cmd: ServiceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ServiceCommand::Status { units, fleet } => status(g, units, &fleet).await,
        ServiceCommand::Start(a) => action(g, "start", a).await,
        ServiceCommand::Stop(a) => action(g, "stop", a).await,
        ServiceCommand::Restart(a) => action(g, "restart", a).await,
        ServiceCommand::Reload(a) => action(g, "reload", a).await,
    }
}

async fn action(g: &Global, verb: &str, args: ActionArgs) -> anyhow::Result<ExitCode> {
    let job_timeout = args.job_timeout.unwrap_or(Duration::from_secs(90));
    // The agent waits for the job (and the unit to settle) before answering.
    let node = connect_node_with(g, g.timeout + job_timeout + Duration::from_secs(5)).await?;
    let mut client = pb::unit_service_client::UnitServiceClient::new(node.channel.clone());
    let request = pb::UnitActionRequest {
        unit: args.unit.clone(),
        timeout: args
            .job_timeout
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        journal_lines: args.lines,
    };
    // Waiting for the job can take longer than an ordinary call.
    let mut request = tonic::Request::new(request);
    request.set_timeout(args.job_timeout.unwrap_or(Duration::from_secs(90)) + g.timeout);
    let r = match verb {
        "start" => client.start_unit(request).await,
        "stop" => client.stop_unit(request).await,
        "restart" => client.restart_unit(request).await,
        _ => client.reload_unit(request).await,
    }
    .map_err(|s| node.fail(s))?
    .into_inner();
    let status = r.status.clone().unwrap_or_default();
    // A start or restart succeeded only if the unit runs afterwards.
    let wants_running = verb != "stop";
    let running = status.active_state == "active" || status.active_state == "reloading";
    let ok = r.job_result == "done" && (running == wants_running);
    if g.output == Output::Json {
        output::json(&json!({
            "endpoint": node.endpoint,
            "unit": r.unit,
            "action": verb,
            "job_result": r.job_result,
            "ok": ok,
            "took_seconds": output::seconds(r.took.as_ref()),
            "status": status_json(&status),
            "journal_tail": r.journal_tail.iter().map(log_json).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "{verb} {}: job {} in {}; now {}/{}{}",
            r.unit,
            r.job_result,
            output::human_duration(output::duration(r.took.as_ref())),
            status.active_state,
            status.sub_state,
            if status.main_pid > 0 {
                format!(" (pid {})", status.main_pid)
            } else {
                String::new()
            }
        );
        if !r.journal_tail.is_empty() {
            println!("\nlast journal lines of {}:", r.unit);
            for line in &r.journal_tail {
                print_log_line(line);
            }
        }
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        if g.output == Output::Text {
            eprintln!(
                "covetctl: {verb} of {} failed: job {}, unit {}",
                r.unit, r.job_result, status.active_state
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

async fn status(g: &Global, units: Vec<String>, fleet: &FleetArgs) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        let statuses = fetch_statuses(&node, units).await?;
        print_statuses(g.output, &statuses);
        return Ok(ExitCode::SUCCESS);
    }
    let units = &units;
    let results = fleet
        .fan_out(g, |node| async move {
            fetch_statuses(&node, units.clone()).await
        })
        .await?;
    let report = Report {
        header: &["UNIT", "ACTIVE", "SUB", "PID", "SINCE"],
        rows: &|statuses: &Vec<pb::UnitStatus>| {
            statuses
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.active_state.clone(),
                        u.sub_state.clone(),
                        pid_text(u.main_pid),
                        output::timestamp(u.since.as_ref()),
                    ]
                })
                .collect()
        },
        json: &|statuses: &Vec<pb::UnitStatus>| json!({ "units": statuses.iter().map(status_json).collect::<Vec<_>>() }),
        ok: &|_| true,
    };
    Ok(report.print(g, &results))
}

async fn fetch_statuses(node: &Node, units: Vec<String>) -> anyhow::Result<Vec<pb::UnitStatus>> {
    let mut client = pb::unit_service_client::UnitServiceClient::new(node.channel.clone());
    Ok(client
        .get_unit_status(pb::GetUnitStatusRequest { units })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner()
        .units)
}

fn pid_text(pid: u32) -> String {
    if pid == 0 {
        "-".into()
    } else {
        pid.to_string()
    }
}

fn status_json(s: &pb::UnitStatus) -> serde_json::Value {
    json!({
        "name": s.name,
        "load_state": s.load_state,
        "active_state": s.active_state,
        "sub_state": s.sub_state,
        "description": s.description,
        "main_pid": s.main_pid,
        "since": output::timestamp(s.since.as_ref()),
        "restart_count": s.restart_count,
        "memory_bytes": s.memory_bytes,
        "fragment_path": s.fragment_path,
        "error": s.error,
    })
}

fn print_statuses(format: Output, units: &[pb::UnitStatus]) {
    if format == Output::Json {
        output::json(&json!({ "units": units.iter().map(status_json).collect::<Vec<_>>() }));
        return;
    }
    let rows: Vec<Vec<String>> = units
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.load_state.clone(),
                u.active_state.clone(),
                u.sub_state.clone(),
                if u.main_pid == 0 {
                    "-".into()
                } else {
                    u.main_pid.to_string()
                },
                output::timestamp(u.since.as_ref()),
                u.restart_count.to_string(),
                if u.memory_bytes == 0 {
                    "-".into()
                } else {
                    output::bytes(u.memory_bytes)
                },
            ]
        })
        .collect();
    output::table(
        &[
            "UNIT", "LOAD", "ACTIVE", "SUB", "PID", "SINCE", "RESTARTS", "MEMORY",
        ],
        &rows,
    );
}

fn log_json(l: &pb::LogEntry) -> serde_json::Value {
    json!({
        "time": output::timestamp(l.time.as_ref()),
        "unit": l.unit,
        "priority": l.priority,
        "pid": l.pid,
        "identifier": l.identifier,
        "message": l.message,
        "cursor": l.cursor,
    })
}

fn print_log_line(l: &pb::LogEntry) {
    println!(
        "{} {}[{}]: {}",
        output::timestamp(l.time.as_ref()),
        if l.identifier.is_empty() {
            &l.unit
        } else {
            &l.identifier
        },
        l.pid,
        l.message
    );
}

/// `--since`: an RFC 3339 time, or a duration meaning "that long ago".
fn parse_since(text: &str) -> anyhow::Result<SystemTime> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(SystemTime::now() - ago);
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        anyhow!(
            "--since {text:?}: expected a time like 2026-11-24T10:00:00Z or a duration like 10m"
        )
    })
}

pub async fn logs(
    g: &Global,
    unit: String,
    lines: u32,
    follow: bool,
    since: Option<String>,
) -> anyhow::Result<ExitCode> {
    let since = since.as_deref().map(parse_since).transpose()?;
    let node = connect_node(g).await?;
    let mut client = pb::log_service_client::LogServiceClient::new(node.channel.clone());
    let request = pb::TailLogsRequest {
        unit,
        lines,
        since: since.map(prost_types::Timestamp::from),
    };
    let print = |l: &pb::LogEntry| {
        if g.output == Output::Json {
            println!("{}", log_json(l));
        } else {
            print_log_line(l);
        }
    };
    if !follow {
        let r = client
            .tail_logs(request)
            .await
            .map_err(|s| node.fail(s))?
            .into_inner();
        r.entries.iter().for_each(print);
        return Ok(ExitCode::SUCCESS);
    }
    let stream = client
        .follow_logs(request)
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    node.print_stream(stream, |l| print(&l)).await
}
