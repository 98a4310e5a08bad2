//! Micro-benchmark of the read/write classifier (`pgtide::router::classify`) on a
//! realistic statement mix: short point selects, joins, inserts, updates, CTEs, and a few
//! of the statements that need a closer look (locking reads, nextval, comments).
//!
//! Run with `cargo bench --bench classify`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgtide::router::classify::{classify, transaction_mode, ClassifyOptions, Route};

/// The mix, with rough weights by repetition: reads dominate, as in most OLTP traffic.
const MIX: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "select id, name, email from users where id = $1",
    "select id, name, email from users where id = $1",
    "SELECT u.id, u.name, o.total, o.created_at FROM users u JOIN orders o ON o.user_id = u.id \
     WHERE u.id = $1 AND o.created_at > now() - interval '30 days' ORDER BY o.created_at DESC LIMIT 20",
    "select p.id, p.title, count(c.id) as comments from posts p left join comments c on c.post_id = p.id \
     where p.author_id = $1 group by p.id, p.title order by p.id desc limit 50",
    "/* app=web,controller=orders */ SELECT * FROM orders WHERE status = 'pending' AND region = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "insert into events (kind, payload) values ('click', '{\"x\": 1, \"y\": \"it''s\"}') returning id",
    "WITH recent AS (SELECT user_id, max(created_at) AS last FROM orders GROUP BY user_id) \
     SELECT u.name, r.last FROM users u JOIN recent r ON r.user_id = u.id WHERE r.last > $1",
    "with moved as (delete from queue where id in (select id from queue order by id limit 10 for update skip locked) returning *) \
     insert into done select * from moved",
    "SELECT * FROM jobs WHERE state = 'ready' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    "select nextval('orders_id_seq')",
    "BEGIN",
    "COMMIT",
    "SET application_name = 'worker'",
    "select 1",
];

fn bench(c: &mut Criterion) {
    let opts = ClassifyOptions::default();
    let bytes: usize = MIX.iter().map(|s| s.len()).sum();
    // Sanity: the mix has both routes.
    assert!(MIX
        .iter()
        .any(|s| classify(s.as_bytes(), &opts).route == Route::Replica));
    assert!(MIX
        .iter()
        .any(|s| classify(s.as_bytes(), &opts).route == Route::Primary));

    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(MIX.len() as u64));
    g.bench_function("mix_statements", |b| {
        b.iter(|| {
            for sql in MIX {
                black_box(classify(black_box(sql.as_bytes()), &opts));
            }
        })
    });
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("mix_bytes", |b| {
        b.iter(|| {
            for sql in MIX {
                black_box(classify(black_box(sql.as_bytes()), &opts));
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("point_select", |b| {
        b.iter(|| classify(black_box(MIX[0].as_bytes()), &opts))
    });
    let fns = vec!["audit_log".to_string(), "app.bump".to_string()];
    let with_fns = ClassifyOptions {
        write_functions: &fns,
        hints: true,
    };
    g.bench_function("join_with_write_functions", |b| {
        b.iter(|| classify(black_box(MIX[5].as_bytes()), &with_fns))
    });
    g.bench_function("transaction_mode", |b| {
        b.iter(|| {
            transaction_mode(black_box(
                b"BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, NOT DEFERRABLE".as_slice(),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
