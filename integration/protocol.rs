//! Wire-protocol behaviour through pgtide: pipelining, the extended protocol, COPY, multi-
//! statement strings, errors in transactions, empty queries, FunctionCall, notices and
//! notifications, SSL/GSSENC negotiation, protocol versions, the login timeout, run-time
//! parameters per client, login ParameterStatus, Flush pinning and malformed input.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pgtide::config::{ConfigDuration, PoolMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

use crate::harness::{self, APP_PASSWORD, APP_USER};
use crate::harness::{app_at, setup, to};
use crate::rawpg;
use rawpg::{tags, RawPg};

const TRUST: &str = "pgtide_trust";

async fn trust(addr: SocketAddr, db: &str) -> tokio_postgres::Client {
    to(
        "connect as pgtide_trust",
        harness::connect(&harness::tcp_connect_string(addr, TRUST, "", db)),
    )
    .await
    .expect("pgtide_trust logs in through pgtide")
}

async fn one_int(c: &tokio_postgres::Client, sql: &str) -> i32 {
    to(sql, c.query_one(sql, &[]))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// psql through pgtide: (success, stdout, stderr).
fn psql_via(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    conninfo_extra: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (bool, String, String) {
    let conninfo = format!(
        "host={} port={} user={user} dbname={db} connect_timeout=10 {conninfo_extra}",
        addr.ip(),
        addr.port()
    );
    let mut cmd = Command::new("psql");
    cmd.arg("-X").arg("-At").arg("-d").arg(&conninfo).args(args);
    cmd.env("PGPASSWORD", password);
    cmd.env_remove("PGSSLMODE");
    cmd.env_remove("PGOPTIONS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("psql runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// True if the join handle has not finished after giving it a fair chance to run.
async fn still_pending<T>(h: &tokio::task::JoinHandle<T>) -> bool {
    for _ in 0..30 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if h.is_finished() {
            return false;
        }
    }
    !h.is_finished()
}

// 1 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_on_one_client() {
    let (db, _p, addr) = setup("proto_pipe", |c| c.pgtide.pool_size = 1).await;
    let a = app_at(addr, &db).await;
    let b = app_at(addr, &db).await;

    // B does its own work on the one server connection all along.
    let other = tokio::spawn(async move {
        let mut seen = Vec::new();
        for i in 0..40 {
            let rows = to(
                "B simple_query",
                b.simple_query(&format!("SELECT {i} + 1000")),
            )
            .await
            .expect("B's query");
            let v = rows.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            seen.push(v.expect("a row"));
        }
        seen
    });

    let futs = (0..200i32).map(|i| {
        let a = &a;
        async move { a.query_one("SELECT $1::int", &[&i]).await }
    });
    let results = to("200 pipelined queries", futures::future::join_all(futs)).await;
    for (i, r) in results.into_iter().enumerate() {
        let v: i32 = r.unwrap_or_else(|e| panic!("query {i}: {e}")).get(0);
        assert_eq!(v, i as i32);
    }

    // Pipelined executions of one prepared statement.
    let st = to("prepare", a.prepare("SELECT $1::int * 2, $2::text"))
        .await
        .expect("prepare");
    let futs = (0..100i32).map(|i| {
        let (a, st) = (&a, &st);
        async move {
            let s = format!("t{i}");
            a.query_one(st, &[&i, &s]).await
        }
    });
    let results = to("100 pipelined executions", futures::future::join_all(futs)).await;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("execution {i}: {e}"));
        assert_eq!(r.get::<_, i32>(0), 2 * i as i32);
        assert_eq!(r.get::<_, String>(1), format!("t{i}"));
    }

    let seen = to("B finishes", other).await.expect("B task");
    let want: Vec<String> = (0..40).map(|i| (i + 1000).to_string()).collect();
    assert_eq!(seen, want);
}

