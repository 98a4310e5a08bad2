//! The pools of one (database, user) — one per host of the database — and the registry
//! of every such set.
//!
//! A client resolves its [`PoolSet`] once, at login; a transaction then picks a host by
//! index ([`PoolSet::host`]: a lock-free read once that host's pool exists), with no map
//! lookup and no key allocation. A host's pool is made the first time a transaction
//! needs it, from the set's [`PoolSpec`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{DbLimit, Pool, PoolHooks, PoolTimeouts};
use crate::auth::SaltedPasswordCache;
use crate::config::{PoolSettings, RoutingSettings};
use crate::metrics::PoolMetrics;
use crate::server::ServerTarget;

/// What every pool of a set is made from.
pub struct PoolSpec {
    /// One server target per host, in the database's host order.
    pub targets: Vec<ServerTarget>,
    pub settings: PoolSettings,
    pub timeouts: PoolTimeouts,
    pub salted: Arc<SaltedPasswordCache>,
    /// The (database, user) metric handles, shared by the pools of every host.
    pub metrics: PoolMetrics,
    pub hooks: PoolHooks,
    /// The database's routing settings for this user (`None` with one host).
    pub routing: Option<RoutingSettings>,
}

/// The pools of one (database, user), by host index.
pub struct PoolSet {
    pub database: String,
    pub user: String,
    /// The (database, user) metric handles, shared by the pools of every host.
    pub metrics: PoolMetrics,
    spec: Mutex<PoolSpec>,
    /// `spec.routing`, readable without the lock on every transaction.
    routing: arc_swap::ArcSwapOption<RoutingSettings>,
    limit: Arc<DbLimit>,
    /// The pool of host 0, made with the set: every set has one.
    first: Arc<Pool>,
    /// The pools of hosts 1 and up, made on first use.
    rest: Box<[OnceLock<Arc<Pool>>]>,
    retired: AtomicBool,
}

impl PoolSet {
    /// `None` when `spec` names no host.
    fn new(database: &str, user: &str, spec: PoolSpec, limit: Arc<DbLimit>) -> Option<PoolSet> {
        let first = make_pool(&spec, spec.targets.first()?.clone(), &limit);
        let rest = (1..spec.targets.len()).map(|_| OnceLock::new()).collect();
        Some(PoolSet {
            database: database.to_string(),
            user: user.to_string(),
            metrics: spec.metrics.clone(),
            routing: arc_swap::ArcSwapOption::from(spec.routing.clone().map(Arc::new)),
            spec: Mutex::new(spec),
            limit,
            first,
            rest,
            retired: AtomicBool::new(false),
        })
    }

    fn spec(&self) -> std::sync::MutexGuard<'_, PoolSpec> {
        self.spec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool of host 0 (the only host of a database with one).
    pub fn first(&self) -> &Arc<Pool> {
        &self.first
    }

    /// The pool of host number `host`, made on first use; `None` past the host list.
    pub fn host(&self, host: usize) -> Option<&Arc<Pool>> {
        if host == 0 {
            return Some(&self.first);
        }
        let slot = self.rest.get(host - 1)?;
        if let Some(pool) = slot.get() {
            return Some(pool);
        }
        let spec = self.spec();
        let target = spec.targets.get(host)?.clone();
        Some(slot.get_or_init(|| {
            let pool = make_pool(&spec, target, &self.limit);
            if self.is_retired() {
                pool.retire();
            }
            pool
        }))
    }

    /// The pool of host `host` if it was made.
    pub fn made(&self, host: usize) -> Option<&Arc<Pool>> {
        match host {
            0 => Some(&self.first),
            n => self.rest.get(n - 1)?.get(),
        }
    }

