//! Descriptor-relative file operations that never follow a symlink: the
//! building blocks of extraction, staging and swaps in directories that a
//! less trusted user may be able to write.
//!
//! Every path handed to a [`Dir`] method is resolved beneath that directory
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, on kernels
//! without it, by a walk that opens each component `O_NOFOLLOW |
//! O_DIRECTORY`. Attributes are set on open descriptors, never by path.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once `openat2` answered ENOSYS (or is filtered): use the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// An open directory; everything below it is reached through it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `name` must be one plain component: no `/`, not `.` or `..`, not empty.
fn single(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    cstr(name)
}

/// The plain components of a relative path; `..`, absolute paths refused.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(Ok(part)),
            Component::CurDir => None,
            _ => Some(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} leaves its directory", rel.display()),
            ))),
        })
        .collect()
}

/// File metadata from `fstat`/`fstatat`.
pub type Stat = libc::stat;

/// What `stat` says a mode is.
pub fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn is_regular(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

pub fn is_symlink(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

fn fstat_fd(fd: BorrowedFd) -> io::Result<Stat> {
    // SAFETY: an all-zero stat is a valid out-value; fd is open.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

impl Dir {
    /// Opens the directory at `path`; its last component must not be a
    /// symlink (the ancestors are the host's configuration, trusted).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstr(path.as_os_str())?;
        // SAFETY: `c` is NUL-terminated; the result is checked.
        let fd = check(unsafe { libc::open(c.as_ptr(), DIR_FLAGS) })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(Dir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Another descriptor for the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn stat(&self) -> io::Result<Stat> {
        fstat_fd(self.fd.as_fd())
    }

    /// Metadata of `name` in this directory itself (a symlink is reported
    /// as one); `None` when it does not exist.
    pub fn stat_at(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        let c = single(name)?;
        // SAFETY: as in fstat_fd; `c` is NUL-terminated.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        let rc =
            unsafe { libc::fstatat(self.raw(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        match check(rc) {
            Ok(_) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens `rel` (relative, any depth) beneath this directory with
    /// `flags`, refusing any symlink on the way and at the end.
    fn open_beneath_raw(&self, rel: &Path, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        let parts = components(rel)?;
        if parts.is_empty() {
            return self.fd.try_clone();
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let joined: OsString = parts.join(OsStr::new("/"));
            let c = cstr(&joined)?;
            // SAFETY: an all-zero open_how is valid; fields set below.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
            how.mode = if flags & libc::O_CREAT != 0 {
                u64::from(mode)
            } else {
                0
            };
            how.resolve =
                libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
            // SAFETY: `c` and `how` outlive the call; the size is how's.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.raw(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if rc >= 0 {
                // SAFETY: a fresh descriptor from the kernel.
                return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Not there (old kernel) or blocked by a seccomp filter.
                Some(libc::ENOSYS | libc::EPERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
                _ => return Err(e),
            }
        }
        self.walk_open(&parts, flags, mode)
    }

    /// The fallback: each directory component `O_NOFOLLOW | O_DIRECTORY`.
    fn walk_open(&self, parts: &[&OsStr], flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        let (last, dirs) = parts
            .split_last()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))?;
        let mut current = self.try_clone()?;
        for part in dirs {
            current = current.open_dir(part)?;
        }
        current.openat(last, flags, mode)
    }

    fn openat(&self, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        let c = single(name)?;
        // SAFETY: `c` is NUL-terminated; the result is checked.
        let fd = check(unsafe {
            libc::openat(
                self.raw(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: a fresh descriptor from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The directory `name` right under this one (never through a symlink).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
        })
    }

    /// The directory at `rel` beneath this one.
    pub fn open_dir_beneath(&self, rel: &Path) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.open_beneath_raw(rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
        })
    }

    /// Creates the directories of `rel` that are missing (mode `mode`,
    /// before umask) and opens the last; never through a symlink.
    pub fn create_dirs_beneath(&self, rel: &Path, mode: u32) -> io::Result<Dir> {
        let mut current = self.try_clone()?;
        for part in components(rel)? {
            match current.mkdir(part, mode) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            current = current.open_dir(part)?;
        }
        Ok(current)
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let c = single(name)?;
        // SAFETY: `c` is NUL-terminated.
        check(unsafe { libc::mkdirat(self.raw(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
    }

    /// A new regular file `name` (it must not exist), open for writing.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = self.openat(name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)?;
        Ok(File::from(fd))
    }

    /// Opens the regular file `name` for reading; a symlink, FIFO, device
    /// or directory is refused with the `NotARegularFile` kind.
    pub fn open_regular(&self, name: &OsStr) -> io::Result<File> {
        // O_NONBLOCK: opening a FIFO must not hang before fstat refuses it.
        let fd = self
            .openat(name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is a symlink, which is never followed",
                            Path::new(name).display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        let st = fstat_fd(fd.as_fd())?;
        if !is_regular(&st) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file", Path::new(name).display()),
            ));
        }
        // Back to blocking reads.
        // SAFETY: fd is open; F_SETFL with plain flags.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_RDONLY) })?;
        Ok(File::from(fd))
    }

    pub fn symlink(&self, target: &Path, name: &OsStr) -> io::Result<()> {
        let t = cstr(target.as_os_str())?;
        let c = single(name)?;
        // SAFETY: both strings are NUL-terminated.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.raw(), c.as_ptr()) }).map(drop)
    }

    /// A hard link `name` here to `from_name` in `from` (a symlink is
    /// linked itself, never followed).
    pub fn hard_link(&self, from: &Dir, from_name: &OsStr, name: &OsStr) -> io::Result<()> {
        let f = single(from_name)?;
        let c = single(name)?;
        // SAFETY: both strings are NUL-terminated; flags 0 never follows.
        check(unsafe { libc::linkat(from.raw(), f.as_ptr(), self.raw(), c.as_ptr(), 0) }).map(drop)
    }

    /// Renames `name` here to `to_name` in `to` (same file system).
    pub fn rename(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        let f = single(name)?;
        let t = single(to_name)?;
        // SAFETY: both strings are NUL-terminated.
        check(unsafe { libc::renameat(self.raw(), f.as_ptr(), to.raw(), t.as_ptr()) }).map(drop)
    }

    /// Removes a file, symlink or empty directory `name`.
    pub fn remove(&self, name: &OsStr, is_directory: bool) -> io::Result<()> {
        let c = single(name)?;
        let flags = if is_directory { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `c` is NUL-terminated.
        check(unsafe { libc::unlinkat(self.raw(), c.as_ptr(), flags) }).map(drop)
    }

    /// Removes `name` and, if it is a directory, everything in it, through
    /// descriptors only; a missing `name` is fine.
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        let Some(st) = self.stat_at(name)? else {
            return Ok(());
        };
        if is_dir(&st) {
            let sub = self.open_dir(name)?;
            for child in sub.names()? {
                sub.remove_tree(&child)?;
            }
            self.remove(name, true)
        } else {
            self.remove(name, false)
        }
    }

    /// The names in this directory, without `.` and `..`.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        // A descriptor of its own: readdir moves the offset of the one it reads.
        // SAFETY: "." is NUL-terminated; the result is checked.
        let raw = check(unsafe { libc::openat(self.raw(), c".".as_ptr(), DIR_FLAGS) })?;
        // SAFETY: a fresh descriptor from the kernel.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fdopendir takes ownership of the descriptor on success.
        let stream = unsafe { libc::fdopendir(raw) };
        if stream.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(fd);
        let mut names = Vec::new();
        loop {
            // SAFETY: `stream` is a valid DIR* until closedir below.
            let entry = unsafe { libc::readdir(stream) };
            if entry.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated inside the entry.
            let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
            let bytes = name.to_bytes();
            if bytes != b"." && bytes != b".." {
                names.push(OsStr::from_bytes(bytes).to_owned());
            }
        }
        // SAFETY: closes the stream and its descriptor once.
        unsafe { libc::closedir(stream) };
        names.sort();
        Ok(names)
    }

    /// Changes the owner of `name` itself (a symlink is not followed).
    pub fn lchown(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        let c = single(name)?;
        // SAFETY: `c` is NUL-terminated.
        check(unsafe {
            libc::fchownat(self.raw(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
        })
        .map(drop)
    }

    /// Sets the mtime (and atime) of `name` itself, seconds since the epoch.
    pub fn set_mtime_nofollow(&self, name: &OsStr, secs: i64) -> io::Result<()> {
        let c = single(name)?;
        let spec = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: 0,
        };
        let times = [spec, spec];
        // SAFETY: `c` is NUL-terminated and `times` holds two timespecs.
        check(unsafe {
            libc::utimensat(
                self.raw(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// Bytes available to unprivileged writers on this file system.
    pub fn free_bytes(&self) -> io::Result<u64> {
        Ok(super::fs_space_of(self.fd.as_fd())?.available_bytes)
    }

    /// A `File` on this directory's descriptor, for fchown/fchmod/futimens.
    pub fn as_file(&self) -> io::Result<File> {
        Ok(File::from(self.fd.try_clone()?))
    }

    pub fn sync(&self) -> io::Result<()> {
        self.as_file()?.sync_all()
    }

    /// Writes everything pending on this directory's file system to disk
    /// (`syncfs`): one call for a whole extracted tree, instead of an
    /// `fsync` per file.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        // SAFETY: the descriptor is open for the whole call.
        check(unsafe { libc::syncfs(self.raw()) }).map(drop)
    }
}

/// A directory made for one extraction inside `parent`: an unpredictable
/// name, mode 0700, and checked with `fstat` to be the one just made
/// (a directory, owned by us, not reached through a link).
#[derive(Debug)]
pub struct Staging {
    pub parent: Dir,
    pub name: OsString,
    pub dir: Dir,
}

impl Staging {
    /// Creates `.{prefix}.{random}` in `parent`.
    pub fn create(parent: Dir, prefix: &str) -> io::Result<Staging> {
        let name = OsString::from(format!(".{prefix}.{}", random_suffix()?));
        parent.mkdir(&name, 0o700)?;
        let dir = parent.open_dir(&name)?;
        let st = dir.stat()?;
        let parent_st = parent.stat()?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if !is_dir(&st)
            || st.st_uid != me
            || st.st_mode & 0o077 != 0
            || st.st_dev != parent_st.st_dev
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the staging directory {} was replaced before it could be used",
                    Path::new(&name).display()
                ),
            ));
        }
        Ok(Staging { parent, name, dir })
    }

    /// Whether `name` in the parent is still this staging directory.
    pub fn still_in_place(&self) -> bool {
        match (self.parent.stat_at(&self.name), self.dir.stat()) {
            (Ok(Some(there)), Ok(mine)) => {
                there.st_dev == mine.st_dev && there.st_ino == mine.st_ino
            }
            _ => false,
        }
    }

    /// Empties the staging directory through its descriptor, then removes
    /// its name from the parent if that name is still this directory.
    pub fn remove(&self) -> io::Result<()> {
        for child in self.dir.names()? {
            self.dir.remove_tree(&child)?;
        }
        if self.still_in_place() {
            self.parent.remove(&self.name, true)?;
        }
        Ok(())
    }
}

/// 128 random bits, hex: names no other user can guess in advance.
pub fn random_suffix() -> io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io::Error::other("the system random generator failed"))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn beneath_refuses_symlinks_and_dotdot_in_both_resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        symlink("../outside", root.join("a/link")).unwrap();
        symlink(tmp.path().join("outside"), root.join("abs")).unwrap();
        let dir = Dir::open(&root).unwrap();
        for walk in [false, true] {
            NO_OPENAT2.store(walk, Ordering::Relaxed);
            assert!(dir.open_dir_beneath(Path::new("a/b")).is_ok());
            assert!(dir.open_dir_beneath(Path::new("a/link")).is_err());
            assert!(dir.open_dir_beneath(Path::new("abs")).is_err());
            assert!(dir.open_dir_beneath(Path::new("../root")).is_err());
            assert!(dir.open_dir_beneath(Path::new("/etc")).is_err());
            assert!(
                dir.create_dirs_beneath(Path::new("a/link/x"), 0o755)
                    .is_err()
            );
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
        assert!(!tmp.path().join("outside/x").exists());
        assert!(
            Dir::open(&root.join("abs")).is_err(),
            "last component is never followed"
        );
    }

    #[test]
    fn regular_files_only_and_names_are_single_components() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), "x").unwrap();
        symlink("/etc/passwd", tmp.path().join("l")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.open_regular(OsStr::new("f")).is_ok());
        let e = dir.open_regular(OsStr::new("l")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(dir.open_regular(OsStr::new(".")).is_err());
        assert!(dir.create_file(OsStr::new("a/b"), 0o600).is_err());
        assert!(dir.create_file(OsStr::new(".."), 0o600).is_err());
        assert!(
            dir.create_file(OsStr::new("l"), 0o600).is_err(),
            "never through a link"
        );
    }

    #[test]
    fn staging_is_private_unpredictable_and_removed_by_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Staging::create(Dir::open(tmp.path()).unwrap(), "x.restore").unwrap();
        let b = Staging::create(Dir::open(tmp.path()).unwrap(), "x.restore").unwrap();
        assert_ne!(a.name, b.name);
        let st = a.dir.stat().unwrap();
        assert_eq!(st.st_mode & 0o777, 0o700);
        a.dir.create_dirs_beneath(Path::new("p/q"), 0o755).unwrap();
        a.dir
            .open_dir_beneath(Path::new("p/q"))
            .unwrap()
            .create_file(OsStr::new("f"), 0o600)
            .unwrap();
        // Moved away and replaced by a link: removal empties the moved
        // directory and leaves the link's target alone.
        fs::create_dir(tmp.path().join("victim")).unwrap();
        fs::write(tmp.path().join("victim/keep"), "k").unwrap();
        fs::rename(tmp.path().join(&a.name), tmp.path().join("moved")).unwrap();
        symlink("victim", tmp.path().join(&a.name)).unwrap();
        assert!(!a.still_in_place());
        a.remove().unwrap();
        assert!(tmp.path().join("victim/keep").exists());
        assert!(
            fs::read_dir(tmp.path().join("moved"))
                .unwrap()
                .next()
                .is_none()
        );
        b.remove().unwrap();
        assert!(!tmp.path().join(&b.name).exists());
    }
}