// 2 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_extended_pipeline_with_failing_batch() {
    let (db, _p, addr) = setup("proto_rawpipe", |c| c.pgtide.pool_size = 1).await;
    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
    const N: usize = 50;
    const BAD: usize = 23;
    let mut out = Vec::new();
    for i in 0..N {
        let sql = if i == BAD {
            "SELECT 1/0".to_string()
        } else {
            format!("SELECT {i}::int AS v")
        };
        out.extend(rawpg::parse("", &sql));
        out.extend(rawpg::bind("", "", &[]));
        out.extend(rawpg::execute("", 0));
        out.extend(rawpg::sync());
    }
    c.send(&out).await;
    for i in 0..N {
        let msgs = c.until_ready().await;
        let t = tags(&msgs);
        if i == BAD {
            let err = msgs
                .iter()
                .find(|m| m.tag == b'E')
                .unwrap_or_else(|| panic!("batch {i}: no ErrorResponse in {t}"));
            assert_eq!(err.sqlstate().as_deref(), Some("22012"), "batch {i}");
            assert!(!t.contains('D'), "batch {i}: rows after an error: {t}");
        } else {
            assert_eq!(t, "12DCZ", "batch {i}");
            assert_eq!(
                msgs[2].data_row(),
                vec![Some(i.to_string())],
                "batch {i} answers its own query"
            );
        }
        assert_eq!(msgs.last().unwrap().body, b"I", "batch {i} ends idle");
    }
    // The connection keeps working, and so does the pool for another client.
    assert_eq!(c.one("SELECT 'after'").await, "after");
    let other = trust(addr, &db).await;
    assert_eq!(one_int(&other, "SELECT 7").await, 7);
    assert_eq!(c.one("SELECT 'again'").await, "again");
}

// 3 ------------------------------------------------------------------------------------

async fn make_table(addr: SocketAddr, db: &str) -> tokio_postgres::Client {
    let a = app_at(addr, db).await;
    to(
        "create table",
        a.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, name text);
             GRANT ALL ON t TO pgtide_trust",
        ),
    )
    .await
    .expect("create table");
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_with_tokio_postgres() {
    let (db, _p, addr) = setup("proto_copy", |c| c.pgtide.pool_size = 1).await;
    let a = make_table(addr, &db).await;

    let sink = to("copy_in", a.copy_in("COPY t (id, name) FROM STDIN"))
        .await
        .expect("COPY FROM STDIN starts");
    let mut sink = Box::pin(sink);
    let mut chunk = String::new();
    for i in 0..10_000 {
        chunk.push_str(&format!("{i}\tname {i}\n"));
        if chunk.len() > 8000 {
            to(
                "copy send",
                sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))),
            )
            .await
            .expect("copy data");
        }
    }
    to("copy send", sink.send(bytes::Bytes::from(chunk)))
        .await
        .expect("copy data");
    let n = to("copy finish", sink.as_mut().finish())
        .await
        .expect("COPY finishes");
    assert_eq!(n, 10_000);

    let row = to("count", a.query_one("SELECT count(*), sum(id) FROM t", &[]))
        .await
        .expect("count");
    assert_eq!(row.get::<_, i64>(0), 10_000);
    assert_eq!(row.get::<_, i64>(1), (0..10_000i64).sum::<i64>());

    // Another client gets the only server connection after the COPY.
    let other = app_at(addr, &db).await;
    assert_eq!(
        one_int(&other, "SELECT count(*)::int FROM t").await,
        10_000,
        "the pool's only server is free again after COPY FROM STDIN"
    );

    let stream = to(
        "copy_out",
        a.copy_out("COPY (SELECT id, name FROM t ORDER BY id) TO STDOUT"),
    )
    .await
    .expect("COPY TO STDOUT starts");
    let chunks: Vec<_> = to("copy_out read", stream.collect::<Vec<_>>()).await;
    let mut all = Vec::new();
    for c in chunks {
        all.extend_from_slice(&c.expect("copy out data"));
    }
    let text = String::from_utf8(all).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10_000);
    assert_eq!(lines[0], "0\tname 0");
    assert_eq!(lines[9_999], "9999\tname 9999");
    assert_eq!(one_int(&other, "SELECT 1").await, 1);
    assert_eq!(one_int(&a, "SELECT 2").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_with_psql() {
    let (db, _p, addr) = setup("proto_psqlcopy", |c| c.pgtide.pool_size = 1).await;
    let _a = make_table(addr, &db).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.tsv");
    let output = dir.path().join("out.tsv");
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tpsql {i}\n"));
    }
    std::fs::write(&input, &data).expect("write input");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let (db, input) = (db.clone(), input.clone());
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "",
                &["-c", &format!("\\copy t FROM '{}'", input.display())],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "\\copy FROM failed: {out} {err}");
    assert_eq!(out, "COPY 5000");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let (db, output) = (db.clone(), output.clone());
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "",
                &[
                    "-c",
                    &format!(
                        "\\copy (SELECT * FROM t ORDER BY id) TO '{}'",
                        output.display()
                    ),
                ],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "\\copy TO failed: {out} {err}");
    assert_eq!(out, "COPY 5000");
    assert_eq!(std::fs::read_to_string(&output).expect("output"), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_fail_leaves_connection_and_server_usable() {
    let (db, _p, addr) = setup("proto_copyfail", |c| c.pgtide.pool_size = 1).await;
    let _a = make_table(addr, &db).await;

    // Raw: simple-query COPY, some data, then CopyFail.
    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
    c.send(&rawpg::query("COPY t FROM STDIN")).await;
    let m = c.recv().await;
    assert_eq!(m.tag, b'G', "CopyInResponse expected, got {m:?}");
    let mut out = rawpg::copy_data(b"1\tone\n");
    out.extend(rawpg::copy_fail("client gave up"));
    c.send(&out).await;
    let msgs = c.until_ready().await;
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("57014"));
    assert!(
        err.message().unwrap_or_default().contains("client gave up"),
        "{err:?}"
    );
    assert_eq!(msgs.last().unwrap().body, b"I");
    assert_eq!(c.one("SELECT count(*) FROM t").await, "0");

    // Another client gets the single server afterwards.
    let other = trust(addr, &db).await;
    assert_eq!(one_int(&other, "SELECT 5").await, 5);

    // tokio-postgres: a copy_in sink dropped without finish sends CopyFail.
    let tp = trust(addr, &db).await;
    {
        let sink = to("copy_in", tp.copy_in("COPY t FROM STDIN"))
            .await
            .expect("copy starts");
        let mut sink = Box::pin(sink);
        to("send", sink.send(bytes::Bytes::from_static(b"2\ttwo\n")))
            .await
            .expect("data");
        drop(sink);
    }
    assert_eq!(
        one_int(&tp, "SELECT count(*)::int FROM t").await,
        0,
        "the failed COPY inserted nothing and the client works"
    );
    assert_eq!(
        one_int(&other, "SELECT 6").await,
        6,
        "the pool's only server is free after a failed COPY"
    );
    assert_eq!(c.one("SELECT 'raw still fine'").await, "raw still fine");
}

