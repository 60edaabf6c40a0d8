//! The one runner of external programs: an explicit argv (an absolute
//! program path, never a shell), optionally as a system user with that
//! user's groups, with exactly the environment given, bounded in time,
//! cancelable, its output lines streamed to the caller as they come and the
//! last ones kept for the error. Callers that do their own I/O on the pipes
//! (the database dump and restore, `journalctl --follow`) take a child
//! spawned under the same rules from [`ProcessBuilder::spawn`].

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::host::users::{self, Account};

/// PATH of every child unless its caller sets one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Output lines kept for a failure's message.
pub const DEFAULT_TAIL_LINES: usize = 20;
/// Error output kept by [`ProcessBuilder::output`]; a runaway program must
/// not fill memory.
pub const STDERR_CAP: usize = 64 * 1024;
/// How often a run looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{} is not an absolute path (no PATH lookup)", .0.display())]
    NotAbsolute(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        /// The user it was to run as, if not the agent's own.
        user: Option<String>,
        source: io::Error,
    },
    #[error("no system user {0:?}")]
    UnknownUser(String),
    #[error("cannot look up system user {name:?}: {source}")]
    UserLookup { name: String, source: io::Error },
    #[error("{program} did not finish within {}", humantime::format_duration(*after))]
    Timeout { program: String, after: Duration },
    #[error("{program} exited with {status}{}", tail_text(tail))]
    Failed {
        program: String,
        status: ExitStatus,
        /// The last lines of its stderr, or of its stdout when stderr was empty.
        tail: Vec<String>,
    },
    #[error("canceled")]
    Canceled,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {}", tail.join("\n"))
    }
}

/// A system user to run as, with its groups read before any fork.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub account: Account,
    groups: Vec<libc::gid_t>,
}

impl RunAs {
    /// `name`'s uid, gid, home and supplementary groups.
    pub fn lookup(name: &str) -> Result<RunAs, ProcessError> {
        let account = users::by_name(name)
            .map_err(|source| ProcessError::UserLookup {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| ProcessError::UnknownUser(name.to_owned()))?;
        let groups =
            users::groups_of(name, account.gid).map_err(|source| ProcessError::UserLookup {
                name: name.to_owned(),
                source,
            })?;
        Ok(RunAs { account, groups })
    }
}

/// What the child reads.
#[derive(Debug, Clone)]
enum Input {
    Null,
    Bytes(Vec<u8>),
    /// A pipe the caller writes (only through [`ProcessBuilder::spawn`]).
    Piped,
}

/// One external program to run: see the module documentation.
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    user: Option<RunAs>,
    current_dir: Option<PathBuf>,
    timeout: Option<Duration>,
    cancel: Option<Arc<AtomicBool>>,
    input: Input,
    tail_lines: usize,
    keep_lines: bool,
}

/// What one [`ProcessBuilder::run`] did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub took: Duration,
    /// Every output line, stdout and stderr as they came, if
    /// [`ProcessBuilder::keep_lines`] was asked; else empty.
    pub lines: Vec<String>,
}

/// What one [`ProcessBuilder::output`] read; its status is not judged.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// At most [`STDERR_CAP`] bytes, then a note of how many more there were.
    pub stderr: String,
}

