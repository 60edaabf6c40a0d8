//! Service control over D-Bus: unit status, start/stop/restart/reload with
//! the job awaited to its end, and daemon-reload.
//!
//! One code path for every bus: `system` in production, `session` or an
//! explicit `unix:path=...` address in tests. The connection is made on first
//! use and made again when the bus went away.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use zbus::OwnedVariant as OwnedValue;
use zbus_systemd::systemd1::ManagerProxy;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{0}")]
    InvalidUnit(String),
    #[error(
        "unit {0} is not declared on this host: only the apps' units and [systemd] allow may be read or controlled"
    )]
    NotAllowed(String),
    #[error("systemd is unreachable on bus {bus}: {reason}")]
    Unavailable { bus: String, reason: String },
    #[error("systemd refused {action} of {unit}: {reason}")]
    Refused {
        action: &'static str,
        unit: String,
        reason: String,
    },
    #[error("the {action} job of {unit} did not finish within {}", humantime::format_duration(*after))]
    Timeout {
        action: &'static str,
        unit: String,
        after: Duration,
    },
}

/// The host's allow list of units (the configuration implements it).
pub trait DeclaredUnits {
    fn declares(&self, unit: &str) -> bool;
}

impl<T: DeclaredUnits> DeclaredUnits for std::sync::Arc<T> {
    fn declares(&self, unit: &str) -> bool {
        T::declares(self, unit)
    }
}

/// Unit names as systemd accepts them: `NAME.TYPE`, or one instance of a
/// template, `NAME@INSTANCE.TYPE` (a blue-green slot); never a bare
/// template (`NAME@.TYPE`), which cannot run.
pub fn validate_unit_name(unit: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        "service", "socket", "target", "timer", "path", "mount", "slice", "scope",
    ];
    let bad = |why: &str| Err(format!("{unit:?} is not a valid unit name: {why}"));
    if unit.is_empty() || unit.len() > 255 {
        return bad("expected 1-255 characters like \"covet.service\"");
    }
    let Some((stem, kind)) = unit.rsplit_once('.') else {
        return bad("missing a type suffix such as \".service\"");
    };
    if !TYPES.contains(&kind) {
        return bad("unknown unit type");
    }
    if stem.is_empty() || stem.starts_with(['-', '.']) {
        return bad("empty or starts with - or .");
    }
    if let Some((prefix, instance)) = stem.split_once('@')
        && (prefix.is_empty() || instance.is_empty() || instance.contains('@'))
    {
        return bad("a template needs one instance name (NAME@INSTANCE.service)");
    }
    if !stem
        .replacen('@', "", 1)
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return bad("only A-Z a-z 0-9 _ - . : are allowed");
    }
    Ok(())
}

/// A unit name that passed validation and the host's allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlledUnit(String);

impl ControlledUnit {
    /// Admits `name` only if it is valid and `declared` lists it.
    pub fn admit(
        declared: &impl DeclaredUnits,
        name: &str,
    ) -> Result<ControlledUnit, SystemdError> {
        validate_unit_name(name).map_err(SystemdError::InvalidUnit)?;
        if declared.declares(name) {
            Ok(ControlledUnit(name.to_owned()))
        } else {
            Err(SystemdError::NotAllowed(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    Start,
    Stop,
    Restart,
    Reload,
}

impl UnitAction {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::Restart => "restart",
            UnitAction::Reload => "reload",
        }
    }
}

/// What systemd says about a unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitState {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub description: String,
    pub main_pid: u32,
    pub since: Option<SystemTime>,
    pub restart_count: u32,
    pub memory_bytes: u64,
    /// CPU time the unit's cgroup used (`CPUUsageNSec`), when accounted.
    pub cpu_usage_nsec: Option<u64>,
    pub fragment_path: String,
    /// Why the unit could not be queried, when it could not.
    pub error: String,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active" || self.active_state == "reloading"
    }
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// "done", "failed", "timeout", "canceled", "dependency", "skipped", ...
    pub result: String,
    pub took: Duration,
}

/// Where systemd's bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bus {
    System,
    Session,
    Address(String),
}

impl Bus {
    fn parse(bus: &str) -> Bus {
        match bus {
            "system" => Bus::System,
            "session" | "user" => Bus::Session,
            address => Bus::Address(address.to_owned()),
        }
    }
}

/// A handle on systemd; cheap to share behind an `Arc`.
pub struct Systemd {
    bus: Bus,
    bus_name: String,
    connection: tokio::sync::Mutex<Option<zbus::Connection>>,
}