/// Parse/Bind/Execute/Sync of a COPY FROM STDIN, data, CopyDone (or CopyFail), Sync: the
/// sequence tokio-postgres and other drivers send. The server ignores the Sync that
/// arrives during COPY IN, so it answers one ReadyForQuery for the two Syncs.
fn extended_copy(fail: bool) -> Vec<u8> {
    let mut out = rawpg::parse("", "COPY t FROM STDIN");
    out.extend(rawpg::bind("", "", &[]));
    out.extend(rawpg::execute("", 0));
    out.extend(rawpg::sync());
    out.extend(rawpg::copy_data(b"1\tone\n2\ttwo\n"));
    if fail {
        out.extend(rawpg::copy_fail("nope"));
    } else {
        out.extend(rawpg::copy_done());
    }
    out.extend(rawpg::sync());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_copy_releases_server() {
    let (db, _p, addr) = setup("proto_extcopy", |c| c.pgtide.pool_size = 1).await;
    let _a = make_table(addr, &db).await;
    for fail in [false, true] {
        // What PostgreSQL itself answers.
        let mut direct = RawPg::login(
            harness::direct_addr(harness::primary_port()),
            TRUST,
            &db,
            &[],
        )
        .await;
        direct.send(&extended_copy(fail)).await;
        let want = tags(&direct.until_ready().await);
        assert_eq!(want, if fail { "12GEZ" } else { "12GCZ" });
        direct.simple("TRUNCATE t").await;

        let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
        c.send(&extended_copy(fail)).await;
        assert_eq!(tags(&c.until_ready().await), want, "fail={fail}");
        assert_eq!(c.one("SELECT 'same client'").await, "same client");
        // The one server connection must be free for another client now.
        let mut other = RawPg::login(addr, TRUST, &db, &[]).await;
        other.send(&rawpg::query("SELECT count(*) FROM t")).await;
        let msgs = other.until_ready().await;
        assert_eq!(
            tags(&msgs),
            "TDCZ",
            "fail={fail}: another client gets the pool's only server after an extended-protocol COPY: {:?}",
            msgs.iter().find(|m| m.tag == b'E').and_then(|m| m.message())
        );
        assert_eq!(
            msgs[1].data_row(),
            vec![Some(if fail { "0" } else { "2" }.to_string())]
        );
        other.simple("TRUNCATE t").await;
    }
}

// 4 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_simple_queries() {
    let (db, _p, addr) = setup("proto_multi", |c| c.pgtide.pool_size = 1).await;
    let a = app_at(addr, &db).await;
    to(
        "batch_execute",
        a.batch_execute(
            "CREATE TABLE m (v int); INSERT INTO m VALUES (1); INSERT INTO m VALUES (2), (3)",
        ),
    )
    .await
    .expect("batch_execute");
    assert_eq!(one_int(&a, "SELECT sum(v)::int FROM m").await, 6);

    let msgs = to(
        "simple_query",
        a.simple_query("select 1; select 2; select 3"),
    )
    .await
    .expect("three selects");
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "2", "3"]);

    let err = to(
        "failing multi-statement",
        a.simple_query("insert into m values (10); select 1/0; insert into m values (20)"),
    )
    .await
    .expect_err("division by zero");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    // The whole implicit transaction rolled back; the third statement never ran.
    assert_eq!(one_int(&a, "SELECT sum(v)::int FROM m").await, 6);

    // Raw: the rows before the error arrive, nothing after it.
    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
    c.send(&rawpg::query("select 'x'; select 1/0; select 'z'"))
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "TDCEZ");
    assert_eq!(msgs[1].data_row(), vec![Some("x".to_string())]);
    assert_eq!(msgs[4].body, b"I");
    assert_eq!(c.one("select 'ok'").await, "ok");
}

