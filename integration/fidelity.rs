//! Fidelity: what PostgreSQL says reaches the client as PostgreSQL said it. Each case
//! runs against PostgreSQL directly first; pgtide must give the client the same.

use std::time::Duration;

use crate::harness;
use crate::rawpg::{self, Msg, RawPg};

const USER: &str = "pgtide_trust";

/// Reads until the connection ends; returns the first ErrorResponse.
async fn fatal_before_eof(c: &mut RawPg) -> Msg {
    let msgs = harness::to("the server's FATAL", c.until_eof()).await;
    msgs.into_iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse before the end")
}

/// `idle_in_transaction_session_timeout` ends a session idle in a transaction.
async fn idle_in_transaction_fatal(c: &mut RawPg) -> Msg {
    c.simple("SET idle_in_transaction_session_timeout = '300ms'")
        .await;
    c.simple("BEGIN").await;
    c.simple("SELECT 1").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    fatal_before_eof(c).await
}

/// The client's backend is terminated by someone else while it is in a transaction.
async fn terminated_fatal(c: &mut RawPg, db: &str) -> Msg {
    c.simple("BEGIN").await;
    let pid = c.one("SELECT pg_backend_pid()::text").await;
    harness::psql(
        harness::primary_port(),
        db,
        &format!("SELECT pg_terminate_backend({pid})"),
    );
    fatal_before_eof(c).await
}

fn shown(m: &Msg) -> (Option<String>, Option<String>, Option<String>) {
    (m.severity(), m.sqlstate(), m.message())
}

// A server's FATAL reaches the client with the server's severity, SQLSTATE and message
// (drivers map the SQLSTATE to an exception class), not rewritten into 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_fatal_reaches_the_client_as_the_server_sent_it() {
    let db = harness::fresh_database("fid_fatal");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 2;
    let pooler = harness::start_pgtide(cfg).await;
    let direct = harness::direct_addr(harness::primary_port());

    let mut d = RawPg::login(direct, USER, &db, &[]).await;
    let want = shown(&idle_in_transaction_fatal(&mut d).await);
    assert_eq!(want.1.as_deref(), Some("25P03"), "the reference: {want:?}");
    let mut p = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
    assert_eq!(shown(&idle_in_transaction_fatal(&mut p).await), want);

    let mut d = RawPg::login(direct, USER, &db, &[]).await;
    let want = shown(&terminated_fatal(&mut d, &db).await);
    assert_eq!(want.1.as_deref(), Some("57P01"), "the reference: {want:?}");
    let mut p = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
    assert_eq!(shown(&terminated_fatal(&mut p, &db).await), want);

    // The pool carries on.
    let mut q = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
    assert_eq!(q.one("SELECT 1").await, "1");
    let _ = rawpg::terminate();
}

use crate::routing::blocking;

// A PostgreSQL restart (without PAUSE) costs clients a delay, not their connections:
// queries sent while the server is down wait for it (up to query_wait_timeout) and run;
// one that waits longer gets an ERROR, not a FATAL, and its client carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_costs_clients_a_delay_not_their_connections() {
    use pgtide::demo::ClusterOptions;
    use std::sync::Arc;
    let lc = harness::own_cluster(ClusterOptions {
        users: vec![("rs".to_string(), "rspass".to_string(), false)],
        databases: vec!["rs".to_string()],
        with_replica: false,
    })
    .await;
    let lc = Arc::new(lc);
    let pooler_with = |wait: u64| {
        let mut cfg = harness::config_for("rs");
        let db = cfg.databases.get_mut("rs").unwrap();
        db.port = lc.primary_port;
        cfg.users.insert(
            "rs".to_string(),
            pgtide::config::User {
                password: Some("rspass".to_string()),
                ..pgtide::config::User::default()
            },
        );
        cfg.pgtide.pool_size = 2;
        cfg.pgtide.query_wait_timeout = pgtide::config::ConfigDuration::secs(wait);
        harness::start_pgtide(cfg)
    };
    let patient = pooler_with(30).await;
    let hasty = pooler_with(1).await;
    let conn = |addr| harness::tcp_connect_string(addr, "rs", "rspass", "rs");
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = harness::connect(&conn(patient.local_addr()))
            .await
            .expect("login");
        c.simple_query("SELECT 1")
            .await
            .expect("before the restart");
        clients.push(Arc::new(c));
    }
    let quick = harness::connect(&conn(hasty.local_addr()))
        .await
        .expect("login");
    quick
        .simple_query("SELECT 1")
        .await
        .expect("before the restart");

    // No cluster may start on the port while it is free (it is used again below).
    let ports = harness::CLUSTER_PORTS.lock().await;
    let l = lc.clone();
    blocking(move || crate::cluster::pg_ctl(&l, "primary", &["-m", "fast", "-w", "stop"])).await;
    // Queries sent while PostgreSQL is down.
    let running: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.simple_query("SELECT 42").await.map(|_| ()) })
        })
        .collect();
    // The hasty pooler gives up after its query_wait_timeout, with an ERROR.
    let e = harness::to("the hasty query", quick.simple_query("SELECT 1"))
        .await
        .expect_err("no server within 1 s");
    let db = e
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.severity(), "ERROR", "{db:?}");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(!quick.is_closed(), "the client lost its connection");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = lc.clone();
    blocking(move || {
        crate::cluster::pg_ctl_start(&l, "primary");
    })
    .await;
    drop(ports);
    for r in running {
        harness::to("a query sent during the restart", r)
            .await
            .expect("task")
            .expect("the query ran once PostgreSQL was back");
    }
    for c in &clients {
        c.simple_query("SELECT 1").await.expect("after the restart");
    }
    harness::to(
        "the hasty client after the restart",
        quick.simple_query("SELECT 1"),
    )
    .await
    .expect("the client that got the ERROR carries on");
}

