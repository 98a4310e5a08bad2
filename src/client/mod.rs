//! Client sessions: the accept loop, the state every session shares (pools, credentials,
//! the cancel-key registry), and one task per client that logs it in ([`login`]) and runs
//! its transactions ([`session`]).

mod cancel;
mod login;
pub mod params;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::auth::{CredentialCache, SaltedPasswordCache, StoredCredential};
use crate::config::Config;
use crate::metrics::{Metrics, Probe};
use crate::pool::{DbLimit, Pool, PoolTimeouts};
use crate::prepared::StatementCache;
use crate::server::ServerTarget;
use crate::shutdown::{Phase, ShutdownController, ShutdownSignal};

pub use cancel::CancelRegistry;

/// State shared by every client session.
pub struct Shared {
    pub config: Arc<Config>,
    /// Pools by (database, user, host index in the database's host list).
    pools: Mutex<HashMap<(String, String, usize), Arc<Pool>>>,
    /// Health monitors of the databases that list more than one host.
    pub clusters: HashMap<String, Arc<crate::cluster::Cluster>>,
    /// Turns for round-robin replica choice.
    pub replica_turn: std::sync::atomic::AtomicUsize,
    db_limits: Mutex<HashMap<String, Arc<DbLimit>>>,
    pub cancels: CancelRegistry,
    pub credentials: CredentialCache,
    pub salted: Arc<SaltedPasswordCache>,
    /// Named prepared statements shared by every client (transaction mode).
    pub statements: StatementCache,
    pub metrics: Arc<Metrics>,
    clients: AtomicU32,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Arc<Shared> {
        let credentials = CredentialCache::default();
        // Derive every SCRAM verifier now, once, rather than during a login.
        for (user, u) in &config.users {
            if let Some(password) = &u.password {
                credentials.get(user, password);
            }
        }
        let salted = Arc::new(SaltedPasswordCache::default());
        let clusters = config
            .databases
            .iter()
            .filter(|(_, d)| d.host_list().len() > 1)
            .filter_map(|(name, _)| {
                crate::cluster::Cluster::from_config(&config, name, salted.clone())
                    .map(|c| (name.clone(), c))
            })
            .collect();
        let statements = StatementCache::new(
            config.pgtide.prepared_statement_cache_size as usize,
            config.pgtide.prepared_statement_cache_bytes as usize,
        );
        Arc::new(Shared {
            config,
            pools: Mutex::new(HashMap::new()),
            clusters,
            replica_turn: std::sync::atomic::AtomicUsize::new(0),
            db_limits: Mutex::new(HashMap::new()),
            cancels: CancelRegistry::default(),
            credentials,
            salted,
            statements,
            metrics: Arc::new(Metrics::new()),
            clients: AtomicU32::new(0),
        })
    }

    /// The configured credential of `user`, parsed (and for a plain password, its SCRAM
    /// verifier derived) once.
    pub fn credential(&self, user: &str) -> Option<Arc<StoredCredential>> {
        let password = self.config.users.get(user)?.password.as_deref()?;
        Some(self.credentials.get(user, password))
    }

    /// The index of the host that takes writes for `database`: the monitor's current
    /// primary, else the host configured as primary, else the first.
    pub fn primary_host(&self, database: &str) -> usize {
        if let Some(id) = self.clusters.get(database).and_then(|c| c.primary()) {
            return id.0;
        }
        // `hosts` as configured (not `host_list()`, which copies): this runs for every
        // transaction. Without `hosts` the one server is the primary, number 0.
        self.config
            .databases
            .get(database)
            .and_then(|d| d.hosts.as_ref())
            .and_then(|hosts| {
                hosts
                    .iter()
                    .position(|h| h.role == crate::config::HostRole::Primary)
            })
            .unwrap_or(0)
    }

    /// The pool for (database, user) on the primary, created on first use. `None` when
    /// the database is not configured.
    pub fn pool(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        self.pool_on(database, user, self.primary_host(database))
    }

    /// The pool for (database, user) on the database's host number `host`.
    pub fn pool_on(&self, database: &str, user: &str, host: usize) -> Option<Arc<Pool>> {
        let key = (database.to_string(), user.to_string(), host);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(&key) {
            return Some(p.clone());
        }
        let db = self.config.databases.get(database)?;
        let settings = self.config.pool_settings(database, user);
        let g = &self.config.pgtide;
        let limit = {
            let mut limits = self.db_limits.lock().unwrap_or_else(|e| e.into_inner());
            limits
                .entry(database.to_string())
                .or_insert_with(|| DbLimit::new(settings.max_db_connections))
                .clone()
        };
        let hosts = db.host_list();
        let (host, port) = hosts
            .get(host)
            .map_or((db.host.clone(), db.port), |h| (h.host.clone(), h.port));
        let target = ServerTarget {
            host,
            port,
            dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
            user: user.to_string(),
            secret: self.credential(user),
        };
        let timeouts = PoolTimeouts {
            connect_timeout: g.server_connect_timeout.0,
            connect_retries: g.server_connect_retries,
            connect_backoff: g.server_connect_backoff.0,
            idle_timeout: g.server_idle_timeout.enabled(),
            lifetime: g.server_lifetime.enabled(),
            max_message: g.max_message_size,
        };
        let pool = Pool::new(
            target,
            settings,
            timeouts,
            self.salted.clone(),
            limit,
            self.metrics.pool(database, user),
        );
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// Every pool, for maintenance and shutdown.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> u32 {
        self.clients.load(Ordering::Relaxed)
    }
}

impl Probe for Shared {
    fn refresh(&self) {
        for pool in self.pools() {
            let (total, idle, _) = pool.counts();
            pool.metrics.set_pool_state(
                i64::from(total) - idle as i64,
                idle as i64,
                pool.longest_wait(),
            );
        }
    }

    fn servers(&self) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = self
            .config
            .databases
            .values()
            .flat_map(|d| d.host_list())
            .map(|h| (h.host, h.port))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Accepts clients until shutdown, then waits for the sessions to end.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    controller: ShutdownController,
) {
    let mut signal = controller.signal();
    let maintenance = tokio::spawn(maintain(shared.clone(), controller.signal()));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => spawn_client(stream, &shared, controller.signal()),
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = signal.reached(Phase::Draining) => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no longer accepting clients");
    let timeout = shared.config.pgtide.shutdown_timeout.0;
    let phase = controller.sender();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let _ = phase.send(Phase::Now);
    });
    drop(signal);
    controller.wait().await;
    timer.abort();
    let _ = maintenance.await;
    for pool in shared.pools() {
        pool.close_idle();
    }
    // Let the Terminate messages of the closed connections go out.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn spawn_client(stream: TcpStream, shared: &Arc<Shared>, signal: ShutdownSignal) {
    let shared = shared.clone();
    let n = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let over_limit = n > shared.config.pgtide.max_client_conn;
    tokio::spawn(async move {
        let _ = stream.set_nodelay(true);
        session::run(stream, &shared, signal, over_limit).await;
        shared.clients.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Every second: reap idle and old server connections, keep `min_pool_size`.
async fn maintain(shared: Arc<Shared>, mut signal: ShutdownSignal) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for pool in shared.pools() {
                    pool.maintain();
                    // Clients held back by max_db_connections get a connection as soon
                    // as another pool of their database has an idle one.
                    pool.grow_for_waiters();
                }
            }
            _ = signal.reached(Phase::Draining) => return,
        }
    }
}
