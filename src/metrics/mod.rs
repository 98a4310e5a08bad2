//! Prometheus metrics (the `prometheus` crate) and the HTTP endpoint that serves them
//! ([`serve`]; `http.rs`, on hyper's HTTP/1.1 server): `/metrics` (text exposition),
//! `/healthz` (the process is alive), `/readyz` (listening, and the primary of every
//! configured database reachable: the health monitor's view for a database with several
//! hosts, a TCP connect under a short timeout otherwise).
//!
//! Labels are bounded: database, user, host (`host:port` from the config), state, role,
//! routing outcome, SQLSTATE class; never a client or a query.
//! The hot path touches only pre-resolved handles ([`PoolMetrics`]), never a label
//! lookup; byte counts are summed per transaction and added once. Gauges that describe
//! state rather than events (server connections by state, the longest wait, the hosts)
//! are set at scrape time from the pools and the cluster monitors ([`Probe::refresh`]).
//! `SHOW STATS`' totals and averages are computed from the same handles ([`stats`]).

mod http;
pub mod stats;

pub use http::serve;

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpStream;

/// Every metric pgtide exports.
pub struct Metrics {
    registry: Registry,
    /// `collect_metrics`: whether sessions count at all.
    collect: bool,
    clients: IntGaugeVec,
    clients_pinned: IntGaugeVec,
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
    routing: IntCounterVec,
    read_your_writes: IntCounterVec,
    host_up: IntGaugeVec,
    host_role: IntGaugeVec,
    host_health: IntGaugeVec,
    host_lag_bytes: IntGaugeVec,
    host_lag_seconds: prometheus::GaugeVec,
    host_timeline: IntGaugeVec,
    host_passed_over: IntGaugeVec,
    writes_refused: IntGaugeVec,
    db_max_connections: IntGaugeVec,
    db_connections: IntGaugeVec,
    /// Failed client logins (not labelled: user names come from the network).
    pub auth_failures: IntCounter,
}

/// Handles for one (database, user) pool, resolved once.
#[derive(Clone)]
pub struct PoolMetrics {
    /// `collect_metrics`: when false, sessions skip the counting (and the clock reads
    /// that feed the histograms) altogether.
    pub collect: bool,
    pub clients_active: IntGauge,
    pub clients_waiting: IntGauge,
    pub clients_idle: IntGauge,
    /// Transaction-mode clients pinned to their server by session state.
    pub clients_pinned: IntGauge,
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
    /// Routing decisions of the pool's (database, user).
    pub routing: RoutingMetrics,
    errors: IntCounterVec,
    servers: IntGaugeVec,
    longest_wait: prometheus::GaugeVec,
    pub database: String,
    pub user: String,
}

/// Counters of routing decisions (databases with several hosts only), one handle per
/// outcome, resolved once: counting a decision is one atomic add.
#[derive(Clone)]
pub struct RoutingMetrics {
    /// Sent to the primary because it may write (or a route override / session setting
    /// says primary).
    pub primary: IntCounter,
    /// A read sent to a replica.
    pub replica: IntCounter,
    /// A read that could have gone to a replica ran on the primary: no replica was up and
    /// within the lag limits, or the chosen replica could not be reached.
    pub fallback: IntCounter,
    /// Routed by a `/* pgtide: primary|replica */` hint.
    pub hint: IntCounter,
    /// A replica refused the request as a write (25006); it ran again on the primary.
    pub retried_primary: IntCounter,
    /// Reads kept off one or more usable replicas because they had not replayed the
    /// client's last write yet (read_your_writes = "lsn").
    pub read_your_writes: IntCounter,
}

/// A host as the cluster monitor sees it, for the host gauges.
pub struct HostSample<'a> {
    /// `host:port`.
    pub addr: &'a str,
    /// Usable: the circuit breaker says up.
    pub up: bool,
    /// `primary`, `replica` or `unknown`.
    pub role: &'a str,
    /// `up`, `down` or `unknown` (never checked successfully yet).
    pub health: &'a str,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// A primary's timeline.
    pub timeline: Option<u32>,
    /// Out of recovery, but takes no writes.
    pub passed_over: bool,
}

