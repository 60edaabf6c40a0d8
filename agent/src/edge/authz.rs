//! Who may call what, enforced in one tower layer in front of every service,
//! and the audit layer that records calls that change things and refusals.
//!
//! The table below is the only place roles are decided. An RPC missing from
//! it is admin-only and audited, so a new RPC is safe by default.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tonic::Status;
use tonic::body::Body as TonicBody;

use crate::edge::audit::{AuditLog, AuditRecord, AuditTarget};
use crate::edge::identity::Role;
use crate::edge::layer::{CallFilter, CallFuture, refuse};
use crate::edge::tls::PeerInfo;

/// Access rule for one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Full method path, `/package.Service/Method`.
    pub method: &'static str,
    /// The least powerful role that may call it.
    pub min_role: Role,
    /// Whether every call is written to the audit log (calls that change
    /// anything, or hand out data).
    pub audited: bool,
}

const fn read(method: &'static str) -> Rule {
    Rule {
        method,
        min_role: Role::Reader,
        audited: false,
    }
}

const fn act(method: &'static str, min_role: Role) -> Rule {
    Rule {
        method,
        min_role,
        audited: true,
    }
}

/// Probes reach out from the host on the caller's behalf: audited too.
const fn look(method: &'static str, min_role: Role) -> Rule {
    Rule {
        method,
        min_role,
        audited: true,
    }
}

use Role::{Admin, Operator};

