//! Host metrics: CPU, load, memory, disks, network interfaces and process
//! count, sampled through `sysinfo` (plus `statvfs` and `/proc` where sysinfo
//! has gaps), and exposed as plain domain types and in the Prometheus text
//! format.
//!
//! This module knows nothing of gRPC; the `api` module maps [`HostSample`] to
//! protobuf.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sysinfo::{
    CpuRefreshKind, DiskRefreshKind, Disks, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind,
    Networks, System,
};

use crate::files::FsSpace;
use tokio::net::TcpListener;

/// A sample younger than this is served from cache, so that many concurrent
/// callers (gRPC watchers, Prometheus scrapes) do not hammer /proc.
const CACHE_TTL: Duration = Duration::from_millis(500);

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Slow or idle clients must not pin a connection forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Kernel block-layer sector size used by /proc/diskstats, whatever the
/// device's real sector size.
const DISKSTATS_SECTOR_SIZE: u64 = 512;

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
    fn empty() -> Self {
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

// ---------------------------------------------------------------- hub

/// Shared, cached access to host metrics. Cheap to clone.
#[derive(Clone)]
pub struct MetricsHub {
    inner: Arc<HubInner>,
}

struct HubInner {
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
                collector: Arc::new(Mutex::new(collector)),
                latest: tokio::sync::Mutex::new(Latest {
                    refreshed_at,
                    sample: None,
                }),
            }),
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

// ---------------------------------------------------------------- collector

/// Cumulative I/O counters of one disk or interface at the previous refresh.
#[derive(Clone, Copy)]
struct IoTotals {
    read: u64,
    written: u64,
}

/// The sysinfo state plus what is needed to turn counters into rates.
struct Collector {
    /// `None` if sysinfo could not be initialised on this platform; the
    /// corresponding sections are then reported empty.
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    physical_cores: u32,
    last_refresh: Instant,
    /// Keyed by mount point. Rates are computed from our own previous totals
    /// rather than sysinfo's per-refresh deltas, so that disks appearing later
    /// (sysinfo reports their whole history as one delta) and the diskstats
    /// fallback are treated alike.
    previous_disk_io: HashMap<String, IoTotals>,
    /// Keyed by interface name.
    previous_network_io: HashMap<String, IoTotals>,
}

impl Collector {
    fn new() -> Self {
        let system = System::new()
            .inspect_err(|e| tracing::warn!("cannot read CPU and memory metrics: {e}"))
            .ok();
        let disks = Disks::new()
            .inspect_err(|e| tracing::warn!("cannot read disk metrics: {e}"))
            .ok();
        let networks = Networks::new()
            .inspect_err(|e| tracing::warn!("cannot read network metrics: {e}"))
            .ok();
        // Reads /proc/cpuinfo, and cores do not change at runtime: do it once.
        let physical_cores = System::physical_core_count()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        Self {
            system,
            disks,
            networks,
            physical_cores,
            last_refresh: Instant::now(),
            previous_disk_io: HashMap::new(),
            previous_network_io: HashMap::new(),
        }
    }

    /// Refreshes everything and builds a sample. Blocking: reads /proc.
    fn refresh(&mut self) -> HostSample {
        let now = Instant::now();
        let rate_interval = now.saturating_duration_since(self.last_refresh);
        self.last_refresh = now;

        let (cpu, memory) = match &mut self.system {
            Some(system) => {
                system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
                system.refresh_memory_specifics(MemoryRefreshKind::everything());
                (
                    cpu_sample(system, self.physical_cores),
                    memory_sample(system),
                )
            }
            None => (CpuSample::default(), MemorySample::default()),
        };
        let load = System::load_average()
            .map(|l| LoadSample {
                one: l.one,
                five: l.five,
                fifteen: l.fifteen,
            })
            .unwrap_or_default();

        HostSample {
            sampled_at: SystemTime::now(),
            rate_interval,
            cpu,
            load,
            memory,
            disks: self.refresh_disks(rate_interval),
            networks: self.refresh_networks(rate_interval),
            process_count: count_processes(),
        }
    }

