//! Micro-benchmark of what the metrics cost one transaction: the metric calls a client
//! session makes for one autocommit statement in transaction mode, in the order it makes
//! them (client state gauges, the wait, request and transaction clocks and histograms, the
//! counters, the per-transaction flush of bytes and prepared-statement events, a routing
//! decision), on pre-resolved handles as the session holds them. Also one from two
//! threads at once, since the handles of a pool are shared by all its sessions.
//!
//! Run with `cargo bench --bench metrics`. Compare the time per transaction with the
//! pooler's CPU time per transaction from `pgbench_compare.sh` (benches/README.md).

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgtide::metrics::{Metrics, PoolMetrics};

/// The metric work of one transaction (see the module doc).
fn one_transaction(m: &PoolMetrics) {
    // attach: Idle -> Waiting, the wait, Waiting -> Active.
    m.clients_idle.dec();
    m.clients_waiting.inc();
    let waiting_since = Instant::now();
    m.routing.replica.inc();
    m.wait_seconds
        .observe(black_box(waiting_since).elapsed().as_secs_f64());
    m.clients_waiting.dec();
    m.clients_active.inc();
    // The request goes out: both clocks start.
    let started = Instant::now();
    // CommandComplete, then ReadyForQuery 'I'.
    m.queries.inc();
    m.query_seconds.observe(started.elapsed().as_secs_f64());
    m.transactions.inc();
    m.transaction_seconds
        .observe(started.elapsed().as_secs_f64());
    // release: Active -> Idle, and the flush.
    m.clients_active.dec();
    m.clients_idle.inc();
    m.bytes_received.inc_by(black_box(120));
    m.bytes_sent.inc_by(black_box(340));
    m.prepared_hits.inc_by(black_box(0));
    m.prepared_prepares.inc_by(black_box(0));
    m.prepared_evictions.inc_by(black_box(0));
}

/// CPU time of the calling thread, in nanoseconds (unaffected by preemption, unlike the
/// wall time criterion reports, which matters on a busy machine).
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn bench(c: &mut Criterion) {
    let metrics = Metrics::new();
    let m = metrics.pool("bench", "postgres");
    m.clients_idle.inc();
    // CPU time per transaction, single thread, over 5 million transactions.
    const N: u32 = 5_000_000;
    let t0 = thread_cpu_ns();
    for _ in 0..N {
        one_transaction(black_box(&m));
    }
    let ns = (thread_cpu_ns() - t0) as f64 / f64::from(N);
    println!("metrics_per_transaction/one_thread: {ns:.0} ns of CPU time per transaction");
    c.bench_function("metrics_per_transaction/one_thread", |b| {
        b.iter(|| one_transaction(&m))
    });
    // Two sessions of one pool on two cores: the shared counters' cache lines move.
    let other = metrics.pool("bench", "postgres");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            one_transaction(&other);
        }
    });
    let t0 = thread_cpu_ns();
    for _ in 0..N {
        one_transaction(black_box(&m));
    }
    let ns = (thread_cpu_ns() - t0) as f64 / f64::from(N);
    println!("metrics_per_transaction/two_threads: {ns:.0} ns of CPU time per transaction");
    c.bench_function("metrics_per_transaction/two_threads", |b| {
        b.iter(|| one_transaction(&m))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = t.join();
}

criterion_group!(benches, bench);
criterion_main!(benches);
