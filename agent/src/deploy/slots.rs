//! The app's slots on disk, under `[app.deploy] slots_dir`:
//!
//! - `SLOT` — a link to the release virtualenv the slot runs
//!   (`releases_dir/VERSION/venv`); the unit template starts
//!   `slots_dir/%i/bin/...`;
//! - `SLOT.env` — the slot's own environment (`PORT`, `COVET_SLOT`), for
//!   the template's `EnvironmentFile=`;
//! - `live` — a link to the name of the slot that takes the requests
//!   (absent before the first slotted deploy).
//!
//! Every link is replaced atomically (a new link renamed over the old), so
//! a crash leaves the old or the new, never neither.

use std::path::{Path, PathBuf};

use super::{DeployError, io_error, replace_file};
use crate::config::DeployConfig;

/// The variable of `SLOT.env` that holds the slot's port.
pub(crate) const SLOT_ENV_PORT: &str = "PORT";
const LIVE: &str = "live";

/// The declared slots of one app.
#[derive(Debug, Clone, Copy)]
pub struct Slots<'a> {
    cfg: &'a DeployConfig,
}

impl<'a> Slots<'a> {
    pub fn new(cfg: &'a DeployConfig) -> Slots<'a> {
        Slots { cfg }
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.slots_dir
    }

    /// The slot's port, or NotASlot.
    pub fn port(&self, slot: &str) -> Result<u16, DeployError> {
        self.cfg
            .slots
            .get(slot)
            .copied()
            .ok_or_else(|| DeployError::NotASlot(slot.to_owned()))
    }

    /// The slot's unit (`covet@blue.service`).
    pub fn unit(&self, slot: &str) -> String {
        self.cfg.instance(slot)
    }

    /// The slot that takes the requests, if a slotted deploy ever switched.
    pub fn live(&self) -> Result<Option<String>, DeployError> {
        let path = self.dir().join(LIVE);
        match std::fs::read_link(&path) {
            Ok(target) => {
                let name = target.to_string_lossy().into_owned();
                if self.cfg.slots.contains_key(&name) {
                    Ok(Some(name))
                } else {
                    Err(DeployError::UnknownSlot { path, target: name })
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path)(e)),
        }
    }

    /// The slot a deploy starts the new version in: the one that is not
    /// live (the first declared one before any deploy).
    pub fn idle(&self) -> Result<String, DeployError> {
        let live = self.live()?;
        self.cfg
            .slots
            .keys()
            .find(|s| Some(*s) != live.as_ref())
            .cloned()
            .ok_or_else(|| DeployError::NotASlot("(no idle slot)".into()))
    }

    /// Where the slot's link points (its release's virtualenv), if anywhere.
    pub fn release_of(&self, slot: &str) -> Option<PathBuf> {
        std::fs::read_link(self.dir().join(slot)).ok()
    }

    /// The version the slot runs, from its release's name.
    pub fn version_of(&self, slot: &str) -> Option<String> {
        crate::packages::release_version_of(&self.release_of(slot)?)
    }

    /// Points the slot at `release` (or removes its link) and writes its
    /// environment file.
    pub fn point(&self, slot: &str, release: Option<&Path>) -> Result<(), DeployError> {
        let port = self.port(slot)?;
        std::fs::create_dir_all(self.dir()).map_err(io_error("create", self.dir()))?;
        let env = format!("# written by covet-agent\nCOVET_SLOT={slot}\n{SLOT_ENV_PORT}={port}\n");
        replace_file(
            &self.dir().join(format!("{slot}.env")),
            env.as_bytes(),
            0o644,
        )?;
        match release {
            Some(target) => replace_link(&self.dir().join(slot), target),
            None => remove_link(&self.dir().join(slot)),
        }
    }

    /// Makes `slot` the live one (or none: before the first deploy).
    pub fn set_live(&self, slot: Option<&str>) -> Result<(), DeployError> {
        let path = self.dir().join(LIVE);
        match slot {
            Some(slot) => {
                self.port(slot)?;
                std::fs::create_dir_all(self.dir()).map_err(io_error("create", self.dir()))?;
                replace_link(&path, Path::new(slot))
            }
            None => remove_link(&path),
        }
    }
}

fn replace_link(path: &Path, target: &Path) -> Result<(), DeployError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.covet-link"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_error("link", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("replace", path))?;
    crate::files::fsync_dir(parent).map_err(io_error("sync", parent))
}

fn remove_link(path: &Path) -> Result<(), DeployError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Strategy;
    use std::time::Duration;

    fn deploy(dir: &Path) -> DeployConfig {
        DeployConfig {
            strategy: Strategy::BlueGreen,
            unit_template: "covet@.service".into(),
            slots: [("blue".to_owned(), 8001), ("green".to_owned(), 8002)].into(),
            drain: Duration::from_secs(1),
            slots_dir: dir.to_owned(),
            canary_percent: 10,
            database_on_rollback: Default::default(),
        }
    }

    #[test]
    fn the_idle_slot_is_the_one_not_live_and_links_swap_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = deploy(&dir.path().join("slots"));
        let slots = Slots::new(&cfg);
        assert_eq!(slots.live().unwrap(), None);
        assert_eq!(slots.idle().unwrap(), "blue");
        assert_eq!(slots.unit("green"), "covet@green.service");

        let release = dir.path().join("releases/0.2.0/venv");
        std::fs::create_dir_all(&release).unwrap();
        std::fs::write(
            release.parent().unwrap().join(".covet-release-complete"),
            "",
        )
        .unwrap();
        slots.point("blue", Some(&release)).unwrap();
        slots.set_live(Some("blue")).unwrap();
        assert_eq!(slots.live().unwrap().as_deref(), Some("blue"));
        assert_eq!(slots.idle().unwrap(), "green");
        assert_eq!(slots.version_of("blue").as_deref(), Some("0.2.0"));
        assert_eq!(slots.version_of("green"), None);
        let env = std::fs::read_to_string(cfg.slots_dir.join("blue.env")).unwrap();
        assert!(env.contains("PORT=8001") && env.contains("COVET_SLOT=blue"));

        slots.point("blue", None).unwrap();
        assert_eq!(slots.release_of("blue"), None);
        assert!(matches!(
            slots.set_live(Some("red")),
            Err(DeployError::NotASlot(_))
        ));
        // A live link naming no declared slot is refused, not guessed at.
        std::fs::remove_file(cfg.slots_dir.join("live")).unwrap();
        std::os::unix::fs::symlink("red", cfg.slots_dir.join("live")).unwrap();
        assert!(matches!(slots.live(), Err(DeployError::UnknownSlot { .. })));
    }
}
