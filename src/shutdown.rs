//! The one shutdown primitive (mini-redis style): a watch channel that tells every task
//! which phase the process is in, and a channel whose closing says that every task that
//! holds a [`ShutdownSignal`] has finished.

use tokio::sync::{mpsc, watch};

/// Where the process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop accepting; let in-flight transactions finish, then close each client.
    Draining,
    /// Close everything now.
    Now,
}

/// Owned by the listener: moves the phase forward and waits for the tasks.
pub struct ShutdownController {
    tx: watch::Sender<Phase>,
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
}

/// Held by every task that must finish before the process exits.
#[derive(Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<Phase>,
    _done: mpsc::Sender<()>,
}

impl ShutdownController {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Phase::Running);
        let (done_tx, done_rx) = mpsc::channel(1);
        ShutdownController {
            tx,
            done_tx: Some(done_tx),
            done_rx,
        }
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
            _done: self.done_tx.clone().expect("signal() after wait()"),
        }
    }

    /// The phase and its changes, for a task that must not hold up [`wait`](Self::wait).
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    pub fn sender(&self) -> watch::Sender<Phase> {
        self.tx.clone()
    }

    /// Waits until every [`ShutdownSignal`] has been dropped.
    pub async fn wait(mut self) {
        self.done_tx = None;
        let _ = self.done_rx.recv().await;
    }
}

impl Default for ShutdownController {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownSignal {
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase is at least `at_least`.
    pub async fn reached(&mut self, at_least: Phase) {
        let _ = self.rx.wait_for(|p| *p >= at_least).await;
    }
}
