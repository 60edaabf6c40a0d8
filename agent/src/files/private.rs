//! Files and directories only root may read: everything the agent keeps
//! under `state_dir` and `backup_dir` (operation records, kept env files,
//! backups) is 0600 or 0700, whatever the umask the agent was started with.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and missing parents as 0700, and narrows `dir` itself to
/// 0700 if it already existed wider.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates a new directory as 0700; fails if something is there already.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Opens `path` for writing as a 0600 file (created or truncated), never
/// through a symlink.
pub fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Writes `bytes` to `path` as a 0600 file and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = create_file(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Opens (creating) `path` for appending as a 0600 file, never through a
/// symlink, narrowing a file an older agent left wider.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn private_whatever_the_umask_and_never_through_links() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only affects this test process; restored below.
        let old = unsafe { libc::umask(0) };
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&nested), DIR_MODE);
        assert_eq!(mode(&dir.path().join("a")), DIR_MODE);
        let wide = dir.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, Permissions::from_mode(0o777)).unwrap();
        create_dir_all(&wide).unwrap();
        assert_eq!(mode(&wide), DIR_MODE);
        let file = nested.join("f");
        write_synced(&file, b"x").unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        drop(open_append(&nested.join("log")).unwrap());
        assert_eq!(mode(&nested.join("log")), FILE_MODE);
        unsafe { libc::umask(old) };

        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_synced(&link, b"evil").is_err());
        assert!(open_append(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
