//! What an upgrade keeps in `state_dir/ops/ID/` for its rollback, written
//! before the step that needs it acts, so it survives a crash: the
//! package's restore point, the env file as it was, and the fingerprints of
//! the backed-up paths. A persisted format: fields are only ever added.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StepError;
use crate::packages::RestorePoint;

const RESTORE_POINT: &str = "restore_point.json";
const FINGERPRINTS: &str = "fingerprints.json";
const ENV_BEFORE: &str = "env.before";
const SLOT_DEPLOY: &str = "slots.json";

/// One operation's directory.
#[derive(Debug, Clone)]
pub struct OpDir {
    dir: PathBuf,
}

impl OpDir {
    pub fn new(state_dir: &Path, op_id: &str) -> OpDir {
        OpDir {
            dir: state_dir.join("ops").join(op_id),
        }
    }

    pub fn create(&self) -> Result<(), StepError> {
        crate::files::private::create_dir_all(&self.dir).map_err(|source| StepError::Io {
            action: "create",
            path: self.dir.clone(),
            source,
        })
    }

    /// Where the config step keeps the env file as it was.
    pub fn env_before(&self) -> PathBuf {
        self.dir.join(ENV_BEFORE)
    }

    /// The restore point, or None when the package step never recorded one
    /// (it died before its install began).
    pub fn restore_point(&self) -> Result<Option<RestorePoint>, StepError> {
        read_json(&self.dir.join(RESTORE_POINT))
    }

    pub fn set_restore_point(&self, rp: &RestorePoint) -> Result<(), StepError> {
        write_json(&self.dir.join(RESTORE_POINT), rp)
    }

    /// Each backed-up path's fingerprint when the backup was taken; empty
    /// when none were recorded.
    pub fn fingerprints(&self) -> Result<BTreeMap<String, String>, StepError> {
        Ok(read_json(&self.dir.join(FINGERPRINTS))?.unwrap_or_default())
    }

    /// What a blue-green or canary start step recorded before it acted.
    pub fn slot_deploy(&self) -> Result<Option<super::slotted::SlotDeploy>, StepError> {
        read_json(&self.dir.join(SLOT_DEPLOY))
    }

    pub fn set_slot_deploy(&self, rec: &super::slotted::SlotDeploy) -> Result<(), StepError> {
        write_json(&self.dir.join(SLOT_DEPLOY), rec)
    }

    pub fn set_fingerprints(&self, prints: &BTreeMap<String, String>) -> Result<(), StepError> {
        write_json(&self.dir.join(FINGERPRINTS), prints)
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StepError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StepError::Json {
        path: path.to_owned(),
        source,
    })?;
    let tmp = path.with_extension("tmp");
    crate::files::private::write_synced(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| StepError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })
}

/// The file's value, or None when there is no such file.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StepError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StepError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StepError::Json {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_never_written_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let op = OpDir::new(dir.path(), "up-1");
        op.create().unwrap();
        assert_eq!(op.restore_point().unwrap(), None);
        assert!(op.fingerprints().unwrap().is_empty());
        let rp = RestorePoint::Release {
            current: "/srv/app/current".into(),
            previous_target: "releases/1.0".into(),
        };
        op.set_restore_point(&rp).unwrap();
        assert_eq!(op.restore_point().unwrap(), Some(rp));
        std::fs::write(dir.path().join("ops/up-1").join(RESTORE_POINT), "{").unwrap();
        assert!(matches!(op.restore_point(), Err(StepError::Json { .. })));
    }
}
