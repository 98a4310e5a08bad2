//! The transaction loop of one logged-in client.
//!
//! Bytes from the client are framed (not copied) and forwarded to the server connection
//! checked out for the current transaction; the server's replies are framed and forwarded
//! back. The session watches only what it must: Query / Sync / FunctionCall (each owes
//! one ReadyForQuery), extended-protocol messages since the last Sync, ReadyForQuery's
//! status byte, ParameterStatus, FATAL errors and COPY IN. In transaction mode the server
//! goes back to the pool when every ReadyForQuery owed has arrived, the last one said
//! idle (`I`) and no extended-protocol message is waiting for its Sync.
//!
//! Both directions are driven from this one task with non-blocking reads and writes, so
//! a client that pipelines many batches before it reads cannot deadlock the pair.

mod attach;
mod guard;
mod io;
mod recover;
mod route;
mod scan;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::login::LoggedIn;
use crate::config::PoolMode;
use crate::error::Error;
use crate::pool::Checkout;
use crate::prepared::{ClientStatements, Pipeline};
use crate::protocol::{backend, sqlstate, status, tag, Scanner};
use crate::registry::ClientState;
use crate::shared::{ConnectedClient, Shared};
use crate::shutdown::{Phase, ShutdownSignal};
use crate::stream::Stream;

use io::{put_spare, read_some, splice, write_some};

/// Draining: how long a client that has not had a server yet may take to send its first
/// request (see `Session::drain_grace`).
const DRAIN_FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The largest request, and answer, held for a retry on the primary.
const RETRY_MAX: usize = 256 * 1024;

/// Read at most this much ahead of what the other side has taken.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// Starts the transaction loop of a client that has logged in, in a task of its own: the
/// connection's task (the login's arguments, its result) ends, and the client holds only
/// the session and its turn's state.
pub(super) fn start(
    client: Stream,
    login: LoggedIn,
    signal: ShutdownSignal,
    slot: ConnectedClient,
) {
    let session = Session::new(client, slot.shared().clone(), login, signal);
    tokio::spawn(serve(session, slot));
}

/// The logged-in client's transactions, until the session ends. Not an `async fn`: its
/// arguments would be copied into the future's own locals (two sessions per client); an
/// `async` block uses what it captured in place.
#[allow(clippy::manual_async_fn)]
fn serve(
    mut session: Session,
    slot: ConnectedClient,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        session.login.pools.metrics.clients_idle.inc();
        let end = session.run().await;
        Box::pin(session.finish(&end)).await;
        session.flush_metrics();
        match session.state {
            ClientState::Idle => session.login.pools.metrics.clients_idle.dec(),
            ClientState::Waiting => session.login.pools.metrics.clients_waiting.dec(),
            ClientState::Active => session.login.pools.metrics.clients_active.dec(),
        }
        if session.pinned().is_some() {
            session.login.pools.metrics.clients_pinned.dec();
        }
        session.shared.cancels().unregister(session.login.key_pid);
        if session.shared.config().pgtide.log_connections {
            let (user, database) = (session.login.user(), session.login.database());
            tracing::info!(%user, %database, reason = %end, "client disconnected");
        }
        // Counted out last, after the session's server went back.
        drop(slot);
    }
}

/// A boxed future (rare awaits of the session: see [`Session::tell`]).
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How a server connection ended under a client, noticed while framing its output.
enum ServerEnd {
    /// The server sent a FATAL (or PANIC) ErrorResponse: the client gets it as sent.
    Fatal { code: String, message: String },
    /// It broke the protocol, or pgtide's own check on it failed.
    Broken(String),
}

/// Why a session ended (errors boxed: the idle task future holds an `End`'s room).
enum End {
    /// Terminate, or the client closed its socket.
    ClientLeft,
    /// The client broke the protocol (it is told, with the error's SQLSTATE, as the
    /// session ends) or its socket failed.
    Client(Box<Error>),
    /// pgtide ended the session and told the client why (a FATAL went out).
    Told(Box<Error>),
}

