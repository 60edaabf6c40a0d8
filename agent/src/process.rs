//! Running the app's declared commands (migrations): explicit argv, as the
//! app's user, with the app's env file as environment, bounded in time, each
//! output line handed to the caller as it comes.

use std::path::Path;
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
    #[error("cannot read env file {path}: {source}")]
    EnvFile {
        path: String,
        source: std::io::Error,
    },
    #[error("canceled")]
    Canceled,
}

/// The variables of an env file (`KEY=VALUE` lines, `export ` and quotes
/// allowed), as systemd's EnvironmentFile= would set them.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, ProcessError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProcessError::EnvFile {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect())
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
            cmd.uid(uid).gid(gid).env("HOME", home).env("USER", name);
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
    fn env_files_read_like_systemd() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.env");
        std::fs::write(&p, "# c\nA=1\nexport B=\"two words\"\n\nC='x'\n").unwrap();
        let env = read_env_file(&p).unwrap();
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x".into())
            ]
        );
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