// 5 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_transaction_then_rollback() {
    let (db, _p, addr) = setup("proto_txerr", |c| c.pgtide.pool_size = 1).await;
    let a = app_at(addr, &db).await;
    let b = app_at(addr, &db).await;

    to("begin", a.batch_execute("BEGIN")).await.expect("BEGIN");
    let e = to("bad", a.batch_execute("SELECT * FROM no_such_table"))
        .await
        .expect_err("undefined table");
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE));
    let e = to("aborted", a.simple_query("SELECT 1"))
        .await
        .expect_err("in failed transaction");
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));

    // B needs the only server: it waits until A's transaction ends.
    let bh = tokio::spawn(async move {
        let r = to("B query", b.query_one("SELECT 42", &[])).await;
        (b, r.map(|r| r.get::<_, i32>(0)))
    });
    if !still_pending(&bh).await {
        let (_, r) = bh.await.expect("B task");
        panic!("B got a server while A's failed transaction still held it: {r:?}");
    }
    to("rollback", a.batch_execute("ROLLBACK"))
        .await
        .expect("ROLLBACK");
    let (b, r) = to("B completes", bh).await.expect("B task");
    assert_eq!(r.expect("B's query"), 42);
    assert_eq!(one_int(&a, "SELECT 1").await, 1);
    assert_eq!(one_int(&b, "SELECT 2").await, 2);
    // And A is not left inside a transaction: SAVEPOINT needs one.
    let e = to("savepoint", a.batch_execute("SAVEPOINT x"))
        .await
        .expect_err("no transaction block any more");
    assert_eq!(e.code(), Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION));
}

// 6 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_query() {
    let (db, _p, addr) = setup("proto_empty", |_| {}).await;
    let a = app_at(addr, &db).await;
    let msgs = to("empty simple_query", a.simple_query(""))
        .await
        .expect("empty query succeeds");
    assert!(
        !msgs.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))),
        "no rows"
    );
    assert_eq!(one_int(&a, "SELECT 3").await, 3);

    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
    c.send(&rawpg::query("")).await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "IZ");
    c.send(&rawpg::query("  ;  ")).await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "IZ");
    assert_eq!(c.one("SELECT 'after empty'").await, "after empty");
}

// 7 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_message() {
    let (db, _p, addr) = setup("proto_fcall", |c| c.pgtide.pool_size = 1).await;
    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
    let oid: u32 = c
        .one("select 'int4abs'::regproc::oid")
        .await
        .parse()
        .expect("an oid");
    c.send(&rawpg::function_call(oid, &[&rawpg::be_i32(-42)]))
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "VZ");
    let v = &msgs[0].body;
    assert_eq!(&v[..4], &4i32.to_be_bytes(), "result length");
    assert_eq!(&v[4..8], &42i32.to_be_bytes(), "abs(-42)");
    assert_eq!(msgs[1].body, b"I");
    // The server went back to the pool: another client can use it.
    let other = trust(addr, &db).await;
    assert_eq!(one_int(&other, "SELECT 9").await, 9);
    assert_eq!(c.one("SELECT 'more'").await, "more");
}

// 8 ------------------------------------------------------------------------------------