    fn refresh_disks(&mut self, interval: Duration) -> Vec<DiskSample> {
        let Some(disks) = &mut self.disks else {
            return Vec::new();
        };
        // `true`: forget unmounted file systems. The disk kind is not needed,
        // and refreshing it rereads /sys for every non-block device.
        disks.refresh_specifics(
            true,
            DiskRefreshKind::nothing().with_storage().with_io_usage(),
        );

        // Read lazily, only if sysinfo could not map some device to its
        // /proc/diskstats line (e.g. no /dev node inside a container).
        let mut diskstats: Option<Vec<DiskStatsLine>> = None;
        let mut by_mount: HashMap<String, DiskSample> = HashMap::new();
        for disk in disks.iter() {
            // Pseudo file systems report a size of 0.
            if disk.total_space() == 0 {
                continue;
            }
            let mount_point = disk.mount_point().to_string_lossy().into_owned();
            let device = disk.name().to_string_lossy().into_owned();

            let usage = disk.usage();
            let mut io = IoTotals {
                read: usage.total_read_bytes,
                written: usage.total_written_bytes,
            };
            if io.read == 0 && io.written == 0 {
                let lines = diskstats.get_or_insert_with(read_diskstats);
                if let Some(found) = find_diskstats(lines, &device, disk.id()) {
                    io = found;
                }
            }
            let (read_rate, written_rate) = match self.previous_disk_io.get(&mount_point) {
                Some(prev) => (
                    per_second(prev.read, io.read, interval),
                    per_second(prev.written, io.written, interval),
                ),
                None => (0.0, 0.0),
            };

            let vfs = statvfs(disk.mount_point());
            let sample = DiskSample {
                mount_point: mount_point.clone(),
                device,
                file_system: disk.file_system().to_string_lossy().into_owned(),
                total_bytes: disk.total_space(),
                available_bytes: disk.available_space(),
                inodes_total: vfs.map_or(0, |v| v.inodes_total),
                inodes_free: vfs.map_or(0, |v| v.inodes_free),
                read_bytes_total: io.read,
                written_bytes_total: io.written,
                read_bytes_per_second: read_rate,
                written_bytes_per_second: written_rate,
                // sysinfo only reads the flag when it first sees the mount;
                // statvfs also catches a later remount read-only.
                read_only: vfs.map_or(disk.is_read_only(), |v| v.read_only),
            };
            // Several entries for one mount point mean stacked mounts; sysinfo
            // lists them in mount order, so the last one is the visible one.
            by_mount.insert(mount_point, sample);
        }

        self.previous_disk_io = by_mount
            .iter()
            .map(|(mount, d)| {
                let totals = IoTotals {
                    read: d.read_bytes_total,
                    written: d.written_bytes_total,
                };
                (mount.clone(), totals)
            })
            .collect();
        let mut samples: Vec<DiskSample> = by_mount.into_values().collect();
        samples.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        samples
    }

    fn refresh_networks(&mut self, interval: Duration) -> Vec<NetworkSample> {
        let Some(networks) = &mut self.networks else {
            return Vec::new();
        };
        // `true`: forget interfaces that went away.
        networks.refresh(true);

        let mut samples: Vec<NetworkSample> = networks
            .iter()
            .map(|(name, data)| {
                let interface = name.to_string_lossy().into_owned();
                let (rx_rate, tx_rate) = match self.previous_network_io.get(&interface) {
                    Some(prev) => (
                        per_second(prev.read, data.total_received(), interval),
                        per_second(prev.written, data.total_transmitted(), interval),
                    ),
                    None => (0.0, 0.0),
                };
                NetworkSample {
                    interface,
                    received_bytes_total: data.total_received(),
                    transmitted_bytes_total: data.total_transmitted(),
                    received_bytes_per_second: rx_rate,
                    transmitted_bytes_per_second: tx_rate,
                    received_packets_total: data.total_packets_received(),
                    transmitted_packets_total: data.total_packets_transmitted(),
                    receive_errors_total: data.total_errors_on_received(),
                    transmit_errors_total: data.total_errors_on_transmitted(),
                }
            })
            .collect();
        samples.sort_by(|a, b| a.interface.cmp(&b.interface));

        self.previous_network_io = samples
            .iter()
            .map(|n| {
                let totals = IoTotals {
                    read: n.received_bytes_total,
                    written: n.transmitted_bytes_total,
                };
                (n.interface.clone(), totals)
            })
            .collect();
        samples
    }
}

