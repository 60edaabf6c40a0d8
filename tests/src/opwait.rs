//! Waiting on an agent's operations from a test: for a step to start, for
//! the record of a finished operation (across agent restarts).

use std::time::Duration;

use covet_proto::v1 as pb;

use crate::agent::TestAgent;

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
