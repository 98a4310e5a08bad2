//! Pooling behaviour seen from clients: parameter isolation on shared servers, cancel,
//! recovery of servers whose client vanished or whose backend was terminated, client and
//! queue limits, graceful shutdown, session mode, cross-talk under load, timeouts,
//! unreachable servers, and the pool's size management.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgtide::config::{ConfigDuration, Database, PoolMode};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error, NoTls, SimpleQueryMessage};

use crate::harness::{self, tcp_connect_string};

/// Every network await is bounded by this, so that a hang fails instead of hanging CI.
const NET: Duration = Duration::from_secs(30);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match timeout(NET, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {NET:?}"),
    }
}

/// A client connection whose driver task we hold: aborting it makes the client vanish
/// without a Terminate, and its result tells why the connection ended.
type Driver = JoinHandle<Result<(), Error>>;

async fn try_connect(
    addr: SocketAddr,
    user: &str,
    pw: &str,
    db: &str,
) -> Result<(Client, Driver), Error> {
    let s = tcp_connect_string(addr, user, pw, db);
    let (client, conn) = within("connect", tokio_postgres::connect(&s, NoTls)).await?;
    Ok((client, tokio::spawn(conn)))
}

/// Connects as app/apppass through pgtide (or anything at `addr`).
async fn app(addr: SocketAddr, db: &str) -> (Client, Driver) {
    try_connect(addr, "app", "apppass", db)
        .await
        .unwrap_or_else(|e| panic!("app cannot connect to {addr}/{db}: {e}"))
}

/// The text values of the first row of a simple query.
async fn row(client: &Client, sql: &str) -> Vec<Option<String>> {
    let msgs = within(sql, client.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            return (0..r.len()).map(|i| r.get(i).map(str::to_string)).collect();
        }
    }
    panic!("{sql}: no row");
}

async fn one(client: &Client, sql: &str) -> String {
    row(client, sql).await.remove(0).unwrap_or_default()
}

async fn exec(client: &Client, sql: &str) {
    within(sql, client.batch_execute(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The SQLSTATE a failed client saw: the failing call's own, or else the one of the
/// error that ended its connection (pgtide's FATAL arrives unsolicited).
async fn failure_code(e: &Error, driver: Driver) -> Option<SqlState> {
    if let Some(c) = e.code() {
        return Some(c.clone());
    }
    match timeout(Duration::from_secs(10), driver).await {
        Ok(Ok(Err(ce))) => ce.code().cloned(),
        _ => None,
    }
}

/// The message of a database error, or the error's text.
fn message(e: &Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// psql as postgres on the primary, off the runtime's worker threads.
async fn psql(db: &str, sql: &str) -> String {
    let (db, sql) = (db.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || harness::psql(harness::primary_port(), &db, &sql))
        .await
        .expect("psql task")
}

/// The backend pids of `app` connected to `db` (pgtide's server connections: the tests
/// observe only as postgres).
async fn app_backends(db: &str) -> Vec<i32> {
    let out = psql(
        db,
        &format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = '{db}' AND usename = 'app' \
             AND backend_type = 'client backend' ORDER BY pid"
        ),
    )
    .await;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().expect("a pid"))
        .collect()
}

/// Locks held on table `t` of `db` by anyone but the observer.
async fn locks_on_t(db: &str) -> i64 {
    psql(
        db,
        "SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass AND pid <> pg_backend_pid()",
    )
    .await
    .trim()
    .parse()
    .expect("a count")
}

/// Polls `cond` until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: not reached within 10 s");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a query whose text starts with `prefix` is active on `db`.
async fn wait_active(db: &str, prefix: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state = 'active' \
         AND query LIKE '{prefix}%'"
    );
    eventually(&format!("{prefix} running"), || async {
        psql(db, &sql).await.trim() != "0"
    })
    .await;
}

const SETTINGS: &str = "SELECT current_setting('search_path'), current_setting('TimeZone'), \
     current_setting('application_name'), current_setting('statement_timeout'), \
     pg_backend_pid()::text";

// 1 ─ run-time parameters follow the client on a shared server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_stay_with_their_client_on_a_shared_server() {
    let db = harness::fresh_database("pool_params");
    psql(&db, "CREATE SCHEMA a_schema").await;
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.track_extra_params = vec!["statement_timeout".to_string()];
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, _da) = app(addr, &db).await;
    let (b, _db) = app(addr, &db).await;
    let defaults = row(&b, SETTINGS).await;
    let default_settings = &defaults[..4];
    assert_ne!(default_settings[0].as_deref(), Some("a_schema"));
    assert_ne!(default_settings[1].as_deref(), Some("Asia/Tokyo"));
    assert_ne!(default_settings[3].as_deref(), Some("7s"));

    exec(
        &a,
        "SET search_path = a_schema; SET TimeZone = 'Asia/Tokyo'; \
         SET application_name = 'A'; SET statement_timeout = '7s'",
    )
    .await;
    let want_a = [
        Some("a_schema".to_string()),
        Some("Asia/Tokyo".to_string()),
        Some("A".to_string()),
        Some("7s".to_string()),
    ];
    let mut pids = Vec::new();
    for i in 0..15 {
        let ra = row(&a, SETTINGS).await;
        assert_eq!(ra[..4], want_a, "round {i}: A lost its settings");
        let rb = row(&b, SETTINGS).await;
        assert_eq!(rb[..4], *default_settings, "round {i}: B sees A's settings");
        // Extended protocol too (unnamed statement, one round trip).
        let r = within(
            "typed",
            a.query_typed_one("SELECT current_setting('statement_timeout')", &[]),
        )
        .await
        .unwrap();
        assert_eq!(
            r.get::<_, String>(0),
            "7s",
            "round {i}: A, extended protocol"
        );
        let r = within(
            "typed",
            b.query_typed_one("SELECT current_setting('statement_timeout')", &[]),
        )
        .await
        .unwrap();
        assert_eq!(
            r.get::<_, String>(0),
            defaults[3].clone().unwrap(),
            "round {i}: B, extended protocol"
        );
        pids.push(ra[4].clone());
        pids.push(rb[4].clone());
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "A and B must have shared one server connection: {pids:?}"
    );

    // The tracked statement_timeout is really in force for A, and not for B.
    let err = within(
        "A sleeps",
        a.simple_query("SET statement_timeout = '200ms'; SELECT pg_sleep(2)"),
    )
    .await
    .expect_err("A's statement_timeout must cancel the sleep");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    exec(&a, "SET statement_timeout = '7s'").await;
    exec(&b, "SELECT pg_sleep(0.3)").await;

    // RESET ALL puts A back to the defaults, also on the next transactions.
    exec(&a, "RESET ALL").await;
    for i in 0..3 {
        let ra = row(&a, SETTINGS).await;
        assert_eq!(ra[..4], *default_settings, "round {i} after RESET ALL: A");
        let rb = row(&b, SETTINGS).await;
        assert_eq!(rb[..4], *default_settings, "round {i} after RESET ALL: B");
    }

    // A SET inside a transaction that is rolled back does not stick.
    exec(&a, "BEGIN").await;
    exec(&a, "SET search_path = a_schema").await;
    exec(&a, "SET statement_timeout = '3s'").await;
    exec(&a, "SET application_name = 'rolled back'").await;
    exec(&a, "ROLLBACK").await;
    for i in 0..3 {
        let rb = row(&b, SETTINGS).await;
        assert_eq!(
            rb[..4],
            *default_settings,
            "round {i} after A's ROLLBACK: B"
        );
        let ra = row(&a, SETTINGS).await;
        assert_eq!(ra[..4], *default_settings, "round {i} after ROLLBACK: A");
    }
}

