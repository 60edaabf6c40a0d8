//! File-system helpers shared by the capabilities: `safe` resolves paths
//! beneath a directory without following links, `private` writes the agent's
//! own 0600/0700 state, and this module holds the small helpers.

pub mod private;
pub mod safe;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Sets access and modification times (seconds, nanoseconds) of `path`
/// itself, never following a symlink: std has no `lutimes`.
pub fn set_times_nofollow(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let spec = |(sec, nsec): (i64, i64)| libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    let times = [spec(atime), spec(mtime)];
    // SAFETY: `c_path` is NUL-terminated and `times` holds the two timespecs
    // utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SHA-256 over every entry of the tree at `root` (itself included, a plain
/// file being a tree of one): relative path, mode, inode, size and mtime,
/// and a symlink's target. Cheap (metadata only), and it moves when anything
/// is added, removed, replaced or written in place, as long as the writer
/// leaves a trace in size or mtime.
pub fn tree_fingerprint(root: &Path) -> io::Result<String> {
    let mut entries = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let mut entry = format!(
            "{}\0{:o} {} {} {}.{}",
            path.strip_prefix(root).unwrap_or(&path).display(),
            meta.mode(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        if meta.file_type().is_symlink() {
            entry.push_str(&format!(" -> {}", fs::read_link(&path)?.display()));
        } else if meta.is_dir() {
            for child in fs::read_dir(&path)? {
                stack.push(child?.path());
            }
        }
        entries.push(entry);
    }
    entries.sort_unstable();
    Ok(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        entries.join("\n").as_bytes(),
    )))
}

/// What statvfs(3) says of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Bytes available to unprivileged writers.
    pub available_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub read_only: bool,
}

