//! The hub: everything the features of a running pooler share (client sessions, the
//! admin console, reload, the listener), below all of them. The configuration in force
//! (an `ArcSwap`, swapped whole by a reload), the pool sets, the clusters and their
//! monitors, the credentials, the cancel keys, the registries of clients and servers,
//! the PAUSE gate, the prepared-statement cache, the metrics and the TLS configurations.
//!
//! Fields are private: features go through the methods, so what is shared, and how it is
//! locked, is decided here. No lock is held across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use crate::auth::sources::AuthFiles;
use crate::auth::{Credentials, ServerSecret, StoredCredential};
use crate::cancel::CancelRegistry;
use crate::cluster::{Cluster, CurrentRole, Health, MonitorHandle};
use crate::config::{Config, ConfigSource, HostRole};
use crate::metrics::stats::{Averages, StatsWindow, Totals};
use crate::metrics::{HostSample, Metrics, PrimaryCheck, Probe};
use crate::params::LoginSets;
use crate::pool::{PauseGate, Pool, PoolHooks, PoolSet, PoolSpec, PoolTimeouts, Pools};
use crate::prepared::StatementCache;
use crate::registry::{ClientEntry, Registry, ServerEntry};
use crate::server::ServerTarget;
use crate::shutdown::Phase;
use crate::tls::Tls;

/// State shared by every part of a running pooler.
pub struct Shared {
    /// The configuration in force; swapped whole by a reload.
    config: ArcSwap<Config>,
    /// Pool sets by (database, user), and each database's connection budget.
    pools: Pools,
    /// Health monitors of the databases that list more than one host; swapped by a
    /// reload.
    clusters: ArcSwap<HashMap<String, Arc<Cluster>>>,
    /// The running monitor tasks of `clusters`; dropping a handle stops them.
    monitors: Mutex<HashMap<String, MonitorHandle>>,
    /// Turns for round-robin replica choice.
    replica_turn: AtomicUsize,
    cancels: CancelRegistry,
    credentials: Credentials,
    /// Named prepared statements shared by every client (transaction mode).
    statements: StatementCache,
    metrics: Arc<Metrics>,
    /// TLS configurations for clients and servers (files read again on reload).
    tls: Arc<Tls>,
    /// Connected clients (logged in or not), for `max_client_conn`.
    connected: AtomicU32,
    /// A shutdown has begun (see [`Shared::shutdown`]).
    stopping: std::sync::atomic::AtomicBool,
    /// The login parameter sets the clients of each pool share.
    login_sets: LoginSets,
    /// Logged-in clients (admin sessions included).
    clients: Arc<Registry<ClientEntry>>,
    /// The PAUSE gate and the server registry, shared with every pool.
    hooks: PoolHooks,
    /// Where the configuration was read from (for RELOAD); `None` in zero-config mode.
    source: Mutex<Option<ConfigSource>>,
    /// The shutdown phase, for `SHUTDOWN` on the console.
    phase: OnceLock<watch::Sender<Phase>>,
    /// One reload at a time (SIGHUP and RELOAD may race).
    reload_lock: tokio::sync::Mutex<()>,
    /// `SHOW STATS`' averaging window.
    stats: Mutex<StatsWindow>,
    started: SystemTime,
}

impl Shared {
    /// `auth_files` are the contents of the files `config` names ([`AuthFiles::load`]);
    /// `tls` holds the TLS configurations read from the files it names.
    pub fn new(config: Arc<Config>, auth_files: AuthFiles, tls: Arc<Tls>) -> Arc<Shared> {
        let credentials = Credentials::new(&config, auth_files);
        let clusters = make_clusters(&config, &credentials, &tls, &HashMap::new(), |_| false);
        let statements = StatementCache::new(
            config.pgtide.prepared_statement_cache_size as usize,
            config.pgtide.prepared_statement_cache_bytes as usize,
        );
        let metrics = Arc::new(Metrics::with_collection(config.pgtide.collect_metrics));
        let peer_id = config.pgtide.peer_id;
        Arc::new(Shared {
            config: ArcSwap::new(config),
            pools: Pools::default(),
            clusters: ArcSwap::from_pointee(clusters),
            monitors: Mutex::new(HashMap::new()),
            replica_turn: AtomicUsize::new(0),
            cancels: CancelRegistry::new(peer_id),
            credentials,
            statements,
            metrics,
            tls,
            connected: AtomicU32::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
            login_sets: LoginSets::default(),
            clients: Arc::default(),
            hooks: PoolHooks::default(),
            source: Mutex::new(None),
            phase: OnceLock::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            stats: Mutex::new(StatsWindow::default()),
            started: SystemTime::now(),
        })
    }

