//! The operation journal: every long-running operation and every event of it,
//! in an embedded store (redb) under `state_dir`, written before the agent
//! acts and after each step ends, so a crash can be resumed or rolled back and
//! a client can resume watching from any sequence number.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

const OPERATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");

#[derive(Debug, thiserror::Error)]
pub enum OpLogError {
    #[error("operation journal {path}: {message}")]
    Store { path: String, message: String },
    #[error("no operation {0}")]
    NotFound(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    BackupCreate,
    BackupVerify,
    BackupRestore,
    BackupPrune,
    Upgrade,
    Rollback,
    /// Short mutating calls, journaled while the call runs.
    UnitAction,
    BackupDelete,
    DaemonReload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Pending,
    Running,
    RollingBack,
    Succeeded,
    Failed,
    RolledBack,
    NeedsHuman,
    Canceled,
}

impl OpState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpState::Succeeded
                | OpState::Failed
                | OpState::RolledBack
                | OpState::NeedsHuman
                | OpState::Canceled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Running,
    Succeeded,
    Failed,
    Skipped,
    /// The agent died while the step ran; it ended when the agent came back.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Caller {
    pub common_name: String,
    pub serial: String,
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub outcome: StepOutcome,
    pub started: SystemTime,
    pub finished: Option<SystemTime>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub id: String,
    pub kind: OpKind,
    pub app: String,
    pub state: OpState,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub finished: Option<SystemTime>,
    pub requested_by: Caller,
    pub cause: String,
    pub needs_human: String,
    pub backup_id: String,
    pub current_step: String,
    pub last_sequence: u64,
    pub params: BTreeMap<String, String>,
    pub steps: Vec<StepRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum EventBody {
    StepStarted {
        step: String,
        description: String,
    },
    StepFinished {
        step: String,
        outcome: StepOutcome,
        detail: String,
    },
    Output {
        step: String,
        stream: OutputStream,
        line: String,
    },
    Progress {
        step: String,
        done: u64,
        total: u64,
        unit: String,
    },
    StateChanged {
        state: OpState,
        cause: String,
    },
    Note {
        text: String,
    },
    /// One metric analysis rule's reading (the baseline, or one interval).
    Analysis(AnalysisEvent),
}

/// An analysis rule's reading as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisEvent {
    pub step: String,
    pub rule: String,
    pub description: String,
    pub baseline: Option<f64>,
    pub value: Option<f64>,
    pub limit: Option<f64>,
    /// "baseline", "ok", "bad N", "failed".
    pub state: String,
    pub missing: String,
    pub failures: u32,
}

impl EventBody {
    /// Events that are fsynced before the agent goes on: a step's start
    /// (written before the step acts) and state changes. The others ride on
    /// the next durable commit (redb makes earlier commits durable with it);
    /// losing a "step finished" in a crash only makes recovery roll back a
    /// step that had in fact finished, which is safe.
    fn is_durable(&self) -> bool {
        matches!(
            self,
            EventBody::StepStarted { .. } | EventBody::StateChanged { .. }
        )
    }