/// Connects with tokio-postgres and forwards the connection's async messages to a channel.
async fn connect_with_messages(
    conn_str: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut connection) = to(
        "connect",
        tokio_postgres::connect(conn_str, tokio_postgres::NoTls),
    )
    .await
    .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(m) => {
                    let _ = tx.send(m);
                }
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_passes_through() {
    let (db, _p, addr) = setup("proto_notice", |_| {}).await;
    let (c, mut rx) = connect_with_messages(&harness::tcp_connect_string(
        addr,
        APP_USER,
        APP_PASSWORD,
        &db,
    ))
    .await;
    to(
        "DO",
        c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$"),
    )
    .await
    .expect("DO block");
    let m = to("notice", rx.recv()).await.expect("a message");
    match m {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.message(), "hello");
            assert_eq!(n.severity(), "NOTICE");
        }
        other => panic!("expected a notice, got {other:?}"),
    }

    let (ok, out, err) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "",
                &["-c", "DO $$ BEGIN RAISE NOTICE 'hello'; END $$"],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "psql failed: {out} {err}");
    assert!(err.contains("NOTICE:  hello"), "psql stderr: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_in_session_mode() {
    let (db, _p, addr) = setup("proto_notify", |c| c.pgtide.pool_mode = PoolMode::Session).await;
    let conn_str = harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db);
    let (listener, mut rx) = connect_with_messages(&conn_str).await;
    to("LISTEN", listener.batch_execute("LISTEN chan"))
        .await
        .expect("LISTEN");
    let notifier = app_at(addr, &db).await;
    to("NOTIFY", notifier.batch_execute("NOTIFY chan, 'payload 1'"))
        .await
        .expect("NOTIFY");
    // The listener is idle: the notification must arrive without it sending anything.
    let m = to("notification", rx.recv()).await.expect("a message");
    match m {
        AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "chan");
            assert_eq!(n.payload(), "payload 1");
        }
        other => panic!("expected a notification, got {other:?}"),
    }
}

// 9 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests() {
    let (db, _p, addr) = setup("proto_ssl", |_| {}).await;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "sslmode=prefer",
                &["-c", "SELECT 'plain'"],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "sslmode=prefer must connect: {err}");
    assert_eq!(out, "plain");

    let (ok, out, err) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "sslmode=require",
                &["-c", "SELECT 1"],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(!ok, "sslmode=require must fail: {out}");
    assert!(
        err.contains("server does not support SSL"),
        "psql stderr: {err:?}"
    );

    let (ok, out, err) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "gssencmode=prefer",
                &["-c", "SELECT 'g'"],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "gssencmode=prefer must connect: {err}");
    assert_eq!(out, "g");

    // Raw: GSSENCRequest, 'N', then SSLRequest would be a second request; a plain
    // StartupMessage works.
    let mut c = RawPg::connect(addr).await;
    c.send(&rawpg::request_code(rawpg::GSSENC_REQUEST)).await;
    assert_eq!(c.recv_byte().await, b'N');
    c.send(&rawpg::startup(
        rawpg::PROTOCOL_3_0,
        &[("user", TRUST), ("database", &db)],
    ))
    .await;
    c.finish_login().await;
    assert_eq!(c.one("SELECT 'gss fallback'").await, "gss fallback");

    let mut c = RawPg::connect(addr).await;
    c.send(&rawpg::request_code(rawpg::SSL_REQUEST)).await;
    assert_eq!(c.recv_byte().await, b'N');
    c.send(&rawpg::startup(
        rawpg::PROTOCOL_3_0,
        &[("user", TRUST), ("database", &db)],
    ))
    .await;
    c.finish_login().await;
    assert_eq!(c.one("SELECT 'ssl fallback'").await, "ssl fallback");

    // libpq with gssencmode=prefer and sslmode=prefer (the defaults) and a Kerberos
    // ticket sends GSSENCRequest, gets 'N', then tries SSLRequest on the same
    // connection; PostgreSQL answers both (postmaster.c, ProcessStartupPacket keeps
    // separate ssl_done / gss_done flags).
    let mut c = RawPg::connect(addr).await;
    c.send(&rawpg::request_code(rawpg::GSSENC_REQUEST)).await;
    assert_eq!(c.recv_byte().await, b'N');
    c.send(&rawpg::request_code(rawpg::SSL_REQUEST)).await;
    let answer = c.recv_byte().await;
    assert_eq!(
        answer, b'N',
        "SSLRequest after a refused GSSENCRequest must be answered 'N' (got {:?})",
        answer as char
    );
    c.send(&rawpg::startup(
        rawpg::PROTOCOL_3_0,
        &[("user", TRUST), ("database", &db)],
    ))
    .await;
    c.finish_login().await;
    assert_eq!(c.one("SELECT 'gss then ssl'").await, "gss then ssl");
}

