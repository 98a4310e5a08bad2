//! Client sessions: the accept loop, the state every session shares (pools, credentials,
//! the cancel-key registry), and one task per client that logs it in ([`login`]) and runs
//! its transactions ([`session`]).

mod authn;
mod cancel;
mod login;
pub mod params;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::sources::{AuthFiles, AuthQueryCache};
use crate::auth::throttle::FailedLogins;
use crate::auth::{CredentialCache, SaltedPasswordCache, ServerSecret, StoredCredential};
use crate::cluster::{Cluster, CurrentRole, Health, MonitorHandle};
use crate::config::Config;
use crate::metrics::{HostSample, Metrics, PrimaryCheck, Probe};
use crate::pool::{DbLimit, Pool, PoolTimeouts};
use crate::prepared::StatementCache;
use crate::server::ServerTarget;
use crate::shutdown::{Phase, ShutdownController, ShutdownSignal};

pub use cancel::CancelRegistry;
pub use login::Peer;

/// State shared by every client session.
pub struct Shared {
    /// The configuration in force; swapped whole by a reload. Read it with
    /// [`Shared::config`] (no lock: an atomic load).
    config: ArcSwap<Config>,
    /// Pools by (database, user, host index in the database's host list).
    pools: Mutex<HashMap<(String, String, usize), Arc<Pool>>>,
    /// Health monitors of the databases that list more than one host; swapped by a
    /// reload. Read with [`Shared::clusters`].
    clusters: ArcSwap<HashMap<String, Arc<Cluster>>>,
    /// The running monitor tasks of `clusters`; dropping a handle stops them.
    monitors: Mutex<HashMap<String, MonitorHandle>>,
    /// Turns for round-robin replica choice.
    pub replica_turn: std::sync::atomic::AtomicUsize,
    db_limits: Mutex<HashMap<String, Arc<DbLimit>>>,
    pub cancels: CancelRegistry,
    pub credentials: CredentialCache,
    pub salted: Arc<SaltedPasswordCache>,
    /// `auth_file` users and `auth_hba_file` rules; replaced by [`Self::set_auth_files`].
    auth_files: std::sync::RwLock<Arc<AuthFiles>>,
    /// Secrets fetched with `auth_query`.
    pub auth_cache: AuthQueryCache,
    /// Consecutive failed logins per client address (the slowdown).
    pub failed_logins: FailedLogins,
    /// What the pools of (database, user) log in to servers with.
    server_secrets: Mutex<HashMap<(String, String), ServerSecret>>,
    /// Named prepared statements shared by every client (transaction mode).
    pub statements: StatementCache,
    pub metrics: Arc<Metrics>,
    /// TLS configurations for clients and servers (swapped on reload).
    pub tls: Arc<crate::tls::Tls>,
    clients: AtomicU32,
    /// The login parameter sets the clients of each pool share.
    pub login_sets: params::LoginSets,
    /// Admin console state: client and server registries, PAUSE, reload source.
    pub admin: crate::admin::AdminState,
}

impl Shared {
    /// `auth_files` are the contents of the files `config` names ([`AuthFiles::load`]);
    /// `tls` holds the TLS configurations read from the files it names.
    pub fn new(
        config: Arc<Config>,
        auth_files: AuthFiles,
        tls: Arc<crate::tls::Tls>,
    ) -> Arc<Shared> {
        let credentials = CredentialCache::default();
        // Derive every SCRAM verifier now, once, rather than during a login.
        for (user, u) in &config.users {
            if let Some(password) = &u.password {
                credentials.get(user, password);
            }
        }
        warm(&credentials, &auth_files);
        let g = &config.pgtide;
        let auth_cache = AuthQueryCache::new(g.auth_query_cache_ttl.0);
        let failed_logins = FailedLogins::new(
            g.auth_failure_threshold,
            g.auth_failure_delay.0,
            g.auth_failure_delay_max.0,
        );
        let salted = Arc::new(SaltedPasswordCache::default());
        // The health monitors may log in as an auth_file user (name order).
        let file_users = file_users(&auth_files);
        let clusters = config
            .databases
            .iter()
            .filter(|(_, d)| d.host_list().len() > 1)
            .filter_map(|(name, _)| {
                Cluster::from_config(&config, name, salted.clone(), &file_users, tls.server(name))
                    .map(|c| (name.clone(), c))
            })
            .collect();
        let statements = StatementCache::new(
            config.pgtide.prepared_statement_cache_size as usize,
            config.pgtide.prepared_statement_cache_bytes as usize,
        );
        let metrics = Arc::new(Metrics::with_collection(config.pgtide.collect_metrics));
        Arc::new(Shared {
            config: ArcSwap::new(config),
            pools: Mutex::new(HashMap::new()),
            clusters: ArcSwap::from_pointee(clusters),
            monitors: Mutex::new(HashMap::new()),
            replica_turn: std::sync::atomic::AtomicUsize::new(0),
            db_limits: Mutex::new(HashMap::new()),
            cancels: CancelRegistry::default(),
            credentials,
            salted,
            auth_files: std::sync::RwLock::new(Arc::new(auth_files)),
            auth_cache,
            failed_logins,
            server_secrets: Mutex::new(HashMap::new()),
            statements,
            metrics,
            tls,
            clients: AtomicU32::new(0),
            login_sets: params::LoginSets::default(),
            admin: crate::admin::AdminState::default(),
        })
    }

