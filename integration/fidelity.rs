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