// 10 -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_versions() {
    let (db, _p, addr) = setup("proto_version", |_| {}).await;

    // A protocol 2.0 startup packet (fixed layout, 296 bytes).
    let mut c = RawPg::connect(addr).await;
    let mut pkt = 296i32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&0x0002_0000i32.to_be_bytes());
    let mut field = |s: &str, n: usize| {
        let mut f = s.as_bytes().to_vec();
        f.resize(n, 0);
        pkt.extend_from_slice(&f);
    };
    field(&db, 64);
    field(TRUST, 32);
    field("", 64);
    field("", 64);
    field("", 64);
    assert_eq!(pkt.len(), 296);
    c.send(&pkt).await;
    let msgs = c.until_eof().await;
    assert_eq!(tags(&msgs), "E", "a FATAL, then the connection closes");
    assert_eq!(msgs[0].severity().as_deref(), Some("FATAL"));
    assert_eq!(msgs[0].sqlstate().as_deref(), Some("0A000"));
    let msg = msgs[0].message().unwrap_or_default();
    assert!(msg.contains("2.0"), "message names the version: {msg}");

    // 3.2 with a _pq_ option: NegotiateProtocolVersion, then a normal login.
    let mut c = RawPg::connect(addr).await;
    c.send(&rawpg::startup(
        (3 << 16) | 2,
        &[("user", TRUST), ("database", &db), ("_pq_.foo", "bar")],
    ))
    .await;
    let first = c.recv().await;
    assert_eq!(first.tag, b'v', "NegotiateProtocolVersion first: {first:?}");
    let b = &first.body;
    assert_eq!(
        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        3 << 16,
        "newest minor version supported: 3.0"
    );
    assert_eq!(i32::from_be_bytes([b[4], b[5], b[6], b[7]]), 1);
    assert_eq!(&b[8..], b"_pq_.foo\0");
    c.finish_login().await;
    assert_eq!(c.one("SELECT 'negotiated'").await, "negotiated");
}

// 11 -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_login_timeout_disconnects_silent_client() {
    let (db, _p, addr) = setup("proto_logintimeout", |c| {
        c.pgtide.client_login_timeout = ConfigDuration::secs(1)
    })
    .await;
    let mut silent = RawPg::connect(addr).await;
    let mut half = RawPg::connect(addr).await;
    // Half a startup packet: the length promises more than is sent.
    half.send(&100i32.to_be_bytes()).await;

    // Meanwhile another client logs in and works.
    let other = trust(addr, &db).await;
    assert_eq!(one_int(&other, "SELECT 11").await, 11);

    for (name, c) in [("silent", &mut silent), ("half", &mut half)] {
        let msgs = tokio::time::timeout(Duration::from_secs(10), c.until_eof())
            .await
            .unwrap_or_else(|_| panic!("{name}: not disconnected within 10 s"));
        for m in &msgs {
            assert_eq!(m.tag, b'E', "{name}: only an ErrorResponse may come: {m:?}");
            assert_eq!(m.sqlstate().as_deref(), Some("08P01"), "{name}");
        }
    }
    assert_eq!(one_int(&other, "SELECT 12").await, 12);
}

// 12 -----------------------------------------------------------------------------------

