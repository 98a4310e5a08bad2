//! Prometheus metrics (the `prometheus` crate) and the HTTP endpoint that serves them:
//! `/metrics` (text exposition), `/healthz` (the process is alive), `/readyz` (listening,
//! and every configured database's server accepts TCP connections).
//!
//! Labels are bounded: database, user, state, SQLSTATE class; never a client or a query.
//! The hot path touches only pre-resolved handles ([`PoolMetrics`]), never a label
//! lookup; byte counts are summed per transaction and added once.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every metric pgtide exports.
pub struct Metrics {
    registry: Registry,
    clients: IntGaugeVec,
    servers: IntGaugeVec,
    longest_wait: prometheus::GaugeVec,
    wait_seconds: HistogramVec,
    transaction_seconds: HistogramVec,
    query_seconds: HistogramVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    bytes_received: IntCounterVec,
    bytes_sent: IntCounterVec,
    errors: IntCounterVec,
    pool_timeouts: IntCounterVec,
    server_connects: IntCounterVec,
    server_connect_failures: IntCounterVec,
    prepared: IntCounterVec,
    /// Failed client logins (not labelled: user names come from the network).
    pub auth_failures: IntCounter,
}

/// Handles for one (database, user) pool, resolved once.
pub struct PoolMetrics {
    pub clients_active: IntGauge,
    pub clients_waiting: IntGauge,
    pub clients_idle: IntGauge,
    pub wait_seconds: prometheus::Histogram,
    pub transaction_seconds: prometheus::Histogram,
    pub query_seconds: prometheus::Histogram,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub pool_timeouts: IntCounter,
    pub server_connects: IntCounter,
    pub server_connect_failures: IntCounter,
    pub prepared_hits: IntCounter,
    pub prepared_prepares: IntCounter,
    pub prepared_evictions: IntCounter,
    errors: IntCounterVec,
    servers: IntGaugeVec,
    longest_wait: prometheus::GaugeVec,
    pub database: String,
    pub user: String,
}

/// Buckets for latencies: 50 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        &["database", "user"],
    )
    .expect("a valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("pgtide".to_string()), None).expect("a valid prefix");
        let du = &["database", "user"];
        let build = IntGaugeVec::new(Opts::new("build_info", "pgtide's version"), &["version"])
            .expect("a valid metric definition");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry
            .register(Box::new(build))
            .expect("metric names are unique");
        let auth_failures = IntCounter::new(
            "auth_failures_total",
            "Client logins that failed authentication",
        )
        .expect("a valid metric definition");
        registry
            .register(Box::new(auth_failures.clone()))
            .expect("metric names are unique");
        let longest_wait = prometheus::GaugeVec::new(
            Opts::new(
                "longest_wait_seconds",
                "How long the longest-waiting client of the pool has waited for a server connection",
            ),
            du,
        )
        .expect("a valid metric definition");
        registry
            .register(Box::new(longest_wait.clone()))
            .expect("metric names are unique");
        Metrics {
            clients: gauge(
                &registry,
                "clients",
                "Client connections by state: active (has a server), waiting (for a server), idle",
                &["database", "user", "state"],
            ),
            servers: gauge(
                &registry,
                "servers",
                "Server connections by state: active (with a client or being opened), idle",
                &["database", "user", "state"],
            ),
            longest_wait,
            wait_seconds: histogram(&registry, "wait_seconds", "Time a client waited for a server connection"),
            transaction_seconds: histogram(&registry, "transaction_seconds", "Duration of transactions"),
            query_seconds: histogram(
                &registry,
                "query_seconds",
                "Time from a request (Query, or extended-protocol batch) to its ReadyForQuery",
            ),
            transactions: counter(&registry, "transactions_total", "Transactions completed", du),
            queries: counter(&registry, "queries_total", "Statements completed (or failed)", du),
            bytes_received: counter(&registry, "bytes_received_total", "Bytes received from clients", du),
            bytes_sent: counter(&registry, "bytes_sent_total", "Bytes sent to clients", du),
            errors: counter(
                &registry,
                "errors_total",
                "ErrorResponses sent to clients, by SQLSTATE class (first two characters)",
                &["database", "user", "class"],
            ),
            pool_timeouts: counter(
                &registry,
                "pool_timeouts_total",
                "Clients that waited longer than query_wait_timeout",
                du,
            ),
            server_connects: counter(&registry, "server_connects_total", "Server connections opened", du),
            server_connect_failures: counter(
                &registry,
                "server_connect_failures_total",
                "Failed attempts to open a server connection",
                du,
            ),
            prepared: counter(
                &registry,
                "prepared_statements_total",
                "Prepared-statement events in transaction mode: hit (answered without preparing), \
                 prepare (prepared on a server), evict (closed on a server to stay within max_prepared_statements)",
                &["database", "user", "event"],
            ),
            registry,
            auth_failures,
        }
    }

    /// The handles of one pool.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let du = [database, user];
        let clients = |state: &str| self.clients.with_label_values(&[database, user, state]);
        let prepared = |event: &str| self.prepared.with_label_values(&[database, user, event]);
        PoolMetrics {
            clients_active: clients("active"),
            clients_waiting: clients("waiting"),
            clients_idle: clients("idle"),
            wait_seconds: self.wait_seconds.with_label_values(&du),
            transaction_seconds: self.transaction_seconds.with_label_values(&du),
            query_seconds: self.query_seconds.with_label_values(&du),
            transactions: self.transactions.with_label_values(&du),
            queries: self.queries.with_label_values(&du),
            bytes_received: self.bytes_received.with_label_values(&du),
            bytes_sent: self.bytes_sent.with_label_values(&du),
            pool_timeouts: self.pool_timeouts.with_label_values(&du),
            server_connects: self.server_connects.with_label_values(&du),
            server_connect_failures: self.server_connect_failures.with_label_values(&du),
            prepared_hits: prepared("hit"),
            prepared_prepares: prepared("prepare"),
            prepared_evictions: prepared("evict"),
            errors: self.errors.clone(),
            servers: self.servers.clone(),
            longest_wait: self.longest_wait.clone(),
            database: database.to_string(),
            user: user.to_string(),
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PoolMetrics {
    /// Counts an ErrorResponse a client received, by SQLSTATE class.
    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??");
        self.errors
            .with_label_values(&[&self.database, &self.user, class])
            .inc();
    }

    /// Sets the server-connection gauges and the longest wait (at scrape time).
    pub fn set_pool_state(&self, active: i64, idle: i64, longest_wait: Duration) {
        let du = [self.database.as_str(), self.user.as_str()];
        self.servers
            .with_label_values(&[du[0], du[1], "active"])
            .set(active);
        self.servers
            .with_label_values(&[du[0], du[1], "idle"])
            .set(idle);
        self.longest_wait
            .with_label_values(&du)
            .set(longest_wait.as_secs_f64());
    }
}

