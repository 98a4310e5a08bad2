//! Registries of connected clients and open server connections, for `SHOW CLIENTS`,
//! `SHOW SERVERS`, `SHOW POOLS` and `KILL`.
//!
//! An entry is added when a client logs in or a server connection is opened, and removed
//! when its [`Registration`] is dropped: one short lock per connect and disconnect. What
//! changes per transaction (a client's state, the server it is linked to) is kept in
//! atomics inside the entry, so the transaction path takes no lock here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A set of entries keyed by a process-unique id.
pub struct Registry<T> {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            next: AtomicU64::new(1),
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Registry<T> {
    /// A fresh id (never 0, which means "none" in links).
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `entry` under `id`; dropping the returned registration removes it.
    pub fn register(self: &Arc<Self>, id: u64, entry: T) -> Registration<T> {
        let entry = Arc::new(entry);
        self.lock().insert(id, entry.clone());
        Registration {
            id,
            entry,
            registry: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every entry, ordered by id (the order of connection).
    pub fn snapshot(&self) -> Vec<(u64, Arc<T>)> {
        let mut v: Vec<(u64, Arc<T>)> =
            self.lock().iter().map(|(id, e)| (*id, e.clone())).collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.lock().get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An entry's place in its registry; removes it when dropped.
pub struct Registration<T> {
    pub id: u64,
    entry: Arc<T>,
    registry: Arc<Registry<T>>,
}

impl<T> Registration<T> {
    /// The entry itself, to hold without borrowing its registration.
    pub fn shared(&self) -> Arc<T> {
        self.entry.clone()
    }
}

impl<T> std::ops::Deref for Registration<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.entry
    }
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// What a client is doing, as `SHOW CLIENTS` and `SHOW POOLS` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Logged in, no transaction running.
    Idle = 0,
    /// Waiting for a server connection (in the pool's queue, or held by PAUSE).
    Waiting = 1,
    /// Running a transaction on a server connection.
    Active = 2,
}

/// One logged-in client (admin console sessions included).
pub struct ClientEntry {
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect_time_us: u64,
    pub application_name: String,
    state: AtomicU8,
    request_time_us: AtomicU64,
    wait_since_us: AtomicU64,
    /// Id of the server connection this client uses (0: none).
    pub link: AtomicU64,
    killed: AtomicBool,
    /// The PID pgtide gave the client in BackendKeyData (0 for console sessions).
    pub key_pid: std::sync::atomic::AtomicI32,
    /// Why the client keeps its server connection in transaction mode (session state it
    /// created), once it does.
    pinned: std::sync::Mutex<Option<&'static str>>,
    /// Wakes the client's session: `KILL`, and every change of the shutdown phase
    /// ([`ClientEntry::wake`]), so that a session needs no wait of its own for those.
    /// One waker: only the client's own task waits on its entry.
    wake: AtomicWaker,
}

impl ClientEntry {
    pub fn new(
        user: &str,
        database: &str,
        addr: Option<SocketAddr>,
        local: Option<SocketAddr>,
        application_name: &str,
    ) -> ClientEntry {
        let now = now_us();
        ClientEntry {
            user: user.to_string(),
            database: database.to_string(),
            addr,
            local,
            connect_time_us: now,
            application_name: application_name.to_string(),
            state: AtomicU8::new(ClientState::Idle as u8),
            request_time_us: AtomicU64::new(now),
            wait_since_us: AtomicU64::new(0),
            link: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            key_pid: std::sync::atomic::AtomicI32::new(0),
            pinned: std::sync::Mutex::new(None),
            wake: AtomicWaker::new(),
        }
    }

    /// The client created session state and keeps its server (`Some`: what), or its
    /// session state is gone (`None`).
    pub fn set_pinned(&self, why: Option<&'static str>) {
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// What pinned the client to its server, if anything does.
    pub fn pinned(&self) -> Option<&'static str> {
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a state change (a few atomic stores; called per transaction).
    pub fn set_state(&self, state: ClientState) {
        if state == ClientState::Waiting {
            let now = now_us();
            self.request_time_us.store(now, Ordering::Relaxed);
            self.wait_since_us.store(now, Ordering::Relaxed);
        }
        if state == ClientState::Idle {
            self.link.store(0, Ordering::Relaxed);
        }
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    pub fn request_time_us(&self) -> u64 {
        self.request_time_us.load(Ordering::Relaxed)
    }

    /// Microseconds this client has been waiting for a server (0 when not waiting).
    pub fn waiting_us(&self, now: u64) -> u64 {
        if self.state() != ClientState::Waiting {
            return 0;
        }
        now.saturating_sub(self.wait_since_us.load(Ordering::Relaxed))
    }

    /// Asks the client's session to end (`KILL`).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.wake.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Wakes the task waiting in [`poll_woken`](Self::poll_woken) to look again (the
    /// shutdown phase moved on).
    pub fn wake(&self) {
        self.wake.wake();
    }

    /// Resolves once [`kill`](Self::kill) has been called.
    pub async fn killed(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx, || self.is_killed())).await
    }

    /// Ready when `done` is true; otherwise the task is woken at the next
    /// [`kill`](Self::kill) or [`wake`](Self::wake) to look again. What `done` reads must
    /// be set before either is called (the waker is registered before `done` is read,
    /// so a wake between the two is not lost). Only the client's own task may wait here.
    pub fn poll_woken(&self, cx: &mut Context<'_>, done: impl Fn() -> bool) -> Poll<()> {
        self.wake.register(cx.waker());
        if done() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// One open server connection.
pub struct ServerEntry {
    pub user: String,
    pub database: String,
    pub host: String,
    pub port: u16,
    pub local: Option<SocketAddr>,
    pub connect_time_us: u64,
    pub remote_pid: i32,
    /// Id of the client using this connection (0: idle in its pool).
    pub link: AtomicU64,
    /// Id of the last client that used it (kept after checkin): a notification this
    /// backend sent is shown as sent by that client.
    pub last_client: AtomicU64,
    /// The connection is closed when it is next released (RECONNECT, KILL, reload).
    pub close_needed: AtomicBool,
}
