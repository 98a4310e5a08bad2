//! The admin console (`pgtide` / `pgbouncer` virtual database), PAUSE / RESUME under
//! load, and live reload (RELOAD and `Pooler::reload`; SIGHUP on the binary is in
//! `cli.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgtide::config::ConfigSource;
use pgtide::config::{Config, ConfigDuration, User};

use crate::harness::{self, tcp_connect_string, to};

/// `psql -X -A` as `user` against pgtide's admin console (or any `db`): (success, stdout
/// with a header line and no footer, stderr).
async fn psql_as(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    sql: &str,
) -> (bool, String, String) {
    let child = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-F",
            "|",
            "-P",
            "footer=off",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-U", user, "-d", db, "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "20")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run psql");
    let out = to("psql", child.wait_with_output()).await.expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An admin command as app (an admin user in these tests); panics on failure.
async fn admin(addr: SocketAddr, sql: &str) -> String {
    let (ok, out, err) = psql_as(addr, "app", harness::APP_PASSWORD, "pgtide", sql).await;
    assert!(ok, "admin command {sql:?} failed:\n{out}\n{err}");
    out
}

/// The rows of an admin SHOW, as (header, rows of column → value).
fn parse_table(out: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = out.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect();
    (header, rows)
}

/// The value of `column` in the first row whose `key_col` is `key`.
fn cell(out: &str, key_col: &str, key: &str, column: &str) -> Option<String> {
    let (header, rows) = parse_table(out);
    let k = header.iter().position(|h| h == key_col)?;
    let c = header.iter().position(|h| h == column)?;
    rows.iter()
        .find(|r| r.get(k).map(String::as_str) == Some(key))
        .and_then(|r| r.get(c).cloned())
}

/// Server connections PostgreSQL has for database `db` (pgtide's pools).
async fn server_connections(db: &str) -> u32 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    );
    let out = tokio::task::spawn_blocking(move || {
        harness::psql(harness::primary_port(), "postgres", &sql)
    })
    .await
    .unwrap();
    out.trim().parse().expect("a count")
}

/// Waits until `f` returns true, up to 15 s; panics with `what` otherwise.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `config` as TOML to a new temporary file.
fn write_config(file: &std::path::Path, config: &Config) {
    let mut value = toml::Value::try_from(config).expect("config serializes");
    // A database with `hosts` must not also give host and port (serialized as defaults).
    if let Some(dbs) = value.get_mut("databases").and_then(|d| d.as_table_mut()) {
        for (_, d) in dbs.iter_mut() {
            if let Some(t) = d.as_table_mut() {
                if t.contains_key("hosts") {
                    t.remove("host");
                    t.remove("port");
                }
            }
        }
    }
    let text = toml::to_string(&value).expect("config serializes");
    std::fs::write(file, text).expect("write config file");
}

