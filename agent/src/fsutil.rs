//! Small file-system helpers shared by the capabilities.

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
}