    /// Applies the event to the operation's summary record.
    fn apply(&self, op: &mut OperationRecord, time: SystemTime) {
        match self {
            EventBody::StepStarted { step, .. } => {
                op.current_step = step.clone();
                op.steps.push(StepRecord {
                    name: step.clone(),
                    outcome: StepOutcome::Running,
                    started: time,
                    finished: None,
                    detail: String::new(),
                });
            }
            EventBody::StepFinished {
                step,
                outcome,
                detail,
            } => {
                if let Some(s) = op.steps.iter_mut().rev().find(|s| &s.name == step) {
                    s.outcome = *outcome;
                    s.finished = Some(time);
                    s.detail = detail.clone();
                }
            }
            EventBody::StateChanged { state, cause } => {
                op.state = *state;
                if !cause.is_empty() {
                    op.cause = cause.clone();
                }
                if state.is_final() {
                    op.finished = Some(time);
                }
            }
            EventBody::Output { .. }
            | EventBody::Progress { .. }
            | EventBody::Note { .. }
            | EventBody::Analysis(_) => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub operation_id: String,
    pub sequence: u64,
    pub time: SystemTime,
    pub body: EventBody,
}

/// The journal. Writes are serialized by redb; watchers get live events.
pub struct OpLog {
    db: Database,
    path: String,
    watchers: Mutex<HashMap<String, broadcast::Sender<EventRecord>>>,
}

impl OpLog {
    pub fn open(path: &Path) -> Result<OpLog, OpLogError> {
        let store_err = |e: &dyn std::fmt::Display| OpLogError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        // Operation records name callers and what they did: root's only,
        // whatever the umask, and mended if an older agent left it wider.
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| store_err(&e))?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| store_err(&e))?;
        }
        let db = Database::create(path).map_err(|e| store_err(&e))?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| store_err(&e))?;
        txn.open_table(OPERATIONS).map_err(|e| store_err(&e))?;
        txn.open_table(EVENTS).map_err(|e| store_err(&e))?;
        txn.commit().map_err(|e| store_err(&e))?;
        Ok(OpLog {
            db,
            path: path.display().to_string(),
            watchers: Mutex::new(HashMap::new()),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> OpLogError {
        OpLogError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Records a new operation (durably) before anything is done for it.
    pub fn create(&self, op: &OperationRecord) -> Result<(), OpLogError> {
        let bytes = serde_json::to_vec(op).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(OPERATIONS).map_err(|e| self.err(e))?;
            table
                .insert(op.id.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Appends an event and updates the operation's record in one
    /// transaction; returns the event with its sequence number.
    pub fn append(&self, id: &str, body: EventBody) -> Result<EventRecord, OpLogError> {
        let time = SystemTime::now();
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !body.is_durable() {
            txn.set_durability(Durability::None)
                .map_err(|e| self.err(e))?;
        }
        let event = {
            let mut ops = txn.open_table(OPERATIONS).map_err(|e| self.err(e))?;
            let mut op: OperationRecord = match ops.get(id).map_err(|e| self.err(e))? {
                Some(v) => serde_json::from_slice(v.value()).map_err(|e| self.err(e))?,
                None => return Err(OpLogError::NotFound(id.to_owned())),
            };
            op.last_sequence += 1;
            op.updated = time;
            body.apply(&mut op, time);
            let event = EventRecord {
                operation_id: id.to_owned(),
                sequence: op.last_sequence,
                time,
                body,
            };
            let op_bytes = serde_json::to_vec(&op).map_err(|e| self.err(e))?;
            ops.insert(id, op_bytes.as_slice())
                .map_err(|e| self.err(e))?;
            let ev_bytes = serde_json::to_vec(&event).map_err(|e| self.err(e))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            events
                .insert((id, event.sequence), ev_bytes.as_slice())
                .map_err(|e| self.err(e))?;
            event
        };
        txn.commit().map_err(|e| self.err(e))?;
        self.notify(&event);
        Ok(event)
    }

    /// Changes fields of the record that are not events (backup id, params).
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut OperationRecord),
    ) -> Result<OperationRecord, OpLogError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let op = {
            let mut ops = txn.open_table(OPERATIONS).map_err(|e| self.err(e))?;
            let mut op: OperationRecord = match ops.get(id).map_err(|e| self.err(e))? {
                Some(v) => serde_json::from_slice(v.value()).map_err(|e| self.err(e))?,
                None => return Err(OpLogError::NotFound(id.to_owned())),
            };
            change(&mut op);
            op.updated = SystemTime::now();
            let bytes = serde_json::to_vec(&op).map_err(|e| self.err(e))?;
            ops.insert(id, bytes.as_slice()).map_err(|e| self.err(e))?;
            op
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(op)
    }

    pub fn get(&self, id: &str) -> Result<OperationRecord, OpLogError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let ops = txn.open_table(OPERATIONS).map_err(|e| self.err(e))?;
        match ops.get(id).map_err(|e| self.err(e))? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|e| self.err(e)),
            None => Err(OpLogError::NotFound(id.to_owned())),
        }
    }

    /// Every operation, newest first.
    pub fn list(&self) -> Result<Vec<OperationRecord>, OpLogError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let ops = txn.open_table(OPERATIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in ops.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_slice::<OperationRecord>(v.value()).map_err(|e| self.err(e))?,
            );
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// Events of `id` with sequence >= `from`.
    pub fn events_from(&self, id: &str, from: u64) -> Result<Vec<EventRecord>, OpLogError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in events
            .range((id, from)..=(id, u64::MAX))
            .map_err(|e| self.err(e))?
        {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// Live events of an existing operation from now on. The channel lives
    /// only while someone watches: the last [`Subscription`] dropped removes
    /// it, so watchers cannot make the agent hold channels for ids forever.
    pub fn subscribe(self: &Arc<Self>, id: &str) -> Result<Subscription, OpLogError> {
        // Unknown ids never get a channel.
        self.get(id)?;
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = watchers
            .entry(id.to_owned())
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe();
        Ok(Subscription {
            oplog: Arc::clone(self),
            id: id.to_owned(),
            receiver: Some(receiver),
        })
    }

    /// How many operations have live watchers (for tests of the bound).
    pub fn watched_operations(&self) -> usize {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn notify(&self, event: &EventRecord) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watchers.get(&event.operation_id) {
            let _ = tx.send(event.clone());
            let ended =
                matches!(&event.body, EventBody::StateChanged { state, .. } if state.is_final());
            if ended || tx.receiver_count() == 0 {
                watchers.remove(&event.operation_id);
            }
        }
    }
}