/// [`FsSpace`] of the file system holding `path` (statvfs).
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c_path` is NUL-terminated; the out-value is written by the call.
    fs_space_with(|out| unsafe { libc::statvfs(c_path.as_ptr(), out) })
}

/// [`FsSpace`] of the file system holding the open `fd` (fstatvfs).
pub fn fs_space_of(fd: std::os::fd::BorrowedFd) -> io::Result<FsSpace> {
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is open for the call; the out-value is written by it.
    fs_space_with(|out| unsafe { libc::fstatvfs(fd.as_raw_fd(), out) })
}

fn fs_space_with(call: impl FnOnce(*mut libc::statvfs) -> libc::c_int) -> io::Result<FsSpace> {
    // SAFETY: an all-zero statvfs is a valid out-value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if call(&mut s) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FsSpace {
        available_bytes: widen(s.f_bavail).saturating_mul(widen(s.f_frsize)),
        inodes_total: widen(s.f_files),
        inodes_free: widen(s.f_ffree),
        read_only: s.f_flag & libc::ST_RDONLY != 0,
    })
}

/// Lossless widening whose source width depends on the target (fsfilcnt_t is
/// 32 bits on some), without tripping clippy's same-type-conversion lint.
fn widen<T: Into<u64>>(value: T) -> u64 {
    value.into()
}

/// The uids of the named members of group `gid` (`/etc/group`'s list;
/// users whose primary group it is are not listed there).
fn group_member_uids(gid: u32) -> Vec<u32> {
    crate::host::users::group_members(gid)
        .iter()
        .filter_map(|n| crate::host::users::by_name(n).ok().flatten().map(|a| a.uid))
        .collect()
}

/// Why a directory lets someone other than `trusted` (root and the app's
/// user) replace what is in it; `None` when it does not. Pure: mode bits,
/// owner, group and the group's member uids.
pub fn untrusted_writer(
    mode: u32,
    uid: u32,
    gid: u32,
    group_members: &[u32],
    trusted: &[u32],
) -> Option<String> {
    let sticky = mode & 0o1000 != 0;
    if !trusted.contains(&uid) {
        return Some(format!("it is owned by uid {uid}, who can change its mode"));
    }
    if mode & 0o002 != 0 && !sticky {
        return Some(format!(
            "it is writable by every user (mode {:o})",
            mode & 0o7777
        ));
    }
    if mode & 0o020 != 0
        && gid != 0
        && !sticky
        && let Some(other) = group_members.iter().find(|m| !trusted.contains(m))
    {
        return Some(format!(
            "it is writable by group {gid}, which has uid {other} as a member"
        ));
    }
    None
}

/// Ancestors of `path` (its parent up to `/`) that a user other than root
/// and `app_uid` could write, with the reason: such a user could swap
/// what the agent unpacks there. Missing ancestors are skipped.
pub fn untrusted_ancestors(path: &Path, app_uid: Option<u32>) -> Vec<(std::path::PathBuf, String)> {
    let trusted: Vec<u32> = std::iter::once(0).chain(app_uid).collect();
    path.ancestors()
        .skip(1)
        .filter(|dir| !dir.as_os_str().is_empty())
        .filter_map(|dir| {
            let meta = fs::metadata(dir).ok()?;
            let members = if meta.mode() & 0o020 != 0 {
                group_member_uids(meta.gid())
            } else {
                Vec::new()
            };
            untrusted_writer(meta.mode(), meta.uid(), meta.gid(), &members, &trusted)
                .map(|why| (dir.to_path_buf(), why))
        })
        .collect()
}

/// Whether the agent runs as root (it may then chown what it makes).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes a directory's entries (a rename, a new file) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Bytes available to unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    Ok(fs_space(path)?.available_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_fingerprints_move_with_any_change_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/a"), "1").unwrap();
        std::os::unix::fs::symlink("sub/a", root.join("link")).unwrap();
        let first = tree_fingerprint(&root).unwrap();
        assert_eq!(tree_fingerprint(&root).unwrap(), first);
        // Another name for an inode, added and removed outside the tree.
        fs::hard_link(root.join("sub/a"), dir.path().join("other")).unwrap();
        fs::remove_file(dir.path().join("other")).unwrap();
        assert_eq!(tree_fingerprint(&root).unwrap(), first);
        fs::write(root.join("sub/a"), "22").unwrap();
        assert_ne!(tree_fingerprint(&root).unwrap(), first);
        // A plain file is a tree of one; a missing path is an error.
        assert!(tree_fingerprint(&root.join("sub/a")).is_ok());
        assert!(tree_fingerprint(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn untrusted_writers_are_named_and_trusted_ones_are_not() {
        let trusted = [0, 1000];
        assert_eq!(untrusted_writer(0o755, 0, 0, &[], &trusted), None);
        assert_eq!(untrusted_writer(0o755, 1000, 1000, &[], &trusted), None);
        assert!(
            untrusted_writer(0o755, 1001, 0, &[], &trusted)
                .unwrap()
                .contains("uid 1001")
        );
        assert!(
            untrusted_writer(0o777, 0, 0, &[], &trusted)
                .unwrap()
                .contains("every user")
        );
        // /tmp: sticky, others cannot move or replace our names.
        assert_eq!(untrusted_writer(0o1777, 0, 0, &[], &trusted), None);
        assert!(
            untrusted_writer(0o775, 0, 50, &[1000, 1002], &trusted)
                .unwrap()
                .contains("uid 1002")
        );
        assert_eq!(untrusted_writer(0o775, 0, 50, &[1000], &trusted), None);
        assert_eq!(
            untrusted_writer(0o775, 0, 0, &[1002], &trusted),
            None,
            "root's group"
        );
    }

    #[test]
    fn untrusted_ancestors_of_real_directories() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let found = untrusted_ancestors(&open.join("app"), None);
        assert!(
            found
                .iter()
                .any(|(d, why)| d == &open && why.contains("every user")),
            "{found:?}"
        );
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let found = untrusted_ancestors(&open.join("app"), None);
        assert!(!found.iter().any(|(d, _)| d == &open), "{found:?}");
        let root = crate::host::users::by_name("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(
            crate::host::users::by_name("no-such-user-covet")
                .unwrap()
                .is_none()
        );
    }
}
