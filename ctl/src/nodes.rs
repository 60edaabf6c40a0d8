//! Commands that talk to an agent: info, metrics, health, probes.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use covet_proto::v1 as pb;
use serde_json::json;

use crate::fleet::{Fleet, FleetArgs, Report};
use crate::output::{self, bytes, rate};
use crate::target::{Node, connect_node};
use crate::{Global, Output};

pub async fn info(g: &Global, fleet: &FleetArgs) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        let info = fetch_info(&node).await?;
        return Ok(print_info(g, &node, &info));
    }
    let results = fleet
        .fan_out(g, |node| async move { fetch_info(&node).await })
        .await?;
    let report = Report {
        header: &["HOSTNAME", "AGENT", "OS", "UPTIME", "APPS"],
        rows: &|i: &pb::AgentInfo| {
            vec![vec![
                i.hostname.clone(),
                i.agent_version.clone(),
                format!("{} {}", i.os_name, i.os_version),
                output::human_duration(output::duration(i.uptime.as_ref())),
                i.apps
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ]]
        },
        json: &|i: &pb::AgentInfo| info_json("", i),
        ok: &|_| true,
    };
    Ok(report.print(g, &results))
}

async fn fetch_info(node: &Node) -> anyhow::Result<pb::AgentInfo> {
    let mut client = pb::info_service_client::InfoServiceClient::new(node.channel.clone());
    Ok(client
        .get_info(pb::GetInfoRequest {})
        .await
        .map_err(|s| node.fail(s))?
        .into_inner())
}

fn role_name(info: &pb::AgentInfo) -> String {
    let caller = info.caller.clone().unwrap_or_default();
    pb::Role::try_from(caller.role)
        .unwrap_or(pb::Role::Unspecified)
        .as_str_name()
        .trim_start_matches("ROLE_")
        .to_lowercase()
}

fn info_json(endpoint: &str, info: &pb::AgentInfo) -> serde_json::Value {
    let caller = info.caller.clone().unwrap_or_default();
    json!({
        "endpoint": endpoint,
        "agent_version": info.agent_version,
        "api_versions": info.api_versions,
        "hostname": info.hostname,
        "os_name": info.os_name,
        "os_version": info.os_version,
        "kernel_version": info.kernel_version,
        "arch": info.arch,
        "uptime_seconds": output::duration(info.uptime.as_ref()).as_secs(),
        "boot_id": info.boot_id,
        "machine_id": info.machine_id,
        "agent_started": output::timestamp(info.agent_started.as_ref()),
        "apps": info.apps.iter().map(|a| json!({
            "name": a.name,
            "unit": a.unit,
            "package_kind": a.package_kind,
            "package_name": a.package_name,
            "has_database": a.has_database,
            "has_health_probe": a.has_health_probe,
            "smoke_checks": a.smoke_checks,
        })).collect::<Vec<_>>(),
        "caller": {
            "common_name": caller.common_name,
            "serial": caller.serial,
            "role": role_name(info),
        },
    })
}

fn print_info(g: &Global, node: &Node, info: &pb::AgentInfo) -> ExitCode {
    let caller = info.caller.clone().unwrap_or_default();
    let role = role_name(info);
    let uptime = output::duration(info.uptime.as_ref());
    if g.output == Output::Json {
        output::json(&info_json(&node.endpoint, info));
        return ExitCode::SUCCESS;
    }
    output::fields(&[
        ("endpoint", node.endpoint.clone()),
        ("hostname", info.hostname.clone()),
        (
            "agent",
            format!(
                "covet-agent {} (API {})",
                info.agent_version,
                info.api_versions.join(", ")
            ),
        ),
        ("os", format!("{} {}", info.os_name, info.os_version)),
        ("kernel", format!("{} ({})", info.kernel_version, info.arch)),
        ("uptime", output::human_duration(uptime)),
        ("boot id", info.boot_id.clone()),
        (
            "agent started",
            output::timestamp(info.agent_started.as_ref()),
        ),
        ("you are", format!("CN={} ({role})", caller.common_name)),
    ]);
    println!();
    if info.apps.is_empty() {
        println!("no apps declared");
    } else {
        let rows: Vec<Vec<String>> = info
            .apps
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    a.unit.clone(),
                    if a.package_kind.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("{} {}", a.package_kind, a.package_name)
                    },
                    yes_no(a.has_database),
                    yes_no(a.has_health_probe),
                    a.smoke_checks.to_string(),
                ]
            })
            .collect();
        output::table(
            &["APP", "UNIT", "PACKAGE", "DATABASE", "HEALTH", "SMOKE"],
            &rows,
        );
    }
    ExitCode::SUCCESS
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