// 2 ─ cancel reaches the query of the client that asked, and nobody else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_right_query_only() {
    let db = harness::fresh_database("pool_cancel");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (a, _da) = app(addr, &db).await;
    let (b, _db) = app(addr, &db).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    one(&a, "SELECT 1").await;
    one(&b, "SELECT 1").await;
    let a_token = a.cancel_token();

    // A sleeps on the only server; B waits in the queue; A is cancelled (tokio-postgres
    // closes its cancel socket right after sending: the cancel must still arrive).
    let a2 = a.clone();
    let a_sleep = tokio::spawn(async move { a2.simple_query("SELECT pg_sleep(30)").await });
    wait_active(&db, "SELECT pg_sleep(30)").await;
    let b2 = b.clone();
    let b_query = tokio::spawn(async move { b2.simple_query("SELECT 'b ran'").await });
    within("cancel", a_token.cancel_query(NoTls))
        .await
        .expect("send the cancel to pgtide");
    let ra = timeout(Duration::from_secs(15), a_sleep)
        .await
        .expect("A's pg_sleep(30) was not cancelled")
        .unwrap();
    let err = ra.expect_err("A's query must be cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let rb = within("B's queued query", b_query)
        .await
        .unwrap()
        .expect("B's query must run and succeed, not be cancelled");
    assert!(
        rb.iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("b ran"))),
        "B's result"
    );
    assert_eq!(one(&a, "SELECT 'a works'").await, "a works");

    // A cancel sent right after A's query finished must not reach B, who got the
    // server next and runs a query on it.
    for i in 0..4 {
        let a2 = a.clone();
        let a_run = tokio::spawn(async move { a2.simple_query("SELECT pg_sleep(0.3)").await });
        wait_active(&db, "SELECT pg_sleep(0.3)").await;
        let b2 = b.clone();
        let b_run =
            tokio::spawn(async move { b2.simple_query("SELECT pg_sleep(1), 'b ok'").await });
        within("A's short query", a_run)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {i}: A's short query: {e}"));
        if i % 2 == 1 {
            // The other order: B's query is surely running when A's cancel arrives.
            wait_active(&db, "SELECT pg_sleep(1)").await;
        }
        within("cancel", a_token.cancel_query(NoTls))
            .await
            .expect("send the cancel to pgtide");
        within("B's query", b_run)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {i}: A's late cancel reached B's query: {e}"));
    }
    assert_eq!(one(&a, "SELECT 'a still works'").await, "a still works");
    assert_eq!(one(&b, "SELECT 'b still works'").await, "b still works");
}

