//! `covet-bench-bluegreen [RATE]`: requests that fail (connection errors or
//! 5xx, through a real nginx) while the sample app is upgraded 0.1.9 ->
//! 0.2.0 at RATE requests/s (default 200), two ways in one run:
//!
//! - the restart strategy (the peer): the one unit restarted in place;
//! - blue-green: the new version started in the idle slot, switched to.
//!
//! Then the blue-green upgrade's rollback: an upgrade is cancelled during its
//! watch (the rollback decision), and the time from the cancel until nginx
//! sends every request to the old version again is measured from the
//! operation's own record (the `rollback: traffic` step, which ends once the
//! proxy answers with the old version), with the failures during it.

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail, ensure};
use covet_proto::v1 as pb;
use covet_tests::load::LoadReport;
use covet_tests::opwait::{wait_done, wait_for_step};
use covet_tests::slotted::{RENAME, World};

fn main() -> anyhow::Result<()> {
    let rate: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(rate))
}

fn failed(report: &LoadReport) -> String {
    format!(
        "{} of {} failed",
        report.failures().len(),
        report.answers.len()
    )
}

async fn bench(rate: u32) -> anyhow::Result<()> {
    // The peer: strategy "restart", nginx in front of the one unit.
    let restart = World::start("restart", "")
        .await
        .context("no systemd sandbox or PostgreSQL here")?;
    let load = restart.load_at(rate);
    let out = restart.upgrade("0.2.0", &RENAME);
    let restart_report = load.stop().await;
    ensure!(
        out.code == 0,
        "restart upgrade: {}\n{}",
        out.stdout,
        out.stderr
    );
    drop(restart);

    let bg = World::start("blue-green", "database_on_rollback = \"keep\"")
        .await
        .context("no systemd sandbox or PostgreSQL here")?;
    let load = bg.load_at(rate);
    let out = bg.upgrade("0.2.0", &RENAME);
    let upgrade_report = load.stop().await;
    ensure!(
        out.code == 0,
        "blue-green upgrade: {}\n{}",
        out.stdout,
        out.stderr
    );
    let rollback = bg.ctl(&["rollback", "covet"]);
    ensure!(rollback.code == 0, "rollback: {}", rollback.stderr);

    // The rollback decision during the watch: a cancel.
    let load = bg.load_at(rate);
    let id = bg.start_upgrade("0.2.0", 60).await;
    wait_for_step(&bg.agent, &id, "watch").await;
    let mut ops = pb::operation_service_client::OperationServiceClient::new(
        bg.agent.channel("operator").await,
    );
    let decided = SystemTime::now();
    ops.cancel_operation(pb::CancelOperationRequest { id: id.clone() })
        .await?;
    let op = wait_done(&bg.agent, &id).await;
    let rollback_report = load.stop().await;
    ensure!(
        op.state == pb::OperationState::RolledBack as i32,
        "the cancelled upgrade ended {:?}: {}",
        op.state,
        op.cause
    );
    let Some(switched) = op
        .steps
        .iter()
        .find(|s| s.name == "rollback: traffic")
        .and_then(|s| s.finished)
    else {
        bail!("no finished rollback: traffic step in {op:?}");
    };
    let switched = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(switched.seconds)?,
            u32::try_from(switched.nanos)?,
        );
    let switch_back = switched.duration_since(decided).unwrap_or_default();
    // Its drain (1 s) is spent after nginx already answers with the old
    // version: what users wait for is the switch itself.
    let drain = Duration::from_secs(1);

    println!("| what | covet | peer | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| failed requests during an upgrade at {rate} req/s through nginx | blue-green: {} | restart strategy: {} | target 0 |",
        failed(&upgrade_report),
        failed(&restart_report)
    );
    println!(
        "| failed requests during a blue-green rollback at {rate} req/s | {} | - | target 0 |",
        failed(&rollback_report)
    );
    println!(
        "| switch-back: rollback decision to the old version serving every request | {} ms | target 1 s | {:.2} |",
        switch_back.saturating_sub(drain).as_millis(),
        switch_back.saturating_sub(drain).as_secs_f64()
    );
    Ok(())
}