fn cpu_sample(system: &System, physical_cores: u32) -> CpuSample {
    let per_core_percent: Vec<f32> = system
        .cpus()
        .iter()
        .map(|cpu| sanitize_percent(cpu.usage()))
        .collect();
    let logical_cores = match u32::try_from(per_core_percent.len()) {
        Ok(0) | Err(_) => std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .unwrap_or(1),
        Ok(n) => n,
    };
    CpuSample {
        usage_percent: sanitize_percent(system.global_cpu_usage()),
        per_core_percent,
        logical_cores,
        physical_cores,
    }
}

fn memory_sample(system: &System) -> MemorySample {
    MemorySample {
        total_bytes: system.total_memory(),
        used_bytes: system.used_memory(),
        available_bytes: system.available_memory(),
        swap_total_bytes: system.total_swap(),
        swap_used_bytes: system.used_swap(),
    }
}

/// Keeps a usage figure within 0-100 and never NaN, whatever the counters did.
fn sanitize_percent(value: f32) -> f32 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 100.0)
    }
}

/// Average rate of a cumulative counter. A counter that went backwards (device
/// replaced, counter wrapped) yields 0 rather than a bogus spike.
fn per_second(previous: u64, current: u64, interval: Duration) -> f64 {
    let seconds = interval.as_secs_f64();
    match current.checked_sub(previous) {
        Some(delta) if seconds > 0.0 => delta as f64 / seconds,
        _ => 0.0,
    }
}

/// Number of processes (not threads): /proc lists only thread-group leaders.
/// One readdir is much cheaper than sysinfo's per-process /proc/<pid>/stat.
fn count_processes() -> u32 {
    match std::fs::read_dir("/proc") {
        Ok(entries) => {
            let count = entries
                .filter_map(Result::ok)
                .filter(|entry| {
                    let name = entry.file_name();
                    let name = name.as_bytes();
                    !name.is_empty() && name.iter().all(u8::is_ascii_digit)
                })
                .count();
            u32::try_from(count).unwrap_or(u32::MAX)
        }
        Err(e) => {
            tracing::debug!("cannot list /proc: {e}");
            0
        }
    }
}

// ---------------------------------------------------------------- statvfs

/// Inode counts and read-only flag of a mounted file system, which sysinfo
/// does not report.
fn statvfs(mount_point: &Path) -> Option<FsSpace> {
    crate::files::fs_space(mount_point)
        .map_err(|e| tracing::debug!(mount = %mount_point.display(), "statvfs failed: {e}"))
        .ok()
}

// ---------------------------------------------------------------- /proc/diskstats

/// The fields of one /proc/diskstats line that we use.
#[derive(Debug, PartialEq)]
struct DiskStatsLine {
    major: u32,
    minor: u32,
    name: String,
    read_bytes: u64,
    written_bytes: u64,
}

fn read_diskstats() -> Vec<DiskStatsLine> {
    match std::fs::read_to_string("/proc/diskstats") {
        Ok(content) => parse_diskstats(&content),
        Err(e) => {
            tracing::debug!("cannot read /proc/diskstats: {e}");
            Vec::new()
        }
    }
}

/// Parses /proc/diskstats: `major minor name reads merged sectors_read ms
/// writes merged sectors_written ...`.
fn parse_diskstats(content: &str) -> Vec<DiskStatsLine> {
    content
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
            Some(DiskStatsLine {
                major: fields.first()?.parse().ok()?,
                minor: fields.get(1)?.parse().ok()?,
                name: (*fields.get(2)?).to_owned(),
                read_bytes: number(5)?.saturating_mul(DISKSTATS_SECTOR_SIZE),
                written_bytes: number(9)?.saturating_mul(DISKSTATS_SECTOR_SIZE),
            })
        })
        .collect()
}