const SETTINGS_SQL: &str =
    "SELECT current_setting('search_path'), current_setting('statement_timeout'), \
     current_setting('extra_float_digits'), current_setting('TimeZone'), \
     current_setting('application_name')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_via_psql() {
    let (db, _p, addr) = setup("proto_params_psql", |c| c.pgtide.pool_size = 1).await;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            psql_via(
                addr,
                TRUST,
                "",
                &db,
                "",
                &[
                    "-c",
                    "SHOW search_path",
                    "-c",
                    "SHOW statement_timeout",
                    "-c",
                    "SELECT current_setting('application_name')",
                ],
                &[
                    ("PGOPTIONS", "-c search_path=s1 -c statement_timeout=1234"),
                    ("PGAPPNAME", "appA"),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "psql: {err}");
    assert_eq!(out, "s1\n1234ms\nappA");

    // tokio-postgres with options and application_name.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(addr.ip().to_string())
        .port(addr.port())
        .user(TRUST)
        .dbname(&db)
        .options("-c search_path=s9 -c statement_timeout=4321")
        .application_name("appT");
    let (c, conn) = to("connect", cfg.connect(tokio_postgres::NoTls))
        .await
        .expect("connect");
    tokio::spawn(conn);
    let plain = trust(addr, &db).await;
    for _ in 0..3 {
        let r = to("settings", c.query_one(SETTINGS_SQL, &[]))
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "s9");
        assert_eq!(r.get::<_, String>(1), "4321ms");
        assert_eq!(r.get::<_, String>(4), "appT");
        let r = to("settings", plain.query_one(SETTINGS_SQL, &[]))
            .await
            .unwrap();
        assert_eq!(
            r.get::<_, String>(0),
            "\"$user\", public",
            "no leak of search_path"
        );
        assert_eq!(r.get::<_, String>(1), "0", "no leak of statement_timeout");
        assert_eq!(r.get::<_, String>(4), "", "no leak of application_name");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_isolated_per_client() {
    let (db, _p, addr) = setup("proto_params_raw", |c| c.pgtide.pool_size = 1).await;
    let mut a = RawPg::login(
        addr,
        TRUST,
        &db,
        &[
            ("extra_float_digits", "2"),
            ("timezone", "Asia/Tokyo"),
            ("application_name", "clientA"),
            ("options", "-c search_path=sa -c statement_timeout=1111"),
        ],
    )
    .await;
    let mut b = RawPg::login(
        addr,
        TRUST,
        &db,
        &[
            ("extra_float_digits", "-3"),
            ("TimeZone", "America/New_York"),
            ("application_name", "clientB"),
            ("options", "-c search_path=sb"),
        ],
    )
    .await;
    let mut c = RawPg::login(addr, TRUST, &db, &[]).await;

    // The login ParameterStatus reflects the client's own settings.
    let tz = |p: &[(String, String)]| {
        p.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("timezone"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(tz(&a.login_params), ["TimeZone=Asia/Tokyo"]);
    assert_eq!(tz(&b.login_params), ["TimeZone=America/New_York"]);

    let want_a = ["sa", "1111ms", "2", "Asia/Tokyo", "clientA"];
    let want_b = ["sb", "0", "-3", "America/New_York", "clientB"];
    let row = |r: Vec<Vec<Option<String>>>| -> Vec<String> {
        r[0].iter().map(|v| v.clone().unwrap_or_default()).collect()
    };
    let want_c = row(c.simple(SETTINGS_SQL).await);
    assert_ne!(want_c[3], "Asia/Tokyo");
    for round in 0..4 {
        assert_eq!(
            row(a.simple(SETTINGS_SQL).await),
            want_a,
            "A, round {round}"
        );
        assert_eq!(
            row(b.simple(SETTINGS_SQL).await),
            want_b,
            "B, round {round}"
        );
        assert_eq!(
            row(c.simple(SETTINGS_SQL).await),
            want_c,
            "C, round {round}"
        );
        // The same through the extended protocol.
        let mut out = rawpg::parse("", SETTINGS_SQL);
        out.extend(rawpg::bind("", "", &[]));
        out.extend(rawpg::execute("", 0));
        out.extend(rawpg::sync());
        b.send(&out).await;
        let msgs = b.until_ready().await;
        let d = msgs.iter().find(|m| m.tag == b'D').expect("a row");
        let got: Vec<String> = d
            .data_row()
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        assert_eq!(got, want_b, "B extended, round {round}");
    }
    // SHOW spellings the user would type.
    assert_eq!(a.one("SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(a.one("SHOW extra_float_digits").await, "2");
    assert_eq!(b.one("SHOW timezone").await, "America/New_York");

    // A session-level SET in A stays with A only.
    a.simple("SET statement_timeout = '7777'").await;
    a.simple("SET search_path = sa2").await;
    let want_a = ["sa2", "7777ms", "2", "Asia/Tokyo", "clientA"];
    for round in 0..3 {
        assert_eq!(
            row(b.simple(SETTINGS_SQL).await),
            want_b,
            "B after A's SET, round {round}"
        );
        assert_eq!(
            row(a.simple(SETTINGS_SQL).await),
            want_a,
            "A after SET, round {round}"
        );
        assert_eq!(
            row(c.simple(SETTINGS_SQL).await),
            want_c,
            "C after A's SET, round {round}"
        );
    }
}

// 13 -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_at_login() {
    let (db, _p, addr) = setup("proto_paramstatus", |_| {}).await;
    let c = RawPg::login(addr, TRUST, &db, &[]).await;
    let names: Vec<&str> = c.login_params.iter().map(|(k, _)| k.as_str()).collect();
    for want in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let mut dedup = names.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        names.len(),
        "duplicate ParameterStatus: {names:?}"
    );
    assert_eq!(
        tags(&c.login_msgs).chars().filter(|&t| t == 'K').count(),
        1,
        "one BackendKeyData"
    );
    assert!(tags(&c.login_msgs).starts_with('R'));

    // Values match what the server itself reports.
    let direct = to(
        "direct",
        harness::connect(&harness::tcp_connect_string(
            harness::direct_addr(harness::primary_port()),
            TRUST,
            "",
            &db,
        )),
    )
    .await
    .expect("direct connect");
    let v: String = to("version", direct.query_one("SHOW server_version", &[]))
        .await
        .unwrap()
        .get(0);
    let got = c
        .login_params
        .iter()
        .find(|(k, _)| k == "server_version")
        .map(|(_, v)| v.clone());
    assert_eq!(got.as_deref(), Some(v.as_str()));

    // tokio-postgres sees them too (it refuses logins without client_encoding UTF8).
    let t = trust(addr, &db).await;
    assert_eq!(one_int(&t, "SELECT 1").await, 1);
}

// 14 -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_without_sync_keeps_server() {
    let (db, _p, addr) = setup("proto_flush", |c| c.pgtide.pool_size = 1).await;
    let mut a = RawPg::login(addr, TRUST, &db, &[]).await;
    let b = trust(addr, &db).await;
    // Warm: B's first query makes sure the pool has its one server.
    assert_eq!(one_int(&b, "SELECT 0").await, 0);

    let mut out = rawpg::parse("", "select pg_backend_pid()");
    out.extend(rawpg::bind("", "", &[]));
    out.extend(rawpg::execute("", 0));
    out.extend(rawpg::flush());
    a.send(&out).await;
    let mut msgs = Vec::new();
    while msgs.last().map(|m: &rawpg::Msg| m.tag) != Some(b'C') {
        msgs.push(a.recv().await);
    }
    assert_eq!(tags(&msgs), "12DC");
    let a_pid: i32 = msgs[2].data_row()[0].clone().unwrap().parse().unwrap();

    let bh = tokio::spawn(async move {
        let r = to("B query", b.query_one("select pg_backend_pid()", &[])).await;
        r.map(|r| r.get::<_, i32>(0))
    });
    if !still_pending(&bh).await {
        let r = bh.await.expect("B task");
        panic!("B got the server while A's batch was flushed but not synced: {r:?}");
    }
    a.send(&rawpg::sync()).await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), "Z");
    let b_pid = to("B completes", bh).await.unwrap().expect("B's query");
    assert_eq!(b_pid, a_pid, "pool_size 1: the same server");
    assert_eq!(a.one("SELECT 'a again'").await, "a again");
}