    /// Every pool made so far, with its host index.
    pub fn pools(&self) -> impl Iterator<Item = (usize, &Arc<Pool>)> {
        std::iter::once((0, &self.first)).chain(
            self.rest
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.get().map(|p| (i + 1, p))),
        )
    }

    /// The server targets the set's pools log in to, by host.
    pub fn targets(&self) -> Vec<ServerTarget> {
        self.spec().targets.clone()
    }

    /// The connection budget of the set's database.
    pub fn limit(&self) -> &Arc<DbLimit> {
        &self.limit
    }

    /// The routing settings of the set's (database, user): `None` for a database with
    /// one host. An atomic load.
    pub fn routing(&self) -> arc_swap::Guard<Option<Arc<RoutingSettings>>> {
        self.routing.load()
    }

    /// Applies reloaded settings to the pools made so far and to those made later.
    pub fn update(
        &self,
        settings: PoolSettings,
        timeouts: PoolTimeouts,
        routing: Option<RoutingSettings>,
    ) {
        {
            let mut spec = self.spec();
            spec.settings = settings.clone();
            spec.timeouts = timeouts.clone();
            spec.routing = routing.clone();
        }
        self.routing.store(routing.map(Arc::new));
        for (_, pool) in self.pools() {
            pool.update(settings.clone(), timeouts.clone());
        }
    }

    /// Takes the set out of service (a reload replaced it, its database is gone, KILL):
    /// every pool of it closes its connections, the busy ones when released.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        for (_, pool) in self.pools() {
            pool.retire();
        }
    }

    /// Whether [`Self::retire`] took the set out of service (no lock).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

fn make_pool(spec: &PoolSpec, target: ServerTarget, limit: &Arc<DbLimit>) -> Arc<Pool> {
    Pool::new(
        target,
        spec.settings.clone(),
        spec.timeouts.clone(),
        spec.salted.clone(),
        limit.clone(),
        spec.metrics.clone(),
        spec.hooks.clone(),
    )
}

/// Every pool set, by (database, user), and the connection budget of each database.
#[derive(Default)]
pub struct Pools {
    sets: Mutex<HashMap<(String, String), Arc<PoolSet>>>,
    limits: Mutex<HashMap<String, Arc<DbLimit>>>,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<PoolSet>>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The set of (database, user); made with `make` (and the database's budget of
    /// `max_db_connections`, made on first use) when there is none. `None` when `make`
    /// says the pair has no pools (the database is not configured).
    pub fn get_or_make(
        &self,
        database: &str,
        user: &str,
        max_db_connections: u32,
        make: impl FnOnce() -> Option<PoolSpec>,
    ) -> Option<Arc<PoolSet>> {
        let mut sets = self.lock();
        if let Some(s) = sets.get(&(database.to_string(), user.to_string())) {
            return Some(s.clone());
        }
        let spec = make()?;
        let limit = self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(database.to_string())
            .or_insert_with(|| DbLimit::new(max_db_connections))
            .clone();
        let set = Arc::new(PoolSet::new(database, user, spec, limit)?);
        sets.insert((database.to_string(), user.to_string()), set.clone());
        Some(set)
    }

    /// Every set.
    pub fn sets(&self) -> Vec<Arc<PoolSet>> {
        self.lock().values().cloned().collect()
    }

    /// Every pool made so far, for maintenance, the metrics and the console.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.lock()
            .values()
            .flat_map(|s| s.pools().map(|(_, p)| p.clone()).collect::<Vec<_>>())
            .collect()
    }

    /// Takes the sets matching `remove` out of the registry and retires them (reload,
    /// KILL): their clients get a new set at their next transaction.
    pub fn retire(&self, mut remove: impl FnMut(&PoolSet) -> bool) {
        let retired: Vec<Arc<PoolSet>> = {
            let mut sets = self.lock();
            let keys: Vec<_> = sets
                .iter()
                .filter(|(_, s)| remove(s))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| sets.remove(k)).collect()
        };
        for set in retired {
            set.retire();
        }
    }

    /// The connection budget of `database`, if a set of it was made.
    pub fn limit(&self, database: &str) -> Option<Arc<DbLimit>> {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(database)
            .cloned()
    }
}