/// Every RPC the agent serves and the roles that may call it.
pub const RULES: &[Rule] = &[
    read("/covet.agent.v1.InfoService/GetInfo"),
    read("/covet.agent.v1.MetricsService/GetMetrics"),
    read("/covet.agent.v1.MetricsService/WatchMetrics"),
    read("/covet.agent.v1.ProbeService/CheckAppHealth"),
    read("/covet.agent.v1.ProbeService/AnalyzeApp"),
    look("/covet.agent.v1.ProbeService/ProbeHttp", Operator),
    look("/covet.agent.v1.ProbeService/ProbeTcp", Operator),
    read("/covet.agent.v1.UnitService/GetUnitStatus"),
    act("/covet.agent.v1.UnitService/StartUnit", Operator),
    act("/covet.agent.v1.UnitService/StopUnit", Operator),
    act("/covet.agent.v1.UnitService/RestartUnit", Operator),
    act("/covet.agent.v1.UnitService/ReloadUnit", Operator),
    act("/covet.agent.v1.UnitService/DaemonReload", Admin),
    read("/covet.agent.v1.LogService/TailLogs"),
    read("/covet.agent.v1.LogService/FollowLogs"),
    read("/covet.agent.v1.OperationService/ListOperations"),
    read("/covet.agent.v1.OperationService/GetOperation"),
    read("/covet.agent.v1.OperationService/WatchOperation"),
    act("/covet.agent.v1.OperationService/CancelOperation", Operator),
    act("/covet.agent.v1.BackupService/CreateBackup", Operator),
    read("/covet.agent.v1.BackupService/ListBackups"),
    read("/covet.agent.v1.BackupService/GetBackup"),
    act("/covet.agent.v1.BackupService/VerifyBackup", Operator),
    act("/covet.agent.v1.BackupService/PruneBackups", Operator),
    act("/covet.agent.v1.BackupService/DeleteBackup", Admin),
    act("/covet.agent.v1.BackupService/DownloadBackup", Admin),
    act("/covet.agent.v1.BackupService/RestoreBackup", Admin),
    act("/covet.agent.v1.UpgradeService/Upgrade", Operator),
    act("/covet.agent.v1.UpgradeService/PlanUpgrade", Operator),
    act("/covet.agent.v1.UpgradeService/Rollback", Operator),
    read("/grpc.health.v1.Health/Check"),
    read("/grpc.health.v1.Health/Watch"),
    read("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
    read("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
];

/// A power inside an RPC that needs more than the RPC's own least role. The
/// handler names the power it is about to use; [`POWERS`] decides who has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Rollback to a backup other than the one taken by the app's last
    /// succeeded upgrade: that is a restore, and restores are admin's.
    RollbackToAnyBackup,
}

/// Every power, its least role, and how a refusal names it.
pub const POWERS: &[(Power, Role, &str)] = &[(
    Power::RollbackToAnyBackup,
    Admin,
    "rolling back to a backup other than the one of the app's last succeeded upgrade (--to BACKUP_ID)",
)];

/// The role the authz layer granted a call, for [`require`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted(pub Role);

/// Checks that the caller of `request` holds `power`. PERMISSION_DENIED
/// names the power and the role it needs.
pub fn require<T>(request: &tonic::Request<T>, power: Power) -> Result<(), Status> {
    let (_, needed, what) = POWERS
        .iter()
        .find(|(p, _, _)| *p == power)
        .copied()
        .unwrap_or((power, Role::Admin, "this action"));
    match request.extensions().get::<Granted>() {
        Some(Granted(role)) if *role >= needed => Ok(()),
        Some(Granted(role)) => Err(Status::permission_denied(format!(
            "role {} may not do {what}: it needs {} or higher",
            role.as_org(),
            needed.as_org()
        ))),
        None => Err(Status::permission_denied(format!(
            "{what} needs {}, and this call carries no granted role",
            needed.as_org()
        ))),
    }
}

/// The rule for a method path; unknown methods are admin-only and audited.
pub fn rule_for(method: &str) -> Rule {
    RULES
        .iter()
        .find(|r| r.method == method)
        .copied()
        .unwrap_or(Rule {
            method: "(unlisted)",
            min_role: Role::Admin,
            audited: true,
        })
}

/// Decides a call: `Ok` with the caller's role, or the status to answer with.
pub fn decide(method: &str, peer: Option<&PeerInfo>) -> Result<Role, Status> {
    let Some(peer) = peer else {
        return Err(Status::unauthenticated(
            "no verified client certificate on this connection",
        ));
    };
    let id = &peer.identity;
    let Some(role) = id.role else {
        return Err(Status::permission_denied(format!(
            "certificate CN={} (serial {}) carries no covet role: its Organization must be covet:reader, covet:operator or covet:admin",
            id.common_name, id.serial
        )));
    };
    let rule = rule_for(method);
    if role >= rule.min_role {
        Ok(role)
    } else {
        Err(Status::permission_denied(format!(
            "role {} may not call {}: it needs {} or higher",
            role.as_org(),
            method.trim_start_matches('/'),
            rule.min_role.as_org()
        )))
    }
}

/// Refuses calls that the caller's role may not make; a granted call
/// carries its role (`Granted`) for the handler's [`require`].
#[derive(Clone, Default)]
pub struct Authz;

impl CallFilter for Authz {
    fn filter<B, E: Send + 'static>(
        &self,
        mut req: http::Request<B>,
        next: impl FnOnce(http::Request<B>) -> CallFuture<E>,
    ) -> CallFuture<E> {
        match decide(req.uri().path(), req.extensions().get::<PeerInfo>()) {
            Ok(role) => {
                req.extensions_mut().insert(Granted(role));
                next(req)
            }
            Err(status) => refuse(status),
        }
    }
}

/// Writes an audit record for every audited call (when it ends) and for every
/// refusal, whichever layer refused it.
#[derive(Clone)]
pub struct Audit {
    log: AuditLog,
}

impl Audit {
    pub fn new(log: AuditLog) -> Audit {
        Audit { log }
    }
}

