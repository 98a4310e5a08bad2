//! `SHOW STATS`' totals and averages: per-database sums of the pools' counters, and the
//! window of two snapshots (one every `stats_period`) the averages are computed over.

use std::collections::HashMap;
use std::time::Instant;

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

impl Totals {
    /// Adds the counters of one (database, user)'s metric handles.
    pub fn add(&mut self, m: &super::PoolMetrics) {
        let us = |s: f64| (s * 1e6) as u64;
        self.xact_count += m.transactions.get();
        self.query_count += m.queries.get();
        self.received += m.bytes_received.get();
        self.sent += m.bytes_sent.get();
        self.xact_time += us(m.transaction_seconds.get_sample_sum());
        self.query_time += us(m.query_seconds.get_sample_sum());
        self.wait_time += us(m.wait_seconds.get_sample_sum());
        self.wait_count += m.wait_seconds.get_sample_count();
    }
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

/// The totals at the start and the end of the last complete stats period.
#[derive(Default)]
pub struct StatsWindow {
    last: Option<(Instant, HashMap<String, Totals>)>,
    previous: Option<(Instant, HashMap<String, Totals>)>,
}

impl StatsWindow {
    /// Records the totals at the end of a period.
    pub fn record(&mut self, at: Instant, totals: HashMap<String, Totals>) {
        self.previous = self.last.take();
        self.last = Some((at, totals));
    }

    /// The averages of the last complete period (none before the first one ends).
    pub fn averages(&self) -> HashMap<String, Averages> {
        let (Some((t1, now)), Some((t0, before))) = (&self.last, &self.previous) else {
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
}
