//! Running the app's declared commands (migrations): explicit argv, as the
//! app's user, with the app's env file as environment, bounded in time, each
//! output line handed to the caller as it comes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("no system user {0:?}")]
    UnknownUser(String),
    #[error("{program} did not finish within {}", humantime::format_duration(*after))]
    Timeout { program: String, after: Duration },
    #[error("{program} exited with {status}")]
    Failed { program: String, status: String },
    #[error("canceled")]
    Canceled,
}

/// uid, gid and home of a system user.
fn lookup_user(name: &str) -> Result<(u32, u32, String), ProcessError> {
    let c = std::ffi::CString::new(name).map_err(|_| ProcessError::UnknownUser(name.to_owned()))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwnam_r writes into `pwd`/`buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(ProcessError::UnknownUser(name.to_owned()));
    }
    // SAFETY: on success pw_dir points into `buf`, NUL-terminated.
    let home = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Ok((pwd.pw_uid, pwd.pw_gid, home))
}

/// The groups of `name` as initgroups(3) would set them: its primary group
/// `gid` and every group listing it.
pub fn supplementary_groups(name: &str, gid: u32) -> Result<Vec<libc::gid_t>, ProcessError> {
    let c = std::ffi::CString::new(name).map_err(|_| ProcessError::UnknownUser(name.to_owned()))?;
    let mut count: libc::c_int = 64;
    // A user in more groups than the buffer holds: grow it and ask again.
    for _ in 0..8 {
        let mut groups: Vec<libc::gid_t> = vec![0; count.max(1) as usize];
        let asked = count;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return Ok(groups);
        }
        count = count.max(asked.saturating_mul(2));
    }
    Err(ProcessError::UnknownUser(name.to_owned()))
}

/// The name of the user with id `uid`, if there is one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwuid_r writes into `pwd`/`buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points into `buf`, NUL-terminated.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// What one run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub took: Duration,
    pub lines: Vec<String>,
}

/// Runs `argv` (absolute program path) as `user` (when set), with exactly
/// `env` plus a minimal PATH/HOME, and hands each stdout/stderr line to
/// `on_line(is_stderr, line)`. Fails on a non-zero exit, a timeout, or
/// cancellation; the child is killed then.
pub async fn run(
    argv: &[String],
    user: Option<&str>,
    env: &[(String, String)],
    timeout: Duration,
    cancel: &std::sync::atomic::AtomicBool,
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> Result<RunReport, ProcessError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match user {
        Some(name) => {
            let (uid, gid, home) = lookup_user(name)?;
            let groups = supplementary_groups(name, gid)?;
            cmd.env("HOME", home).env("USER", name);
            // What initgroups(3) + setgid + setuid do, with the group list read
            // before the fork: only async-signal-safe syscalls run in the child.
            // SAFETY: the closure calls setgroups/setgid/setuid only.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.env("HOME", "/");
        }
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let lines = std::sync::Mutex::new(Vec::new());
    let pump = async {
        let read_out = async {
            if let Some(out) = stdout {
                let mut r = BufReader::new(out).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    on_line(false, &l);
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
            }
        };
        let read_err = async {
            if let Some(err) = stderr {
                let mut r = BufReader::new(err).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    on_line(true, &l);
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
            }
        };
        tokio::join!(read_out, read_err);
        child.wait().await
    };
    let canceled = async {
        while !cancel.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let status = tokio::select! {
        r = tokio::time::timeout(timeout, pump) => match r {
            Ok(status) => status.map_err(|source| ProcessError::Spawn { program: program.clone(), source })?,
            Err(_) => return Err(ProcessError::Timeout { program, after: timeout }),
        },
        () = canceled => return Err(ProcessError::Canceled),
    };
    if !status.success() {
        return Err(ProcessError::Failed {
            program,
            status: status.to_string(),
        });
    }
    Ok(RunReport {
        took: started.elapsed(),
        lines: lines.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_of_root_include_its_primary_group() {
        let groups = supplementary_groups("root", 0).unwrap();
        assert!(groups.contains(&0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert!(supplementary_groups("no-such-user-covet", 0).is_ok_and(|g| g == vec![0]));
    }

    #[tokio::test]
    async fn runs_with_exact_env_streams_lines_and_times_out() {
        let never = std::sync::atomic::AtomicBool::new(false);
        let seen = std::sync::Mutex::new(Vec::new());
        let on_line = |err: bool, l: &str| seen.lock().unwrap().push((err, l.to_owned()));
        let argv: Vec<String> = ["/usr/bin/env"].iter().map(|s| s.to_string()).collect();
        let env = vec![("ONLY".to_owned(), "this".to_owned())];
        let r = run(&argv, None, &env, Duration::from_secs(10), &never, &on_line)
            .await
            .unwrap();
        assert!(r.lines.contains(&"ONLY=this".to_owned()));
        assert!(
            !r.lines.iter().any(|l| l.starts_with("CARGO")),
            "{:?}",
            r.lines
        );
        let sleep: Vec<String> = ["/bin/sleep", "5"].iter().map(|s| s.to_string()).collect();
        let e = run(
            &sleep,
            None,
            &[],
            Duration::from_millis(200),
            &never,
            &on_line,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ProcessError::Timeout { .. }));
        let fail: Vec<String> = ["/bin/false"].iter().map(|s| s.to_string()).collect();
        assert!(matches!(
            run(&fail, None, &[], Duration::from_secs(5), &never, &on_line).await,
            Err(ProcessError::Failed { .. })
        ));
    }
}
