//! System users and groups from NSS (passwd, group): the one place the agent
//! looks them up, with the reentrant `*_r` calls (the agent is
//! multi-threaded) and a buffer that grows while it is too small.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// A system user as its passwd entry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

const FIRST_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 1 << 20;

/// Runs one reentrant NSS lookup, growing its buffer while the entry does
/// not fit. `lookup` returns the call's code and what it read from the
/// buffer (copied out: the entry points into it).
fn with_buffer<T>(
    mut lookup: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut buf: Vec<libc::c_char> = vec![0; FIRST_BUFFER];
    loop {
        match lookup(&mut buf) {
            (libc::ERANGE, _) if buf.len() < MAX_BUFFER => buf.resize(buf.len() * 4, 0),
            (0, found) => return Ok(found),
            // How some NSS modules say "no such entry".
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (rc, _) => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// # Safety
/// `text` must be null or point to a NUL-terminated string.
unsafe fn owned_text(text: *const libc::c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    let text = unsafe { CStr::from_ptr(text) };
    text.to_str().ok().map(str::to_owned)
}

/// The passwd entry of user `name`; `None` if there is no such user.
pub fn by_name(name: &str) -> io::Result<Option<Account>> {
    // A name with a NUL byte names nobody.
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buf| {
        // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives `entry`.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return (rc, None);
        }
        let home = if entry.pw_dir.is_null() {
            PathBuf::new()
        } else {
            // SAFETY: on success pw_dir points to a NUL-terminated string in `buf`.
            let dir = unsafe { CStr::from_ptr(entry.pw_dir) };
            PathBuf::from(OsStr::from_bytes(dir.to_bytes()))
        };
        let account = Account {
            name: name.to_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            home,
        };
        (0, Some(account))
    })
}

/// The (UTF-8) name of the user with id `uid`, if there is one.
pub fn name_of(uid: u32) -> Option<String> {
    with_buffer(|buf| {
        // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives `entry`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            return (rc, None);
        }
        // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
        (0, unsafe { owned_text(entry.pw_name) })
    })
    .ok()
    .flatten()
}

/// The (UTF-8) name of the group with id `gid`, if there is one.
pub fn group_name_of(gid: u32) -> Option<String> {
    group_entry(gid, |entry| {
        // SAFETY: on success gr_name points to a NUL-terminated string in the buffer.
        unsafe { owned_text(entry.gr_name) }
    })
}

/// The users listed as members of group `gid` (`/etc/group`'s list: users
/// whose primary group it is are not listed there).
pub fn group_members(gid: u32) -> Vec<String> {
    group_entry(gid, |entry| {
        let mut names = Vec::new();
        let mut member = entry.gr_mem;
        if member.is_null() {
            return Some(names);
        }
        // SAFETY: gr_mem is a NULL-terminated array of NUL-terminated
        // strings inside the buffer.
        unsafe {
            while !(*member).is_null() {
                names.push(CStr::from_ptr(*member).to_string_lossy().into_owned());
                member = member.add(1);
            }
        }
        Some(names)
    })
    .unwrap_or_default()
}

/// getgrgid_r of `gid`, `read` copying what is needed out of the entry.
fn group_entry<T>(gid: u32, read: impl Fn(&libc::group) -> Option<T>) -> Option<T> {
    with_buffer(|buf| {
        // SAFETY: an all-zero group is a valid value for getgrgid_r to fill.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives `entry`.
        let rc =
            unsafe { libc::getgrgid_r(gid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            return (rc, None);
        }
        (0, read(&entry))
    })
    .ok()
    .flatten()
}

/// The groups of user `name` as initgroups(3) would set them: its primary
/// group `gid` and every group listing it.
pub fn groups_of(name: &str, gid: u32) -> io::Result<Vec<libc::gid_t>> {
    let c_name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut count: libc::c_int = 64;
    // A user in more groups than the buffer holds: grow it and ask again.
    for _ in 0..8 {
        let mut groups: Vec<libc::gid_t> = vec![0; count.max(1) as usize];
        let asked = count;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many.
        let rc =
            unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return Ok(groups);
        }
        count = count.max(asked.saturating_mul(2));
    }
    Err(io::Error::other(format!(
        "user {name:?} is in too many groups"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_name_and_by_id() {
        let root = by_name("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.home, PathBuf::from("/root"));
        assert_eq!(name_of(0).as_deref(), Some("root"));
        assert_eq!(group_name_of(0).as_deref(), Some("root"));
    }

    #[test]
    fn unknown_users_are_none() {
        assert_eq!(by_name("no-such-user-covet").unwrap(), None);
        assert_eq!(by_name("nul\0name").unwrap(), None);
        assert_eq!(by_name("").unwrap(), None);
        assert_eq!(name_of(4_000_000_000), None);
        assert_eq!(group_name_of(4_000_000_000), None);
        assert!(group_members(4_000_000_000).is_empty());
    }

    #[test]
    fn groups_include_the_primary_group() {
        assert!(groups_of("root", 0).unwrap().contains(&0));
        // Not in passwd: only the group it was given.
        assert_eq!(groups_of("no-such-user-covet", 7).unwrap(), vec![7]);
        assert!(groups_of("nul\0name", 0).is_err());
    }
}
