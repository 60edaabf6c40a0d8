//! What one sample of the host holds, in base units.

use std::time::{Duration, SystemTime};

// ---------------------------------------------------------------- domain types

/// One snapshot of the host's resource usage.
#[derive(Debug, Clone)]
pub struct HostSample {
    pub sampled_at: SystemTime,
    /// Time between the previous refresh and this one; the per-second rates
    /// are averaged over it.
    pub rate_interval: Duration,
    pub cpu: CpuSample,
    pub load: LoadSample,
    pub memory: MemorySample,
    pub disks: Vec<DiskSample>,
    pub networks: Vec<NetworkSample>,
    pub process_count: u32,
}

#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    /// Total usage over all cores, 0-100.
    pub usage_percent: f32,
    /// Usage of each logical core, 0-100.
    pub per_core_percent: Vec<f32>,
    pub logical_cores: u32,
    /// 0 if unknown.
    pub physical_cores: u32,
}

#[derive(Debug, Clone, Default)]
pub struct LoadSample {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

#[derive(Debug, Clone, Default)]
pub struct MemorySample {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct DiskSample {
    pub mount_point: String,
    pub device: String,
    pub file_system: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub read_bytes_total: u64,
    pub written_bytes_total: u64,
    pub read_bytes_per_second: f64,
    pub written_bytes_per_second: f64,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct NetworkSample {
    pub interface: String,
    pub received_bytes_total: u64,
    pub transmitted_bytes_total: u64,
    pub received_bytes_per_second: f64,
    pub transmitted_bytes_per_second: f64,
    pub received_packets_total: u64,
    pub transmitted_packets_total: u64,
    pub receive_errors_total: u64,
    pub transmit_errors_total: u64,
}

impl HostSample {
    /// What to return when sampling itself failed (the blocking task
    /// panicked) and nothing was cached yet.
    pub(super) fn empty() -> Self {
        Self {
            sampled_at: SystemTime::now(),
            rate_interval: Duration::ZERO,
            cpu: CpuSample::default(),
            load: LoadSample::default(),
            memory: MemorySample::default(),
            disks: Vec::new(),
            networks: Vec::new(),
            process_count: 0,
        }
    }
}
