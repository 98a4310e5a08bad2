//! The hosts of one database and their health: a [`Cluster`] holds what the monitor last
//! learned about each host (up or down, primary or replica, WAL position, lag), and one
//! [`HostMonitor`] per host checks it on an interval.
//!
//! Sessions route on it through [`Cluster::route_snapshot`]: every host's
//! [`HostView`] and the primary, republished after each check (one allocation per check,
//! none per transaction).
//!
//! # The monitor
//! Each check runs one query under `health_check_timeout` on a monitoring connection that
//! is kept open between checks ([`PgProbe`]). A [`Breaker`] per host marks it down after
//! `health_check_failures` failures in a row and up after `health_check_successes`
//! successes in a row (a host never seen up is up at its first success); while a host is
//! down the pause between checks doubles up to `health_check_backoff_max`.
//!
//! # Roles
//! A host's current role is what `pg_is_in_recovery()` said at its last successful
//! check, whatever its configured role: a configured primary in recovery is used as a
//! replica, a configured replica out of recovery (promoted) is a primary candidate; both
//! are logged. The primary is chosen among the hosts that are up and not in recovery: the
//! current primary stays while it is up and not in recovery (so a restarted old primary
//! cannot take writes back after a failover); otherwise the configured primary, then an
//! `auto` host, then a promoted replica, in configuration order. Every change of the
//! primary is published on a `watch` channel ([`Cluster::primary_changes`]).
//!
//! # Lag
//! The primary's WAL position from its last check is kept (also after it goes down); a
//! replica's lag in bytes is that minus the replica's replay position, and its lag in
//! time the age of its last replayed transaction, or zero when it has replayed
//! everything the primary had (an idle primary commits nothing, so the age alone would
//! keep growing). Lag is computed when read, so it always uses the newest primary
//! position.
//!
//! # Monitoring login
//! [`Cluster::from_config`] logs in as the first configured user (in name order) whose
//! password is plain text or an md5 hash (what can answer a server's password request),
//! then the first such `auth_file` user, else the first user; to the database's `dbname`
//! on the server. That user needs no
//! privilege beyond `LOGIN`: the functions of the query are open to everyone.
//!
//! # Locking
//! One `std::sync::Mutex` per cluster, held only to record a result or read a snapshot,
//! never across an await. Readers never wait on the network.

mod breaker;
mod probe;

pub use breaker::{Breaker, Health};
pub use probe::{
    replica_lag, FnProbe, Lsn, MonitorLogin, PgProbe, Probe, ProbeFuture, ProbeResult, HEALTH_QUERY,
};

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::auth::{SaltedPasswordCache, Secret, StoredCredential};
use crate::config::{Config, HealthSettings, HostConfig, HostRole};
use crate::router::route::{HostView, Hosts};
use crate::shutdown::{Phase, ShutdownController, ShutdownSignal};

/// A host of a cluster: its index in the configured host list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub usize);

/// What a host is at present, from its last successful check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurrentRole {
    /// Never checked successfully.
    Unknown,
    /// Not in recovery.
    Primary,
    /// In recovery (a standby).
    Replica,
}

impl fmt::Display for CurrentRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CurrentRole::Unknown => "unknown",
            CurrentRole::Primary => "primary",
            CurrentRole::Replica => "replica",
        })
    }
}

/// A copy of one host's state.
#[derive(Clone, Debug)]
pub struct HostStatus {
    pub id: HostId,
    /// `host:port` (`[v6]:port`).
    pub addr: String,
    pub configured_role: HostRole,
    pub weight: u32,
    pub current_role: CurrentRole,
    /// Usable: the breaker says up.
    pub up: bool,
    pub health: Health,
    /// For a replica: bytes of WAL behind the primary's latest known position.
    pub lag_bytes: Option<u64>,
    /// For a replica: seconds behind (0 when caught up).
    pub lag_seconds: Option<f64>,
    /// Replay position of a replica; current WAL position of a primary.
    pub replay_lsn: Option<Lsn>,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// The error of the last failed check, cleared by a success.
    pub last_error: Option<String>,
    /// When the last check (of either outcome) finished.
    pub last_check: Option<Instant>,
}

