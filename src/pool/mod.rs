//! Server connection pools: one [`Pool`] per (database, user, host) with a fair FIFO
//! queue of waiting clients, limits, connect retries with back-off, and reaping of idle
//! and old connections; the pools of one (database, user) form a [`PoolSet`], held in
//! [`Pools`]; the [`Checkout`] guard is how a connection is held outside its pool;
//! `max_db_connections` is a [`DbLimit`]; PAUSE is the [`PauseGate`] every checkout
//! passes.
//!
//! A connection goes back into a pool only through [`Checkout::checkin`], which the
//! client session calls once the connection is idle (ReadyForQuery `I`, nothing pending);
//! anything else is discarded, by [`Checkout::discard`] or by dropping the guard.

mod checkout;
mod limit;
pub mod pause;
mod set;

pub use checkout::Checkout;
pub use limit::DbLimit;
pub use pause::PauseGate;
pub use set::{PoolSet, PoolSpec, Pools};

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::auth::SaltedPasswordCache;
use crate::config::PoolSettings;
use crate::metrics::{PoolMetrics, ServerCounts};
use crate::registry::{Registry, ServerEntry};
use crate::server::{LoginParams, ServerConn, ServerError, ServerTarget};

/// Timeouts and retry policy a pool needs from the config.
#[derive(Clone, Debug)]
pub struct PoolTimeouts {
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    pub connect_backoff: Duration,
    pub idle_timeout: Option<Duration>,
    pub lifetime: Option<Duration>,
    pub max_message: u32,
}

/// Why a checkout failed.
#[derive(Debug)]
pub enum CheckoutError {
    /// Every connection stayed busy for `query_wait_timeout`.
    Exhausted { waited: Duration, pool_size: u32 },
    /// The server could not be reached or refused the login, after all retries.
    Connect {
        attempts: u32,
        error: Arc<ServerError>,
    },
}

impl fmt::Display for CheckoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckoutError::Exhausted { waited, pool_size } => write!(
                f,
                "the pool is exhausted: all {pool_size} server connections stayed busy for {} (query_wait_timeout); \
                 raise pool_size or query_wait_timeout, or shorten transactions",
                humantime::format_duration(*waited)
            ),
            CheckoutError::Connect { attempts, error } => {
                write!(f, "{error} (after {attempts} attempt{})", if *attempts == 1 { "" } else { "s" })
            }
        }
    }
}

type Waiter = oneshot::Sender<Result<Handoff, Arc<ServerError>>>;

/// A connection on its way to a waiting client. If the client stopped waiting (timed
/// out, disconnected) between the send and the receive, dropping the handoff puts the
/// connection back into the pool instead of losing its slot.
struct Handoff {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
}

impl Handoff {
    fn take(mut self) -> Box<ServerConn> {
        self.conn
            .take()
            .expect("a handoff holds its connection until taken")
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

struct Inner {
    /// Idle connections; the most recently used is at the back. Boxed: a connection
    /// moves between the pool and a session by pointer, and an idle session keeps only
    /// an empty `Option<Box<_>>` for it.
    #[allow(clippy::vec_box)] // moved out and in by pointer, see above
    idle: Vec<Box<ServerConn>>,
    /// Open connections (idle, in use, and being opened).
    total: u32,
    /// Clients waiting for a connection, first come first served, with when they began.
    waiters: VecDeque<(Instant, Waiter)>,
    settings: PoolSettings,
    timeouts: PoolTimeouts,
    /// Connections opened before this instant are closed when released (RECONNECT).
    retire_before: Option<Instant>,
    /// The pool was replaced by a reload (or its database removed, or KILLed): every
    /// connection is closed when released and no new one is opened for maintenance.
    retired: bool,
}

/// What a pool shares with the rest of pgtide besides its own connections: the PAUSE
/// gate and the registry `SHOW SERVERS` reads.
#[derive(Clone, Default)]
pub struct PoolHooks {
    pub gate: Arc<PauseGate>,
    pub servers: Arc<Registry<ServerEntry>>,
}

/// A counted slot for a connection being opened: dropping it gives the slot back.
struct Slot(Option<Arc<Pool>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.forget_one();
        }
    }
}

