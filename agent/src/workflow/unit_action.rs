//! A manual start, stop, restart or reload of a declared unit as a one-step
//! journaled operation, under the lock of the app the unit belongs to, so a
//! manual restart never lands in the middle of an upgrade.

use std::time::{Duration, SystemTime};

use crate::host::journald::{JournalReader, LogError, LogLine};
use crate::host::systemd::{ControlledUnit, Systemd, SystemdError, UnitAction, UnitState};
use crate::ops::log::{Caller, OpKind, StepOutcome};
use crate::ops::{OpError, OpSpec, Operations, Outcome};

/// What to do to which unit, and how patiently.
#[derive(Debug, Clone)]
pub struct UnitActionSpec {
    pub action: UnitAction,
    pub unit: ControlledUnit,
    /// How long systemd's job may take.
    pub timeout: Duration,
    /// Journal lines returned when the unit is not active afterwards.
    pub journal_lines: u32,
    /// The lock the action is journaled under.
    pub lock: String,
    /// After a start or restart, how long the unit must stay up.
    pub settle: Duration,
}

/// How the action went: the job, the unit's state after it, and the
/// unit's latest journal lines if it is not active.
#[derive(Debug, Clone)]
pub struct UnitActionReport {
    pub job_result: String,
    pub took: Duration,
    pub status: UnitState,
    pub journal_tail: Vec<LogLine>,
}

#[derive(Debug, thiserror::Error)]
pub enum UnitActionError {
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Runs `spec`, journaled as a UnitAction operation requested by `caller`.
/// The operation succeeds when the job is done and the unit is in the
/// state asked for (stopped for a stop, active otherwise).
pub async fn run_unit_action(
    ops: &Operations,
    systemd: &Systemd,
    journald: &JournalReader,
    caller: Caller,
    spec: UnitActionSpec,
) -> Result<UnitActionReport, UnitActionError> {
    let UnitActionSpec {
        action,
        unit,
        timeout,
        journal_lines,
        lock,
        settle,
    } = spec;
    let op = ops.begin_inline(OpSpec {
        kind: OpKind::UnitAction,
        app: lock,
        caller,
        params: [
            ("unit".to_owned(), unit.as_str().to_owned()),
            ("action".to_owned(), action.as_str().to_owned()),
        ]
        .into(),
        exclusive: true,
    })?;
    op.ctx().step_started(action.as_str(), unit.as_str());
    let started = SystemTime::now();
    let job = match systemd.act(action, &unit, timeout).await {
        Ok(job) => job,
        Err(e) => {
            op.ctx()
                .step_finished(action.as_str(), StepOutcome::Failed, e.to_string());
            op.finish(Outcome::Failed(e.to_string()));
            return Err(e.into());
        }
    };
    let mut status = systemd.status(&unit).await?;
    if matches!(action, UnitAction::Start | UnitAction::Restart) && job.result == "done" {
        status = settled(systemd, &unit, status, settle).await?;
    }
    let journal_tail = if status.is_active() {
        Vec::new()
    } else {
        // Lines from this attempt first; older context if there are none.
        let since = started.checked_sub(Duration::from_secs(1));
        journald.tail(unit.as_str(), journal_lines, since).await?
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
    Ok(UnitActionReport {
        job_result: job.result,
        took: job.took,
        status,
        journal_tail,
    })
}

/// Watches a just-started unit for the settle window: a simple service
/// is "started" once forked, and may die right after.
async fn settled(
    systemd: &Systemd,
    unit: &ControlledUnit,
    mut status: UnitState,
    settle: Duration,
) -> Result<UnitState, SystemdError> {
    let deadline = tokio::time::Instant::now() + settle;
    while tokio::time::Instant::now() < deadline && status.is_active() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = systemd.status(unit).await?;
    }
    Ok(status)
}