async fn table_t(db: &str) {
    psql(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t VALUES (1, 1)",
    )
    .await;
}

// 3 ─ a client that vanishes mid-transaction leaves no lock behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_client_leaves_no_lock() {
    let db = harness::fresh_database("pool_vanish");
    table_t(&db).await;
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    exec(&a, "UPDATE t SET v = 2 WHERE id = 1").await;
    exec(&a, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await;
    assert!(locks_on_t(&db).await > 0, "A holds locks on t");
    // A vanishes: its socket closes without a Terminate.
    da.abort();
    drop(a);

    let (b, _db) = app(addr, &db).await;
    let n = timeout(
        Duration::from_secs(10),
        b.execute("UPDATE t SET v = v + 10 WHERE id = 1", &[]),
    )
    .await
    .expect("B's UPDATE is still blocked by the vanished client's lock")
    .expect("B's UPDATE");
    assert_eq!(n, 1);
    assert_eq!(
        one(&b, "SELECT v FROM t WHERE id = 1").await,
        "11",
        "A's update must have been rolled back"
    );
    eventually("no lock left on t", || async { locks_on_t(&db).await == 0 }).await;
}

// 3c ─ a client that vanishes in the middle of COPY FROM STDIN (extended protocol, as
// tokio-postgres sends it): the COPY is failed, the transaction rolled back, and the one
// server connection serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_client_mid_copy_leaves_server_clean() {
    use futures::SinkExt;
    let db = harness::fresh_database("pool_vanish_copy");
    table_t(&db).await;
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    exec(&a, "UPDATE t SET v = 2 WHERE id = 1").await;
    let sink = within("copy_in", a.copy_in("COPY t (id, v) FROM STDIN"))
        .await
        .expect("copy_in");
    let mut sink = Box::pin(sink);
    within(
        "copy data",
        sink.send(bytes::Bytes::from_static(b"2\t2\n3\t3\n")),
    )
    .await
    .expect("send copy data");
    wait_active(&db, "COPY").await;
    // A vanishes mid-COPY, without CopyDone or CopyFail.
    da.abort();
    std::mem::forget(sink);
    drop(a);

    let (b, _db) = app(addr, &db).await;
    assert_eq!(
        one(&b, "SELECT count(*) FROM t").await,
        "1",
        "the vanished client's COPY rows must not be there"
    );
    assert_eq!(
        one(&b, "SELECT v FROM t WHERE id = 1").await,
        "1",
        "A's update rolled back"
    );
    exec(&b, "INSERT INTO t VALUES (4, 4)").await;
    eventually("no lock left on t", || async { locks_on_t(&db).await == 0 }).await;
}

// 3b ─ a client that vanishes while its query runs inside a transaction: the query is
// cancelled and the transaction rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_client_running_a_query_leaves_no_lock() {
    let db = harness::fresh_database("pool_vanish_run");
    table_t(&db).await;
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    exec(&a, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await;
    let a = Arc::new(a);
    let a2 = a.clone();
    let sleeping = tokio::spawn(async move { a2.simple_query("SELECT pg_sleep(30)").await });
    wait_active(&db, "SELECT pg_sleep(30)").await;
    da.abort();
    sleeping.abort();
    drop(a);

    eventually("the vanished client's lock on t released", || async {
        locks_on_t(&db).await == 0
    })
    .await;
    let (b, _db) = app(addr, &db).await;
    let n = timeout(
        Duration::from_secs(10),
        b.execute("UPDATE t SET v = v + 1 WHERE id = 1", &[]),
    )
    .await
    .expect("B's UPDATE blocked")
    .expect("B's UPDATE");
    assert_eq!(n, 1);
    assert_eq!(one(&b, "SELECT count(*) FROM t").await, "1");
}