/// A live view of one operation's events; see [`OpLog::subscribe`].
pub struct Subscription {
    oplog: Arc<OpLog>,
    id: String,
    receiver: Option<broadcast::Receiver<EventRecord>>,
}

impl Subscription {
    /// The next live event; `Err` when events were missed (read the journal
    /// from the last sequence seen) or the operation's channel is gone.
    pub async fn recv(&mut self) -> Result<EventRecord, broadcast::error::RecvError> {
        match self.receiver.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watchers = self
            .oplog
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Drop our receiver under the lock so the count below is exact.
        self.receiver = None;
        if watchers
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watchers.remove(&self.id);
        }
    }
}

/// A new operation id: `op-YYYYMMDD-HHMMSS-xxxxxx`, sortable and unique.
pub fn new_id(prefix: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut random = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    format!(
        "{prefix}-{:04}{:02}{:02}-{:02}{:02}{:02}-{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        hex::encode(random)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str) -> OperationRecord {
        let now = SystemTime::now();
        OperationRecord {
            id: id.into(),
            kind: OpKind::BackupCreate,
            app: "covet".into(),
            state: OpState::Pending,
            created: now,
            updated: now,
            finished: None,
            requested_by: Caller::default(),
            cause: String::new(),
            needs_human: String::new(),
            backup_id: String::new(),
            current_step: String::new(),
            last_sequence: 0,
            params: BTreeMap::new(),
            steps: Vec::new(),
        }
    }

    #[test]
    fn events_are_sequenced_applied_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        {
            let j = OpLog::open(&path).unwrap();
            j.create(&op("op-1")).unwrap();
            j.create(&op("op-2")).unwrap();
            let e = j
                .append(
                    "op-1",
                    EventBody::StepStarted {
                        step: "backup".into(),
                        description: String::new(),
                    },
                )
                .unwrap();
            assert_eq!(e.sequence, 1);
            j.append(
                "op-1",
                EventBody::Progress {
                    step: "backup".into(),
                    done: 5,
                    total: 10,
                    unit: "bytes".into(),
                },
            )
            .unwrap();
            j.append(
                "op-2",
                EventBody::Note {
                    text: "other".into(),
                },
            )
            .unwrap();
            j.append(
                "op-1",
                EventBody::StepFinished {
                    step: "backup".into(),
                    outcome: StepOutcome::Succeeded,
                    detail: "ok".into(),
                },
            )
            .unwrap();
            j.append(
                "op-1",
                EventBody::StateChanged {
                    state: OpState::Succeeded,
                    cause: String::new(),
                },
            )
            .unwrap();
        }
        let j = OpLog::open(&path).unwrap();
        let rec = j.get("op-1").unwrap();
        assert_eq!(rec.state, OpState::Succeeded);
        assert_eq!(rec.last_sequence, 4);
        assert!(rec.finished.is_some());
        assert_eq!(rec.steps[0].outcome, StepOutcome::Succeeded);
        let seqs: Vec<u64> = j
            .events_from("op-1", 2)
            .unwrap()
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(j.events_from("op-2", 0).unwrap().len(), 1);
        assert!(matches!(j.get("nope"), Err(OpLogError::NotFound(_))));
        assert_eq!(j.list().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn watchers_see_live_events() {
        let dir = tempfile::tempdir().unwrap();
        let j = OpLog::open(&dir.path().join("j.redb")).unwrap();
        j.create(&op("op-1")).unwrap();
        let j = Arc::new(j);
        let mut rx = j.subscribe("op-1").unwrap();
        j.append("op-1", EventBody::Note { text: "hi".into() })
            .unwrap();
        assert_eq!(rx.recv().await.unwrap().sequence, 1);
    }

    #[test]
    fn channels_live_only_while_watched_and_only_for_known_ids() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(OpLog::open(&dir.path().join("j.redb")).unwrap());
        j.create(&op("op-1")).unwrap();
        assert!(matches!(
            j.subscribe("op-made-up"),
            Err(OpLogError::NotFound(_))
        ));
        assert_eq!(j.watched_operations(), 0);
        let a = j.subscribe("op-1").unwrap();
        let b = j.subscribe("op-1").unwrap();
        assert_eq!(j.watched_operations(), 1);
        drop(a);
        assert_eq!(j.watched_operations(), 1);
        drop(b);
        assert_eq!(j.watched_operations(), 0);
    }
}