struct HostState {
    config: HostConfig,
    addr: String,
    breaker: Breaker,
    current_role: CurrentRole,
    lsn: Option<Lsn>,
    replay_age: Option<f64>,
    last_error: Option<String>,
    last_check: Option<Instant>,
}

struct State {
    hosts: Vec<HostState>,
    /// The chosen primary's WAL position at its last check; kept when it goes down.
    primary_lsn: Option<Lsn>,
}

/// What the router reads: every host's view and the primary, published together.
#[derive(Debug, Default)]
pub struct RouteSnapshot {
    pub views: Vec<HostView>,
    pub primary: Option<usize>,
}

impl RouteSnapshot {
    /// The hosts as [`crate::router::route::route`] takes them.
    pub fn hosts(&self) -> Hosts<'_> {
        Hosts {
            views: &self.views,
            primary: self.primary,
        }
    }
}

/// The hosts of one database and what the monitor knows about them.
pub struct Cluster {
    database: String,
    health: HealthSettings,
    state: Mutex<State>,
    primary: watch::Sender<Option<HostId>>,
    /// Republished at every recorded check.
    route_snapshot: ArcSwap<RouteSnapshot>,
    /// Handed to the monitors by the first `run`.
    probes: Mutex<Option<Vec<Box<dyn Probe>>>>,
}

