//! Why a step or its undo failed: typed, so the outcome and the operator's
//! message are decided from what happened, not from strings.

use std::path::PathBuf;

use crate::backup::BackupError;
use crate::db::DbError;
use crate::host::envfile::EnvError;
use crate::host::process::ProcessError;
use crate::host::systemd::SystemdError;
use crate::packages::PackageError;
use crate::probes::ProbeError;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("canceled")]
    Canceled,
    /// The step failed after a cancel was asked: the cancel is why.
    #[error("canceled ({0})")]
    CanceledDuring(Box<StepError>),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(
        "app {app} declares no user for its hooks and hooks never run as root: set user (or \
         run_hooks_as_root = true) in its [[app]] config"
    )]
    NoHookUser { app: String },
    #[error("app {0} declares no [app.package]")]
    NoPackage(String),
    #[error("the {action} job of {unit} ended {result:?}")]
    Job {
        action: &'static str,
        unit: String,
        result: String,
    },
    #[error("{unit} is {active}/{sub} {when}")]
    UnitNotActive {
        unit: String,
        active: String,
        sub: String,
        when: &'static str,
    },
    #[error("{target} after {attempts} attempt(s): {error}")]
    Unhealthy {
        target: String,
        attempts: u32,
        error: String,
    },
    #[error("{name} ({target}): {error}")]
    SmokeFailed {
        name: String,
        target: String,
        error: String,
    },
    #[error("health regressed during the watch window: {0}")]
    Regressed(String),
    /// A metric analysis rule failed during the watch window (the cause
    /// names the rule, its baseline, value and limit).
    #[error("{0}")]
    Analysis(String),
    #[error("backup {backup} does not hold {what}")]
    NotInBackup { backup: String, what: String },
    #[error("no backup was made, so {0} cannot be put back")]
    NoBackup(&'static str),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("file-system task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Deploy(#[from] crate::deploy::DeployError),
    #[error(
        "app {0} does not deploy in slots (no [app.deploy] blue-green or canary with [app.traffic])"
    )]
    NotSlotted(String),
    #[error(
        "port {port} of slot {slot} is in use by a program other than {unit}: free it or give the slot another port in [app.deploy] slots"
    )]
    PortInUse {
        slot: String,
        port: u16,
        unit: String,
    },
    #[error("unit {unit} is not loaded ({state}): is the unit template installed?")]
    UnitNotLoaded { unit: String, state: String },
    #[error("the start step's record of the slots is missing from the operation's directory")]
    NoSlotRecord,
    #[error("{url} does not answer version {version} after the switch: {error}")]
    NotServing {
        url: String,
        version: String,
        error: String,
    },
}

impl StepError {
    /// The error as the cancel explains it, when a cancel was asked.
    pub fn canceled_if(self, canceled: bool) -> StepError {
        match self {
            StepError::Canceled | StepError::CanceledDuring(_) => self,
            e if canceled => StepError::CanceledDuring(Box::new(e)),
            e => e,
        }
    }

    /// Whether the snapshot or kept file of a restore point cannot be used,
    /// so the package must come back from the backup or the repository.
    pub fn restore_point_unusable(&self) -> bool {
        matches!(
            self,
            StepError::Package(
                PackageError::SnapshotChanged { .. } | PackageError::RestorePointGone { .. }
            )
        )
    }
}
