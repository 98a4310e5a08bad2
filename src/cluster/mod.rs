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
//! are logged. The primary is chosen among the hosts that are up and not in recovery by
//! their timelines (see `choose_primary`): an old primary that comes back out of recovery
//! after a failover is on an older timeline and never takes writes, also after the new one
//! goes down; primaries that cannot be ordered (a split brain on one timeline, different
//! clusters) take none, and [`Cluster::write_refusal`] says why. Every change of the
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
    replica_lag, FnProbe, Lsn, MonitorLogin, PgProbe, Probe, ProbeFuture, ProbeResult,
    ServerIdentity, HEALTH_QUERY,
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
    /// A primary's timeline, from its last successful check.
    pub timeline: Option<u32>,
    /// Why this host, out of recovery, takes no writes (diverged, or a conflict with
    /// another primary); `None` otherwise.
    pub passed_over: Option<String>,
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
    /// Who answered the last successful check.
    server: Option<ServerIdentity>,
    /// Why this host takes no writes although it is out of recovery.
    passed_over: Option<String>,
}

impl HostState {
    /// Up and out of recovery: it could take writes.
    fn is_candidate(&self) -> bool {
        self.breaker.health() == Health::Up && self.current_role == CurrentRole::Primary
    }

    fn timeline(&self) -> Option<u32> {
        self.server.as_ref().and_then(|s| s.timeline)
    }
}

/// The newest timeline a chosen primary was on: a primary of the same cluster (system
/// identifier) on an older timeline has diverged from it and never takes writes.
#[derive(Clone, Debug)]
struct Newest {
    system_id: u64,
    timeline: u32,
    addr: String,
}

