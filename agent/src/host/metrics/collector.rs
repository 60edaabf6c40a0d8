//! Sampling the host: sysinfo, statvfs and /proc/diskstats.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, System};

use super::sample::*;
use crate::files::FsSpace;

/// Kernel block-layer sector size used by /proc/diskstats, whatever the
/// device's real sector size.
const DISKSTATS_SECTOR_SIZE: u64 = 512;

// ---------------------------------------------------------------- collector

/// Cumulative I/O counters of one disk or interface at the previous refresh.
#[derive(Clone, Copy)]
struct IoTotals {
    read: u64,
    written: u64,
}

/// The sysinfo state plus what is needed to turn counters into rates.
pub(super) struct Collector {
    /// `None` if sysinfo could not be initialised on this platform; the
    /// corresponding sections are then reported empty.
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    physical_cores: u32,
    pub(super) last_refresh: Instant,
    /// Keyed by mount point. Rates are computed from our own previous totals
    /// rather than sysinfo's per-refresh deltas, so that disks appearing later
    /// (sysinfo reports their whole history as one delta) and the diskstats
    /// fallback are treated alike.
    previous_disk_io: HashMap<String, IoTotals>,
    /// Keyed by interface name.
    previous_network_io: HashMap<String, IoTotals>,
}

impl Collector {
    pub(super) fn new() -> Self {
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
    pub(super) fn refresh(&mut self) -> HostSample {
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
