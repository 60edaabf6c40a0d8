//! The gRPC edge: validates requests, maps proto messages to domain types,
//! calls the capability modules, and maps results (and errors) back.
//!
//! Nothing here decides who may call what (that is the authz layer) and no
//! capability module sees a proto type.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use covet_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::audit::set_target;
use crate::config::Config;
use crate::identity::{PeerIdentity, Role};
use crate::info::HostInfo;
use crate::logs::{JournalReader, LogError, LogLine};
use crate::metrics::{HostSample, MetricsHub};
use crate::probes::{self, Attempts, ProbeError, ProbeOutcome, TargetPolicy};
use crate::systemd::{ControlledUnit, Systemd, SystemdError, UnitAction, UnitState};
use crate::tls::PeerInfo;

/// What every service handler shares.
#[derive(Clone)]
pub struct AgentState {
    pub config: Arc<Config>,
    pub metrics: MetricsHub,
    pub probe_policy: TargetPolicy,
    pub systemd: Arc<Systemd>,
    pub journal: JournalReader,
}

impl AgentState {
    pub fn new(config: Arc<Config>) -> AgentState {
        let probe_policy = TargetPolicy::new(config.declared_probe_targets());
        let systemd = Arc::new(Systemd::new(&config.systemd.bus));
        let journal = JournalReader::new(config.systemd.journal_dir.clone());
        AgentState {
            config,
            metrics: MetricsHub::new(),
            probe_policy,
            systemd,
            journal,
        }
    }
}

fn caller<T>(request: &Request<T>) -> Option<Arc<PeerIdentity>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.identity.clone())
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration field of a request: `default` when unset, else within bounds.
pub fn duration_arg(
    field: &str,
    value: Option<prost_types::Duration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, Status> {
    let Some(value) = value else {
        return Ok(default);
    };
    let d = Duration::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field} must not be negative")))?;
    if d.is_zero() {
        return Ok(default);
    }
    if d < min || d > max {
        return Err(Status::invalid_argument(format!(
            "{field} must be between {} and {}, got {}",
            humantime::format_duration(min),
            humantime::format_duration(max),
            humantime::format_duration(d)
        )));
    }
    Ok(d)
}

fn role_to_pb(role: Option<Role>) -> pb::Role {
    match role {
        None => pb::Role::Unspecified,
        Some(Role::Reader) => pb::Role::Reader,
        Some(Role::Operator) => pb::Role::Operator,
        Some(Role::Admin) => pb::Role::Admin,
    }
}

pub fn caller_to_pb(id: &PeerIdentity) -> pb::CallerIdentity {
    pb::CallerIdentity {
        common_name: id.common_name.clone(),
        serial: id.serial.clone(),
        role: role_to_pb(id.role).into(),
        fingerprint_sha256: id.fingerprint_sha256.clone(),
    }
}

fn app_or_not_found<'a>(
    config: &'a Config,
    name: &str,
) -> Result<&'a crate::config::AppConfig, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("app is required"));
    }
    config.app(name).ok_or_else(|| {
        let known: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
        Status::not_found(format!(
            "no app {name:?} is declared on this host (declared: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))
    })
}

// ---------------------------------------------------------------- info

pub struct InfoApi(pub AgentState);

#[tonic::async_trait]
impl pb::info_service_server::InfoService for InfoApi {
    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let host = tokio::task::spawn_blocking(HostInfo::read)
            .await
            .map_err(|e| Status::internal(format!("reading host info: {e}")))?;
        let apps = self.0.config.apps.iter().map(app_summary).collect();
        Ok(Response::new(pb::AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_versions: vec!["v1".to_owned()],
            hostname: host.hostname,
            os_name: host.os_name,
            os_version: host.os_version,
            kernel_version: host.kernel_version,
            arch: host.arch,
            uptime: Some(duration(host.uptime)),
            boot_id: host.boot_id,
            agent_started: Some(timestamp(crate::info::agent_started())),
            apps,
            caller: caller(&request).map(|c| caller_to_pb(&c)),
            machine_id: host.machine_id,
        }))
    }
}

