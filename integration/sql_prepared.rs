//! SQL-level `PREPARE` / `EXECUTE` / `DEALLOCATE` in transaction mode (issue #16): the
//! client's names stay with pgtide, the server gets pgtide's own (`pgtide_<n>`),
//! prepared on whatever server connection the client's next statement gets. Where the
//! question is "what would PostgreSQL answer", the same statements run on a direct
//! connection first and pgtide's answers must match: command tags, rows, SQLSTATEs,
//! messages, error positions and the transaction status.

use std::net::SocketAddr;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, app_at, setup, to, APP_USER};
use crate::rawpg::{self, Msg, RawPg};

const TRUST: &str = "pgtide_trust";

/// The first column of the first row of a simple query.
async fn value(c: &Client, sql: &str) -> String {
    let msgs = to(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn exec(c: &Client, sql: &str) {
    to(sql, c.batch_execute(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// What a client sees of one simple query: command tags, rows, errors (SQLSTATE,
/// message, detail, position) and the final transaction status.
fn summary(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m.tag {
            b'C' => Some(format!(
                "tag {}",
                String::from_utf8_lossy(&m.body[..m.body.len().saturating_sub(1)])
            )),
            b'D' => Some(format!("row {:?}", m.data_row())),
            b'E' => Some(format!(
                "error {:?} {:?} detail {:?} position {:?}",
                m.sqlstate(),
                m.message(),
                m.field(b'D'),
                m.field(b'P')
            )),
            b'I' => Some("empty".to_string()),
            b'Z' => Some(format!("status {}", m.body[0] as char)),
            _ => None,
        })
        .collect()
}

async fn run(c: &mut RawPg, sql: &str) -> Vec<String> {
    c.send(&rawpg::query(sql)).await;
    summary(&to(sql, c.until_ready()).await)
}

/// Runs `script` on a direct connection and through pgtide; every answer must match.
async fn same_as_direct(addr: SocketAddr, db: &str, script: &[&str]) {
    let mut direct = to(
        "direct login",
        RawPg::login(
            harness::direct_addr(harness::primary_port()),
            TRUST,
            db,
            &[],
        ),
    )
    .await;
    let mut pooled = to("pgtide login", RawPg::login(addr, TRUST, db, &[])).await;
    for sql in script {
        let want = run(&mut direct, sql).await;
        let got = run(&mut pooled, sql).await;
        assert_eq!(
            got, want,
            "{sql}: pgtide (left) differs from PostgreSQL (right)"
        );
    }
}

// (1), (2): the same name from many clients at once, each with its own text, on a pool
// of 2, executed in and out of explicit transactions: every answer is the client's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_from_20_clients_on_a_pool_of_2() {
    let (db, _p, addr) = setup("sqlprep_many", |c| c.pgtide.pool_size = 2).await;
    let mut tasks = Vec::new();
    for k in 0..20i64 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let c = app_at(addr, &db).await;
            exec(&c, &format!("PREPARE q AS SELECT $1::int + {}", k * 1000)).await;
            for i in 0..30i64 {
                let want = (i + k * 1000).to_string();
                match i % 3 {
                    0 => assert_eq!(value(&c, &format!("EXECUTE q({i})")).await, want),
                    1 => {
                        exec(&c, "BEGIN").await;
                        assert_eq!(value(&c, &format!("execute Q ({i});")).await, want);
                        assert_eq!(value(&c, "SELECT 1").await, "1");
                        assert_eq!(value(&c, &format!("EXECUTE q({i})")).await, want);
                        exec(&c, "COMMIT").await;
                    }
                    _ => {
                        // In a transaction that rolls back: the statement stays, as on
                        // PostgreSQL (prepared statements are not transactional).
                        exec(&c, "BEGIN").await;
                        assert_eq!(value(&c, &format!("EXECUTE q({i})")).await, want);
                        exec(&c, "ROLLBACK").await;
                    }
                }
                tokio::task::yield_now().await;
            }
            // PREPARE inside a transaction that rolls back keeps the statement too.
            exec(&c, "BEGIN").await;
            exec(&c, &format!("PREPARE r AS SELECT {k} * 2")).await;
            exec(&c, "ROLLBACK").await;
            assert_eq!(value(&c, "EXECUTE r").await, (k * 2).to_string());
        }));
    }
    for t in tasks {
        to("client task", t).await.expect("a client failed");
    }
    let backends = harness::psql(
        harness::primary_port(),
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND usename = '{APP_USER}'"
        ),
    );
    assert!(
        backends.trim().parse::<i64>().unwrap_or(99) <= 2,
        "more server connections than pool_size: {backends}"
    );
}