/// What `/readyz` checks, and what `/metrics` refreshes before it encodes.
pub trait Probe: Send + Sync + 'static {
    /// Updates gauges that are read from state rather than counted.
    fn refresh(&self);
    /// The server addresses that must accept connections for pgtide to be ready.
    fn servers(&self) -> Vec<(String, u16)>;
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                let metrics = metrics.clone();
                let probe = probe.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), respond(stream, &metrics, &*probe)).await;
                });
            }
            _ = &mut stop => return,
        }
    }
}

async fn respond(
    mut stream: TcpStream,
    metrics: &Metrics,
    probe: &dyn Probe,
) -> std::io::Result<()> {
    // Read the request head (bounded); only the request line matters.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body): (&str, &str, Vec<u8>) = match (method, path) {
        (b"GET", b"/metrics") => {
            probe.refresh();
            ("200 OK", "text/plain; version=0.0.4", metrics.encode())
        }
        (b"GET", b"/healthz") => ("200 OK", "text/plain", b"ok\n".to_vec()),
        (b"GET", b"/readyz") => {
            let mut down = Vec::new();
            for (host, port) in probe.servers() {
                let ok = tokio::time::timeout(
                    Duration::from_secs(2),
                    TcpStream::connect((host.as_str(), port)),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if !ok {
                    down.push(format!("{host}:{port}"));
                }
            }
            if down.is_empty() {
                ("200 OK", "text/plain", b"ready\n".to_vec())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not ready: cannot reach {}\n", down.join(", ")).into_bytes(),
                )
            }
        }
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            b"try /metrics, /healthz or /readyz\n".to_vec(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n".to_vec(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_labelled_metrics() {
        let m = Metrics::new();
        let p = m.pool("app", "alice");
        p.transactions.inc();
        p.wait_seconds.observe(0.001);
        p.error("42P01");
        p.set_pool_state(2, 3, Duration::from_millis(1500));
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains("pgtide_transactions_total{database=\"app\",user=\"alice\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_errors_total{class=\"42\",database=\"app\",user=\"alice\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_wait_seconds_count{database=\"app\",user=\"alice\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pgtide_servers{database=\"app\",state=\"idle\",user=\"alice\"} 3"),
            "{text}"
        );
        assert!(text.contains("pgtide_build_info{version="), "{text}");
    }
}