impl End {
    /// The client's socket failed.
    fn socket(e: std::io::Error) -> End {
        End::Client(Box::new(Error::client(
            sqlstate::CONNECTION_FAILURE,
            e.to_string(),
        )))
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientLeft => f.write_str("client left"),
            End::Client(e) => write!(f, "client error: {}", e.message),
            End::Told(e) => f.write_str(&e.message),
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    login: LoggedIn,
    /// The shutdown phase; its changes wake the session through `login.entry` (the
    /// listener wakes every registered client at each change).
    signal: ShutdownSignal,
    /// The idle timeouts' timer, once one was needed (reset for each wait).
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// query_timeout: when the server began to owe the current request (set by the
    /// first wait for it), and whether it was cancelled already.
    query_since: Option<tokio::time::Instant>,
    query_cancelled: bool,
    /// Whether the client has had a server at least once.
    served: bool,
    /// Draining: until when a client that has not had a server yet may still send its
    /// first request (a client that connected an instant before the drain began, such
    /// as pgbench -C's, gets its transaction rather than 57P01).
    drain_grace: Option<tokio::time::Instant>,
    /// transaction_timeout: when the current transaction (or autocommit request) began,
    /// as the waits saw it.
    tx_since: Option<tokio::time::Instant>,
    /// Bytes from the client; `c2s[..c_ready]` is framed and goes to the server.
    c2s: BytesMut,
    c_scan: Scanner,
    c_ready: usize,
    /// Bytes from the server; `s2c[..s_ready]` is framed and goes to the client.
    s2c: BytesMut,
    s_scan: Scanner,
    s_ready: usize,
    /// The server connection of the current transaction (of the whole session in session
    /// mode); the guard closes it if it is ever let go without a check-in.
    server: Option<Checkout>,
    /// ReadyForQuery messages the server still owes.
    pending: u32,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    /// The server is in COPY IN, waiting for the client's data.
    copy_in: bool,
    /// Since the last Query or Execute (either may start a COPY IN), the client has not
    /// ended a COPY; and the Syncs it sent in that time. The server ignores Syncs it gets
    /// during COPY IN, so once it reports CopyInResponse those owe no ReadyForQuery.
    copy_window_open: bool,
    copy_window_syncs: u32,
    /// Status byte of the last ReadyForQuery.
    tx_status: u8,
    /// A statement may have changed unreported settings: read them back before release.
    settings_changed: bool,
    /// The client sent Terminate.
    terminated: bool,
    /// Transaction mode with prepared-statement tracking: every message is matched with
    /// its answer through `pipeline`, and named statements are mapped.
    tracked: bool,
    /// Its named statements and the answers it waits for: made on the first message
    /// that is tracked, so that a client that has not run anything does not carry it.
    prepared: Option<Box<Prepared>>,
    /// A message may have deallocated every statement on the server (DISCARD ALL,
    /// DEALLOCATE ALL): make the server's set known again before it is released.
    dealloc_pending: bool,
    /// A message that needs a server is waiting at the front of `c2s`.
    need_attach: bool,
    /// For metrics: the client's state, bytes since the last flush, when the current
    /// transaction and request began, and whether a statement completed since the last
    /// idle ReadyForQuery.
    state: ClientState,
    /// The current server is a replica: in autocommit, a message that writes waits until
    /// the replica is idle, then goes to a server chosen anew.
    on_replica: bool,
    /// The current server is a replica chosen for an explicit read-only transaction:
    /// everything until its end goes there.
    replica_tx: bool,
    /// State most sessions never use (routing to replicas, retries, a server's FATAL):
    /// made on first use, so that an idle client does not carry it.
    rare: Option<Box<Rare>>,
    bytes_in: u64,
    bytes_out: u64,
    tx_started: Option<Instant>,
    req_started: Option<Instant>,
    did_work: bool,
}

/// A tracked session's prepared-statement state (`Session::prepared`).
#[derive(Default)]
struct Prepared {
    statements: ClientStatements,
    pipeline: Pipeline,
}

/// The [`Session`]'s rarely used state (`Session::rare`); every field's default is
/// "nothing going on".
#[derive(Default)]
struct Rare {
    /// The server sent a FATAL error (it is going away): its message.
    server_fatal: Option<ServerEnd>,
    /// read_your_writes = lsn: the WAL position of this client's last transaction on the
    /// primary; its reads go only to replicas that have replayed it.
    written_lsn: Option<u64>,
    /// The current transaction went to the primary because it may write.
    for_write: bool,
    /// An autocommit request on a replica, kept (as the client sent it) so that it can
    /// run again on the primary if the replica refuses it as a write (25006). While it
    /// is kept, the replica's answer is held back from the client (from `retry_mark`
    /// in `s2c`); a request or answer too large to keep gives the retry up.
    retry: Option<BytesMut>,
    retry_mark: usize,
    retry_to_primary: bool,
    /// The next transaction goes to the primary whatever its text says.
    force_primary: bool,
    /// A plain `BEGIN` answered by pgtide without a server (the client's Query message),
    /// so that a `SET TRANSACTION READ ONLY` that follows can still send the transaction
    /// to a replica; it goes to the server chosen for the next statement, its reply (a
    /// CommandComplete and a ReadyForQuery: `hide_begin_reply`) hidden.
    deferred_begin: Option<Vec<u8>>,
    hide_begin_reply: u8,
    /// Transaction mode: the session state that pinned the client to its server (it
    /// keeps the server until it leaves).
    pinned: Option<&'static str>,
    /// The pinned client's current transaction may have ended that state: check once it
    /// is idle.
    unpin_check: bool,
    /// The client did something whose end cannot be seen (LOAD, SET SESSION
    /// AUTHORIZATION): it stays pinned.
    pinned_for_good: bool,
}

enum Event {
    ClientReadable,
    ServerReadable,
    ServerWritable,
    ClientWritable,
    Timeout,
    Phase,
    /// `KILL` on the admin console.
    Killed,
}

impl Session {
    fn new(client: Stream, shared: Arc<Shared>, login: LoggedIn, signal: ShutdownSignal) -> Self {
        let max = shared.config().pgtide.max_message_size;
        let tracked = login.mode == PoolMode::Transaction
            && shared.config().pgtide.max_prepared_statements > 0;
        Session {
            shared,
            client,
            login,
            signal,
            timer: None,
            query_since: None,
            served: false,
            drain_grace: None,
            query_cancelled: false,
            tx_since: None,
            c2s: BytesMut::new(),
            c_scan: Scanner::new(max),
            c_ready: 0,
            s2c: BytesMut::new(),
            s_scan: Scanner::new(max),
            s_ready: 0,
            server: None,
            pending: 0,
            unsynced: false,
            copy_in: false,
            copy_window_open: false,
            copy_window_syncs: 0,
            tx_status: status::IDLE,
            settings_changed: false,
            terminated: false,
            tracked,
            prepared: None,
            dealloc_pending: false,
            need_attach: false,
            state: ClientState::Idle,
            on_replica: false,
            replica_tx: false,
            rare: None,
            bytes_in: 0,
            bytes_out: 0,
            tx_started: None,
            req_started: None,
            did_work: false,
        }
    }