/// Finds a mount's counters, preferring the device number of the mount point
/// (works without a /dev node) and falling back to the device's name.
fn find_diskstats(lines: &[DiskStatsLine], device: &str, dev_id: Option<u64>) -> Option<IoTotals> {
    let by_number = dev_id.and_then(|dev| {
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        lines.iter().find(|l| l.major == major && l.minor == minor)
    });
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    by_number
        .or_else(|| lines.iter().find(|l| l.name == name))
        .map(|l| IoTotals {
            read: l.read_bytes,
            written: l.written_bytes,
        })
}

// ---------------------------------------------------------------- Prometheus

#[derive(Clone, Copy)]
enum MetricType {
    Gauge,
    Counter,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
        }
    }
}

/// A sample value: integers are printed exactly, floats per the format's
/// conventions (`NaN`, `+Inf`, `-Inf`).
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(f64::from(v))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => {
                f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Builds a text exposition, one metric family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, val);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: MetricType, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family with one sample per item, labelled by `labels(item)`.
    fn each<'a, T: 'a, L, V>(
        &mut self,
        name: &str,
        kind: MetricType,
        help: &str,
        items: impl IntoIterator<Item = &'a T>,
        labels: L,
        value: impl Fn(&T) -> V,
    ) where
        L: for<'t> Fn(&'t T) -> Vec<(&'static str, &'t str)>,
        V: Into<Value>,
    {
        self.family(name, kind, help);
        for item in items {
            self.sample(name, &labels(item), value(item));
        }
    }
}

/// Escapes a label value per the text format: backslash, double quote and
/// line feed.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn disk_labels(d: &DiskSample) -> Vec<(&'static str, &str)> {
    vec![
        ("mount", d.mount_point.as_str()),
        ("device", d.device.as_str()),
        ("fstype", d.file_system.as_str()),
    ]
}

fn network_labels(n: &NetworkSample) -> Vec<(&'static str, &str)> {
    vec![("interface", n.interface.as_str())]
}

