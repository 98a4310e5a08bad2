//! `pgtide demo`: a throwaway PostgreSQL primary and streaming replica ([`LocalCluster`])
//! with pgtide in front of it, until Ctrl-C or SIGTERM; then everything is stopped and
//! removed.

mod cluster;

/// `println!` that does not panic when stdout is gone (`pgtide demo | head -2`): the demo
/// goes on without its output.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub use crate::router::quote::{quote_ident, quote_literal};
pub use cluster::{find_bindir, ClusterOptions, LocalCluster};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, Database, General, HostConfig, HostRole, User};

/// Where `pgtide demo` listens unless told otherwise.
pub const DEFAULT_DEMO_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 6432);

/// How long pgtide may take to drain at the end of the demo.
const DEMO_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The pgtide configuration of the demo: database `demo` on the primary at
/// `primary_port` and, when there is one, the replica at `replica_port` (reads go
/// there); user `demo` / `demo`, also an admin of the console.
pub fn demo_config(listen: SocketAddr, primary_port: u16, replica_port: Option<u16>) -> Config {
    let host = |port: u16, role: HostRole| HostConfig {
        host: "127.0.0.1".to_string(),
        port,
        role,
        weight: 1,
    };
    let mut hosts = vec![host(primary_port, HostRole::Primary)];
    hosts.extend(replica_port.map(|p| host(p, HostRole::Replica)));
    let mut databases = BTreeMap::new();
    databases.insert(
        "demo".to_string(),
        Database {
            hosts: Some(hosts),
            dbname: Some("demo".to_string()),
            ..Database::default()
        },
    );
    let mut users = BTreeMap::new();
    users.insert(
        "demo".to_string(),
        User {
            password: Some("demo".to_string()),
            ..User::default()
        },
    );
    Config {
        pgtide: General {
            listen,
            admin_users: vec!["demo".to_string()],
            ..General::default()
        },
        databases,
        users,
    }
}

/// Runs the demo: starts a cluster (user `demo`/`demo`, database `demo`), pgtide on
/// `listen` (default 127.0.0.1:6432), prints how to connect, waits for Ctrl-C or SIGTERM,
/// then shuts pgtide down and stops and removes the cluster.
/// `metrics_listen` overrides the metrics endpoint's address ("" turns it off).
pub async fn run_demo(
    listen: Option<SocketAddr>,
    metrics_listen: Option<String>,
) -> Result<(), String> {
    let listen = listen.unwrap_or_else(|| SocketAddr::from(DEFAULT_DEMO_LISTEN));
    say!("Starting a throwaway PostgreSQL primary and streaming replica...");
    let opts = ClusterOptions {
        users: vec![("demo".to_string(), "demo".to_string(), false)],
        databases: vec!["demo".to_string()],
        with_replica: true,
    };
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&opts))
        .await
        .map_err(|e| format!("starting the cluster panicked: {e}"))??;

    let mut config = demo_config(listen, cluster.primary_port, cluster.replica_port);
    if let Some(m) = metrics_listen {
        config.pgtide.metrics_listen = m;
    }
    let pooler = match crate::listener::start(config).await {
        Ok(p) => p,
        Err(e) => {
            stop_cluster(cluster).await;
            return Err(format!(
                "cannot start pgtide on {listen}: {e} (is something else listening there? \
                 choose other addresses with --listen and --metrics-listen)"
            ));
        }
    };
    let addr = pooler.local_addr();

    say!();
    say!("pgtide is listening on {addr}, in front of:");
    say!(
        "  primary  postgres://demo:demo@127.0.0.1:{}/demo",
        cluster.primary_port
    );
    if let Some(port) = cluster.replica_port {
        say!("  replica  postgres://demo:demo@127.0.0.1:{port}/demo (hot standby)");
    }
    say!("  data     {}", cluster.dir.display());
    say!();
    say!("Connect with:");
    say!("  psql \"postgres://demo:demo@{addr}/demo\"");
    say!("  export DATABASE_URL=postgres://demo:demo@{addr}/demo");
    say!("The admin console:");
    say!("  psql \"postgres://demo:demo@{addr}/pgtide\" -c 'SHOW HOSTS' -c 'SHOW POOLS'");
    say!("Where a statement would go, and why:");
    say!("  pgtide route \"SELECT * FROM t\"");
    if let Some(m) = pooler.metrics_addr() {
        say!("Metrics: http://{m}/metrics (probes: /healthz, /readyz)");
    }
    if cluster.replica_port.is_some() {
        say!();
        say!("{}", routing_check(addr).await);
    }
    say!();
    say!("Ctrl-C to stop and remove everything.");

    let signal = wait_for_stop_signal().await;
    say!();
    say!("{signal}: shutting pgtide down...");
    pooler.shutdown();
    if tokio::time::timeout(DEMO_SHUTDOWN_WAIT, pooler.wait())
        .await
        .is_err()
    {
        say!(
            "pgtide did not finish draining within {}s; stopping anyway",
            DEMO_SHUTDOWN_WAIT.as_secs()
        );
    }
    let dir = cluster.dir.clone();
    stop_cluster(cluster).await;
    say!("Stopped PostgreSQL and removed {}. Bye.", dir.display());
    Ok(())
}

/// One line that shows routing at work: a read through pgtide answered by the replica
/// (`pg_is_in_recovery()` is true there) and a write transaction by the primary. Waits
/// (up to 10 s) for the health monitor to have seen the replica.
async fn routing_check(addr: SocketAddr) -> String {
    use crate::auth::{SaltedPasswordCache, ServerSecret, StoredCredential};
    use crate::server::{ServerConn, ServerTarget};
    let target = ServerTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        dbname: "demo".to_string(),
        user: "demo".to_string(),
        secret: ServerSecret::new(Some(std::sync::Arc::new(StoredCredential::new(
            "demo", "demo",
        )))),
        tls: crate::tls::ServerTls::disabled(),
    };
    let salted = SaltedPasswordCache::new();
    let timeout = Duration::from_secs(5);
    let recovery = |r: Result<crate::server::InternalResult, crate::server::ServerError>| {
        r.ok().and_then(|r| {
            r.rows
                .first()
                .and_then(|row| row.first().cloned().flatten())
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let Ok((mut conn, _)) = ServerConn::connect(&target, &salted, 1 << 20).await else {
            return "Routing check: could not connect through pgtide.".to_string();
        };
        let read = recovery(
            conn.run_internal("SELECT pg_is_in_recovery()", timeout)
                .await,
        );
        let write = recovery(
            conn.run_internal(
                "BEGIN READ WRITE; SELECT pg_is_in_recovery(); COMMIT",
                timeout,
            )
            .await,
        );
        conn.terminate().await;
        if read.as_deref() == Some("t") || tokio::time::Instant::now() >= deadline {
            let on = |v: Option<String>| match v.as_deref() {
                Some("t") => "the replica",
                Some("f") => "the primary",
                _ => "(no answer)",
            };
            return format!(
                "Routing check through pgtide: a read (SELECT pg_is_in_recovery()) was answered by {}, a write transaction by {}.",
                on(read),
                on(write)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn stop_cluster(mut cluster: LocalCluster) {
    // pg_ctl stop blocks; keep it off the async worker threads.
    let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM and says which one it was.
async fn wait_for_stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
