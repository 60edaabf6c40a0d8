//! Unit logs from journald, read with `journalctl -o json` (explicit argv,
//! bounded in time), from the system journal or a configured directory.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::host::process::{ProcessBuilder, ProcessError};

/// The most lines one request may ask for.
pub const MAX_LINES: u32 = 10_000;
const TAIL_TIMEOUT: Duration = Duration::from_secs(20);
const JOURNALCTL: &str = "/usr/bin/journalctl";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot run {JOURNALCTL}: {0}")]
    Spawn(std::io::Error),
    #[error("journalctl: {0}")]
    Process(ProcessError),
    #[error("journalctl failed: {0}")]
    Failed(String),
    #[error(
        "journalctl did not answer within {}",
        humantime::format_duration(TAIL_TIMEOUT)
    )]
    Timeout,
}

/// One journal entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogLine {
    pub time: Option<SystemTime>,
    pub unit: String,
    pub priority: u32,
    pub message: String,
    pub pid: u32,
    pub cursor: String,
    pub identifier: String,
}

#[derive(Debug, Clone)]
pub struct JournalReader {
    dir: Option<PathBuf>,
}

impl JournalReader {
    /// `dir`: a journal directory (`journalctl --directory`); `None` reads the system journal.
    pub fn new(dir: Option<PathBuf>) -> JournalReader {
        JournalReader { dir }
    }

    /// journalctl with the unit's matches: its own output and what the
    /// service manager logged about it, for system and user managers alike.
    fn command(&self, unit: &str, lines: u32, since: Option<SystemTime>) -> ProcessBuilder {
        let mut cmd = ProcessBuilder::new(JOURNALCTL);
        if let Some(dir) = &self.dir {
            cmd = cmd.arg(format!("--directory={}", dir.display()));
        }
        cmd = cmd
            .args(["--output=json", "--no-pager", "--quiet"])
            .arg(format!("--lines={}", lines.min(MAX_LINES)));
        if let Some(since) = since {
            let secs = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            cmd = cmd.arg(format!("--since=@{secs}"));
        }
        // Field matches joined by "+" are alternatives.
        cmd.arg(format!("_SYSTEMD_UNIT={unit}"))
            .arg("+")
            .arg(format!("UNIT={unit}"))
            .arg("+")
            .arg(format!("_SYSTEMD_USER_UNIT={unit}"))
            .arg("+")
            .arg(format!("USER_UNIT={unit}"))
    }

    /// The last `lines` entries of `unit` (optionally only since a time).
    pub async fn tail(
        &self,
        unit: &str,
        lines: u32,
        since: Option<SystemTime>,
    ) -> Result<Vec<LogLine>, LogError> {
        let output = self
            .command(unit, lines, since)
            .timeout(TAIL_TIMEOUT)
            .output()
            .await
            .map_err(LogError::from)?;
        if !output.status.success() {
            return Err(LogError::Failed(output.stderr.trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(parse_entry)
            .collect())
    }

    /// The last `lines` entries, then new ones as they come, until the
    /// receiver is dropped (which stops journalctl).
    pub fn follow(
        &self,
        unit: &str,
        lines: u32,
        since: Option<SystemTime>,
    ) -> Result<mpsc::Receiver<Result<LogLine, LogError>>, LogError> {
        let mut child = self
            .command(unit, lines, since)
            .arg("--follow")
            .spawn()
            .map_err(LogError::from)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LogError::Failed("no stdout".into()))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            loop {
                tokio::select! {
                    line = reader.next_line() => match line {
                        Ok(Some(line)) => {
                            if let Some(entry) = parse_entry(&line)
                                && tx.send(Ok(entry)).await.is_err() {
                                    break;
                                }
                        }
                        Ok(None) => {
                            let _ = tx.send(Err(LogError::Failed("journalctl stopped".into()))).await;
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(LogError::Failed(e.to_string()))).await;
                            break;
                        }
                    },
                    // The client went away: stop reading, stop journalctl.
                    _ = tx.closed() => break,
                }
            }
            let _ = child.kill().await;
        });
        Ok(rx)
    }
}

impl From<ProcessError> for LogError {
    fn from(error: ProcessError) -> LogError {
        match error {
            ProcessError::Spawn { source, .. } => LogError::Spawn(source),
            ProcessError::Timeout { .. } => LogError::Timeout,
            other => LogError::Process(other),
        }
    }
}

/// Parses one line of `journalctl -o json`; skips what it cannot read.
fn parse_entry(line: &str) -> Option<LogLine> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let text = |key: &str| -> String {
        match v.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            // Non-UTF-8 fields come as arrays of bytes.
            Some(serde_json::Value::Array(bytes)) => {
                let raw: Vec<u8> = bytes
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect();
                String::from_utf8_lossy(&raw).into_owned()
            }
            _ => String::new(),
        }
    };
    let micros: u64 = text("__REALTIME_TIMESTAMP").parse().ok()?;
    let unit = ["_SYSTEMD_USER_UNIT", "USER_UNIT", "_SYSTEMD_UNIT", "UNIT"]
        .iter()
        .map(|k| text(k))
        .find(|u| !u.is_empty())
        .unwrap_or_default();
    Some(LogLine {
        time: Some(SystemTime::UNIX_EPOCH + Duration::from_micros(micros)),
        unit,
        priority: text("PRIORITY").parse().unwrap_or(6),
        message: text("MESSAGE"),
        pid: text("_PID").parse().unwrap_or(0),
        cursor: text("__CURSOR"),
        identifier: text("SYSLOG_IDENTIFIER"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_journal_json() {
        let line = r#"{"__REALTIME_TIMESTAMP":"1700000000000000","MESSAGE":"hello","PRIORITY":"3","_PID":"42","__CURSOR":"s=1","_SYSTEMD_USER_UNIT":"web.service","SYSLOG_IDENTIFIER":"python3"}"#;
        let e = parse_entry(line).unwrap();
        assert_eq!(e.message, "hello");
        assert_eq!(e.priority, 3);
        assert_eq!(e.pid, 42);
        assert_eq!(e.unit, "web.service");
        let binary = r#"{"__REALTIME_TIMESTAMP":"1","MESSAGE":[104,105,255]}"#;
        assert_eq!(parse_entry(binary).unwrap().message, "hi\u{fffd}");
        assert!(parse_entry("not json").is_none());
    }
}