struct State {
    hosts: Vec<HostState>,
    /// The chosen primary's WAL position at its last check; kept when it goes down.
    primary_lsn: Option<Lsn>,
    /// See [`Newest`]; kept for the life of the cluster (not across restarts).
    newest: Option<Newest>,
    /// Why writes are refused while hosts are out of recovery (see [`Cluster::write_refusal`]).
    refusal: Option<String>,
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
                server: None,
                passed_over: None,
            })
            .collect();
        let state = State {
            hosts,
            primary_lsn: None,
            newest: None,
            refusal: None,
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

    /// Why no host takes writes although some are up and out of recovery: they are
    /// primaries pgtide cannot order (different clusters, or several on the newest
    /// timeline), or the only ones up are behind a newer timeline. `None` when there is a
    /// primary, or when there simply is none (a failover under way).
    pub fn write_refusal(&self) -> Option<String> {
        self.lock().refusal.clone()
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
                h.server = p.server;
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
        let choice = choose_primary(&st.hosts, current, st.newest.as_ref());
        let chosen = choice.primary;
        for (i, h) in st.hosts.iter_mut().enumerate() {
            let note = choice
                .passed_over
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, why)| why.clone());
            if note != h.passed_over {
                if let Some(why) = &note {
                    tracing::error!(database = db, host = %h.addr, "host out of recovery takes no writes: {why}");
                }
                h.passed_over = note;
            }
        }
        if choice.refusal != st.refusal {
            match &choice.refusal {
                Some(why) => tracing::error!(database = db, "writes refused: {why}"),
                None => tracing::info!(database = db, "writes are no longer refused"),
            }
            st.refusal = choice.refusal;
        }
        if let Some(p) = chosen {
            let h = &st.hosts[p.0];
            if let Some(lsn) = h.lsn {
                st.primary_lsn = Some(st.primary_lsn.map_or(lsn, |old| old.max(lsn)));
            }
            if let Some((system_id, timeline)) = h
                .server
                .as_ref()
                .and_then(|s| Some((s.system_id, s.timeline?)))
            {
                let newer = st.newest.as_ref().is_none_or(|n| {
                    n.system_id != system_id || n.timeline < timeline || n.addr != h.addr
                });
                if newer {
                    st.newest = Some(Newest {
                        system_id,
                        timeline,
                        addr: h.addr.clone(),
                    });
                }
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
        timeline: (h.current_role == CurrentRole::Primary)
            .then(|| h.timeline())
            .flatten(),
        passed_over: h.passed_over.clone(),
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

/// The outcome of [`choose_primary`].
#[derive(Debug, Default, PartialEq)]
struct Choice {
    primary: Option<HostId>,
    /// Why writes are refused while hosts are out of recovery.
    refusal: Option<String>,
    /// Hosts out of recovery that take no writes, and why.
    passed_over: Vec<(usize, String)>,
}

/// The primary among the hosts that are up and out of recovery (the candidates):
///
/// 1. A candidate of the newest cluster pgtide has used on an older timeline than the
///    newest it saw there has diverged (an old primary that came back after a failover):
///    never chosen.
/// 2. The others are grouped by server (system identifier and start time: two entries
///    for one server are one). With one server, it is the primary. With several, they
///    must be of one cluster and one of them on a higher timeline than the rest; it is the
///    primary and the rest have diverged. Otherwise pgtide cannot tell which one is
///    right, and no host takes writes (`refusal`).
/// 3. Among the entries of the chosen server: `current` if it is one, else the configured
///    primary, then an `auto` host, then a promoted replica, in configuration order.
///
/// While a host of a several-host cluster has not been checked yet (health unknown), a
/// new primary is not chosen: it may be the newer one. `current` stays meanwhile if the
/// rules keep it.
fn choose_primary(hosts: &[HostState], current: Option<HostId>, newest: Option<&Newest>) -> Choice {
    let mut choice = Choice::default();
    let behind = |h: &HostState| match (newest, &h.server) {
        (Some(n), Some(s)) => {
            s.system_id == n.system_id && s.timeline.is_some_and(|t| t < n.timeline)
        }
        _ => false,
    };
    let mut rest: Vec<usize> = Vec::new();
    for (i, h) in hosts.iter().enumerate().filter(|(_, h)| h.is_candidate()) {
        if behind(h) {
            let n = newest.expect("behind implies newest");
            choice.passed_over.push((
                i,
                format!(
                    "diverged: on timeline {}, behind timeline {} of {}, the primary pgtide used before",
                    h.timeline().unwrap_or_default(),
                    n.timeline,
                    n.addr
                ),
            ));
        } else {
            rest.push(i);
        }
    }
    // One representative per server; a host without identity is a server of its own.
    let same_server = |a: &HostState, b: &HostState| match (&a.server, &b.server) {
        (Some(x), Some(y)) => x.system_id == y.system_id && x.started == y.started,
        _ => false,
    };
    let mut servers: Vec<usize> = Vec::new();
    for &i in &rest {
        if !servers.iter().any(|&j| same_server(&hosts[i], &hosts[j])) {
            servers.push(i);
        }
    }
    let winner = match servers.as_slice() {
        [] => None,
        [one] => Some(*one),
        many => match order_primaries(hosts, many) {
            Ok(w) => {
                for &j in &rest {
                    if !same_server(&hosts[j], &hosts[w]) {
                        choice.passed_over.push((
                            j,
                            format!(
                                "diverged: on timeline {}, behind timeline {} of {}",
                                hosts[j].timeline().unwrap_or_default(),
                                hosts[w].timeline().unwrap_or_default(),
                                hosts[w].addr
                            ),
                        ));
                    }
                }
                Some(w)
            }
            Err(why) => {
                for &j in &rest {
                    choice.passed_over.push((j, format!("conflict: {why}")));
                }
                choice.refusal = Some(why);
                None
            }
        },
    };
    choice.passed_over.sort();
    if winner.is_none() && choice.refusal.is_none() && !choice.passed_over.is_empty() {
        choice.refusal = Some(
            choice
                .passed_over
                .iter()
                .map(|(i, why)| format!("{} {why}", hosts[*i].addr))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    let Some(w) = winner else {
        return choice;
    };
    let entries = rest
        .iter()
        .copied()
        .filter(|&j| same_server(&hosts[j], &hosts[w]) || j == w);
    let rank = |r: HostRole| match r {
        HostRole::Primary => 0,
        HostRole::Auto => 1,
        HostRole::Replica => 2,
    };
    let primary = match current {
        Some(c) if entries.clone().any(|j| j == c.0) => c,
        _ => HostId(
            entries
                .min_by_key(|&j| (rank(hosts[j].config.role), j))
                .expect("the winner is an entry"),
        ),
    };
    let still_learning =
        hosts.len() > 1 && hosts.iter().any(|h| h.breaker.health() == Health::Unknown);
    if Some(primary) != current && still_learning {
        return Choice {
            passed_over: choice.passed_over,
            ..Choice::default()
        };
    }
    choice.primary = Some(primary);
    choice
}

/// Of several servers out of recovery, the one on the highest timeline, if they are of
/// one cluster and it is the only one there; else why pgtide cannot tell.
fn order_primaries(hosts: &[HostState], servers: &[usize]) -> Result<usize, String> {
    let names = || {
        servers
            .iter()
            .map(|&i| hosts[i].addr.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let mut known = Vec::with_capacity(servers.len());
    for &i in servers {
        match hosts[i]
            .server
            .as_ref()
            .and_then(|s| Some((s.system_id, s.timeline?)))
        {
            Some(k) => known.push((i, k)),
            None => {
                return Err(format!(
                    "{} are all out of recovery and {} did not report its timeline",
                    names(),
                    hosts[i].addr
                ))
            }
        }
    }
    let system_id = known[0].1 .0;
    if known.iter().any(|(_, (s, _))| *s != system_id) {
        return Err(format!(
            "{} are all out of recovery and belong to different clusters (system identifiers {})",
            names(),
            known
                .iter()
                .map(|(_, (s, _))| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let top = known.iter().map(|(_, (_, t))| *t).max().unwrap_or_default();
    let at_top: Vec<usize> = known
        .iter()
        .filter(|(_, (_, t))| *t == top)
        .map(|(i, _)| *i)
        .collect();
    match at_top.as_slice() {
        [one] => Ok(*one),
        _ => Err(format!(
            "{} are all out of recovery on timeline {top}: a split brain, pgtide cannot tell which one is right",
            at_top
                .iter()
                .map(|&i| hosts[i].addr.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        )),
    }
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
