//! Read/write routing against the harness's real primary and hot standby. Where a
//! statement ran is proven by the statement itself (`pg_is_in_recovery()`), never by
//! pgtide's own account.

use pgtide::config::{Database, HostConfig, HostRole, Route};
use tokio_postgres::Client;

use crate::harness::{self, to, APP_PASSWORD, APP_USER};

/// A pgtide whose database lists the primary and the replica (reads to the replica
/// only: `primary_reads = false`).
async fn routed(
    prefix: &str,
    tweak: impl FnOnce(&mut pgtide::config::Config),
) -> (String, pgtide::Pooler) {
    let (db, pooler, _) = harness::setup(prefix, |c| {
        let name = c.databases.keys().next().expect("a database").clone();
        let d = c.databases.get_mut(&name).expect("the database");
        let dbname = d.dbname.clone();
        *d = Database {
            hosts: Some(vec![
                HostConfig {
                    host: "127.0.0.1".into(),
                    port: harness::primary_port(),
                    role: HostRole::Primary,
                    weight: 1,
                },
                HostConfig {
                    host: "127.0.0.1".into(),
                    port: harness::replica_port(),
                    role: HostRole::Replica,
                    weight: 1,
                },
            ]),
            dbname,
            ..Database::default()
        };
        c.pgtide.primary_reads = false;
        c.pgtide.health_check_interval =
            pgtide::config::ConfigDuration(std::time::Duration::from_millis(100));
        tweak(c);
    })
    .await;
    (db, pooler)
}

pub(crate) async fn app(pooler: &pgtide::Pooler, db: &str) -> Client {
    harness::app_at(pooler.local_addr(), db).await
}