/// A fresh database and a pgtide started from a config file (so RELOAD reads it), app
/// being an admin user.
async fn setup_from_file(
    prefix: &str,
    tweak: impl FnOnce(&mut Config),
) -> (
    String,
    pgtide::Pooler,
    SocketAddr,
    tempfile::TempDir,
    Config,
) {
    let db = harness::fresh_database(prefix);
    let mut config = harness::config_for(&db);
    config.pgtide.query_wait_timeout = ConfigDuration::secs(20);
    config.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    tweak(&mut config);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgtide.toml");
    write_config(&file, &config);
    let loaded = Config::from_file(&file).expect("the written config loads");
    let pooler = pgtide::start_from(loaded, Some(ConfigSource::file(&file)))
        .await
        .expect("start pgtide");
    let addr = pooler.local_addr();
    (db, pooler, addr, dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_command_returns_pgbouncer_columns() {
    let (db, pooler, addr) = harness::setup("admin_show", |c| {
        c.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    })
    .await;
    // A client with a server connection behind it, so the lists have rows.
    let client = to(
        "connect",
        harness::connect(&tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db)),
    )
    .await
    .expect("app logs in");
    to("select", client.simple_query("SELECT 1"))
        .await
        .expect("select");

    let conn_cols = "type|user|database|state|addr|port|local_addr|local_port|connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|application_name";
    let expected: &[(&str, &str)] = &[
        ("POOLS", "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|maxwait|maxwait_us|pool_mode"),
        ("STATS", "database|total_xact_count|total_query_count|total_received|total_sent|total_xact_time|total_query_time|total_wait_time|avg_xact_count|avg_query_count|avg_recv|avg_sent|avg_xact_time|avg_query_time|avg_wait_time"),
        ("STATS_TOTALS", "database|xact_count|query_count|bytes_received|bytes_sent|xact_time|query_time|wait_time"),
        ("SERVERS", conn_cols),
        // PgBouncer's columns, then pgtide's own.
        ("CLIENTS", &format!("{conn_cols}|pinned")),
        ("DATABASES", "name|host|port|database|force_user|pool_size|min_pool_size|reserve_pool|pool_mode|max_connections|current_connections|paused|disabled"),
        ("CONFIG", "key|value|default|changeable"),
        ("VERSION", "version"),
        ("LISTS", "list|items"),
        ("HOSTS", "database|host|port|configured_role|role|weight|health|breaker|consecutive_failures|lag_bytes|lag_seconds|replay_lsn|last_check_ms_ago|last_error|timeline|writes_refused"),
    ];
    for (what, columns) in expected {
        // Lower case and a trailing semicolon are accepted too.
        let sql = if *what == "LISTS" {
            "show lists;".to_string()
        } else {
            format!("SHOW {what}")
        };
        let out = admin(addr, &sql).await;
        let (header, _) = parse_table(&out);
        assert_eq!(header.join("|"), *columns, "columns of SHOW {what}");
    }

    // The rows say what a user would check.
    let pools = admin(addr, "SHOW POOLS").await;
    assert_eq!(
        cell(&pools, "database", &db, "user").as_deref(),
        Some("app")
    );
    assert_eq!(
        cell(&pools, "database", &db, "sv_idle").as_deref(),
        Some("1"),
        "{pools}"
    );
    assert_eq!(
        cell(&pools, "database", &db, "cl_active").as_deref(),
        Some("1"),
        "{pools}"
    );
    assert_eq!(
        cell(&pools, "database", &db, "pool_mode").as_deref(),
        Some("transaction")
    );
    let servers = admin(addr, "SHOW SERVERS").await;
    assert_eq!(
        cell(&servers, "database", &db, "state").as_deref(),
        Some("idle"),
        "{servers}"
    );
    let pid: i32 = cell(&servers, "database", &db, "remote_pid")
        .and_then(|p| p.parse().ok())
        .expect("remote_pid");
    let backend_pids = tokio::task::spawn_blocking({
        let db = db.clone();
        move || {
            harness::psql(
                harness::primary_port(),
                "postgres",
                &format!("SELECT pid FROM pg_stat_activity WHERE datname = '{db}'"),
            )
        }
    })
    .await
    .unwrap();
    assert!(
        backend_pids.lines().any(|l| l.trim() == pid.to_string()),
        "SHOW SERVERS remote_pid {pid} is not a backend of {db}: {backend_pids}"
    );
    let clients = admin(addr, "SHOW CLIENTS").await;
    assert_eq!(
        cell(&clients, "database", &db, "user").as_deref(),
        Some("app")
    );
    assert_eq!(
        cell(&clients, "database", "pgtide", "user").as_deref(),
        Some("app")
    );
    let stats = admin(addr, "SHOW STATS_TOTALS").await;
    let xacts: u64 = cell(&stats, "database", &db, "xact_count")
        .and_then(|v| v.parse().ok())
        .expect("xact_count");
    assert!(xacts >= 1, "{stats}");
    let dbs = admin(addr, "SHOW DATABASES").await;
    assert_eq!(cell(&dbs, "name", &db, "pool_size").as_deref(), Some("20"));
    assert_eq!(cell(&dbs, "name", &db, "paused").as_deref(), Some("0"));
    let config = admin(addr, "SHOW CONFIG").await;
    assert_eq!(
        cell(&config, "key", "pool_size", "value").as_deref(),
        Some("20")
    );
    assert_eq!(
        cell(&config, "key", "listen", "changeable").as_deref(),
        Some("no")
    );
    let hosts = admin(addr, "SHOW HOSTS").await;
    assert_eq!(
        cell(&hosts, "database", &db, "role").as_deref(),
        Some("primary")
    );
    let version = admin(addr, "SHOW VERSION").await;
    assert!(
        version.contains(&format!("pgtide {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    // The PgBouncer name of the console works too.
    let (ok, out, err) = psql_as(
        addr,
        "app",
        harness::APP_PASSWORD,
        "pgbouncer",
        "SHOW LISTS",
    )
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        cell(&out, "list", "databases", "items").as_deref(),
        Some("1")
    );
    drop(client);
    pooler.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_users_are_refused_and_errors_leave_the_console_usable() {
    let (_db, pooler, addr) = harness::setup("admin_errors", |c| {
        c.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    })
    .await;
    // A configured user that is not an admin: 28000 after a successful password.
    let err = to(
        "connect",
        harness::connect(&tcp_connect_string(addr, "pgtide_md5", "md5pass", "pgtide")),
    )
    .await
    .expect_err("a non-admin user is refused");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("28000"),
        "non-admin user: {err}"
    );
    // A wrong password of an admin user is still a password failure.
    let err = to(
        "connect",
        harness::connect(&tcp_connect_string(addr, "app", "wrong", "pgtide")),
    )
    .await
    .expect_err("a wrong password is refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");

    let console = to(
        "connect",
        harness::connect(&tcp_connect_string(
            addr,
            "app",
            harness::APP_PASSWORD,
            "pgtide",
        )),
    )
    .await
    .expect("the admin logs in");
    for (bad, code) in [
        ("SELECT 1", "42601"),
        ("SHOW NOTHING", "42601"),
        ("PAUSE no_such_db", "3D000"),
        ("KILL", "42601"),
        ("RESUME", "22023"),
    ] {
        let e = to("bad command", console.simple_query(bad))
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad:?} must fail"));
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{bad}: {e}");
        // The session goes on.
        let rows = to("show version", console.simple_query("SHOW VERSION"))
            .await
            .expect("the console still answers");
        assert!(!rows.is_empty());
    }
    // The extended protocol gets a clear error; the simple protocol still works after.
    let e = to("extended", console.query("SHOW POOLS", &[]))
        .await
        .expect_err("extended protocol is refused");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    to("show pools", console.simple_query("show pools;"))
        .await
        .expect("simple protocol after the extended one");
    pooler.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_under_pgbench_load_lose_nothing() {
    let (db, pooler, addr) = harness::setup("admin_pause", |c| {
        c.pgtide.admin_users = vec![harness::APP_USER.to_string()];
        c.pgtide.pool_size = 5;
        // Waiting at the PAUSE gate must not count against this.
        c.pgtide.query_wait_timeout = ConfigDuration::secs(2);
    })
    .await;
    crate::pgbench::init(addr.port(), &db).await;
    let load = tokio::spawn({
        let db = db.clone();
        async move { crate::pgbench::run(addr, &db, "simple", 9, false).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    admin(addr, "PAUSE").await;
    // PAUSE returned: nothing runs on the servers and pgtide holds no connection.
    assert_eq!(
        server_connections(&db).await,
        0,
        "server connections after PAUSE"
    );
    let pools = admin(addr, "SHOW POOLS").await;
    assert_eq!(
        cell(&pools, "database", &db, "sv_active").as_deref(),
        Some("0"),
        "{pools}"
    );
    // Held longer than query_wait_timeout: clients wait, they do not fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        server_connections(&db).await,
        0,
        "server connections while paused"
    );
    let pools = admin(addr, "SHOW POOLS").await;
    let waiting: u32 = cell(&pools, "database", &db, "cl_waiting")
        .and_then(|v| v.parse().ok())
        .expect("cl_waiting");
    assert!(waiting > 0, "pgbench clients wait while paused: {pools}");
    let dbs = admin(addr, "SHOW DATABASES").await;
    assert_eq!(cell(&dbs, "name", &db, "paused").as_deref(), Some("1"));
    admin(addr, "RESUME").await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    // pgbench::run asserts success, no failed and no aborted transactions.
    let processed = to("pgbench", load).await.expect("pgbench task");
    assert!(processed > 0);
    pooler.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_resizes_pools_without_dropping_clients() {
    let (db, pooler, addr, dir, mut config) = setup_from_file("admin_reload", |c| {
        c.pgtide.pool_size = 2;
    })
    .await;
    let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
    let kept = to("connect", harness::connect(&conn)).await.expect("login");
    to("select", kept.simple_query("SELECT 1"))
        .await
        .expect("select");

    // Six clients sleeping at once use at most pool_size servers.
    let burst = |n: usize| {
        let conn = conn.clone();
        async move {
            let mut tasks = Vec::new();
            for _ in 0..n {
                let conn = conn.clone();
                tasks.push(tokio::spawn(async move {
                    let c = harness::connect(&conn).await.expect("login");
                    c.simple_query("SELECT pg_sleep(0.5)").await.expect("sleep");
                }));
            }
            for t in tasks {
                to("burst", t).await.expect("burst client");
            }
        }
    };
    burst(6).await;
    assert_eq!(server_connections(&db).await, 2, "pool_size 2");

    config.pgtide.pool_size = 5;
    write_config(&dir.path().join("pgtide.toml"), &config);
    let (ok, out, err) = psql_as(addr, "app", harness::APP_PASSWORD, "pgtide", "RELOAD").await;
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("pool_size: 2 -> 5"),
        "RELOAD reports the change: {err}"
    );
    let dbs = admin(addr, "SHOW DATABASES").await;
    assert_eq!(cell(&dbs, "name", &db, "pool_size").as_deref(), Some("5"));
    burst(6).await;
    assert_eq!(server_connections(&db).await, 5, "pool_size 5 after RELOAD");
    let pools = admin(addr, "SHOW POOLS").await;
    assert_eq!(
        cell(&pools, "database", &db, "sv_idle").as_deref(),
        Some("5"),
        "{pools}"
    );

    // Shrinking closes the surplus idle servers at once.
    config.pgtide.pool_size = 1;
    write_config(&dir.path().join("pgtide.toml"), &config);
    let summary = pooler.reload().await.expect("reload");
    assert!(summary.contains("pool_size: 5 -> 1"), "{summary}");
    eventually("the pool shrinks to 1 server", || async {
        server_connections(&db).await == 1
    })
    .await;
    // The client connected since the start was never dropped.
    let rows = to("select", kept.simple_query("SELECT 42"))
        .await
        .expect("the kept client still works");
    assert!(!rows.is_empty());
    pooler.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_and_the_old_one_stays() {
    let (db, pooler, addr, dir, mut config) = setup_from_file("admin_broken", |c| {
        c.pgtide.pool_size = 3;
    })
    .await;
    let file = dir.path().join("pgtide.toml");
    let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
    let kept = to("connect", harness::connect(&conn)).await.expect("login");

    // Invalid TOML value: refused with the reason.
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("pool_size = 3", "pool_size = 0")).unwrap();
    let (ok, out, err) = psql_as(addr, "app", harness::APP_PASSWORD, "pgtide", "RELOAD").await;
    assert!(!ok, "a broken config must be refused: {out}");
    assert!(
        err.contains("pgtide.pool_size") && err.contains("must be at least 1"),
        "the reason is given: {err}"
    );
    assert!(err.contains("stays in force"), "{err}");
    // Not even TOML.
    std::fs::write(&file, "this is [not toml").unwrap();
    let e = pooler
        .reload()
        .await
        .expect_err("unparsable file is refused");
    assert!(e.contains("stays in force"), "{e}");
    // The old configuration keeps working.
    let dbs = admin(addr, "SHOW DATABASES").await;
    assert_eq!(cell(&dbs, "name", &db, "pool_size").as_deref(), Some("3"));
    to("select", kept.simple_query("SELECT 1"))
        .await
        .expect("old config works");
    let fresh = to("connect", harness::connect(&conn))
        .await
        .expect("new login");
    to("select", fresh.simple_query("SELECT 1"))
        .await
        .expect("select");

    // A change that needs a restart is reported, not applied; the rest applies.
    config.pgtide.listen = "127.0.0.1:1".parse().unwrap();
    config.pgtide.pool_size = 4;
    write_config(&file, &config);
    let (ok, out, err) = psql_as(addr, "app", harness::APP_PASSWORD, "pgtide", "RELOAD").await;
    assert!(ok, "{out}{err}");
    assert!(err.contains("needs a restart: listen"), "{err}");
    let cfg = admin(addr, "SHOW CONFIG").await;
    assert_eq!(
        cell(&cfg, "key", "listen", "value").as_deref(),
        Some("127.0.0.1:0")
    );
    assert_eq!(
        cell(&cfg, "key", "pool_size", "value").as_deref(),
        Some("4")
    );
    pooler.shutdown();

    // Zero-config (no file): RELOAD says there is nothing to reload.
    let (_db2, pooler2, addr2) = harness::setup("admin_zero", |c| {
        c.pgtide.admin_users = vec![harness::APP_USER.to_string()];
    })
    .await;
    let (ok, _, err) = psql_as(addr2, "app", harness::APP_PASSWORD, "pgtide", "RELOAD").await;
    assert!(!ok && err.contains("zero-config"), "{err}");
    pooler2.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_users_and_changes_passwords() {
    let (db, pooler, addr, dir, mut config) = setup_from_file("admin_users", |_| {}).await;
    let file = dir.path().join("pgtide.toml");
    let role = format!("newbie_{}", std::process::id());
    tokio::task::spawn_blocking({
        let (db, role) = (db.clone(), role.clone());
        move || {
            harness::psql(
                harness::primary_port(),
                &db,
                &format!("CREATE ROLE {role} LOGIN PASSWORD 'first'; GRANT CONNECT ON DATABASE {db} TO {role}"),
            )
        }
    })
    .await
    .unwrap();
    let login = |password: &str| tcp_connect_string(addr, &role, password, &db);

    // Unknown to pgtide before the reload.
    let e = to("connect", harness::connect(&login("first")))
        .await
        .expect_err("unknown user");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");

    config.users.insert(
        role.clone(),
        User {
            password: Some("first".into()),
            ..User::default()
        },
    );
    write_config(&file, &config);
    let (ok, out, err) = psql_as(addr, "app", harness::APP_PASSWORD, "pgtide", "RELOAD").await;
    assert!(ok, "{out}{err}");
    assert!(err.contains(&format!("user {role} added")), "{err}");
    assert!(
        !err.contains("first"),
        "a password must never be shown: {err}"
    );
    let c = to("connect", harness::connect(&login("first")))
        .await
        .expect("the added user logs in");
    let rows = to("whoami", c.query_one("SELECT current_user::text", &[]))
        .await
        .expect("query");
    assert_eq!(rows.get::<_, String>(0), role);

    // New password on the server and in the config.
    tokio::task::spawn_blocking({
        let role = role.clone();
        move || {
            harness::psql(
                harness::primary_port(),
                "postgres",
                &format!("ALTER ROLE {role} PASSWORD 'second'"),
            )
        }
    })
    .await
    .unwrap();
    config.users.get_mut(&role).unwrap().password = Some("second".into());
    write_config(&file, &config);
    let summary = pooler.reload().await.expect("reload");
    assert!(
        summary.contains(&format!("user {role}: password changed")),
        "{summary}"
    );
    assert!(!summary.contains("second"), "{summary}");
    let e = to("connect", harness::connect(&login("first")))
        .await
        .expect_err("the old password is refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    let c2 = to("connect", harness::connect(&login("second")))
        .await
        .expect("the new password works");
    // New server connections log in with the new password.
    to("select", c2.simple_query("SELECT 1"))
        .await
        .expect("select with the new password");
    // The client that logged in before the change is still served.
    to("select", c.simple_query("SELECT 1"))
        .await
        .expect("earlier client");
    pooler.shutdown();
}

/// The PostgreSQL backend pid serving `client` now.
async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    to("pid", client.query_one("SELECT pg_backend_pid()", &[]))
        .await
        .expect("pg_backend_pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_kill_and_shutdown() {
    let (db, pooler, addr) = harness::setup("admin_kill", |c| {
        c.pgtide.admin_users = vec![harness::APP_USER.to_string()];
        c.pgtide.pool_size = 2;
    })
    .await;
    let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
    let a = to("connect", harness::connect(&conn)).await.expect("login");
    let b = to("connect", harness::connect(&conn)).await.expect("login");

    // RECONNECT: the idle server is closed now, the busy one when its transaction ends;
    // the transaction itself is not disturbed.
    to("begin", a.batch_execute("BEGIN")).await.expect("begin");
    let idle_pid = backend_pid(&a).await;
    to("begin", b.batch_execute("BEGIN")).await.expect("begin");
    let busy_pid = backend_pid(&b).await;
    assert_ne!(idle_pid, busy_pid);
    to("commit", a.batch_execute("COMMIT"))
        .await
        .expect("commit");
    admin(addr, "RECONNECT").await;
    let servers = admin(addr, "SHOW SERVERS").await;
    assert_eq!(
        cell(
            &servers,
            "remote_pid",
            &busy_pid.to_string(),
            "close_needed"
        )
        .as_deref(),
        Some("1"),
        "{servers}"
    );
    assert_eq!(
        backend_pid(&b).await,
        busy_pid,
        "the open transaction keeps its server"
    );
    to("commit", b.batch_execute("COMMIT"))
        .await
        .expect("commit");
    let pids = [backend_pid(&a).await, backend_pid(&b).await];
    assert!(
        !pids.contains(&idle_pid) && !pids.contains(&busy_pid),
        "after RECONNECT new server connections are used: {pids:?} vs {idle_pid}, {busy_pid}"
    );

    // KILL db: its clients are disconnected with 57P01 and its servers closed.
    admin(addr, &format!("KILL {db}")).await;
    let e = to("after kill", a.simple_query("SELECT 1"))
        .await
        .expect_err("a killed client is disconnected");
    assert!(
        e.code().map(|c| c.code()) == Some("57P01") || e.is_closed(),
        "killed client: {e}"
    );
    eventually("the killed database has no server connection", || async {
        server_connections(&db).await == 0
    })
    .await;
    let clients = admin(addr, "SHOW CLIENTS").await;
    assert!(
        cell(&clients, "database", &db, "user").is_none(),
        "{clients}"
    );
    // The database still serves new clients.
    let c = to("connect", harness::connect(&conn))
        .await
        .expect("login after KILL");
    to("select", c.simple_query("SELECT 1"))
        .await
        .expect("select after KILL");

    // SHUTDOWN: graceful shutdown, as SIGTERM.
    admin(addr, "SHUTDOWN").await;
    to("shutdown", pooler.wait()).await;
}

/// `pg_is_in_recovery()` where `client`'s read runs: "t" on a replica.
async fn in_recovery(client: &tokio_postgres::Client) -> Option<String> {
    let msgs = to("read", client.simple_query("SELECT pg_is_in_recovery()"))
        .await
        .expect("read");
    msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_a_replica() {
    use pgtide::config::{HostConfig, HostRole};
    let (db, pooler, addr, dir, mut config) = setup_from_file("admin_hosts", |c| {
        c.pgtide.primary_reads = false;
        c.pgtide.health_check_interval = ConfigDuration(Duration::from_millis(100));
    })
    .await;
    let file = dir.path().join("pgtide.toml");
    let conn = tcp_connect_string(addr, "app", harness::APP_PASSWORD, &db);
    let kept = to("connect", harness::connect(&conn)).await.expect("login");
    assert_eq!(in_recovery(&kept).await.as_deref(), Some("f"));

    // Add the replica: the database gets a monitor, reads go to the replica.
    let host = |port, role| HostConfig {
        host: "127.0.0.1".into(),
        port,
        role,
        weight: 1,
    };
    let single = config.databases[&db].clone();
    let d = config.databases.get_mut(&db).expect("db");
    // With `hosts`, host and port go in the entries.
    d.host = pgtide::config::Database::default().host;
    d.port = pgtide::config::Database::default().port;
    d.hosts = Some(vec![
        host(harness::primary_port(), HostRole::Primary),
        host(harness::replica_port(), HostRole::Replica),
    ]);
    write_config(&file, &config);
    let summary = pooler.reload().await.expect("reload");
    assert!(
        summary.contains(&format!("database {db} changed")),
        "{summary}"
    );
    let replica_port = harness::replica_port().to_string();
    eventually("SHOW HOSTS reports the replica up", || async {
        let hosts = admin(addr, "SHOW HOSTS").await;
        cell(&hosts, "port", &replica_port, "health").as_deref() == Some("up")
            && cell(&hosts, "port", &replica_port, "role").as_deref() == Some("replica")
    })
    .await;
    eventually("reads of the kept client go to the replica", || async {
        in_recovery(&kept).await.as_deref() == Some("t")
    })
    .await;

    // And remove it again.
    config.databases.insert(db.clone(), single);
    write_config(&file, &config);
    pooler.reload().await.expect("reload");
    let hosts = admin(addr, "SHOW HOSTS").await;
    assert!(
        cell(&hosts, "port", &replica_port, "role").is_none(),
        "{hosts}"
    );
    assert_eq!(
        cell(&hosts, "database", &db, "health").as_deref(),
        Some("unmonitored")
    );
    assert_eq!(in_recovery(&kept).await.as_deref(), Some("f"));
    pooler.shutdown();
}

/// RELOAD reads the `auth_file` again: a user added there logs in, a file that does not
/// load is refused with the old one kept, and a user removed from it is refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_auth_file() {
    let files = tempfile::tempdir().expect("temp dir");
    let userlist = files.path().join("userlist.txt");
    std::fs::write(&userlist, "; nobody yet\n").unwrap();
    let list_path = userlist.to_string_lossy().into_owned();
    let (db, pooler, addr, _dir, _config) = setup_from_file("admin_authfile", |c| {
        c.pgtide.auth_file = list_path;
    })
    .await;
    let role = format!("listed_{}", std::process::id());
    tokio::task::spawn_blocking({
        let (db, role) = (db.clone(), role.clone());
        move || {
            harness::psql(
                harness::primary_port(),
                &db,
                &format!("CREATE ROLE {role} LOGIN PASSWORD 'from the list'; GRANT CONNECT ON DATABASE {db} TO {role}"),
            )
        }
    })
    .await
    .unwrap();
    let conn = tcp_connect_string(addr, &role, "from the list", &db);
    let login = || harness::connect(&conn);

    let e = to("connect", login()).await.expect_err("not listed yet");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");

    std::fs::write(&userlist, format!("\"{role}\" \"from the list\"\n")).unwrap();
    pooler.reload().await.expect("reload with the user listed");
    let c = to("connect", login())
        .await
        .expect("the listed user logs in");
    let who = to("whoami", c.query_one("SELECT current_user::text", &[]))
        .await
        .expect("query");
    assert_eq!(who.get::<_, String>(0), role);

    std::fs::write(&userlist, format!("\"{role}\" \"no closing quote\n")).unwrap();
    let e = pooler
        .reload()
        .await
        .expect_err("a broken auth_file is refused");
    assert!(e.contains("auth_file"), "{e}");
    assert!(
        !e.contains("no closing quote"),
        "the password is not echoed: {e}"
    );
    to("select", c.simple_query("SELECT 1"))
        .await
        .expect("the old auth_file stays in force");
    to("connect", login())
        .await
        .expect("the old auth_file still logs the user in");

    std::fs::write(&userlist, "; emptied\n").unwrap();
    pooler.reload().await.expect("reload without the user");
    let e = to("connect", login())
        .await
        .expect_err("removed from the list");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    pooler.shutdown();
}
