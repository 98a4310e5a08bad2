//! Named prepared statements through pgtide: in transaction mode client names map to
//! shared server-side `pgtide_<n>` statements prepared on whichever server a transaction
//! gets. Drivers (tokio-postgres, sqlx, pgbench -M prepared), protocol-sync edge cases
//! with the raw client (errors inside pipelines, Flush, Close, DISCARD / DEALLOCATE ALL,
//! SQL-level PREPARE in the forms pgtide refuses; the supported ones are in
//! `sql_prepared.rs`), eviction under `max_prepared_statements`, sharing of one server
//! statement between clients, and session mode passing names through untouched.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use pgtide::config::{ConfigDuration, PoolMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, APP_PASSWORD, APP_USER};
use crate::harness::{app_at, setup, to};
// The raw client is shared with protocol.rs, which includes the same file.
use crate::rawpg;
use rawpg::{bind, execute, parse, query, sync, tags, Msg, RawPg};

/// 100 / $1, with a volatile term so that a zero divisor fails in Execute (a custom plan
/// would fold a plain `100 / $1` and fail in Bind).
const DIV: &str = "SELECT 100 / ($1::int + (random() * 0)::int)";

const TRUST: &str = "pgtide_trust";

async fn raw(addr: SocketAddr, db: &str) -> RawPg {
    to("raw login", RawPg::login(addr, TRUST, db, &[])).await
}

async fn exec(c: &Client, sql: &str) {
    to(sql, c.batch_execute(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Text rows of a simple query.
async fn simple_rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let msgs = to(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The prepared statements of the server connection that runs this simple query:
/// (name, statement text).
async fn server_statements(c: &Client) -> Vec<(String, String)> {
    simple_rows(
        c,
        "SELECT name, statement FROM pg_prepared_statements ORDER BY name",
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
    .collect()
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

// ---- raw protocol helpers ----

fn framed(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(t);
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    framed(b'D', &b)
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    framed(b'C', &b)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Bind (text params) + Execute of the unnamed portal.
fn run_stmt(stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
    cat(&[bind("", stmt, params), execute("", 0)])
}

fn errors(msgs: &[Msg]) -> Vec<(Option<String>, Option<String>)> {
    msgs.iter()
        .filter(|m| m.tag == b'E')
        .map(|m| (m.sqlstate(), m.message()))
        .collect()
}

fn first_error_code(msgs: &[Msg]) -> Option<String> {
    msgs.iter()
        .find(|m| m.tag == b'E')
        .and_then(|m| m.sqlstate())
}

/// First column of every DataRow.
fn values(msgs: &[Msg]) -> Vec<Option<String>> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| m.data_row().remove(0))
        .collect()
}

/// Sends `bytes` and reads up to the next ReadyForQuery.
async fn roundtrip(c: &mut RawPg, bytes: &[u8]) -> Vec<Msg> {
    c.send(bytes).await;
    to("until ReadyForQuery", c.until_ready()).await
}

/// Prepares `name` as `sql` (Parse + Sync); panics on error.
async fn raw_prepare(c: &mut RawPg, name: &str, sql: &str) {
    let m = roundtrip(c, &cat(&[parse(name, sql), sync()])).await;
    assert_eq!(tags(&m), "1Z", "Parse {name} {sql}: {:?}", errors(&m));
}

/// Runs prepared `name` with `params`; the first column of the first row.
async fn raw_run(c: &mut RawPg, name: &str, params: &[Option<&str>]) -> Vec<Msg> {
    roundtrip(c, &cat(&[run_stmt(name, params), sync()])).await
}

async fn raw_value(c: &mut RawPg, name: &str, params: &[Option<&str>]) -> String {
    let m = raw_run(c, name, params).await;
    assert_eq!(tags(&m), "2DCZ", "run {name}: {:?}", errors(&m));
    values(&m).remove(0).unwrap_or_default()
}

// 1 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_across_transactions_and_servers() {
    let (db, _p, addr) = setup("prep_tp", |c| c.pgtide.pool_size = 2).await;
    let admin = app_at(addr, &db).await;
    exec(
        &admin,
        "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL);
         INSERT INTO kv SELECT g, g * 10 FROM generate_series(0, 99) g",
    )
    .await;

    const CLIENTS: i32 = 24;
    const ROUNDS: i32 = 60;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = app_at(addr, &db).await;
            let stmt = to(
                "prepare",
                client.prepare("SELECT $1::int + v, pg_backend_pid() FROM kv WHERE k = $2"),
            )
            .await
            .expect("prepare");
            // Prepared inside a transaction, executed in later ones.
            let tx = to("begin", client.transaction()).await.expect("begin");
            let in_tx = to("prepare in tx", tx.prepare("SELECT $1::int * 3"))
                .await
                .expect("prepare in a transaction");
            to("commit", tx.commit()).await.expect("commit");

            let mut pids = HashSet::new();
            for i in 0..ROUNDS {
                let k = (c * 7 + i) % 100;
                let row = if i % 2 == 0 {
                    to("query", client.query_one(&stmt, &[&i, &k]))
                        .await
                        .unwrap_or_else(|e| panic!("client {c} round {i}: {e:?}"))
                } else {
                    let tx = to("begin", client.transaction()).await.expect("begin");
                    let r = to("query in tx", tx.query_one(&stmt, &[&i, &k]))
                        .await
                        .unwrap_or_else(|e| panic!("client {c} round {i} (tx): {e:?}"));
                    let t: i32 = to("in_tx", tx.query_one(&in_tx, &[&i]))
                        .await
                        .unwrap_or_else(|e| panic!("client {c} round {i}: {e:?}"))
                        .get(0);
                    assert_eq!(t, i * 3);
                    to("commit", tx.commit()).await.expect("commit");
                    r
                };
                assert_eq!(row.get::<_, i32>(0), i + k * 10, "client {c} round {i}");
                pids.insert(row.get::<_, i32>(1));

                // Prepared per call, closed when dropped.
                let r = to(
                    "query str",
                    client.query("SELECT $1::int * 2, $2::text", &[&i, &format!("c{c}")]),
                )
                .await
                .unwrap_or_else(|e| panic!("client {c} round {i} (unprepared): {e:?}"));
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].get::<_, i32>(0), i * 2);
                assert_eq!(r[0].get::<_, String>(1), format!("c{c}"));

                if i % 20 == 5 {
                    // An error at execution; the client carries on.
                    let e = to("div0", client.query_one("SELECT 10 / $1::int", &[&0i32]))
                        .await
                        .expect_err("division by zero");
                    assert_eq!(code(&e), Some(&SqlState::DIVISION_BY_ZERO), "{e:?}");
                    let t: i32 = to("in_tx", client.query_one(&in_tx, &[&(i + 1)]))
                        .await
                        .unwrap_or_else(|e| panic!("client {c} after the error: {e:?}"))
                        .get(0);
                    assert_eq!(t, (i + 1) * 3);
                }
            }
            pids
        }));
    }
    let mut changed = 0;
    let mut all = HashSet::new();
    for t in tasks {
        let pids = to("client task", t).await.expect("client task");
        if pids.len() > 1 {
            changed += 1;
        }
        all.extend(pids);
    }
    assert!(
        changed > 0,
        "no client ever ran its statement on a second server connection ({all:?})"
    );
    assert!(
        all.len() <= 2,
        "more server connections than pool_size 2: {all:?}"
    );
}