pub async fn metrics(
    g: &Global,
    watch: Option<Duration>,
    fleet: &FleetArgs,
) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        return metrics_one(g, &node, watch).await;
    }
    if watch.is_some() {
        anyhow::bail!("--watch follows one node: pick it with -e HOST:PORT");
    }
    let results = fleet
        .fan_out(g, |node| async move { fetch_metrics(&node).await })
        .await?;
    let report = Report {
        header: &["CPU", "LOAD", "MEMORY USED", "MEMORY TOTAL", "PROCESSES"],
        rows: &|m: &pb::HostMetrics| {
            let cpu = m.cpu.clone().unwrap_or_default();
            let load = m.load.unwrap_or_default();
            let mem = m.memory.unwrap_or_default();
            vec![vec![
                format!("{:.1}%", cpu.usage_percent),
                format!("{:.2} {:.2} {:.2}", load.one, load.five, load.fifteen),
                bytes(mem.used_bytes),
                bytes(mem.total_bytes),
                m.process_count.to_string(),
            ]]
        },
        json: &metrics_json,
        ok: &|_| true,
    };
    Ok(report.print(g, &results))
}

async fn fetch_metrics(node: &Node) -> anyhow::Result<pb::HostMetrics> {
    let mut client = pb::metrics_service_client::MetricsServiceClient::new(node.channel.clone());
    Ok(client
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .map_err(|s| node.fail(s))?
        .into_inner())
}

async fn metrics_one(g: &Global, node: &Node, watch: Option<Duration>) -> anyhow::Result<ExitCode> {
    let mut client = pb::metrics_service_client::MetricsServiceClient::new(node.channel.clone());
    let Some(interval) = watch else {
        let m = client
            .get_metrics(pb::GetMetricsRequest {})
            .await
            .map_err(|s| node.fail(s))?
            .into_inner();
        print_metrics(g.output, &m);
        return Ok(ExitCode::SUCCESS);
    };
    let stream = client
        .watch_metrics(pb::WatchMetricsRequest {
            interval: prost_types::Duration::try_from(interval).ok(),
        })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    node.print_stream(stream, |m| print_metrics(g.output, &m))
        .await
}

fn metrics_json(m: &pb::HostMetrics) -> serde_json::Value {
    let cpu = m.cpu.clone().unwrap_or_default();
    let load = m.load.unwrap_or_default();
    let mem = m.memory.unwrap_or_default();
    json!({
        "sampled_at": output::timestamp(m.sampled_at.as_ref()),
        "rate_interval_seconds": output::seconds(m.rate_interval.as_ref()),
        "cpu": {
            "usage_percent": cpu.usage_percent,
            "per_core_percent": cpu.per_core_percent,
            "logical_cores": cpu.logical_cores,
            "physical_cores": cpu.physical_cores,
        },
        "load": { "one": load.one, "five": load.five, "fifteen": load.fifteen },
        "memory": {
            "total_bytes": mem.total_bytes,
            "used_bytes": mem.used_bytes,
            "available_bytes": mem.available_bytes,
            "swap_total_bytes": mem.swap_total_bytes,
            "swap_used_bytes": mem.swap_used_bytes,
        },
        "disks": m.disks.iter().map(|d| json!({
            "mount_point": d.mount_point,
            "device": d.device,
            "file_system": d.file_system,
            "total_bytes": d.total_bytes,
            "available_bytes": d.available_bytes,
            "inodes_total": d.inodes_total,
            "inodes_free": d.inodes_free,
            "read_bytes_total": d.read_bytes_total,
            "written_bytes_total": d.written_bytes_total,
            "read_bytes_per_second": d.read_bytes_per_second,
            "written_bytes_per_second": d.written_bytes_per_second,
            "read_only": d.read_only,
        })).collect::<Vec<_>>(),
        "networks": m.networks.iter().map(|n| json!({
            "interface": n.interface,
            "received_bytes_total": n.received_bytes_total,
            "transmitted_bytes_total": n.transmitted_bytes_total,
            "received_bytes_per_second": n.received_bytes_per_second,
            "transmitted_bytes_per_second": n.transmitted_bytes_per_second,
            "received_packets_total": n.received_packets_total,
            "transmitted_packets_total": n.transmitted_packets_total,
            "receive_errors_total": n.receive_errors_total,
            "transmit_errors_total": n.transmit_errors_total,
        })).collect::<Vec<_>>(),
        "process_count": m.process_count,
    })
}