    /// The configuration in force (an atomic load; hold it for one use, not across a
    /// reload-sized stretch of time).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// Replaces the configuration in force (reload).
    pub(crate) fn store_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// The health monitors by database.
    pub fn clusters(&self) -> Guard<Arc<HashMap<String, Arc<Cluster>>>> {
        self.clusters.load()
    }

    /// The monitor of `database`, if it has several hosts.
    pub fn cluster(&self, database: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(database).cloned()
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

    /// Replaces the clusters (reload): monitors of clusters no longer listed stop, new
    /// ones start. A cluster kept (same `Arc`) keeps its running monitor.
    pub(crate) fn replace_clusters(&self, clusters: HashMap<String, Arc<Cluster>>) {
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

    /// Takes the pools matching `remove` out of the map (reload, KILL) and retires them.
    pub(crate) fn retire_pools(
        &self,
        mut remove: impl FnMut(&(String, String, usize), &Pool) -> bool,
    ) {
        let retired: Vec<Arc<Pool>> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<_> = pools
                .iter()
                .filter(|(k, p)| remove(k, p))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| pools.remove(k)).collect()
        };
        for pool in retired {
            pool.retire();
        }
    }

    /// The connection limit of `database`, if a pool of it was made.
    pub(crate) fn db_limit(&self, database: &str) -> Option<Arc<DbLimit>> {
        self.db_limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(database)
            .cloned()
    }

    /// The server-side target and timeouts a pool for (database, user, host) gets under
    /// `config`; `None` when the database or host is not configured.
    pub(crate) fn pool_target(
        &self,
        config: &Config,
        database: &str,
        user: &str,
        host: usize,
    ) -> Option<(crate::server::ServerTarget, PoolTimeouts)> {
        let db = config.databases.get(database)?;
        let hosts = db.host_list();
        let (h, port) = match hosts.get(host) {
            Some(h) => (h.host.clone(), h.port),
            None if host == 0 => (db.host.clone(), db.port),
            None => return None,
        };
        let target = ServerTarget {
            host: h,
            port,
            dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
            user: user.to_string(),
            secret: self.server_secret(database, user),
            tls: self.tls.server(database),
        };
        let g = &config.pgtide;
        let timeouts = PoolTimeouts {
            connect_timeout: g.server_connect_timeout.0,
            connect_retries: g.server_connect_retries,
            connect_backoff: g.server_connect_backoff.0,
            idle_timeout: g.server_idle_timeout.enabled(),
            lifetime: g.server_lifetime.enabled(),
            max_message: g.max_message_size,
        };
        Some((target, timeouts))
    }

    /// The configured credential of `user` (its `[users]` password, else its `auth_file`
    /// password), parsed (and for a plain password, its SCRAM verifier derived) once.
    pub fn credential(&self, user: &str) -> Option<Arc<StoredCredential>> {
        let password = self
            .config()
            .users
            .get(user)
            .and_then(|u| u.password.as_deref())
            .map(str::to_owned)
            .or_else(|| {
                let files = self.auth_files();
                Some(files.users.as_ref()?.get(user).flatten()?.to_owned())
            })?;
        Some(self.credentials.get(user, &password))
    }

