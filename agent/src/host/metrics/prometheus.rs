//! The Prometheus text exposition of a host sample, and the HTTP endpoint
//! that serves it.

use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::MetricsHub;
use super::sample::*;

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Slow or idle clients must not pin a connection forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- Prometheus

#[derive(Clone, Copy)]
pub(crate) enum MetricType {
    Gauge,
    Counter,
    Histogram,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
            MetricType::Histogram => "histogram",
        }
    }
}

/// A sample value: integers are printed exactly, floats per the format's
/// conventions (`NaN`, `+Inf`, `-Inf`).
#[derive(Clone, Copy)]
pub(crate) enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(f64::from(v))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => {
                f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Builds a text exposition, one metric family at a time.
pub(crate) struct Exposition {
    pub(crate) out: String,
}

impl Exposition {
    pub(crate) fn new() -> Exposition {
        Exposition { out: String::new() }
    }

    pub(crate) fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, val);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: MetricType, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family with one sample per item, labelled by `labels(item)`.
    fn each<'a, T: 'a, L, V>(
        &mut self,
        name: &str,
        kind: MetricType,
        help: &str,
        items: impl IntoIterator<Item = &'a T>,
        labels: L,
        value: impl Fn(&T) -> V,
    ) where
        L: for<'t> Fn(&'t T) -> Vec<(&'static str, &'t str)>,
        V: Into<Value>,
    {
        self.family(name, kind, help);
        for item in items {
            self.sample(name, &labels(item), value(item));
        }
    }
}

/// Escapes a label value per the text format: backslash, double quote and
/// line feed.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn disk_labels(d: &DiskSample) -> Vec<(&'static str, &str)> {
    vec![
        ("mount", d.mount_point.as_str()),
        ("device", d.device.as_str()),
        ("fstype", d.file_system.as_str()),
    ]
}

fn network_labels(n: &NetworkSample) -> Vec<(&'static str, &str)> {
    vec![("interface", n.interface.as_str())]
}

/// Renders a sample in the Prometheus text exposition format (0.0.4).
///
/// Only cumulative counters are exposed for I/O: Prometheus derives rates
/// itself with `rate()`.
pub fn render_prometheus(sample: &HostSample) -> String {
    use MetricType::{Counter, Gauge};

    let mut prom = Exposition {
        out: String::with_capacity(8 * 1024),
    };

    prom.single(
        "covet_host_cpu_usage_percent",
        Gauge,
        "Total CPU usage over all cores, in percent (0-100).",
        sample.cpu.usage_percent,
    );
    prom.family(
        "covet_host_cpu_core_usage_percent",
        Gauge,
        "CPU usage of each logical core, in percent (0-100).",
    );
    for (core, usage) in sample.cpu.per_core_percent.iter().enumerate() {
        let core = core.to_string();
        prom.sample(
            "covet_host_cpu_core_usage_percent",
            &[("core", &core)],
            *usage,
        );
    }
    prom.single(
        "covet_host_cpu_logical_cores",
        Gauge,
        "Number of logical CPU cores.",
        sample.cpu.logical_cores,
    );
    if sample.cpu.physical_cores > 0 {
        prom.single(
            "covet_host_cpu_physical_cores",
            Gauge,
            "Number of physical CPU cores.",
            sample.cpu.physical_cores,
        );
    }

    prom.single(
        "covet_host_load1",
        Gauge,
        "System load average over 1 minute.",
        sample.load.one,
    );
    prom.single(
        "covet_host_load5",
        Gauge,
        "System load average over 5 minutes.",
        sample.load.five,
    );
    prom.single(
        "covet_host_load15",
        Gauge,
        "System load average over 15 minutes.",
        sample.load.fifteen,
    );

    let m = &sample.memory;
    prom.single(
        "covet_host_memory_total_bytes",
        Gauge,
        "Total physical memory in bytes.",
        m.total_bytes,
    );
    prom.single(
        "covet_host_memory_used_bytes",
        Gauge,
        "Used physical memory in bytes.",
        m.used_bytes,
    );
    prom.single(
        "covet_host_memory_available_bytes",
        Gauge,
        "Physical memory available to new processes in bytes.",
        m.available_bytes,
    );
    prom.single(
        "covet_host_swap_total_bytes",
        Gauge,
        "Total swap space in bytes.",
        m.swap_total_bytes,
    );
    prom.single(
        "covet_host_swap_used_bytes",
        Gauge,
        "Used swap space in bytes.",
        m.swap_used_bytes,
    );

    let disks = &sample.disks;
    prom.each(
        "covet_host_disk_total_bytes",
        Gauge,
        "Size of the file system in bytes.",
        disks,
        disk_labels,
        |d| d.total_bytes,
    );
    prom.each(
        "covet_host_disk_available_bytes",
        Gauge,
        "Space available to unprivileged users in bytes.",
        disks,
        disk_labels,
        |d| d.available_bytes,
    );
    prom.each(
        "covet_host_disk_inodes_total",
        Gauge,
        "Total number of inodes.",
        disks,
        disk_labels,
        |d| d.inodes_total,
    );
    prom.each(
        "covet_host_disk_inodes_free",
        Gauge,
        "Number of free inodes.",
        disks,
        disk_labels,
        |d| d.inodes_free,
    );
    prom.each(
        "covet_host_disk_read_only",
        Gauge,
        "1 if the file system is mounted read-only.",
        disks,
        disk_labels,
        |d| d.read_only,
    );
    prom.each(
        "covet_host_disk_read_bytes_total",
        Counter,
        "Bytes read from the underlying block device.",
        disks,
        disk_labels,
        |d| d.read_bytes_total,
    );
    prom.each(
        "covet_host_disk_written_bytes_total",
        Counter,
        "Bytes written to the underlying block device.",
        disks,
        disk_labels,
        |d| d.written_bytes_total,
    );

    let networks = &sample.networks;
    prom.each(
        "covet_host_network_receive_bytes_total",
        Counter,
        "Bytes received on the interface.",
        networks,
        network_labels,
        |n| n.received_bytes_total,
    );
    prom.each(
        "covet_host_network_transmit_bytes_total",
        Counter,
        "Bytes transmitted on the interface.",
        networks,
        network_labels,
        |n| n.transmitted_bytes_total,
    );
    prom.each(
        "covet_host_network_receive_packets_total",
        Counter,
        "Packets received on the interface.",
        networks,
        network_labels,
        |n| n.received_packets_total,
    );
    prom.each(
        "covet_host_network_transmit_packets_total",
        Counter,
        "Packets transmitted on the interface.",
        networks,
        network_labels,
        |n| n.transmitted_packets_total,
    );
    prom.each(
        "covet_host_network_receive_errors_total",
        Counter,
        "Receive errors on the interface.",
        networks,
        network_labels,
        |n| n.receive_errors_total,
    );
    prom.each(
        "covet_host_network_transmit_errors_total",
        Counter,
        "Transmit errors on the interface.",
        networks,
        network_labels,
        |n| n.transmit_errors_total,
    );

    prom.single(
        "covet_host_processes",
        Gauge,
        "Number of processes.",
        sample.process_count,
    );

    prom.out
}

