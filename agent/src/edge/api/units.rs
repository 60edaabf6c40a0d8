//! UnitService: status of declared units, and start/stop/restart/reload
//! journaled under the lock of the app the unit belongs to.

use std::time::Duration;

use covet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::logs::log_line_to_pb;
use super::{
    AgentState, caller_record, duration, duration_arg, log_error, op_error, systemd_error,
    timestamp,
};
use crate::config::Config;
use crate::edge::audit::set_target;
use crate::host::systemd::{ControlledUnit, UnitAction, UnitState};
use crate::ops::log::OpKind;
use crate::ops::{OpSpec, Outcome};
use crate::workflow::unit_action::{
    UnitActionError, UnitActionReport, UnitActionSpec, run_unit_action,
};

pub struct UnitApi(pub AgentState);

/// Journal lines a failed action may return at most.
const MAX_JOURNAL_LINES: u32 = 500;
const DEFAULT_JOURNAL_LINES: u32 = 20;
/// Units a status call may name at most.
const MAX_STATUS_UNITS: usize = 256;

/// A unit action on a declared unit.
#[derive(Debug)]
struct UnitActionRequest {
    unit: ControlledUnit,
    timeout: Duration,
    journal_lines: u32,
    /// The lock the action is journaled under: the unit's app's, so a
    /// manual restart never lands in the middle of an upgrade.
    lock: String,
}

fn parse_unit_action(
    req: pb::UnitActionRequest,
    config: &Config,
) -> Result<UnitActionRequest, Status> {
    let unit = ControlledUnit::admit(config, &req.unit).map_err(systemd_error)?;
    let timeout = duration_arg(
        "timeout",
        req.timeout,
        config.systemd.job_timeout,
        Duration::from_secs(1),
        Duration::from_secs(900),
    )?;
    if req.journal_lines > MAX_JOURNAL_LINES {
        return Err(Status::invalid_argument(format!(
            "journal_lines must be at most {MAX_JOURNAL_LINES}"
        )));
    }
    let journal_lines = if req.journal_lines == 0 {
        DEFAULT_JOURNAL_LINES
    } else {
        req.journal_lines
    };
    let lock = config
        .app_running(unit.as_str())
        .map(|a| a.name.clone())
        .unwrap_or_else(|| format!("unit:{}", unit.as_str()));
    Ok(UnitActionRequest {
        unit,
        timeout,
        journal_lines,
        lock,
    })
}

