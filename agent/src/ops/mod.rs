//! Running long operations: one mutating operation per app at a time (the
//! app's lock), journaled before it acts, cancellable, and independent of the
//! client that asked for it. `log` is the operation log they are journaled in.

pub mod log;
pub(crate) mod watch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::ops::log::{
    Caller, EventBody, OpKind, OpLog, OpLogError, OpState, OperationRecord, OutputStream,
    StepOutcome,
};

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("operation {id} is already over ({state:?})")]
    Over { id: String, state: OpState },
    #[error("operation {0} is not running in this agent")]
    NotRunningHere(String),
    #[error(transparent)]
    OpLog(#[from] OpLogError),
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("app {app} is busy: operation {holder} holds its lock; wait for it or cancel it")]
    Locked { app: String, holder: String },
    #[error(transparent)]
    OpLog(#[from] OpLogError),
}

/// How an operation's work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
    RolledBack(String),
    NeedsHuman { cause: String, what_is_left: String },
    Canceled(String),
}

/// Which operation holds which app.
#[derive(Default)]
struct AppLocks {
    held: Mutex<HashMap<String, String>>,
}

impl AppLocks {
    fn take(&self, app: &str, op: &str) -> Result<(), OpError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = held.get(app) {
            return Err(OpError::Locked {
                app: app.to_owned(),
                holder: holder.clone(),
            });
        }
        held.insert(app.to_owned(), op.to_owned());
        Ok(())
    }

    fn release(&self, app: &str, op: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(app).is_some_and(|h| h == op) {
            held.remove(app);
        }
    }
}

/// Releases the app's lock however the operation's task ends (panics too).
struct LockGuard {
    ops: Arc<Inner>,
    app: String,
    id: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.ops.locks.release(&self.app, &self.id);
        self.ops
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

struct Inner {
    oplog: Arc<OpLog>,
    locks: AppLocks,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// The operations of this agent.
#[derive(Clone)]
pub struct Operations {
    inner: Arc<Inner>,
}

/// What a new operation is.
pub struct OpSpec {
    pub kind: OpKind,
    pub app: String,
    pub caller: Caller,
    pub params: BTreeMap<String, String>,
    /// Take the app's lock (every operation that changes the app does).
    pub exclusive: bool,
}

impl Operations {
    pub fn new(oplog: Arc<OpLog>) -> Operations {
        Operations {
            inner: Arc::new(Inner {
                oplog,
                locks: AppLocks::default(),
                cancels: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn oplog(&self) -> &Arc<OpLog> {
        &self.inner.oplog
    }

    /// Journals a new operation, takes the app's lock, and runs `work` in the
    /// background. Returns the record as accepted.
    pub fn start<F, Fut>(&self, spec: OpSpec, work: F) -> Result<OperationRecord, OpError>
    where
        F: FnOnce(OpContext) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let prefix = match spec.kind {
            OpKind::Upgrade => "up",
            OpKind::Rollback => "rb",
            _ => "bk",
        };
        let id = crate::ops::log::new_id(prefix);
        if spec.exclusive {
            self.inner.locks.take(&spec.app, &id)?;
        }
        let guard = LockGuard {
            ops: self.inner.clone(),
            app: if spec.exclusive {
                spec.app.clone()
            } else {
                String::new()
            },
            id: id.clone(),
        };
        let record = new_record(&id, spec);
        self.inner.oplog.create(&record)?;
        let cancel = Arc::new(AtomicBool::new(false));
        self.inner
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), cancel.clone());
        let ctx = OpContext::new(id.clone(), self.inner.oplog.clone(), cancel);
        ctx.state(OpState::Running, "");
        let runner = ctx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let outcome = work(runner.clone()).await;
            runner.finish(outcome);
        });
        Ok(record)
    }