// 2 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_with_statement_cache() {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::Row;

    let (db, _p, addr) = setup("prep_sqlx", |c| c.pgtide.pool_size = 2).await;
    let opts = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(addr.port())
        .username(APP_USER)
        .password(APP_PASSWORD)
        .database(&db);
    let pool = to(
        "sqlx pool",
        PgPoolOptions::new()
            .max_connections(20)
            .min_connections(20)
            .acquire_timeout(harness::TEST_TIMEOUT)
            .connect_with(opts),
    )
    .await
    .expect("sqlx connects through pgtide");

    let mut tasks = Vec::new();
    for t in 0..24i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..80i64 {
                let n = t * 1000 + i;
                let r = to(
                    "sqlx query",
                    sqlx::query("SELECT $1::int8").bind(n).fetch_one(&pool),
                )
                .await
                .unwrap_or_else(|e| panic!("task {t} round {i}: {e:?}"));
                assert_eq!(r.get::<i64, _>(0), n);
                let (a, b): (i64, String) = to(
                    "sqlx query_as",
                    sqlx::query_as("SELECT $1::int8 * 2, $2::text")
                        .bind(n)
                        .bind(format!("t{t}"))
                        .fetch_one(&pool),
                )
                .await
                .unwrap_or_else(|e| panic!("task {t} round {i}: {e:?}"));
                assert_eq!((a, b), (n * 2, format!("t{t}")));
                if i % 10 == 0 {
                    let mut tx = to("begin", pool.begin()).await.expect("begin");
                    let v: i64 = to(
                        "in tx",
                        sqlx::query_scalar("SELECT $1::int8 + 1")
                            .bind(n)
                            .fetch_one(&mut *tx),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("task {t} round {i} in tx: {e:?}"));
                    assert_eq!(v, n + 1);
                    to("commit", tx.commit()).await.expect("commit");
                }
            }
        }));
    }
    for t in tasks {
        to("sqlx task", t).await.expect("sqlx task");
    }
    to("pool close", pool.close()).await;
}

