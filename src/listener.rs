//! The accept loop and the handle a caller (the binary, a test) holds: start, address,
//! graceful and immediate shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::shutdown::{Phase, ShutdownController};

/// A running pooler.
pub struct Pooler {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
    shared: Arc<crate::client::Shared>,
}

/// Loads the `auth_file` and `auth_hba_file` of `config` and the TLS files, binds the listen address (and
/// the metrics address) and starts accepting clients.
pub async fn start(config: Config) -> io::Result<Pooler> {
    start_from(config, None).await
}

/// Like [`start`], for a configuration read from `source`: `RELOAD` and
/// [`Pooler::reload`] read that file again.
pub async fn start_from(
    config: Config,
    source: Option<crate::reload::ConfigSource>,
) -> io::Result<Pooler> {
    let config = Arc::new(config);
    let tls = crate::tls::Tls::new(config.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = Arc::new(tls);
    let listener = TcpListener::bind(config.pgtide.listen).await?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.pgtide.metrics_listen.as_str() {
        "" => None,
        a => {
            let a: SocketAddr = a.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("metrics_listen {a:?} is not an address"),
                )
            })?;
            Some(TcpListener::bind(a).await?)
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
    let state = crate::client::Shared::new(config, auth_files, tls);
    state.admin.set_source(source);
    state.admin.set_phase(phase.clone());
    if let Some(l) = metrics_listener {
        let mut phase_rx = phase.subscribe();
        let metrics = state.metrics.clone();
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
    crate::admin::spawn_stats(state.clone(), controller.signal());
    let task = tokio::spawn(crate::client::accept_loop(
        listener,
        state.clone(),
        controller,
    ));
    Ok(Pooler {
        addr,
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

    /// The address of the metrics endpoint, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reads the TLS certificate, key and CA files again (SIGHUP): new connections use
    /// them, connected clients keep their sessions. On error the previous ones stay.
    pub fn reload_tls(&self) -> Result<(), String> {
        self.shared.tls.reload()
    }

    /// Graceful shutdown: stop accepting, let in-flight transactions finish (up to
    /// `shutdown_timeout`), tell idle clients 57P01.
    pub fn shutdown(&self) {
        self.phase.send_if_modified(|p| {
            if *p < Phase::Draining {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        });
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

    /// Immediate shutdown: close every connection now.
    pub fn shutdown_now(&self) {
        let _ = self.phase.send(Phase::Now);
    }

    /// Resolves when every client session has ended after a shutdown.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
