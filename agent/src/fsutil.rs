//! Small file-system helpers shared by the capabilities.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
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
