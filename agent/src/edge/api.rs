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

use crate::archive::Compression;
use crate::backup::{
    BackupError, BackupStore, CreateOptions, MANIFEST, Manifest, RestoreOptions, pg_target,
};
use crate::config::Config;
use crate::edge::audit::set_target;
use crate::edge::authz;
use crate::edge::identity::{PeerIdentity, Role};
use crate::edge::tls::PeerInfo;
use crate::host::info::HostInfo;
use crate::host::journald::{JournalReader, LogError, LogLine};
use crate::host::metrics::{HostSample, MetricsHub};
use crate::host::systemd::{ControlledUnit, Systemd, SystemdError, UnitAction, UnitState};
use crate::ops::log::{
    Caller, EventBody, EventRecord, OpKind, OpLog, OpLogError, OpState, OperationRecord,
    OutputStream, StepOutcome,
};
use crate::ops::{OpContext, OpError, OpSpec, Operations, Outcome};
use crate::probes::{self, Attempts, ProbeError, ProbeOutcome, TargetPolicy};

/// What every service handler shares.
#[derive(Clone)]
pub struct AgentState {
    pub config: Arc<Config>,
    pub metrics: MetricsHub,
    pub probe_policy: TargetPolicy,
    pub systemd: Arc<Systemd>,
    pub journald: JournalReader,
    pub ops: Operations,
    pub backups: BackupStore,
}

