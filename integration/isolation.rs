//! Isolation in transaction mode: nothing one client does reaches another client, and
//! nothing is committed that the client did not commit. Where the question is "what
//! would PostgreSQL do", the same client runs against PostgreSQL directly first, and
//! pgtide must end the same way.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness;
use crate::rawpg::{self, Msg, RawPg};

const USER: &str = "pgtide_trust";

/// A pgtide with one server connection for `db` (so the next client gets the server
/// the previous one left), `pgtide_trust` an admin user.
async fn pgtide_of_one(db: &str) -> pgtide::Pooler {
    let mut cfg = harness::config_for(db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.admin_users = vec![USER.to_string()];
    harness::start_pgtide(cfg).await
}

/// A database with table `t (tag text, v int)` that pgtide_trust may use.
fn database_with_t(prefix: &str) -> String {
    let db = harness::fresh_database(prefix);
    harness::psql(
        harness::primary_port(),
        &db,
        &format!(
            "CREATE TABLE t (tag text, v int); GRANT ALL ON t TO {USER}; GRANT CREATE, TEMP ON DATABASE \"{db}\" TO {USER}"
        ),
    );
    db
}

fn count(db: &str, tag: &str) -> i64 {
    harness::psql(
        harness::primary_port(),
        db,
        &format!("SELECT count(*) FROM t WHERE tag = '{tag}'"),
    )
    .trim()
    .parse()
    .expect("a count")
}

/// Locks on `t` held by any backend.
fn locks_on_t(db: &str) -> i64 {
    harness::psql(
        harness::primary_port(),
        db,
        "SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass AND pid <> pg_backend_pid()",
    )
    .trim()
    .parse()
    .expect("a count")
}

fn backend_alive(db: &str, pid: i32) -> bool {
    harness::psql(
        harness::primary_port(),
        db,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
    )
    .trim()
        == "1"
}

/// Reads messages until one with tag `t` (panics on EOF).
async fn until_tag(c: &mut RawPg, t: u8) -> Vec<Msg> {
    let mut seen = Vec::new();
    loop {
        let m = c.recv().await;
        let done = m.tag == t;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Leave {
    /// Terminate, then close.
    Terminate,
    /// Close the socket (FIN) without Terminate.
    Close,
    /// Reset the connection (RST).
    Reset,
}

async fn leave(c: RawPg, how: Leave) {
    let mut c = c;
    match how {
        Leave::Terminate => {
            let _ = c.try_send(&rawpg::terminate()).await;
        }
        Leave::Close => {}
        Leave::Reset => {
            let _ = c.stream.set_zero_linger();
        }
    }
    drop(c);
}

fn insert(tag: &str) -> String {
    format!("INSERT INTO t VALUES ('{tag}', 1)")
}

/// One way of leaving work unfinished: what the client does before it leaves.
struct Pattern {
    name: &'static str,
    run: for<'a> fn(&'a mut RawPg, &'a str) -> futures::future::BoxFuture<'a, ()>,
}

fn patterns() -> Vec<Pattern> {
    use futures::FutureExt;
    vec![
        Pattern {
            name: "idle in transaction",
            run: |c, tag| {
                async move {
                    c.send(&rawpg::query(&format!("BEGIN; {}", insert(tag))))
                        .await;
                    c.until_ready().await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "failed transaction",
            run: |c, tag| {
                async move {
                    c.send(&rawpg::query(&format!("BEGIN; {}", insert(tag))))
                        .await;
                    c.until_ready().await;
                    c.send(&rawpg::query("SELECT 1/0")).await;
                    c.until_ready().await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "released savepoint",
            run: |c, tag| {
                async move {
                    let sql = format!("BEGIN; SAVEPOINT s; {}; RELEASE SAVEPOINT s", insert(tag));
                    c.send(&rawpg::query(&sql)).await;
                    c.until_ready().await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "held lock",
            run: |c, tag| {
                async move {
                    let sql = format!("BEGIN; {}; LOCK TABLE t IN SHARE MODE", insert(tag));
                    c.send(&rawpg::query(&sql)).await;
                    c.until_ready().await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "open cursor",
            run: |c, tag| {
                async move {
                    let sql = format!(
                        "BEGIN; {}; DECLARE c CURSOR FOR SELECT g FROM generate_series(1, 10) g; FETCH 1 FROM c",
                        insert(tag)
                    );
                    c.send(&rawpg::query(&sql)).await;
                    c.until_ready().await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "unsynced batch",
            run: |c, tag| {
                async move {
                    let mut m = rawpg::parse("", &insert(tag));
                    m.extend(rawpg::bind("", "", &[]));
                    m.extend(rawpg::execute("", 0));
                    m.extend(rawpg::flush());
                    c.send(&m).await;
                    until_tag(c, b'C').await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "synced batches then an unsynced one, unread",
            run: |c, tag| {
                async move {
                    let mut m = Vec::new();
                    for _ in 0..3 {
                        m.extend(rawpg::parse("", &insert(tag)));
                        m.extend(rawpg::bind("", "", &[]));
                        m.extend(rawpg::execute("", 0));
                        m.extend(rawpg::sync());
                    }
                    m.extend(rawpg::parse("", &insert(tag)));
                    m.extend(rawpg::bind("", "", &[]));
                    m.extend(rawpg::execute("", 0));
                    m.extend(rawpg::flush());
                    c.send(&m).await;
                    // The last batch's CommandComplete: every message has run.
                    for _ in 0..4 {
                        until_tag(c, b'C').await;
                    }
                }
                .boxed()
            },
        },
        Pattern {
            name: "COPY FROM STDIN",
            run: |c, tag| {
                async move {
                    c.send(&rawpg::query("COPY t FROM STDIN")).await;
                    until_tag(c, b'G').await;
                    c.send(&rawpg::copy_data(
                        format!("{tag}\t1\n{tag}\t2\n").as_bytes(),
                    ))
                    .await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "COPY FROM STDIN in a transaction",
            run: |c, tag| {
                async move {
                    c.send(&rawpg::query(&format!("BEGIN; {}", insert(tag))))
                        .await;
                    c.until_ready().await;
                    c.send(&rawpg::query("COPY t FROM STDIN")).await;
                    until_tag(c, b'G').await;
                    c.send(&rawpg::copy_data(format!("{tag}\t1\n").as_bytes()))
                        .await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "COPY TO STDOUT unread",
            run: |c, tag| {
                async move {
                    let sql = format!(
                        "{}; COPY (SELECT g, repeat('x', 1000) FROM generate_series(1, 200000) g) TO STDOUT",
                        insert(tag)
                    );
                    c.send(&rawpg::query(&sql)).await;
                    until_tag(c, b'H').await;
                }
                .boxed()
            },
        },
        Pattern {
            name: "busy in a transaction",
            run: |c, tag| {
                async move {
                    c.send(&rawpg::query(&format!("BEGIN; {}", insert(tag))))
                        .await;
                    c.until_ready().await;
                    c.send(&rawpg::query("SELECT pg_sleep(1)")).await;
                }
                .boxed()
            },
        },
    ]
}

/// Runs `p` on a fresh connection to `addr`, leaves `how`, and returns the pid of the
/// direct backend (for direct connections).
async fn abandon(addr: SocketAddr, db: &str, p: &Pattern, tag: &str, how: Leave) -> i32 {
    let mut c = RawPg::login(addr, USER, db, &[]).await;
    let pid = c.key_pid();
    (p.run)(&mut c, tag).await;
    leave(c, how).await;
    pid
}

/// Waits (up to 20 s) for `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 20 s: {what}");
}

// Bug 1 and every other way to abandon work: what a client left unfinished ends through
// pgtide as it ends directly, and the next client gets a clean server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_work_ends_as_it_would_on_postgresql() {
    let db = database_with_t("iso_abandon");
    let pooler = pgtide_of_one(&db).await;
    let direct = harness::direct_addr(harness::primary_port());
    let mut failures = Vec::new();
    for (i, p) in patterns().iter().enumerate() {
        for (j, how) in [Leave::Terminate, Leave::Close, Leave::Reset]
            .into_iter()
            .enumerate()
        {
            let (dtag, ptag) = (format!("d{i}_{j}"), format!("p{i}_{j}"));
            // Directly: the backend ends on its own; wait for it to be gone.
            let pid = abandon(direct, &db, p, &dtag, how).await;
            eventually("the direct backend to end", || !backend_alive(&db, pid)).await;
            let expected = count(&db, &dtag);

            abandon(pooler.local_addr(), &db, p, &ptag, how).await;
            // The next client gets the one server connection once pgtide has dealt with
            // what was left (or a new one): it must find it idle and clean.
            let mut next = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
            let msgs = harness::to("the next client's query", async {
                next.send(&rawpg::query("SELECT 1")).await;
                next.until_ready().await
            })
            .await;
            let errors: Vec<_> = msgs
                .iter()
                .filter(|m| m.tag == b'E')
                .map(|m| m.message())
                .collect();
            let status = msgs.last().map(|m| m.body[0]);
            let got = count(&db, &ptag);
            let locks = locks_on_t(&db);
            if got != expected || !errors.is_empty() || status != Some(b'I') || locks != 0 {
                failures.push(format!(
                    "{} / {how:?}: directly {expected} row(s) committed, through pgtide {got}; next client's errors {errors:?}, status {:?}, locks left on t {locks}",
                    p.name,
                    status.map(|s| s as char)
                ));
            }
            leave(next, Leave::Terminate).await;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// Bug 2: a message type the protocol does not have gets that client 08P01 and a close;
// the next client on the same server connection sees nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_type_is_refused_and_costs_no_one_else() {
    let db = database_with_t("iso_badtype");
    let pooler = pgtide_of_one(&db).await;
    for _ in 0..3 {
        let mut a = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        let mut m = rawpg::query("SELECT 1");
        m.extend([b'y', 0, 0, 0, 4]);
        a.send(&m).await;
        let msgs = a.until_eof().await;
        let err = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .expect("an ErrorResponse");
        assert_eq!(
            err.sqlstate().as_deref(),
            Some("08P01"),
            "{:?}",
            err.message()
        );
        assert!(
            err.message()
                .unwrap_or_default()
                .contains("invalid frontend message type 121"),
            "{:?}",
            err.message()
        );

        let mut b = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        let msgs = harness::to("B's query", async {
            b.send(&rawpg::query("SELECT 2")).await;
            b.until_ready().await
        })
        .await;
        assert!(
            msgs.iter().all(|m| m.tag != b'E'),
            "the next client saw an error: {:?}",
            msgs.iter()
                .filter(|m| m.tag == b'E')
                .map(|m| m.message())
                .collect::<Vec<_>>()
        );
        assert_eq!(b.one("SELECT 3").await, "3");
    }
}

// Bug 3: a client that declares a message over max_message_size is refused, and its
// server connection is back in the pool (or replaced) at once, not after a fixed wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_violation_does_not_hold_the_server() {
    let db = database_with_t("iso_huge");
    let pooler = pgtide_of_one(&db).await;
    for _ in 0..3 {
        let mut a = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        let mut m = rawpg::query("SELECT 1");
        m.extend([b'Q', 0x40, 0, 0, 0]);
        a.send(&m).await;
        let msgs = a.until_eof().await;
        let err = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .expect("an ErrorResponse");
        assert_eq!(err.sqlstate().as_deref(), Some("08P01"));

        // A fixed wait here was 5 s per violation (the pool of one stalled); the bound is
        // far below it and far above a query's time.
        let started = std::time::Instant::now();
        let mut b = RawPg::login(pooler.local_addr(), USER, &db, &[]).await;
        assert_eq!(b.one("SELECT 2").await, "2");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the next client waited {:?} for the server",
            started.elapsed()
        );
    }
}

/// `SHOW name` / `current_setting(name, true)` as the client sees it.
async fn setting(c: &mut RawPg, expr: &str) -> Option<String> {
    let rows = c.simple(&format!("SELECT {expr}")).await;
    rows[0][0].clone()
}

// Bug 4: every session-level change of a setting stays with its client, on whatever
// server it gets, and never reaches another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_stay_with_their_client() {
    let db = database_with_t("iso_set");
    let role = format!("iso_role_{}", std::process::id());
    harness::psql(
        harness::primary_port(),
        "postgres",
        &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN; GRANT {role} TO {USER}"),
    );
    let pooler = pgtide_of_one(&db).await;
    let addr = pooler.local_addr();
    // What a fresh client sees, directly: the reference.
    let mut fresh = RawPg::login(
        harness::direct_addr(harness::primary_port()),
        USER,
        &db,
        &[],
    )
    .await;
    let checks = [
        "current_setting('statement_timeout')",
        "current_setting('work_mem')",
        "current_setting('lock_timeout')",
        "coalesce(current_setting('app.tenant_id', true), '')",
        "coalesce(current_setting('app.user', true), '')",
        "current_user::text",
    ];
    let mut reference = Vec::new();
    for c in checks {
        reference.push(setting(&mut fresh, c).await);
    }

    let mut a = RawPg::login(addr, USER, &db, &[]).await;
    for sql in [
        "SET statement_timeout = '150ms'",
        "SET SESSION work_mem = '77MB'",
        "SET app.tenant_id = '42'",
        "SELECT set_config('app.user', '7', false)",
        &format!("SET ROLE {role}"),
        "BEGIN; SET lock_timeout = '3s'; COMMIT",
    ] {
        a.simple(sql).await;
    }
    let a_values = [
        Some("150ms".to_string()),
        Some("77MB".to_string()),
        Some("3s".to_string()),
        Some("42".to_string()),
        Some("7".to_string()),
        Some(role.clone()),
    ];
    // B gets the same (only) server connection after each of A's transactions.
    let mut b = RawPg::login(addr, USER, &db, &[]).await;
    for (i, c) in checks.iter().enumerate() {
        assert_eq!(
            setting(&mut b, c).await,
            reference[i],
            "another client's setting reached this one: {c}"
        );
    }
    assert_eq!(
        b.one("SELECT 'slept' FROM pg_sleep(0.3)").await,
        "slept",
        "A's statement_timeout reached B"
    );
    // A keeps its own on the server it gets back.
    let a_checks = [
        "current_setting('statement_timeout')",
        "current_setting('work_mem')",
        "current_setting('lock_timeout')",
        "coalesce(current_setting('app.tenant_id', true), '')",
        "coalesce(current_setting('app.user', true), '')",
        "current_user::text",
    ];
    for (i, c) in a_checks.iter().enumerate() {
        assert_eq!(
            setting(&mut a, c).await,
            a_values[i],
            "A lost its setting: {c}"
        );
    }
    // RESET and RESET ALL take it back for A, and B still sees the defaults.
    a.simple("RESET ALL").await;
    a.simple("RESET ROLE").await;
    for (i, c) in checks.iter().enumerate() {
        assert_eq!(
            setting(&mut a, c).await,
            reference[i],
            "after RESET ALL: {c}"
        );
        assert_eq!(
            setting(&mut b, c).await,
            reference[i],
            "B after A's RESET ALL: {c}"
        );
    }
}

/// SHOW CLIENTS' `pinned` column for the client connected from `port`.
async fn pinned_column(addr: SocketAddr, port: u16) -> Option<String> {
    let mut console = RawPg::login(addr, USER, "pgtide", &[]).await;
    let rows = console.simple("SHOW CLIENTS").await;
    // Columns: type user database state addr port ... application_name pinned.
    rows.iter()
        .find(|r| r[5].as_deref() == Some(&port.to_string()))
        .and_then(|r| r.last().cloned().flatten())
}

const SESSION_STATE: &[(&str, &str)] = &[
    ("CREATE TEMP TABLE tt (a int)", "SELECT (to_regclass('pg_temp.tt') IS NOT NULL)::int::text"),
    ("SELECT pg_advisory_lock(4242)", "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"),
    ("LISTEN iso_channel", "SELECT count(*)::text FROM pg_listening_channels()"),
    ("DECLARE hc CURSOR WITH HOLD FOR SELECT 1", "SELECT count(*)::text FROM pg_cursors"),
    // A PREPARE alone in a Query is pgtide's (no session state): only other forms count.
    ("SELECT 1; PREPARE iso_p AS SELECT 1", "SELECT count(*)::text FROM pg_prepared_statements WHERE name = 'iso_p'"),
];

// Bug 5, pin: session state keeps its client on its server across transactions (it works
// as it would directly), the client shows as pinned, and what it leaves is gone before
// the server serves anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_the_client_and_is_reset_before_reuse() {
    let db = database_with_t("iso_pin");
    let pooler = pgtide_of_one(&db).await;
    let addr = pooler.local_addr();
    for (create, check) in SESSION_STATE {
        let mut a = RawPg::login(addr, USER, &db, &[]).await;
        let pid = a.one("SELECT pg_backend_pid()::text").await;
        assert_eq!(
            pinned_column(addr, a.stream.local_addr().unwrap().port())
                .await
                .as_deref(),
            Some("")
        );
        a.simple(create).await;
        // Later transactions see the state, on the same backend.
        for _ in 0..3 {
            assert_eq!(
                a.one(check).await,
                "1",
                "{create}: the state is gone for its own client"
            );
            assert_eq!(a.one("SELECT pg_backend_pid()::text").await, pid);
        }
        let reason = pinned_column(addr, a.stream.local_addr().unwrap().port()).await;
        assert!(
            reason.as_deref().is_some_and(|r| !r.is_empty()),
            "{create}: SHOW CLIENTS pinned {reason:?}"
        );
        leave(a, Leave::Terminate).await;

        // The one server connection, next client: the same backend, nothing left.
        let mut b = RawPg::login(addr, USER, &db, &[]).await;
        assert_eq!(
            b.one("SELECT pg_backend_pid()::text").await,
            pid,
            "{create}: the server was replaced, not reset"
        );
        let left = b
            .simple("SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) + (SELECT count(*) FROM pg_listening_channels()) + (SELECT count(*) FROM pg_cursors) + (SELECT count(*) FROM pg_prepared_statements) + (CASE WHEN to_regclass('pg_temp.tt') IS NULL THEN 0 ELSE 1 END)")
            .await;
        assert_eq!(
            left[0][0].as_deref(),
            Some("0"),
            "{create}: session state reached the next client"
        );
        leave(b, Leave::Terminate).await;
    }
}

// Bug 5, reject: the statement fails with 0A000 naming the policy and never reaches the
// server; the client's transaction state is what PostgreSQL's would be after an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_can_be_rejected() {
    let db = database_with_t("iso_reject");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 1;
    cfg.pgtide.session_state = pgtide::config::SessionState::Reject;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();
    let mut a = RawPg::login(addr, USER, &db, &[]).await;
    for (create, check) in SESSION_STATE {
        a.send(&rawpg::query(create)).await;
        let msgs = a.until_ready().await;
        let err = msgs
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("{create}: no error"));
        assert_eq!(err.sqlstate().as_deref(), Some("0A000"), "{create}");
        assert!(
            err.message().unwrap_or_default().contains("session_state"),
            "{:?}",
            err.message()
        );
        assert_eq!(msgs.last().unwrap().body[0], b'I');
        // Nothing of it exists on the server.
        let rows = a.simple(check).await;
        assert_eq!(
            rows[0][0].as_deref(),
            Some("0"),
            "{create} reached the server"
        );
    }
    // Inside a transaction: the transaction fails, as after any error.
    a.simple("BEGIN").await;
    a.send(&rawpg::query("CREATE TEMP TABLE tt (a int)")).await;
    let msgs = a.until_ready().await;
    assert_eq!(msgs.last().unwrap().body[0], b'E');
    a.simple("ROLLBACK").await;
    // The extended protocol: the error comes with the Execute.
    let mut m = rawpg::parse("", "SELECT pg_advisory_lock(1)");
    m.extend(rawpg::bind("", "", &[]));
    m.extend(rawpg::execute("", 0));
    m.extend(rawpg::sync());
    a.send(&m).await;
    let msgs = a.until_ready().await;
    let err = msgs.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(err.sqlstate().as_deref(), Some("0A000"));
    assert_eq!(
        a.one("SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory'")
            .await,
        "0"
    );
    // Transaction-scoped forms are fine.
    a.simple("BEGIN; CREATE TEMP TABLE tx (a int) ON COMMIT DROP; SELECT pg_advisory_xact_lock(1); COMMIT").await;
}

// A pinned client whose session state is gone (lock released, table dropped, UNLISTEN,
// cursor closed, statement deallocated) is unpinned: others get its server again while
// it stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_session_state_is_gone_is_unpinned() {
    let db = database_with_t("iso_unpin");
    let pooler = pgtide_of_one(&db).await;
    let addr = pooler.local_addr();
    let ends = [
        "DROP TABLE tt",
        "SELECT pg_advisory_unlock(4242)",
        "UNLISTEN iso_channel",
        "CLOSE hc",
        "DEALLOCATE iso_p",
    ];
    for ((create, check), end) in SESSION_STATE.iter().zip(ends) {
        let mut a = RawPg::login(addr, USER, &db, &[]).await;
        let a_port = a.stream.local_addr().unwrap().port();
        a.simple(create).await;
        assert_eq!(a.one(check).await, "1");
        // B needs the one server connection, which A holds.
        let mut b = RawPg::login(addr, USER, &db, &[]).await;
        let b_query = tokio::spawn(async move {
            let v = b.one("SELECT 'b ran'").await;
            (b, v)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !b_query.is_finished(),
            "{create}: B got a server while A was pinned"
        );
        a.simple(end).await;
        let (b, v) = harness::to("B's query once A is unpinned", b_query)
            .await
            .expect("B's task");
        assert_eq!(v, "b ran");
        assert_eq!(
            pinned_column(addr, a_port).await.as_deref(),
            Some(""),
            "{create} / {end}"
        );
        assert_eq!(a.one(check).await, "0", "{end}");
        leave(b, Leave::Terminate).await;
        leave(a, Leave::Terminate).await;
    }
}
