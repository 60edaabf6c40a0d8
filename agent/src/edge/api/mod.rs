//! The gRPC edge, one file per service (the model is Firecracker's
//! `api_server`): each request is parsed by a pure `parse_*` function into a
//! typed domain request, the handler calls one domain function, and the
//! `*_to_pb` functions next to it map the result back.
//!
//! This module holds what the services share: the agent's state, the status
//! of each domain error, the caller, and time conversions. Nothing here
//! decides who may call what (that is the authz layer) and no capability
//! module sees a proto type.

mod backups;
mod info;
mod logs;
mod metrics;
mod operations;
mod probes;
mod units;
mod upgrades;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use covet_proto::v1 as pb;
use tonic::{Request, Status};

pub use backups::BackupApi;
pub use info::InfoApi;
pub use logs::LogApi;
pub use metrics::MetricsApi;
pub use operations::{OperationApi, operation_to_pb};
pub use probes::ProbeApi;
pub use units::UnitApi;
pub use upgrades::UpgradeApi;

use crate::backup::BackupError;
use crate::backup::BackupStore;
use crate::config::Config;
use crate::edge::identity::{PeerIdentity, Role};
use crate::edge::tls::PeerInfo;
use crate::host::journald::{JournalReader, LogError};
use crate::host::metrics::MetricsHub;
use crate::host::systemd::{Systemd, SystemdError};
use crate::names::NameError;
use crate::ops::log::{Caller, OpLog, OpLogError};
use crate::ops::{OpError, Operations};
use crate::probes::TargetPolicy;

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

// ---------------------------------------------------------------- the caller

fn caller<T>(request: &Request<T>) -> Option<Arc<PeerIdentity>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.identity.clone())
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

/// The operation log's caller record for the identity on this request.
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

// ---------------------------------------------------------------- time

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration field of a request: `default` when unset or zero, else within bounds.
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

// ---------------------------------------------------------------- statuses

/// A refused name: an unknown app is NOT_FOUND, anything malformed INVALID_ARGUMENT.
pub fn name_error(e: NameError) -> Status {
    match e {
        NameError::UnknownApp { .. } => Status::not_found(e.to_string()),
        NameError::AppRequired
        | NameError::BackupId(_)
        | NameError::OperationIdEmpty
        | NameError::OperationIdTooLong(_)
        | NameError::OperationIdChars
        | NameError::Version(_) => Status::invalid_argument(e.to_string()),
    }
}

pub fn oplog_error(e: OpLogError) -> Status {
    match e {
        OpLogError::NotFound(id) => Status::not_found(format!("no operation {id} on this host")),
        other => Status::internal(other.to_string()),
    }
}

/// A busy app is ABORTED: the call may be retried once the holder is done.
pub fn op_error(e: OpError) -> Status {
    match e {
        OpError::Locked { .. } => Status::aborted(e.to_string()),
        OpError::OpLog(j) => oplog_error(j),
    }
}

pub fn backup_error(e: BackupError) -> Status {
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

pub fn systemd_error(e: SystemdError) -> Status {
    let message = e.to_string();
    match e {
        SystemdError::InvalidUnit(_) => Status::invalid_argument(message),
        SystemdError::NotAllowed(_) => Status::permission_denied(message),
        SystemdError::Unavailable { .. } => Status::unavailable(message),
        SystemdError::Refused { .. } => Status::failed_precondition(message),
        SystemdError::Timeout { .. } => Status::deadline_exceeded(message),
    }
}

pub fn log_error(e: LogError) -> Status {
    match e {
        LogError::Timeout => Status::deadline_exceeded(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A literal configuration the parsers are tested against.
    use tonic::{Code, Status};

    use crate::config::Config;

    /// `covet` declares everything a request can name; `bare` nothing.
    pub fn config() -> Config {
        toml::from_str(
            r#"
            listen = "127.0.0.1:7443"
            state_dir = "/var/lib/covet-agent"
            backup_dir = "/var/backups/covet"
            [tls]
            ca = "/nonexistent/ca.crt"
            cert = "/nonexistent/agent.crt"
            key = "/nonexistent/agent.key"
            [systemd]
            allow = ["worker.service"]
            job_timeout = "30s"
            [[app]]
            name = "covet"
            unit = "covet.service"
            env_keys = ["FEATURE_*"]
            [app.package]
            kind = "pip"
            name = "covet"
            venv = "/opt/covet/venv"
            [app.database]
            kind = "postgres"
            dbname = "covet"
            [app.health]
            url = "http://127.0.0.1:8000/health"
            [[app.smoke]]
            url = "http://127.0.0.1:8000/"
            [app.metrics]
            url = "http://127.0.0.1:8000/metrics"
            interval = "5s"
            [[app.analysis]]
            name = "errors"
            ratio = { num = 'http_requests_total{code=~"5.."}', den = "http_requests_total" }
            max = 0.01
            [[app]]
            name = "bare"
            unit = "bare.service"
            "#,
        )
        .unwrap()
    }

    /// Asserts the status's code and that its message names `field`.
    #[track_caller]
    pub fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, field: &str) {
        let status = result.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(field),
            "the message names {field:?}: {status:?}"
        );
    }

    pub fn secs(seconds: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{refused, secs};
    use super::*;
    use tonic::Code;

    #[test]
    fn a_duration_is_its_default_when_unset_or_zero_and_else_within_bounds() {
        let arg = |v| {
            duration_arg(
                "interval",
                v,
                Duration::from_secs(2),
                Duration::from_secs(1),
                Duration::from_secs(60),
            )
        };
        assert_eq!(arg(None).unwrap(), Duration::from_secs(2));
        assert_eq!(arg(secs(0)).unwrap(), Duration::from_secs(2));
        assert_eq!(arg(secs(60)).unwrap(), Duration::from_secs(60));
        refused(
            arg(secs(-1)),
            Code::InvalidArgument,
            "interval must not be negative",
        );
        refused(
            arg(secs(61)),
            Code::InvalidArgument,
            "interval must be between 1s and 1m",
        );
        let sub_second = Some(prost_types::Duration {
            seconds: 0,
            nanos: 5_000_000,
        });
        refused(arg(sub_second), Code::InvalidArgument, "got 5ms");
    }

    #[test]
    fn each_refused_name_has_its_status() {
        let config = testing::config();
        let app = |n| crate::names::AppName::declared(&config, n).map_err(name_error);
        refused(app(""), Code::InvalidArgument, "app is required");
        refused(app("nope"), Code::NotFound, "no app \"nope\" is declared");
        let version = crate::names::Version::parse("1/2").map_err(name_error);
        refused(version, Code::InvalidArgument, "invalid version");
        let id = crate::names::OperationId::parse("").map_err(name_error);
        refused(id, Code::InvalidArgument, "operation id");
        let backup = crate::names::BackupId::parse("..").map_err(name_error);
        refused(backup, Code::InvalidArgument, "not a backup id");
    }

    #[test]
    fn a_busy_app_is_aborted_and_a_missing_operation_not_found() {
        let busy = op_error(OpError::Locked {
            app: "covet".into(),
            holder: "up-1".into(),
        });
        assert_eq!(busy.code(), Code::Aborted);
        assert!(busy.message().contains("up-1"), "{busy:?}");
        let missing = oplog_error(OpLogError::NotFound("op-1".into()));
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(missing.message(), "no operation op-1 on this host");
    }
}
