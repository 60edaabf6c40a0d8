//! Waiting on an agent's operations from a test: for a step to start, for
//! the record of a finished operation (across agent restarts).

use std::time::Duration;

use covet_proto::v1 as pb;

use crate::agent::{CtlOutput, TestAgent};

/// Waits (at most 2 minutes) until the operation journals the start of `step`.
pub async fn wait_for_step(agent: &TestAgent, id: &str, step: &str) {
    let mut ops =
        pb::operation_service_client::OperationServiceClient::new(agent.channel("reader").await);
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            id: id.into(),
            from_sequence: 1,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(e) = stream.message().await.unwrap() {
            if let Some(pb::operation_event::Event::StepStarted(s)) = e.event
                && s.step == step
            {
                return;
            }
        }
        panic!("operation {id} ended before step {step}");
    })
    .await
    .unwrap_or_else(|_| panic!("step {step} did not start"));
}

/// The operation once finished, polled every 100 ms for at most 2 minutes
/// (connecting again each time, so an agent restart in between is fine).
pub async fn wait_done(agent: &TestAgent, id: &str) -> pb::Operation {
    for _ in 0..1200 {
        if let Ok(channel) = agent.connect(&agent.pki.client("reader")).await {
            let mut ops = pb::operation_service_client::OperationServiceClient::new(channel);
            if let Ok(op) = ops
                .get_operation(pb::GetOperationRequest { id: id.into() })
                .await
            {
                let op = op.into_inner();
                if op.finished.is_some() {
                    return op;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("operation {id} did not finish in 2 minutes");
}

/// `covetctl -o json --timeout 30s upgrade covet --to VERSION EXTRA...` as
/// an operator.
pub fn ctl_upgrade(agent: &TestAgent, version: &str, extra: &[&str]) -> CtlOutput {
    let mut args = vec![
        "-o",
        "json",
        "--timeout",
        "30s",
        "upgrade",
        crate::sampleapp::APP,
        "--to",
        version,
    ];
    args.extend_from_slice(extra);
    agent.ctl("operator", &args)
}

/// Starts the sample app's upgrade to 0.2.0 (renaming DATABASE_URI to
/// DATABASE_URL), kills the agent with SIGKILL once the migration step
/// started, restarts it and returns the operation once it finished.
pub async fn upgrade_killed_during_migrate(agent: &mut TestAgent) -> pb::Operation {
    let mut client =
        pb::upgrade_service_client::UpgradeServiceClient::new(agent.channel("operator").await);
    let op = client
        .upgrade(pb::UpgradeRequest {
            app: crate::sampleapp::APP.into(),
            to_version: "0.2.0".into(),
            env_edits: vec![pb::EnvEdit {
                edit: Some(pb::env_edit::Edit::Rename(pb::EnvRename {
                    from: "DATABASE_URI".into(),
                    to: "DATABASE_URL".into(),
                })),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_for_step(agent, &op.id, "migrate").await;
    agent.signal(libc::SIGKILL);
    agent.restart().await;
    wait_done(agent, &op.id).await
}

/// The sample app upgraded to 0.2.0 (renaming DATABASE_URI to
/// DATABASE_URL), then to the broken 0.2.1, which must be rolled back
/// cleanly (exit 3, a `rollback: database` step) to exactly what
/// `snapshot` saw at 0.2.0 (`check_020` looks at that first). The app
/// listens on `port`.
pub async fn upgrade_then_roll_back_broken<S: PartialEq + std::fmt::Debug>(
    agent: &TestAgent,
    port: u16,
    snapshot: impl Fn() -> S,
    check_020: impl Fn(&S),
) {
    let out = ctl_upgrade(
        agent,
        "0.2.0",
        &["--env-rename", "DATABASE_URI=DATABASE_URL"],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json()["state"], "succeeded");
    crate::http::wait_healthy(port, "0.2.0").await;
    let before = snapshot();
    check_020(&before);

    let out = ctl_upgrade(agent, "0.2.1", &[]);
    assert_eq!(
        out.code, 3,
        "a clean rollback exits 3:\n{}\n{}",
        out.stdout, out.stderr
    );
    let op = out.json();
    assert_eq!(op["state"], "rolled_back", "{op:#}");
    let steps: Vec<&str> = op["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"rollback: database"), "{steps:?}");
    crate::http::wait_healthy(port, "0.2.0").await;
    assert_eq!(snapshot(), before, "rows, schema and env exactly as before");
}