fn address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Cluster {
    /// A cluster of `hosts`, each checked by the probe at the same index.
    ///
    /// # Panics
    /// When `probes` and `hosts` differ in length.
    pub fn new(
        database: &str,
        hosts: Vec<HostConfig>,
        health: HealthSettings,
        probes: Vec<Box<dyn Probe>>,
    ) -> Arc<Cluster> {
        assert_eq!(hosts.len(), probes.len(), "one probe per host");
        let hosts = hosts
            .into_iter()
            .map(|config| HostState {
                addr: address(&config.host, config.port),
                config,
                breaker: Breaker::new(health),
                current_role: CurrentRole::Unknown,
                lsn: None,
                replay_age: None,
                last_error: None,
                last_check: None,
            })
            .collect();
        let state = State {
            hosts,
            primary_lsn: None,
        };
        let snapshot = route_snapshot(&state, None);
        Arc::new(Cluster {
            database: database.to_string(),
            health,
            state: Mutex::new(state),
            primary: watch::channel(None).0,
            route_snapshot: ArcSwap::from_pointee(snapshot),
            probes: Mutex::new(Some(probes)),
        })
    }

    /// A cluster whose hosts are checked with real monitoring connections as `login`.
    pub fn with_login(
        database: &str,
        hosts: Vec<HostConfig>,
        health: HealthSettings,
        login: &MonitorLogin,
    ) -> Arc<Cluster> {
        let probes = hosts
            .iter()
            .map(|h| Box::new(PgProbe::new(&h.host, h.port, login)) as Box<dyn Probe>)
            .collect();
        Cluster::new(database, hosts, health, probes)
    }

    /// The cluster of `database` as configured (see the module documentation for the
    /// monitoring login). `None` when the database or any user is missing.
    pub fn from_config(
        config: &Config,
        database: &str,
        salted: Arc<SaltedPasswordCache>,
        file_users: &[(String, String)],
        tls: Arc<crate::tls::ServerTls>,
    ) -> Option<Arc<Cluster>> {
        let settings = config.cluster_settings(database, "")?;
        let can_log_in = |p: &str| !matches!(Secret::parse(p), Secret::Scram(_));
        let (user, password) = config.health_check_login(database, file_users, can_log_in)?;
        let db = config.databases.get(database)?;
        let login = MonitorLogin {
            dbname: db.dbname.clone().unwrap_or_else(|| database.to_string()),
            user: user.to_string(),
            secret: password.map(|p| Arc::new(StoredCredential::new(user, p))),
            salted,
            max_message: config.pgtide.max_message_size,
            tls,
        };
        Some(Cluster::with_login(
            database,
            settings.hosts,
            settings.health,
            &login,
        ))
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn health_settings(&self) -> HealthSettings {
        self.health
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of every host's state, in configuration order.
    pub fn snapshot(&self) -> Vec<HostStatus> {
        let st = self.lock();
        st.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| status(HostId(i), h, st.primary_lsn))
            .collect()
    }

    /// One host's state.
    pub fn host(&self, id: HostId) -> Option<HostStatus> {
        let st = self.lock();
        st.hosts.get(id.0).map(|h| status(id, h, st.primary_lsn))
    }

    /// The host that takes writes now, if any.
    pub fn primary(&self) -> Option<HostId> {
        *self.primary.borrow()
    }

    /// Fires whenever [`Cluster::primary`] changes: writes waiting for a primary wait on
    /// `changed()` (under their own timeout).
    pub fn primary_changes(&self) -> watch::Receiver<Option<HostId>> {
        self.primary.subscribe()
    }

    /// The replicas that are up, in recovery, and within both lag limits (0 / zero = no
    /// limit; a lag that is not known yet is not within a limit).
    pub fn replicas_within(&self, max_bytes: u64, max_time: Duration) -> Vec<HostId> {
        let st = self.lock();
        st.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                h.breaker.health() == Health::Up && h.current_role == CurrentRole::Replica
            })
            .filter(|(_, h)| {
                let (bytes, secs) = replica_lag(h.lsn, st.primary_lsn, h.replay_age);
                let bytes_ok = max_bytes == 0 || bytes.is_some_and(|b| b <= max_bytes);
                let time_ok =
                    max_time.is_zero() || secs.is_some_and(|s| s <= max_time.as_secs_f64());
                bytes_ok && time_ok
            })
            .map(|(i, _)| HostId(i))
            .collect()
    }

    /// Records the outcome of one check of `id`: updates the breaker, the role and the
    /// positions, logs changes, and re-chooses the primary. Returns the pause before the
    /// next check.
    pub fn record(&self, id: HostId, result: Result<ProbeResult, String>) -> Duration {
        let mut st = self.lock();
        let db = self.database.as_str();
        let Some(h) = st.hosts.get_mut(id.0) else {
            return self.health.interval;
        };
        h.last_check = Some(Instant::now());
        let change = match result {
            Ok(p) => {
                h.last_error = None;
                let role = if p.in_recovery {
                    CurrentRole::Replica
                } else {
                    CurrentRole::Primary
                };
                if role != h.current_role {
                    log_role(db, h, role);
                    h.current_role = role;
                }
                h.lsn = p.lsn;
                h.replay_age = p.replay_age;
                h.breaker.record(true)
            }
            Err(e) => {
                let change = h.breaker.record(false);
                if change == Some(Health::Down) {
                    tracing::warn!(
                        database = db,
                        host = %h.addr,
                        failures = h.breaker.consecutive_failures(),
                        error = %e,
                        "host marked down"
                    );
                } else {
                    tracing::debug!(database = db, host = %h.addr, error = %e, "health check failed");
                }
                h.last_error = Some(e);
                change
            }
        };
        if change == Some(Health::Up) {
            tracing::info!(
                database = db,
                host = %h.addr,
                role = %h.current_role,
                "host is up"
            );
        }
        let delay = h.breaker.next_delay();
        self.choose_and_publish(&mut st);
        delay
    }

    /// A client's connection to host `id` failed (nothing was sent on it): the host is
    /// marked down on the spot, without waiting for the health checks to notice, and
    /// routing moves off it at once. The checks mark it up again when it answers.
    pub fn report_unreachable(&self, id: HostId, error: &str) {
        let mut st = self.lock();
        let db = self.database.as_str();
        let Some(h) = st.hosts.get_mut(id.0) else {
            return;
        };
        if h.breaker.trip() == Some(Health::Down) {
            tracing::warn!(database = db, host = %h.addr, error = %error, "host marked down: a client's connection to it failed");
            h.last_error = Some(error.to_string());
            self.choose_and_publish(&mut st);
        }
    }

    /// Chooses the primary from the hosts' states, logs a change, and publishes the
    /// choice and the routing snapshot (under the lock, so that readers see state and
    /// primary agree).
    fn choose_and_publish(&self, st: &mut State) {
        let db = self.database.as_str();
        let current = *self.primary.borrow();
        let chosen = choose_primary(&st.hosts, current);
        if let Some(p) = chosen {
            if let Some(lsn) = st.hosts[p.0].lsn {
                st.primary_lsn = Some(st.primary_lsn.map_or(lsn, |old| old.max(lsn)));
            }
        }
        if chosen != current {
            match (chosen, current) {
                // The first primary found (at start, or after an outage): news, not a
                // warning.
                (Some(p), None) => tracing::info!(
                    database = db,
                    host = %st.hosts[p.0].addr,
                    "primary found"
                ),
                (Some(p), Some(c)) => tracing::warn!(
                    database = db,
                    host = %st.hosts[p.0].addr,
                    previous = %st.hosts[c.0].addr,
                    "new primary"
                ),
                (None, _) => tracing::warn!(
                    database = db,
                    previous = current
                        .map(|c| st.hosts[c.0].addr.as_str())
                        .unwrap_or("none"),
                    "no primary: no host is up and out of recovery"
                ),
            }
            // Published under the lock so that readers see state and primary agree.
            self.primary.send_replace(chosen);
        }
        self.route_snapshot
            .store(Arc::new(route_snapshot(st, chosen)));
    }

    /// The hosts as the router reads them (an atomic load, no lock).
    pub fn route_snapshot(&self) -> arc_swap::Guard<Arc<RouteSnapshot>> {
        self.route_snapshot.load()
    }

    /// Runs one [`HostMonitor`] per host until the phase reaches Draining (sessions keep
    /// the last known state while they drain). The probes go to the first call; a second
    /// call returns at once.
    pub async fn run(self: &Arc<Self>, shutdown: ShutdownSignal) {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(probes) = probes else {
            tracing::warn!(database = %self.database, "cluster monitor already running");
            return;
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, probe) in probes.into_iter().enumerate() {
            let monitor = HostMonitor {
                cluster: self.clone(),
                id: HostId(i),
                probe,
            };
            tasks.spawn(monitor.run(shutdown.clone()));
        }
        drop(shutdown);
        while tasks.join_next().await.is_some() {}
    }

    /// Runs the monitors on their own, outside a pooler (tools and tests): they stop
    /// when the returned handle is stopped or dropped.
    pub fn spawn(self: &Arc<Self>) -> MonitorHandle {
        let controller = ShutdownController::new();
        let cluster = self.clone();
        let signal = controller.signal();
        tokio::spawn(async move { cluster.run(signal).await });
        MonitorHandle {
            phase: controller.sender(),
            controller: Some(controller),
        }
    }
}