/// Server connections of one pool by state, at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCounts {
    /// Checked out by a client session.
    pub active: i64,
    /// In the pool, ready for a client.
    pub idle: i64,
    /// Being brought back to idle after its client left (rollback, reset, drain).
    pub used: i64,
    /// Being opened (connect and login).
    pub login: i64,
}

/// Values of the `role` label of `pgtide_host_role`.
pub const HOST_ROLES: &[&str] = &["primary", "replica", "unknown"];
/// Values of the `state` label of `pgtide_host_health`.
pub const HOST_HEALTH: &[&str] = &["up", "down", "unknown"];

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
        Metrics::with_collection(true)
    }

    /// The metrics; with `collect` false (`collect_metrics = false`) the sessions count
    /// nothing and only the build info and the scrape-time gauges have values.
    pub fn with_collection(collect: bool) -> Metrics {
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
            clients_pinned: gauge(
                &registry,
                "clients_pinned",
                "Transaction-mode clients that keep their server connection because they created session state (session_state = \"pin\")",
                du,
            ),
            servers: gauge(
                &registry,
                "servers",
                "Server connections by state: active (with a client), idle (ready in the pool), \
                 used (being brought back to idle after its client left), login (being opened)",
                &["database", "user", "host", "state"],
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
            routing: counter(
                &registry,
                "routing_decisions_total",
                "Where transactions of a database with several hosts were sent, by outcome: primary (may write), \
                 replica (a read), fallback (a read on the primary: no usable replica), hint (routed by a \
                 pgtide: comment, the pgtide.route setting or a route override), retried_primary (refused by a \
                 replica with 25006, run again on the primary)",
                &["database", "user", "outcome"],
            ),
            read_your_writes: counter(
                &registry,
                "routing_read_your_writes_total",
                "Reads kept off one or more usable replicas because they had not replayed the client's last write \
                 (read_your_writes = \"lsn\")",
                du,
            ),
            host_up: gauge(
                &registry,
                "host_up",
                "1 when the health monitor considers the host usable (circuit breaker closed), else 0",
                &["database", "host"],
            ),
            host_role: gauge(
                &registry,
                "host_role",
                "1 for the host's current role (primary, replica, unknown) as pg_is_in_recovery() last said, 0 for the others",
                &["database", "host", "role"],
            ),
            host_health: gauge(
                &registry,
                "host_health",
                "Circuit breaker state of the host: 1 for the current state (up, down, unknown), 0 for the others",
                &["database", "host", "state"],
            ),
            host_lag_bytes: gauge(
                &registry,
                "host_replay_lag_bytes",
                "Bytes of WAL a replica has not replayed yet, against the primary's latest known position",
                &["database", "host"],
            ),
            host_lag_seconds: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "host_replay_lag_seconds",
                        "Age of the last transaction a replica replayed (0 when it has replayed everything the primary had)",
                    ),
                    &["database", "host"],
                )
                .expect("a valid metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric names are unique");
                g
            },
            host_timeline: gauge(
                &registry,
                "host_timeline",
                "The timeline a host out of recovery is on (absent for replicas)",
                &["database", "host"],
            ),
            host_passed_over: gauge(
                &registry,
                "host_passed_over",
                "1 when the host is out of recovery but takes no writes: it is behind a newer timeline, or pgtide cannot order it against another primary",
                &["database", "host"],
            ),
            db_max_connections: gauge(
                &registry,
                "db_max_connections",
                "This process's max_db_connections for the database (0 = no limit): every pgtide process has its own, so N processes may open N times as many",
                &["database"],
            ),
            db_connections: gauge(
                &registry,
                "db_connections",
                "Server connections this process has open to the database (every host, every user)",
                &["database"],
            ),
            writes_refused: gauge(
                &registry,
                "writes_refused",
                "1 while pgtide refuses to use any primary of the database: hosts out of recovery it cannot order (split brain, different clusters), or only diverged ones up",
                &["database"],
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
            collect,
            auth_failures,
        }
    }

    /// The handles of one pool.
    pub fn pool(&self, database: &str, user: &str) -> PoolMetrics {
        let du = [database, user];
        let clients = |state: &str| self.clients.with_label_values(&[database, user, state]);
        let prepared = |event: &str| self.prepared.with_label_values(&[database, user, event]);
        let routing = |outcome: &str| self.routing.with_label_values(&[database, user, outcome]);
        PoolMetrics {
            collect: self.collect,
            clients_active: clients("active"),
            clients_waiting: clients("waiting"),
            clients_idle: clients("idle"),
            clients_pinned: self.clients_pinned.with_label_values(&du),
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
            routing: RoutingMetrics {
                primary: routing("primary"),
                replica: routing("replica"),
                fallback: routing("fallback"),
                hint: routing("hint"),
                retried_primary: routing("retried_primary"),
                read_your_writes: self.read_your_writes.with_label_values(&du),
            },
            errors: self.errors.clone(),
            servers: self.servers.clone(),
            longest_wait: self.longest_wait.clone(),
            database: database.to_string(),
            user: user.to_string(),
        }
    }

    /// Sets the gauges of one monitored host (at scrape time). A lag that is not known
    /// (a primary, a host never checked) has no sample.
    pub fn set_host(&self, database: &str, h: &HostSample) {
        let dh = [database, h.addr];
        self.host_up.with_label_values(&dh).set(i64::from(h.up));
        for role in HOST_ROLES {
            self.host_role
                .with_label_values(&[database, h.addr, role])
                .set(i64::from(*role == h.role));
        }
        for state in HOST_HEALTH {
            self.host_health
                .with_label_values(&[database, h.addr, state])
                .set(i64::from(*state == h.health));
        }
        match h.lag_bytes {
            Some(b) => self
                .host_lag_bytes
                .with_label_values(&dh)
                .set(i64::try_from(b).unwrap_or(i64::MAX)),
            None => {
                let _ = self.host_lag_bytes.remove_label_values(&dh);
            }
        }
        match h.lag_seconds {
            Some(s) => self.host_lag_seconds.with_label_values(&dh).set(s),
            None => {
                let _ = self.host_lag_seconds.remove_label_values(&dh);
            }
        }
        match h.timeline {
            Some(t) => self.host_timeline.with_label_values(&dh).set(i64::from(t)),
            None => {
                let _ = self.host_timeline.remove_label_values(&dh);
            }
        }
        self.host_passed_over
            .with_label_values(&dh)
            .set(i64::from(h.passed_over));
    }

    /// This process's `max_db_connections` for `database` and its server connections there.
    pub fn set_db_connections(&self, database: &str, limit: u32, open: u32) {
        self.db_max_connections
            .with_label_values(&[database])
            .set(i64::from(limit));
        self.db_connections
            .with_label_values(&[database])
            .set(i64::from(open));
    }

    /// Whether pgtide refuses every primary of `database` (see `pgtide_writes_refused`).
    pub fn set_writes_refused(&self, database: &str, refused: bool) {
        self.writes_refused
            .with_label_values(&[database])
            .set(i64::from(refused));
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
        if !self.collect {
            return;
        }
        let class = sqlstate.get(..2).unwrap_or("??");
        self.errors
            .with_label_values(&[&self.database, &self.user, class])
            .inc();
    }

    /// Sets the server-connection gauges of the pool on `host` (at scrape time).
    pub fn set_servers(&self, host: &str, n: ServerCounts) {
        let (d, u) = (self.database.as_str(), self.user.as_str());
        for (state, v) in [
            ("active", n.active),
            ("idle", n.idle),
            ("used", n.used),
            ("login", n.login),
        ] {
            self.servers.with_label_values(&[d, u, host, state]).set(v);
        }
    }

    /// Sets how long the longest-waiting client of (database, user) has waited (at scrape
    /// time; the largest over the pools of its hosts).
    pub fn set_longest_wait(&self, longest_wait: Duration) {
        self.longest_wait
            .with_label_values(&[&self.database, &self.user])
            .set(longest_wait.as_secs_f64());
    }
}

