//! Micro-benchmark of checking an idle server connection out of a pool and back in
//! (`pgtide::pool::Pool::checkout` / `checkin`), the step every transaction pays in
//! transaction mode.
//!
//! The server is a minimal fake on a loopback port: it accepts, reads the startup
//! packet, answers AuthenticationOk, BackendKeyData and ReadyForQuery, and then keeps the
//! socket open without a word. Only the pool is measured: after the first round every
//! checkout finds an idle connection.
//!
//! - `checkout_checkin/one_task`: one task on a current-thread runtime, checkout then
//!   checkin, in a loop;
//! - `checkout_checkin/contended_4_tasks`: four tasks on a two-worker runtime doing the
//!   same on one pool of 4 connections (the pool's lock is shared);
//! - `checkout_checkin/waiting_8_tasks_2_conns`: eight tasks on a current-thread runtime
//!   (no cross-thread wake-ups to blur the pool's own cost), one pool of 2 connections, each task holding its connection over one yield: most
//!   checkouts wait in line and are served by another task's checkin (the wait, the
//!   hand-over and the wake-up of the waiting task).
//!
//! Run with `cargo bench --bench pool`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pgtide::auth::SaltedPasswordCache;
use pgtide::config::{PoolMode, PoolSettings};
use pgtide::metrics::Metrics;
use pgtide::pool::{DbLimit, Pool, PoolTimeouts};
use pgtide::server::ServerTarget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves logins on a fresh loopback port; returns the port.
async fn fake_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let mut out = Vec::new();
                out.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]); // AuthenticationOk
                out.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]); // BackendKeyData
                out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']); // ReadyForQuery
                if s.write_all(&out).await.is_err() {
                    return;
                }
                // Idle until the pool closes the connection.
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

fn pool(port: u16, size: u32) -> Arc<Pool> {
    let metrics = Metrics::new();
    Pool::new(
        ServerTarget {
            host: "127.0.0.1".into(),
            port,
            dbname: "bench".into(),
            user: "bench".into(),
            secret: pgtide::auth::ServerSecret::new(None),
            tls: pgtide::tls::ServerTls::disabled(),
        },
        PoolSettings {
            pool_mode: PoolMode::Transaction,
            session_state: pgtide::config::SessionState::Pin,
            pool_size: size,
            min_pool_size: 0,
            max_db_connections: 0,
        },
        PoolTimeouts {
            connect_timeout: Duration::from_secs(5),
            connect_retries: 0,
            connect_backoff: Duration::from_millis(100),
            idle_timeout: None,
            lifetime: None,
            max_message: 1 << 20,
        },
        Arc::new(SaltedPasswordCache::default()),
        DbLimit::new(0),
        metrics.pool("bench", "bench"),
        pgtide::pool::PoolHooks::default(),
    )
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checkout_checkin");
    let wait = Duration::from_secs(5);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let p = rt.block_on(async {
        let p = pool(fake_server().await, 1);
        let conn = p.checkout(wait).await.expect("first checkout connects");
        conn.checkin();
        p
    });
    g.bench_function("one_task", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let conn = p.checkout(wait).await.expect("checkout");
                    conn.checkin();
                }
                start.elapsed()
            })
        })
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    tasks_on_one_pool(&mut g, "contended_4_tasks", &rt, 4, 4, false);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tasks_on_one_pool(&mut g, "waiting_8_tasks_2_conns", &rt, 8, 2, true);
    g.finish();
}

/// `tasks` tasks on `rt` doing checkout then checkin in a loop on one pool of `conns`
/// connections (opened before the clock starts); `hold`: each keeps its connection over
/// one yield, so that others queue. Reports the time per checkout + checkin, whichever
/// task did it.
fn tasks_on_one_pool(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    rt: &tokio::runtime::Runtime,
    tasks: usize,
    conns: u32,
    hold: bool,
) {
    let wait = Duration::from_secs(5);
    let p = rt.block_on(async {
        let p = pool(fake_server().await, conns);
        let mut held = Vec::new();
        for _ in 0..conns {
            held.push(p.checkout(wait).await.expect("first checkouts connect"));
        }
        for conn in held {
            conn.checkin();
        }
        p
    });
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(tasks as u64);
            rt.block_on(async {
                let start = Instant::now();
                let handles: Vec<_> = (0..tasks)
                    .map(|_| {
                        let p = p.clone();
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                let conn = p.checkout(wait).await.expect("checkout");
                                if hold {
                                    tokio::task::yield_now().await;
                                }
                                conn.checkin();
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.expect("task");
                }
                start.elapsed() * iters as u32 / (per_task * tasks as u64) as u32
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