/// GetUnitStatus: every name admitted before any is read (one undeclared
/// unit refuses the whole call); none named means every declared unit.
fn parse_get_unit_status(
    req: pb::GetUnitStatusRequest,
    config: &Config,
) -> Result<Vec<ControlledUnit>, Status> {
    let mut names = req.units;
    if names.is_empty() {
        names = config.controllable_units().into_iter().collect();
    }
    if names.len() > MAX_STATUS_UNITS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_STATUS_UNITS} units per call"
        )));
    }
    names
        .iter()
        .map(|name| ControlledUnit::admit(config, name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(systemd_error)
}

impl UnitApi {
    async fn act(
        &self,
        action: UnitAction,
        request: Request<pb::UnitActionRequest>,
    ) -> Result<Response<pb::UnitActionResponse>, Status> {
        set_target(&request, format!("unit={}", request.get_ref().unit));
        let caller = caller_record(&request);
        let state = &self.0;
        let req = parse_unit_action(request.into_inner(), &state.config)?;
        let unit = req.unit.as_str().to_owned();
        let spec = UnitActionSpec {
            action,
            unit: req.unit,
            timeout: req.timeout,
            journal_lines: req.journal_lines,
            lock: req.lock,
            settle: state.config.systemd.settle,
        };
        let report = run_unit_action(&state.ops, &state.systemd, &state.journald, caller, spec)
            .await
            .map_err(unit_action_error)?;
        Ok(Response::new(unit_action_to_pb(unit, report)))
    }
}

fn unit_action_error(e: UnitActionError) -> Status {
    match e {
        UnitActionError::Op(e) => op_error(e),
        UnitActionError::Systemd(e) => systemd_error(e),
        UnitActionError::Log(e) => log_error(e),
    }
}

#[tonic::async_trait]
impl pb::unit_service_server::UnitService for UnitApi {
    async fn get_unit_status(
        &self,
        request: Request<pb::GetUnitStatusRequest>,
    ) -> Result<Response<pb::GetUnitStatusResponse>, Status> {
        let admitted = parse_get_unit_status(request.into_inner(), &self.0.config)?;
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

fn unit_action_to_pb(unit: String, r: UnitActionReport) -> pb::UnitActionResponse {
    pb::UnitActionResponse {
        unit,
        job_result: r.job_result,
        status: Some(unit_state_to_pb(r.status)),
        journal_tail: r.journal_tail.into_iter().map(log_line_to_pb).collect(),
        took: Some(duration(r.took)),
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

#[cfg(test)]
mod tests {
    use super::super::testing::{config, refused, secs};
    use super::*;
    use tonic::Code;

    fn action(unit: &str) -> pb::UnitActionRequest {
        pb::UnitActionRequest {
            unit: unit.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_unit_action_is_locked_by_the_units_app() {
        let config = config();
        let app_unit = parse_unit_action(action("covet.service"), &config).unwrap();
        assert_eq!(app_unit.unit.as_str(), "covet.service");
        assert_eq!(app_unit.lock, "covet");
        assert_eq!(
            app_unit.timeout,
            Duration::from_secs(30),
            "the configured job_timeout"
        );
        assert_eq!(app_unit.journal_lines, DEFAULT_JOURNAL_LINES);
        let allowed = parse_unit_action(
            pb::UnitActionRequest {
                unit: "worker.service".into(),
                timeout: secs(900),
                journal_lines: MAX_JOURNAL_LINES,
            },
            &config,
        )
        .unwrap();
        assert_eq!(allowed.lock, "unit:worker.service");
        assert_eq!(allowed.timeout, Duration::from_secs(900));
        assert_eq!(allowed.journal_lines, MAX_JOURNAL_LINES);
    }

    #[test]
    fn a_unit_action_on_a_bad_or_undeclared_unit_or_out_of_range_is_refused() {
        let config = config();
        refused(
            parse_unit_action(action("sshd.service"), &config),
            Code::PermissionDenied,
            "sshd.service",
        );
        for bad in ["", "../x.service", "a b.service"] {
            let r = parse_unit_action(action(bad), &config);
            assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "{bad:?}");
        }
        let with = |timeout, journal_lines| pb::UnitActionRequest {
            unit: "covet.service".into(),
            timeout,
            journal_lines,
        };
        refused(
            parse_unit_action(with(secs(901), 0), &config),
            Code::InvalidArgument,
            "timeout",
        );
        refused(
            parse_unit_action(with(secs(-1), 0), &config),
            Code::InvalidArgument,
            "timeout",
        );
        refused(
            parse_unit_action(with(None, 501), &config),
            Code::InvalidArgument,
            "journal_lines must be at most 500",
        );
    }

    #[test]
    fn a_status_call_admits_every_unit_or_none() {
        let config = config();
        let all =
            parse_get_unit_status(pb::GetUnitStatusRequest { units: vec![] }, &config).unwrap();
        let mut names: Vec<&str> = all.iter().map(ControlledUnit::as_str).collect();
        names.sort();
        assert_eq!(names, ["bare.service", "covet.service", "worker.service"]);
        let one_bad = pb::GetUnitStatusRequest {
            units: vec!["covet.service".into(), "dbus.service".into()],
        };
        refused(
            parse_get_unit_status(one_bad, &config),
            Code::PermissionDenied,
            "dbus.service",
        );
        let too_many = pb::GetUnitStatusRequest {
            units: vec!["covet.service".into(); 257],
        };
        refused(
            parse_get_unit_status(too_many, &config),
            Code::InvalidArgument,
            "at most 256 units",
        );
    }
}