/// Deadline for plain D-Bus calls (not jobs, which have their own).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl Systemd {
    pub fn new(bus: &str) -> Systemd {
        Systemd {
            bus: Bus::parse(bus),
            bus_name: bus.to_owned(),
            connection: tokio::sync::Mutex::new(None),
        }
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> SystemdError {
        SystemdError::Unavailable {
            bus: self.bus_name.clone(),
            reason: reason.to_string(),
        }
    }

    /// The live connection, made (again) if needed.
    async fn connection(&self) -> Result<zbus::Connection, SystemdError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let connect = async {
            match &self.bus {
                Bus::System => zbus::Connection::system().await,
                Bus::Session => zbus::Connection::session().await,
                Bus::Address(address) => {
                    zbus::connection::Builder::address(address.as_str())
                        .build()
                        .await
                }
            }
        };
        let conn = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| self.unavailable("timed out connecting"))?
            .map_err(|e| self.unavailable(e))?;
        // Job signals are only sent to subscribed clients.
        let manager = ManagerProxy::new(&conn)
            .await
            .map_err(|e| self.unavailable(e))?;
        manager.subscribe().await.map_err(|e| self.unavailable(e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a connection that failed, so the next call reconnects.
    async fn forget(&self, failed: &zbus::Connection) {
        let mut slot = self.connection.lock().await;
        if slot
            .as_ref()
            .is_some_and(|c| c.unique_name() == failed.unique_name())
        {
            *slot = None;
        }
    }

    /// Runs `op` on a connection; on a transport failure, reconnects once.
    async fn with_connection<T, F, Fut>(&self, op: F) -> Result<T, SystemdError>
    where
        F: Fn(zbus::Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let mut retried = false;
        loop {
            let conn = self.connection().await?;
            match op(conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(CallError::Transport(e)) => {
                    self.forget(&conn).await;
                    if retried {
                        return Err(self.unavailable(e));
                    }
                    tracing::info!("D-Bus connection lost ({e}); reconnecting");
                    retried = true;
                }
                Err(CallError::Systemd(e)) => return Err(e),
            }
        }
    }

    /// Status of any unit (read-only; the name must be valid).
    /// The state of a declared unit: undeclared units are not even read, so
    /// a reader learns nothing about the rest of the host.
    pub async fn status(&self, unit: &ControlledUnit) -> Result<UnitState, SystemdError> {
        let unit = unit.as_str();
        self.with_connection(|conn| async move { read_state(&conn, unit, false).await })
            .await
    }

    /// [`Systemd::status`] after asking systemd to load the unit (a
    /// template's instance is loaded only when something asks for it): the
    /// load state then says whether it can start.
    pub async fn status_loaded(&self, unit: &ControlledUnit) -> Result<UnitState, SystemdError> {
        let unit = unit.as_str();
        self.with_connection(|conn| async move { read_state(&conn, unit, true).await })
            .await
    }

    /// Starts, stops, restarts or reloads a unit and waits for the job.
    pub async fn act(
        &self,
        action: UnitAction,
        unit: &ControlledUnit,
        timeout: Duration,
    ) -> Result<JobOutcome, SystemdError> {
        let name = unit.as_str();
        self.with_connection(|conn| async move { run_job(&conn, action, name, timeout).await })
            .await
    }

    /// `systemctl daemon-reload`.
    pub async fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.with_connection(|conn| async move {
            let manager = ManagerProxy::new(&conn)
                .await
                .map_err(CallError::from_zbus)?;
            tokio::time::timeout(Duration::from_secs(90), manager.reload())
                .await
                .map_err(|_| {
                    CallError::Systemd(SystemdError::Timeout {
                        action: "daemon-reload",
                        unit: "systemd".into(),
                        after: Duration::from_secs(90),
                    })
                })?
                .map_err(|e| refusal("daemon-reload", "systemd", e))
        })
        .await
    }
}

/// A failed call: the transport (reconnect and retry) or systemd's answer.
enum CallError {
    Transport(zbus::Error),
    Systemd(SystemdError),
}

impl CallError {
    fn from_zbus(e: zbus::Error) -> CallError {
        match e {
            zbus::Error::MethodError(..) | zbus::Error::FDO(_) => {
                CallError::Systemd(SystemdError::Refused {
                    action: "query",
                    unit: String::new(),
                    reason: e.to_string(),
                })
            }
            other => CallError::Transport(other),
        }
    }
}

fn refusal(action: &'static str, unit: &str, e: zbus::Error) -> CallError {
    match e {
        zbus::Error::MethodError(_, ref message, _) => CallError::Systemd(SystemdError::Refused {
            action,
            unit: unit.to_owned(),
            reason: message.clone().unwrap_or_else(|| e.to_string()),
        }),
        zbus::Error::FDO(ref fdo) => CallError::Systemd(SystemdError::Refused {
            action,
            unit: unit.to_owned(),
            reason: fdo.to_string(),
        }),
        other => CallError::Transport(other),
    }
}

