//! BackendKeyData that pgtide invents for each client, and delivery of a client's
//! CancelRequest to the server connection running that client's query at that moment.
//!
//! A cancel is never delivered to a server after it was handed to another client: the
//! session clears its [`CancelSlot`] before it gives the server back, and waits for any
//! cancel already on its way to be taken by the server (the postmaster closes the cancel
//! socket once it has signalled the backend). A backend that gets the signal while idle
//! ignores it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

/// The low bits of a key's secret that carry the peer id of the process that handed it
/// out (when peering is on).
const PEER_BITS: i32 = 0x3fff;

/// The invented keys of every connected client.
#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
    /// This process's `peer_id` (0: no peering), in the low bits of every secret.
    peer_id: i32,
}

impl CancelRegistry {
    /// A registry whose keys carry `peer_id` (0: keys are all random).
    pub fn new(peer_id: u32) -> CancelRegistry {
        CancelRegistry {
            map: Mutex::default(),
            peer_id: i32::try_from(peer_id).unwrap_or(0) & PEER_BITS,
        }
    }

    /// The peer that handed out a key with `secret`, when that is another process than
    /// this one (peering on and the peer bits differ); `None` for this process's keys.
    pub fn owner(&self, secret: i32) -> Option<u32> {
        let id = secret & PEER_BITS;
        (self.peer_id != 0 && id != self.peer_id).then_some(id as u32)
    }

    /// Invents a (pid, secret) pair for a new client.
    pub fn register(&self) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & 0x3fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let secret = match self.peer_id {
                0 => rand::random::<i32>(),
                id => (rand::random::<i32>() & !PEER_BITS) | id,
            };
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

/// Forwards a CancelRequest to the peer pgtide at `addr` (its `peer_listen`), which
/// handles it as its own; waits until the peer has taken it (closed the connection).
pub async fn forward(addr: SocketAddr, pid: i32, secret: i32, timeout: Duration) -> io::Result<()> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut out = BytesMut::with_capacity(16);
        crate::protocol::frontend::forwarded_cancel(&mut out, pid, secret);
        s.write_all(&out).await?;
        let mut sink = [0u8; 16];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "forwarding the cancel request timed out",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_peer_id() {
        let alone = CancelRegistry::new(0);
        let (_, secret, _) = alone.register();
        assert_eq!(
            alone.owner(secret),
            None,
            "no peering: every key is this process's"
        );
        let one = CancelRegistry::new(1);
        let two = CancelRegistry::new(2);
        for _ in 0..100 {
            let (_, s1, _) = one.register();
            let (_, s2, _) = two.register();
            assert_eq!(s1 & PEER_BITS, 1);
            assert_eq!(one.owner(s1), None);
            assert_eq!(one.owner(s2), Some(2));
            assert_eq!(two.owner(s1), Some(1));
        }
        // The rest of the secret stays random.
        let secrets: std::collections::HashSet<i32> = (0..100).map(|_| one.register().1).collect();
        assert!(secrets.len() > 90);
    }
}