// 3 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode_50_clients_pool_5() {
    let db = harness::fresh_database("prep_pgbench");
    let (ok, out, err) =
        crate::pgbench::pgbench(harness::primary_port(), &db, &["-i", "-s", "1", "-q"]).await;
    assert!(ok, "pgbench -i failed:\n{out}\n{err}");
    let (_db, _p, addr) = {
        let mut config = harness::config_for(&db);
        config.pgtide.pool_size = 5;
        config.pgtide.query_wait_timeout = ConfigDuration::secs(30);
        let pooler = harness::start_pgtide(config).await;
        let addr = pooler.local_addr();
        (db.clone(), pooler, addr)
    };

    let tpcb = crate::pgbench::run(addr, &db, "prepared", 10, false).await;
    crate::pgbench::run(addr, &db, "prepared", 10, true).await;

    crate::pgbench::check_balances(&db, tpcb);
}

// 4 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_parse_and_unknown_names_give_postgres_errors() {
    let (db, _p, addr) = setup("prep_badparse", |c| c.pgtide.pool_size = 1).await;
    let mut c = raw(addr, &db).await;

    let m = roundtrip(&mut c, &cat(&[parse("bad", "SELEC 1"), sync()])).await;
    assert_eq!(tags(&m), "EZ", "{:?}", errors(&m));
    assert_eq!(first_error_code(&m).as_deref(), Some("42601"));
    assert_eq!(c.one("SELECT 'still fine'").await, "still fine");

    // The failed Parse left no statement behind.
    let m = raw_run(&mut c, "bad", &[]).await;
    assert_eq!(tags(&m), "EZ", "{:?}", errors(&m));
    assert_eq!(
        first_error_code(&m).as_deref(),
        Some("26000"),
        "{:?}",
        errors(&m)
    );

    // A name never prepared.
    let m = raw_run(&mut c, "never_prepared", &[]).await;
    assert_eq!(tags(&m), "EZ", "{:?}", errors(&m));
    assert_eq!(
        first_error_code(&m).as_deref(),
        Some("26000"),
        "{:?}",
        errors(&m)
    );
    let m = roundtrip(
        &mut c,
        &cat(&[describe_statement("never_prepared"), sync()]),
    )
    .await;
    assert_eq!(
        first_error_code(&m).as_deref(),
        Some("26000"),
        "{:?}",
        errors(&m)
    );

    // The same text, fixed, prepares and runs.
    raw_prepare(&mut c, "bad", "SELECT 1").await;
    assert_eq!(raw_value(&mut c, "bad", &[]).await, "1");
    // Parse again after a failure with a valid statement of another client.
    let mut d = raw(addr, &db).await;
    let m = roundtrip(&mut d, &cat(&[parse("bad", "SELEC 1"), sync()])).await;
    assert_eq!(first_error_code(&m).as_deref(), Some("42601"));
    assert_eq!(raw_value(&mut c, "bad", &[]).await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_with_a_failing_execute_in_the_middle() {
    let (db, _p, addr) = setup("prep_pipeline", |c| c.pgtide.pool_size = 1).await;
    let mut a = raw(addr, &db).await;
    let mut b = raw(addr, &db).await;

    let batch = cat(&[
        // batch 1: prepare
        parse("div", DIV),
        parse("add", "SELECT $1::int + 1000"),
        sync(),
        // batch 2: ok, fails, skipped
        run_stmt("div", &[Some("4")]),
        run_stmt("div", &[Some("0")]),
        run_stmt("add", &[Some("1")]),
        sync(),
        // batch 3: fine again
        run_stmt("add", &[Some("7")]),
        run_stmt("div", &[Some("50")]),
        sync(),
    ]);
    a.send(&batch).await;
    let b1 = to("batch 1", a.until_ready()).await;
    let b2 = to("batch 2", a.until_ready()).await;
    let b3 = to("batch 3", a.until_ready()).await;
    assert_eq!(tags(&b1), "11Z", "{:?}", errors(&b1));
    assert_eq!(tags(&b2), "2DC2EZ", "{:?}", errors(&b2));
    assert_eq!(first_error_code(&b2).as_deref(), Some("22012"));
    assert_eq!(values(&b2), vec![Some("25".to_string())]);
    assert_eq!(tags(&b3), "2DC2DCZ", "{:?}", errors(&b3));
    assert_eq!(
        values(&b3),
        vec![Some("1007".to_string()), Some("2".to_string())]
    );

    // The connection keeps working...
    assert_eq!(raw_value(&mut a, "add", &[Some("2")]).await, "1002");
    // ...and so does the one server, for another client.
    raw_prepare(&mut b, "mine", "SELECT $1::text || '!'").await;
    assert_eq!(raw_value(&mut b, "mine", &[Some("b")]).await, "b!");
    raw_prepare(&mut b, "div", DIV).await;
    assert_eq!(raw_value(&mut b, "div", &[Some("3")]).await, "33");
    assert_eq!(raw_value(&mut a, "div", &[Some("10")]).await, "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_skipped_after_an_error_leaves_no_name() {
    let (db, _p, addr) = setup("prep_skipped_parse", |c| c.pgtide.pool_size = 1).await;
    let mut a = raw(addr, &db).await;
    raw_prepare(&mut a, "div", DIV).await;
    // "late" is sent after the failing Execute, before the Sync: PostgreSQL skips it.
    let m = roundtrip(
        &mut a,
        &cat(&[
            run_stmt("div", &[Some("0")]),
            parse("late", "SELECT 'late'::text"),
            sync(),
        ]),
    )
    .await;
    assert_eq!(tags(&m), "2EZ", "{:?}", errors(&m));
    let m = raw_run(&mut a, "late", &[]).await;
    assert_eq!(
        first_error_code(&m).as_deref(),
        Some("26000"),
        "a Parse skipped after an error must not leave the name prepared: {}",
        tags(&m)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_describe_flush_then_bind_execute_sync_keeps_the_server_until_sync() {
    let (db, _p, addr) = setup("prep_flush", |c| c.pgtide.pool_size = 1).await;
    let mut a = raw(addr, &db).await;
    let mut b = raw(addr, &db).await;

    // asyncpg's pattern, twice (the second time the statement is known to pgtide).
    for round in 0..2 {
        let name = format!("__asyncpg_stmt_{round}__");
        a.send(&cat(&[
            parse(&name, "SELECT $1::int + 1 AS n"),
            describe_statement(&name),
            rawpg::flush(),
        ]))
        .await;
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(to("after Flush", a.recv()).await);
        }
        assert_eq!(tags(&got), "1tT", "round {round}: {:?}", errors(&got));

        // Another client wants the only server now: it must wait for A's Sync.
        b.send(&query("SELECT 'b'")).await;
        let early = tokio::time::timeout(Duration::from_millis(300), b.recv()).await;
        assert!(
            early.is_err(),
            "round {round}: B got an answer while A held the server between Flush and Sync: {early:?}"
        );

        let m = roundtrip(&mut a, &cat(&[run_stmt(&name, &[Some("41")]), sync()])).await;
        assert_eq!(tags(&m), "2DCZ", "round {round}: {:?}", errors(&m));
        assert_eq!(values(&m), vec![Some("42".to_string())]);

        let m = to("B after A's Sync", b.until_ready()).await;
        assert_eq!(values(&m), vec![Some("b".to_string())], "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_reprepared_after_alter_table() {
    let (db, _p, addr) = setup("prep_alter", |c| c.pgtide.pool_size = 1).await;
    let c = app_at(addr, &db).await;
    exec(&c, "CREATE TABLE t (a int); INSERT INTO t VALUES (1)").await;

    let s = to("prepare", c.prepare("SELECT * FROM t"))
        .await
        .expect("prepare");
    let rows = to("query", c.query(&s, &[])).await.expect("query");
    assert_eq!(rows[0].len(), 1);

    exec(&c, "ALTER TABLE t ADD COLUMN b int DEFAULT 5").await;
    let e = to("query after ALTER", c.query(&s, &[]))
        .await
        .expect_err("PostgreSQL refuses a cached plan whose result type changed");
    assert_eq!(code(&e), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e:?}");
    assert!(
        db_message(&e).contains("cached plan must not change result type"),
        "{e:?}"
    );
    drop(s);

    // The driver re-prepares (a new name, the same text): PostgreSQL plans it afresh.
    let s2 = to("re-prepare", c.prepare("SELECT * FROM t"))
        .await
        .expect("re-prepare");
    let rows = to("query re-prepared", c.query(&s2, &[]))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "re-prepared statement after ALTER TABLE: {} ({:?})",
                db_message(&e),
                code(&e)
            )
        });
    assert_eq!(rows[0].len(), 2);
    assert_eq!(rows[0].get::<_, i32>(1), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_then_reparse_same_name_with_new_text() {
    let (db, _p, addr) = setup("prep_close", |c| c.pgtide.pool_size = 1).await;
    let mut c = raw(addr, &db).await;
    raw_prepare(&mut c, "x", "SELECT 'one'::text").await;
    assert_eq!(raw_value(&mut c, "x", &[]).await, "one");

    let m = roundtrip(
        &mut c,
        &cat(&[
            close_statement("x"),
            parse("x", "SELECT 'two'::text"),
            run_stmt("x", &[]),
            sync(),
        ]),
    )
    .await;
    assert_eq!(tags(&m), "312DCZ", "{:?}", errors(&m));
    assert_eq!(values(&m), vec![Some("two".to_string())]);

    // Close alone in its own batch, then Parse in the next one.
    let m = roundtrip(&mut c, &cat(&[close_statement("x"), sync()])).await;
    assert_eq!(tags(&m), "3Z");
    let m = raw_run(&mut c, "x", &[]).await;
    assert_eq!(
        first_error_code(&m).as_deref(),
        Some("26000"),
        "{}",
        tags(&m)
    );
    raw_prepare(&mut c, "x", "SELECT 'three'::text").await;
    assert_eq!(raw_value(&mut c, "x", &[]).await, "three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_and_deallocate_all_clear_the_clients_names() {
    let (db, _p, addr) = setup("prep_discard", |c| c.pgtide.pool_size = 1).await;
    let mut a = raw(addr, &db).await;
    let mut b = raw(addr, &db).await;
    raw_prepare(&mut b, "b1", "SELECT 'b1'::text").await;
    assert_eq!(raw_value(&mut b, "b1", &[]).await, "b1");

    for reset in ["DISCARD ALL", "DEALLOCATE ALL"] {
        raw_prepare(&mut a, "a1", "SELECT 'a1'::text").await;
        // The same text as B's: one shared server statement.
        raw_prepare(&mut a, "same_as_b", "SELECT 'b1'::text").await;
        assert_eq!(raw_value(&mut a, "a1", &[]).await, "a1");
        assert_eq!(raw_value(&mut a, "same_as_b", &[]).await, "b1");

        a.simple(reset).await;
        for name in ["a1", "same_as_b"] {
            let m = raw_run(&mut a, name, &[]).await;
            assert_eq!(
                first_error_code(&m).as_deref(),
                Some("26000"),
                "{reset}: {name} still runs: {}",
                tags(&m)
            );
        }
        // B's statement (deallocated on the server by A) still works for B.
        assert_eq!(raw_value(&mut b, "b1", &[]).await, "b1", "{reset}");
        // And A can prepare again.
        raw_prepare(&mut a, "a1", "SELECT 'a1'::text").await;
        assert_eq!(raw_value(&mut a, "a1", &[]).await, "a1", "{reset}");
        assert_eq!(raw_value(&mut b, "b1", &[]).await, "b1", "{reset}");
        let m = roundtrip(&mut a, &cat(&[close_statement("a1"), sync()])).await;
        assert_eq!(tags(&m), "3Z");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_plans_and_discard_temp_keep_prepared_statements() {
    let (db, _p, addr) = setup("prep_discard_plans", |c| c.pgtide.pool_size = 1).await;
    let mut a = raw(addr, &db).await;
    raw_prepare(&mut a, "p", "SELECT 'p'::text").await;
    assert_eq!(raw_value(&mut a, "p", &[]).await, "p");
    // In PostgreSQL neither deallocates prepared statements.
    for sql in ["DISCARD PLANS", "DISCARD TEMP", "DISCARD SEQUENCES"] {
        a.simple(sql).await;
        let m = raw_run(&mut a, "p", &[]).await;
        assert_eq!(
            tags(&m),
            "2DCZ",
            "after {sql}, the client's statement is gone: {:?}",
            errors(&m)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_inside_a_transaction_then_prepare_again() {
    let (db, _p, addr) = setup("prep_dealloc_tx", |c| c.pgtide.pool_size = 1).await;
    let c = app_at(addr, &db).await;
    // The server gets the statement.
    let s = to("prepare", c.prepare("SELECT 7::int"))
        .await
        .expect("prepare");
    let v: i32 = to("q", c.query_one(&s, &[])).await.expect("q").get(0);
    assert_eq!(v, 7);

    exec(&c, "BEGIN").await;
    exec(&c, "DEALLOCATE ALL").await;
    // In PostgreSQL a statement prepared after DEALLOCATE ALL simply works.
    let r = to("prepare after DEALLOCATE ALL", async {
        let s2 = c.prepare("SELECT 7::int").await?;
        c.query_one(&s2, &[]).await
    })
    .await;
    exec(&c, "ROLLBACK").await;
    let v: i32 = r
        .unwrap_or_else(|e| {
            panic!(
                "prepare + execute after DEALLOCATE ALL in a transaction: {} ({:?})",
                db_message(&e),
                code(&e)
            )
        })
        .get(0);
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_name_of_a_protocol_statement() {
    let (db, _p, addr) = setup("prep_dealloc_name", |c| c.pgtide.pool_size = 1).await;
    let mut raw = raw(addr, &db).await;
    // Prepare `_pg3_0` at the protocol level, then DEALLOCATE it by that name in SQL,
    // as psycopg 3 does when it evicts from its statement cache.
    let mut batch = parse("_pg3_0", "SELECT 41 + 1");
    batch.extend(bind("", "_pg3_0", &[]));
    batch.extend(execute("", 0));
    batch.extend(sync());
    raw.send(&batch).await;
    let got = raw.until_ready().await;
    assert_eq!(tags(&got), "12DCZ");
    raw.send(&query("DEALLOCATE _pg3_0")).await;
    let got = raw.until_ready().await;
    assert_eq!(
        tags(&got),
        "CZ",
        "DEALLOCATE of the client's own statement succeeds"
    );
    let mut again = bind("", "_pg3_0", &[]);
    again.extend(execute("", 0));
    again.extend(sync());
    raw.send(&again).await;
    let got = raw.until_ready().await;
    assert_eq!(got[0].tag, b'E');
    assert_eq!(
        got[0].sqlstate().as_deref(),
        Some("26000"),
        "the name is gone"
    );
    // The shared server statement is still there for another client's same text.
    let other = app_at(addr, &db).await;
    let s2 = to("prepare other", other.prepare("SELECT 41 + 1"))
        .await
        .expect("prepare");
    let v: i32 = to("run other", other.query_one(&s2, &[]))
        .await
        .expect("run")
        .get(0);
    assert_eq!(v, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_level_prepare_among_other_statements_is_rejected_in_transaction_mode() {
    // A Query that is one PREPARE / EXECUTE / DEALLOCATE is pgtide's own (see
    // integration/sql_prepared.rs). Other forms — among other statements, through the
    // extended protocol — are refused: PREPARE as session state (session_state =
    // "reject"; with "pin" it pins the client, see integration/isolation.rs), EXECUTE and
    // DEALLOCATE of an unpinned client either way.
    let (db, _p, addr) = setup("prep_sqlprepare", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.session_state = pgtide::config::SessionState::Reject;
    })
    .await;
    let c = app_at(addr, &db).await;

    // DEALLOCATE of a name the client never prepared gets PostgreSQL's own answer.
    let e = to("DEALLOCATE p", c.simple_query("DEALLOCATE p"))
        .await
        .expect_err("p does not exist");
    assert_eq!(
        code(&e),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "{e:?}"
    );
    for sql in [
        "SELECT 1; PREPARE p2 AS SELECT 2",
        "PREPARE p2 AS SELECT 2; SELECT 1",
        "SELECT 1; EXECUTE p",
        "DEALLOCATE p; SELECT 1",
    ] {
        let e = to(sql, c.simple_query(sql))
            .await
            .expect_err("SQL-level prepared statements among others are refused");
        assert_eq!(
            code(&e),
            Some(&SqlState::FEATURE_NOT_SUPPORTED),
            "{sql}: {e:?}"
        );
        assert!(
            db_message(&e).contains("transaction pooling mode"),
            "{sql}: {}",
            db_message(&e)
        );
    }

    // Inside a transaction, the transaction is aborted as PostgreSQL would.
    exec(&c, "BEGIN").await;
    let e = to(
        "prepare in tx",
        c.simple_query("SELECT 1; PREPARE p AS SELECT 1"),
    )
    .await
    .expect_err("refused");
    assert_eq!(code(&e), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let e = to("after", c.simple_query("SELECT 1"))
        .await
        .expect_err("the transaction is aborted");
    assert_eq!(
        code(&e),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "{e:?}"
    );
    exec(&c, "ROLLBACK").await;

    // plpgsql's EXECUTE is something else.
    exec(
        &c,
        "DO $$DECLARE n int; BEGIN EXECUTE 'SELECT 1' INTO n; \
         IF n <> 1 THEN RAISE 'bad'; END IF; END$$",
    )
    .await;
    assert_eq!(
        simple_rows(&c, "SELECT 'ok'").await[0][0].as_deref(),
        Some("ok")
    );

    // Through the extended protocol (drivers wrap everything in Parse/Bind/Execute).
    let e = to("extended PREPARE", c.query("PREPARE p3 AS SELECT 1", &[]))
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_level_prepare_through_a_named_parse_leaves_nothing_on_the_server() {
    let (db, _p, addr) = setup("prep_sqlprepare_named", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.session_state = pgtide::config::SessionState::Reject;
    })
    .await;
    // Two clients, the same statement name, one server connection.
    let mut codes = Vec::new();
    let mut last = None;
    for who in ["first", "second"] {
        let mut c = raw(addr, &db).await;
        let m = roundtrip(
            &mut c,
            &cat(&[
                parse("q", "PREPARE p AS SELECT 1"),
                run_stmt("q", &[]),
                sync(),
            ]),
        )
        .await;
        codes.push((who, first_error_code(&m), errors(&m)));
        let m = roundtrip(&mut c, &cat(&[close_statement("q"), sync()])).await;
        assert_eq!(tags(&m), "3Z");
        last = Some(c);
    }
    for (who, code, errs) in &codes {
        assert_eq!(
            code.as_deref(),
            Some("0A000"),
            "{who} client: expected pgtide's 0A000, got {errs:?}"
        );
    }
    let mut c = last.expect("a client");
    let names = c
        .simple("SELECT name FROM pg_prepared_statements WHERE name NOT LIKE 'pgtide\\_%'")
        .await;
    assert!(
        names.is_empty(),
        "client-named statements left on the shared server: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_keep_results_correct_and_the_server_bounded() {
    let (db, _p, addr) = setup("prep_evict", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.max_prepared_statements = 2;
    })
    .await;
    let c = app_at(addr, &db).await;
    let mut stmts = Vec::new();
    for i in 0..10 {
        let s = to("prepare", c.prepare(&format!("SELECT $1::int + {i}")))
            .await
            .expect("prepare");
        stmts.push(s);
    }
    for round in 0..5 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = to("query", c.query_one(s, &[&round]))
                .await
                .unwrap_or_else(|e| panic!("round {round} statement {i}: {e:?}"))
                .get(0);
            assert_eq!(v, round + i as i32);
        }
    }
    let held = server_statements(&c).await;
    assert!(
        held.len() <= 2,
        "max_prepared_statements = 2, the server holds {held:?}"
    );
    assert!(
        held.iter().all(|(n, _)| n.starts_with("pgtide_")),
        "{held:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_use_of_many_statements_stays_bounded() {
    let (db, _p, addr) = setup("prep_evict_pipe", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.max_prepared_statements = 2;
    })
    .await;
    let c = app_at(addr, &db).await;
    let mut stmts = Vec::new();
    for i in 0..10 {
        let s = to("prepare", c.prepare(&format!("SELECT $1::int + {i}")))
            .await
            .expect("prepare");
        stmts.push(s);
    }
    for round in 0..3 {
        // Ten statements in one pipeline: more than the server may hold at once.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&round];
        let futs: Vec<_> = stmts.iter().map(|s| c.query_one(s, &params)).collect();
        let rows = to("pipelined", futures::future::try_join_all(futs))
            .await
            .unwrap_or_else(|e| panic!("round {round} pipelined: {e:?}"));
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.get::<_, i32>(0), round + i as i32);
        }
        // Then one at a time, which evicts.
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = to("query", c.query_one(s, &[&round]))
                .await
                .unwrap_or_else(|e| panic!("round {round} statement {i}: {e:?}"))
                .get(0);
            assert_eq!(v, round + i as i32);
        }
    }
    let held = server_statements(&c).await;
    assert!(
        held.len() <= 3,
        "max_prepared_statements = 2: after the pipelines, sequential use never brings \
         the server back under the bound; it holds {} statements: {held:?}",
        held.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_after_an_error_in_the_same_batch_keeps_bookkeeping_true() {
    let (db, _p, addr) = setup("prep_evict_err", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.max_prepared_statements = 2;
    })
    .await;
    let mut c = raw(addr, &db).await;
    raw_prepare(&mut c, "a", DIV).await;
    raw_prepare(&mut c, "b", "SELECT 'b'::text").await;
    assert_eq!(raw_value(&mut c, "b", &[]).await, "b");
    assert_eq!(raw_value(&mut c, "a", &[Some("5")]).await, "20");

    // The Execute fails; the Parse of "c" (which makes pgtide evict "b" from the full
    // server) is skipped by PostgreSQL, Close included.
    let m = roundtrip(
        &mut c,
        &cat(&[
            run_stmt("a", &[Some("0")]),
            parse("c", "SELECT 'c'::text"),
            run_stmt("c", &[]),
            sync(),
        ]),
    )
    .await;
    assert_eq!(tags(&m), "2EZ", "{:?}", errors(&m));
    assert_eq!(first_error_code(&m).as_deref(), Some("22012"));

    let m = raw_run(&mut c, "b", &[]).await;
    assert_eq!(
        tags(&m),
        "2DCZ",
        "statement b after a skipped eviction: {:?}",
        errors(&m)
    );
    assert_eq!(raw_value(&mut c, "a", &[Some("4")]).await, "25");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_passes_names_through_transaction_mode_maps_them() {
    let (db, _p, addr) = setup("prep_session", |c| {
        c.pgtide.pool_size = 2;
        c.pgtide.pool_mode = PoolMode::Session;
    })
    .await;
    let c = app_at(addr, &db).await;
    let s = to("prepare", c.prepare("SELECT 11"))
        .await
        .expect("prepare");
    let v: i32 = to("q", c.query_one(&s, &[])).await.expect("q").get(0);
    assert_eq!(v, 11);
    let held = server_statements(&c).await;
    assert_eq!(held.len(), 1, "session mode: {held:?}");
    let (name, text) = &held[0];
    assert_eq!(text, "SELECT 11");
    assert!(
        name.starts_with('s') && name[1..].chars().all(|ch| ch.is_ascii_digit()),
        "session mode: the client's own name (tokio-postgres' s<n>) on the server, got {name}"
    );
    drop(c);

    let (db, _p2, addr) = setup("prep_txnames", |cfg| cfg.pgtide.pool_size = 1).await;
    let c = app_at(addr, &db).await;
    let s = to("prepare", c.prepare("SELECT 12"))
        .await
        .expect("prepare");
    let v: i32 = to("q", c.query_one(&s, &[])).await.expect("q").get(0);
    assert_eq!(v, 12);
    let held = server_statements(&c).await;
    assert!(
        held.iter()
            .any(|(n, t)| n.starts_with("pgtide_") && t == "SELECT 12"),
        "transaction mode: {held:?}"
    );
    assert!(
        held.iter().all(|(n, _)| n.starts_with("pgtide_")),
        "transaction mode: a client name reached the server: {held:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_share_one_server_statement() {
    let (db, _p, addr) = setup("prep_share", |c| c.pgtide.pool_size = 1).await;
    let a = app_at(addr, &db).await;
    let b = app_at(addr, &db).await;
    let sa = to("A prepares", a.prepare("SELECT 42"))
        .await
        .expect("prepare");
    let v: i32 = to("A runs", a.query_one(&sa, &[]))
        .await
        .expect("run")
        .get(0);
    assert_eq!(v, 42);
    let sb = to("B prepares", b.prepare("SELECT 42"))
        .await
        .expect("prepare");
    let v: i32 = to("B runs", b.query_one(&sb, &[]))
        .await
        .expect("run")
        .get(0);
    assert_eq!(v, 42);
    let held = server_statements(&a).await;
    let n = held.iter().filter(|(_, t)| t == "SELECT 42").count();
    assert_eq!(n, 1, "one server statement for both clients: {held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_text_under_different_search_paths() {
    let (db, _p, addr) = setup("prep_searchpath", |c| c.pgtide.pool_size = 1).await;
    let admin = app_at(addr, &db).await;
    exec(
        &admin,
        "CREATE SCHEMA s1; CREATE SCHEMA s2;
         CREATE TABLE s1.t (a int); INSERT INTO s1.t VALUES (1);
         CREATE TABLE s2.t (a text, b int); INSERT INTO s2.t VALUES ('two', 2)",
    )
    .await;
    let a = app_at(addr, &db).await;
    let b = app_at(addr, &db).await;
    exec(&a, "SET search_path = s1").await;
    exec(&b, "SET search_path = s2").await;
    let sa = to("A prepares", a.prepare("SELECT * FROM t"))
        .await
        .expect("A prepares");
    let ra = to("A runs", a.query(&sa, &[])).await.expect("A runs");
    assert_eq!(ra[0].get::<_, i32>(0), 1);
    // Schema-per-tenant: B's statement must resolve t in B's search_path.
    let rb = to("B", async {
        let sb = b.prepare("SELECT * FROM t").await?;
        b.query(&sb, &[]).await
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "B (search_path s2) prepares the text A prepared under s1: {} ({:?})",
            db_message(&e),
            code(&e)
        )
    });
    assert_eq!(rb[0].len(), 2);
    assert_eq!(rb[0].get::<_, String>(0), "two");
}