// 4 ─ pg_terminate_backend on a server in use, and on an idle pooled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_gives_57p01_and_pool_recovers() {
    let db = harness::fresh_database("pool_term");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(
        psql(&db, &format!("SELECT pg_terminate_backend({pid})")).await,
        "t"
    );
    let err = within("A after terminate", a.simple_query("SELECT 1"))
        .await
        .expect_err("A's transaction lost its server: the next query must fail");
    let code = failure_code(&err, da).await;
    // What PostgreSQL itself tells a client whose backend is terminated.
    assert_eq!(
        code,
        Some(SqlState::ADMIN_SHUTDOWN),
        "A must be told the server's 57P01: {err}"
    );

    let (c, _dc) = app(addr, &db).await;
    let pid_c = one(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(pid_c, pid, "a new server connection");

    // Terminate the idle pooled connection: C's next query and a new client's work.
    for round in 0..2 {
        let pid = one(&c, "SELECT pg_backend_pid()").await;
        psql(&db, &format!("SELECT pg_terminate_backend({pid})")).await;
        let p: i32 = pid.parse().unwrap();
        eventually("terminated backend gone", || async {
            !app_backends(&db).await.contains(&p)
        })
        .await;
        let (client, _d) = if round == 0 {
            (None, None)
        } else {
            let (n, d) = app(addr, &db).await;
            (Some(n), Some(d))
        };
        let user = client.as_ref().unwrap_or(&c);
        let r = within(
            "after idle terminate",
            user.simple_query("SELECT pg_backend_pid()"),
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: a stale pooled connection was handed out: {e}"));
        let new_pid = r
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap();
        assert_ne!(new_pid, pid);
    }
}

// 5 ─ max_client_conn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_the_extra_client() {
    let db = harness::fresh_database("pool_maxconn");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.max_client_conn = 3;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = app(addr, &db).await;
        one(&c.0, "SELECT 1").await;
        clients.push(c);
    }
    let err = match try_connect(addr, "app", "apppass", &db).await {
        Ok(_) => panic!("a fourth client must be refused with max_client_conn = 3"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    assert!(
        message(&err).contains("max_client_conn"),
        "{}",
        message(&err)
    );
    for c in &clients {
        one(&c.0, "SELECT 1").await;
    }

    let (gone, driver) = clients.pop().unwrap();
    drop(gone);
    let _ = within("disconnect", driver).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let extra = loop {
        match try_connect(addr, "app", "apppass", &db).await {
            Ok(c) => break c,
            Err(e) => {
                assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
                assert!(
                    Instant::now() < deadline,
                    "no new client admitted within 10 s after one left"
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (c, _d) = extra;
    assert_eq!(one(&c, "SELECT 'in'").await, "in");
}

// 6 ─ query_wait_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_says_the_pool_is_exhausted() {
    let db = harness::fresh_database("pool_qwait");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, _da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    one(&a, "SELECT 1").await;
    let (b, db_) = app(addr, &db).await;
    let err = within("B waits", b.simple_query("SELECT 1"))
        .await
        .expect_err("B cannot get a server while A holds the only one");
    let code = failure_code(&err, db_).await;
    assert_eq!(code, Some(SqlState::TOO_MANY_CONNECTIONS), "{err}");
    let msg = message(&err);
    if err.code().is_some() {
        assert!(msg.contains("exhausted"), "{msg}");
        assert!(msg.contains("query_wait_timeout"), "{msg}");
    }
    exec(&a, "COMMIT").await;
    let (c, _dc) = app(addr, &db).await;
    assert_eq!(one(&c, "SELECT 'c'").await, "c");
    assert_eq!(one(&a, "SELECT 'a'").await, "a");
}

// 6b ─ the message of the 53300 names query_wait_timeout (checked on the error the
// query gets, or on the one that closes the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_message_names_the_setting() {
    let db = harness::fresh_database("pool_qwait_msg");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (a, _da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    let (b, driver) = app(addr, &db).await;
    let err = within("B waits", b.simple_query("SELECT 1"))
        .await
        .expect_err("B must time out in the queue");
    let msg = match err.as_db_error() {
        Some(d) => d.message().to_string(),
        None => match timeout(Duration::from_secs(10), driver).await {
            Ok(Ok(Err(e))) => message(&e),
            other => panic!("B's connection ended without an error: {other:?}"),
        },
    };
    assert!(msg.contains("exhausted"), "{msg}");
    assert!(msg.contains("query_wait_timeout"), "{msg}");
    assert!(!msg.contains("could not connect"), "{msg}");
}

// 6c ─ the line for a server: first come, first served; a client that vanished while in
// line does not cost the pool its connection; each waiter's query_wait_timeout counts
// from when it got in line.

/// `cl_waiting` of `db`'s pool, read from the admin console.
async fn cl_waiting(console: &Client, db: &str) -> u32 {
    let rows = within("SHOW POOLS", console.simple_query("SHOW POOLS"))
        .await
        .expect("SHOW POOLS");
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("database") == Some(db) => {
                r.get("cl_waiting").and_then(|v| v.parse().ok())
            }
            _ => None,
        })
        .unwrap_or(0)
}

async fn until_waiting(console: &Client, db: &str, n: u32) {
    eventually(&format!("{n} clients waiting"), || async {
        cl_waiting(console, db).await == n
    })
    .await;
}

/// The admin console of the pgtide at `addr` (app is made an admin user).
async fn console(addr: SocketAddr) -> (Client, Driver) {
    try_connect(addr, "app", "apppass", "pgtide")
        .await
        .expect("admin console")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order_and_one_that_vanished_leaves_no_hole() {
    let db = harness::fresh_database("pool_fifo");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (admin, _dadmin) = console(addr).await;

    let (a, _da) = app(addr, &db).await;
    exec(&a, "CREATE TABLE arrivals (n serial, who text)").await;
    exec(&a, "BEGIN").await;
    one(&a, "SELECT 1").await;
    // b, c and d get in line in this order while a holds the only server, then e, which
    // vanishes while it waits.
    let mut waiting = Vec::new();
    for (who, n) in [("b", 1), ("c", 2), ("d", 3)] {
        let (client, driver) = app(addr, &db).await;
        let task = tokio::spawn(async move {
            let sql = format!("INSERT INTO arrivals (who) VALUES ('{who}')");
            client.simple_query(&sql).await.map(|_| ())
        });
        until_waiting(&admin, &db, n).await;
        waiting.push((who, task, driver));
    }
    let (e, e_driver) = app(addr, &db).await;
    let e_task = tokio::spawn(async move { e.simple_query("SELECT 'e'").await.map(|_| ()) });
    until_waiting(&admin, &db, 4).await;
    e_task.abort();
    e_driver.abort();
    exec(&a, "COMMIT").await;
    for (who, task, _driver) in waiting {
        within(who, task)
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("{who}: {e}"));
    }
    assert_eq!(
        row(&a, "SELECT string_agg(who, ',' ORDER BY n) FROM arrivals").await,
        vec![Some("b,c,d".to_string())]
    );
    // The one connection is still the pool's: a new client gets it at once.
    let (d, _dd) = app(addr, &db).await;
    assert_eq!(one(&d, "SELECT 'd'").await, "d");
    assert_eq!(cl_waiting(&admin, &db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_waiter_times_out_after_its_own_query_wait_timeout() {
    let db = harness::fresh_database("pool_qwait_each");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(2);
    cfg.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (admin, _dadmin) = console(addr).await;
    let (a, _da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    // b gets in line, then c a second later: each must get 53300 no sooner than 2 s and
    // well within 2 s + 3 s after it began to wait (c's deadline is later than the one
    // pgtide's timer was first set for).
    let mut tasks = Vec::new();
    for (n, who) in [(1, "b"), (2, "c")] {
        let (client, driver) = app(addr, &db).await;
        let began = Instant::now();
        let task = tokio::spawn(async move {
            let r = client.simple_query("SELECT 1").await;
            (r, began.elapsed(), driver)
        });
        until_waiting(&admin, &db, n).await;
        tasks.push((who, task));
        if n == 1 {
            sleep(Duration::from_secs(1)).await;
        }
    }
    for (who, task) in tasks {
        let (r, waited, driver) = within(who, task).await.expect("task");
        let err = r.expect_err("the only server stays busy");
        assert_eq!(
            failure_code(&err, driver).await,
            Some(SqlState::TOO_MANY_CONNECTIONS),
            "{who}: {err}"
        );
        assert!(
            waited >= Duration::from_secs(2),
            "{who} timed out before query_wait_timeout: {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{who} waited far past query_wait_timeout: {waited:?}"
        );
    }
    assert_eq!(cl_waiting(&admin, &db).await, 0);
    exec(&a, "COMMIT").await;
    assert_eq!(one(&a, "SELECT 'a'").await, "a");
}

// 7 ─ graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_transactions_finish() {
    let db = harness::fresh_database("pool_shutdown");
    let cfg = harness::config_for(&db);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, _da) = app(addr, &db).await;
    let (c, dc) = app(addr, &db).await;
    one(&c, "SELECT 1").await;
    exec(&a, "CREATE TABLE s (v int)").await;
    exec(&a, "BEGIN").await;
    exec(&a, "INSERT INTO s VALUES (1)").await;

    pooler.shutdown();

    // The idle client is told 57P01.
    let c_end = timeout(Duration::from_secs(10), dc)
        .await
        .expect("the idle client was not disconnected")
        .unwrap();
    let e = c_end.expect_err("the idle client's connection must end with an error");
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e}");
    assert!(c.simple_query("SELECT 1").await.is_err());

    // New clients are refused.
    match try_connect(addr, "app", "apppass", &db).await {
        Ok(_) => panic!("a new client must be refused during shutdown"),
        Err(e) => {
            if let Some(code) = e.code() {
                assert_eq!(code, &SqlState::ADMIN_SHUTDOWN, "{e}");
            }
        }
    }

    // A's transaction goes on and commits.
    exec(&a, "INSERT INTO s VALUES (2)").await;
    exec(&a, "COMMIT").await;
    assert_eq!(psql(&db, "SELECT count(*) FROM s").await, "2");
    drop(a);
    within("pooler.wait() after the last transaction", pooler.wait()).await;
    eventually("pgtide closed its server connections", || async {
        app_backends(&db).await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_a_stuck_transaction() {
    let db = harness::fresh_database("pool_shutdown_to");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.shutdown_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    one(&a, "SELECT 1").await;
    pooler.shutdown();
    timeout(Duration::from_secs(10), pooler.wait())
        .await
        .expect("wait() must complete once shutdown_timeout has passed");
    let err = within("A after the cut", a.simple_query("SELECT 1"))
        .await
        .expect_err("A's stuck transaction must have been cut");
    let code = failure_code(&err, da).await;
    assert_eq!(code, Some(SqlState::ADMIN_SHUTDOWN), "{err}");
    eventually("no server connection left", || async {
        app_backends(&db).await.is_empty()
    })
    .await;
}

// 8 ─ session mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_the_server_and_resets_it() {
    let db = harness::fresh_database("pool_session");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_mode = PoolMode::Session;
    cfg.pgtide.pool_size = 1;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    let pid = one(&a, "SELECT pg_backend_pid()").await;
    exec(&a, "CREATE TEMP TABLE tt (v int)").await;
    exec(&a, "SET work_mem = '7MB'").await;
    exec(&a, "SET application_name = 'session A'").await;
    exec(&a, "PREPARE p AS SELECT 1").await;
    for i in 0..5 {
        exec(&a, &format!("BEGIN; INSERT INTO tt VALUES ({i}); COMMIT")).await;
        assert_eq!(one(&a, "SELECT pg_backend_pid()").await, pid);
    }
    assert_eq!(one(&a, "SELECT count(*) FROM tt").await, "5");
    assert_eq!(one(&a, "SELECT current_setting('work_mem')").await, "7MB");

    drop(a);
    let _ = within("A's disconnect", da).await;
    let (b, _db) = app(addr, &db).await;
    let r = row(
        &b,
        "SELECT pg_backend_pid()::text, to_regclass('pg_temp.tt')::text, \
         current_setting('work_mem'), current_setting('application_name'), \
         (SELECT count(*) FROM pg_prepared_statements)::text",
    )
    .await;
    assert_eq!(
        r[0].as_deref(),
        Some(pid.as_str()),
        "B must get A's server (pool_size 1)"
    );
    assert_eq!(r[1], None, "A's temp table must be gone (DISCARD ALL)");
    assert_ne!(r[2].as_deref(), Some("7MB"), "A's SET must be gone");
    assert_ne!(r[3].as_deref(), Some("session A"));
    assert_eq!(
        r[4].as_deref(),
        Some("0"),
        "A's prepared statement must be gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_session_mode_overrides_transaction_mode() {
    let db = harness::fresh_database("pool_usermode");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_mode = PoolMode::Transaction;
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(1);
    cfg.users.get_mut("pgtide_scram").unwrap().pool_mode = Some(PoolMode::Session);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    // app (transaction mode): two clients share the one server, alternately.
    let (a1, _d1) = app(addr, &db).await;
    let (a2, _d2) = app(addr, &db).await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(one(&a1, "SELECT pg_backend_pid()").await);
        pids.push(one(&a2, "SELECT pg_backend_pid()").await);
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "transaction mode: one shared server: {pids:?}"
    );

    // pgtide_scram (session mode): the first client keeps the server between
    // transactions, so a second one cannot get it.
    let (s1, _ds1) = try_connect(addr, "pgtide_scram", "scrampass", &db)
        .await
        .unwrap();
    let pid = one(&s1, "SELECT pg_backend_pid()").await;
    exec(&s1, "CREATE TEMP TABLE keep (v int)").await;
    exec(&s1, "INSERT INTO keep VALUES (1)").await;
    assert_eq!(one(&s1, "SELECT count(*) FROM keep").await, "1");
    let (s2, ds2) = try_connect(addr, "pgtide_scram", "scrampass", &db)
        .await
        .unwrap();
    let err = within("s2", s2.simple_query("SELECT 1"))
        .await
        .expect_err("session mode: the only server stays with s1");
    assert_eq!(
        failure_code(&err, ds2).await,
        Some(SqlState::TOO_MANY_CONNECTIONS),
        "{err}"
    );
    assert_eq!(one(&s1, "SELECT pg_backend_pid()").await, pid);
}

// 9 ─ no cross-talk under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cross_talk_between_concurrent_clients() {
    let db = harness::fresh_database("pool_crosstalk");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 4;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    const CLIENTS: usize = 100;
    const ROUNDS: i32 = 150;

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let (client, _d) = app(addr, &db).await;
            for r in 0..ROUNDS {
                let tag = format!("client {c} round {r}");
                let n = (c as i32) * 100_000 + r;
                let (got_t, got_n): (String, i32) = match r % 4 {
                    0 => {
                        let v = row(&client, &format!("SELECT '{tag}'::text, {n}::int")).await;
                        (
                            v[0].clone().unwrap(),
                            v[1].as_deref().unwrap().parse().unwrap(),
                        )
                    }
                    1 => {
                        let row = within(
                            "typed",
                            client.query_typed_one(
                                "SELECT $1::text, $2::int",
                                &[
                                    (&tag, tokio_postgres::types::Type::TEXT),
                                    (&n, tokio_postgres::types::Type::INT4),
                                ],
                            ),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{tag}: {e}"));
                        (row.get(0), row.get(1))
                    }
                    2 => {
                        // A named prepared statement inside an explicit transaction.
                        exec(&client, "BEGIN").await;
                        let st = within("prepare", client.prepare("SELECT $1::text, $2::int"))
                            .await
                            .unwrap_or_else(|e| panic!("{tag}: {e}"));
                        let row = within("query", client.query_one(&st, &[&tag, &n]))
                            .await
                            .unwrap_or_else(|e| panic!("{tag}: {e}"));
                        exec(&client, "COMMIT").await;
                        (row.get(0), row.get(1))
                    }
                    _ => {
                        let msgs = within(
                            "multi",
                            client.simple_query(&format!(
                                "BEGIN; SELECT '{tag}'::text, {n}::int; COMMIT"
                            )),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{tag}: {e}"));
                        let r = msgs
                            .iter()
                            .find_map(|m| match m {
                                SimpleQueryMessage::Row(r) => Some((
                                    r.get(0).unwrap().to_string(),
                                    r.get(1).unwrap().parse().unwrap(),
                                )),
                                _ => None,
                            })
                            .expect("a row");
                        r
                    }
                };
                assert_eq!((got_t.as_str(), got_n), (tag.as_str(), n), "cross-talk");
            }
        }));
    }
    // Each query is guarded by `within`; the whole run (15,000 transactions through four
    // server connections, in a debug build on a possibly busy machine) gets longer.
    let all = futures::future::join_all(tasks);
    let results = match timeout(Duration::from_secs(300), all).await {
        Ok(r) => r,
        Err(_) => panic!("the {CLIENTS} clients did not finish within 300 s"),
    };
    for r in results {
        r.expect("a client failed");
    }
}

// 10 ─ idle_transaction_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_frees_the_server() {
    let db = harness::fresh_database("pool_idletx");
    table_t(&db).await;
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.idle_transaction_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let (a, da) = app(addr, &db).await;
    exec(&a, "BEGIN").await;
    exec(&a, "UPDATE t SET v = 5 WHERE id = 1").await;
    // A idles inside its transaction until pgtide disconnects it.
    let end = timeout(Duration::from_secs(10), da)
        .await
        .expect("the idle-in-transaction client was not disconnected")
        .unwrap();
    let e = end.expect_err("the connection must end with an error");
    assert_eq!(
        e.code(),
        Some(&SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT),
        "{e}"
    );
    assert!(a.simple_query("SELECT 1").await.is_err());

    let (b, _db) = app(addr, &db).await;
    let n = timeout(
        Duration::from_secs(10),
        b.execute("UPDATE t SET v = v + 10 WHERE id = 1", &[]),
    )
    .await
    .expect("B blocked")
    .expect("B's UPDATE");
    assert_eq!(n, 1);
    assert_eq!(
        one(&b, "SELECT v FROM t").await,
        "11",
        "A's update rolled back"
    );
    eventually("no lock left on t", || async { locks_on_t(&db).await == 0 }).await;
}

// 11 ─ a server that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_gives_08006_naming_it() {
    let db = harness::fresh_database("pool_down");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.server_connect_retries = 1;
    cfg.pgtide.server_connect_backoff = ConfigDuration(Duration::from_millis(50));
    cfg.databases.insert(
        "down".to_string(),
        Database {
            host: "127.0.0.1".to_string(),
            port: closed,
            dbname: Some(db.clone()),
            ..Database::default()
        },
    );
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    for _ in 0..2 {
        let err = match try_connect(addr, "app", "apppass", "down").await {
            Ok((c, d)) => {
                let e = within("query on down", c.simple_query("SELECT 1"))
                    .await
                    .expect_err("the server is down");
                let code = failure_code(&e, d).await;
                assert_eq!(code, Some(SqlState::CONNECTION_FAILURE), "{e}");
                continue;
            }
            Err(e) => e,
        };
        assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
        let msg = message(&err);
        assert!(
            msg.contains(&format!("127.0.0.1:{closed}")),
            "the message must name the server: {msg}"
        );
    }
    let (c, _d) = app(addr, &db).await;
    assert_eq!(one(&c, "SELECT 'up'").await, "up");
}

