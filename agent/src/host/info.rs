//! The host's identity: name, OS, kernel, uptime, boot id.

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct HostInfo {
    pub hostname: String,
    pub os_name: String,
    pub os_version: String,
    pub kernel_version: String,
    pub arch: String,
    pub uptime: Duration,
    pub boot_id: String,
    pub machine_id: String,
}

impl HostInfo {
    /// The host's identity: read once (it changes only with a reboot or a
    /// rename, which restarts or is rare), with the uptime of now.
    pub fn current() -> HostInfo {
        static STATIC: std::sync::OnceLock<HostInfo> = std::sync::OnceLock::new();
        let mut info = STATIC.get_or_init(HostInfo::read).clone();
        info.uptime = Duration::from_secs(sysinfo::System::uptime().unwrap_or(0));
        info
    }

    /// Reads the host's identity now.
    pub fn read() -> HostInfo {
        HostInfo {
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            os_name: sysinfo::System::name().unwrap_or_default(),
            os_version: sysinfo::System::os_version().unwrap_or_default(),
            kernel_version: sysinfo::System::kernel_version().unwrap_or_default(),
            arch: std::env::consts::ARCH.to_owned(),
            uptime: Duration::from_secs(sysinfo::System::uptime().unwrap_or(0)),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            machine_id: read_trimmed("/etc/machine-id"),
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// When this agent process started.
pub fn agent_started() -> SystemTime {
    static STARTED: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *STARTED.get_or_init(SystemTime::now)
}