// (3), (4): errors, tags and transaction states as PostgreSQL gives them: 42P05, 26000,
// DEALLOCATE [PREPARE] name / ALL, a PREPARE that fails (and leaves no name), errors in
// EXECUTE's arguments (with their position) and in aborted transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_postgresql() {
    let (db, _p, addr) = setup("sqlprep_fidelity", |c| c.pgtide.pool_size = 1).await;
    same_as_direct(
        addr,
        &db,
        &[
            "PREPARE q AS SELECT $1::int * 2",
            "EXECUTE q(21)",
            "PREPARE q AS SELECT 1",
            "prepare Q(int) as select 1;",
            "  /* comment */ execute Q (4) ; -- trailing",
            "EXECUTE nope",
            "DEALLOCATE nope",
            "EXECUTE pgtide_1",
            "DEALLOCATE pgtide_1",
            "PREPARE \"Mixed\" AS SELECT 'm'",
            "EXECUTE \"Mixed\"",
            "EXECUTE mixed",
            "EXECUTE q",
            "EXECUTE q('x')",
            "EXECUTE q(1, 2)",
            "PREPARE bad AS SELECT * FROM no_such_table",
            "EXECUTE bad",
            "PREPARE bad AS SELECT 'now it works'",
            "EXECUTE bad",
            "PREPARE syn AS SELEC 1",
            "EXECUTE syn",
            "PREPARE select AS SELECT 1",
            "BEGIN",
            "EXECUTE q(3)",
            "SELECT 1/0",
            "EXECUTE q(1)",
            "DEALLOCATE q",
            "PREPARE late AS SELECT 1",
            "ROLLBACK",
            "EXECUTE q(5)",
            "EXECUTE late",
            "BEGIN",
            "DEALLOCATE q",
            "EXECUTE q(6)",
            "COMMIT",
            "EXECUTE q(7)",
            "PREPARE q AS SELECT 'again'",
            "EXECUTE q",
            "DEALLOCATE PREPARE q;",
            "PREPARE a AS SELECT 1",
            "PREPARE b (text) AS SELECT $1 || '!'",
            "EXECUTE b('hi')",
            "DEALLOCATE ALL",
            "EXECUTE a",
            "EXECUTE b('x')",
            "PREPARE a AS SELECT 'a after ALL'",
            "EXECUTE a",
        ],
    )
    .await;
}

