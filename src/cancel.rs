//! BackendKeyData that pgtide invents for each client, and delivery of a client's
//! CancelRequest to the server connection running that client's query at that moment.
//!
//! A cancel is never delivered to a server after it was handed to another client: the
//! session clears its [`CancelSlot`] before it gives the server back, and waits for any
//! cancel already on its way to be taken by the server (the postmaster closes the cancel
//! socket once it has signalled the backend). A backend that gets the signal while idle
//! ignores it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::server::{send_cancel, CancelTarget};

/// Where a client's cancel would go right now.
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
    in_flight: AtomicU32,
    done: Notify,
}

impl CancelSlot {
    /// The client now runs on the server `t`.
    pub fn attach(&self, t: CancelTarget) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    /// The client is about to give its server back: after this returns, no cancel of
    /// this client can reach that server.
    pub async fn detach(&self) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
        loop {
            let done = self.done.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    fn begin(&self) -> Option<CancelTarget> {
        let guard = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let t = guard.clone()?;
        // Counted while the lock is held, so that `detach` cannot miss it.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(t)
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.done.notify_waiters();
    }
}

/// The invented keys of every connected client.
#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

impl CancelRegistry {
    /// Invents a (pid, secret) pair for a new client.
    pub fn register(&self) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & 0x3fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            map.insert(pid, (secret, slot.clone()));
            return (pid, secret, slot);
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// Handles a CancelRequest: when the key matches a client that is running on a
    /// server, forwards the cancel to that server. Unknown keys are ignored, as
    /// PostgreSQL does. Runs to completion even if the sender has gone.
    pub async fn cancel(&self, pid: i32, secret: i32, timeout: Duration) {
        let slot = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&pid) {
                Some((s, slot)) if *s == secret => slot.clone(),
                _ => return,
            }
        };
        let Some(target) = slot.begin() else { return };
        if let Err(e) = send_cancel(target.clone(), timeout).await {
            tracing::warn!(error = %e, server = %target.addr, "could not forward a cancel request");
        }
        slot.end();
    }
}