    /// The rarely used state, made now if need be.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// An answer held back for a retry on the primary: where it starts in `s2c`.
    fn retry_mark(&self) -> Option<usize> {
        self.rare
            .as_ref()
            .filter(|r| r.retry.is_some())
            .map(|r| r.retry_mark)
    }

    /// The text of the client's prepared statement `name`.
    fn statement_text(&self, name: &[u8]) -> Option<&[u8]> {
        self.prepared.as_ref()?.statements.text_of(name)
    }

    fn deferred_begin(&self) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| r.deferred_begin.is_some())
    }

    fn hide_begin_reply(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.hide_begin_reply > 0)
    }

    fn set_state(&mut self, state: ClientState) {
        let m = &self.login.pools.metrics;
        if !m.collect {
            return;
        }
        let gauge = |s: ClientState| match s {
            ClientState::Idle => &m.clients_idle,
            ClientState::Waiting => &m.clients_waiting,
            ClientState::Active => &m.clients_active,
        };
        gauge(self.state).dec();
        gauge(state).inc();
        self.state = state;
        self.login.entry.set_state(state);
    }

    /// Adds the bytes and prepared-statement events counted since the last flush.
    fn flush_metrics(&mut self) {
        let m = &self.login.pools.metrics;
        if !m.collect {
            return;
        }
        m.bytes_received.inc_by(std::mem::take(&mut self.bytes_in));
        m.bytes_sent.inc_by(std::mem::take(&mut self.bytes_out));
        if let Some(p) = self.prepared.as_mut() {
            let pipeline = &mut p.pipeline;
            m.prepared_hits.inc_by(std::mem::take(&mut pipeline.hits));
            m.prepared_prepares
                .inc_by(std::mem::take(&mut pipeline.prepares));
            m.prepared_evictions
                .inc_by(std::mem::take(&mut pipeline.evictions));
        }
    }

    /// True when the server may go back to the pool (or be reset) as it is.
    fn server_idle(&self) -> bool {
        self.pending == 0
            && !self.unsynced
            && !self.copy_in
            && self.tx_status == status::IDLE
            && self.c_ready == 0
            && !self.c_scan.mid_message()
            && self.s_ready == self.s2c.len()
            && !self.s_scan.mid_message()
    }

    async fn run(&mut self) -> End {
        loop {
            if let Err(end) = self.step().await {
                return end;
            }
        }
    }

    /// One turn: frame new input, attach or release a server, write what can be written,
    /// then wait for the next event.
    async fn step(&mut self) -> Result<(), End> {
        self.scan_client()?;
        // The phase this turn acts on: the wait below ends at once if it has moved on.
        let phase = self.signal.phase();
        match phase {
            Phase::Running => {}
            Phase::Draining => {
                let idle = match self.server {
                    // A request waiting for a server is the start of a transaction,
                    // which runs; the client is told at its end.
                    // So is a BEGIN pgtide answered (the client is in a transaction).
                    None => self.c2s.is_empty() && !self.need_attach && !self.deferred_begin(),
                    Some(_) => {
                        (self.login.mode == PoolMode::Session || self.pinned().is_some())
                            && self.server_idle()
                    }
                };
                let grace = match (self.served, self.drain_grace) {
                    (true, _) => None,
                    (false, None) => {
                        let until = tokio::time::Instant::now() + DRAIN_FIRST_REQUEST_GRACE;
                        self.drain_grace = Some(until);
                        Some(until)
                    }
                    (false, Some(until)) => {
                        Some(until).filter(|u| *u > tokio::time::Instant::now())
                    }
                };
                if idle && grace.is_none() {
                    return Err(self
                        .tell(Error::pooler(
                            sqlstate::ADMIN_SHUTDOWN,
                            "pgtide is shutting down",
                        ))
                        .await);
                }
            }
            Phase::Now => {
                return Err(self
                    .tell(Error::pooler(
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgtide is shutting down: shutdown_timeout passed",
                    ))
                    .await)
            }
        }
        if self.server.is_none()
            && (self.c_ready > 0 || self.need_attach)
            && !self.deferred_begin()
            && self.begin_can_wait()
        {
            let msg = self.c2s.split().to_vec();
            if !self.tracked {
                // Counted when it was framed; it does not go out now.
                self.pending = self.pending.saturating_sub(1);
            }
            self.c_ready = 0;
            self.need_attach = false;
            let mut b = BytesMut::new();
            crate::protocol::put_message(&mut b, Some(tag::COMMAND_COMPLETE), |b| {
                b.extend_from_slice(b"BEGIN\0")
            });
            backend::ready_for_query(&mut b, status::IN_TRANSACTION);
            let at = self.s_ready;
            splice(&mut self.s2c, at..at, &b);
            self.s_ready += b.len();
            self.rare().deferred_begin = Some(msg);
            return Ok(());
        }
        if self.server.is_none() && (self.c_ready > 0 || self.need_attach) {
            match self.attach_now() {
                attach::Attaching::Done => {}
                next => Box::pin(self.attach_rest(next)).await?,
            }
            if std::mem::take(&mut self.need_attach) {
                // Frame (and map) the messages that waited for the server.
                self.scan_client()?;
            }
            if let Some(begin) = self.rare.as_mut().and_then(|r| r.deferred_begin.take()) {
                // The BEGIN pgtide answered goes first; its reply is hidden.
                let len = begin.len();
                let mut with_begin = BytesMut::with_capacity(len + self.c2s.len());
                with_begin.extend_from_slice(&begin);
                with_begin.extend_from_slice(&self.c2s);
                self.c2s = with_begin;
                self.c_ready += len;
                self.pending += 1;
                if self.tracked {
                    // Its answer comes before those of the messages mapped above.
                    self.prepared
                        .get_or_insert_with(Box::default)
                        .pipeline
                        .expect_query_first();
                }
                self.rare().hide_begin_reply = 2;
            }
        }
        if self.c_ready > 0 && self.server.is_some() && self.login.pools.metrics.collect {
            let now = self.req_started.get_or_insert_with(Instant::now);
            let now = *now;
            self.tx_started.get_or_insert(now);
        }
        if let Some(server) = &mut self.server {
            if let Err(e) = write_some(&mut server.stream, &mut self.c2s, &mut self.c_ready) {
                return Err(self.server_lost(&e.to_string()).await_told(self).await);
            }
        }
        if let Some(rare) = self.rare.as_mut() {
            if rare.retry.is_some() && self.s2c.len() - rare.retry_mark > RETRY_MAX {
                // Too much to hold back: the client gets the replica's answer as it comes.
                rare.retry = None;
            }
            if rare.retry_to_primary && self.pending == 0 && self.server.is_some() {
                return Box::pin(self.retry_on_primary()).await;
            }
        }
        // Cheapest first: `rare` exists only on routed databases.
        if self
            .rare
            .as_ref()
            .is_some_and(|r| r.for_write && r.server_fatal.is_none())
            && self.server.is_some()
            && self.tracks_this_write()
            && self.login.mode == PoolMode::Transaction
            && self.server_idle()
            && self.pinned().is_none()
        {
            // read_your_writes = "lsn": released before the answer goes out, so that the
            // write's position (learned at release) reaches the client before its
            // ReadyForQuery: the client has it when its commit returns.
            self.release().await;
        }
        let writable = match self.retry_mark() {
            Some(mark) => self.s_ready.min(mark),
            None => self.s_ready,
        };
        if writable > 0 || self.client.wants_flush() {
            let mut ready = writable;
            let r = write_some(&mut self.client, &mut self.s2c, &mut ready);
            let written = writable - ready;
            self.s_ready -= written;
            if let Some(rare) = self.rare.as_mut().filter(|r| r.retry.is_some()) {
                rare.retry_mark -= written;
            }
            self.bytes_out += written as u64;
            r.map_err(End::socket)?;
        }
        if self.server.is_some()
            && self.login.mode == PoolMode::Transaction
            && self.rare.as_ref().is_some_and(|r| r.unpin_check)
            && self.server_idle()
        {
            // A pinned client's transaction may have ended its session state.
            Box::pin(self.try_unpin()).await;
        }
        if let Some(end) = self.rare.as_mut().and_then(|r| r.server_fatal.take()) {
            return Err(self.server_ended(end).await_told(self).await);
        }
        if self.server.is_some()
            && self.login.mode == PoolMode::Transaction
            && self.server_idle()
            && self.pinned().is_none()
        {
            self.release().await;
            if self.signal.phase() != Phase::Running {
                // Shutting down: this client is idle now; the next turn tells it.
                return Ok(());
            }
            if self.c2s.len() > self.c_ready {
                // Messages held back (a write behind replica reads) go to a server chosen
                // for them now, not when the client next sends something.
                return Ok(());
            }
        }
        if self.terminated && (self.server.is_none() || self.pending == 0 || self.copy_in) {
            // Everything the client sent before Terminate has been answered (or a COPY
            // FROM STDIN waits for data that will never come); what is left open (a
            // transaction, a batch without Sync, the COPY) the cleanup closes.
            return Err(End::ClientLeft);
        }
        if self.server.is_none() && self.c2s.is_empty() && self.s2c.is_empty() {
            // Idle clients hold no buffers.
            put_spare(std::mem::take(&mut self.c2s));
            put_spare(std::mem::take(&mut self.s2c));
        }

        match self.wait(phase).await {
            Event::ClientReadable => match read_some(&mut self.client, &mut self.c2s) {
                Ok(Some(0)) => Err(End::ClientLeft),
                Ok(n) => {
                    self.bytes_in += n.unwrap_or(0) as u64;
                    Ok(())
                }
                Err(e) => Err(End::socket(e)),
            },
            Event::ServerReadable => {
                let Some(server) = &mut self.server else {
                    return Ok(());
                };
                match read_some(&mut server.stream, &mut self.s2c) {
                    Ok(Some(0)) => Err(self
                        .server_lost("the server closed the connection")
                        .await_told(self)
                        .await),
                    Ok(_) => self.scan_server(),
                    Err(e) => Err(self.server_lost(&e.to_string()).await_told(self).await),
                }
            }
            // The next turn acts on the new phase.
            Event::Phase => Ok(()),
            Event::ServerWritable | Event::ClientWritable => Ok(()),
            Event::Killed => Err(self.killed().await),
            Event::Timeout if self.transaction_timed_out() => Err(self
                .tell(Error::pooler(
                    sqlstate::TRANSACTION_TIMEOUT,
                    "terminating connection due to transaction timeout (transaction_timeout)",
                ))
                .await),
            Event::Timeout if self.server.is_some() && self.pending > 0 => {
                Box::pin(self.query_timed_out()).await
            }
            Event::Timeout => {
                if self.server.is_some() {
                    Err(self
                        .tell(Error::pooler(sqlstate::IDLE_IN_TRANSACTION_TIMEOUT, "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)"))
                        .await)
                } else {
                    Err(self
                        .tell(Error::pooler(sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout (client_idle_timeout)"))
                        .await)
                }
            }
        }
    }

    /// Ends the session after `KILL` on the admin console.
    async fn killed(&mut self) -> End {
        self.tell(Error::pooler(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command (KILL on the pgtide admin console)"))
        .await
    }
}

#[cfg(test)]
mod size_tests {
    //! What an idle client's task holds: tokio allocates a task at the size of its
    //! future's largest state, so these sizes are memory per connected client.
    use super::*;
    use std::mem::size_of;

    /// The size of what `f` returns (the future of an `async fn`, unpolled).
    fn ret1<A, R>(_: impl FnOnce(A) -> R) -> usize {
        size_of::<R>()
    }
    fn ret2<A, B, R>(_: impl FnOnce(A, B) -> R) -> usize {
        size_of::<R>()
    }

    #[test]
    fn an_idle_session_holds_one_session_and_its_wait() {
        let session = size_of::<Session>();
        let serve = ret2::<Session, ConnectedClient, _>(serve);
        let run = ret1::<&'static mut Session, _>(Session::run);
        let step = ret1::<&'static mut Session, _>(Session::step);
        let wait = ret2::<&'static mut Session, Phase, _>(Session::wait);
        let attach_rest = ret2::<&'static mut Session, attach::Attaching, _>(Session::attach_rest);
        let release = ret1::<&'static mut Session, _>(Session::release);
        eprintln!(
            "Session {session}, task future {serve}, Session::run {run}, step {step}, \
             wait {wait}, release {release}, attach_rest (boxed) {attach_rest}, \
             Rare (boxed) {}, Prepared (boxed) {}",
            size_of::<Rare>(),
            size_of::<Prepared>()
        );
        // One copy of the session (an `async fn` argument would add a second).
        assert!(
            serve < 2 * session,
            "task future {serve} B, session {session} B"
        );
        assert!(serve <= session + run + 64);
        // A turn's largest state is the idle wait: the attach's waiting part is boxed.
        assert!(
            step <= wait.max(release) + 64,
            "step {step} B, wait {wait} B"
        );
        assert!(attach_rest > step);
    }
}