impl CallFilter for Audit {
    fn filter<B, E: Send + 'static>(
        &self,
        mut req: http::Request<B>,
        next: impl FnOnce(http::Request<B>) -> CallFuture<E>,
    ) -> CallFuture<E> {
        let method = req.uri().path().to_owned();
        let audited = rule_for(&method).audited;
        let target = AuditTarget::default();
        req.extensions_mut().insert(target.clone());
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let pending = PendingAudit {
            log: self.log.clone(),
            record: Some(
                AuditRecord::new(method, "unknown")
                    .peer(peer.as_ref().map(|p| p.remote))
                    .caller(peer.as_ref().map(|p| p.identity.as_ref())),
            ),
            target,
            audited,
        };
        let call = next(req);
        Box::pin(async move {
            let response = call.await?;
            // Errors come as trailers-only responses: the status is in the headers.
            if let Some(status) = Status::from_header_map(response.headers()) {
                pending.finish(&status);
                return Ok(response);
            }
            // Unaudited streams are wrapped too: one can still end refused
            // (its certificate revoked), and refusals are always audited.
            let (parts, body) = response.into_parts();
            let body = AuditedBody {
                inner: body,
                pending,
            };
            Ok(http::Response::from_parts(parts, TonicBody::new(body)))
        })
    }
}

/// An audit record waiting for the call's final status.
struct PendingAudit {
    log: AuditLog,
    record: Option<AuditRecord>,
    target: AuditTarget,
    audited: bool,
}

impl PendingAudit {
    fn finish(mut self, status: &Status) {
        self.write(status.code(), status.message());
    }

    fn write(&mut self, code: tonic::Code, message: &str) {
        let Some(record) = self.record.take() else {
            return;
        };
        let refused = matches!(
            code,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        );
        if !(self.audited || refused) {
            return;
        }
        let outcome = match code {
            tonic::Code::Ok => "ok".to_owned(),
            tonic::Code::PermissionDenied => "denied".to_owned(),
            other => format!("{other:?}"),
        };
        let mut record = record.target(self.target.get());
        record.outcome = outcome;
        if !message.is_empty() {
            record = record.message(message);
        }
        self.log.record(&record);
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        // The body was dropped before its trailers: the client went away.
        if self.record.is_some() {
            self.write(
                tonic::Code::Cancelled,
                "the client went away before the call ended",
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that audits the call when its trailers pass by.
    struct AuditedBody {
        #[pin]
        inner: TonicBody,
        pending: PendingAudit,
    }
}

impl Body for AuditedBody {
    type Data = <TonicBody as Body>::Data;
    type Error = <TonicBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame.trailers_ref().and_then(Status::from_header_map) {
                    this.pending.write(status.code(), status.message());
                }
            }
            Poll::Ready(Some(Err(_))) => this
                .pending
                .write(tonic::Code::Internal, "response body failed"),
            Poll::Ready(None) => this
                .pending
                .write(tonic::Code::Unknown, "ended without a status"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn granted(role: Option<Role>) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        if let Some(role) = role {
            request.extensions_mut().insert(Granted(role));
        }
        request
    }

    #[test]
    fn powers_are_decided_by_the_table() {
        // Every power has a row (the match fails to compile when one is added).
        #[allow(clippy::single_element_loop)] // the list grows with the enum
        for power in [Power::RollbackToAnyBackup] {
            match power {
                Power::RollbackToAnyBackup => {}
            }
            assert!(POWERS.iter().any(|(p, _, _)| *p == power), "{power:?}");
        }
        let power = Power::RollbackToAnyBackup;
        assert!(require(&granted(Some(Role::Admin)), power).is_ok());
        for role in [Some(Role::Operator), Some(Role::Reader), None] {
            let e = require(&granted(role), power).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("admin"), "{}", e.message());
        }
    }

    /// Every method in the contract has a rule, so none falls to the default by accident.
    #[test]
    fn every_rpc_in_the_contract_has_a_rule() {
        let fds = prost_types::FileDescriptorSet::decode(covet_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut missing = Vec::new();
        for file in &fds.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    if !RULES.iter().any(|r| r.method == path) {
                        missing.push(path);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "RPCs without a rule: {missing:?}");
    }

    #[test]
    fn unknown_methods_are_admin_only() {
        let rule = rule_for("/covet.agent.v1.Nope/Nope");
        assert_eq!(rule.min_role, Role::Admin);
        assert!(rule.audited);
    }
}