    // ---- configuration ----------------------------------------------------------------

    /// The configuration in force (an atomic load; hold it for one use, not across a
    /// reload-sized stretch of time).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// The timeout of pgtide's own queries on a server (settings sync, reset, the
    /// auth_query lookup): `server_connect_timeout`, at least 5 s.
    pub fn internal_timeout(&self) -> std::time::Duration {
        self.config()
            .pgtide
            .server_connect_timeout
            .0
            .max(std::time::Duration::from_secs(5))
    }

    /// Replaces the configuration in force (reload).
    pub(crate) fn store_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// Where the configuration was read from; `None` in zero-config mode.
    pub fn source(&self) -> Option<ConfigSource> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_source(&self, source: Option<ConfigSource>) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// Held for the whole of a reload.
    pub(crate) fn reload_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.reload_lock
    }

    // ---- shutdown ---------------------------------------------------------------------

    pub fn set_phase(&self, phase: watch::Sender<Phase>) {
        let _ = self.phase.set(phase);
    }

    /// Starts a graceful shutdown (a signal, `SHUTDOWN`): `/readyz` says so at once;
    /// after `shutdown_delay` (0: at once; a second call: at once) pgtide stops accepting
    /// and drains.
    pub fn shutdown(&self) {
        let Some(p) = self.phase.get() else {
            return;
        };
        let drain = |p: &watch::Sender<Phase>| {
            p.send_if_modified(|p| {
                if *p < Phase::Draining {
                    *p = Phase::Draining;
                    true
                } else {
                    false
                }
            });
        };
        let first = !self.stopping.swap(true, Ordering::Relaxed);
        let delay = self.config().pgtide.shutdown_delay.0;
        if first && !delay.is_zero() {
            tracing::info!(
                shutdown_delay = %humantime::format_duration(delay),
                "shutting down: /readyz answers 503 from now on; clients are still accepted for shutdown_delay"
            );
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                drain(&p);
            });
        } else {
            drain(p);
        }
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    // ---- clusters ---------------------------------------------------------------------

    /// The health monitors by database.
    pub fn clusters(&self) -> Guard<Arc<HashMap<String, Arc<Cluster>>>> {
        self.clusters.load()
    }

    /// The monitor of `database`, if it has several hosts.
    pub fn cluster(&self, database: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(database).cloned()
    }

    /// Whether `database` has several hosts (a monitor).
    pub fn is_routed(&self, database: &str) -> bool {
        self.clusters.load().contains_key(database)
    }

    /// Starts the monitor tasks of every cluster that has none running.
    pub fn start_monitors(&self) {
        let clusters = self.clusters();
        let mut monitors = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        for (db, cluster) in clusters.iter() {
            monitors
                .entry(db.clone())
                .or_insert_with(|| cluster.spawn());
        }
    }

    /// Rebuilds the clusters for `config` (reload), keeping those for which `unchanged`
    /// holds (same `Arc`, same running monitor); monitors of clusters no longer listed
    /// stop, new ones start.
    pub(crate) fn rebuild_clusters(&self, config: &Config, unchanged: impl Fn(&str) -> bool) {
        let current = self.clusters();
        let clusters = make_clusters(config, &self.credentials, &self.tls, &current, unchanged);
        drop(current);
        let old = self.clusters.swap(Arc::new(clusters));
        let new = self.clusters();
        let mut monitors = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        for (db, cluster) in old.iter() {
            if !new.get(db).is_some_and(|c| Arc::ptr_eq(c, cluster)) {
                monitors.remove(db);
            }
        }
        for (db, cluster) in new.iter() {
            monitors
                .entry(db.clone())
                .or_insert_with(|| cluster.spawn());
        }
    }

    /// Stops every monitor and waits until they have closed their connections.
    pub async fn stop_monitors(&self) {
        let handles: Vec<MonitorHandle> = self
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in handles {
            h.stop().await;
        }
    }

    /// The index of the host that takes writes for `database`: the monitor's current
    /// primary, else the host configured as primary, else the first.
    pub fn primary_host(&self, database: &str) -> usize {
        if let Some(id) = self.clusters().get(database).and_then(|c| c.primary()) {
            return id.0;
        }
        // `hosts` as configured (not `host_list()`, which copies). Without `hosts` the
        // one server is the primary, number 0.
        self.config()
            .databases
            .get(database)
            .and_then(|d| d.hosts.as_ref())
            .and_then(|hosts| hosts.iter().position(|h| h.role == HostRole::Primary))
            .unwrap_or(0)
    }

    /// The next turn of round-robin replica choice.
    pub fn next_replica_turn(&self) -> usize {
        self.replica_turn.fetch_add(1, Ordering::Relaxed)
    }

    // ---- pools ------------------------------------------------------------------------

    /// The pools of (database, user), made on first use. `None` when the database is not
    /// configured.
    pub fn pool_set(&self, database: &str, user: &str) -> Option<Arc<PoolSet>> {
        let config = self.config();
        let max_db = config.pool_settings(database, user).max_db_connections;
        self.pools.get_or_make(database, user, max_db, || {
            self.pool_spec(&config, database, user)
        })
    }

    /// The pool of (database, user) on the host that takes writes now.
    pub fn primary_pool(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let set = self.pool_set(database, user)?;
        let pool = set
            .host(self.primary_host(database))
            .unwrap_or_else(|| set.first());
        Some(pool.clone())
    }

    /// What the pools of (database, user) are made from under `config`; `None` when the
    /// database is not configured.
    pub(crate) fn pool_spec(
        &self,
        config: &Config,
        database: &str,
        user: &str,
    ) -> Option<PoolSpec> {
        let db = config.databases.get(database)?;
        let hosts = db.host_list();
        let secret = self.server_secret(database, user);
        let tls = self.tls.server(database);
        let dbname = db.dbname.clone().unwrap_or_else(|| database.to_string());
        let targets = if hosts.is_empty() {
            vec![(db.host.clone(), db.port)]
        } else {
            hosts.iter().map(|h| (h.host.clone(), h.port)).collect()
        }
        .into_iter()
        .map(|(host, port)| ServerTarget {
            host,
            port,
            dbname: dbname.clone(),
            user: user.to_string(),
            secret: secret.clone(),
            tls: tls.clone(),
        })
        .collect();
        Some(PoolSpec {
            targets,
            settings: config.pool_settings(database, user),
            timeouts: pool_timeouts(config),
            salted: self.credentials.salted.clone(),
            metrics: self.metrics.pool(database, user),
            hooks: self.hooks.clone(),
            routing: (hosts.len() > 1)
                .then(|| config.cluster_settings(database, user))
                .flatten()
                .map(|s| s.routing),
        })
    }

    /// Every pool set.
    pub fn pool_sets(&self) -> Vec<Arc<PoolSet>> {
        self.pools.sets()
    }

    /// Every pool made so far, for maintenance, the metrics and the console.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.pools()
    }

    /// Takes the sets matching `remove` out of service (reload, KILL).
    pub(crate) fn retire_sets(&self, remove: impl FnMut(&PoolSet) -> bool) {
        self.pools.retire(remove);
    }

    /// The connection budget of `database`, if a set of it was made.
    pub(crate) fn db_limit(&self, database: &str) -> Option<Arc<crate::pool::DbLimit>> {
        self.pools.limit(database)
    }

    /// The PAUSE gate.
    pub fn gate(&self) -> &PauseGate {
        &self.hooks.gate
    }

    // ---- clients and servers ----------------------------------------------------------

    /// Logged-in clients (admin sessions included).
    pub fn clients(&self) -> &Arc<Registry<ClientEntry>> {
        &self.clients
    }

    /// Open server connections.
    pub fn servers(&self) -> &Arc<Registry<ServerEntry>> {
        &self.hooks.servers
    }

    /// Counts a new client connection in, until the returned slot drops; also says how
    /// many are connected now (this one included).
    pub fn connect_client(self: &Arc<Self>) -> (ConnectedClient, u32) {
        let n = self.connected.fetch_add(1, Ordering::AcqRel) + 1;
        (ConnectedClient(self.clone()), n)
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> u32 {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn cancels(&self) -> &CancelRegistry {
        &self.cancels
    }

    /// Handles a CancelRequest: a key another peer handed out goes to that peer (unless
    /// a peer `forwarded` it here: then it is looked up here only); this process's keys
    /// cancel the query their client is running. Unknown keys cancel nothing.
    pub async fn cancel_request(&self, pid: i32, secret: i32, forwarded: bool) {
        let config = self.config();
        let timeout = config.pgtide.server_connect_timeout.0;
        if let Some(owner) = self.cancels.owner(secret).filter(|_| !forwarded) {
            let addr = config
                .pgtide
                .peers
                .iter()
                .find(|(id, _)| id.parse::<u32>() == Ok(owner))
                .and_then(|(_, a)| a.parse::<std::net::SocketAddr>().ok());
            drop(config);
            match addr {
                Some(addr) => {
                    if let Err(e) = crate::cancel::forward(addr, pid, secret, timeout).await {
                        tracing::warn!(peer = owner, %addr, error = %e, "could not forward a cancel request to its peer");
                    }
                }
                None => tracing::debug!(
                    peer = owner,
                    "cancel request for a peer that is not in [pgtide.peers]; ignored"
                ),
            }
            return;
        }
        drop(config);
        self.cancels.cancel(pid, secret, timeout).await;
    }

    /// Whether a shutdown has begun, its delay included (`/readyz` then says so).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn login_sets(&self) -> &LoginSets {
        &self.login_sets
    }

    pub fn statements(&self) -> &StatementCache {
        &self.statements
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    // ---- credentials ------------------------------------------------------------------

    /// Every credential pgtide holds (the caches, the failed-login table).
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The configured credential of `user` (`[users]`, else `auth_file`).
    pub fn credential(&self, user: &str) -> Option<Arc<StoredCredential>> {
        self.credentials.credential(&self.config(), user)
    }

    /// The current `auth_file` and `auth_hba_file` contents.
    pub fn auth_files(&self) -> Arc<AuthFiles> {
        self.credentials.auth_files()
    }

    /// Replaces the `auth_file` and `auth_hba_file` contents (see
    /// [`Credentials::set_auth_files`]; runs PBKDF2: call it off the async workers).
    pub fn set_auth_files(&self, files: AuthFiles) {
        self.credentials.set_auth_files(&self.config(), files);
    }

    /// Whether `user` is in `[users]` or the `auth_file`.
    pub fn is_static_user(&self, user: &str) -> bool {
        self.credentials.is_static_user(&self.config(), user)
    }

    /// What the pools of (database, user) log in to servers with.
    pub fn server_secret(&self, database: &str, user: &str) -> ServerSecret {
        self.credentials
            .server_secret(&self.config(), database, user)
    }

    // ---- SHOW STATS ---------------------------------------------------------------------

    /// Per-database totals since start, summed over the pool sets' metric handles.
    pub fn totals(&self) -> HashMap<String, Totals> {
        let mut out: HashMap<String, Totals> = HashMap::new();
        for set in self.pool_sets() {
            out.entry(set.database.clone())
                .or_default()
                .add(&set.metrics);
        }
        out
    }

    /// Takes the snapshot that ends a stats period.
    pub fn record_stats(&self) {
        let totals = self.totals();
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(Instant::now(), totals);
    }

    /// The averages of the last complete stats period.
    pub fn averages(&self) -> HashMap<String, Averages> {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .averages()
    }
}

/// One client connection counted in [`Shared::client_count`]; dropping it (when the
/// client's task ends) counts the client out.
pub struct ConnectedClient(Arc<Shared>);

impl ConnectedClient {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for ConnectedClient {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Timeouts and retry policy of every pool under `config`.
pub(crate) fn pool_timeouts(config: &Config) -> PoolTimeouts {
    let g = &config.pgtide;
    PoolTimeouts {
        connect_timeout: g.server_connect_timeout.0,
        connect_retries: g.server_connect_retries,
        connect_backoff: g.server_connect_backoff.0,
        idle_timeout: g.server_idle_timeout.enabled(),
        lifetime: g.server_lifetime.enabled(),
        max_message: g.max_message_size,
    }
}

/// The clusters of `config`'s databases with several hosts; for a database where
/// `unchanged` holds, the one in `current`.
fn make_clusters(
    config: &Config,
    credentials: &Credentials,
    tls: &Tls,
    current: &HashMap<String, Arc<Cluster>>,
    unchanged: impl Fn(&str) -> bool,
) -> HashMap<String, Arc<Cluster>> {
    // The health monitors may log in as an auth_file user (name order).
    let file_users = credentials.file_users();
    config
        .databases
        .iter()
        .filter(|(_, d)| d.host_list().len() > 1)
        .filter_map(|(name, _)| {
            let cluster = match current.get(name) {
                Some(c) if unchanged(name) => Some(c.clone()),
                _ => Cluster::from_config(
                    config,
                    name,
                    credentials.salted.clone(),
                    &file_users,
                    tls.server(name),
                ),
            };
            cluster.map(|c| (name.clone(), c))
        })
        .collect()
}

impl Probe for Shared {
    fn refresh(&self) {
        let config = self.config();
        let pools = self.pools();
        for name in config.databases.keys() {
            let open: u32 = pools
                .iter()
                .filter(|p| &p.database == name)
                .map(|p| p.counts().0)
                .sum();
            let limit = config.pool_settings(name, "").max_db_connections;
            self.metrics.set_db_connections(name, limit, open);
        }
        drop(config);
        for set in self.pool_sets() {
            let mut longest = Duration::ZERO;
            for (_, pool) in set.pools() {
                pool.metrics
                    .set_servers(&pool.target().address(), pool.server_counts());
                longest = longest.max(pool.longest_wait());
            }
            set.metrics.set_longest_wait(longest);
        }
        for (database, cluster) in self.clusters().iter() {
            for h in cluster.snapshot() {
                self.metrics.set_host(
                    database,
                    &HostSample {
                        addr: &h.addr,
                        up: h.up,
                        role: match h.current_role {
                            CurrentRole::Primary => "primary",
                            CurrentRole::Replica => "replica",
                            CurrentRole::Unknown => "unknown",
                        },
                        health: match h.health {
                            Health::Up => "up",
                            Health::Down => "down",
                            Health::Unknown => "unknown",
                        },
                        lag_bytes: h.lag_bytes,
                        lag_seconds: h.lag_seconds,
                        timeline: h.timeline,
                        passed_over: h.passed_over.is_some(),
                    },
                );
            }
            self.metrics
                .set_writes_refused(database, cluster.write_refusal().is_some());
        }
    }

    fn stopping(&self) -> bool {
        self.is_stopping()
    }

    fn primaries(&self) -> Vec<PrimaryCheck> {
        let mut out = Vec::new();
        let config = self.config();
        let clusters = self.clusters();
        for (name, db) in &config.databases {
            if let Some(cluster) = clusters.get(name) {
                let state = match cluster.primary().and_then(|id| cluster.host(id)) {
                    Some(h) if h.up => Ok(()),
                    Some(h) => Err(format!("the primary {} is down", h.addr)),
                    None => Err(cluster.write_refusal().map_or_else(
                        || "no host is up and out of recovery (no primary)".to_string(),
                        |why| format!("writes refused: {why}"),
                    )),
                };
                out.push(PrimaryCheck::Known {
                    database: name.clone(),
                    state,
                });
            } else {
                let hosts = db.host_list();
                let primary = hosts
                    .iter()
                    .find(|h| h.role == HostRole::Primary)
                    .or(hosts.first());
                if let Some(h) = primary {
                    out.push(PrimaryCheck::Connect {
                        database: name.clone(),
                        host: h.host.clone(),
                        port: h.port,
                    });
                }
            }
        }
        out
    }
}