/// Renders a sample in the Prometheus text exposition format (0.0.4).
///
/// Only cumulative counters are exposed for I/O: Prometheus derives rates
/// itself with `rate()`.
pub fn render_prometheus(sample: &HostSample) -> String {
    use MetricType::{Counter, Gauge};

    let mut prom = Exposition {
        out: String::with_capacity(8 * 1024),
    };

    prom.single(
        "covet_host_cpu_usage_percent",
        Gauge,
        "Total CPU usage over all cores, in percent (0-100).",
        sample.cpu.usage_percent,
    );
    prom.family(
        "covet_host_cpu_core_usage_percent",
        Gauge,
        "CPU usage of each logical core, in percent (0-100).",
    );
    for (core, usage) in sample.cpu.per_core_percent.iter().enumerate() {
        let core = core.to_string();
        prom.sample(
            "covet_host_cpu_core_usage_percent",
            &[("core", &core)],
            *usage,
        );
    }
    prom.single(
        "covet_host_cpu_logical_cores",
        Gauge,
        "Number of logical CPU cores.",
        sample.cpu.logical_cores,
    );
    if sample.cpu.physical_cores > 0 {
        prom.single(
            "covet_host_cpu_physical_cores",
            Gauge,
            "Number of physical CPU cores.",
            sample.cpu.physical_cores,
        );
    }

    prom.single(
        "covet_host_load1",
        Gauge,
        "System load average over 1 minute.",
        sample.load.one,
    );
    prom.single(
        "covet_host_load5",
        Gauge,
        "System load average over 5 minutes.",
        sample.load.five,
    );
    prom.single(
        "covet_host_load15",
        Gauge,
        "System load average over 15 minutes.",
        sample.load.fifteen,
    );

    let m = &sample.memory;
    prom.single(
        "covet_host_memory_total_bytes",
        Gauge,
        "Total physical memory in bytes.",
        m.total_bytes,
    );
    prom.single(
        "covet_host_memory_used_bytes",
        Gauge,
        "Used physical memory in bytes.",
        m.used_bytes,
    );
    prom.single(
        "covet_host_memory_available_bytes",
        Gauge,
        "Physical memory available to new processes in bytes.",
        m.available_bytes,
    );
    prom.single(
        "covet_host_swap_total_bytes",
        Gauge,
        "Total swap space in bytes.",
        m.swap_total_bytes,
    );
    prom.single(
        "covet_host_swap_used_bytes",
        Gauge,
        "Used swap space in bytes.",
        m.swap_used_bytes,
    );

    let disks = &sample.disks;
    prom.each(
        "covet_host_disk_total_bytes",
        Gauge,
        "Size of the file system in bytes.",
        disks,
        disk_labels,
        |d| d.total_bytes,
    );
    prom.each(
        "covet_host_disk_available_bytes",
        Gauge,
        "Space available to unprivileged users in bytes.",
        disks,
        disk_labels,
        |d| d.available_bytes,
    );
    prom.each(
        "covet_host_disk_inodes_total",
        Gauge,
        "Total number of inodes.",
        disks,
        disk_labels,
        |d| d.inodes_total,
    );
    prom.each(
        "covet_host_disk_inodes_free",
        Gauge,
        "Number of free inodes.",
        disks,
        disk_labels,
        |d| d.inodes_free,
    );
    prom.each(
        "covet_host_disk_read_only",
        Gauge,
        "1 if the file system is mounted read-only.",
        disks,
        disk_labels,
        |d| d.read_only,
    );
    prom.each(
        "covet_host_disk_read_bytes_total",
        Counter,
        "Bytes read from the underlying block device.",
        disks,
        disk_labels,
        |d| d.read_bytes_total,
    );
    prom.each(
        "covet_host_disk_written_bytes_total",
        Counter,
        "Bytes written to the underlying block device.",
        disks,
        disk_labels,
        |d| d.written_bytes_total,
    );

    let networks = &sample.networks;
    prom.each(
        "covet_host_network_receive_bytes_total",
        Counter,
        "Bytes received on the interface.",
        networks,
        network_labels,
        |n| n.received_bytes_total,
    );
    prom.each(
        "covet_host_network_transmit_bytes_total",
        Counter,
        "Bytes transmitted on the interface.",
        networks,
        network_labels,
        |n| n.transmitted_bytes_total,
    );
    prom.each(
        "covet_host_network_receive_packets_total",
        Counter,
        "Packets received on the interface.",
        networks,
        network_labels,
        |n| n.received_packets_total,
    );
    prom.each(
        "covet_host_network_transmit_packets_total",
        Counter,
        "Packets transmitted on the interface.",
        networks,
        network_labels,
        |n| n.transmitted_packets_total,
    );
    prom.each(
        "covet_host_network_receive_errors_total",
        Counter,
        "Receive errors on the interface.",
        networks,
        network_labels,
        |n| n.receive_errors_total,
    );
    prom.each(
        "covet_host_network_transmit_errors_total",
        Counter,
        "Transmit errors on the interface.",
        networks,
        network_labels,
        |n| n.transmit_errors_total,
    );

    prom.single(
        "covet_host_processes",
        Gauge,
        "Number of processes.",
        sample.process_count,
    );

    prom.out
}

// ---------------------------------------------------------------- HTTP endpoint

/// Serves `GET /metrics` (Prometheus text format) on `listener` until
/// `shutdown` resolves. Each connection runs in its own task; on shutdown the
/// listener is closed and open connections are asked to finish gracefully.
pub async fn serve_prometheus(
    listener: TcpListener,
    hub: MetricsHub,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually transient (EMFILE, ECONNABORTED): back off a
                    // little instead of spinning.
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };

        let hub = hub.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle_request(request, hub.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);

            let result = tokio::select! {
                result = connection.as_mut() => result,
                // Fires on the shutdown signal, or if the server is gone.
                _ = stop_rx.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "metrics endpoint: connection error: {e}");
            }
        });
    }

    // Nobody may be listening any more; that is fine.
    let _ = stop_tx.send(());
    Ok(())
}

