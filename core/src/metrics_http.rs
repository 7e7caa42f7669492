//! The relay's and the connector's opt-in HTTP endpoint: Prometheus metrics at `GET /metrics`
//! (OpenMetrics text, encoded by the `prometheus-client` crate), liveness at `GET /healthz` and
//! readiness at `GET /readyz`, for Kubernetes probes, load balancer health checks and
//! monitoring. Each request is bounded in size and time; at most [`MAX_CONCURRENT`] are served
//! at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONCURRENT: usize = 64;
/// Content type of the metrics (what `prometheus-client`'s text encoder writes).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the current metrics text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the daemon is ready for traffic (`/readyz`): the relay when it listens, the connector
/// when it is registered with the relay.
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// What kind of Prometheus metric a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up; exposed with a `_total` suffix.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One metric's current value, read from the daemon's own counters at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Name without the daemon's prefix and without `_total`.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Current value.
    pub value: u64,
}

impl Sample {
    /// A counter sample.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            kind: Kind::Counter,
            value,
        }
    }

    /// A gauge sample.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            kind: Kind::Gauge,
            value,
        }
    }
}

/// A `prometheus-client` collector over one scrape's samples: the daemons keep their counters as
/// plain atomics on their hot paths and hand the values over only when scraped.
#[derive(Debug)]
struct Snapshot(Vec<Sample>);

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for s in &self.0 {
            match s.kind {
                Kind::Counter => {
                    let m = encoder.encode_descriptor(s.name, s.help, None, MetricType::Counter)?;
                    ConstCounter::new(s.value).encode(m)?;
                }
                Kind::Gauge => {
                    let m = encoder.encode_descriptor(s.name, s.help, None, MetricType::Gauge)?;
                    ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX)).encode(m)?;
                }
            }
        }
        Ok(())
    }
}

/// Encodes `samples` as OpenMetrics text, each name prefixed `{prefix}_` (counters get `_total`),
/// ending in `# EOF`.
pub fn encode(prefix: &str, samples: Vec<Sample>) -> String {
    let mut registry = Registry::with_prefix(prefix);
    registry.register_collector(Box::new(Snapshot(samples)));
    let mut out = String::with_capacity(8 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Only a bad name could fail (writing to a String can't): say so in the output.
        tracing::error!(error = %e, "could not encode the metrics");
        out.clear();
    }
    out
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(addr: SocketAddr, render: Render, ready: Ready) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (render, ready) = (render.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, render, ready)).await;
        });
    }
}

/// The response to `method path`: status line, content type, body.
fn respond(
    method: &str,
    path: &str,
    render: &Render,
    ready: &Ready,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    // Probes may carry a query string (`/readyz?verbose`); it is ignored.
    let path = path.split('?').next().unwrap_or(path);
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", METRICS_CONTENT_TYPE, render()),
        ("GET", "/healthz") => ("200 OK", TEXT, "ok\n".to_owned()),
        ("GET", "/readyz") if ready() => ("200 OK", TEXT, "ready\n".to_owned()),
        ("GET", "/readyz") => ("503 Service Unavailable", TEXT, "not ready\n".to_owned()),
        ("GET", _) => ("404 Not Found", TEXT, "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            TEXT,
            "method not allowed\n".to_owned(),
        ),
    }
}

async fn handle(mut stream: TcpStream, render: Render, ready: Ready) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = respond(method, path, &render, &ready);
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("answered within 5 s")
    }

    #[test]
    fn encodes_counters_and_gauges() {
        let text = encode(
            "ztna_test",
            vec![
                Sample::counter("packets", "Packets seen.", 7),
                Sample::gauge("flows_active", "Flows open now.", 3),
                Sample::gauge("huge", "Saturates.", u64::MAX),
            ],
        );
        assert!(
            text.contains("# TYPE ztna_test_packets counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP ztna_test_packets Packets seen.\n"),
            "{text}"
        );
        assert!(text.contains("\nztna_test_packets_total 7\n"), "{text}");
        assert!(
            text.contains("# TYPE ztna_test_flows_active gauge\nztna_test_flows_active 3\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("ztna_test_huge {}\n", i64::MAX)),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_health_readiness_and_404() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let render: Render =
            Arc::new(|| encode("x", vec![Sample::counter("things", "Things.", 7)]));
        let is_ready = Arc::new(AtomicBool::new(false));
        let flag = is_ready.clone();
        let ready: Ready = Arc::new(move || flag.load(Ordering::Relaxed));
        let server = tokio::spawn(serve(addr, render, ready));
        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                        .await
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("metrics server did not start");
        };
        let ok = within(get("/metrics")).await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("x_things_total 7"),
            "{ok}"
        );
        assert!(
            ok.contains("content-type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(within(get("/healthz")).await.starts_with("HTTP/1.1 200"));
        // Readiness follows the daemon's state both ways.
        assert!(within(get("/readyz")).await.starts_with("HTTP/1.1 503"));
        is_ready.store(true, Ordering::Relaxed);
        assert!(within(get("/readyz?verbose"))
            .await
            .starts_with("HTTP/1.1 200"));
        is_ready.store(false, Ordering::Relaxed);
        assert!(within(get("/readyz")).await.starts_with("HTTP/1.1 503"));
        assert!(within(get("/nope")).await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
