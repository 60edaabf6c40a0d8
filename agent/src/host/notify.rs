//! sd_notify(3) without libsystemd: readiness, stopping and watchdog pings
//! for `Type=notify` units, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the agent
//! runs the same from a terminal, a test harness or a unit.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// A bound-nowhere datagram socket and the manager's notification address.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// What systemd handed us: where to notify, and how often to ping the watchdog.
#[derive(Debug, Default, Clone)]
pub struct NotifyEnv {
    pub notifier: Option<Arc<Notifier>>,
    pub watchdog: Option<Duration>,
}

impl NotifyEnv {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then removes
    /// them so that the programs the agent runs (pip, migrations, pg_dump)
    /// never talk to our manager on our behalf.
    ///
    /// # Safety
    ///
    /// Changes the environment: call it while the process has one thread.
    pub unsafe fn take() -> io::Result<NotifyEnv> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            // SAFETY: the caller guarantees no other thread reads the environment.
            unsafe { std::env::remove_var(name) };
        }
        let notifier = match socket {
            Some(path) if !path.is_empty() => Some(Arc::new(Notifier::connect(&path)?)),
            _ => None,
        };
        let watchdog = notifier
            .as_ref()
            .and_then(|_| ping_interval(usec.as_deref(), pid.as_deref(), std::process::id()));
        Ok(NotifyEnv { notifier, watchdog })
    }

    /// Sends `state` when running under a notify-aware manager; logs failures
    /// (a lost notification must not take the agent down).
    pub fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.notify(state)
        {
            tracing::warn!("sd_notify {state:?}: {e}");
        }
    }

    /// Spawns the watchdog pinger when the unit has `WatchdogSec=`.
    pub fn spawn_watchdog(&self) -> Option<tokio::task::JoinHandle<()>> {
        let (notifier, every) = (self.notifier.clone()?, self.watchdog?);
        tracing::info!(?every, "watchdog: pinging systemd");
        Some(tokio::spawn(watchdog(notifier, every)))
    }
}

impl Notifier {
    /// A notifier for `path`: an absolute socket path, or `@name` for an
    /// abstract socket.
    pub fn connect(path: &OsStr) -> io::Result<Notifier> {
        let bytes = path.as_bytes();
        let addr = match bytes.split_first() {
            Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
            Some((b'/', _)) => SocketAddr::from_pathname(path)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={path:?} is neither absolute nor abstract (@…)"),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        // Never let a stuck manager block a runtime thread for long.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Notifier { socket, addr })
    }

    /// Sends one notification, e.g. `READY=1` or `STATUS=…\nREADY=1`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short datagram: {sent} of {} bytes", state.len()),
            ));
        }
        Ok(())
    }
}

/// Half of `WATCHDOG_USEC`, if it is set for this process: systemd's advice,
/// so that one late ping is not yet a missed deadline.
pub fn ping_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Pings `WATCHDOG=1` every `every` until the task is dropped. A stalled
/// runtime stops pinging, which is what the watchdog is for.
async fn watchdog(notifier: Arc<Notifier>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match notifier.notify("WATCHDOG=1") {
            Ok(()) => failing = false,
            // Say it once, not at every tick.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("watchdog ping failed: {e}");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn receiver(rx: &UnixDatagram) {
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        receiver(&rx);
        let n = Notifier::connect(path.as_os_str()).unwrap();
        n.notify("READY=1\nSTATUS=listening").unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=listening");
        n.notify("STOPPING=1").unwrap();
        assert_eq!(recv(&rx), "STOPPING=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("covet-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        receiver(&rx);
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify("READY=1").unwrap();
        assert_eq!(recv(&rx), "READY=1");
    }

    #[test]
    fn refuses_relative_paths_and_reports_a_missing_socket() {
        assert!(Notifier::connect(OsStr::new("notify")).is_err());
        assert!(Notifier::connect(OsStr::new("")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::connect(dir.path().join("gone").as_os_str()).unwrap();
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_pid() {
        let half = Some(Duration::from_millis(1500));
        assert_eq!(ping_interval(Some("3000000"), None, 42), half);
        assert_eq!(ping_interval(Some("3000000"), Some("42"), 42), half);
        assert_eq!(ping_interval(Some("3000000"), Some("41"), 42), None);
        assert_eq!(ping_interval(Some("0"), None, 42), None);
        assert_eq!(ping_interval(Some("soon"), None, 42), None);
        assert_eq!(ping_interval(None, Some("42"), 42), None);
    }

    #[tokio::test]
    async fn watchdog_pings_at_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let n = Arc::new(Notifier::connect(path.as_os_str()).unwrap());
        let env = NotifyEnv {
            notifier: Some(n),
            watchdog: Some(Duration::from_millis(100)),
        };
        let task = env.spawn_watchdog().unwrap();
        // The first tick fires at once, then one every 100 ms.
        tokio::time::sleep(Duration::from_millis(450)).await;
        task.abort();
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(got) = rx.recv(&mut buf) {
            assert_eq!(&buf[..got], b"WATCHDOG=1");
            pings += 1;
        }
        assert!(
            (3..=6).contains(&pings),
            "{pings} pings in 450 ms at 100 ms"
        );
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let env = NotifyEnv::default();
        env.notify("READY=1");
        assert!(env.watchdog.is_none());
    }
}
