//! A load generator for tests: real HTTP requests on loopback at a fixed
//! rate, each on its own connection, with every answer recorded, so a test
//! can count what failed during an upgrade, a switch or a rollback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a body is kept (enough for a version string).
const BODY_KEPT: usize = 256;

/// What one request got.
#[derive(Clone, Debug)]
pub struct Answer {
    /// When it was sent, from the start of the load.
    pub sent: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer: its status and the start of its body.
    Http { status: u16, body: String },
    /// No HTTP answer: refused, reset, timed out, or malformed.
    Failed(String),
}

impl Answer {
    /// A connection error, a timeout or a 5xx: what a user would see as broken.
    pub fn is_failure(&self) -> bool {
        match &self.outcome {
            Outcome::Http { status, .. } => *status >= 500,
            Outcome::Failed(_) => true,
        }
    }
}

/// Requests `GET path` at `rate` per second until stopped.
pub struct Load {
    started: Instant,
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: tokio::sync::watch::Sender<bool>,
    driver: JoinHandle<()>,
}

/// Everything the load got, in the order the requests were sent.
#[derive(Debug)]
pub struct LoadReport {
    pub answers: Vec<Answer>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failures(&self) -> Vec<&Answer> {
        self.answers.iter().filter(|a| a.is_failure()).collect()
    }

    /// How many answers were a 2xx whose body contains `needle`.
    pub fn ok_containing(&self, needle: &str) -> usize {
        self.answers
            .iter()
            .filter(|a| matches!(&a.outcome, Outcome::Http { status, body } if (200..300).contains(status) && body.contains(needle)))
            .count()
    }

    /// The `q` quantile (0..=1) of the latencies of the answers that did not fail.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let mut ok: Vec<Duration> = self
            .answers
            .iter()
            .filter(|a| !a.is_failure())
            .map(|a| a.latency)
            .collect();
        if ok.is_empty() {
            return None;
        }
        ok.sort();
        let index = ((ok.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(ok[index])
    }
}

impl Load {
    /// Starts sending `GET path` to `127.0.0.1:port`, `rate` requests per
    /// second, evenly spaced; a slow answer does not delay the next request.
    pub fn start(port: u16, path: &str, rate: u32) -> Load {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let path = path.to_owned();
        let started = Instant::now();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let sink = answers.clone();
        let driver = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut requests = Vec::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let sink = sink.clone();
                let path = path.clone();
                requests.push(tokio::spawn(async move {
                    let sent = started.elapsed();
                    let begun = Instant::now();
                    let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, get(addr, &path))
                        .await
                    {
                        Ok(Ok(outcome)) => outcome,
                        Ok(Err(e)) => Outcome::Failed(e.to_string()),
                        Err(_) => Outcome::Failed(format!("no answer within {REQUEST_TIMEOUT:?}")),
                    };
                    let answer = Answer {
                        sent,
                        latency: begun.elapsed(),
                        outcome,
                    };
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(answer);
                }));
            }
            for request in requests {
                let _ = request.await;
            }
        });
        Load {
            started,
            answers,
            stop,
            driver,
        }
    }

    /// Stops sending, waits for the requests in flight, and reports.
    pub async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        let _ = self.driver.await;
        let mut answers =
            std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()));
        answers.sort_by_key(|a| a.sent);
        LoadReport {
            answers,
            elapsed: self.started.elapsed(),
        }
    }
}

/// One HTTP/1.0 GET on a new connection.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Outcome> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(Outcome::Failed(format!(
            "malformed HTTP response: {text:?}"
        )));
    };
    let Some(status) = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()) else {
        return Ok(Outcome::Failed(format!("malformed status line: {head:?}")));
    };
    let body: String = body.chars().take(BODY_KEPT).collect();
    Ok(Outcome::Http { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpServer, Reply};

    #[tokio::test]
    async fn counts_answers_and_failures_at_the_rate_asked() {
        let server = HttpServer::start(&[("/v", Reply::json(200, "{\"version\":\"1.0\"}"))]).await;
        let load = Load::start(server.addr.port(), "/v", 100);
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(server);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = load.stop().await;
        let ok = report.ok_containing("1.0");
        assert!((30..=70).contains(&ok), "{ok} answers in 0.5 s at 100/s");
        assert!(
            !report.failures().is_empty(),
            "requests after the server went away fail"
        );
        assert!(report.latency_quantile(0.5).is_some());
    }
}