    /// Journals a short mutating call that runs inline (its RPC waits for
    /// it): takes the lock named `spec.app`, records the operation, and
    /// returns a guard to report through and to finish. A guard dropped
    /// unfinished (the client went away mid-call) ends the operation Failed.
    pub fn begin_inline(&self, spec: OpSpec) -> Result<InlineOp, OpError> {
        let id = crate::ops::log::new_id("op");
        self.inner.locks.take(&spec.app, &id)?;
        let guard = LockGuard {
            ops: self.inner.clone(),
            app: spec.app.clone(),
            id: id.clone(),
        };
        let record = new_record(&id, spec);
        self.inner.oplog.create(&record)?;
        let ctx = OpContext::new(
            id,
            self.inner.oplog.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        ctx.state(OpState::Running, "");
        Ok(InlineOp {
            ctx,
            _guard: guard,
            finished: false,
        })
    }

    /// Takes over an operation the journal shows unfinished (the agent died
    /// while it ran): re-takes the app's lock and runs `work` under the same id.
    pub fn resume<F, Fut>(&self, op: &OperationRecord, work: F) -> Result<(), OpError>
    where
        F: FnOnce(OpContext) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.inner.locks.take(&op.app, &op.id)?;
        let guard = LockGuard {
            ops: self.inner.clone(),
            app: op.app.clone(),
            id: op.id.clone(),
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.inner
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(op.id.clone(), cancel.clone());
        let ctx = OpContext::new(op.id.clone(), self.inner.oplog.clone(), cancel);
        tokio::spawn(async move {
            let _guard = guard;
            let outcome = work(ctx.clone()).await;
            ctx.finish(outcome);
        });
        Ok(())
    }

    /// Asks a running operation to stop. Returns false when it is not running here.
    pub fn cancel(&self, id: &str) -> bool {
        let cancels = self.inner.cancels.lock().unwrap_or_else(|p| p.into_inner());
        match cancels.get(id) {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Asks operation `id` to stop and returns its record as it is now;
    /// refused when it is over or runs in no task of this agent.
    pub fn cancel_running(&self, id: &str) -> Result<OperationRecord, CancelError> {
        let op = self.inner.oplog.get(id)?;
        if op.state.is_final() {
            return Err(CancelError::Over {
                id: id.to_owned(),
                state: op.state,
            });
        }
        if !self.cancel(id) {
            return Err(CancelError::NotRunningHere(id.to_owned()));
        }
        Ok(self.inner.oplog.get(id)?)
    }

    /// Operations the journal shows as unfinished: the agent died while they
    /// ran. Each is ended as failed with an explanation, unless `resume`
    /// takes it over (upgrades roll back; see the workflow).
    /// Their steps that were running when the agent died are ended first
    /// as interrupted, so no record shows a step running forever.
    pub fn recover_unfinished(&self) -> Result<Vec<OperationRecord>, OpLogError> {
        let oplog = &self.inner.oplog;
        let mut unfinished = Vec::new();
        for op in oplog.list()? {
            if op.state.is_final() {
                continue;
            }
            let mut running: Vec<&str> = op
                .steps
                .iter()
                .filter(|s| s.outcome == StepOutcome::Running)
                .map(|s| s.name.as_str())
                .collect();
            running.dedup();
            for step in running {
                oplog.append(
                    &op.id,
                    EventBody::StepFinished {
                        step: step.to_owned(),
                        outcome: StepOutcome::Interrupted,
                        detail: "interrupted: the agent stopped while this step ran".into(),
                    },
                )?;
            }
            unfinished.push(oplog.get(&op.id)?);
        }
        Ok(unfinished)
    }

    /// The app's lock holder, if any.
    pub fn holder(&self, app: &str) -> Option<String> {
        self.inner
            .locks
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .cloned()
    }

    /// Refuses early, as taking the lock would, when an operation holds
    /// `app`: checks that come before the lock is taken (a backup's space
    /// estimate, an upgrade's preflight) are not run for a busy app.
    pub fn ensure_free(&self, app: &str) -> Result<(), OpError> {
        match self.holder(app) {
            Some(holder) => Err(OpError::Locked {
                app: app.to_owned(),
                holder,
            }),
            None => Ok(()),
        }
    }
}

/// The journal record of a new operation, before it starts.
fn new_record(id: &str, spec: OpSpec) -> OperationRecord {
    let now = SystemTime::now();
    OperationRecord {
        id: id.to_owned(),
        kind: spec.kind,
        app: spec.app,
        state: OpState::Pending,
        created: now,
        updated: now,
        finished: None,
        requested_by: spec.caller,
        cause: String::new(),
        needs_human: String::new(),
        backup_id: String::new(),
        current_step: String::new(),
        last_sequence: 0,
        params: spec.params,
        steps: Vec::new(),
    }
}

/// A short operation run inline by its RPC; see [`Operations::begin_inline`].
pub struct InlineOp {
    ctx: OpContext,
    _guard: LockGuard,
    finished: bool,
}

impl InlineOp {
    pub fn ctx(&self) -> &OpContext {
        &self.ctx
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.ctx.finish(outcome);
    }
}

impl Drop for InlineOp {
    fn drop(&mut self) {
        if !self.finished {
            self.ctx.finish(Outcome::Failed(
                "the call was abandoned before it ended".into(),
            ));
        }
    }
}

/// What an operation's work uses to report and to notice cancellation.
#[derive(Clone)]
pub struct OpContext {
    pub id: String,
    oplog: Arc<OpLog>,
    cancel: Arc<AtomicBool>,
    last_progress: Arc<Mutex<Option<(String, Instant)>>>,
    waited: Arc<Mutex<Waits>>,
}

/// Time spent waiting on something outside the agent, counted once however
/// the waits nest or overlap (a backup that waits on pg_dump inside the
/// upgrade's wait on the backup; an archive and a dump side by side).
#[derive(Debug, Default)]
struct Waits {
    open: usize,
    since: Option<Instant>,
    total: Duration,
}

impl Waits {
    fn begin(&mut self) {
        if self.open == 0 {
            self.since = Some(Instant::now());
        }
        self.open += 1;
    }

    fn end(&mut self) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0
            && let Some(since) = self.since.take()
        {
            self.total += since.elapsed();
        }
    }

    fn total(&self) -> Duration {
        self.total + self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// Ends a wait however its future ends (dropped too).
struct WaitGuard<'a>(&'a Mutex<Waits>);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).end();
    }
}

/// Progress events are throttled to this interval per step.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl OpContext {
    fn new(id: String, oplog: Arc<OpLog>, cancel: Arc<AtomicBool>) -> OpContext {
        OpContext {
            id,
            oplog,
            cancel,
            last_progress: Arc::new(Mutex::new(None)),
            waited: Arc::new(Mutex::new(Waits::default())),
        }
    }