impl AgentState {
    pub fn new(config: Arc<Config>, oplog: Arc<OpLog>) -> AgentState {
        let ops = Operations::new(oplog);
        let probe_policy = TargetPolicy::new(config.declared_probe_targets());
        let systemd = Arc::new(Systemd::new(&config.systemd.bus));
        let journald = JournalReader::new(config.systemd.journal_dir.clone());
        AgentState {
            metrics: MetricsHub::new(),
            probe_policy,
            systemd,
            journald,
            backups: BackupStore::new(config.backup_dir.clone()),
            config,
            ops,
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
        let host = HostInfo::current();
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
            agent_started: Some(timestamp(crate::host::info::agent_started())),
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
            .map(|p| p.kind().to_owned())
            .unwrap_or_default(),
        package_name: app
            .package
            .as_ref()
            .map(|p| p.name().to_owned())
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
        let caller = caller_record(&request);
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
        // Journaled under the lock of the app the unit belongs to, so a
        // manual restart never lands in the middle of an upgrade.
        let lock = state
            .config
            .apps
            .iter()
            .find(|a| a.unit == unit.as_str())
            .map(|a| a.name.clone())
            .unwrap_or_else(|| format!("unit:{}", unit.as_str()));
        let op = state
            .ops
            .begin_inline(OpSpec {
                kind: OpKind::UnitAction,
                app: lock,
                caller,
                params: [
                    ("unit".to_owned(), unit.as_str().to_owned()),
                    ("action".to_owned(), action.as_str().to_owned()),
                ]
                .into(),
                exclusive: true,
            })
            .map_err(op_error)?;
        op.ctx().step_started(action.as_str(), unit.as_str());
        let started = SystemTime::now();
        let job = match state.systemd.act(action, &unit, timeout).await {
            Ok(job) => job,
            Err(e) => {
                op.ctx()
                    .step_finished(action.as_str(), StepOutcome::Failed, e.to_string());
                op.finish(Outcome::Failed(e.to_string()));
                return Err(systemd_error(e));
            }
        };
        let mut status = state.systemd.status(&unit).await.map_err(systemd_error)?;
        if matches!(action, UnitAction::Start | UnitAction::Restart) && job.result == "done" {
            status = self.settle(&unit, status).await?;
        }
        let journal_tail = if status.is_active() {
            Vec::new()
        } else {
            // Lines from this attempt first; older context if there are none.
            let since = started.checked_sub(Duration::from_secs(1));
            state
                .journald
                .tail(unit.as_str(), journal_lines, since)
                .await
                .map_err(log_error)?
                .into_iter()
                .map(log_line_to_pb)
                .collect()
        };
        let wanted = if action == UnitAction::Stop {
            !status.is_active()
        } else {
            status.is_active()
        };
        let detail = format!(
            "job {}; now {}/{}",
            job.result, status.active_state, status.sub_state
        );
        if job.result == "done" && wanted {
            op.ctx()
                .step_finished(action.as_str(), StepOutcome::Succeeded, detail);
            op.finish(Outcome::Succeeded);
        } else {
            op.ctx()
                .step_finished(action.as_str(), StepOutcome::Failed, detail.clone());
            op.finish(Outcome::Failed(detail));
        }
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
            status = self.0.systemd.status(unit).await.map_err(systemd_error)?;
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
        // Every name is admitted before any is read: one undeclared unit
        // refuses the whole call.
        let admitted = names
            .iter()
            .map(|name| ControlledUnit::admit(&self.0.config, name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(systemd_error)?;
        let mut units = Vec::with_capacity(admitted.len());
        for unit in &admitted {
            units.push(unit_state_to_pb(
                self.0.systemd.status(unit).await.map_err(systemd_error)?,
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
        let op = self
            .0
            .ops
            .begin_inline(OpSpec {
                kind: OpKind::DaemonReload,
                app: "systemd".into(),
                caller: caller_record(&request),
                params: Default::default(),
                exclusive: true,
            })
            .map_err(op_error)?;
        match self.0.systemd.daemon_reload().await {
            Ok(()) => {
                op.finish(Outcome::Succeeded);
                Ok(Response::new(pb::DaemonReloadResponse {}))
            }
            Err(e) => {
                op.finish(Outcome::Failed(e.to_string()));
                Err(systemd_error(e))
            }
        }
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
        if req.lines > crate::host::journald::MAX_LINES {
            return Err(Status::invalid_argument(format!(
                "lines must be at most {}",
                crate::host::journald::MAX_LINES
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
            .journald
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
            .journald
            .follow(unit.as_str(), lines, since)
            .map_err(log_error)?;
        let stream = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            stream,
            |r| r.map(log_line_to_pb).map_err(log_error),
        ))))
    }
}

// ---------------------------------------------------------------- operations

pub struct OperationApi(pub AgentState);

fn oplog_error(e: OpLogError) -> Status {
    match e {
        OpLogError::NotFound(id) => Status::not_found(format!("no operation {id} on this host")),
        other => Status::internal(other.to_string()),
    }
}

pub fn op_error(e: OpError) -> Status {
    match e {
        OpError::Locked { .. } => Status::aborted(e.to_string()),
        OpError::OpLog(j) => oplog_error(j),
    }
}

fn op_kind_to_pb(k: OpKind) -> pb::OperationKind {
    match k {
        OpKind::BackupCreate => pb::OperationKind::BackupCreate,
        OpKind::BackupVerify => pb::OperationKind::BackupVerify,
        OpKind::BackupRestore => pb::OperationKind::BackupRestore,
        OpKind::BackupPrune => pb::OperationKind::BackupPrune,
        OpKind::Upgrade => pb::OperationKind::Upgrade,
        OpKind::Rollback => pb::OperationKind::Rollback,
        OpKind::UnitAction => pb::OperationKind::UnitAction,
        OpKind::BackupDelete => pb::OperationKind::BackupDelete,
        OpKind::DaemonReload => pb::OperationKind::DaemonReload,
    }
}

fn op_state_to_pb(s: OpState) -> pb::OperationState {
    match s {
        OpState::Pending => pb::OperationState::Pending,
        OpState::Running => pb::OperationState::Running,
        OpState::RollingBack => pb::OperationState::RollingBack,
        OpState::Succeeded => pb::OperationState::Succeeded,
        OpState::Failed => pb::OperationState::Failed,
        OpState::RolledBack => pb::OperationState::RolledBack,
        OpState::NeedsHuman => pb::OperationState::NeedsHuman,
        OpState::Canceled => pb::OperationState::Canceled,
    }
}

fn step_outcome_to_pb(o: StepOutcome) -> pb::StepOutcome {
    match o {
        StepOutcome::Running => pb::StepOutcome::Running,
        StepOutcome::Succeeded => pb::StepOutcome::Succeeded,
        StepOutcome::Failed => pb::StepOutcome::Failed,
        StepOutcome::Skipped => pb::StepOutcome::Skipped,
        StepOutcome::Interrupted => pb::StepOutcome::Interrupted,
    }
}

pub fn operation_to_pb(op: OperationRecord) -> pb::Operation {
    pb::Operation {
        id: op.id,
        kind: op_kind_to_pb(op.kind).into(),
        app: op.app,
        state: op_state_to_pb(op.state).into(),
        created: Some(timestamp(op.created)),
        updated: Some(timestamp(op.updated)),
        finished: op.finished.map(timestamp),
        requested_by: Some(pb::CallerIdentity {
            common_name: op.requested_by.common_name,
            serial: op.requested_by.serial,
            role: match op.requested_by.role.as_str() {
                "reader" => pb::Role::Reader,
                "operator" => pb::Role::Operator,
                "admin" => pb::Role::Admin,
                _ => pb::Role::Unspecified,
            }
            .into(),
            fingerprint_sha256: String::new(),
        }),
        cause: op.cause,
        needs_human: op.needs_human,
        backup_id: op.backup_id,
        current_step: op.current_step,
        last_sequence: op.last_sequence,
        params: op.params.into_iter().collect(),
        steps: op
            .steps
            .into_iter()
            .map(|s| pb::StepRecord {
                name: s.name,
                outcome: step_outcome_to_pb(s.outcome).into(),
                started: Some(timestamp(s.started)),
                finished: s.finished.map(timestamp),
                detail: s.detail,
            })
            .collect(),
    }
}

pub fn event_to_pb(e: EventRecord) -> pb::OperationEvent {
    use pb::operation_event::Event;
    let event = match e.body {
        EventBody::StepStarted { step, description } => {
            Event::StepStarted(pb::StepStarted { step, description })
        }
        EventBody::StepFinished {
            step,
            outcome,
            detail,
        } => Event::StepFinished(pb::StepFinished {
            step,
            outcome: step_outcome_to_pb(outcome).into(),
            detail,
        }),
        EventBody::Output { step, stream, line } => Event::Output(pb::OutputLine {
            step,
            stream: match stream {
                OutputStream::Stdout => pb::output_line::Stream::Stdout,
                OutputStream::Stderr => pb::output_line::Stream::Stderr,
            }
            .into(),
            line,
        }),
        EventBody::Progress {
            step,
            done,
            total,
            unit,
        } => Event::Progress(pb::Progress {
            step,
            done,
            total,
            unit,
        }),
        EventBody::StateChanged { state, cause } => Event::StateChanged(pb::StateChanged {
            state: op_state_to_pb(state).into(),
            cause,
        }),
        EventBody::Note { text } => Event::Note(pb::Note { text }),
    };
    pb::OperationEvent {
        operation_id: e.operation_id,
        sequence: e.sequence,
        time: Some(timestamp(e.time)),
        event: Some(event),
    }
}

/// The journal's caller record for the identity on this request.
pub fn caller_record<T>(request: &Request<T>) -> Caller {
    caller(request)
        .map(|id| Caller {
            common_name: id.common_name.clone(),
            serial: id.serial.clone(),
            role: id
                .role
                .map(|r| r.to_string().trim_start_matches("covet:").to_owned())
                .unwrap_or_default(),
        })
        .unwrap_or_default()
}

/// Operation ids are short (`op-YYYYMMDD-HHMMSS-xxxxxx`); anything longer
/// or with other characters is refused before it reaches the journal.
const MAX_OPERATION_ID: usize = 64;

fn operation_id_arg(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("operation id is empty"));
    }
    if id.len() > MAX_OPERATION_ID {
        return Err(Status::invalid_argument(format!(
            "operation id is {} bytes long; ids have at most {MAX_OPERATION_ID} (see `covetctl ops list`)",
            id.len()
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Status::invalid_argument(
            "operation id may hold only letters, digits, '-' and '_' (see `covetctl ops list`)",
        ));
    }
    Ok(id)
}

fn ends_operation(e: &EventRecord) -> bool {
    matches!(&e.body, EventBody::StateChanged { state, .. } if state.is_final())
}

#[tonic::async_trait]
impl pb::operation_service_server::OperationService for OperationApi {
    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit.min(1000)
        } as usize;
        let operations = self
            .0
            .ops
            .oplog()
            .list()
            .map_err(oplog_error)?
            .into_iter()
            .filter(|op| req.app.is_empty() || op.app == req.app)
            .filter(|op| !req.active_only || !op.state.is_final())
            .take(limit)
            .map(operation_to_pb)
            .collect();
        Ok(Response::new(pb::ListOperationsResponse { operations }))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let op = self
            .0
            .ops
            .oplog()
            .get(operation_id_arg(&request.get_ref().id)?)
            .map_err(oplog_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }

    async fn watch_operation(
        &self,
        request: Request<pb::WatchOperationRequest>,
    ) -> Result<Response<BoxStream<pb::OperationEvent>>, Status> {
        let req = request.into_inner();
        let oplog = self.0.ops.oplog().clone();
        let id = operation_id_arg(&req.id)?;
        // NOT_FOUND before anything is held for the caller; then subscribe
        // before reading the stored events so nothing falls between.
        let op = oplog.get(id).map_err(oplog_error)?;
        let mut live = oplog.subscribe(id).map_err(oplog_error)?;
        let stored = oplog
            .events_from(&req.id, req.from_sequence.max(1))
            .map_err(oplog_error)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = req.from_sequence.saturating_sub(1);
            let mut over = op.state.is_final() && op.last_sequence <= last;
            for e in stored {
                last = e.sequence;
                over |= ends_operation(&e);
                if tx.send(Ok(event_to_pb(e))).await.is_err() {
                    return;
                }
            }
            while !over {
                let next = tokio::select! {
                    next = live.recv() => next,
                    _ = tx.closed() => return,
                };
                let batch = match next {
                    Ok(e) if e.sequence <= last => continue,
                    Ok(e) if e.sequence == last + 1 => vec![e],
                    // A gap (we lagged behind, or the channel closed): read the journal.
                    _ => match oplog.events_from(&op.id, last + 1) {
                        Ok(events) => events,
                        Err(e) => {
                            let _ = tx.send(Err(oplog_error(e))).await;
                            return;
                        }
                    },
                };
                if batch.is_empty() {
                    // The channel closed with nothing new: the operation is over.
                    match oplog.get(&op.id) {
                        Ok(now) if now.state.is_final() => return,
                        _ => match oplog.subscribe(&op.id) {
                            Ok(again) => {
                                live = again;
                                continue;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(oplog_error(e))).await;
                                return;
                            }
                        },
                    }
                }
                for e in batch {
                    last = e.sequence;
                    over |= ends_operation(&e);
                    if tx.send(Ok(event_to_pb(e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_operation(
        &self,
        request: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        operation_id_arg(&request.get_ref().id)?;
        set_target(&request, format!("operation={}", request.get_ref().id));
        let id = request.into_inner().id;
        let op = self.0.ops.oplog().get(&id).map_err(oplog_error)?;
        if op.state.is_final() {
            return Err(Status::failed_precondition(format!(
                "operation {id} is already over ({:?})",
                op.state
            )));
        }
        if !self.0.ops.cancel(&id) {
            return Err(Status::failed_precondition(format!(
                "operation {id} is not running in this agent"
            )));
        }
        let op = self.0.ops.oplog().get(&id).map_err(oplog_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }
}

// ---------------------------------------------------------------- backups

pub struct BackupApi(pub AgentState);

fn backup_error(e: BackupError) -> Status {
    let message = e.to_string();
    match e {
        BackupError::NotFound(_) => Status::not_found(message),
        BackupError::InvalidId(_) => Status::invalid_argument(message),
        BackupError::NoSpace { .. } | BackupError::Corrupt { .. } | BackupError::Refused(_) => {
            Status::failed_precondition(message)
        }
        BackupError::Canceled => Status::cancelled(message),
        BackupError::Archive(_) | BackupError::Db(_) | BackupError::Io { .. } => {
            Status::internal(message)
        }
    }
}

fn compression_from_pb(c: i32) -> Result<Compression, Status> {
    match pb::Compression::try_from(c) {
        Ok(pb::Compression::Unspecified | pb::Compression::Zstd) => Ok(Compression::Zstd),
        Ok(pb::Compression::Gzip) => Ok(Compression::Gzip),
        Ok(pb::Compression::None) => Ok(Compression::None),
        Err(_) => Err(Status::invalid_argument(format!("unknown compression {c}"))),
    }
}

fn compression_to_pb(name: &str) -> pb::Compression {
    match name {
        "zstd" => pb::Compression::Zstd,
        "gzip" => pb::Compression::Gzip,
        "none" => pb::Compression::None,
        _ => pb::Compression::Unspecified,
    }
}

fn manifest_to_pb(m: Manifest, referenced_by: Vec<String>) -> pb::Backup {
    pb::Backup {
        created: Some(timestamp(m.created_time())),
        id: m.id,
        app: m.app,
        agent_version: m.agent_version,
        package_version: m.package_version,
        compression: compression_to_pb(&m.compression).into(),
        files: m
            .files
            .into_iter()
            .map(|f| pb::BackupFile {
                name: f.name,
                source_path: f.source_path,
                size_bytes: f.size,
                sha256: f.sha256,
            })
            .collect(),
        database: m.database.map(|d| pb::BackupDatabase {
            dbname: d.dbname,
            server_version: d.server_version,
            format: d.format,
            row_counts: d.row_counts.into_iter().collect(),
        }),
        total_bytes: m.total_bytes,
        referenced_by,
    }
}

/// Outcome of a failed backup operation, canceled or not.
fn backup_outcome(ctx: &OpContext, e: BackupError) -> Outcome {
    if ctx.canceled() || matches!(e, BackupError::Canceled) {
        Outcome::Canceled(format!("canceled; nothing was changed ({e})"))
    } else {
        Outcome::Failed(e.to_string())
    }
}

impl BackupApi {
    fn app_names(&self) -> Vec<&str> {
        self.0.config.apps.iter().map(|a| a.name.as_str()).collect()
    }

    fn find(&self, id: &str) -> Result<(std::path::PathBuf, Manifest), Status> {
        self.0
            .backups
            .find(&self.app_names(), id)
            .map_err(backup_error)
    }

    /// Operations that still need each backup: running ones, and the last
    /// successful upgrade of each app (its rollback point).
    fn references(&self) -> Result<std::collections::HashMap<String, Vec<String>>, Status> {
        let mut refs: std::collections::HashMap<String, Vec<String>> = Default::default();
        let mut last_upgrade_seen = std::collections::HashSet::new();
        for op in self.0.ops.oplog().list().map_err(oplog_error)? {
            if op.backup_id.is_empty() {
                continue;
            }
            let rollback_point = op.kind == OpKind::Upgrade
                && op.state == OpState::Succeeded
                && last_upgrade_seen.insert(op.app.clone());
            if !op.state.is_final() || rollback_point {
                refs.entry(op.backup_id.clone())
                    .or_default()
                    .push(op.id.clone());
            }
        }
        Ok(refs)
    }

    fn start(
        &self,
        kind: OpKind,
        app: &str,
        caller: Caller,
        params: std::collections::BTreeMap<String, String>,
        exclusive: bool,
        work: impl FnOnce(
            OpContext,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>
        + Send
        + 'static,
    ) -> Result<Response<pb::Operation>, Status> {
        let spec = OpSpec {
            kind,
            app: app.to_owned(),
            caller,
            params,
            exclusive,
        };
        let op = self.0.ops.start(spec, work).map_err(op_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }
}

#[tonic::async_trait]
impl pb::backup_service_server::BackupService for BackupApi {
    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("app={}", request.get_ref().app));
        let caller = caller_record(&request);
        let req = request.into_inner();
        let app = app_or_not_found(&self.0.config, &req.app)?.clone();
        if req.skip_files && req.skip_database {
            return Err(Status::invalid_argument(
                "nothing to back up: both files and database are skipped",
            ));
        }
        let opts = CreateOptions {
            files: !req.skip_files,
            database: !req.skip_database && app.database.is_some(),
            compression: compression_from_pb(req.compression)?,
        };
        if let Some(holder) = self.0.ops.holder(&app.name) {
            return Err(Status::aborted(format!(
                "app {} is busy: operation {holder} holds its lock; wait for it or cancel it",
                app.name
            )));
        }
        let store = self.0.backups.clone();
        let reserve = self.0.config.backup.free_space_reserve_bytes;
        let preflight_app = app.clone();
        let estimate =
            tokio::task::spawn_blocking(move || store.preflight(&preflight_app, opts, reserve))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(backup_error)?;
        let store = self.0.backups.clone();
        let params = [
            (
                "compression".to_owned(),
                opts.compression.as_str().to_owned(),
            ),
            ("files".to_owned(), opts.files.to_string()),
            ("database".to_owned(), opts.database.to_string()),
        ]
        .into();
        self.start(
            OpKind::BackupCreate,
            &app.name.clone(),
            caller,
            params,
            true,
            move |ctx| {
                Box::pin(async move {
                    match store.create(&ctx, &app, opts, estimate).await {
                        Ok(m) => {
                            ctx.update(|op| op.backup_id = m.id.clone());
                            ctx.note(format!(
                                "backup {} is complete ({} bytes)",
                                m.id, m.total_bytes
                            ));
                            Outcome::Succeeded
                        }
                        Err(e) => backup_outcome(&ctx, e),
                    }
                })
            },
        )
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let app = request.into_inner().app;
        let apps = if app.is_empty() {
            self.app_names()
        } else {
            vec![app_or_not_found(&self.0.config, &app)?.name.as_str()]
        };
        let refs = self.references()?;
        let backups = self
            .0
            .backups
            .list(&apps)
            .into_iter()
            .map(|m| {
                let r = refs.get(&m.id).cloned().unwrap_or_default();
                manifest_to_pb(m, r)
            })
            .collect();
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let (_, m) = self.find(&request.get_ref().id)?;
        let refs = self.references()?.remove(&m.id).unwrap_or_default();
        Ok(Response::new(manifest_to_pb(m, refs)))
    }

    async fn verify_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let caller = caller_record(&request);
        let (dir, m) = self.find(&request.get_ref().id)?;
        let app = app_or_not_found(&self.0.config, &m.app)?.clone();
        let store = self.0.backups.clone();
        let app_name = m.app.clone();
        let params = [("backup".to_owned(), m.id.clone())].into();
        self.start(
            OpKind::BackupVerify,
            &app_name,
            caller,
            params,
            false,
            move |ctx| {
                Box::pin(async move {
                    ctx.update(|op| op.backup_id = m.id.clone());
                    let pg = match pg_target(&app) {
                        Ok(pg) => pg,
                        Err(e) => return Outcome::Failed(e.to_string()),
                    };
                    match store.verify(&ctx, &dir, &m, pg.as_ref()).await {
                        Ok(()) => Outcome::Succeeded,
                        Err(e) => backup_outcome(&ctx, e),
                    }
                })
            },
        )
    }

    async fn prune_backups(
        &self,
        request: Request<pb::PruneBackupsRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("app={}", request.get_ref().app));
        let caller = caller_record(&request);
        let app = app_or_not_found(&self.0.config, &request.get_ref().app)?.clone();
        let referenced: std::collections::HashSet<String> =
            self.references()?.into_keys().collect();
        let store = self.0.backups.clone();
        self.start(
            OpKind::BackupPrune,
            &app.name.clone(),
            caller,
            Default::default(),
            true,
            move |ctx| {
                Box::pin(async move {
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
                                crate::ops::log::StepOutcome::Succeeded,
                                if deleted.is_empty() {
                                    "nothing to delete".to_owned()
                                } else {
                                    format!("deleted {}", deleted.join(", "))
                                },
                            );
                            Outcome::Succeeded
                        }
                        Err(e) => {
                            ctx.step_finished(
                                "prune",
                                crate::ops::log::StepOutcome::Failed,
                                e.to_string(),
                            );
                            Outcome::Failed(e.to_string())
                        }
                    }
                })
            },
        )
    }

    async fn delete_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let (dir, m) = self.find(&request.get_ref().id)?;
        if let Some(ops) = self.references()?.get(&m.id) {
            return Err(Status::failed_precondition(format!(
                "backup {} is still referenced by operation(s) {}",
                m.id,
                ops.join(", ")
            )));
        }
        let op = self
            .0
            .ops
            .begin_inline(OpSpec {
                kind: OpKind::BackupDelete,
                app: m.app.clone(),
                caller: caller_record(&request),
                params: [("backup".to_owned(), m.id.clone())].into(),
                exclusive: true,
            })
            .map_err(op_error)?;
        op.ctx().update(|r| r.backup_id = m.id.clone());
        let freed = match self.0.backups.delete(&dir, &m) {
            Ok(freed) => {
                op.finish(Outcome::Succeeded);
                freed
            }
            Err(e) => {
                op.finish(Outcome::Failed(e.to_string()));
                return Err(backup_error(e));
            }
        };
        Ok(Response::new(pb::DeleteBackupResponse {
            id: m.id,
            freed_bytes: freed,
        }))
    }

    async fn download_backup(
        &self,
        request: Request<pb::DownloadBackupRequest>,
    ) -> Result<Response<BoxStream<pb::BackupChunk>>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let req = request.into_inner();
        let (dir, m) = self.find(&req.id)?;
        // Opened here, relative to the backup directory and never through a
        // symlink, so a refusal is a status and no byte of a link's target
        // is ever read.
        let refused = |e: std::io::Error| download_refusal(&m.id, &dir, e);
        let backup_dir = crate::files::safe::Dir::open(&dir).map_err(refused)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        if req.file.is_empty() {
            let mut files = Vec::new();
            for name in backup_dir.names().map_err(refused)? {
                let file = backup_dir.open_regular(&name).map_err(refused)?;
                files.push((name.to_string_lossy().into_owned(), file));
            }
            let id = m.id.clone();
            tokio::task::spawn_blocking(move || stream_tar(files, &id, tx));
        } else {
            let Some(file) = m.files.iter().find(|f| f.name == req.file) else {
                return Err(Status::not_found(format!(
                    "backup {} has no file {:?} (files: {})",
                    m.id,
                    req.file,
                    m.files
                        .iter()
                        .map(|f| f.name.as_str())
                        .chain([MANIFEST])
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let opened = backup_dir
                .open_regular(std::ffi::OsStr::new(&file.name))
                .map_err(refused)?;
            let path = dir.join(&file.name);
            let total = file.size;
            tokio::task::spawn_blocking(move || stream_file(opened, &path, total, tx));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn restore_backup(
        &self,
        request: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let caller = caller_record(&request);
        let req = request.into_inner();
        if req.files_only && req.database_only {
            return Err(Status::invalid_argument(
                "files_only and database_only exclude each other",
            ));
        }
        let (dir, m) = self.find(&req.id)?;
        let app = app_or_not_found(&self.0.config, &m.app)?.clone();
        let opts = RestoreOptions {
            files: !req.database_only,
            database: !req.files_only,
        };
        if opts.database && !opts.files && m.database.is_none() {
            return Err(Status::failed_precondition(format!(
                "backup {} holds no database dump",
                m.id
            )));
        }
        if let Some(holder) = self.0.ops.holder(&app.name) {
            return Err(Status::aborted(format!(
                "app {} is busy: operation {holder} holds its lock",
                app.name
            )));
        }
        // A damaged backup is refused before anything is touched.
        BackupStore::verify_checksums(&dir, &m).await.map_err(|e| {
            Status::failed_precondition(format!("{e}; refusing to restore from it"))
        })?;
        let store = self.0.backups.clone();
        let params = [("backup".to_owned(), m.id.clone())].into();
        self.start(
            OpKind::BackupRestore,
            &app.name.clone(),
            caller,
            params,
            true,
            move |ctx| {
                Box::pin(async move {
                    ctx.update(|op| op.backup_id = m.id.clone());
                    match store.restore(&ctx, &app, &dir, &m, opts).await {
                        Ok(report) => {
                            if let Some(kept) = report.database_kept_as {
                                ctx.note(format!(
                                    "the database as it was before is kept as {kept}"
                                ));
                            }
                            Outcome::Succeeded
                        }
                        Err(e) => backup_outcome(&ctx, e),
                    }
                })
            },
        )
    }
}

const CHUNK: usize = 256 * 1024;

/// Why a backup cannot be downloaded: a symlink or other non-file in the
/// backup directory is FAILED_PRECONDITION (someone tampered with it).
fn download_refusal(id: &str, dir: &std::path::Path, e: std::io::Error) -> Status {
    match e.kind() {
        std::io::ErrorKind::InvalidData => Status::failed_precondition(format!(
            "backup {id} cannot be downloaded: {e} (a backup directory holds only regular files; inspect {} and delete the backup if it was tampered with)",
            dir.display()
        )),
        _ if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => {
            Status::failed_precondition(format!(
                "backup {id} cannot be downloaded: {} is not a plain directory ({e})",
                dir.display()
            ))
        }
        _ => Status::internal(format!("cannot read backup {id} in {}: {e}", dir.display())),
    }
}

fn stream_file(
    mut file: std::fs::File,
    path: &std::path::Path,
    total: u64,
    tx: tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
) {
    use std::io::Read;
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                let chunk = pb::BackupChunk {
                    offset,
                    data: buf,
                    total_bytes: if offset == 0 { total } else { 0 },
                };
                offset += n as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "reading {}: {e}",
                    path.display()
                ))));
                return;
            }
        }
    }
}

/// Streams a tar of the whole backup directory: its regular files, opened
/// beforehand.
fn stream_tar(
    files: Vec<(String, std::fs::File)>,
    id: &str,
    tx: tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
) {
    struct ChunkWriter {
        tx: tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
        offset: u64,
    }
    impl std::io::Write for ChunkWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let chunk = pb::BackupChunk {
                offset: self.offset,
                data: buf.to_vec(),
                total_bytes: 0,
            };
            self.offset += buf.len() as u64;
            self.tx.blocking_send(Ok(chunk)).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away")
            })?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let writer = std::io::BufWriter::with_capacity(
        CHUNK,
        ChunkWriter {
            tx: tx.clone(),
            offset: 0,
        },
    );
    let mut builder = tar::Builder::new(writer);
    let result = files
        .into_iter()
        .try_for_each(|(name, mut file)| {
            let meta = file.metadata()?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            builder.append_data(&mut header, format!("{id}/{name}"), &mut file)
        })
        .and_then(|()| builder.into_inner())
        .and_then(|mut w| {
            use std::io::Write;
            w.flush()
        });
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        let _ = tx.blocking_send(Err(Status::internal(format!("streaming backup {id}: {e}"))));
    }
}

