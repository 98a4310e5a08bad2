//! Shared test harness: one PostgreSQL primary + streaming replica per test process
//! ([`cluster`]), a fresh database per test ([`fresh_database`]), and helpers to build a
//! pgtide config for it, start pgtide, and connect with tokio-postgres.
//!
//! The cluster lives in a `static` and is never dropped; `LocalCluster` stops it and
//! removes its directory when the test process exits (atexit handler, plus a watchdog for
//! a killed process). Without PostgreSQL server binaries the tests panic, never pass.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use pgtide::config::{AuthType, Config, Database, General, User};
use pgtide::demo::{quote_ident, ClusterOptions, LocalCluster};

/// The superuser role created in the shared cluster (SCRAM), owner of its databases.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "apppass";
/// The database created with the cluster.
pub const APP_DB: &str = "app";

static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cluster shared by every test of this process, started on first use.
pub fn cluster() -> &'static LocalCluster {
    CLUSTER.get_or_init(|| {
        let opts = ClusterOptions {
            users: vec![(APP_USER.to_string(), APP_PASSWORD.to_string(), true)],
            databases: vec![APP_DB.to_string()],
            with_replica: true,
        };
        match LocalCluster::start(&opts) {
            Ok(c) => c,
            Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
        }
    })
}

/// Port of the primary.
pub fn primary_port() -> u16 {
    cluster().primary_port
}

/// Port of the hot-standby replica.
pub fn replica_port() -> u16 {
    cluster()
        .replica_port
        .expect("the shared test cluster has a replica")
}

/// Runs SQL as `postgres` with psql; panics with psql's stderr on failure.
pub fn psql(port: u16, db: &str, sql: &str) -> String {
    cluster()
        .psql(port, db, sql)
        .unwrap_or_else(|e| panic!("psql on port {port}, db {db}: {sql}\n{e}"))
}

/// Waits until the replica has replayed everything written on the primary so far.
pub fn wait_replica_caught_up() {
    cluster()
        .wait_replica_caught_up()
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Creates a database with a unique name (`<prefix>_<pid>_<n>`) owned by `app`, and waits
/// until the replica has it too.
pub fn fresh_database(prefix: &str) -> String {
    let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}_{}_{n}", prefix.to_ascii_lowercase(), std::process::id());
    psql(
        primary_port(),
        "postgres",
        &format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(&name),
            quote_ident(APP_USER)
        ),
    );
    wait_replica_caught_up();
    name
}

/// A pgtide config on 127.0.0.1:0 with database `db` mapped to the primary and the users
/// app/apppass (scram), pgtide_md5/md5pass (md5), pgtide_scram/scrampass (scram) and
/// pgtide_trust (trust, no password).
pub fn config_for(db: &str) -> Config {
    let mut databases = BTreeMap::new();
    databases.insert(
        db.to_string(),
        Database {
            host: "127.0.0.1".to_string(),
            port: primary_port(),
            dbname: Some(db.to_string()),
            ..Database::default()
        },
    );
    let user = |password: Option<&str>, auth: AuthType| User {
        password: password.map(str::to_string),
        auth_type: Some(auth),
        ..User::default()
    };
    let mut users = BTreeMap::new();
    users.insert(
        APP_USER.to_string(),
        user(Some(APP_PASSWORD), AuthType::ScramSha256),
    );
    users.insert(
        "pgtide_md5".to_string(),
        user(Some("md5pass"), AuthType::Md5),
    );
    users.insert(
        "pgtide_scram".to_string(),
        user(Some("scrampass"), AuthType::ScramSha256),
    );
    users.insert("pgtide_trust".to_string(), user(None, AuthType::Trust));
    Config {
        pgtide: General {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: "127.0.0.1:0".to_string(),
            ..General::default()
        },
        databases,
        users,
    }
}

/// Starts pgtide with `config`; panics if it cannot.
pub async fn start_pgtide(config: Config) -> pgtide::Pooler {
    pgtide::start(config)
        .await
        .unwrap_or_else(|e| panic!("cannot start pgtide: {e}"))
}

/// A tokio-postgres connection string for `addr`; an empty password is left out.
pub fn tcp_connect_string(addr: SocketAddr, user: &str, password: &str, db: &str) -> String {
    fn q(v: &str) -> String {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
    let mut s = format!(
        "host={} port={} user={} dbname={}",
        addr.ip(),
        addr.port(),
        q(user),
        q(db)
    );
    if !password.is_empty() {
        s.push_str(&format!(" password={}", q(password)));
    }
    s
}

/// Connects with tokio-postgres (NoTls) and drives the connection in a task.
pub async fn connect(conn_str: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Logs in through pgtide at `addr` to `db` as app (SCRAM); panics when it cannot.
pub async fn app_at(addr: SocketAddr, db: &str) -> tokio_postgres::Client {
    to(
        "connect as app",
        connect(&tcp_connect_string(addr, APP_USER, APP_PASSWORD, db)),
    )
    .await
    .unwrap_or_else(|e| panic!("app cannot connect to {addr}/{db}: {e}"))
}

/// Address of the primary or replica, for connecting straight to PostgreSQL.
pub fn direct_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The timeout every network await of a test runs under: a hang fails the test.
pub const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Awaits `f` under [`TEST_TIMEOUT`].
pub async fn to<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {TEST_TIMEOUT:?} (pgtide hang?)"),
    }
}

/// A fresh database and a pgtide for it, with `tweak` applied to the config.
pub async fn setup(
    prefix: &str,
    tweak: impl FnOnce(&mut Config),
) -> (String, pgtide::Pooler, SocketAddr) {
    let db = fresh_database(prefix);
    let mut config = config_for(&db);
    // A pool that stays busy by mistake must fail the test fast, not after 2 minutes.
    config.pgtide.query_wait_timeout = pgtide::config::ConfigDuration::secs(10);
    tweak(&mut config);
    let pooler = start_pgtide(config).await;
    let addr = pooler.local_addr();
    (db, pooler, addr)
}

/// Taken while a test starts a PostgreSQL cluster of its own, and while a test has
/// stopped one of its servers that it starts again on the same port: a cluster started
/// in that window could take the freed port, and the restarted test would then talk to a
/// stranger's server.
pub static CLUSTER_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a cluster of the test's own (off the runtime's threads, under
/// [`CLUSTER_PORTS`]); panics if it cannot.
pub async fn own_cluster(opts: pgtide::demo::ClusterOptions) -> pgtide::demo::LocalCluster {
    let _ports = CLUSTER_PORTS.lock().await;
    tokio::task::spawn_blocking(move || pgtide::demo::LocalCluster::start(&opts))
        .await
        .expect("starting a cluster panicked")
        .unwrap_or_else(|e| panic!("cannot start a cluster: {e}"))
}
