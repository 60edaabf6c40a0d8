//! Host metrics: CPU, load, memory, disks, network interfaces and process
//! count. `collector` samples them through `sysinfo` (plus `statvfs` and
//! `/proc` where sysinfo has gaps) into the plain domain types of `sample`;
//! `prometheus` renders a sample in the text exposition format and serves it.
//! The hub here shares one cached sample among all callers.
//!
//! This module knows nothing of gRPC; `edge::api` maps [`HostSample`] to
//! protobuf.

mod collector;
mod prometheus;
mod sample;

pub use prometheus::serve_prometheus;
pub(crate) use prometheus::{Exposition, MetricType};
pub use sample::*;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use sysinfo::MINIMUM_CPU_UPDATE_INTERVAL;

use collector::Collector;

/// A sample younger than this is served from cache, so that many concurrent
/// callers (gRPC watchers, Prometheus scrapes) do not hammer /proc.
const CACHE_TTL: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------- hub

/// Shared, cached access to host metrics. Cheap to clone.
#[derive(Clone)]
pub struct MetricsHub {
    inner: Arc<HubInner>,
}

/// Series the rest of the agent adds to the endpoint (apps, operations,
/// backups, analysis), rendered at each scrape; this module knows nothing
/// of what they are.
pub type MoreSeries = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

struct HubInner {
    more: OnceLock<MoreSeries>,
    /// Only locked inside `spawn_blocking`, since refreshing reads /proc.
    collector: Arc<Mutex<Collector>>,
    /// Held across a refresh so that concurrent callers queue behind one
    /// refresh and then share its result instead of refreshing again.
    latest: tokio::sync::Mutex<Latest>,
}

struct Latest {
    refreshed_at: Instant,
    /// `None` until the first `sample()`: the refresh done by `new()` is only a
    /// baseline (CPU usage needs two refreshes).
    sample: Option<HostSample>,
}

impl MetricsHub {
    /// Creates the sysinfo state and takes a baseline refresh, so that the
    /// first [`sample`](Self::sample) already has deltas to compute rates from.
    pub fn new() -> MetricsHub {
        let mut collector = Collector::new();
        // The baseline's own figures are meaningless (no previous refresh).
        let _baseline = collector.refresh();
        let refreshed_at = collector.last_refresh;
        MetricsHub {
            inner: Arc::new(HubInner {
                more: OnceLock::new(),
                collector: Arc::new(Mutex::new(collector)),
                latest: tokio::sync::Mutex::new(Latest {
                    refreshed_at,
                    sample: None,
                }),
            }),
        }
    }

    /// Sets what [`MetricsHub::more_series`] renders (once).
    pub fn set_more_series(&self, more: MoreSeries) {
        let _ = self.inner.more.set(more);
    }

    /// The series set by [`MetricsHub::set_more_series`], in text format.
    pub async fn more_series(&self) -> String {
        match self.inner.more.get() {
            Some(more) => more().await,
            None => String::new(),
        }
    }

    /// Returns a fresh sample: the cached one if it is younger than 500 ms,
    /// otherwise a new refresh (on the blocking pool, as sysinfo reads /proc).
    /// Concurrent callers share a single refresh. Never fails: sections that
    /// cannot be read are reported empty.
    pub async fn sample(&self) -> HostSample {
        let mut latest = self.inner.latest.lock().await;
        let age = latest.refreshed_at.elapsed();
        if let Some(sample) = &latest.sample
            && age < CACHE_TTL
        {
            return sample.clone();
        }

        // sysinfo silently keeps the previous CPU figures when refreshed
        // sooner than this after the baseline taken by `new()`.
        if let Some(wait) = MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(age) {
            tokio::time::sleep(wait).await;
        }

        let collector = Arc::clone(&self.inner.collector);
        let refreshed = tokio::task::spawn_blocking(move || {
            collector
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refresh()
        })
        .await;

        match refreshed {
            Ok(sample) => {
                latest.refreshed_at = Instant::now();
                latest.sample = Some(sample.clone());
                sample
            }
            Err(e) => {
                tracing::warn!("host metrics refresh failed: {e}");
                latest.sample.clone().unwrap_or_else(HostSample::empty)
            }
        }
    }
}

impl Default for MetricsHub {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MetricsHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsHub").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_sample_is_sensible() {
        let hub = MetricsHub::new();
        let s = hub.sample().await;

        assert!(s.memory.total_bytes > 0);
        assert!(s.memory.available_bytes <= s.memory.total_bytes);
        assert!(!s.cpu.usage_percent.is_nan());
        assert!((0.0..=100.0).contains(&s.cpu.usage_percent));
        assert!(s.cpu.logical_cores >= 1);
        assert!(
            s.cpu
                .per_core_percent
                .iter()
                .all(|p| (0.0..=100.0).contains(p))
        );
        assert!(s.rate_interval >= MINIMUM_CPU_UPDATE_INTERVAL);
        assert!(s.process_count >= 1);

        let root = s.disks.iter().find(|d| d.mount_point == "/").unwrap();
        assert!(root.total_bytes > 0);
        assert!(root.inodes_total > 0);
        assert!(root.inodes_free <= root.inodes_total);
        assert!(root.read_bytes_per_second.is_finite());

        let mounts: Vec<&str> = s.disks.iter().map(|d| d.mount_point.as_str()).collect();
        let mut deduped = mounts.clone();
        deduped.dedup();
        assert_eq!(mounts, deduped, "mount points must be unique");
        assert!(s.disks.iter().all(|d| d.total_bytes > 0));
    }

    #[tokio::test]
    async fn samples_are_cached_then_refreshed() {
        let hub = MetricsHub::new();
        let first = hub.sample().await;
        let cached = hub.sample().await;
        assert_eq!(first.sampled_at, cached.sampled_at);

        tokio::time::sleep(Duration::from_millis(600)).await;
        let second = hub.sample().await;
        assert!(second.sampled_at > first.sampled_at);
        assert!(second.rate_interval >= Duration::from_millis(500));
        for n in &second.networks {
            assert!(n.received_bytes_per_second >= 0.0);
            assert!(n.transmitted_bytes_per_second >= 0.0);
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_refresh() {
        let hub = MetricsHub::new();
        let (a, b) = tokio::join!(hub.sample(), hub.sample());
        assert_eq!(a.sampled_at, b.sampled_at);
    }
}