    /// The current `auth_file` and `auth_hba_file` contents.
    pub fn auth_files(&self) -> Arc<AuthFiles> {
        self.auth_files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the `auth_file` and `auth_hba_file` contents (a reload): later logins
    /// use them, and pools of users whose configured credential changed log in to their
    /// servers with the new one. Runs PBKDF2 for new plain passwords: call it off the
    /// async workers (e.g. `spawn_blocking`).
    pub fn set_auth_files(&self, files: AuthFiles) {
        warm(&self.credentials, &files);
        *self.auth_files.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(files);
        let secrets: Vec<((String, String), ServerSecret)> = self
            .server_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((_, user), secret) in secrets {
            if let Some(cred) = self.credential(&user) {
                let stale = secret.current().is_none_or(|old| {
                    old.plain() != cred.plain() || old.md5_hash() != cred.md5_hash()
                });
                // A SCRAM secret alone cannot log in: the next client login teaches it.
                if stale && (cred.has_plain() || cred.md5_hash().is_some()) {
                    secret.set(cred);
                }
            }
        }
    }

    /// Whether `user` is in `[users]` or the `auth_file` (with or without a password).
    pub fn is_static_user(&self, user: &str) -> bool {
        self.config().users.contains_key(user)
            || self
                .auth_files()
                .users
                .as_ref()
                .is_some_and(|l| l.get(user).is_some())
    }

    /// What the pools of (database, user) log in to servers with: the configured
    /// credential, or what a client's login taught pgtide (SCRAM pass-through).
    pub fn server_secret(&self, database: &str, user: &str) -> ServerSecret {
        self.server_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((database.to_string(), user.to_string()))
            .or_insert_with(|| ServerSecret::new(self.credential(user)))
            .clone()
    }

    /// The index of the host that takes writes for `database`: the monitor's current
    /// primary, else the host configured as primary, else the first.
    pub fn primary_host(&self, database: &str) -> usize {
        if let Some(id) = self.clusters().get(database).and_then(|c| c.primary()) {
            return id.0;
        }
        // `hosts` as configured (not `host_list()`, which copies): this runs for every
        // transaction. Without `hosts` the one server is the primary, number 0.
        self.config()
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
        let config = self.config();
        let (target, timeouts) = self.pool_target(&config, database, user, host)?;
        let settings = config.pool_settings(database, user);
        let limit = {
            let mut limits = self.db_limits.lock().unwrap_or_else(|e| e.into_inner());
            limits
                .entry(database.to_string())
                .or_insert_with(|| DbLimit::new(settings.max_db_connections))
                .clone()
        };
        let pool = Pool::new(
            target,
            settings,
            timeouts,
            self.salted.clone(),
            limit,
            self.metrics.pool(database, user),
            self.admin.hooks.clone(),
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
        let mut longest: HashMap<(String, String), (Duration, Arc<Pool>)> = HashMap::new();
        for pool in self.pools() {
            pool.metrics
                .set_servers(&pool.target().address(), pool.server_counts());
            let wait = pool.longest_wait();
            let e = longest
                .entry((pool.database.clone(), pool.user.clone()))
                .or_insert((Duration::ZERO, pool.clone()));
            e.0 = e.0.max(wait);
        }
        for (wait, pool) in longest.into_values() {
            pool.metrics.set_longest_wait(wait);
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
                    },
                );
            }
        }
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
                    None => Err("no host is up and out of recovery (no primary)".to_string()),
                };
                out.push(PrimaryCheck::Known {
                    database: name.clone(),
                    state,
                });
            } else {
                let hosts = db.host_list();
                let primary = hosts
                    .iter()
                    .find(|h| h.role == crate::config::HostRole::Primary)
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

/// Derives the SCRAM verifier of every plain `auth_file` password once, now.
fn warm(credentials: &CredentialCache, files: &AuthFiles) {
    if let Some(list) = &files.users {
        for (user, password) in list.entries() {
            credentials.get(user, password);
        }
    }
}

/// The `auth_file` users and passwords in name order: the health monitors may log in as
/// one of them.
pub(crate) fn file_users(files: &AuthFiles) -> Vec<(String, String)> {
    let mut users: Vec<(String, String)> = files
        .users
        .iter()
        .flat_map(|l| l.entries())
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    users.sort();
    users
}

/// Accepts clients until shutdown, then waits for the sessions to end.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    controller: ShutdownController,
) {
    let mut signal = controller.signal();
    let maintenance = tokio::spawn(maintain(shared.clone(), controller.signal()));
    let waker = tokio::spawn(wake_clients(shared.clone(), controller.phases()));
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
    // The monitors stop: draining sessions keep the last known host states.
    shared.stop_monitors().await;
    let timeout = shared.config().pgtide.shutdown_timeout.0;
    let phase = controller.sender();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let _ = phase.send(Phase::Now);
    });
    drop(signal);
    controller.wait().await;
    timer.abort();
    waker.abort();
    let _ = maintenance.await;
    for pool in shared.pools() {
        pool.close_idle();
    }
    // Let the Terminate messages of the closed connections go out.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Wakes every logged-in client's session when the shutdown phase moves on: a session
/// waits for its client, its server, and its registry entry's wake-up (which KILL also
/// uses), not for the phase itself. Holds no [`ShutdownSignal`]: shutdown does not wait
/// for it.
async fn wake_clients(shared: Arc<Shared>, mut phases: tokio::sync::watch::Receiver<Phase>) {
    while phases.changed().await.is_ok() {
        let phase = *phases.borrow_and_update();
        for (_, client) in shared.admin.clients.snapshot() {
            client.wake();
        }
        if phase == Phase::Now {
            return;
        }
    }
}

