//! Starting the unit and deciding it runs: no fixed wait. The health gate
//! probes every 25 ms while the app starts (an app that listens after
//! 200 ms passes after about 200 ms) and fails at once when the unit leaves
//! `active`; an app without a health probe is watched for `[systemd]
//! settle` instead.

use std::time::{Duration, Instant};

use super::{Deps, StepError};
use crate::config::{AppConfig, ProbeConfig};
use crate::host::systemd::{ControlledUnit, UnitAction};
use crate::ops::OpContext;
use crate::probes::{self, ProbeOutcome};

/// How often the unit's state is read while it must stay active.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);
/// How often the health gate probes while the app is starting: a refused
/// connection costs nothing, and every pause is time the app is down.
const STARTING_EVERY: Duration = Duration::from_millis(25);
/// How long the gate probes at that pace before it falls back to the
/// probe's own interval.
const STARTING_FOR: Duration = Duration::from_secs(3);

/// Runs `action` (start or restart) on the unit and checks that it is active.
async fn act_and_check(
    deps: &Deps,
    ctx: &OpContext,
    unit: &ControlledUnit,
    action: UnitAction,
) -> Result<String, StepError> {
    let job = ctx
        .waiting(
            deps.systemd
                .act(action, unit, deps.config.systemd.job_timeout),
        )
        .await?;
    if job.result != "done" {
        return Err(StepError::Job {
            action: action.as_str(),
            unit: unit.as_str().to_owned(),
            result: job.result,
        });
    }
    let state = deps.systemd.status(unit).await?;
    if !state.is_active() {
        return Err(not_active(unit, &state, "right after its start"));
    }
    Ok(format!("running as pid {}", state.main_pid))
}

/// Starts or restarts the unit and checks it is active; an app without a
/// health probe must then stay active for `[systemd] settle` (with one,
/// the health gate follows the unit instead).
pub async fn start(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    unit: &ControlledUnit,
    action: UnitAction,
) -> Result<String, StepError> {
    let detail = act_and_check(deps, ctx, unit, action).await?;
    if app.health.is_none() {
        settle(deps, ctx, unit).await?;
    }
    Ok(detail)
}

/// [`health_gate`] that must pass: Ok with the attempts it took.
pub async fn healthy(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    unit: &ControlledUnit,
    cfg: &ProbeConfig,
    on_cancel: OnCancel,
) -> Result<u32, StepError> {
    let o = health_gate(deps, ctx, app, unit, cfg, on_cancel).await?;
    if o.ok {
        Ok(o.attempts)
    } else {
        Err(StepError::Unhealthy {
            target: o.target,
            attempts: o.attempts,
            error: o.error,
        })
    }
}

/// The unit stays active for `[systemd] settle`: for apps that declare no
/// health probe, the only sign that they run.
async fn settle(deps: &Deps, ctx: &OpContext, unit: &ControlledUnit) -> Result<(), StepError> {
    let until = Instant::now() + deps.config.systemd.settle;
    ctx.waiting(async {
        tokio::select! {
            left = left_active(deps, unit, "while it settled") => Err(left),
            () = tokio::time::sleep_until(until.into()) => Ok(()),
        }
    })
    .await
}

/// Whether a cancel ends the health gate early: an upgrade's yes, a
/// rollback's no (a rollback is what a cancel asks for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCancel {
    Stop,
    Continue,
}

/// Probes `cfg` until it passes (Ok with the passing outcome) or its
/// attempts run out (Ok with the failing one); fails at once when the unit
/// leaves `active` meanwhile. The attempts span the probe's configured
/// `retries × interval`, but during the first seconds they come every 25 ms.
async fn health_gate(
    deps: &Deps,
    ctx: &OpContext,
    app: &AppConfig,
    unit: &ControlledUnit,
    cfg: &ProbeConfig,
    on_cancel: OnCancel,
) -> Result<ProbeOutcome, StepError> {
    let probing = async {
        let once = ProbeConfig {
            retries: 0,
            ..cfg.clone()
        };
        let started = Instant::now();
        let until = started + cfg.interval.saturating_mul(cfg.retries);
        let mut attempts = 0;
        loop {
            let mut outcome =
                probes::probe_declared(&deps.probe_policy, &once.spec(&app.name, "health")?)
                    .await?;
            attempts += 1;
            outcome.attempts = attempts;
            let now = Instant::now();
            if outcome.ok || now >= until || (on_cancel == OnCancel::Stop && ctx.canceled()) {
                return Ok::<_, StepError>(outcome);
            }
            let pause = if now - started < STARTING_FOR {
                STARTING_EVERY.min(cfg.interval)
            } else {
                cfg.interval
            };
            tokio::time::sleep(pause.min(until - now)).await;
        }
    };
    ctx.waiting(async {
        tokio::select! {
            outcome = probing => outcome,
            left = left_active(deps, unit, "while its health was checked") => Err(left),
        }
    })
    .await
}

/// Resolves when the unit is no longer active (or cannot be read), with why.
async fn left_active(deps: &Deps, unit: &ControlledUnit, when: &'static str) -> StepError {
    loop {
        match deps.systemd.status(unit).await {
            Ok(state) if state.is_active() => tokio::time::sleep(FOLLOW_EVERY).await,
            Ok(state) => return not_active(unit, &state, when),
            Err(e) => return e.into(),
        }
    }
}

fn not_active(
    unit: &ControlledUnit,
    state: &crate::host::systemd::UnitState,
    when: &'static str,
) -> StepError {
    StepError::UnitNotActive {
        unit: unit.as_str().to_owned(),
        active: state.active_state.clone(),
        sub: state.sub_state.clone(),
        when,
    }
}
