//! The admin console: the virtual database `pgtide` (also `pgbouncer`, for tools written
//! for PgBouncer) where the users in `admin_users` run `SHOW ...`, `PAUSE`, `RESUME`,
//! `RELOAD`, `RECONNECT`, `KILL` and `SHUTDOWN` over the simple query protocol.
//!
//! This module owns what the console needs beyond the pools: the registries of clients
//! and servers ([`registry`]), the PAUSE gate ([`pause`]), where the configuration was
//! read from (for `RELOAD`), and the per-database totals behind `SHOW STATS`' averages.
//! The console itself is [`console`]; the result sets of the SHOW commands are in
//! [`show`].

pub mod console;
pub mod pause;
pub mod registry;
mod show;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::client::Shared;
use crate::pool::PoolHooks;
use crate::reload::ConfigSource;
use crate::shutdown::{Phase, ShutdownSignal};
use registry::{ClientEntry, Registry};

/// How often `SHOW STATS` averages are brought up to date (PgBouncer's `stats_period`).
pub const STATS_PERIOD: Duration = Duration::from_secs(15);

/// State the admin console reads and changes.
pub struct AdminState {
    /// Logged-in clients (admin sessions included).
    pub clients: Arc<Registry<ClientEntry>>,
    /// The PAUSE gate and the server registry, shared with every pool.
    pub hooks: PoolHooks,
    source: Mutex<Option<ConfigSource>>,
    phase: OnceLock<watch::Sender<Phase>>,
    /// One reload at a time (SIGHUP and RELOAD may race).
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    stats: Mutex<StatsWindow>,
    pub started: std::time::SystemTime,
}

impl Default for AdminState {
    fn default() -> Self {
        AdminState {
            clients: Arc::default(),
            hooks: PoolHooks::default(),
            source: Mutex::new(None),
            phase: OnceLock::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            stats: Mutex::new(StatsWindow::default()),
            started: std::time::SystemTime::now(),
        }
    }
}

impl AdminState {
    pub fn set_source(&self, source: Option<ConfigSource>) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// Where the configuration was read from; `None` in zero-config mode.
    pub fn source(&self) -> Option<ConfigSource> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_phase(&self, phase: watch::Sender<Phase>) {
        let _ = self.phase.set(phase);
    }

    /// Starts a graceful shutdown (`SHUTDOWN`).
    pub fn shutdown(&self) {
        if let Some(p) = self.phase.get() {
            p.send_if_modified(|p| {
                if *p < Phase::Draining {
                    *p = Phase::Draining;
                    true
                } else {
                    false
                }
            });
        }
    }

    pub fn gate(&self) -> &pause::PauseGate {
        &self.hooks.gate
    }
}

/// Totals of one database, as `SHOW STATS` reports them (times in microseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    /// Checkouts that waited (or not): the number of `wait_time` samples.
    pub wait_count: u64,
}

/// The totals at the start and the end of the last complete stats period.
#[derive(Default)]
struct StatsWindow {
    last: Option<(Instant, HashMap<String, Totals>)>,
    previous: Option<(Instant, HashMap<String, Totals>)>,
}

/// Per-database totals since start, summed over the pools' metric handles.
pub fn totals(shared: &Shared) -> HashMap<String, Totals> {
    let mut seen = std::collections::HashSet::new();
    let mut out: HashMap<String, Totals> = HashMap::new();
    for pool in shared.pools() {
        // Pools of one (database, user) on several hosts share their metric handles.
        if !seen.insert((pool.database.clone(), pool.user.clone())) {
            continue;
        }
        let m = &pool.metrics;
        let t = out.entry(pool.database.clone()).or_default();
        let us = |s: f64| (s * 1e6) as u64;
        t.xact_count += m.transactions.get();
        t.query_count += m.queries.get();
        t.received += m.bytes_received.get();
        t.sent += m.bytes_sent.get();
        t.xact_time += us(m.transaction_seconds.get_sample_sum());
        t.query_time += us(m.query_seconds.get_sample_sum());
        t.wait_time += us(m.wait_seconds.get_sample_sum());
        t.wait_count += m.wait_seconds.get_sample_count();
    }
    out
}

/// Averages of one database over the last stats period: per second for counts and
/// bytes, per transaction / query / wait for times.
#[derive(Clone, Copy, Debug, Default)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

/// The averages of the last complete stats period (zero before the first one ends).
pub fn averages(shared: &Shared) -> HashMap<String, Averages> {
    let w = shared.admin.stats.lock().unwrap_or_else(|e| e.into_inner());
    let (Some((t1, now)), Some((t0, before))) = (&w.last, &w.previous) else {
        return HashMap::new();
    };
    let secs = t1.duration_since(*t0).as_secs_f64().max(0.001);
    now.iter()
        .map(|(db, n)| {
            let b = before.get(db).copied().unwrap_or_default();
            let d = |a: u64, b: u64| a.saturating_sub(b);
            let per_sec = |a: u64, b: u64| (d(a, b) as f64 / secs) as u64;
            let per = |time: u64, time0: u64, n: u64, n0: u64| {
                d(time, time0).checked_div(d(n, n0)).unwrap_or(0)
            };
            (
                db.clone(),
                Averages {
                    xact_count: per_sec(n.xact_count, b.xact_count),
                    query_count: per_sec(n.query_count, b.query_count),
                    recv: per_sec(n.received, b.received),
                    sent: per_sec(n.sent, b.sent),
                    xact_time: per(n.xact_time, b.xact_time, n.xact_count, b.xact_count),
                    query_time: per(n.query_time, b.query_time, n.query_count, b.query_count),
                    wait_time: per(n.wait_time, b.wait_time, n.wait_count, b.wait_count),
                },
            )
        })
        .collect()
}

/// Takes a snapshot of the totals every [`STATS_PERIOD`] until shutdown begins.
pub fn spawn_stats(shared: Arc<Shared>, mut signal: ShutdownSignal) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATS_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = (Instant::now(), totals(&shared));
                    let mut w = shared.admin.stats.lock().unwrap_or_else(|e| e.into_inner());
                    w.previous = w.last.take();
                    w.last = Some(now);
                }
                _ = signal.reached(Phase::Draining) => return,
            }
        }
    });
}

/// True when `database` names the admin console.
pub fn is_admin_database(database: &str) -> bool {
    crate::config::ADMIN_DATABASES.contains(&database)
}