fn spawn_client(stream: TcpStream, shared: &Arc<Shared>, signal: ShutdownSignal) {
    let n = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let over_limit = n > shared.config().pgtide.max_client_conn;
    tokio::spawn(session::run(
        stream,
        ClientSlot(shared.clone()),
        signal,
        over_limit,
    ));
}

/// One client counted in [`Shared::client_count`]; dropping it (when the client's task
/// ends) counts the client out.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When to give freed memory back to the system after clients left: glibc's malloc
/// keeps what sessions freed in its arenas (RSS stays at the peak), so after many
/// clients have gone, the maintenance tick asks it to return the free pages.
#[derive(Debug, Default)]
struct TrimAfterExodus {
    /// The most clients connected since the last trim.
    peak: u32,
}

/// Clients that must have left since the peak before memory is trimmed: below this the
/// memory is small and likely to be reused soon.
const TRIM_AFTER_LEFT: u32 = 1000;

impl TrimAfterExodus {
    /// Called every tick with the clients connected now: true when it is time to trim
    /// (at least [`TRIM_AFTER_LEFT`] clients and half of the peak have left).
    fn due(&mut self, clients: u32) -> bool {
        self.peak = self.peak.max(clients);
        let left = self.peak - clients;
        if left >= TRIM_AFTER_LEFT && left >= self.peak / 2 {
            self.peak = clients;
            return true;
        }
        false
    }
}

/// Returns freed heap memory to the system (glibc; elsewhere nothing to do).
fn trim_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Every second: reap idle and old server connections, keep `min_pool_size`, and give
/// memory back after many clients left.
async fn maintain(shared: Arc<Shared>, mut signal: ShutdownSignal) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trim = TrimAfterExodus::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if trim.due(shared.clients.load(Ordering::Relaxed)) {
                    // Off the runtime's threads: it may take milliseconds on a big heap.
                    tokio::task::spawn_blocking(trim_memory);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::userlist::UserList;

    fn files(list: &str) -> AuthFiles {
        AuthFiles {
            users: Some(UserList::parse(list).unwrap()),
            hba: None,
        }
    }

    #[test]
    fn auth_file_users_and_a_reload_reach_the_pools_credentials() {
        let mut config = Config::default();
        config
            .databases
            .insert("app".into(), crate::config::Database::default());
        config.users.insert(
            "bob".into(),
            crate::config::User {
                password: Some("config wins".into()),
                ..Default::default()
            },
        );
        let config = Arc::new(config);
        let tls = Arc::new(crate::tls::Tls::new(config.clone()).expect("no TLS files"));
        let shared = Shared::new(
            config,
            files("\"alice\" \"pw1\"\n\"bob\" \"file\"\n\"carol\" \"\"\n"),
            tls,
        );
        assert!(shared.is_static_user("alice") && shared.is_static_user("carol"));
        assert!(!shared.is_static_user("dave"));
        assert_eq!(shared.credential("alice").unwrap().plain(), Some("pw1"));
        assert_eq!(
            shared.credential("bob").unwrap().plain(),
            Some("config wins")
        );
        assert!(shared.credential("carol").is_none());
        let secret = shared.server_secret("app", "alice");
        assert_eq!(secret.current().unwrap().plain(), Some("pw1"));

        shared.set_auth_files(files("\"alice\" \"pw2\"\n"));
        assert_eq!(shared.credential("alice").unwrap().plain(), Some("pw2"));
        // The pool's handle sees the new password.
        assert_eq!(secret.current().unwrap().plain(), Some("pw2"));
        assert!(!shared.is_static_user("carol"));
    }
}

#[cfg(test)]
mod trim_tests {
    use super::*;

    #[test]
    fn trims_once_after_many_clients_left() {
        let mut t = TrimAfterExodus::default();
        assert!(!t.due(0));
        assert!(!t.due(10_000));
        // 900 left: not enough.
        assert!(!t.due(9_100));
        // Fewer than half left.
        assert!(!t.due(6_000));
        assert!(t.due(4_000), "6,000 of 10,000 left");
        // Not again until clients come and go again.
        assert!(!t.due(4_000));
        assert!(!t.due(3_500));
        assert!(t.due(1_000), "3,000 of 4,000 left");
        // Counted from the last trim.
        assert!(!t.due(500));
        assert!(t.due(0), "1,000 more left");
        // Small pools never trim.
        let mut small = TrimAfterExodus::default();
        assert!(!small.due(500));
        assert!(!small.due(0));
    }
}