// ---------------------------------------------------------------- upgrades

pub struct UpgradeApi(pub AgentState);

impl AgentState {
    pub fn workflow_deps(&self) -> crate::workflow::Deps {
        crate::workflow::Deps {
            config: self.config.clone(),
            systemd: self.systemd.clone(),
            backups: self.backups.clone(),
            probe_policy: self.probe_policy.clone(),
            oplog: self.ops.oplog().clone(),
        }
    }
}

fn env_edits_from_pb(
    edits: Vec<pb::EnvEdit>,
) -> Result<Vec<crate::host::envfile::EnvEdit>, Status> {
    use crate::host::envfile::EnvEdit;
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
fn editable_env_edits(
    app: &crate::config::AppConfig,
    edits: Vec<pb::EnvEdit>,
) -> Result<Vec<crate::host::envfile::EnvEdit>, Status> {
    let edits = env_edits_from_pb(edits)?;
    crate::host::envfile::validate(&edits).map_err(|e| Status::invalid_argument(e.to_string()))?;
    crate::host::envfile::check_editable(&app.env_keys, &edits)
        .map_err(|e| Status::permission_denied(format!("app {}: {e}", app.name)))?;
    Ok(edits)
}

fn preflight_error(e: crate::workflow::PreflightError) -> Status {
    match e {
        crate::workflow::PreflightError::Invalid(m) => Status::invalid_argument(m),
        crate::workflow::PreflightError::Precondition(m) => Status::failed_precondition(m),
    }
}

impl UpgradeApi {
    fn spec(
        &self,
        req: pb::UpgradeRequest,
    ) -> Result<(crate::config::AppConfig, crate::workflow::UpgradeSpec), Status> {
        let app = app_or_not_found(&self.0.config, &req.app)?.clone();
        if req.to_version.is_empty() {
            return Err(Status::invalid_argument("to_version is required"));
        }
        let watch = match req.watch {
            Some(w) => Some(duration_arg(
                "watch",
                Some(w),
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
            )?)
            .filter(|d| !d.is_zero()),
            None => None,
        };
        let spec = crate::workflow::UpgradeSpec {
            app: app.name.clone(),
            to_version: req.to_version,
            env_edits: editable_env_edits(&app, req.env_edits)?,
            no_rollback: req.no_rollback,
            watch,
            force: req.force,
        };
        Ok((app, spec))
    }

    fn busy(&self, app: &str) -> Result<(), Status> {
        match self.0.ops.holder(app) {
            Some(holder) => Err(Status::aborted(format!(
                "app {app} is busy: operation {holder} holds its lock; wait for it or cancel it"
            ))),
            None => Ok(()),
        }
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
        let (app, spec) = self.spec(request.into_inner())?;
        self.busy(&app.name)?;
        let deps = self.0.workflow_deps();
        let pre = crate::workflow::preflight(&deps, &app, &spec)
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
                Box::pin(crate::workflow::run_upgrade(deps, ctx, app, spec, pre))
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
        let (app, spec) = self.spec(request.into_inner())?;
        let deps = self.0.workflow_deps();
        let mut plan = pb::UpgradePlan {
            app: app.name.clone(),
            to_version: spec.to_version.clone(),
            ..Default::default()
        };
        if let Some(holder) = self.0.ops.holder(&app.name) {
            plan.blockers
                .push(format!("operation {holder} holds the app's lock"));
        }
        match crate::workflow::preflight(&deps, &app, &spec).await {
            Ok(pre) => {
                plan.from_version = pre.from_version;
                plan.env_diff = pre
                    .findings
                    .iter()
                    .filter_map(|f| f.strip_prefix("env: ").map(str::to_owned))
                    .collect();
            }
            Err(crate::workflow::PreflightError::Invalid(m)) => {
                return Err(Status::invalid_argument(m));
            }
            Err(crate::workflow::PreflightError::Precondition(m)) => plan.blockers.push(m),
        }
        plan.steps = crate::workflow::plan_lines(&app, &spec, &plan.from_version);
        plan.migration_dry_run = match crate::workflow::migration_dry_run(&deps, &app, &spec).await
        {
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
        let app = app_or_not_found(&self.0.config, &request.get_ref().app)?.clone();
        self.busy(&app.name)?;
        let asked = request.get_ref().backup_id.clone();
        let (target, last_upgrade) =
            crate::workflow::rollback_target(self.0.ops.oplog(), &app.name, &asked).map_err(
                |e| match e {
                    crate::workflow::TargetError::NoUpgrade(_) => {
                        Status::failed_precondition(e.to_string())
                    }
                    crate::workflow::TargetError::OpLog(e) => oplog_error(e),
                },
            )?;
        // The last upgrade is the operator's to undo (fleet rollouts name
        // its backup); going back to any other backup is a restore.
        if !last_upgrade {
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
        let params = crate::workflow::rollback_params(&target);
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
                crate::workflow::run_rollback(deps, ctx, app, target)
            })
            .map_err(op_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_short_and_plain() {
        assert_eq!(
            operation_id_arg("op-20261201-221500-a1b2c3").unwrap(),
            "op-20261201-221500-a1b2c3"
        );
        for bad in ["", "op/../x", "op 1", "op\n", &"x".repeat(65)] {
            let e = operation_id_arg(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        assert!(operation_id_arg(&"x".repeat(64)).is_ok());
    }
}
