//! The audit log: one JSON line per call that changes anything and per
//! refusal, appended to `state_dir/audit.log` and mirrored to tracing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::identity::{PeerIdentity, Role};

/// One audited event.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub peer: Option<SocketAddr>,
    pub caller_cn: Option<String>,
    pub caller_serial: Option<String>,
    pub role: Option<Role>,
    /// Full gRPC method, e.g. `/covet.agent.v1.UnitService/RestartUnit`, or
    /// `tls-handshake` for refused connections.
    pub rpc: String,
    /// What the call acted on, e.g. `app=covet` or `unit=covet.service`.
    pub target: Option<String>,
    /// `ok`, `denied`, `refused`, or the gRPC code name of the failure.
    pub outcome: String,
    pub message: Option<String>,
}

impl AuditRecord {
    pub fn new(rpc: impl Into<String>, outcome: impl Into<String>) -> AuditRecord {
        AuditRecord {
            time: now_rfc3339(),
            peer: None,
            caller_cn: None,
            caller_serial: None,
            role: None,
            rpc: rpc.into(),
            target: None,
            outcome: outcome.into(),
            message: None,
        }
    }

    pub fn caller(mut self, identity: Option<&PeerIdentity>) -> Self {
        if let Some(id) = identity {
            self.caller_cn = Some(id.common_name.clone());
            self.caller_serial = Some(id.serial.clone());
            self.role = id.role;
        }
        self
    }

    pub fn peer(mut self, peer: Option<SocketAddr>) -> Self {
        self.peer = peer;
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn target(mut self, target: Option<String>) -> Self {
        self.target = target;
        self
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Append-only audit log, shared by the TLS acceptor and the audit layer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                file: Mutex::new(file),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes the record. An audit log that cannot be written is reported
    /// loudly but does not take the agent down.
    pub fn record(&self, record: &AuditRecord) {
        tracing::info!(
            target: "covet_agent::audit",
            rpc = %record.rpc,
            outcome = %record.outcome,
            caller = record.caller_cn.as_deref().unwrap_or("-"),
            serial = record.caller_serial.as_deref().unwrap_or("-"),
            target_ = record.target.as_deref().unwrap_or("-"),
            message = record.message.as_deref().unwrap_or(""),
            "audit"
        );
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode audit record: {e}");
                return;
            }
        };
        line.push(b'\n');
        // One write of a whole line on an O_APPEND file keeps lines intact.
        let mut file = self.inner.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!(path = %self.inner.path.display(), "cannot write audit log: {e}");
        }
    }
}

/// The target of the current call, filled in by the api layer (which knows
/// what the request names) and read by the audit layer when the call ends.
#[derive(Clone, Default)]
pub struct AuditTarget(Arc<Mutex<Option<String>>>);

impl AuditTarget {
    pub fn set(&self, target: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(target.into());
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Records what a call targets, for the audit log.
pub fn set_target<T>(request: &tonic::Request<T>, target: impl Into<String>) {
    if let Some(t) = request.extensions().get::<AuditTarget>() {
        t.set(target);
    }
}
