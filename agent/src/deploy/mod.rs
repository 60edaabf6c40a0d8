//! Deploys that run two versions side by side: the app's slots (`slots.rs`,
//! each a template instance on its own port, started from its own release)
//! and the proxy that sends the requests to them (`nginx.rs`). Blue-green
//! and canary upgrades (`workflow`) are built from these; nothing here
//! knows of operations or gRPC.

mod nginx;
mod slots;

pub use nginx::{Route, Traffic};
pub use slots::Slots;

use std::path::PathBuf;

use crate::host::process::ProcessError;
use crate::host::systemd::SystemdError;

/// The version the app serves: its live slot's, else its package's.
pub async fn serving_version(app: &crate::config::AppConfig) -> Option<String> {
    if let (Some(deploy), Some((live, _))) = (app.slotted(), serving_slot(app)) {
        return Slots::new(deploy).version_of(&live);
    }
    crate::packages::installed_version(app).await
}

/// The live slot and its port, for an app that serves from slots.
pub fn serving_slot(app: &crate::config::AppConfig) -> Option<(String, u16)> {
    let slots = Slots::new(app.slotted()?);
    let live = slots.live().ok()??;
    let port = slots.port(&live).ok()?;
    Some((live, port))
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} points at {target:?}, which is not a declared slot", path.display())]
    UnknownSlot { path: PathBuf, target: String },
    #[error("slot {0:?} is not declared in [app.deploy] slots")]
    NotASlot(String),
    #[error(
        "the new upstream file was refused by `{command}`, so nginx was not reloaded and the previous file is back:\n{output}"
    )]
    TestFailed { command: String, output: String },
    #[error(
        "nginx's configuration fails `{command}` as it is now, before any change; fix it, then deploy:\n{output}"
    )]
    ProxyBroken { command: String, output: String },
    #[error("`{command}` could not run: {source}")]
    Test {
        command: String,
        source: ProcessError,
    },
    #[error("reloading {unit}: {source}")]
    Reload { unit: String, source: SystemdError },
    #[error("the reload job of {unit} ended {result:?}")]
    ReloadJob { unit: String, result: String },
    #[error("file-system task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_error(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> DeployError {
    let path = path.to_owned();
    move |source| DeployError::Io {
        action,
        path,
        source,
    }
}

/// Replaces `path` by `bytes` atomically: a sibling temporary file, synced,
/// renamed over it, the directory synced. Never writes through a link.
fn replace_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), DeployError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.covet-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("replace", path))?;
    crate::files::fsync_dir(parent).map_err(io_error("sync", parent))
}