fn print_metrics(format: Output, m: &pb::HostMetrics) {
    if format == Output::Json {
        // One compact object per line, so `--watch -o json` is a JSON-lines stream.
        println!("{}", metrics_json(m));
        return;
    }
    let cpu = m.cpu.clone().unwrap_or_default();
    let load = m.load.unwrap_or_default();
    let mem = m.memory.unwrap_or_default();
    output::fields(&[
        ("sampled at", output::timestamp(m.sampled_at.as_ref())),
        (
            "cpu",
            format!(
                "{:.1}% of {} cores [{}]",
                cpu.usage_percent,
                cpu.logical_cores,
                cpu.per_core_percent
                    .iter()
                    .map(|c| format!("{c:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ),
        (
            "load",
            format!("{:.2} {:.2} {:.2}", load.one, load.five, load.fifteen),
        ),
        (
            "memory",
            format!(
                "{} used, {} available of {}",
                bytes(mem.used_bytes),
                bytes(mem.available_bytes),
                bytes(mem.total_bytes)
            ),
        ),
        (
            "swap",
            format!(
                "{} used of {}",
                bytes(mem.swap_used_bytes),
                bytes(mem.swap_total_bytes)
            ),
        ),
        ("processes", m.process_count.to_string()),
    ]);
    println!();
    let disks: Vec<Vec<String>> = m
        .disks
        .iter()
        .map(|d| {
            vec![
                d.mount_point.clone(),
                d.device.clone(),
                bytes(d.total_bytes),
                bytes(d.available_bytes),
                format!("{}/{}", d.inodes_free, d.inodes_total),
                rate(d.read_bytes_per_second),
                rate(d.written_bytes_per_second),
            ]
        })
        .collect();
    output::table(
        &[
            "MOUNT",
            "DEVICE",
            "SIZE",
            "FREE",
            "INODES FREE",
            "READ",
            "WRITE",
        ],
        &disks,
    );
    println!();
    let nets: Vec<Vec<String>> = m
        .networks
        .iter()
        .map(|n| {
            vec![
                n.interface.clone(),
                rate(n.received_bytes_per_second),
                rate(n.transmitted_bytes_per_second),
                bytes(n.received_bytes_total),
                bytes(n.transmitted_bytes_total),
                (n.receive_errors_total + n.transmit_errors_total).to_string(),
            ]
        })
        .collect();
    output::table(
        &["INTERFACE", "RX", "TX", "RX TOTAL", "TX TOTAL", "ERRORS"],
        &nets,
    );
}

pub async fn health(
    g: &Global,
    app: &str,
    smoke: bool,
    fleet: &FleetArgs,
) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        let r = fetch_health(&node, app, smoke).await?;
        return Ok(print_health(g, &node, &r));
    }
    let results = fleet
        .fan_out(
            g,
            |node| async move { fetch_health(&node, app, smoke).await },
        )
        .await?;
    let report = Report {
        header: &["APP", "VERSION", "SLOT", "HEALTH", "FAILED CHECKS"],
        rows: &|r: &pb::CheckAppHealthResponse| {
            let failed: Vec<&str> = r
                .health
                .iter()
                .chain(r.smoke.iter())
                .filter(|p| !p.ok)
                .map(|p| p.name.as_str())
                .collect();
            vec![vec![
                r.app.clone(),
                r.version.clone(),
                r.slot.clone(),
                if r.healthy { "healthy" } else { "UNHEALTHY" }.to_owned(),
                failed.join(","),
            ]]
        },
        json: &health_json,
        ok: &|r: &pb::CheckAppHealthResponse| r.healthy,
    };
    Ok(report.print(g, &results))
}

async fn fetch_health(
    node: &Node,
    app: &str,
    smoke: bool,
) -> anyhow::Result<pb::CheckAppHealthResponse> {
    let mut client = pb::probe_service_client::ProbeServiceClient::new(node.channel.clone());
    Ok(client
        .check_app_health(pb::CheckAppHealthRequest {
            app: app.to_owned(),
            include_smoke: smoke,
        })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner())
}

fn health_json(r: &pb::CheckAppHealthResponse) -> serde_json::Value {
    json!({
        "app": r.app,
        "version": r.version,
        "slot": r.slot,
        "healthy": r.healthy,
        "health": r.health.as_ref().map(probe_json),
        "smoke": r.smoke.iter().map(probe_json).collect::<Vec<_>>(),
    })
}

fn print_health(g: &Global, node: &Node, r: &pb::CheckAppHealthResponse) -> ExitCode {
    if g.output == Output::Json {
        output::json(&json!({
            "endpoint": node.endpoint,
            "app": r.app,
            "version": r.version,
            "slot": r.slot,
            "healthy": r.healthy,
            "health": r.health.as_ref().map(probe_json),
            "smoke": r.smoke.iter().map(probe_json).collect::<Vec<_>>(),
        }));
    } else {
        let serving = match (r.version.as_str(), r.slot.as_str()) {
            ("", _) => String::new(),
            (version, "") => format!(" ({version})"),
            (version, slot) => format!(" ({version} in slot {slot})"),
        };
        println!(
            "{} on {}{serving}: {}",
            r.app,
            node.endpoint,
            if r.healthy { "healthy" } else { "UNHEALTHY" }
        );
        let rows: Vec<Vec<String>> = r
            .health
            .iter()
            .chain(r.smoke.iter())
            .map(probe_row)
            .collect();
        output::table(PROBE_HEADER, &rows);
    }
    if r.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

const PROBE_HEADER: &[&str] = &[
    "CHECK", "TARGET", "RESULT", "STATUS", "LATENCY", "ATTEMPTS", "ERROR",
];

fn probe_row(p: &pb::ProbeResult) -> Vec<String> {
    vec![
        p.name.clone(),
        p.target.clone(),
        if p.ok { "ok" } else { "FAIL" }.to_owned(),
        if p.http_status == 0 {
            "-".to_owned()
        } else {
            p.http_status.to_string()
        },
        format!("{}ms", output::duration(p.latency.as_ref()).as_millis()),
        p.attempts.to_string(),
        p.error.clone(),
    ]
}

fn probe_json(p: &pb::ProbeResult) -> serde_json::Value {
    json!({
        "name": p.name,
        "target": p.target,
        "ok": p.ok,
        "attempts": p.attempts,
        "latency_seconds": output::seconds(p.latency.as_ref()),
        "http_status": p.http_status,
        "error": p.error,
        "body_excerpt": p.body_excerpt,
    })
}

#[derive(Subcommand)]
pub enum ProbeCommand {
    /// GET a URL from the agent and check the answer.
    Http {
        url: String,
        /// Expected HTTP status.
        #[arg(long, default_value_t = 200)]
        expect_status: u32,
        /// A JSON field (dotted path) of the body that must equal --json-value.
        #[arg(long, requires = "json_value")]
        json_field: Option<String>,
        #[arg(long)]
        json_value: Option<String>,
        #[command(flatten)]
        attempts: AttemptArgs,
    },
    /// Open a TCP connection from the agent.
    Tcp {
        /// HOST:PORT
        address: String,
        #[command(flatten)]
        attempts: AttemptArgs,
    },
}

#[derive(clap::Args)]
pub struct AttemptArgs {
    /// Per attempt.
    #[arg(long = "probe-timeout", default_value = "5s", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Further attempts after a failure.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Pause between attempts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

pub async fn probe(g: &Global, cmd: ProbeCommand) -> anyhow::Result<ExitCode> {
    let node = connect_node(g).await?;
    let mut client = pb::probe_service_client::ProbeServiceClient::new(node.channel.clone());
    let pb_duration = |d: Duration| prost_types::Duration::try_from(d).ok();
    let result = match cmd {
        ProbeCommand::Http {
            url,
            expect_status,
            json_field,
            json_value,
            attempts,
        } => {
            client
                .probe_http(pb::HttpProbe {
                    url,
                    expect_status,
                    json_field: json_field.unwrap_or_default(),
                    json_value: json_value.unwrap_or_default(),
                    timeout: pb_duration(attempts.probe_timeout),
                    retries: attempts.retries,
                    interval: pb_duration(attempts.interval),
                    name: String::new(),
                })
                .await
        }
        ProbeCommand::Tcp { address, attempts } => {
            client
                .probe_tcp(pb::TcpProbe {
                    address,
                    timeout: pb_duration(attempts.probe_timeout),
                    retries: attempts.retries,
                    interval: pb_duration(attempts.interval),
                    name: String::new(),
                })
                .await
        }
    };
    let r = result.map_err(|s| node.fail(s))?.into_inner();
    if g.output == Output::Json {
        output::json(&probe_json(&r));
    } else {
        output::table(PROBE_HEADER, &[probe_row(&r)]);
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