/// The server connections of one (database, user).
pub struct Pool {
    pub database: String,
    pub user: String,
    target: ServerTarget,
    hooks: PoolHooks,
    salted: Arc<SaltedPasswordCache>,
    db_limit: Arc<DbLimit>,
    inner: Mutex<Inner>,
    login_params: OnceLock<LoginParams>,
    /// Connections being opened, and connections being brought back to idle after their
    /// client left (for the `login` and `used` server states of the metrics).
    opening: AtomicU32,
    resetting: AtomicU32,
    /// Set once by [`Pool::retire`]: read without the lock by sessions that hold on to
    /// their login pool.
    out_of_service: std::sync::atomic::AtomicBool,
    /// The last connect failed: an outage is under way (logged once when it starts and
    /// once when it ends, not at every attempt).
    unreachable: std::sync::atomic::AtomicBool,
    pub metrics: PoolMetrics,
}

/// Counts one connection in a state for as long as it lives.
pub struct InState<'a>(&'a AtomicU32);

impl<'a> InState<'a> {
    fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InState(counter)
    }
}

impl Drop for InState<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The pool's (database, user) are those `metrics` was made for.
    pub fn new(
        target: ServerTarget,
        settings: PoolSettings,
        timeouts: PoolTimeouts,
        salted: Arc<SaltedPasswordCache>,
        db_limit: Arc<DbLimit>,
        metrics: PoolMetrics,
        hooks: PoolHooks,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database: metrics.database.clone(),
            user: metrics.user.clone(),
            target,
            hooks,
            salted,
            db_limit,
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                total: 0,
                waiters: VecDeque::new(),
                settings,
                timeouts,
                retire_before: None,
                retired: false,
            }),
            login_params: OnceLock::new(),
            opening: AtomicU32::new(0),
            resetting: AtomicU32::new(0),
            out_of_service: std::sync::atomic::AtomicBool::new(false),
            unreachable: std::sync::atomic::AtomicBool::new(false),
            metrics,
        });
        pool.db_limit
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&pool));
        pool
    }

    pub fn settings(&self) -> PoolSettings {
        self.lock().settings.clone()
    }

    pub fn target(&self) -> &ServerTarget {
        &self.target
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file; the data is still
        // consistent enough to go on (counts are only ever changed in one statement).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ParameterStatus set a server of this pool reports at login, once known.
    pub fn login_params(&self) -> Option<LoginParams> {
        self.login_params.get().cloned()
    }

    /// Returns an idle connection, opens a new one if the pool has room, or waits in
    /// line (FIFO) for one to be checked in, up to `wait`.
    ///
    /// While the pool's database is paused, waits first for `RESUME` (that wait does not
    /// count against `wait`).
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Checkout, CheckoutError> {
        if self.hooks.gate.is_paused(&self.database) {
            Box::pin(self.hooks.gate.wait_resumed(&self.database)).await;
        }
        let rx = {
            let mut inner = self.lock();
            if let Some(conn) = self.take_idle(&mut inner) {
                return Ok(Checkout::new(conn, self.clone()));
            }
            if inner.total < inner.settings.pool_size && self.db_limit.try_acquire() {
                inner.total += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                inner.waiters.push_back((Instant::now(), tx));
                Some(rx)
            }
        };
        if rx.is_some() {
            // Waiting because of max_db_connections rather than pool_size: close an idle
            // connection of another user's pool of this database and open ours.
            self.grow_for_waiters();
        }
        match rx {
            None => {
                // The slot is given back if this future is dropped mid-connect.
                let mut slot = Slot(Some(self.clone()));
                // Boxed: opening is rare, and a waiting checkout is part of every
                // client session's future (see `Session::tell`).
                match Box::pin(self.open()).await {
                    Ok(conn) => {
                        slot.0 = None;
                        Ok(Checkout::new(conn, self.clone()))
                    }
                    Err((attempts, error)) => {
                        drop(slot);
                        Err(CheckoutError::Connect { attempts, error })
                    }
                }
            }
            Some(rx) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(Ok(handoff))) => Ok(Checkout::new(handoff.take(), self.clone())),
                Ok(Ok(Err(error))) => Err(CheckoutError::Connect { attempts: 1, error }),
                // The sender was dropped (pool shut down) or the wait timed out.
                Ok(Err(_)) | Err(_) => {
                    self.metrics.pool_timeouts.inc();
                    Err(CheckoutError::Exhausted {
                        waited: wait,
                        pool_size: self.settings().pool_size,
                    })
                }
            },
        }
    }

    /// An idle connection if one is usable now (and the database is not paused): the
    /// checkout that needs no wait, without the future [`Self::checkout`] makes.
    pub fn try_checkout(self: &Arc<Self>) -> Option<Checkout> {
        if self.hooks.gate.is_paused(&self.database) {
            return None;
        }
        let conn = self.take_idle(&mut self.lock())?;
        Some(Checkout::new(conn, self.clone()))
    }

    fn take_idle(&self, inner: &mut Inner) -> Option<Box<ServerConn>> {
        let reuse = Reuse::of(inner);
        while let Some(mut conn) = inner.idle.pop() {
            if reuse.usable(&mut conn) {
                return Some(conn);
            }
            inner.total -= 1;
            self.db_limit.release();
            drop_in_background(conn);
        }
        None
    }

    /// Opens a connection for a slot already counted in `total`, with retries and
    /// exponential back-off.
    async fn open(&self) -> Result<Box<ServerConn>, (u32, Arc<ServerError>)> {
        let _login = InState::new(&self.opening);
        let timeouts = self.lock().timeouts.clone();
        let attempts = timeouts.connect_retries + 1;
        let mut backoff = timeouts.connect_backoff;
        let mut last = None;
        for attempt in 1..=attempts {
            let r = tokio::time::timeout(
                timeouts.connect_timeout,
                ServerConn::connect(&self.target, &self.salted, timeouts.max_message),
            )
            .await
            .unwrap_or(Err(ServerError::Timeout));
            match r {
                Ok((mut conn, login)) => {
                    self.metrics.server_connects.inc();
                    if self.unreachable.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            database = %self.database, user = %self.user, server = %self.target.address(),
                            "server reachable again"
                        );
                    }
                    let id = self.hooks.servers.next_id();
                    let entry = ServerEntry {
                        user: self.user.clone(),
                        database: self.database.clone(),
                        host: self.target.host.clone(),
                        port: self.target.port,
                        local: conn.stream.local_addr().ok(),
                        connect_time_us: crate::registry::now_us(),
                        remote_pid: conn.cancel.pid,
                        link: Default::default(),
                        last_client: Default::default(),
                        close_needed: Default::default(),
                    };
                    conn.entry = Some(self.hooks.servers.register(id, entry));
                    let _ = self.login_params.set(login);
                    return Ok(Box::new(conn));
                }
                Err(e) => {
                    self.metrics.server_connect_failures.inc();
                    let retryable = e.is_transient();
                    if self.unreachable.swap(true, Ordering::Relaxed) {
                        tracing::debug!(
                            database = %self.database, user = %self.user, server = %self.target.address(),
                            attempt, error = %e, "server connect failed"
                        );
                    } else {
                        tracing::warn!(
                            database = %self.database, user = %self.user, server = %self.target.address(),
                            error = %e, "server connect failed; clients wait for it up to query_wait_timeout (logged again when it is reachable)"
                        );
                    }
                    last = Some(e);
                    if !retryable || attempt == attempts {
                        return Err((
                            attempt,
                            Arc::new(last.take().unwrap_or(ServerError::Timeout)),
                        ));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
            }
        }
        Err((attempts, Arc::new(last.unwrap_or(ServerError::Timeout))))
    }

    /// Gives back an idle, clean connection: to the first waiter still waiting, or to the
    /// idle list.
    fn checkin(self: &Arc<Self>, mut conn: Box<ServerConn>) {
        conn.last_used = Instant::now();
        if let Some(e) = &conn.entry {
            e.link.store(0, Ordering::Relaxed);
        }
        let mut inner = self.lock();
        let expired = inner
            .timeouts
            .lifetime
            .is_some_and(|l| conn.created.elapsed() >= l);
        let retired = inner.retired || inner.retire_before.is_some_and(|t| conn.created <= t);
        if expired || retired {
            drop(inner);
            self.discard(conn);
            return;
        }
        if inner.total > inner.settings.pool_size && inner.waiters.is_empty() {
            // The pool was shrunk by a reload: close the surplus.
            drop(inner);
            self.discard(conn);
            return;
        }
        loop {
            let Some((_, w)) = inner.waiters.pop_front() else {
                inner.idle.push(conn);
                return;
            };
            let handoff = Handoff {
                conn: Some(conn),
                pool: self.clone(),
            };
            match w.send(Ok(handoff)) {
                // The waiter gave up (timed out or left): try the next one. The
                // connection is taken out before the handoff drops, under our lock.
                Err(Ok(back)) => conn = back.take(),
                Ok(()) | Err(Err(_)) => return,
            }
        }
    }

    /// Closes a connection that must not be reused, and opens a replacement when clients
    /// are waiting for one.
    fn discard(self: &Arc<Self>, conn: Box<ServerConn>) {
        drop_in_background(conn);
        self.forget_one();
    }

    /// Gives up one slot; if clients wait, uses the slot to open a connection for them.
    fn forget_one(self: &Arc<Self>) {
        let mut inner = self.lock();
        inner.waiters.retain(|(_, w)| !w.is_closed());
        if !inner.waiters.is_empty() {
            // Keep the slot and open a connection for the first waiter.
            drop(inner);
            self.open_for_waiter();
            return;
        }
        inner.total -= 1;
        self.db_limit.release();
    }

    /// Opens a connection for the first waiter when the pool has room, closing an idle
    /// connection of a sibling pool if `max_db_connections` is what stands in the way.
    pub fn grow_for_waiters(self: &Arc<Self>) {
        let wants = |inner: &mut Inner| {
            // A full pool cannot grow: skip the sweep of the waiters, which every waiting
            // checkout would otherwise pay (O(waiters) each, with 1,000 clients queued).
            if inner.total >= inner.settings.pool_size {
                return false;
            }
            inner.waiters.retain(|(_, w)| !w.is_closed());
            !inner.waiters.is_empty()
        };
        if !wants(&mut self.lock()) {
            return;
        }
        if !self.db_limit.try_acquire() {
            // Not under our own lock: make_room locks the sibling pools.
            if !(self.db_limit.make_room(self) && self.db_limit.try_acquire()) {
                return;
            }
        }
        let reserved = {
            let mut inner = self.lock();
            let ok = wants(&mut inner);
            if ok {
                inner.total += 1;
            }
            ok
        };
        if !reserved {
            self.db_limit.release();
            return;
        }
        self.open_for_waiter();
    }

    /// Opens a connection, in the background, on a slot already counted, for the first
    /// waiter (it goes to the idle list if nobody waits any more). A failure is handed to
    /// that waiter.
    fn open_for_waiter(self: &Arc<Self>) {
        let pool = self.clone();
        tokio::spawn(async move {
            match pool.open().await {
                Ok(conn) => pool.checkin(conn),
                Err((_, e)) => {
                    let waiter = pool.lock().waiters.pop_front();
                    if let Some((_, w)) = waiter {
                        let _ = w.send(Err(e));
                    }
                    pool.forget_one();
                }
            }
        });
    }

    /// Closes one idle connection; true if there was one.
    fn close_one_idle(&self) -> bool {
        let conn = {
            let mut inner = self.lock();
            let conn = inner.idle.pop();
            if conn.is_some() {
                inner.total -= 1;
            }
            conn
        };
        match conn {
            Some(conn) => {
                self.db_limit.release();
                drop_in_background(conn);
                true
            }
            None => false,
        }
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`, or that
    /// the server closed, and opens connections up to `min_pool_size`.
    pub fn maintain(self: &Arc<Self>) {
        let mut closed = Vec::new();
        let to_open;
        {
            let mut inner = self.lock();
            // Idle past server_idle_timeout: closed, except the min_pool_size kept open.
            let keep = inner.settings.min_pool_size;
            let now = Instant::now();
            let mut i = 0;
            while i < inner.idle.len() {
                let open_after = inner.total - closed.len() as u32;
                let reuse = Reuse::of(&inner);
                let idle_timeout = inner.timeouts.idle_timeout;
                let conn = &mut inner.idle[i];
                let idle_too_long =
                    idle_timeout.is_some_and(|t| now.duration_since(conn.last_used) >= t);
                if !reuse.usable(conn) || (idle_too_long && open_after > keep) {
                    closed.push(inner.idle.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            for _ in &closed {
                inner.total -= 1;
                self.db_limit.release();
            }
            let mut n = 0;
            // A paused or retired pool opens nothing on its own.
            let may_open = !inner.retired && !self.hooks.gate.is_paused(&self.database);
            while may_open
                && inner.total < inner.settings.min_pool_size.min(inner.settings.pool_size)
                && self.db_limit.try_acquire()
            {
                inner.total += 1;
                n += 1;
            }
            to_open = n;
        }
        for conn in closed {
            drop_in_background(conn);
        }
        for _ in 0..to_open {
            let pool = self.clone();
            tokio::spawn(async move {
                match pool.open().await {
                    Ok(conn) => pool.checkin(conn),
                    Err(_) => pool.forget_one(),
                }
            });
        }
    }

    /// Counts for observability and tests: (open, idle, waiting).
    pub fn counts(&self) -> (u32, usize, usize) {
        let inner = self.lock();
        (inner.total, inner.idle.len(), inner.waiters.len())
    }

    /// Marks a checked-out connection as being brought back to idle after its client
    /// left (the `used` state), until the returned guard drops.
    pub fn resetting(&self) -> InState<'_> {
        InState::new(&self.resetting)
    }

    /// The pool's server connections by state, for the metrics.
    pub fn server_counts(&self) -> ServerCounts {
        let (total, idle) = {
            let inner = self.lock();
            (i64::from(inner.total), inner.idle.len() as i64)
        };
        let login = i64::from(self.opening.load(Ordering::Relaxed));
        let used = i64::from(self.resetting.load(Ordering::Relaxed));
        ServerCounts {
            active: (total - idle - login - used).max(0),
            idle,
            used,
            login,
        }
    }

    /// How long the first client in line has waited (zero when nobody waits).
    pub fn longest_wait(&self) -> Duration {
        let inner = self.lock();
        inner
            .waiters
            .iter()
            .find(|(_, w)| !w.is_closed())
            .map_or(Duration::ZERO, |(since, _)| since.elapsed())
    }

    /// Closes every idle connection (shutdown).
    pub fn close_idle(&self) {
        for conn in self.take_all_idle() {
            drop_in_background(conn);
        }
    }

    /// Closes every idle connection and returns once the server has closed each of them
    /// (`PAUSE`: PostgreSQL can be restarted as soon as it returns).
    pub async fn close_idle_and_wait(&self) {
        let closing: Vec<_> = self
            .take_all_idle()
            .into_iter()
            .map(|conn| tokio::spawn(conn.terminate()))
            .collect();
        for c in closing {
            let _ = c.await;
        }
    }

    /// Takes the idle connections out of the pool and gives up their slots.
    #[allow(clippy::vec_box)] // the pool's own boxes, moved by pointer (see `Inner::idle`)
    fn take_all_idle(&self) -> Vec<Box<ServerConn>> {
        let idle: Vec<Box<ServerConn>> = {
            let mut inner = self.lock();
            let idle = std::mem::take(&mut inner.idle);
            inner.total -= idle.len() as u32;
            idle
        };
        for _ in &idle {
            self.db_limit.release();
        }
        idle
    }
}

impl Pool {
    /// Applies reloaded settings: a smaller `pool_size` closes surplus idle connections
    /// now (busy ones as they are released), a larger one lets waiting clients in.
    pub fn update(self: &Arc<Self>, settings: PoolSettings, timeouts: PoolTimeouts) {
        let surplus: Vec<Box<ServerConn>> = {
            let mut inner = self.lock();
            inner.settings = settings;
            inner.timeouts = timeouts;
            let mut out = Vec::new();
            while inner.total > inner.settings.pool_size {
                let Some(conn) = inner.idle.pop() else { break };
                inner.total -= 1;
                out.push(conn);
            }
            out
        };
        for conn in surplus {
            self.db_limit.release();
            drop_in_background(conn);
        }
        self.grow_for_waiters();
    }

    /// `RECONNECT`: closes the idle connections now and the busy ones when released.
    pub fn reconnect(&self) {
        self.lock().retire_before = Some(Instant::now());
        self.mark_close_needed();
        self.close_idle();
    }

    /// Whether [`Pool::retire`] took the pool out of service (no lock).
    pub fn is_retired(&self) -> bool {
        self.out_of_service.load(Ordering::Acquire)
    }

    /// Takes the pool out of service (reload replaced it, its database is gone, `KILL`):
    /// every connection is closed, the busy ones when released.
    pub fn retire(&self) {
        self.lock().retired = true;
        self.out_of_service.store(true, Ordering::Release);
        self.mark_close_needed();
        self.close_idle();
    }

    fn mark_close_needed(&self) {
        for (_, e) in self.hooks.servers.snapshot() {
            if e.database == self.database
                && e.user == self.user
                && e.host == self.target.host
                && e.port == self.target.port
            {
                e.close_needed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Connections checked out (or being opened): open minus idle.
    pub fn busy(&self) -> u32 {
        let inner = self.lock();
        inner.total.saturating_sub(inner.idle.len() as u32)
    }

    pub fn timeouts(&self) -> PoolTimeouts {
        self.lock().timeouts.clone()
    }

    /// The per-database connection limit this pool shares.
    pub fn db_limit(&self) -> &Arc<DbLimit> {
        &self.db_limit
    }
}

/// What decides whether an idle connection may be handed out, copied out of the pool's
/// state so that the connection itself can be borrowed mutably (a TLS check reads it).
#[derive(Clone, Copy)]
struct Reuse {
    lifetime: Option<Duration>,
    retired: bool,
    retire_before: Option<Instant>,
}

impl Reuse {
    fn of(inner: &Inner) -> Reuse {
        Reuse {
            lifetime: inner.timeouts.lifetime,
            retired: inner.retired,
            retire_before: inner.retire_before,
        }
    }

    /// True when an idle connection may be handed out: within `server_lifetime`, not
    /// retired, and with nothing unexpected from the server.
    fn usable(self, conn: &mut ServerConn) -> bool {
        if self.lifetime.is_some_and(|l| conn.created.elapsed() >= l) {
            return false;
        }
        if self.retired || self.retire_before.is_some_and(|t| conn.created <= t) {
            return false;
        }
        conn.is_quiet()
    }
}

fn drop_in_background(conn: Box<ServerConn>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(conn.terminate());
    }
}