// (5): the client's statement survives its server connections: closed by RECONNECT,
// terminated by PostgreSQL; the next EXECUTE prepares it on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_survive_their_server_connections() {
    let (db, _p, addr) = setup("sqlprep_churn", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.admin_users = vec![TRUST.to_string()];
    })
    .await;
    let c = app_at(addr, &db).await;
    exec(&c, "PREPARE q (int) AS SELECT $1 + 100").await;
    let first = value(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(value(&c, "EXECUTE q(1)").await, "101");

    let mut console = to("console", RawPg::login(addr, TRUST, "pgtide", &[])).await;
    console.simple("RECONNECT").await;
    assert_eq!(value(&c, "EXECUTE q(2)").await, "102");
    let second = value(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(
        first, second,
        "RECONNECT must have replaced the server connection"
    );

    harness::psql(
        harness::primary_port(),
        "postgres",
        &format!("SELECT pg_terminate_backend({second}, 10000)"),
    );
    // (With a timeout, pg_terminate_backend waits until the backend has exited: its
    // FATAL and the close are on the socket before the next checkout looks.)
    // The idle connection PostgreSQL closed is noticed and replaced at checkout.
    exec(&c, "BEGIN").await;
    assert_eq!(value(&c, "EXECUTE q(3)").await, "103");
    exec(&c, "COMMIT").await;
    let third = value(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(third, second);
    // The new server has pgtide's statement, not the client's name.
    let names = value(
        &c,
        "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements",
    )
    .await;
    assert!(
        names.starts_with("pgtide_") && !names.contains('q'),
        "server-side names: {names}"
    );
}

// (6): neither session_state policy treats a PREPARE as session state any more: with
// "reject" it works, with "pin" the client is not pinned (another client gets the one
// server connection). Other forms keep the guard's treatment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_policies_leave_sql_prepare_alone() {
    let (db, _p, addr) = setup("sqlprep_reject", |c| {
        c.pgtide.pool_size = 1;
        c.pgtide.session_state = pgtide::config::SessionState::Reject;
    })
    .await;
    let c = app_at(addr, &db).await;
    exec(&c, "PREPARE p AS SELECT 'rejected no more'").await;
    assert_eq!(value(&c, "EXECUTE p").await, "rejected no more");
    exec(&c, "DEALLOCATE p").await;
    let e = to("multi", c.simple_query("SELECT 1; PREPARE p2 AS SELECT 2"))
        .await
        .expect_err("a PREPARE among other statements is still refused");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");

    let (db, _p, addr) = setup("sqlprep_pin", |c| c.pgtide.pool_size = 1).await;
    let a = app_at(addr, &db).await;
    exec(&a, "PREPARE p AS SELECT 'a''s'").await;
    let b = app_at(addr, &db).await;
    exec(&b, "PREPARE p AS SELECT 'b''s'").await;
    // pool_size 1: had A been pinned, B would wait for the server (and time out).
    assert_eq!(value(&b, "EXECUTE p").await, "b's");
    assert_eq!(value(&a, "EXECUTE p").await, "a's");
    assert_eq!(value(&b, "EXECUTE p").await, "b's");
}

// A database with a replica: a plain BEGIN is answered by pgtide and sent later, ahead
// of the statement that follows it (the answers must stay in order); a read-only
// transaction runs its EXECUTE on the replica, where pgtide prepares it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_after_a_deferred_begin_and_on_a_replica() {
    use pgtide::config::{Database, HostConfig, HostRole};
    let (db, _p, addr) = setup("sqlprep_routed", |c| {
        let name = c.databases.keys().next().expect("a database").clone();
        let d = c.databases.get_mut(&name).expect("the database");
        let host = |port, role| HostConfig {
            host: "127.0.0.1".into(),
            port,
            role,
            weight: 1,
        };
        *d = Database {
            hosts: Some(vec![
                host(harness::primary_port(), HostRole::Primary),
                host(harness::replica_port(), HostRole::Replica),
            ]),
            dbname: d.dbname.clone(),
            ..Database::default()
        };
        c.pgtide.pool_size = 1;
        c.pgtide.admin_users = vec![TRUST.to_string()];
        c.pgtide.primary_reads = false;
        c.pgtide.health_check_interval =
            pgtide::config::ConfigDuration(std::time::Duration::from_millis(100));
    })
    .await;
    let c = app_at(addr, &db).await;
    exec(
        &c,
        "PREPARE q (text) AS SELECT $1 || ' on ' || CASE WHEN pg_is_in_recovery() THEN 'replica' ELSE 'primary' END",
    )
    .await;
    let mut console = to("console", RawPg::login(addr, TRUST, "pgtide", &[])).await;
    for i in 0..5 {
        // A new server connection each time: the EXECUTE that follows the deferred
        // BEGIN carries the PREPARE, whose answers pgtide hides.
        console.simple("RECONNECT").await;
        exec(&c, "BEGIN").await;
        assert_eq!(
            value(&c, &format!("EXECUTE q('w{i}')")).await,
            format!("w{i} on primary")
        );
        exec(&c, "COMMIT").await;
    }
    // The same with the raw client, whose every message is seen.
    let mut raw = to("raw login", RawPg::login(addr, TRUST, &db, &[])).await;
    assert_eq!(
        run(&mut raw, "PREPARE q (text) AS SELECT $1 || '!'").await,
        ["tag PREPARE", "status I"]
    );
    for i in 0..3 {
        console.simple("RECONNECT").await;
        assert_eq!(run(&mut raw, "BEGIN").await, ["tag BEGIN", "status T"]);
        assert_eq!(
            run(&mut raw, &format!("EXECUTE q('{i}')")).await,
            [
                format!("row [Some(\"{i}!\")]"),
                "tag SELECT 1".into(),
                "status T".into()
            ]
        );
        assert_eq!(run(&mut raw, "COMMIT").await, ["tag COMMIT", "status I"]);
    }
    // The replica may need a moment before the monitor lets reads go there.
    let mut on = String::new();
    for _ in 0..100 {
        exec(&c, "BEGIN READ ONLY").await;
        on = value(&c, "EXECUTE q('r')").await;
        exec(&c, "COMMIT").await;
        if on == "r on replica" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(on, "r on replica");
    assert_eq!(value(&c, "EXECUTE q('a')").await, "a on primary");
}