fn login_value(c: &RawPg, name: &str) -> Option<String> {
    c.login_params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

// client_encoding from the startup packet is reported back as PostgreSQL spells it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoding_is_reported_as_postgresql_spells_it() {
    let db = harness::fresh_database("fid_enc");
    let pooler = harness::start_pgtide(harness::config_for(&db)).await;
    let direct = harness::direct_addr(harness::primary_port());
    for asked in ["utf8", "euc_jp", "Unicode", "LATIN1"] {
        let extra = [("client_encoding", asked)];
        let mut d = RawPg::login(direct, USER, &db, &extra).await;
        let mut p = RawPg::login(pooler.local_addr(), USER, &db, &extra).await;
        let want = login_value(&d, "client_encoding");
        assert!(
            want.is_some(),
            "{asked}: PostgreSQL reports client_encoding"
        );
        assert_eq!(
            login_value(&p, "client_encoding"),
            want,
            "{asked}: at login"
        );
        assert_eq!(
            p.one("SHOW client_encoding").await,
            d.one("SHOW client_encoding").await,
            "{asked}: SHOW"
        );
    }
}

/// The next NotificationResponse on `c` (sending `SELECT 1` to collect it).
async fn next_notification(c: &mut RawPg) -> Msg {
    for _ in 0..20 {
        c.send(&rawpg::query("SELECT 1")).await;
        if let Some(n) = c.until_ready().await.into_iter().find(|m| m.tag == b'A') {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no notification arrived");
}

fn notification_pid(m: &Msg) -> i32 {
    i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]])
}

// A notification names its sender with the PID the sender was given (BackendKeyData),
// as directly, so that a driver can tell its own notifications from others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_name_the_sender_by_the_pid_it_was_given() {
    let db = harness::fresh_database("fid_notify");
    for mode in [
        pgtide::config::PoolMode::Transaction,
        pgtide::config::PoolMode::Session,
    ] {
        let mut cfg = harness::config_for(&db);
        cfg.pgtide.pool_mode = mode;
        cfg.pgtide.pool_size = 3;
        let pooler = harness::start_pgtide(cfg).await;
        let mut listener = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        let mut sender = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        let key = RawPg::key_pid;
        listener.simple("LISTEN fid_channel").await;
        // Its own notification.
        listener
            .send(&rawpg::query("NOTIFY fid_channel, 'mine'"))
            .await;
        let n = match listener
            .until_ready()
            .await
            .into_iter()
            .find(|m| m.tag == b'A')
        {
            Some(n) => n,
            None => next_notification(&mut listener).await,
        };
        assert_eq!(
            notification_pid(&n),
            key(&listener),
            "{mode:?}: own notification"
        );
        // Another client's, inside and outside a transaction.
        sender.simple("NOTIFY fid_channel, 'theirs'").await;
        let n = next_notification(&mut listener).await;
        assert_eq!(
            notification_pid(&n),
            key(&sender),
            "{mode:?}: another client's"
        );
        sender
            .simple("BEGIN; NOTIFY fid_channel, 'tx'; COMMIT")
            .await;
        let n = next_notification(&mut listener).await;
        assert_eq!(
            notification_pid(&n),
            key(&sender),
            "{mode:?}: in a transaction"
        );
    }
}

