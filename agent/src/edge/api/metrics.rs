//! MetricsService: one host sample, or a stream of them at a chosen interval.

use std::time::Duration;

use covet_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{AgentState, duration, duration_arg, timestamp};
use crate::host::metrics::HostSample;

pub struct MetricsApi(pub AgentState);

const WATCH_DEFAULT: Duration = Duration::from_secs(2);
const WATCH_MIN: Duration = Duration::from_millis(500);
const WATCH_MAX: Duration = Duration::from_secs(3600);

/// WatchMetrics: the sampling interval.
fn parse_watch_metrics(req: pb::WatchMetricsRequest) -> Result<Duration, Status> {
    duration_arg(
        "interval",
        req.interval,
        WATCH_DEFAULT,
        WATCH_MIN,
        WATCH_MAX,
    )
}

#[tonic::async_trait]
impl pb::metrics_service_server::MetricsService for MetricsApi {
    async fn get_metrics(
        &self,
        _request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::HostMetrics>, Status> {
        Ok(Response::new(metrics_to_pb(&self.0.metrics.sample().await)))
    }

    async fn watch_metrics(
        &self,
        request: Request<pb::WatchMetricsRequest>,
    ) -> Result<Response<BoxStream<pb::HostMetrics>>, Status> {
        let interval = parse_watch_metrics(request.into_inner())?;
        let hub = self.0.metrics.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    // Stop sampling as soon as the client goes away.
                    _ = tx.closed() => break,
                }
                let sample = metrics_to_pb(&hub.sample().await);
                if tx.send(Ok(sample)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn metrics_to_pb(s: &HostSample) -> pb::HostMetrics {
    pb::HostMetrics {
        sampled_at: Some(timestamp(s.sampled_at)),
        cpu: Some(pb::CpuMetrics {
            usage_percent: s.cpu.usage_percent,
            per_core_percent: s.cpu.per_core_percent.clone(),
            logical_cores: s.cpu.logical_cores,
            physical_cores: s.cpu.physical_cores,
        }),
        load: Some(pb::LoadAverage {
            one: s.load.one,
            five: s.load.five,
            fifteen: s.load.fifteen,
        }),
        memory: Some(pb::MemoryMetrics {
            total_bytes: s.memory.total_bytes,
            used_bytes: s.memory.used_bytes,
            available_bytes: s.memory.available_bytes,
            swap_total_bytes: s.memory.swap_total_bytes,
            swap_used_bytes: s.memory.swap_used_bytes,
        }),
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskMetrics {
                mount_point: d.mount_point.clone(),
                device: d.device.clone(),
                file_system: d.file_system.clone(),
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
                inodes_total: d.inodes_total,
                inodes_free: d.inodes_free,
                read_bytes_total: d.read_bytes_total,
                written_bytes_total: d.written_bytes_total,
                read_bytes_per_second: d.read_bytes_per_second,
                written_bytes_per_second: d.written_bytes_per_second,
                read_only: d.read_only,
            })
            .collect(),
        networks: s
            .networks
            .iter()
            .map(|n| pb::NetworkMetrics {
                interface: n.interface.clone(),
                received_bytes_total: n.received_bytes_total,
                transmitted_bytes_total: n.transmitted_bytes_total,
                received_bytes_per_second: n.received_bytes_per_second,
                transmitted_bytes_per_second: n.transmitted_bytes_per_second,
                received_packets_total: n.received_packets_total,
                transmitted_packets_total: n.transmitted_packets_total,
                receive_errors_total: n.receive_errors_total,
                transmit_errors_total: n.transmit_errors_total,
            })
            .collect(),
        process_count: s.process_count,
        rate_interval: Some(duration(s.rate_interval)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{refused, secs};
    use super::*;
    use tonic::Code;

    #[test]
    fn the_watch_interval_defaults_to_two_seconds_and_is_bounded() {
        let parse = |interval| parse_watch_metrics(pb::WatchMetricsRequest { interval });
        assert_eq!(parse(None).unwrap(), WATCH_DEFAULT);
        assert_eq!(parse(secs(0)).unwrap(), WATCH_DEFAULT);
        assert_eq!(parse(secs(3600)).unwrap(), WATCH_MAX);
        let fast = Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        });
        refused(
            parse(fast),
            Code::InvalidArgument,
            "interval must be between",
        );
        refused(parse(secs(3601)), Code::InvalidArgument, "interval");
        refused(
            parse(secs(-5)),
            Code::InvalidArgument,
            "interval must not be negative",
        );
    }
}
