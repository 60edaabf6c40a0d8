//! The audit log: one JSON line per call that changes anything and per
//! refusal, appended to `state_dir/audit.log` and mirrored to tracing.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::edge::identity::{PeerIdentity, Role};

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
    /// The identity an unverified certificate claims (refused handshakes):
    /// never to be read as who the caller is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed: Option<Claimed>,
    /// How many events this record stands for (aggregated refusals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// What a refused certificate says about itself, unverified.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Claimed {
    pub cn: String,
    pub serial: String,
    pub role: Option<Role>,
    pub verified: bool,
}

impl Claimed {
    pub fn from_identity(id: &PeerIdentity) -> Claimed {
        Claimed {
            cn: id.common_name.clone(),
            serial: id.serial.clone(),
            role: id.role,
            verified: false,
        }
    }
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
            claimed: None,
            count: None,
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

    pub fn claimed(mut self, claimed: Option<Claimed>) -> Self {
        self.claimed = claimed;
        self
    }

    pub fn count(mut self, count: u64) -> Self {
        self.count = Some(count);
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
    /// Opens (creating, mode 0600, never through a link) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = crate::files::private::open_append(path)?;
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
            target: "covet_agent::edge::audit",
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

/// Refused handshakes, aggregated per source address and kind (reason and
/// claimed serial): the first refusal of a kind is written at once, the ones
/// after it within the interval become one summary record with a count, so
/// a flood costs a few lines.
#[derive(Clone)]
pub struct RefusalAudit {
    log: AuditLog,
    sources: Arc<Mutex<HashMap<RefusalKey, Suppressed>>>,
}

/// Past this many kinds from one source in an interval, its refusals are
/// counted together whatever their kind (certificates are cheap to vary).
const KINDS_PER_SOURCE: usize = 16;

/// A source and, unless it varied too much, the kind of refusal.
type RefusalKey = (IpAddr, Option<(Option<String>, Option<String>)>);

/// Refusals of one source not yet written.
#[derive(Default)]
struct Suppressed {
    count: u64,
    last: Option<AuditRecord>,
}

impl RefusalAudit {
    pub fn new(log: AuditLog) -> RefusalAudit {
        RefusalAudit {
            log,
            sources: Arc::default(),
        }
    }

    /// Records one refusal (its record carries the peer address).
    pub fn refused(&self, record: AuditRecord) {
        let Some(ip) = record.peer.map(|p| p.ip()) else {
            self.log.record(&record);
            return;
        };
        let kind = (
            record.message.clone(),
            record.claimed.as_ref().map(|c| c.serial.clone()),
        );
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (ip, Some(kind));
        if !sources.contains_key(&key)
            && sources.keys().filter(|(i, _)| *i == ip).count() >= KINDS_PER_SOURCE
        {
            key = (ip, None);
        }
        match sources.get_mut(&key) {
            Some(pending) => {
                pending.count += 1;
                pending.last = Some(record);
            }
            None => {
                sources.insert(key, Suppressed::default());
                drop(sources);
                self.log.record(&record.count(1));
            }
        }
    }

    /// Ends the interval: writes one summary per source that was refused
    /// again, and forgets quiet sources so their next refusal is written
    /// at once.
    pub fn flush(&self) {
        let summaries: Vec<AuditRecord> = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            sources.retain(|_, s| s.count > 0);
            sources
                .values_mut()
                .filter_map(|s| {
                    let count = std::mem::take(&mut s.count);
                    s.last.take().map(|r| {
                        let mut r = r.count(count);
                        r.time = now_rfc3339();
                        r.message = Some(format!(
                            "{count} more refused handshake(s) from this source; last: {}",
                            r.message.as_deref().unwrap_or("refused")
                        ));
                        r
                    })
                })
                .collect()
        };
        for record in &summaries {
            self.log.record(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn repeated_refusals_are_one_record_then_a_summary_per_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let refusals = RefusalAudit::new(AuditLog::open(&path).unwrap());
        let refuse = |ip: [u8; 4]| {
            refusals.refused(
                AuditRecord::new("tls-handshake", "refused")
                    .peer(Some(SocketAddr::from((ip, 4000))))
                    .message("no client certificate presented"),
            )
        };
        for _ in 0..100 {
            refuse([127, 0, 0, 2]);
        }
        // Another kind from the same source is written at once.
        refusals.refused(
            AuditRecord::new("tls-handshake", "refused")
                .peer(Some(SocketAddr::from(([127, 0, 0, 2], 4001))))
                .message("certificate has expired"),
        );
        refuse([127, 0, 0, 3]);
        assert_eq!(
            records(&path).len(),
            3,
            "first refusal of each kind, at once"
        );
        refusals.flush();
        let all = records(&path);
        assert_eq!(all.len(), 4);
        let total: u64 = all.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        assert_eq!(total, 102);
        assert!(all[3]["message"].as_str().unwrap().starts_with("99 more"));
        // A quiet interval: nothing written; the source is forgotten after it.
        refusals.flush();
        refusals.flush();
        refuse([127, 0, 0, 2]);
        assert_eq!(records(&path).len(), 5);
    }

    #[test]
    fn a_source_varying_its_refusals_is_still_aggregated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let refusals = RefusalAudit::new(AuditLog::open(&path).unwrap());
        for n in 0..1000 {
            refusals.refused(
                AuditRecord::new("tls-handshake", "refused")
                    .peer(Some(SocketAddr::from(([127, 0, 0, 2], 4000))))
                    .message(format!("certificate refused: variant {n}")),
            );
        }
        refusals.flush();
        let all = records(&path);
        assert_eq!(all.len(), KINDS_PER_SOURCE + 2);
        let total: u64 = all.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn claimed_identities_are_marked_unverified() {
        let record = AuditRecord::new("tls-handshake", "refused").claimed(Some(Claimed {
            cn: "mallory".into(),
            serial: "01".into(),
            role: Some(Role::Admin),
            verified: false,
        }));
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["claimed"]["verified"], false);
        assert!(json["caller_cn"].is_null() && json["role"].is_null());
        assert!(json.get("count").is_none());
    }
}