/// The PIDs of the postmaster of `data` and of its children.
fn postgres_pids(data: &std::path::Path) -> Vec<i32> {
    let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster];
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

fn signal_all(pids: &[i32], sig: libc::c_int) {
    for &p in pids {
        // SAFETY: kill(2) on PIDs read just now from the cluster this test started.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

// query_timeout: a query running longer is cancelled on the server (57014, the client
// stays); a server that stops answering altogether (SIGSTOP) is disconnected and the
// client told 57014 as an ERROR, and carries on once PostgreSQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_and_survives_a_frozen_server() {
    use pgtide::demo::ClusterOptions;
    let lc = harness::own_cluster(ClusterOptions {
        users: vec![("qt".to_string(), "qtpass".to_string(), false)],
        databases: vec!["qt".to_string()],
        with_replica: false,
    })
    .await;
    let mut cfg = harness::config_for("qt");
    cfg.databases.get_mut("qt").unwrap().port = lc.primary_port;
    cfg.users.insert(
        "qt".to_string(),
        pgtide::config::User {
            password: Some("qtpass".to_string()),
            ..pgtide::config::User::default()
        },
    );
    cfg.pgtide.query_timeout = pgtide::config::ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let conn = harness::tcp_connect_string(pooler.local_addr(), "qt", "qtpass", "qt");
    let c = harness::connect(&conn).await.expect("login");
    c.simple_query("SELECT 1").await.expect("a quick query");

    let e = harness::to("a long query", c.simple_query("SELECT pg_sleep(20)"))
        .await
        .expect_err("cancelled by query_timeout");
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "57014", "{db:?}");
    assert_eq!(db.severity(), "ERROR");
    c.simple_query("SELECT 1")
        .await
        .expect("the client carries on");

    // PostgreSQL frozen: the cancel cannot be answered either.
    let pids = postgres_pids(&lc.dir.join("primary"));
    signal_all(&pids, libc::SIGSTOP);
    let started = std::time::Instant::now();
    let r = harness::to("a query to a frozen server", c.simple_query("SELECT 2")).await;
    let waited = started.elapsed();
    signal_all(&pids, libc::SIGCONT);
    let e = r.expect_err("no answer from a frozen server");
    let db = e
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.code().code(), "57014", "{db:?}");
    assert_eq!(db.severity(), "ERROR", "{db:?}");
    assert!(db.message().contains("query_timeout"), "{db:?}");
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
    assert!(!c.is_closed());
    let rows = harness::to("after the freeze", c.simple_query("SELECT 3"))
        .await
        .expect("the client carries on once PostgreSQL is back");
    assert!(!rows.is_empty());
}

// transaction_timeout: a transaction (or autocommit statement) that lasts longer ends the
// client's session with 25P04; short transactions, however many, are never affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_timeout_ends_long_transactions_only() {
    let db = harness::fresh_database("fid_txt");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.transaction_timeout = pgtide::config::ConfigDuration::secs(1);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    // Many short transactions over more than the timeout.
    let mut quick = RawPg::login(addr, USER, &db, &[]).await;
    for i in 0..15 {
        quick.simple("BEGIN").await;
        assert_eq!(quick.one(&format!("SELECT {i}")).await, i.to_string());
        quick.simple("COMMIT").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(quick);

    // An open transaction left idle past the timeout.
    let mut idle = RawPg::login(addr, USER, &db, &[]).await;
    idle.simple("BEGIN").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let f = fatal_before_eof(&mut idle).await;
    assert_eq!(f.sqlstate().as_deref(), Some("25P04"), "{:?}", f.message());
    assert_eq!(f.severity().as_deref(), Some("FATAL"));

    // An autocommit statement running past it.
    let mut long = RawPg::login(addr, USER, &db, &[]).await;
    long.send(&rawpg::query("SELECT pg_sleep(5)")).await;
    let started = std::time::Instant::now();
    let f = fatal_before_eof(&mut long).await;
    assert_eq!(f.sqlstate().as_deref(), Some("25P04"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The one server connection serves the next client.
    let mut next = RawPg::login(addr, USER, &db, &[]).await;
    assert_eq!(next.one("SELECT 'fine'").await, "fine");
}