// ---------------------------------------------------------------- HTTP endpoint

/// Serves `GET /metrics` (Prometheus text format) on `listener` until
/// `shutdown` resolves. Each connection runs in its own task; on shutdown the
/// listener is closed and open connections are asked to finish gracefully.
pub async fn serve_prometheus(
    listener: TcpListener,
    hub: MetricsHub,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually transient (EMFILE, ECONNABORTED): back off a
                    // little instead of spinning.
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };

        let hub = hub.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle_request(request, hub.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);

            let result = tokio::select! {
                result = connection.as_mut() => result,
                // Fires on the shutdown signal, or if the server is gone.
                _ = stop_rx.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "metrics endpoint: connection error: {e}");
            }
        });
    }

    // Nobody may be listening any more; that is fine.
    let _ = stop_tx.send(());
    Ok(())
}

async fn handle_request(
    request: Request<Incoming>,
    hub: MetricsHub,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // HEAD is answered like GET; hyper leaves the body out.
    let method_ok = matches!(*request.method(), Method::GET | Method::HEAD);
    let response = match request.uri().path() {
        "/metrics" | "/" if !method_ok => {
            let mut response =
                text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let mut body = render_prometheus(&hub.sample().await);
            body.push_str(&hub.more_series().await);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            response
        }
        "/" => text_response(
            StatusCode::OK,
            "covet-agent host metrics: see /metrics (Prometheus text format)\n",
        ),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Splits a sample line into name, labels and value; the value is the text
    /// after the last space (label values may contain spaces).
    fn parse_line(line: &str) -> (&str, Option<&str>, f64) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap(),
        };
        match series.split_once('{') {
            Some((name, rest)) => (name, Some(rest.strip_suffix('}').unwrap()), value),
            None => (series, None, value),
        }
    }

    #[tokio::test]
    async fn prometheus_rendering_is_well_formed() {
        let hub = MetricsHub::new();
        let text = render_prometheus(&hub.sample().await);

        assert!(text.contains("covet_host_memory_total_bytes "));
        assert!(text.contains("# TYPE covet_host_disk_read_bytes_total counter\n"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("covet_host_disk_total_bytes{mount=\"/\","))
        );
        assert!(text.ends_with('\n'));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, _value) = parse_line(line);
            assert!(name.starts_with("covet_host_"), "{line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            if let Some(labels) = labels {
                assert!(labels.contains("=\""), "{line}");
                assert!(labels.ends_with('"'), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut sample = HostSample::empty();
        sample.disks.push(DiskSample {
            mount_point: "/mnt/a \"b\"\\c\nd".to_owned(),
            device: "/dev/x".to_owned(),
            file_system: "ext4".to_owned(),
            total_bytes: 1,
            available_bytes: 1,
            inodes_total: 1,
            inodes_free: 1,
            read_bytes_total: 0,
            written_bytes_total: 0,
            read_bytes_per_second: 0.0,
            written_bytes_per_second: 0.0,
            read_only: true,
        });
        let text = render_prometheus(&sample);
        assert!(text.contains(
            "covet_host_disk_total_bytes{mount=\"/mnt/a \\\"b\\\"\\\\c\\nd\",device=\"/dev/x\",fstype=\"ext4\"} 1\n"
        ));
        assert!(text.contains("covet_host_disk_read_only{"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            parse_line(line);
        }
    }

    #[test]
    fn special_float_values_follow_the_format() {
        assert_eq!(Value::from(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::from(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::from(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::from(0.25_f64).to_string(), "0.25");
        assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    }

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_prometheus(listener, MetricsHub::new(), async {
            let _ = stop_rx.await;
        }));

        let metrics = http_get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(
            metrics
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n")
        );
        assert!(metrics.contains("\r\n\r\n# HELP covet_host_cpu_usage_percent "));
        assert!(metrics.contains("covet_host_memory_total_bytes "));

        let index = http_get(addr, "/").await;
        assert!(index.starts_with("HTTP/1.1 200 OK\r\n"), "{index}");
        assert!(index.contains("/metrics"));

        let missing = http_get(addr, "/nope").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut post = String::new();
        stream.read_to_string(&mut post).await.unwrap();
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