/// The monitors started by [`Cluster::spawn`].
pub struct MonitorHandle {
    phase: watch::Sender<Phase>,
    controller: Option<ShutdownController>,
}

impl MonitorHandle {
    /// Stops the monitors and waits until they have ended (closing their connections).
    pub async fn stop(mut self) {
        let _ = self.phase.send(Phase::Now);
        if let Some(c) = self.controller.take() {
            c.wait().await;
        }
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        let _ = self.phase.send(Phase::Now);
    }
}

fn route_snapshot(st: &State, primary: Option<HostId>) -> RouteSnapshot {
    let views = st
        .hosts
        .iter()
        .map(|h| {
            let replica =
                h.breaker.health() == Health::Up && h.current_role == CurrentRole::Replica;
            let (lag_bytes, lag_seconds) = if h.current_role == CurrentRole::Replica {
                replica_lag(h.lsn, st.primary_lsn, h.replay_age)
            } else {
                (None, None)
            };
            HostView {
                replica,
                lag_bytes,
                lag_seconds,
                replay_lsn: h.lsn.map(|l| l.0),
                weight: h.config.weight,
            }
        })
        .collect();
    RouteSnapshot {
        views,
        primary: primary.map(|p| p.0),
    }
}

fn status(id: HostId, h: &HostState, primary_lsn: Option<Lsn>) -> HostStatus {
    let (lag_bytes, lag_seconds) = if h.current_role == CurrentRole::Replica {
        replica_lag(h.lsn, primary_lsn, h.replay_age)
    } else {
        (None, None)
    };
    HostStatus {
        id,
        addr: h.addr.clone(),
        configured_role: h.config.role,
        weight: h.config.weight,
        current_role: h.current_role,
        up: h.breaker.health() == Health::Up,
        health: h.breaker.health(),
        lag_bytes,
        lag_seconds,
        replay_lsn: h.lsn,
        consecutive_failures: h.breaker.consecutive_failures(),
        consecutive_successes: h.breaker.consecutive_successes(),
        last_error: h.last_error.clone(),
        last_check: h.last_check,
    }
}

