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
    phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
}

/// Binds the listen address of `config` and starts accepting clients.
pub async fn start(config: Config) -> io::Result<Pooler> {
    let listener = TcpListener::bind(config.pgtide.listen).await?;
    let addr = listener.local_addr()?;
    let controller = ShutdownController::new();
    let phase = controller.sender();
    let state = crate::client::Shared::new(Arc::new(config));
    let task = tokio::spawn(crate::client::accept_loop(listener, state, controller));
    Ok(Pooler { addr, phase, task })
}

impl Pooler {
    /// The address clients connect to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

    /// Immediate shutdown: close every connection now.
    pub fn shutdown_now(&self) {
        let _ = self.phase.send(Phase::Now);
    }

    /// Resolves when every client session has ended after a shutdown.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