// 12 ─ min_pool_size and server_idle_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_opens_connections() {
    let db = harness::fresh_database("pool_min");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.min_pool_size = 2;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (c, _d) = app(addr, &db).await;
    one(&c, "SELECT 1").await;
    eventually("2 server connections open", || async {
        app_backends(&db).await.len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_closes_idle_connections() {
    let db = harness::fresh_database("pool_idle");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.server_idle_timeout = ConfigDuration::secs(1);
    cfg.pgtide.pool_size = 3;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let before = open_three(addr, &db).await;
    eventually("idle server connections closed", || async {
        app_backends(&db).await.is_empty()
    })
    .await;
    drop(before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_keeps_min_pool_size() {
    let db = harness::fresh_database("pool_idle_min");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.server_idle_timeout = ConfigDuration::secs(1);
    cfg.pgtide.min_pool_size = 1;
    cfg.pgtide.pool_size = 3;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (clients, old) = open_three(addr, &db).await;
    eventually(
        "the extra connections closed, one of them kept for min_pool_size",
        || async {
            let now = app_backends(&db).await;
            now.len() == 1 && old.contains(&now[0])
        },
    )
    .await;
    let kept = app_backends(&db).await;
    // Several idle timeouts later the kept connection is still the same one: the
    // min_pool_size connections are not churned.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        app_backends(&db).await,
        kept,
        "the min_pool_size connection was replaced"
    );
    drop(clients);
}

/// Makes the pool open three server connections (three clients in transactions at once),
/// ends the transactions, and returns the clients and the backend pids.
async fn open_three(addr: SocketAddr, db: &str) -> (Vec<(Client, Driver)>, Vec<i32>) {
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = app(addr, db).await;
        exec(&c.0, "BEGIN").await;
        one(&c.0, "SELECT 1").await;
        clients.push(c);
    }
    let pids = app_backends(db).await;
    assert_eq!(pids.len(), 3, "three server connections: {pids:?}");
    for c in &clients {
        exec(&c.0, "COMMIT").await;
    }
    (clients, pids)
}

// 13 ─ settings not covered above: max_db_connections across users, the per-database
// pool_mode, client_idle_timeout and server_lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_caps_all_users_of_a_database() {
    let db = harness::fresh_database("pool_maxdb");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 5;
    cfg.pgtide.max_db_connections = 1;
    cfg.pgtide.query_wait_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    // Both users log in and work while the database's one connection is free.
    let (s, ds) = try_connect(addr, "pgtide_scram", "scrampass", &db)
        .await
        .expect("pgtide_scram logs in");
    one(&s, "SELECT 1").await;
    let (a, _da) = app(addr, &db).await;
    // app holds the database's only server connection in a transaction...
    exec(&a, "BEGIN").await;
    one(&a, "SELECT 1").await;
    // ...so the other user of the same database cannot get one, although its own pool
    // (pool_size 5) has room.
    let err = within("scram user", s.simple_query("SELECT 1"))
        .await
        .expect_err("max_db_connections = 1 is taken");
    assert_eq!(
        failure_code(&err, ds).await,
        Some(SqlState::TOO_MANY_CONNECTIONS),
        "{err}"
    );
    exec(&a, "COMMIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_database_pool_mode_is_session() {
    let db = harness::fresh_database("pool_dbmode");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_mode = PoolMode::Transaction;
    cfg.databases.get_mut(&db).unwrap().pool_mode = Some(PoolMode::Session);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (a, _da) = app(addr, &db).await;
    exec(&a, "CREATE TEMP TABLE mine (v int)").await;
    // Session mode: the temp table is still there in later transactions.
    for _ in 0..3 {
        exec(&a, "INSERT INTO mine VALUES (1)").await;
    }
    assert_eq!(one(&a, "SELECT count(*) FROM mine").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_disconnects_an_idle_client() {
    let db = harness::fresh_database("pool_clientidle");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.client_idle_timeout = ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (a, da) = app(addr, &db).await;
    one(&a, "SELECT 1").await;
    // Idle (outside a transaction) for longer than the timeout: pgtide ends the session
    // with 57P05, which tokio-postgres reports as the end of its connection.
    let end = within("idle client is disconnected", da)
        .await
        .expect("the connection task ends");
    let err = end.expect_err("the connection ends with pgtide's error");
    assert_eq!(err.code(), Some(&SqlState::IDLE_SESSION_TIMEOUT), "{err}");
    // A client that keeps working is not affected.
    let (b, _db2) = app(addr, &db).await;
    for _ in 0..4 {
        one(&b, "SELECT 1").await;
        sleep(Duration::from_millis(300)).await;
    }
    one(&b, "SELECT 'still here'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_replaces_old_connections() {
    let db = harness::fresh_database("pool_lifetime");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.server_lifetime = ConfigDuration(Duration::from_millis(500));
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let (a, _da) = app(addr, &db).await;
    let first = one(&a, "SELECT pg_backend_pid()").await;
    // A transaction that outlives server_lifetime is not cut short...
    exec(&a, "BEGIN").await;
    sleep(Duration::from_millis(700)).await;
    assert_eq!(one(&a, "SELECT pg_backend_pid()").await, first);
    exec(&a, "COMMIT").await;
    // ...but its connection is closed when released, and the next transaction gets a
    // new one.
    let next = one(&a, "SELECT pg_backend_pid()").await;
    assert_ne!(
        next, first,
        "the old server connection was reused past server_lifetime"
    );
    eventually("the old backend is gone", || async {
        !app_backends(&db).await.contains(&first.parse().unwrap())
    })
    .await;
}