// 15 -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_fatal_for_that_client_only() {
    let (db, _p, addr) = setup("proto_malformed", |c| c.pgtide.pool_size = 2).await;
    let bystander = trust(addr, &db).await;
    assert_eq!(one_int(&bystander, "SELECT 1").await, 1);

    let cases: [(&str, Vec<u8>); 4] = [
        ("length 2", vec![b'Q', 0, 0, 0, 2]),
        ("2 GB query", {
            let mut v = vec![b'Q'];
            v.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
            v.extend_from_slice(b"SELECT 1");
            v
        }),
        ("2 GB bind", {
            let mut v = vec![b'B'];
            v.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
            v.extend_from_slice(&[0; 16]);
            v
        }),
        ("length 0 after a good batch", {
            let mut v = rawpg::parse("", "SELECT 1");
            v.extend(rawpg::bind("", "", &[]));
            v.extend([b'E', 0, 0, 0, 0]);
            v
        }),
    ];
    for (name, bytes) in cases {
        let mut c = RawPg::login(addr, TRUST, &db, &[]).await;
        assert_eq!(c.one("SELECT 'before'").await, "before", "{name}");
        let _ = c.try_send(&bytes).await;
        let msgs = to(name, c.until_eof()).await;
        let fatal = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("{name}: no ErrorResponse before EOF: {}", tags(&msgs)));
        assert_eq!(fatal.severity().as_deref(), Some("FATAL"), "{name}");
        assert_eq!(fatal.sqlstate().as_deref(), Some("08P01"), "{name}");
        if name.contains("GB") {
            let m = fatal.message().unwrap_or_default();
            assert!(m.contains("max_message_size"), "{name}: {m}");
        }
        assert_eq!(one_int(&bystander, "SELECT 2").await, 2, "after {name}");
    }
    // The pool is healthy: two more clients can each get a server.
    let x = trust(addr, &db).await;
    let y = trust(addr, &db).await;
    to("begin", x.batch_execute("BEGIN")).await.unwrap();
    to("begin", y.batch_execute("BEGIN")).await.unwrap();
    assert_eq!(one_int(&x, "SELECT 3").await, 3);
    assert_eq!(one_int(&y, "SELECT 4").await, 4);
    to("commit", x.batch_execute("COMMIT")).await.unwrap();
    to("commit", y.batch_execute("COMMIT")).await.unwrap();
}
