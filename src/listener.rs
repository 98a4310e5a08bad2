//! The top of a running pooler: binding the listen and metrics addresses, the accept
//! loop (one task per client connection, [`crate::client::connection::run`]), the
//! maintenance tick, waking sessions at each change of the shutdown phase, and the handle
//! a caller (the binary, a test) holds: start, address, reload, graceful and immediate
//! shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigSource};
use crate::shared::Shared;
use crate::shutdown::{Phase, ShutdownController, ShutdownSignal};

/// A running pooler.
pub struct Pooler {
    addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

/// Loads the `auth_file` and `auth_hba_file` of `config` and the TLS files, binds the listen address (and
/// the metrics address) and starts accepting clients.
pub async fn start(config: Config) -> io::Result<Pooler> {
    start_from(config, None).await
}

/// Like [`start`], for a configuration read from `source`: `RELOAD` and
/// [`Pooler::reload`] read that file again.
pub async fn start_from(config: Config, source: Option<ConfigSource>) -> io::Result<Pooler> {
    let config = Arc::new(config);
    let tls = crate::tls::Tls::new(config.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = Arc::new(tls);
    let listener = bind(config.pgtide.listen, config.pgtide.so_reuseport).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {} (listen, or --listen): {e}",
                config.pgtide.listen
            ),
        )
    })?;
    let addr = listener.local_addr()?;
    let peer_listener = match config.pgtide.peer_listen.as_str() {
        "" => None,
        a => {
            let a: SocketAddr = a.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("peer_listen {a:?} is not an address"),
                )
            })?;
            Some(bind(a, false).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {a} (peer_listen): {e}; every process needs an address of its own"),
                )
            })?)
        }
    };
    let peer_addr = match &peer_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let metrics_listener = match config.pgtide.metrics_listen.as_str() {
        "" => None,
        a => {
            let a: SocketAddr = a.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("metrics_listen {a:?} is not an address"),
                )
            })?;
            Some(TcpListener::bind(a).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot serve metrics on {a} (metrics_listen, or --metrics-listen): {e}; \
                         give another address, or \"\" to turn the endpoint off"
                    ),
                )
            })?)
        }
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let controller = ShutdownController::new();
    let phase = controller.sender();
    let auth_files = crate::auth::sources::AuthFiles::load(&config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let state = Shared::new(config, auth_files, tls);
    state.set_source(source);
    state.set_phase(phase.clone());
    if let Some(l) = metrics_listener {
        let mut phase_rx = phase.subscribe();
        let metrics = state.metrics().clone();
        let probe: Arc<dyn crate::metrics::Probe> = state.clone();
        tokio::spawn(async move {
            // Stops when shutdown begins: probes then fail, as a draining pooler should.
            let stop = async move {
                let _ = phase_rx.wait_for(|p| *p >= Phase::Draining).await;
            };
            crate::metrics::serve(l, metrics, probe, stop).await;
        });
    }
    state.start_monitors();
    crate::admin::stats::spawn_stats(state.clone(), controller.signal());
    let task = tokio::spawn(accept_loop(
        listener,
        peer_listener,
        state.clone(),
        controller,
    ));
    Ok(Pooler {
        addr,
        peer_addr,
        metrics_addr,
        phase,
        task,
        shared: state,
    })
}

impl Pooler {
    /// The address clients connect to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of `peer_listen`, if set.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The address of the metrics endpoint, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reads the TLS certificate, key and CA files again (SIGHUP): new connections use
    /// them, connected clients keep their sessions. On error the previous ones stay.
    pub fn reload_tls(&self) -> Result<(), String> {
        self.shared.tls().reload()
    }

    /// Whether every database's primary is reachable (what `/readyz` answers): `Err`
    /// lists what is not.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        crate::metrics::readiness(&*self.shared).await
    }

    /// Graceful shutdown: stop accepting, let in-flight transactions finish (up to
    /// `shutdown_timeout`), tell idle clients 57P01.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Reads the configuration file again and applies it (what SIGHUP and the admin
    /// console's `RELOAD` do): `Ok` says what changed, `Err` why nothing was applied.
    pub async fn reload(&self) -> Result<String, String> {
        crate::reload::reload(&self.shared).await
    }

    /// Resolves when a shutdown has begun (a signal, or `SHUTDOWN` on the admin console).
    pub async fn stopped(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p >= Phase::Draining).await;
    }

    /// Resolves when every client session has ended after a shutdown.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds a listening socket (backlog 1024, `SO_REUSEADDR` as tokio does, `SO_REUSEPORT`
/// when asked).
fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Accepts clients (on `listen`, and on `peer_listen` when set) until shutdown, then
/// waits for the sessions to end.
async fn accept_loop(
    listener: TcpListener,
    peer_listener: Option<TcpListener>,
    shared: Arc<Shared>,
    controller: ShutdownController,
) {
    let mut signal = controller.signal();
    let maintenance = tokio::spawn(maintain(shared.clone(), controller.signal()));
    let waker = tokio::spawn(wake_clients(shared.clone(), controller.phases()));
    let peer_accept = async |l: &Option<TcpListener>| match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    };
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
            r = peer_accept(&peer_listener) => match r {
                Ok((stream, _peer)) => spawn_client(stream, &shared, controller.signal()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed (peer_listen)");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = signal.reached(Phase::Draining) => break,
        }
    }
    drop(listener);
    // Queries still running here may be cancelled through a peer until the end.
    let peer_task = peer_listener.map(|l| {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = l.accept().await {
                    tokio::spawn(crate::client::connection::cancel_only(
                        stream,
                        shared.clone(),
                    ));
                }
            }
        })
    });
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
    if let Some(t) = peer_task {
        t.abort();
    }
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
        for (_, client) in shared.clients().snapshot() {
            client.wake();
        }
        if phase == Phase::Now {
            return;
        }
    }
}

fn spawn_client(stream: TcpStream, shared: &Arc<Shared>, signal: ShutdownSignal) {
    let (slot, n) = shared.connect_client();
    let over_limit = n > shared.config().pgtide.max_client_conn;
    tokio::spawn(crate::client::connection::run(
        stream, slot, signal, over_limit,
    ));
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
                if trim.due(shared.client_count()) {
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