/// How `/readyz` learns whether one database's primary is reachable.
pub enum PrimaryCheck {
    /// Known from the health monitor (a database with several hosts): `Err` says why not.
    Known {
        database: String,
        state: Result<(), String>,
    },
    /// A single-host database: its server must accept a TCP connection.
    Connect {
        database: String,
        host: String,
        port: u16,
    },
}

/// What `/readyz` checks, and what `/metrics` refreshes before it encodes.
pub trait Probe: Send + Sync + 'static {
    /// Updates gauges that are read from state rather than counted.
    fn refresh(&self);
    /// One check per configured database: is its primary reachable?
    fn primaries(&self) -> Vec<PrimaryCheck>;
    /// Whether a shutdown has begun: then not ready, whatever the primaries say.
    fn stopping(&self) -> bool {
        false
    }
}

/// How long `/readyz` waits for a single-host database's server to accept a connection.
const READY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the checks of `/readyz`: `Ok` when every primary is reachable, else the reasons.
pub async fn readiness(probe: &dyn Probe) -> Result<(), Vec<String>> {
    if probe.stopping() {
        return Err(vec!["pgtide is shutting down".to_string()]);
    }
    let mut down = Vec::new();
    let mut connects = tokio::task::JoinSet::new();
    for check in probe.primaries() {
        match check {
            PrimaryCheck::Known { database, state } => {
                if let Err(why) = state {
                    down.push(format!("database \"{database}\": {why}"));
                }
            }
            PrimaryCheck::Connect {
                database,
                host,
                port,
            } => {
                connects.spawn(async move {
                    let ok = tokio::time::timeout(
                        READY_CONNECT_TIMEOUT,
                        TcpStream::connect((host.as_str(), port)),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok());
                    (!ok).then(|| {
                        format!("database \"{database}\": cannot reach the primary {host}:{port}")
                    })
                });
            }
        }
    }
    while let Some(r) = connects.join_next().await {
        if let Ok(Some(why)) = r {
            down.push(why);
        }
    }
    if down.is_empty() {
        Ok(())
    } else {
        down.sort();
        Err(down)
    }
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
        p.set_servers(
            "db1:5432",
            ServerCounts {
                active: 2,
                idle: 3,
                ..ServerCounts::default()
            },
        );
        p.set_longest_wait(Duration::from_millis(1500));
        p.routing.replica.inc();
        m.set_host(
            "app",
            &HostSample {
                addr: "db2:5432",
                up: true,
                role: "replica",
                health: "up",
                lag_bytes: Some(4096),
                lag_seconds: None,
                timeline: None,
                passed_over: false,
            },
        );
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
            text.contains(
                "pgtide_servers{database=\"app\",host=\"db1:5432\",state=\"idle\",user=\"alice\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("pgtide_longest_wait_seconds{database=\"app\",user=\"alice\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains(
                "pgtide_routing_decisions_total{database=\"app\",outcome=\"replica\",user=\"alice\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "pgtide_host_role{database=\"app\",host=\"db2:5432\",role=\"replica\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "pgtide_host_role{database=\"app\",host=\"db2:5432\",role=\"primary\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("pgtide_host_replay_lag_bytes{database=\"app\",host=\"db2:5432\"} 4096"),
            "{text}"
        );
        assert!(
            !text.contains("pgtide_host_replay_lag_seconds{"),
            "an unknown lag has no sample: {text}"
        );
        assert!(text.contains("pgtide_build_info{version="), "{text}");
    }
}