async fn run_job(
    conn: &zbus::Connection,
    action: UnitAction,
    unit: &str,
    timeout: Duration,
) -> Result<JobOutcome, CallError> {
    let manager = ManagerProxy::new(conn)
        .await
        .map_err(CallError::from_zbus)?;
    // Listen before asking, so a job that ends at once is not missed.
    let mut removed = manager
        .receive_job_removed()
        .await
        .map_err(CallError::from_zbus)?;
    let started = Instant::now();
    let name = unit.to_owned();
    let mode = "replace".to_owned();
    let job = match action {
        UnitAction::Start => manager.start_unit(name, mode).await,
        UnitAction::Stop => manager.stop_unit(name, mode).await,
        UnitAction::Restart => manager.restart_unit(name, mode).await,
        UnitAction::Reload => manager.reload_unit(name, mode).await,
    }
    .map_err(|e| refusal(action.as_str(), unit, e))?;
    let wait = async {
        while let Some(signal) = removed.next().await {
            let Ok(args) = signal.args() else { continue };
            if args.job.as_str() == job.as_str() {
                return Ok(args.result.clone());
            }
        }
        Err(CallError::Transport(zbus::Error::InputOutput(
            std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "signal stream ended",
            )),
        )))
    };
    let result = tokio::time::timeout(timeout, wait).await.map_err(|_| {
        CallError::Systemd(SystemdError::Timeout {
            action: action.as_str(),
            unit: unit.to_owned(),
            after: timeout,
        })
    })??;
    Ok(JobOutcome {
        result,
        took: started.elapsed(),
    })
}

async fn read_state(
    conn: &zbus::Connection,
    unit: &str,
    load: bool,
) -> Result<UnitState, CallError> {
    let manager = ManagerProxy::new(conn)
        .await
        .map_err(CallError::from_zbus)?;
    let mut state = UnitState {
        name: unit.to_owned(),
        ..Default::default()
    };
    // GetUnit does not load anything: a unit systemd does not know is "not-found".
    let found = if load {
        manager.load_unit(unit.to_owned()).await
    } else {
        manager.get_unit(unit.to_owned()).await
    };
    let path = match found {
        Ok(path) => path,
        Err(zbus::Error::MethodError(name, message, _))
            if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
        {
            state.load_state = "not-found".into();
            state.active_state = "inactive".into();
            state.sub_state = "dead".into();
            state.error = message.unwrap_or_default();
            return Ok(state);
        }
        Err(e) => return Err(refusal("status", unit, e)),
    };
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.freedesktop.systemd1")
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(CallError::from_zbus)?;
    let get_all = |interface: &'static str| {
        let props = &props;
        async move {
            let name = zbus::names::InterfaceName::from_static_str_unchecked(interface);
            tokio::time::timeout(CALL_TIMEOUT, props.get_all(name))
                .await
                .map_err(|_| {
                    CallError::Transport(zbus::Error::InputOutput(std::sync::Arc::new(
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "GetAll timed out"),
                    )))
                })?
                .map_err(|e| CallError::from_zbus(e.into()))
        }
    };
    let unit_props = get_all("org.freedesktop.systemd1.Unit").await?;
    state.load_state = string(&unit_props, "LoadState");
    state.active_state = string(&unit_props, "ActiveState");
    state.sub_state = string(&unit_props, "SubState");
    state.description = string(&unit_props, "Description");
    state.fragment_path = string(&unit_props, "FragmentPath");
    state.since = match number(&unit_props, "StateChangeTimestamp") {
        0 => None,
        micros => Some(SystemTime::UNIX_EPOCH + Duration::from_micros(micros)),
    };
    if unit.ends_with(".service") {
        let service = get_all("org.freedesktop.systemd1.Service").await?;
        state.main_pid = u32::try_from(number(&service, "MainPID")).unwrap_or(0);
        state.restart_count = u32::try_from(number(&service, "NRestarts")).unwrap_or(0);
        // systemd reports u64::MAX when memory accounting is off.
        state.memory_bytes = match number(&service, "MemoryCurrent") {
            u64::MAX => 0,
            bytes => bytes,
        };
        state.cpu_usage_nsec = match number(&service, "CPUUsageNSec") {
            u64::MAX => None,
            nsec => Some(nsec),
        };
    }
    Ok(state)
}

fn string(props: &HashMap<String, OwnedValue>, key: &str) -> String {
    props
        .get(key)
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_default()
}

fn number(props: &HashMap<String, OwnedValue>, key: &str) -> u64 {
    let Some(v) = props.get(key) else { return 0 };
    if let Ok(n) = u64::try_from(v) {
        return n;
    }
    if let Ok(n) = u32::try_from(v) {
        return u64::from(n);
    }
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_names() {
        assert!(validate_unit_name("covet.service").is_ok());
        assert!(validate_unit_name("postgresql@15-main.service").is_ok());
        assert!(validate_unit_name("covet@.service").is_err());
        assert!(validate_unit_name("@blue.service").is_err());
        assert!(validate_unit_name("covet@a@b.service").is_err());
        assert!(validate_unit_name("covet@../x.service").is_err());
        assert!(validate_unit_name("../x.service").is_err());
        assert!(validate_unit_name("a/b.service").is_err());
        assert!(validate_unit_name("covet").is_err());
        assert!(validate_unit_name("covet.exe").is_err());
        assert!(validate_unit_name("-x.service").is_err());
    }

    use super::*;

    #[test]
    fn bus_names() {
        assert_eq!(Bus::parse("system"), Bus::System);
        assert_eq!(Bus::parse("user"), Bus::Session);
        assert_eq!(
            Bus::parse("unix:path=/run/x/bus"),
            Bus::Address("unix:path=/run/x/bus".into())
        );
    }
}