impl ProcessBuilder {
    /// `program` must be an absolute path; the child starts with stdin
    /// closed, no environment but PATH, in the agent's working directory,
    /// without a time limit.
    pub fn new(program: impl Into<PathBuf>) -> ProcessBuilder {
        ProcessBuilder {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            user: None,
            current_dir: None,
            timeout: None,
            cancel: None,
            input: Input::Null,
            tail_lines: DEFAULT_TAIL_LINES,
            keep_lines: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// One variable of the child's environment (a later one of the same
    /// name wins). PATH is [`DEFAULT_PATH`] unless set here.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// Runs as `user` with its groups, HOME and USER (over any set with
    /// [`ProcessBuilder::env`]). When the agent already is that user,
    /// nothing is switched.
    pub fn user(mut self, user: RunAs) -> Self {
        self.user = Some(user);
        self
    }

    /// [`ProcessBuilder::user`] of the system user `name`.
    pub fn user_named(self, name: &str) -> Result<Self, ProcessError> {
        Ok(self.user(RunAs::lookup(name)?))
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Killed when it runs longer (spawn to exit, output read to its end).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Killed once `flag` is set.
    pub fn cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// What the child reads on its stdin (written while its output is read).
    pub fn stdin_bytes(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.input = Input::Bytes(input.into());
        self
    }

    /// A stdin pipe for the caller of [`ProcessBuilder::spawn`] to write.
    pub fn stdin_piped(mut self) -> Self {
        self.input = Input::Piped;
        self
    }

    /// Lines of output a failure's error keeps.
    pub fn tail_lines(mut self, lines: usize) -> Self {
        self.tail_lines = lines;
        self
    }

    /// [`RunReport::lines`] gets every line, not only the tail.
    pub fn keep_lines(mut self) -> Self {
        self.keep_lines = true;
        self
    }

    /// The program's path as messages show it.
    pub fn program(&self) -> &Path {
        &self.program
    }

    fn program_text(&self) -> String {
        self.program.display().to_string()
    }

    /// The std command: argv, exact environment, user, stdio (stdout and
    /// stderr piped). For a short synchronous run; async callers use
    /// [`ProcessBuilder::spawn`], which also kills the child when dropped.
    pub fn std_command(&self) -> Result<std::process::Command, ProcessError> {
        if !self.program.is_absolute() {
            return Err(ProcessError::NotAbsolute(self.program.clone()));
        }
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(match self.input {
                Input::Null => Stdio::null(),
                Input::Bytes(_) | Input::Piped => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        if let Some(run_as) = &self.user {
            let account = &run_as.account;
            cmd.env("HOME", &account.home).env("USER", &account.name);
            // SAFETY: geteuid(2) has no preconditions.
            if account.uid != unsafe { libc::geteuid() } {
                let (uid, gid, groups) = (account.uid, account.gid, run_as.groups.clone());
                use std::os::unix::process::CommandExt;
                // What initgroups(3) + setgid + setuid do, with the group
                // list read before the fork: only async-signal-safe syscalls
                // run in the child. No runuser: no PAM session, and a kill
                // reaches the program itself.
                // SAFETY: the closure calls setgroups/setgid/setuid only.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                            || libc::setgid(gid) != 0
                            || libc::setuid(uid) != 0
                        {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        Ok(cmd)
    }

    /// Starts the child (killed when the [`Child`] is dropped); the caller
    /// does its I/O and waits. The time limit, cancel flag and stdin bytes
    /// are the caller's to apply.
    pub fn spawn(&self) -> Result<Child, ProcessError> {
        let mut cmd = Command::from(self.std_command()?);
        cmd.kill_on_drop(true);
        cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: self.program_text(),
            user: self.user.as_ref().map(|u| u.account.name.clone()),
            source,
        })
    }

    /// Runs to the end, handing each output line to `on_line(is_stderr,
    /// line)` as it comes. Fails on a non-zero exit (with the tail of its
    /// output), on the time limit and on cancel; the child is killed then.
    pub async fn run(
        self,
        on_line: &(dyn Fn(bool, &str) + Send + Sync),
    ) -> Result<RunReport, ProcessError> {
        let started = Instant::now();
        let program = self.program_text();
        let kept = std::sync::Mutex::new(Vec::new());
        let keep = |line: &str| {
            if self.keep_lines {
                kept.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.to_owned());
            }
        };
        let mut child = self.spawn()?;
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let on_out = |l: &str| {
            on_line(false, l);
            keep(l);
        };
        let on_err = |l: &str| {
            on_line(true, l);
            keep(l);
        };
        let work = async {
            let (_, out_tail, err_tail) = tokio::join!(
                self.write_input(stdin),
                stream_lines(stdout, self.tail_lines, &on_out),
                stream_lines(stderr, self.tail_lines, &on_err),
            );
            let status = child.wait().await.map_err(|source| ProcessError::Io {
                context: format!("wait for {program}"),
                source,
            })?;
            Ok((status, out_tail, err_tail))
        };
        // On the heap: callers' futures (the whole upgrade) stay small.
        let (status, out_tail, err_tail) = match Box::pin(self.limited(work)).await {
            Ok(done) => done,
            Err(e) => {
                kill(&mut child).await;
                return Err(e);
            }
        };
        if !status.success() {
            let tail = if err_tail.is_empty() {
                out_tail
            } else {
                err_tail
            };
            return Err(ProcessError::Failed {
                program,
                status,
                tail: tail.into(),
            });
        }
        Ok(RunReport {
            took: started.elapsed(),
            lines: kept.into_inner().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// Runs to the end and returns its whole stdout and (capped) stderr,
    /// whatever its exit status. Fails on the time limit and on cancel (the
    /// child is killed then), and when its input could not be written
    /// although it succeeded (a program that exits without reading all of
    /// it is fine).
    pub async fn output(self) -> Result<Output, ProcessError> {
        let program = self.program_text();
        let mut child = self.spawn()?;
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let work = async {
            let read_out = async {
                let mut out = Vec::new();
                if let Some(mut stdout) = stdout {
                    stdout.read_to_end(&mut out).await?;
                }
                Ok::<_, io::Error>(out)
            };
            let read_err = async {
                match stderr {
                    Some(stderr) => read_capped(stderr).await,
                    None => String::new(),
                }
            };
            let (written, stdout, stderr) =
                tokio::join!(self.write_input(stdin), read_out, read_err);
            let status = child.wait().await.map_err(|source| ProcessError::Io {
                context: format!("wait for {program}"),
                source,
            })?;
            if status.success()
                && let Err(source) = written
            {
                return Err(ProcessError::Io {
                    context: format!("write to {program}"),
                    source,
                });
            }
            let stdout = stdout.map_err(|source| ProcessError::Io {
                context: format!("read {program} output"),
                source,
            })?;
            Ok(Output {
                status,
                stdout,
                stderr,
            })
        };
        // On the heap: callers' futures (the whole upgrade) stay small.
        let output = Box::pin(self.limited(work)).await;
        if output.is_err() {
            kill(&mut child).await;
        }
        output
    }

    /// `work` within the time limit and until the cancel flag is set.
    async fn limited<T>(
        &self,
        work: impl Future<Output = Result<T, ProcessError>>,
    ) -> Result<T, ProcessError> {
        let timed =
            async {
                match self.timeout {
                    Some(after) => tokio::time::timeout(after, work).await.map_err(|_| {
                        ProcessError::Timeout {
                            program: self.program_text(),
                            after,
                        }
                    })?,
                    None => work.await,
                }
            };
        match &self.cancel {
            Some(flag) => tokio::select! {
                done = timed => done,
                () = canceled(flag) => Err(ProcessError::Canceled),
            },
            None => timed.await,
        }
    }

    /// Writes the stdin bytes, if any, then closes the pipe. A broken pipe
    /// is no error: the program read what it wanted.
    async fn write_input(&self, stdin: Option<tokio::process::ChildStdin>) -> io::Result<()> {
        let (Input::Bytes(bytes), Some(mut pipe)) = (&self.input, stdin) else {
            return Ok(());
        };
        match pipe.write_all(bytes).await {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e),
            _ => Ok(()),
        }
    }
}

/// Kills the child and reaps it, so that it is gone when the error returns.
async fn kill(child: &mut Child) {
    if let Err(e) = child.kill().await {
        tracing::warn!("could not kill a child process: {e}");
    }
}

/// Resolves once `flag` is set.
pub async fn canceled(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// Hands each line (without its line end; invalid UTF-8 replaced) to
/// `on_line`; returns the last `keep` lines.
async fn stream_lines(
    stream: Option<impl AsyncRead + Unpin>,
    keep: usize,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> VecDeque<String> {
    let mut tail = VecDeque::new();
    let Some(stream) = stream else { return tail };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        on_line(line);
        if keep > 0 {
            if tail.len() == keep {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
    }
    tail
}

/// All of `r` is read (so the writer never blocks), the first
/// [`STDERR_CAP`] bytes kept.
pub async fn read_capped(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let room = STDERR_CAP.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..room]);
        dropped += n - room;
    }
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    if dropped > 0 {
        text.push_str(&format!("\n[{dropped} more bytes not kept]"));
    }
    text
}

/// The app's declared commands (migrations and their dry run and rollback):
/// `argv` as `user` (when set, with its groups; else the agent's own user
/// with HOME=/), with exactly `env` plus PATH, each output line handed to
/// `on_line(is_stderr, line)`. Every line is kept in the report.
pub async fn run(
    argv: &[String],
    user: Option<&str>,
    env: &[(String, String)],
    timeout: Duration,
    cancel: &AtomicBool,
    on_line: &(dyn Fn(bool, &str) + Send + Sync),
) -> Result<RunReport, ProcessError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| ProcessError::NotAbsolute(PathBuf::new()))?;
    let command = ProcessBuilder::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .timeout(timeout)
        .keep_lines();
    let command = match user {
        Some(name) => command.user_named(name)?,
        None => command.env("HOME", "/"),
    };
    // The caller's flag is borrowed: dropping the run kills the child.
    tokio::select! {
        done = Box::pin(command.run(on_line)) => done,
        () = canceled(cancel) => Err(ProcessError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    fn quiet(_: bool, _: &str) {}

    #[tokio::test]
    async fn the_environment_is_exactly_what_was_given() {
        let r = ProcessBuilder::new("/usr/bin/env")
            .env("ONLY", "this")
            .keep_lines()
            .run(&quiet)
            .await
            .unwrap();
        let mut lines = r.lines.clone();
        lines.sort();
        assert_eq!(
            lines,
            vec![format!("ONLY=this"), format!("PATH={DEFAULT_PATH}")]
        );
        let r = ProcessBuilder::new("/usr/bin/env")
            .env("PATH", "/bin")
            .env("A", "1")
            .env("A", "2")
            .keep_lines()
            .run(&quiet)
            .await
            .unwrap();
        assert!(r.lines.contains(&"PATH=/bin".to_owned()), "{:?}", r.lines);
        assert!(r.lines.contains(&"A=2".to_owned()), "{:?}", r.lines);
    }

    #[tokio::test]
    async fn lines_are_streamed_with_their_stream_and_tail_kept_on_failure() {
        let seen = std::sync::Mutex::new(Vec::new());
        let on_line = |err: bool, l: &str| seen.lock().unwrap().push((err, l.to_owned()));
        // ls of a missing path: stdout one line, stderr the complaint.
        let e = ProcessBuilder::new("/bin/ls")
            .args(["-d", "/", "/no/such/covet/path"])
            .run(&on_line)
            .await
            .unwrap_err();
        let seen = seen.into_inner().unwrap();
        assert!(seen.contains(&(false, "/".to_owned())), "{seen:?}");
        assert!(
            seen.iter()
                .any(|(err, l)| *err && l.contains("/no/such/covet/path"))
        );
        match &e {
            ProcessError::Failed {
                program,
                status,
                tail,
            } => {
                assert_eq!(program, "/bin/ls");
                assert!(!status.success());
                assert_eq!(tail.len(), 1, "{tail:?}");
                assert!(tail[0].contains("/no/such/covet/path"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .starts_with("/bin/ls exited with exit status: 2: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_tail_is_the_last_lines_and_stdout_when_stderr_is_empty() {
        let script = (1..=50).map(|i| format!("echo {i}\n")).collect::<String>() + "exit 3\n";
        let e = ProcessBuilder::new("/bin/sh")
            .stdin_bytes(script)
            .tail_lines(3)
            .run(&quiet)
            .await
            .unwrap_err();
        match e {
            ProcessError::Failed { tail, status, .. } => {
                assert_eq!(tail, vec!["48", "49", "50"]);
                assert_eq!(status.code(), Some(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_and_says_so() {
        let started = Instant::now();
        let e = ProcessBuilder::new("/bin/sleep")
            .arg("30")
            .timeout(Duration::from_millis(200))
            .run(&quiet)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(e.to_string(), "/bin/sleep did not finish within 200ms");
        let e = ProcessBuilder::new("/bin/sleep")
            .arg("30")
            .timeout(Duration::from_millis(200))
            .output()
            .await
            .unwrap_err();
        assert!(matches!(e, ProcessError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_cancel_kills() {
        let flag = never();
        let setter = flag.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            setter.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        let e = ProcessBuilder::new("/bin/sleep")
            .arg("30")
            .cancel(flag)
            .run(&quiet)
            .await
            .unwrap_err();
        assert!(matches!(e, ProcessError::Canceled), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn bad_programs_are_refused_or_fail_to_start() {
        let e = ProcessBuilder::new("sleep").run(&quiet).await.unwrap_err();
        assert!(matches!(e, ProcessError::NotAbsolute(_)), "{e}");
        assert!(ProcessBuilder::new("bin/ls").spawn().is_err());
        let e = ProcessBuilder::new("/no/such/covet-program")
            .output()
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot run /no/such/covet-program: "),
            "{e}"
        );
        let e = ProcessBuilder::new("/bin/true")
            .user_named("no-such-user-covet")
            .unwrap_err();
        assert_eq!(e.to_string(), "no system user \"no-such-user-covet\"");
        assert!(matches!(
            run(&[], None, &[], Duration::from_secs(1), &never(), &quiet).await,
            Err(ProcessError::NotAbsolute(_))
        ));
    }

    #[tokio::test]
    async fn output_feeds_stdin_and_returns_everything_whatever_the_status() {
        let out = ProcessBuilder::new("/bin/cat")
            .stdin_bytes(b"hello\n".to_vec())
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello\n");
        let out = ProcessBuilder::new("/bin/sh")
            .stdin_bytes("echo out; echo err >&2; exit 4")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_str()),
            (&b"out\n"[..], "err\n")
        );
        // A program that does not read its input still succeeds.
        let out = ProcessBuilder::new("/bin/true")
            .stdin_bytes(vec![b'x'; 1 << 20])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
    }

    #[tokio::test]
    async fn stderr_is_capped() {
        let big = vec![b'e'; STDERR_CAP + 100];
        let text = read_capped(&big[..]).await;
        assert!(
            text.ends_with("[100 more bytes not kept]"),
            "{}",
            &text[STDERR_CAP..]
        );
    }

    #[tokio::test]
    async fn runs_as_a_user_with_its_groups_and_home() {
        // nobody exists on Debian; the agent's tests run as root.
        let Ok(Some(nobody)) = users::by_name("nobody") else {
            return;
        };
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let r = ProcessBuilder::new("/usr/bin/id")
            .user_named("nobody")
            .unwrap()
            .current_dir("/")
            .keep_lines()
            .run(&quiet)
            .await
            .unwrap();
        let expected_groups = users::groups_of("nobody", nobody.gid).unwrap();
        let line = &r.lines[0];
        assert!(
            line.starts_with(&format!("uid={}(nobody)", nobody.uid)),
            "{line}"
        );
        assert!(line.contains(&format!("gid={}", nobody.gid)), "{line}");
        // No group of root's is left over.
        let groups = line.split("groups=").nth(1).unwrap_or_default();
        assert_eq!(groups.split(',').count(), expected_groups.len(), "{line}");
        let r = ProcessBuilder::new("/usr/bin/env")
            .env("HOME", "/elsewhere")
            .user_named("nobody")
            .unwrap()
            .keep_lines()
            .run(&quiet)
            .await
            .unwrap();
        assert!(
            r.lines.contains(&format!("HOME={}", nobody.home.display())),
            "{:?}",
            r.lines
        );
        assert!(r.lines.contains(&"USER=nobody".to_owned()), "{:?}", r.lines);
    }

    #[tokio::test]
    async fn hooks_run_with_home_slash_and_every_line_kept() {
        let argv: Vec<String> = vec!["/usr/bin/env".into()];
        let env = vec![
            ("ONLY".to_owned(), "this".to_owned()),
            ("HOME".to_owned(), "/x".to_owned()),
        ];
        let r = run(&argv, None, &env, Duration::from_secs(10), &never(), &quiet)
            .await
            .unwrap();
        let mut lines = r.lines;
        lines.sort();
        assert_eq!(
            lines,
            vec!["HOME=/", "ONLY=this", &format!("PATH={DEFAULT_PATH}")]
        );
    }
}