    fn append(&self, body: EventBody) {
        // A journal write that fails must not go unnoticed, but the work's own
        // outcome is still reported by the caller; log loudly.
        if let Err(e) = self.oplog.append(&self.id, body) {
            tracing::error!(op = %self.id, "cannot journal event: {e}");
        }
    }

    /// Runs `f`, counting its time as waiting on something outside the agent
    /// (a program, systemd, the app): the rest is the agent's own overhead.
    pub async fn waiting<T>(&self, f: impl Future<Output = T>) -> T {
        self.waited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin();
        let _end = WaitGuard(&self.waited);
        f.await
    }

    /// Wall time during which at least one [`OpContext::waiting`] ran.
    pub fn waited(&self) -> Duration {
        self.waited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total()
    }

    /// The operation's record as journaled now.
    pub fn record(&self) -> Option<OperationRecord> {
        self.oplog.get(&self.id).ok()
    }

    pub fn canceled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Sleeps `d`, or less when the operation is canceled meanwhile: a
    /// cancel is a rollback decision, and users wait for it.
    pub async fn pause(&self, d: std::time::Duration) {
        const EVERY: std::time::Duration = std::time::Duration::from_millis(20);
        let until = tokio::time::Instant::now() + d;
        while !self.canceled() {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(EVERY)).await;
        }
    }

    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    pub fn step_started(&self, step: &str, description: impl Into<String>) {
        self.append(EventBody::StepStarted {
            step: step.to_owned(),
            description: description.into(),
        });
    }

    pub fn step_finished(&self, step: &str, outcome: StepOutcome, detail: impl Into<String>) {
        self.append(EventBody::StepFinished {
            step: step.to_owned(),
            outcome,
            detail: detail.into(),
        });
    }

    /// Journals an analysis rule's reading.
    pub fn analysis(&self, reading: crate::ops::log::AnalysisEvent) {
        self.append(EventBody::Analysis(reading));
    }

    pub fn note(&self, text: impl Into<String>) {
        self.append(EventBody::Note { text: text.into() });
    }

    pub fn output(&self, step: &str, stream: OutputStream, line: impl Into<String>) {
        self.append(EventBody::Output {
            step: step.to_owned(),
            stream,
            line: line.into(),
        });
    }

    /// Reports progress, at most every 250 ms per step (and always at the end).
    pub fn progress(&self, step: &str, done: u64, total: u64, unit: &str) {
        {
            let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let due = match last.as_ref() {
                Some((s, at)) if s == step => now.duration_since(*at) >= PROGRESS_EVERY,
                _ => true,
            };
            if !due && done < total {
                return;
            }
            *last = Some((step.to_owned(), now));
        }
        self.append(EventBody::Progress {
            step: step.to_owned(),
            done,
            total,
            unit: unit.to_owned(),
        });
    }

    pub fn state(&self, state: OpState, cause: &str) {
        self.append(EventBody::StateChanged {
            state,
            cause: cause.to_owned(),
        });
    }

    pub fn update(&self, change: impl FnOnce(&mut OperationRecord)) {
        if let Err(e) = self.oplog.update(&self.id, change) {
            tracing::error!(op = %self.id, "cannot update operation record: {e}");
        }
    }

    fn finish(&self, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded => self.state(OpState::Succeeded, ""),
            Outcome::Failed(cause) => self.state(OpState::Failed, &cause),
            Outcome::RolledBack(cause) => self.state(OpState::RolledBack, &cause),
            Outcome::Canceled(cause) => self.state(OpState::Canceled, &cause),
            Outcome::NeedsHuman {
                cause,
                what_is_left,
            } => {
                self.update(|op| op.needs_human = what_is_left);
                self.state(OpState::NeedsHuman, &cause);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_overlapping_waits_count_once() {
        let mut w = Waits::default();
        w.begin();
        std::thread::sleep(Duration::from_millis(30));
        w.begin(); // nested or side by side: the same wall time
        std::thread::sleep(Duration::from_millis(30));
        w.end();
        w.end();
        let once = w.total();
        assert!(once >= Duration::from_millis(60), "{once:?}");
        assert!(once < Duration::from_millis(90), "{once:?}");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(w.total(), once, "no time counts between waits");
        w.end(); // an extra end changes nothing
        assert_eq!(w.total(), once);
    }

    #[test]
    fn a_busy_app_is_refused_as_its_lock_would_refuse() {
        let tmp = tempfile::tempdir().unwrap();
        let ops = Operations::new(Arc::new(OpLog::open(&tmp.path().join("ops.redb")).unwrap()));
        assert!(ops.ensure_free("covet").is_ok());
        let spec = || OpSpec {
            kind: OpKind::UnitAction,
            app: "covet".into(),
            caller: Caller::default(),
            params: BTreeMap::new(),
            exclusive: true,
        };
        let held = ops.begin_inline(spec()).unwrap();
        let early = ops.ensure_free("covet").unwrap_err();
        let Err(late) = ops.begin_inline(spec()) else {
            panic!("the lock was taken twice");
        };
        assert_eq!(early.to_string(), late.to_string());
        assert!(
            early
                .to_string()
                .ends_with("holds its lock; wait for it or cancel it"),
            "{early}"
        );
        assert!(ops.ensure_free("other").is_ok());
        held.finish(Outcome::Succeeded);
        assert!(ops.ensure_free("covet").is_ok());
    }

    #[tokio::test]
    async fn only_a_running_operation_of_this_agent_is_canceled() {
        let tmp = tempfile::tempdir().unwrap();
        let ops = Operations::new(Arc::new(OpLog::open(&tmp.path().join("ops.redb")).unwrap()));
        let spec = |app: &str| OpSpec {
            kind: OpKind::BackupCreate,
            app: app.into(),
            caller: Caller::default(),
            params: BTreeMap::new(),
            exclusive: true,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = ops
            .start(spec("covet"), move |ctx| async move {
                let _ = rx.await;
                if ctx.canceled() {
                    Outcome::Canceled("asked".into())
                } else {
                    Outcome::Succeeded
                }
            })
            .unwrap();
        let now = ops.cancel_running(&running.id).unwrap();
        assert_eq!(now.id, running.id);
        tx.send(()).unwrap();
        let inline = ops.begin_inline(spec("shop")).unwrap();
        let id = inline.ctx().id.clone();
        assert!(matches!(
            ops.cancel_running(&id),
            Err(CancelError::NotRunningHere(_))
        ));
        inline.finish(Outcome::Succeeded);
        let over = ops.cancel_running(&id).unwrap_err();
        assert!(
            over.to_string()
                .starts_with(&format!("operation {id} is already over")),
            "{over}"
        );
        assert!(matches!(
            ops.cancel_running("op-none"),
            Err(CancelError::OpLog(OpLogError::NotFound(_)))
        ));
    }
}
