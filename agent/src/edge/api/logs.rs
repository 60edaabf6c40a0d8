//! LogService: the journal of a declared unit, as a tail or followed live.

use std::time::SystemTime;

use covet_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{AgentState, log_error, systemd_error, timestamp};
use crate::config::Config;
use crate::host::journald::{LogLine, MAX_LINES};
use crate::host::systemd::ControlledUnit;

pub struct LogApi(pub AgentState);

const DEFAULT_LINES: u32 = 50;

/// TailLogs and FollowLogs: which unit, how many lines, from when.
#[derive(Debug)]
struct TailLogs {
    unit: ControlledUnit,
    lines: u32,
    since: Option<SystemTime>,
}

fn parse_tail_logs(req: &pb::TailLogsRequest, config: &Config) -> Result<TailLogs, Status> {
    let unit = ControlledUnit::admit(config, &req.unit).map_err(systemd_error)?;
    if req.lines > MAX_LINES {
        return Err(Status::invalid_argument(format!(
            "lines must be at most {MAX_LINES}"
        )));
    }
    let lines = if req.lines == 0 {
        DEFAULT_LINES
    } else {
        req.lines
    };
    let since = match req.since {
        Some(t) => Some(
            SystemTime::try_from(t)
                .map_err(|_| Status::invalid_argument("since is not a valid time"))?,
        ),
        None => None,
    };
    Ok(TailLogs { unit, lines, since })
}

#[tonic::async_trait]
impl pb::log_service_server::LogService for LogApi {
    async fn tail_logs(
        &self,
        request: Request<pb::TailLogsRequest>,
    ) -> Result<Response<pb::TailLogsResponse>, Status> {
        let req = parse_tail_logs(request.get_ref(), &self.0.config)?;
        let entries = self
            .0
            .journald
            .tail(req.unit.as_str(), req.lines, req.since)
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
        let req = parse_tail_logs(request.get_ref(), &self.0.config)?;
        let rx = self
            .0
            .journald
            .follow(req.unit.as_str(), req.lines, req.since)
            .map_err(log_error)?;
        let stream = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            stream,
            |r| r.map(log_line_to_pb).map_err(log_error),
        ))))
    }
}

pub(super) fn log_line_to_pb(l: LogLine) -> pb::LogEntry {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{config, refused};
    use super::*;
    use tonic::Code;

    fn tail(unit: &str, lines: u32, since: Option<prost_types::Timestamp>) -> pb::TailLogsRequest {
        pb::TailLogsRequest {
            unit: unit.into(),
            lines,
            since,
        }
    }

    #[test]
    fn a_tail_of_a_declared_unit_defaults_to_fifty_lines() {
        let config = config();
        let t = parse_tail_logs(&tail("covet.service", 0, None), &config).unwrap();
        assert_eq!(
            (t.unit.as_str(), t.lines, t.since),
            ("covet.service", 50, None)
        );
        let since = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        let t = parse_tail_logs(&tail("worker.service", MAX_LINES, Some(since)), &config).unwrap();
        assert_eq!(t.lines, MAX_LINES);
        assert_eq!(
            t.since,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn a_tail_of_an_undeclared_unit_too_many_lines_or_a_bad_time_is_refused() {
        let config = config();
        refused(
            parse_tail_logs(&tail("sshd.service", 0, None), &config),
            Code::PermissionDenied,
            "sshd.service",
        );
        refused(
            parse_tail_logs(&tail("", 0, None), &config),
            Code::InvalidArgument,
            "is not a valid unit name",
        );
        refused(
            parse_tail_logs(&tail("covet.service", MAX_LINES + 1, None), &config),
            Code::InvalidArgument,
            "lines must be at most",
        );
        // Before the earliest time this host can represent.
        let bad_time = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: 0,
        };
        refused(
            parse_tail_logs(&tail("covet.service", 0, Some(bad_time)), &config),
            Code::InvalidArgument,
            "since is not a valid time",
        );
    }
}