/// Runs `sql` (simple protocol) and returns the first column of its last row.
async fn last_value(c: &Client, sql: &str) -> String {
    let msgs = to(sql, c.simple_query(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .last()
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Waits until the monitor has seen the replica (reads go there once it is up).
async fn until_replica_serves(c: &Client) {
    for _ in 0..100 {
        if last_value(c, "SELECT pg_is_in_recovery()").await == "t" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("reads never reached the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let (db, pooler) = routed("route_basic", |_| {}).await;
    harness::psql(
        harness::primary_port(),
        &db,
        "CREATE TABLE t (id int); CREATE SEQUENCE s",
    );
    harness::wait_replica_caught_up();
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    // Autocommit reads: the replica.
    assert_eq!(last_value(&c, "SELECT pg_is_in_recovery()").await, "t");
    let row = to(
        "extended read",
        c.query_one("SELECT pg_is_in_recovery()", &[]),
    )
    .await
    .expect("read");
    assert!(
        row.get::<_, bool>(0),
        "an extended-protocol read runs on the replica"
    );
    // Writes, and reads that write, run on the primary.
    for sql in [
        "INSERT INTO t VALUES (1) RETURNING pg_is_in_recovery()",
        "WITH d AS (DELETE FROM t RETURNING 1) SELECT pg_is_in_recovery() FROM (SELECT 1) x",
        "SELECT nextval('s'), pg_is_in_recovery()",
        "SELECT pg_is_in_recovery() FROM t FOR UPDATE",
        "/* pgtide: primary */ SELECT pg_is_in_recovery()",
    ] {
        let msgs = to(sql, c.simple_query(sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let v = r.get(r.len() - 1).unwrap_or("");
                assert_eq!(v, "f", "{sql} ran on a replica");
            }
        }
    }
    // An explicit transaction runs on the primary; a read-only one on the replica.
    assert_eq!(
        last_value(&c, "BEGIN; SELECT pg_is_in_recovery(); COMMIT").await,
        "f"
    );
    assert_eq!(
        last_value(&c, "BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT").await,
        "t"
    );
    assert_eq!(
        last_value(
            &c,
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_is_in_recovery(); COMMIT"
        )
        .await,
        "t"
    );
    to("begin", c.batch_execute("BEGIN")).await.expect("begin");
    assert_eq!(
        last_value(&c, "SELECT pg_is_in_recovery()").await,
        "f",
        "inside BEGIN: primary"
    );
    to("commit", c.batch_execute("COMMIT"))
        .await
        .expect("commit");
    // BEGIN READ ONLY through the extended protocol (as pgjdbc sends it): the replica.
    to("begin ro", c.execute("BEGIN READ ONLY", &[]))
        .await
        .expect("extended BEGIN READ ONLY");
    let r = to(
        "read in ro tx",
        c.query_one("SELECT pg_is_in_recovery()", &[]),
    )
    .await
    .expect("read");
    assert!(
        r.get::<_, bool>(0),
        "a read-only transaction begun by Parse/Bind/Execute runs on the replica"
    );
    to("commit", c.execute("COMMIT", &[]))
        .await
        .expect("commit");
    // A prepared read goes to the replica, and runs there again later.
    let stmt = to("prepare", c.prepare("SELECT pg_is_in_recovery()"))
        .await
        .expect("prepare");
    for _ in 0..3 {
        let r = to("run", c.query_one(&stmt, &[])).await.expect("run");
        assert!(r.get::<_, bool>(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_replica_refuses_runs_on_the_primary() {
    let (db, pooler) = routed("route_25006", |_| {}).await;
    harness::psql(
        harness::primary_port(),
        &db,
        "CREATE TABLE t (id int); \
         CREATE FUNCTION f() RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (1) RETURNING 1'",
    );
    harness::wait_replica_caught_up();
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    // SELECT f() looks like a read, goes to the replica, which refuses it (25006): it
    // runs again on the primary before the client sees anything.
    assert_eq!(last_value(&c, "SELECT f()").await, "1");
    let row = to("extended", c.query_one("SELECT f()", &[]))
        .await
        .expect("extended SELECT f()");
    assert_eq!(row.get::<_, i32>(0), 1);
    let n = harness::psql(harness::primary_port(), &db, "SELECT count(*) FROM t");
    assert_eq!(n.trim(), "2", "both calls inserted on the primary");
    // Reads still go to the replica afterwards.
    assert_eq!(last_value(&c, "SELECT pg_is_in_recovery()").await, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_write_after_reads_waits_for_the_primary() {
    let (db, pooler) = routed("route_pipeline", |_| {}).await;
    harness::psql(harness::primary_port(), &db, "CREATE TABLE t (id int)");
    harness::wait_replica_caught_up();
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    // tokio-postgres pipelines these: reads and a write in flight together. None may
    // fail with 25006 (a write on the replica).
    let read = c.query_one("SELECT pg_is_in_recovery()", &[]);
    let write = c.execute("INSERT INTO t VALUES (1)", &[]);
    let read2 = c.query_one("SELECT count(*) FROM t", &[]);
    let (r, w, _r2) = to("pipeline", async { tokio::join!(read, write, read2) }).await;
    r.expect("read");
    assert_eq!(w.expect("the write reached the primary"), 1);
    let n = harness::psql(harness::primary_port(), &db, "SELECT count(*) FROM t");
    assert_eq!(n.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_can_be_sent_to_the_primary_or_the_replica() {
    let (db, pooler) = routed("route_user", |c| {
        c.users.get_mut(APP_USER).expect("app").route = Some(Route::Primary);
    })
    .await;
    let c = app(&pooler, &db).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..5 {
        assert_eq!(
            last_value(&c, "SELECT pg_is_in_recovery()").await,
            "f",
            "route = primary"
        );
    }
    drop(pooler);
    let (db, pooler) = routed("route_user_replica", |c| {
        c.users.get_mut(APP_USER).expect("app").route = Some(Route::Replica);
    })
    .await;
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    assert_eq!(
        last_value(&c, "BEGIN; SELECT pg_is_in_recovery(); COMMIT").await,
        "t",
        "route = replica sends even explicit transactions to the replica"
    );
}

/// Runs blocking work (psql, pg_ctl) off the runtime's threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking work")
}

/// Polls `sql` on `c` until its last value is `want` (each attempt must succeed).
async fn until_value(c: &Client, sql: &str, want: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(45);
    loop {
        if last_value(c, sql).await == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never happened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Lag, a replica outage and a failover, on a primary and replica of the test's own
/// (pausing replay on the shared cluster would stall every other test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_outage_and_failover_keep_clients_working() {
    let lc = own_cluster().await;
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let pooler = routed_own(&lc, |c| {
        c.pgtide.max_replica_lag_bytes = 1024 * 1024;
        c.pgtide.health_check_failures = 2;
        c.pgtide.server_connect_retries = 0;
    })
    .await;
    let c = app(&pooler, "rt").await;
    until_value(
        &c,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads reach the replica",
    )
    .await;

    // Replay paused and ~13 MB written: the replica is beyond max_replica_lag_bytes, so
    // reads leave it (for the primary) without any error; resumed, they come back.
    let l = lc.clone();
    blocking(move || {
        l.psql(rport, "rt", "SELECT pg_wal_replay_pause()").expect("pause");
        l.psql(
            pport,
            "rt",
            "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 100000) g",
        )
        .expect("write");
    })
    .await;
    until_value(
        &c,
        "SELECT pg_is_in_recovery()",
        "f",
        "reads leave the lagging replica",
    )
    .await;
    let l = lc.clone();
    blocking(move || {
        l.psql(rport, "rt", "SELECT pg_wal_replay_resume()")
            .expect("resume")
    })
    .await;
    until_value(
        &c,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads return to the caught-up replica",
    )
    .await;

    // The replica stops: reads fall back to the primary; the client stays connected.
    let l = lc.clone();
    blocking(move || crate::cluster::pg_ctl(&l, "replica", &["-m", "fast", "-w", "stop"])).await;
    until_value(
        &c,
        "SELECT pg_is_in_recovery()",
        "f",
        "reads fall back to the primary",
    )
    .await;
    let l = lc.clone();
    blocking(move || {
        crate::cluster::pg_ctl_start(&l, "replica");
    })
    .await;
    until_value(
        &c,
        "SELECT pg_is_in_recovery()",
        "t",
        "the restarted replica serves reads",
    )
    .await;

    // Failover: the primary stops and the replica is promoted. The idle client `c`, never
    // reconnected, writes to the new primary.
    let idle = app(&pooler, "rt").await;
    let l = lc.clone();
    blocking(move || {
        crate::cluster::pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"]);
        crate::cluster::pg_ctl(&l, "replica", &["-w", "promote"]);
    })
    .await;
    // Probe with fresh connections until the new primary takes writes.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(45);
    loop {
        let s = harness::tcp_connect_string(pooler.local_addr(), APP_USER, APP_PASSWORD, "rt");
        if let Ok(p) = harness::connect(&s).await {
            if p.batch_execute("CREATE TABLE IF NOT EXISTS after_failover (v int)")
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes never reached the promoted replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for client in [&c, &idle] {
        assert_eq!(
            last_value(
                client,
                "INSERT INTO after_failover VALUES (1) RETURNING pg_is_in_recovery()"
            )
            .await,
            "f",
            "a write through an existing client reaches the new primary"
        );
    }
}

/// A primary and streaming replica of the test's own, with user app and database `rt`
/// (pausing replay or stopping servers of the shared cluster would stall other tests).
pub(crate) async fn own_cluster() -> std::sync::Arc<pgtide::demo::LocalCluster> {
    use pgtide::demo::ClusterOptions;
    let lc = harness::own_cluster(ClusterOptions {
        users: vec![(APP_USER.to_string(), APP_PASSWORD.to_string(), true)],
        databases: vec!["rt".to_string()],
        with_replica: true,
    })
    .await;
    std::sync::Arc::new(lc)
}

/// A pgtide in front of `lc` (both hosts `auto`), with `tweak` applied.
pub(crate) async fn routed_own(
    lc: &pgtide::demo::LocalCluster,
    tweak: impl FnOnce(&mut pgtide::config::Config),
) -> pgtide::Pooler {
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let mut config = harness::config_for("rt");
    let host = |port| HostConfig {
        host: "127.0.0.1".into(),
        port,
        role: HostRole::Auto,
        weight: 1,
    };
    *config.databases.get_mut("rt").expect("rt") = Database {
        hosts: Some(vec![host(pport), host(rport)]),
        ..Database::default()
    };
    config.pgtide.primary_reads = false;
    config.pgtide.health_check_interval =
        pgtide::config::ConfigDuration(std::time::Duration::from_millis(100));
    tweak(&mut config);
    harness::start_pgtide(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_sees_its_own_write() {
    use pgtide::config::{ConfigDuration, ReadYourWrites};
    let lc = own_cluster().await;
    let (pport, rport) = (lc.primary_port, lc.replica_port.expect("a replica"));
    let l = lc.clone();
    blocking(move || {
        l.psql(pport, "rt", "CREATE TABLE t (v int)")
            .expect("create");
        l.wait_replica_caught_up().expect("caught up");
    })
    .await;
    // No lag limits: a paused replica stays eligible, so only read-your-writes keeps a
    // client's read off it.
    let no_limits = |c: &mut pgtide::config::Config| {
        c.pgtide.max_replica_lag_bytes = 0;
        c.pgtide.max_replica_lag = ConfigDuration::secs(0);
    };
    let with_ryw = routed_own(&lc, |c| {
        no_limits(c);
        c.pgtide.read_your_writes = ReadYourWrites::Lsn;
    })
    .await;
    let without = routed_own(&lc, no_limits).await;
    let a = app(&with_ryw, "rt").await;
    let b = app(&without, "rt").await;
    until_value(
        &a,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads reach the replica",
    )
    .await;
    until_value(
        &b,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads reach the replica",
    )
    .await;

    let l = lc.clone();
    blocking(move || {
        l.psql(rport, "rt", "SELECT pg_wal_replay_pause()")
            .expect("pause")
    })
    .await;
    // Each client writes (on the primary), then reads at once.
    assert_eq!(
        last_value(&a, "INSERT INTO t VALUES (1) RETURNING pg_is_in_recovery()").await,
        "f"
    );
    assert_eq!(
        last_value(&a, "SELECT count(*) FROM t").await,
        "1",
        "read_your_writes = lsn: the client sees its own write"
    );
    assert_eq!(
        last_value(&b, "INSERT INTO t VALUES (2) RETURNING pg_is_in_recovery()").await,
        "f"
    );
    assert_eq!(
        last_value(&b, "SELECT count(*) FROM t").await,
        "0",
        "read_your_writes = off: the paused replica answers, without the writes (this is what the \
         other client is protected from)"
    );
    // The read kept off the replica is counted, by the pgtide that did it only.
    let held = |s: std::collections::HashMap<String, f64>| {
        s.get(&format!(
            "pgtide_routing_read_your_writes_total{{database=\"rt\",user=\"{APP_USER}\"}}"
        ))
        .copied()
    };
    let maddr = |p: &pgtide::Pooler| p.metrics_addr().expect("the metrics endpoint is on");
    assert!(held(crate::metrics::scrape(maddr(&with_ryw)).await) >= Some(1.0));
    assert_eq!(
        held(crate::metrics::scrape(maddr(&without)).await),
        Some(0.0)
    );
    let l = lc.clone();
    blocking(move || {
        l.psql(rport, "rt", "SELECT pg_wal_replay_resume()")
            .expect("resume")
    })
    .await;
    // Once the replica has replayed it, reads go back to the replica.
    until_value(
        &a,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads return to the replica",
    )
    .await;
    assert_eq!(last_value(&a, "SELECT count(*) FROM t").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_replica_falls_back_or_fails_as_configured() {
    use pgtide::config::ReplicaFallback;
    // The "replica" is a port nobody listens on: the monitor marks it down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let with_dead_replica = |fallback: ReplicaFallback| {
        move |c: &mut pgtide::config::Config| {
            let d = c.databases.values_mut().next().expect("a database");
            if let Some(hosts) = d.hosts.as_mut() {
                hosts[1].port = closed.port();
            }
            c.pgtide.replica_fallback = fallback;
            c.pgtide.health_check_failures = 1;
        }
    };
    let (db, pooler) = routed(
        "route_fallback",
        with_dead_replica(ReplicaFallback::Primary),
    )
    .await;
    let c = app(&pooler, &db).await;
    for _ in 0..5 {
        assert_eq!(
            last_value(&c, "SELECT pg_is_in_recovery()").await,
            "f",
            "reads fall back to the primary"
        );
    }
    // Counted as fallbacks (the monitor may not have marked the replica down before the
    // first read: then that read tried the replica, could not connect, and fell back).
    let m = crate::metrics::scrape(pooler.metrics_addr().expect("metrics")).await;
    let outcome = |o: &str| {
        m.get(&format!(
            "pgtide_routing_decisions_total{{database=\"{db}\",outcome=\"{o}\",user=\"{APP_USER}\"}}"
        ))
        .copied()
    };
    assert_eq!(outcome("fallback"), Some(5.0));
    assert_eq!(outcome("replica"), Some(0.0));
    let (db, pooler) = routed(
        "route_fallback_err",
        with_dead_replica(ReplicaFallback::Error),
    )
    .await;
    let s = harness::tcp_connect_string(pooler.local_addr(), APP_USER, APP_PASSWORD, &db);
    let (c, conn) = to(
        "connect",
        tokio_postgres::connect(&s, tokio_postgres::NoTls),
    )
    .await
    .expect("connect");
    let driver = tokio::spawn(conn);
    // Give the monitor a moment to see the replica down, then read.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let e = to("read", c.simple_query("SELECT 1"))
        .await
        .expect_err("no replica, no fallback");
    let end = to("connection end", driver).await.expect("driver");
    let code = e
        .code()
        .cloned()
        .or_else(|| end.err().and_then(|e| e.code().cloned()));
    assert_eq!(
        code,
        Some(tokio_postgres::error::SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
        "{e:?}"
    );
}

/// 50 clients mixing TPC-B transactions (writes) and select-only reads for 20 s: no
/// failed transaction, reads served by the replica, and no write ever attempted there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_has_no_errors_and_no_writes_on_the_replica() {
    let (db, pooler) = routed("route_mixed", |c| c.pgtide.pool_size = 10).await;
    crate::pgbench::init(harness::primary_port(), &db).await;
    harness::wait_replica_caught_up();
    let replica_stats = || {
        let out = harness::psql(
            harness::replica_port(),
            "postgres",
            &format!(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = '{db}'"
            ),
        );
        let mut it = out
            .trim()
            .split('|')
            .map(|v| v.parse::<i64>().expect("a number"));
        (it.next().expect("commits"), it.next().expect("rollbacks"))
    };
    let (commits_before, rollbacks_before) = replica_stats();
    let (ok, out, err) = crate::pgbench::pgbench(
        pooler.local_addr().port(),
        &db,
        &[
            "-c",
            "50",
            "-j",
            "2",
            "-T",
            "20",
            "-n",
            "-b",
            "tpcb-like@1",
            "-b",
            "select-only@4",
        ],
    )
    .await;
    assert!(ok, "pgbench failed:\n{out}\n{err}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(
        !out.contains("aborted") && !err.contains("aborted"),
        "{out}\n{err}"
    );
    // Statistics reach pg_stat_database within a second or so.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (commits, rollbacks) = replica_stats();
    assert!(
        commits - commits_before > 100,
        "the replica served reads ({commits_before} -> {commits})"
    );
    // Reads leave the primary alone while the replica is up (primary_reads = false by
    // default): at least 90% of the select-only transactions ran on the replica (its
    // commit count also holds the health checks, a few dozen).
    let reads: i64 = out
        .split("select only>")
        .nth(1)
        .and_then(|rest| rest.split(" transactions").next())
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no select-only count in pgbench's output:\n{out}"));
    assert!(
        (commits - commits_before) * 10 >= reads * 9,
        "only {} of {reads} reads ran on the replica",
        commits - commits_before
    );
    assert_eq!(
        rollbacks - rollbacks_before,
        0,
        "a write was attempted on the replica"
    );
    // And the primary kept pgbench's invariant.
    let sum = |t: &str, c: &str| {
        harness::psql(
            harness::primary_port(),
            &db,
            &format!("SELECT sum({c}) FROM {t}"),
        )
        .trim()
        .to_string()
    };
    assert_eq!(
        sum("pgbench_accounts", "abalance"),
        sum("pgbench_tellers", "tbalance")
    );
    assert_eq!(
        sum("pgbench_branches", "bbalance"),
        sum("pgbench_history", "delta")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_transaction_read_only_after_begin_goes_to_the_replica() {
    let (db, pooler) = routed("route_settx", |_| {}).await;
    harness::psql(harness::primary_port(), &db, "CREATE TABLE t (v int)");
    harness::wait_replica_caught_up();
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    // BEGIN, then SET TRANSACTION READ ONLY as its own statement: a replica.
    to("begin", c.batch_execute("BEGIN")).await.expect("begin");
    to("set", c.batch_execute("SET TRANSACTION READ ONLY"))
        .await
        .expect("set");
    assert_eq!(last_value(&c, "SELECT pg_is_in_recovery()").await, "t");
    assert_eq!(last_value(&c, "SHOW transaction_read_only").await, "on");
    to("commit", c.batch_execute("COMMIT"))
        .await
        .expect("commit");
    // BEGIN, then anything else: the primary, one transaction.
    to("begin", c.batch_execute("BEGIN")).await.expect("begin");
    assert_eq!(last_value(&c, "SELECT pg_is_in_recovery()").await, "f");
    to("insert", c.batch_execute("INSERT INTO t VALUES (1)"))
        .await
        .expect("insert");
    to("rollback", c.batch_execute("ROLLBACK"))
        .await
        .expect("rollback");
    let n = harness::psql(harness::primary_port(), &db, "SELECT count(*) FROM t");
    assert_eq!(
        n.trim(),
        "0",
        "the rolled-back insert was in the transaction BEGIN started"
    );
    // BEGIN then COMMIT with nothing in between works too, and so does the extended
    // protocol inside the transaction.
    to("begin", c.batch_execute("BEGIN")).await.expect("begin");
    to("commit", c.batch_execute("COMMIT"))
        .await
        .expect("commit");
    to("begin", c.batch_execute("BEGIN")).await.expect("begin");
    let r = to("extended", c.query_one("SELECT pg_is_in_recovery()", &[]))
        .await
        .expect("read");
    assert!(
        !r.get::<_, bool>(0),
        "a transaction without READ ONLY runs on the primary"
    );
    to("commit", c.batch_execute("COMMIT"))
        .await
        .expect("commit");
}

/// The routing counters by outcome match what the client sent, and the host gauges show
/// the primary and the replica up in their roles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_host_metrics_match_what_was_sent() {
    use crate::metrics::scrape;
    let (db, pooler) = routed("route_metrics", |_| {}).await;
    harness::psql(
        harness::primary_port(),
        &db,
        "CREATE TABLE t (id int); \
         CREATE FUNCTION f() RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (1) RETURNING 1'",
    );
    harness::wait_replica_caught_up();
    let c = app(&pooler, &db).await;
    until_replica_serves(&c).await;
    let maddr = pooler.metrics_addr().expect("the metrics endpoint is on");
    let outcome = |s: &std::collections::HashMap<String, f64>, o: &str| {
        let key = format!(
            "pgtide_routing_decisions_total{{database=\"{db}\",outcome=\"{o}\",user=\"{APP_USER}\"}}"
        );
        *s.get(&key).unwrap_or_else(|| panic!("no sample {key}"))
    };
    let before = scrape(maddr).await;

    for _ in 0..5 {
        assert_eq!(last_value(&c, "SELECT pg_is_in_recovery()").await, "t");
    }
    // Looks like a read: the replica refuses it (25006), it runs again on the primary.
    assert_eq!(last_value(&c, "SELECT f()").await, "1");
    for _ in 0..3 {
        assert_eq!(
            last_value(&c, "INSERT INTO t VALUES (2) RETURNING pg_is_in_recovery()").await,
            "f"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            last_value(&c, "/* pgtide: primary */ SELECT pg_is_in_recovery()").await,
            "f"
        );
    }

    let after = scrape(maddr).await;
    let delta = |o: &str| outcome(&after, o) - outcome(&before, o);
    assert_eq!(delta("replica"), 6.0, "5 reads and SELECT f()'s first try");
    assert_eq!(
        delta("retried_primary"),
        1.0,
        "SELECT f() again, on the primary"
    );
    assert_eq!(delta("primary"), 3.0, "the INSERTs");
    assert_eq!(delta("hint"), 2.0, "the hinted SELECTs");
    assert_eq!(delta("fallback"), 0.0);
    let ryw =
        format!("pgtide_routing_read_your_writes_total{{database=\"{db}\",user=\"{APP_USER}\"}}");
    assert_eq!(after.get(&ryw), Some(&0.0), "read_your_writes is off");

    let (p, r) = (
        format!("127.0.0.1:{}", harness::primary_port()),
        format!("127.0.0.1:{}", harness::replica_port()),
    );
    let host = |name: &str, host: &str, extra: &str| {
        let key = format!("{name}{{database=\"{db}\",host=\"{host}\"{extra}}}");
        *after.get(&key).unwrap_or_else(|| panic!("no sample {key}"))
    };
    assert_eq!(host("pgtide_host_up", &p, ""), 1.0);
    assert_eq!(host("pgtide_host_up", &r, ""), 1.0);
    assert_eq!(host("pgtide_host_role", &p, ",role=\"primary\""), 1.0);
    assert_eq!(host("pgtide_host_role", &p, ",role=\"replica\""), 0.0);
    assert_eq!(host("pgtide_host_role", &r, ",role=\"replica\""), 1.0);
    assert_eq!(host("pgtide_host_role", &r, ",role=\"primary\""), 0.0);
    assert_eq!(host("pgtide_host_health", &r, ",state=\"up\""), 1.0);
    assert!(host("pgtide_host_replay_lag_bytes", &r, "") >= 0.0);
    assert!(host("pgtide_host_replay_lag_seconds", &r, "") >= 0.0);
    assert!(
        !after.contains_key(&format!(
            "pgtide_host_replay_lag_bytes{{database=\"{db}\",host=\"{p}\"}}"
        )),
        "the primary has no replay lag"
    );
    // Server connections are counted on the host they are open to.
    let servers = |h: &str| {
        ["active", "idle"]
            .iter()
            .map(|st| {
                let key = format!(
                    "pgtide_servers{{database=\"{db}\",host=\"{h}\",state=\"{st}\",user=\"{APP_USER}\"}}"
                );
                *after.get(&key).unwrap_or_else(|| panic!("no sample {key}"))
            })
            .sum::<f64>()
    };
    assert!(servers(&p) >= 1.0, "a server connection to the primary");
    assert!(servers(&r) >= 1.0, "a server connection to the replica");
}

// The primary stops under a read load while the replica is up: no read fails (reads stay
// on the replica by default, before and after the monitor marks the primary down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_fail_while_the_primary_is_down_and_a_replica_is_up() {
    // The default (reads stay on the replica), and primary_reads = true (a read sent to
    // the primary that cannot be reached runs on the replica; the primary is marked down
    // on the spot).
    for primary_reads in [false, true] {
        reads_survive_a_primary_outage(primary_reads).await;
    }
}

async fn reads_survive_a_primary_outage(primary_reads: bool) {
    let lc = own_cluster().await;
    let pooler = routed_own(&lc, |c| {
        c.pgtide.primary_reads = primary_reads;
        // Slow checks: the outage is noticed by the clients' connects, not the monitor.
        c.pgtide.health_check_interval = pgtide::config::ConfigDuration::secs(1);
        c.pgtide.health_check_failures = 5;
    })
    .await;
    let probe = app(&pooler, "rt").await;
    until_value(
        &probe,
        "SELECT pg_is_in_recovery()",
        "t",
        "reads reach the replica",
    )
    .await;
    let stop_primary = || {
        let l = lc.clone();
        blocking(move || crate::cluster::pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"]))
    };
    if primary_reads {
        // Reads running on the primary when it stops fail there as they would directly
        // (PostgreSQL ends their sessions); the reads that count are those sent after.
        stop_primary().await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let c = app(&pooler, "rt").await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.simple_query("SELECT 7").await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed.push(format!("{e:?}"));
                        break;
                    }
                }
            }
            (ok, failed)
        }));
    }
    if !primary_reads {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        stop_primary().await;
    }
    // Reads go on through the outage, past the monitor marking the primary down.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for r in readers {
        let (o, f) = to("a reader", r).await.expect("reader task");
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "primary_reads = {primary_reads}: {} reads failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} reads ran");
    assert_eq!(
        last_value(&probe, "SELECT pg_is_in_recovery()").await,
        "t",
        "after the outage, reads still run on the replica"
    );
}