fn log_role(database: &str, h: &HostState, role: CurrentRole) {
    let from = h.current_role;
    match (h.config.role, role) {
        (HostRole::Primary, CurrentRole::Replica) => tracing::warn!(
            database,
            host = %h.addr,
            "host configured as primary is in recovery; using it as a replica"
        ),
        (HostRole::Replica, CurrentRole::Primary) => tracing::warn!(
            database,
            host = %h.addr,
            "host configured as replica is not in recovery (promoted?); it can become the primary"
        ),
        _ if from == CurrentRole::Unknown => tracing::info!(
            database,
            host = %h.addr,
            role = %role,
            "host role discovered"
        ),
        _ => tracing::warn!(
            database,
            host = %h.addr,
            from = %from,
            to = %role,
            "host role changed"
        ),
    }
}

/// The primary: `current` while it is up and out of recovery, else the best candidate.
fn choose_primary(hosts: &[HostState], current: Option<HostId>) -> Option<HostId> {
    let candidate =
        |h: &HostState| h.breaker.health() == Health::Up && h.current_role == CurrentRole::Primary;
    if let Some(c) = current {
        if hosts.get(c.0).is_some_and(candidate) {
            return Some(c);
        }
    }
    let rank = |r: HostRole| match r {
        HostRole::Primary => 0,
        HostRole::Auto => 1,
        HostRole::Replica => 2,
    };
    hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| candidate(h))
        .min_by_key(|(i, h)| (rank(h.config.role), *i))
        .map(|(i, _)| HostId(i))
}

/// Checks one host on the cluster's interval (backing off while it is down) and records
/// each result in the cluster.
pub struct HostMonitor {
    cluster: Arc<Cluster>,
    id: HostId,
    probe: Box<dyn Probe>,
}

impl HostMonitor {
    pub async fn run(mut self, mut shutdown: ShutdownSignal) {
        let timeout = self.cluster.health.timeout;
        loop {
            let result = tokio::select! {
                r = self.probe.probe(timeout) => r,
                _ = shutdown.reached(Phase::Draining) => break,
            };
            let delay = self.cluster.record(self.id, result);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.reached(Phase::Draining) => break,
            }
        }
        // Dropping the probe closes its monitoring connection.
    }
}

#[cfg(test)]
mod tests;