fn app_summary(app: &crate::config::AppConfig) -> pb::AppSummary {
    pb::AppSummary {
        name: app.name.clone(),
        unit: app.unit.clone(),
        package_kind: app
            .package
            .as_ref()
            .map(|p| p.kind.as_str().to_owned())
            .unwrap_or_default(),
        package_name: app
            .package
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        has_database: app.database.is_some(),
        has_health_probe: app.health.is_some(),
        smoke_checks: u32::try_from(app.smoke.len()).unwrap_or(u32::MAX),
    }
}

// ---------------------------------------------------------------- metrics

pub struct MetricsApi(pub AgentState);

const WATCH_MIN: Duration = Duration::from_millis(500);
const WATCH_MAX: Duration = Duration::from_secs(3600);

#[tonic::async_trait]
impl pb::metrics_service_server::MetricsService for MetricsApi {
    async fn get_metrics(
        &self,
        _request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::HostMetrics>, Status> {
        Ok(Response::new(metrics_to_pb(&self.0.metrics.sample().await)))
    }

    async fn watch_metrics(
        &self,
        request: Request<pb::WatchMetricsRequest>,
    ) -> Result<Response<BoxStream<pb::HostMetrics>>, Status> {
        let interval = duration_arg(
            "interval",
            request.into_inner().interval,
            Duration::from_secs(2),
            WATCH_MIN,
            WATCH_MAX,
        )?;
        let hub = self.0.metrics.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    // Stop sampling as soon as the client goes away.
                    _ = tx.closed() => break,
                }
                let sample = metrics_to_pb(&hub.sample().await);
                if tx.send(Ok(sample)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn metrics_to_pb(s: &HostSample) -> pb::HostMetrics {
    pb::HostMetrics {
        sampled_at: Some(timestamp(s.sampled_at)),
        cpu: Some(pb::CpuMetrics {
            usage_percent: s.cpu.usage_percent,
            per_core_percent: s.cpu.per_core_percent.clone(),
            logical_cores: s.cpu.logical_cores,
            physical_cores: s.cpu.physical_cores,
        }),
        load: Some(pb::LoadAverage {
            one: s.load.one,
            five: s.load.five,
            fifteen: s.load.fifteen,
        }),
        memory: Some(pb::MemoryMetrics {
            total_bytes: s.memory.total_bytes,
            used_bytes: s.memory.used_bytes,
            available_bytes: s.memory.available_bytes,
            swap_total_bytes: s.memory.swap_total_bytes,
            swap_used_bytes: s.memory.swap_used_bytes,
        }),
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskMetrics {
                mount_point: d.mount_point.clone(),
                device: d.device.clone(),
                file_system: d.file_system.clone(),
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
                inodes_total: d.inodes_total,
                inodes_free: d.inodes_free,
                read_bytes_total: d.read_bytes_total,
                written_bytes_total: d.written_bytes_total,
                read_bytes_per_second: d.read_bytes_per_second,
                written_bytes_per_second: d.written_bytes_per_second,
                read_only: d.read_only,
            })
            .collect(),
        networks: s
            .networks
            .iter()
            .map(|n| pb::NetworkMetrics {
                interface: n.interface.clone(),
                received_bytes_total: n.received_bytes_total,
                transmitted_bytes_total: n.transmitted_bytes_total,
                received_bytes_per_second: n.received_bytes_per_second,
                transmitted_bytes_per_second: n.transmitted_bytes_per_second,
                received_packets_total: n.received_packets_total,
                transmitted_packets_total: n.transmitted_packets_total,
                receive_errors_total: n.receive_errors_total,
                transmit_errors_total: n.transmit_errors_total,
            })
            .collect(),
        process_count: s.process_count,
        rate_interval: Some(duration(s.rate_interval)),
    }
}

// ---------------------------------------------------------------- probes

pub struct ProbeApi(pub AgentState);

fn probe_error(e: ProbeError) -> Status {
    match e {
        ProbeError::InvalidTarget(m) => Status::invalid_argument(m),
        ProbeError::NotAllowed(_) => Status::permission_denied(e.to_string()),
    }
}

fn outcome_to_pb(o: ProbeOutcome) -> pb::ProbeResult {
    pb::ProbeResult {
        name: o.name,
        target: o.target,
        ok: o.ok,
        attempts: o.attempts,
        latency: Some(duration(o.latency)),
        http_status: u32::from(o.http_status),
        error: o.error,
        body_excerpt: o.body_excerpt,
    }
}

fn attempts_arg(
    timeout: Option<prost_types::Duration>,
    retries: u32,
    interval: Option<prost_types::Duration>,
) -> Result<Attempts, Status> {
    if retries > probes::MAX_RETRIES {
        return Err(Status::invalid_argument(format!(
            "retries must be at most {}, got {retries}",
            probes::MAX_RETRIES
        )));
    }
    Ok(Attempts {
        timeout: duration_arg(
            "timeout",
            timeout,
            Duration::from_secs(5),
            Duration::from_millis(10),
            probes::MAX_TIMEOUT,
        )?,
        retries,
        interval: duration_arg(
            "interval",
            interval,
            Duration::from_secs(1),
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?,
    })
}

#[tonic::async_trait]
impl pb::probe_service_server::ProbeService for ProbeApi {
    async fn check_app_health(
        &self,
        request: Request<pb::CheckAppHealthRequest>,
    ) -> Result<Response<pb::CheckAppHealthResponse>, Status> {
        let req = request.into_inner();
        let app = app_or_not_found(&self.0.config, &req.app)?;
        let Some(health) = &app.health else {
            return Err(Status::failed_precondition(format!(
                "app {} declares no health probe ([app.health] in the agent's configuration)",
                app.name
            )));
        };
        let policy = &self.0.probe_policy;
        let health = probes::probe_declared(policy, &app.name, "health", health)
            .await
            .map_err(probe_error)?;
        let mut healthy = health.ok;
        let mut smoke = Vec::new();
        // Smoke checks only mean something once the app is healthy.
        if req.include_smoke && healthy {
            for check in &app.smoke {
                let outcome = probes::probe_declared(policy, &app.name, "smoke", check)
                    .await
                    .map_err(probe_error)?;
                healthy &= outcome.ok;
                smoke.push(outcome_to_pb(outcome));
            }
        }
        Ok(Response::new(pb::CheckAppHealthResponse {
            app: app.name.clone(),
            healthy,
            health: Some(outcome_to_pb(health)),
            smoke,
        }))
    }

    async fn probe_http(
        &self,
        request: Request<pb::HttpProbe>,
    ) -> Result<Response<pb::ProbeResult>, Status> {
        set_target(&request, format!("url={}", request.get_ref().url));
        let req = request.into_inner();
        let expect_status = match req.expect_status {
            0 => 200,
            s @ 100..=599 => s as u16,
            s => {
                return Err(Status::invalid_argument(format!(
                    "expect_status must be an HTTP status (100-599), got {s}"
                )));
            }
        };
        if req.json_field.is_empty() && !req.json_value.is_empty() {
            return Err(Status::invalid_argument("json_value needs json_field"));
        }
        let spec = probes::HttpProbeSpec {
            name: if req.name.is_empty() {
                req.url.clone()
            } else {
                req.name
            },
            url: req.url,
            expect_status,
            json_field: Some(req.json_field).filter(|f| !f.is_empty()),
            json_value: Some(req.json_value),
            attempts: attempts_arg(req.timeout, req.retries, req.interval)?,
        };
        let outcome = probes::probe_http(&self.0.probe_policy, &spec)
            .await
            .map_err(probe_error)?;
        Ok(Response::new(outcome_to_pb(outcome)))
    }

    async fn probe_tcp(
        &self,
        request: Request<pb::TcpProbe>,
    ) -> Result<Response<pb::ProbeResult>, Status> {
        let req = request.into_inner();
        let spec = probes::TcpProbeSpec {
            name: if req.name.is_empty() {
                req.address.clone()
            } else {
                req.name
            },
            address: req.address,
            attempts: attempts_arg(req.timeout, req.retries, req.interval)?,
        };
        let outcome = probes::probe_tcp(&self.0.probe_policy, &spec)
            .await
            .map_err(probe_error)?;
        Ok(Response::new(outcome_to_pb(outcome)))
    }
}

// ------------------------------------------- capabilities of later issues

/// Services whose capabilities are not built yet: every RPC answers
/// UNIMPLEMENTED (the generated default stubs).
pub struct NotYet;

impl pb::operation_service_server::OperationService for NotYet {}
impl pb::backup_service_server::BackupService for NotYet {}
impl pb::upgrade_service_server::UpgradeService for NotYet {}

// ---------------------------------------------------------------- units

pub struct UnitApi(pub AgentState);

fn systemd_error(e: SystemdError) -> Status {
    let message = e.to_string();
    match e {
        SystemdError::InvalidUnit(_) => Status::invalid_argument(message),
        SystemdError::NotAllowed(_) => Status::permission_denied(message),
        SystemdError::Unavailable { .. } => Status::unavailable(message),
        SystemdError::Refused { .. } => Status::failed_precondition(message),
        SystemdError::Timeout { .. } => Status::deadline_exceeded(message),
    }
}

fn log_error(e: LogError) -> Status {
    match e {
        LogError::Timeout => Status::deadline_exceeded(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

fn unit_state_to_pb(s: UnitState) -> pb::UnitStatus {
    pb::UnitStatus {
        name: s.name,
        load_state: s.load_state,
        active_state: s.active_state,
        sub_state: s.sub_state,
        description: s.description,
        main_pid: s.main_pid,
        since: s.since.map(timestamp),
        restart_count: s.restart_count,
        memory_bytes: s.memory_bytes,
        fragment_path: s.fragment_path,
        error: s.error,
    }
}

fn log_line_to_pb(l: LogLine) -> pb::LogEntry {
    pb::LogEntry {
        time: l.time.map(timestamp),
        unit: l.unit,
        priority: l.priority,
        message: l.message,
        pid: l.pid,
        cursor: l.cursor,
        identifier: l.identifier,
    }
}

const MAX_JOURNAL_LINES: u32 = 500;

impl UnitApi {
    async fn act(
        &self,
        action: UnitAction,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        set_target(&request, format!("unit={}", request.get_ref().unit));
        let req = request.into_inner();
        let state = &self.0;
        let unit = ControlledUnit::admit(&state.config, &req.unit).map_err(systemd_error)?;
        let timeout = duration_arg(
            "timeout",
            req.timeout,
            state.config.systemd.job_timeout,
            Duration::from_secs(1),
            Duration::from_secs(900),
        )?;
        if req.journal_lines > MAX_JOURNAL_LINES {
            return Err(Status::invalid_argument(format!(
                "journal_lines must be at most {MAX_JOURNAL_LINES}"
            )));
        }
        let journal_lines = if req.journal_lines == 0 {
            20
        } else {
            req.journal_lines
        };
        let started = SystemTime::now();
        let job = state
            .systemd
            .act(action, &unit, timeout)
            .await
            .map_err(systemd_error)?;
        let mut status = state
            .systemd
            .status(unit.as_str())
            .await
            .map_err(systemd_error)?;
        if matches!(action, UnitAction::Start | UnitAction::Restart) && job.result == "done" {
            status = self.settle(&unit, status).await?;
        }
        let journal_tail = if status.is_active() {
            Vec::new()
        } else {
            // Lines from this attempt first; older context if there are none.
            let since = started.checked_sub(Duration::from_secs(1));
            state
                .journal
                .tail(unit.as_str(), journal_lines, since)
                .await
                .map_err(log_error)?
                .into_iter()
                .map(log_line_to_pb)
                .collect()
        };
        Ok(Response::new(pb::UnitActionResponse {
            unit: unit.as_str().to_owned(),
            job_result: job.result,
            status: Some(unit_state_to_pb(status)),
            journal_tail,
            took: Some(duration(job.took)),
        }))
    }

    /// Watches a just-started unit for the settle window: a simple service
    /// is "started" once forked, and may die right after.
    async fn settle(
        &self,
        unit: &ControlledUnit,
        mut status: UnitState,
    ) -> Result<UnitState, Status> {
        let deadline = tokio::time::Instant::now() + self.0.config.systemd.settle;
        while tokio::time::Instant::now() < deadline && status.is_active() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = self
                .0
                .systemd
                .status(unit.as_str())
                .await
                .map_err(systemd_error)?;
        }
        Ok(status)
    }
}

#[tonic::async_trait]
impl pb::unit_service_server::UnitService for UnitApi {
    async fn get_unit_status(
        &self,
        request: Request<pb::GetUnitStatusRequest>,
    ) -> Result<Response<pb::GetUnitStatusResponse>, Status> {
        let mut names = request.into_inner().units;
        if names.is_empty() {
            names = self
                .0
                .config
                .controllable_units()
                .into_iter()
                .map(str::to_owned)
                .collect();
        }
        if names.len() > 256 {
            return Err(Status::invalid_argument("at most 256 units per call"));
        }
        let mut units = Vec::with_capacity(names.len());
        for name in &names {
            units.push(unit_state_to_pb(
                self.0.systemd.status(name).await.map_err(systemd_error)?,
            ));
        }
        Ok(Response::new(pb::GetUnitStatusResponse { units }))
    }

    async fn start_unit(
        &self,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        self.act(UnitAction::Start, request).await
    }

    async fn stop_unit(
        &self,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        self.act(UnitAction::Stop, request).await
    }

    async fn restart_unit(
        &self,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        self.act(UnitAction::Restart, request).await
    }

    async fn reload_unit(
        &self,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        self.act(UnitAction::Reload, request).await
    }

    async fn daemon_reload(
        &self,
        request: Request<pb::DaemonReloadRequest>,
    ) -> Result<Response<pb::DaemonReloadResponse>, Status> {
        set_target(&request, "systemd");
        self.0
            .systemd
            .daemon_reload()
            .await
            .map_err(systemd_error)?;
        Ok(Response::new(pb::DaemonReloadResponse {}))
    }
}

// ---------------------------------------------------------------- logs

pub struct LogApi(pub AgentState);

impl LogApi {
    fn admit(
        &self,
        req: &pb::TailLogsRequest,
    ) -> Result<(ControlledUnit, u32, Option<SystemTime>), Status> {
        let unit = ControlledUnit::admit(&self.0.config, &req.unit).map_err(systemd_error)?;
        if req.lines > crate::logs::MAX_LINES {
            return Err(Status::invalid_argument(format!(
                "lines must be at most {}",
                crate::logs::MAX_LINES
            )));
        }
        let lines = if req.lines == 0 { 50 } else { req.lines };
        let since = match req.since {
            Some(t) => Some(
                SystemTime::try_from(t)
                    .map_err(|_| Status::invalid_argument("since is not a valid time"))?,
            ),
            None => None,
        };
        Ok((unit, lines, since))
    }
}

#[tonic::async_trait]
impl pb::log_service_server::LogService for LogApi {
    async fn tail_logs(
        &self,
        request: Request<pb::TailLogsRequest>,
    ) -> Result<Response<pb::TailLogsResponse>, Status> {
        let (unit, lines, since) = self.admit(request.get_ref())?;
        let entries = self
            .0
            .journal
            .tail(unit.as_str(), lines, since)
            .await
            .map_err(log_error)?;
        Ok(Response::new(pb::TailLogsResponse {
            entries: entries.into_iter().map(log_line_to_pb).collect(),
        }))
    }

    async fn follow_logs(
        &self,
        request: Request<pb::TailLogsRequest>,
    ) -> Result<Response<BoxStream<pb::LogEntry>>, Status> {
        let (unit, lines, since) = self.admit(request.get_ref())?;
        let rx = self
            .0
            .journal
            .follow(unit.as_str(), lines, since)
            .map_err(log_error)?;
        let stream = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            stream,
            |r| r.map(log_line_to_pb).map_err(log_error),
        ))))
    }
}
