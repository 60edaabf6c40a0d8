//! OperationService: the operation log's records and events, live, and
//! cancellation of a running operation.

use covet_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{AgentState, name_error, oplog_error, timestamp};
use crate::edge::audit::set_target;
use crate::names::OperationId;
use crate::ops::CancelError;
use crate::ops::log::{
    EventBody, EventRecord, OpKind, OpState, OperationRecord, OutputStream, StepOutcome,
};
use crate::ops::watch::watch;

pub struct OperationApi(pub AgentState);

const DEFAULT_LIST_LIMIT: u32 = 50;
const MAX_LIST_LIMIT: u32 = 1000;

/// ListOperations: newest first, optionally one app's (by name; an app no
/// longer declared still has its history) or the unfinished ones only.
#[derive(Debug, PartialEq, Eq)]
struct ListOperations {
    app: Option<String>,
    active_only: bool,
    limit: usize,
}

fn parse_list_operations(req: pb::ListOperationsRequest) -> ListOperations {
    let limit = if req.limit == 0 {
        DEFAULT_LIST_LIMIT
    } else {
        req.limit.min(MAX_LIST_LIMIT)
    };
    ListOperations {
        app: Some(req.app).filter(|a| !a.is_empty()),
        active_only: req.active_only,
        limit: limit as usize,
    }
}

impl ListOperations {
    fn admits(&self, op: &OperationRecord) -> bool {
        self.app.as_ref().is_none_or(|a| &op.app == a)
            && (!self.active_only || !op.state.is_final())
    }
}

/// An operation that is over, or not this agent's to stop, is FAILED_PRECONDITION.
fn cancel_error(e: CancelError) -> Status {
    match e {
        CancelError::Over { .. } | CancelError::NotRunningHere(_) => {
            Status::failed_precondition(e.to_string())
        }
        CancelError::OpLog(e) => oplog_error(e),
    }
}

fn parse_operation_id(id: &str) -> Result<OperationId, Status> {
    OperationId::parse(id).map_err(name_error)
}

/// WatchOperation: its events from `from_sequence` (1 when unset) on.
#[derive(Debug, PartialEq, Eq)]
struct WatchOperation {
    id: OperationId,
    from_sequence: u64,
}

fn parse_watch_operation(req: pb::WatchOperationRequest) -> Result<WatchOperation, Status> {
    Ok(WatchOperation {
        id: parse_operation_id(&req.id)?,
        from_sequence: req.from_sequence,
    })
}

#[tonic::async_trait]
impl pb::operation_service_server::OperationService for OperationApi {
    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let req = parse_list_operations(request.into_inner());
        let operations = self
            .0
            .ops
            .oplog()
            .list()
            .map_err(oplog_error)?
            .into_iter()
            .filter(|op| req.admits(op))
            .take(req.limit)
            .map(operation_to_pb)
            .collect();
        Ok(Response::new(pb::ListOperationsResponse { operations }))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = parse_operation_id(&request.get_ref().id)?;
        let op = self.0.ops.oplog().get(id.as_str()).map_err(oplog_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }

    async fn watch_operation(
        &self,
        request: Request<pb::WatchOperationRequest>,
    ) -> Result<Response<BoxStream<pb::OperationEvent>>, Status> {
        let req = parse_watch_operation(request.into_inner())?;
        let events =
            watch(self.0.ops.oplog(), req.id.as_str(), req.from_sequence).map_err(oplog_error)?;
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(events),
            |e| e.map(event_to_pb).map_err(oplog_error),
        ))))
    }

    async fn cancel_operation(
        &self,
        request: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = parse_operation_id(&request.get_ref().id)?;
        set_target(&request, format!("operation={}", id.as_str()));
        let op = self
            .0
            .ops
            .cancel_running(id.as_str())
            .map_err(cancel_error)?;
        Ok(Response::new(operation_to_pb(op)))
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

pub fn analysis_event_to_pb(a: crate::ops::log::AnalysisEvent) -> pb::AnalysisReading {
    pb::AnalysisReading {
        rule: a.rule,
        description: a.description,
        baseline: a.baseline,
        value: a.value,
        limit: a.limit,
        state: a.state,
        missing: a.missing,
        failures: a.failures,
        step: a.step,
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
        EventBody::Analysis(a) => Event::Analysis(analysis_event_to_pb(a)),
    };
    pb::OperationEvent {
        operation_id: e.operation_id,
        sequence: e.sequence,
        time: Some(timestamp(e.time)),
        event: Some(event),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::refused;
    use super::*;
    use tonic::Code;

    #[test]
    fn a_listing_defaults_to_fifty_and_caps_at_a_thousand() {
        let parse = |app: &str, limit| {
            parse_list_operations(pb::ListOperationsRequest {
                app: app.into(),
                active_only: false,
                limit,
            })
        };
        assert_eq!(
            parse("", 0),
            ListOperations {
                app: None,
                active_only: false,
                limit: 50
            }
        );
        assert_eq!(parse("covet", 7).limit, 7);
        assert_eq!(parse("covet", 7).app.as_deref(), Some("covet"));
        assert_eq!(parse("", u32::MAX).limit, 1000);
    }

    #[test]
    fn operation_ids_are_short_and_plain() {
        let watch = parse_watch_operation(pb::WatchOperationRequest {
            id: "op-20261201-221500-a1b2c3".into(),
            from_sequence: 3,
        })
        .unwrap();
        assert_eq!(watch.id.as_str(), "op-20261201-221500-a1b2c3");
        assert_eq!(watch.from_sequence, 3);
        assert!(parse_operation_id(&"x".repeat(64)).is_ok());
        refused(
            parse_operation_id(""),
            Code::InvalidArgument,
            "operation id is empty",
        );
        refused(
            parse_operation_id(&"x".repeat(65)),
            Code::InvalidArgument,
            "at most 64",
        );
        for bad in ["op/../x", "op 1", "op\n"] {
            refused(
                parse_operation_id(bad),
                Code::InvalidArgument,
                "operation id may hold only",
            );
        }
        let bad_watch = parse_watch_operation(pb::WatchOperationRequest {
            id: "../../etc".into(),
            from_sequence: 0,
        });
        refused(bad_watch, Code::InvalidArgument, "operation id");
    }

    #[test]
    fn an_operation_maps_with_its_callers_role_and_steps() {
        let now = std::time::SystemTime::UNIX_EPOCH;
        let op = OperationRecord {
            id: "up-1".into(),
            kind: OpKind::Upgrade,
            app: "covet".into(),
            state: OpState::RolledBack,
            created: now,
            updated: now,
            finished: Some(now),
            requested_by: crate::ops::log::Caller {
                common_name: "ops".into(),
                serial: "01".into(),
                role: "operator".into(),
            },
            cause: "health failed".into(),
            needs_human: String::new(),
            backup_id: "b1".into(),
            current_step: String::new(),
            last_sequence: 9,
            params: [("to_version".to_owned(), "0.2.0".to_owned())].into(),
            steps: vec![crate::ops::log::StepRecord {
                name: "swap".into(),
                outcome: StepOutcome::Interrupted,
                started: now,
                finished: None,
                detail: String::new(),
            }],
        };
        let pb = operation_to_pb(op);
        assert_eq!(pb.kind(), pb::OperationKind::Upgrade);
        assert_eq!(pb.state(), pb::OperationState::RolledBack);
        let by = pb.requested_by.unwrap();
        assert_eq!(
            (by.common_name.as_str(), by.role()),
            ("ops", pb::Role::Operator)
        );
        assert_eq!(pb.steps[0].outcome(), pb::StepOutcome::Interrupted);
        assert_eq!(pb.params["to_version"], "0.2.0");
        let ended = event_to_pb(EventRecord {
            operation_id: "up-1".into(),
            sequence: 9,
            time: now,
            body: EventBody::StateChanged {
                state: OpState::RolledBack,
                cause: "health failed".into(),
            },
        });
        assert!(matches!(
            ended.event,
            Some(pb::operation_event::Event::StateChanged(ref s)) if s.state() == pb::OperationState::RolledBack
        ));
    }
}