async fn handle_request(
    request: Request<Incoming>,
    hub: MetricsHub,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // HEAD is answered like GET; hyper leaves the body out.
    let method_ok = matches!(*request.method(), Method::GET | Method::HEAD);
    let response = match request.uri().path() {
        "/metrics" | "/" if !method_ok => {
            let mut response =
                text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let body = render_prometheus(&hub.sample().await);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            response
        }
        "/" => text_response(
            StatusCode::OK,
            "covet-agent host metrics: see /metrics (Prometheus text format)\n",
        ),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

// ---------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// Splits a sample line into name, labels and value; the value is the text
    /// after the last space (label values may contain spaces).
    fn parse_line(line: &str) -> (&str, Option<&str>, f64) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap(),
        };
        match series.split_once('{') {
            Some((name, rest)) => (name, Some(rest.strip_suffix('}').unwrap()), value),
            None => (series, None, value),
        }
    }

    #[tokio::test]
    async fn prometheus_rendering_is_well_formed() {
        let hub = MetricsHub::new();
        let text = render_prometheus(&hub.sample().await);

        assert!(text.contains("covet_host_memory_total_bytes "));
        assert!(text.contains("# TYPE covet_host_disk_read_bytes_total counter\n"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("covet_host_disk_total_bytes{mount=\"/\","))
        );
        assert!(text.ends_with('\n'));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, _value) = parse_line(line);
            assert!(name.starts_with("covet_host_"), "{line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            if let Some(labels) = labels {
                assert!(labels.contains("=\""), "{line}");
                assert!(labels.ends_with('"'), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut sample = HostSample::empty();
        sample.disks.push(DiskSample {
            mount_point: "/mnt/a \"b\"\\c\nd".to_owned(),
            device: "/dev/x".to_owned(),
            file_system: "ext4".to_owned(),
            total_bytes: 1,
            available_bytes: 1,
            inodes_total: 1,
            inodes_free: 1,
            read_bytes_total: 0,
            written_bytes_total: 0,
            read_bytes_per_second: 0.0,
            written_bytes_per_second: 0.0,
            read_only: true,
        });
        let text = render_prometheus(&sample);
        assert!(text.contains(
            "covet_host_disk_total_bytes{mount=\"/mnt/a \\\"b\\\"\\\\c\\nd\",device=\"/dev/x\",fstype=\"ext4\"} 1\n"
        ));
        assert!(text.contains("covet_host_disk_read_only{"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            parse_line(line);
        }
    }

    #[test]
    fn special_float_values_follow_the_format() {
        assert_eq!(Value::from(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::from(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::from(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::from(0.25_f64).to_string(), "0.25");
        assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    }

    #[test]
    fn rates_handle_resets_and_zero_intervals() {
        assert_eq!(per_second(100, 300, Duration::from_secs(2)), 100.0);
        assert_eq!(per_second(300, 100, Duration::from_secs(2)), 0.0);
        assert_eq!(per_second(0, 100, Duration::ZERO), 0.0);
        assert_eq!(sanitize_percent(f32::NAN), 0.0);
        assert_eq!(sanitize_percent(100.5), 100.0);
    }

    #[test]
    fn diskstats_lookup_by_number_then_name() {
        let content = "\
 254       0 vda 13637 5623 4088634 10424 2689 19397 2105216 8461 0 3364 19680 3843 46 73760 631 116 163
 254       1 vda1 10 0 20 0 1 0 30 0 0 0 0
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0
 garbage
";
        let lines = parse_diskstats(content);
        assert_eq!(lines.len(), 3);

        let vda1 = libc::makedev(254, 1);
        let io = find_diskstats(&lines, "/dev/root", Some(vda1)).unwrap();
        assert_eq!((io.read, io.written), (20 * 512, 30 * 512));

        let io = find_diskstats(&lines, "/dev/vda", None).unwrap();
        assert_eq!((io.read, io.written), (4088634 * 512, 2105216 * 512));

        assert!(find_diskstats(&lines, "overlay", Some(libc::makedev(0, 42))).is_none());
    }

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_prometheus(listener, MetricsHub::new(), async {
            let _ = stop_rx.await;
        }));

        let metrics = http_get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(
            metrics
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n")
        );
        assert!(metrics.contains("\r\n\r\n# HELP covet_host_cpu_usage_percent "));
        assert!(metrics.contains("covet_host_memory_total_bytes "));

        let index = http_get(addr, "/").await;
        assert!(index.starts_with("HTTP/1.1 200 OK\r\n"), "{index}");
        assert!(index.contains("/metrics"));

        let missing = http_get(addr, "/nope").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut post = String::new();
        stream.read_to_string(&mut post).await.unwrap();
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
