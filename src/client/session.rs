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

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use super::login::{self, LoggedIn, NoSession};
use super::params::may_change_settings;
use super::Shared;
use crate::config::PoolMode;
use crate::prepared::{self, ClientStatements, Pipeline};
use crate::protocol::backend::{self, Severity};
use crate::protocol::{frontend, sqlstate, status, tag, ScanError, Scanner};
use crate::server::ServerConn;
use crate::shutdown::{Phase, ShutdownSignal};
use crate::stream::Stream;

/// The largest request, and answer, held for a retry on the primary.
const RETRY_MAX: usize = 256 * 1024;

/// Read at most this much ahead of what the other side has taken.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// Runs one client connection from its first byte to its end. This is the client's
/// task (spawned as it is, no wrapping future): what it holds while the client is idle is
/// what an idle client costs.
pub(super) async fn run(
    mut tcp: TcpStream,
    slot: super::ClientSlot,
    signal: ShutdownSignal,
    over_limit: bool,
) {
    let _ = tcp.set_nodelay(true);
    let shared = &slot.0;
    if signal.phase() != Phase::Running {
        Box::pin(login::send_fatal(
            &mut tcp,
            sqlstate::ADMIN_SHUTDOWN,
            "pgtide is shutting down",
            None,
        ))
        .await;
        return;
    }
    // Boxed: the login's state is freed once it is done, not kept in this task's.
    let session = match Box::pin(login::login(tcp, shared, over_limit)).await {
        // Moved into the session in this arm: a binding that outlived the match would
        // keep its own copy in the task's future for the client's whole life.
        Ok((stream, logged_in)) => Session::new(stream, shared.clone(), logged_in, signal),
        Err(NoSession::Done) | Err(NoSession::Refused) => return,
        Err(NoSession::Admin { stream: None, .. }) => return,
        Err(NoSession::Admin {
            user,
            database,
            application_name,
            stream: Some(stream),
        }) => {
            let who = crate::admin::console::Login {
                user,
                database,
                application_name,
            };
            Box::pin(crate::admin::console::run(
                stream,
                shared.clone(),
                who,
                signal,
            ))
            .await;
            return;
        }
    };
    // A task of its own: this one's future (the arguments above, the login's result)
    // is freed, and the client holds only the session and its turn's state.
    tokio::spawn(serve(session, slot));
}

/// The logged-in client's transactions, until the session ends. Not an `async fn`: its
/// arguments would be copied into the future's own locals (two sessions per client); an
/// `async` block uses what it captured in place.
#[allow(clippy::manual_async_fn)]
fn serve(
    mut session: Session,
    slot: super::ClientSlot,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        session.login.pool.metrics.clients_idle.inc();
        let end = session.run().await;
        Box::pin(session.finish(&end)).await;
        session.flush_metrics();
        match session.state {
            ClientState::Idle => session.login.pool.metrics.clients_idle.dec(),
            ClientState::Waiting => session.login.pool.metrics.clients_waiting.dec(),
            ClientState::Active => session.login.pool.metrics.clients_active.dec(),
        }
        session.shared.cancels.unregister(session.login.key_pid);
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

/// Why a session ended.
enum End {
    /// Terminate, or the client closed its socket.
    ClientLeft,
    /// The client broke the protocol or an I/O error occurred on its socket.
    ClientError(String),
    /// pgtide ended the session and told the client why (a FATAL went out).
    Told(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientLeft => f.write_str("client left"),
            End::ClientError(e) => write!(f, "client error: {e}"),
            End::Told(m) => f.write_str(m),
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    client: Stream,
    login: LoggedIn,
    /// The shutdown phase; its changes wake the session through `login.entry` (see
    /// [`wake_clients`](super::wake_clients)).
    signal: ShutdownSignal,
    /// The idle timeouts' timer, once one was needed (reset for each wait).
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Bytes from the client; `c2s[..c_ready]` is framed and goes to the server.
    c2s: BytesMut,
    c_scan: Scanner,
    c_ready: usize,
    /// Bytes from the server; `s2c[..s_ready]` is framed and goes to the client.
    s2c: BytesMut,
    s_scan: Scanner,
    s_ready: usize,
    server: Option<Box<ServerConn>>,
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
    /// The pool the current (or last) server came from: the primary's, or a replica's.
    pool: Arc<crate::pool::Pool>,
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
    server_fatal: Option<String>,
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
}

/// Where a transaction runs, as [`Session::choose_pool`] decides.
struct Choice {
    pool: Arc<crate::pool::Pool>,
    /// The pool is a replica's.
    replica: bool,
    /// An explicit read-only transaction (or a forced route) on a replica.
    replica_tx: bool,
    /// The primary was chosen because the transaction may write.
    write: bool,
    /// For the routing metrics (databases with several hosts only).
    outcome: Option<Outcome>,
}

/// What is left of an attach after its synchronous part ([`Session::attach_now`]).
enum Attaching {
    /// The server is attached.
    Done,
    /// No server for this client: the FATAL's code and message.
    Refuse(std::borrow::Cow<'static, str>, String),
    /// Wait for the monitor to find a primary (if `wait_primary`), then for a server.
    Wait {
        wait_primary: bool,
        outcome: Option<Outcome>,
        waiting_since: Instant,
    },
    /// A server was checked out; these statements bring its settings in line first.
    Sync(Box<ServerConn>, String),
}

/// A routing decision, as the `pgtide_routing_decisions_total` counter names it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Primary,
    Replica,
    Fallback,
    Hint,
    RetriedPrimary,
}

/// A client's state, as the `pgtide_clients` gauge counts it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Idle,
    Waiting,
    Active,
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

fn client_whole(t: u8) -> bool {
    matches!(t, tag::QUERY | tag::PARSE | tag::TERMINATE)
}

/// With prepared-statement tracking every message that owes an answer is looked at.
fn client_whole_tracked(t: u8) -> bool {
    owes_answer(t) || matches!(t, tag::FLUSH | tag::TERMINATE)
}

fn owes_answer(t: u8) -> bool {
    matches!(
        t,
        tag::QUERY
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::SYNC
            | tag::FUNCTION_CALL
    )
}

fn server_whole(t: u8) -> bool {
    matches!(
        t,
        tag::READY_FOR_QUERY | tag::PARAMETER_STATUS | tag::ERROR_RESPONSE
    )
}

fn server_whole_tracked(t: u8) -> bool {
    server_whole(t) || prepared::server_tag_tracked(t)
}

/// Replaces `buf[range]` with `with`.
fn splice(buf: &mut BytesMut, range: std::ops::Range<usize>, with: &[u8]) {
    if range.len() == with.len() {
        buf[range].copy_from_slice(with);
        return;
    }
    let tail = buf.split_off(range.end);
    buf.truncate(range.start);
    buf.extend_from_slice(with);
    buf.unsplit(tail);
}

/// Reads what is available into `buf`: `Ok(None)` when nothing was (spurious wake-up).
/// A plain socket's readiness is cleared by a read that drains it
/// ([`Stream::try_read_buf`]), so the next wait goes to the reactor.
fn read_some(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    if buf.capacity() == 0 {
        *buf = take_spare();
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    match stream.try_read_buf(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

thread_local! {
    /// Buffers of sessions that went idle, for the next session on this thread that
    /// reads: a transaction then costs no allocation of its buffers.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// At most this many spare buffers per worker thread.
const SPARE_MAX: usize = 32;

fn take_spare() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK))
}

/// Keeps an emptied buffer for reuse (or frees it: too small, or enough are kept).
fn put_spare(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < READ_CHUNK / 2 || buf.capacity() > 2 * READ_CHUNK {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_MAX {
            s.push(buf);
        }
    });
}

/// Writes as much of `buf[..*ready]` as the socket takes without blocking (with TLS,
/// and what rustls still holds from earlier writes).
fn write_some(stream: &mut Stream, buf: &mut BytesMut, ready: &mut usize) -> io::Result<()> {
    while *ready > 0 {
        match stream.try_write(&buf[..*ready]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.advance(n);
                *ready -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    stream.try_flush()
}

impl Session {
    fn new(client: Stream, shared: Arc<Shared>, login: LoggedIn, signal: ShutdownSignal) -> Self {
        let max = shared.config().pgtide.max_message_size;
        let tracked = login.mode == PoolMode::Transaction
            && shared.config().pgtide.max_prepared_statements > 0;
        let pool = login.pool.clone();
        Session {
            shared,
            client,
            login,
            signal,
            timer: None,
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
            pool,
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
        let m = &self.login.pool.metrics;
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
        self.login.entry.set_state(match state {
            ClientState::Idle => crate::admin::registry::ClientState::Idle,
            ClientState::Waiting => crate::admin::registry::ClientState::Waiting,
            ClientState::Active => crate::admin::registry::ClientState::Active,
        });
    }

    /// Adds the bytes and prepared-statement events counted since the last flush.
    fn flush_metrics(&mut self) {
        let m = &self.login.pool.metrics;
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
                    None => true,
                    Some(_) => self.login.mode == PoolMode::Session && self.server_idle(),
                };
                if idle {
                    return Err(self
                        .tell(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down")
                        .await);
                }
            }
            Phase::Now => {
                return Err(self
                    .tell(
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgtide is shutting down: shutdown_timeout passed",
                    )
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
                Attaching::Done => {}
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
                    let mut end = len;
                    self.track_client_message(tag::QUERY, 0, &mut end);
                }
                self.rare().hide_begin_reply = 2;
            }
        }
        if self.c_ready > 0 && self.server.is_some() && self.login.pool.metrics.collect {
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
            r.map_err(|e| End::ClientError(e.to_string()))?;
        }
        if let Some(msg) = self.rare.as_mut().and_then(|r| r.server_fatal.take()) {
            return Err(self.server_lost(&msg).await_told(self).await);
        }
        if self.server.is_some() && self.login.mode == PoolMode::Transaction && self.server_idle() {
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
        if self.terminated && (self.server.is_none() || self.pending == 0) {
            // Everything the client sent before Terminate has been answered; what is
            // left open (a transaction, a batch without Sync) the cleanup closes.
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
                Err(e) => Err(End::ClientError(e.to_string())),
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
            Event::Timeout => {
                if self.server.is_some() {
                    Err(self
                        .tell(
                            sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                            "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)",
                        )
                        .await)
                } else {
                    Err(self
                        .tell(
                            sqlstate::IDLE_SESSION_TIMEOUT,
                            "terminating connection due to idle-session timeout (client_idle_timeout)",
                        )
                        .await)
                }
            }
        }
    }

    /// Ends the session after `KILL` on the admin console.
    async fn killed(&mut self) -> End {
        self.tell(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command (KILL on the pgtide admin console)",
        )
        .await
    }

    /// Waits for the next thing to do; `phase` is the shutdown phase the caller acted on.
    async fn wait(&mut self, phase: Phase) -> Event {
        let timer = {
            // Read once per wait, not held across it (a reload may swap the config).
            let config = self.shared.config();
            let g = &config.pgtide;
            match &self.server {
                None => g.client_idle_timeout.enabled(),
                Some(_)
                    if self.pending == 0 && self.tx_status != status::IDLE && self.c_ready == 0 =>
                {
                    g.idle_transaction_timeout.enabled()
                }
                Some(_) => None,
            }
        };
        let server = self.server.as_ref().map(|s| &s.stream);
        let want_client = !self.terminated && (self.c_ready == 0 || self.c2s.len() < HIGH_WATER);
        let want_server = server.is_some() && (self.s_ready == 0 || self.s2c.len() < HIGH_WATER);
        let want_server_write = server.is_some_and(|s| self.c_ready > 0 || s.wants_flush());
        // Bytes that may go to the client now (an answer held for a retry does not).
        let client_bytes = match self.retry_mark() {
            Some(mark) => self.s_ready.min(mark),
            None => self.s_ready,
        };
        let want_client_write = client_bytes > 0 || self.client.wants_flush();
        let mut timer = match timer {
            Some(d) => {
                // One timer per session, made the first time one is needed and reset
                // for every wait after that.
                let deadline = tokio::time::Instant::now() + d;
                match &mut self.timer {
                    Some(t) => t.as_mut().reset(deadline),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.timer.as_mut()
            }
            None => None,
        };
        let client = &self.client;
        // KILL and a change of the shutdown phase wake the session through its registry
        // entry: one wait for both, and none allocated per session.
        let entry = &self.login.entry;
        let signal = &self.signal;
        // Polled in place, in this order (first ready wins), rather than through a
        // `select!` of one future per branch: a session's future is as large as its
        // largest wait, and every connected client holds one.
        std::future::poll_fn(|cx| {
            use std::future::Future;
            use std::task::Poll;
            if entry
                .poll_woken(cx, || entry.is_killed() || signal.phase() != phase)
                .is_ready()
            {
                return Poll::Ready(if entry.is_killed() {
                    Event::Killed
                } else {
                    Event::Phase
                });
            }
            if let Some(server) = server {
                if want_server && server.poll_readable(cx).is_ready() {
                    return Poll::Ready(Event::ServerReadable);
                }
            }
            if want_client && client.poll_readable(cx).is_ready() {
                return Poll::Ready(Event::ClientReadable);
            }
            if let Some(server) = server {
                if want_server_write && server.poll_writable(cx).is_ready() {
                    return Poll::Ready(Event::ServerWritable);
                }
            }
            if want_client_write && client.poll_writable(cx).is_ready() {
                return Poll::Ready(Event::ClientWritable);
            }
            if let Some(t) = timer.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timeout);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Frames new client bytes and notes what they owe and change.
    fn scan_client(&mut self) -> Result<(), End> {
        let mut pos = self.c_ready;
        pos += self.c_scan.resume(&self.c2s[pos..]);
        let whole = if self.tracked {
            client_whole_tracked
        } else {
            client_whole
        };
        loop {
            let start = pos;
            let frame = match self.c_scan.next(&self.c2s, &mut pos, whole) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.protocol_error(e)),
            };
            if self.tracked && self.server.is_none() && frame.tag == tag::FLUSH {
                // Nothing is pending without a server: the Flush has nothing to push.
                splice(&mut self.c2s, start..pos, &[]);
                pos = start;
                continue;
            }
            if self.tracked && self.server.is_none() && owes_answer(frame.tag) {
                let local = frame.body.and_then(|body| {
                    prepared::answer_without_server(
                        frame.tag,
                        body,
                        &mut self.prepared.get_or_insert_with(Box::default).statements,
                        &self.shared.statements,
                        self.login.params.search_path().unwrap_or("").as_bytes(),
                    )
                });
                if let Some(answer) = local {
                    // Answered here (a re-Parse of a known statement, a Close, their
                    // Sync): no server is tied up, so a client that prepares while its
                    // siblings hold every server cannot deadlock the pool.
                    if frame.tag == tag::SYNC {
                        self.unsynced = false;
                    }
                    splice(&mut self.c2s, start..pos, &[]);
                    pos = start;
                    let at = self.s_ready;
                    splice(&mut self.s2c, at..at, &answer);
                    self.s_ready += answer.len();
                    continue;
                }
                // Mapping statements needs the server: attach, then come back for it.
                pos = start;
                self.need_attach = true;
                break;
            }
            if self.server.is_some()
                && self.on_replica
                && !self.replica_tx
                && self.writes(frame.tag, frame.body)
            {
                // A write behind reads that went to a replica: it waits in `c2s` until the
                // replica has answered everything before it, then gets a server of its own.
                tracing::debug!(tag = %(frame.tag as char), pending = self.pending, unsynced = self.unsynced, "holding a write behind replica reads");
                pos = start;
                break;
            }
            let mut counted = true;
            match frame.tag {
                tag::QUERY => {
                    self.pending += 1;
                    self.copy_window_open = true;
                    self.copy_window_syncs = 0;
                    if let Some(sql) = frame.body.and_then(frontend::query_text) {
                        self.settings_changed |= may_change_settings(sql);
                    }
                }
                tag::PARSE => {
                    self.unsynced = true;
                    if let Some((_, sql)) = frame.body.and_then(frontend::parse_statement) {
                        self.settings_changed |= may_change_settings(sql);
                    }
                }
                tag::SYNC => {
                    self.unsynced = false;
                    // A Sync sent during COPY IN is ignored by the server.
                    counted = !self.copy_in;
                    if !self.copy_in {
                        self.pending += 1;
                        if self.copy_window_open {
                            self.copy_window_syncs += 1;
                        }
                    }
                }
                tag::FUNCTION_CALL => self.pending += 1,
                tag::EXECUTE => {
                    self.unsynced = true;
                    self.copy_window_open = true;
                    self.copy_window_syncs = 0;
                }
                // A Flush owes nothing by itself: the messages before it pin the server
                // until their Sync (libpq's pipeline mode sends Sync, Flush).
                tag::BIND | tag::DESCRIBE | tag::CLOSE => self.unsynced = true,
                tag::COPY_DONE | tag::COPY_FAIL => {
                    self.copy_in = false;
                    self.copy_window_open = false;
                }
                tag::TERMINATE => {
                    self.c2s.truncate(start);
                    pos = start;
                    self.terminated = true;
                    break;
                }
                _ => {}
            }
            if let Some(rare) = self.rare.as_mut() {
                if let Some(kept) = rare.retry.as_mut() {
                    if frame.body.is_some() && kept.len() < RETRY_MAX {
                        kept.extend_from_slice(&self.c2s[start..pos]);
                    } else {
                        rare.retry = None;
                    }
                }
            }
            if self.tracked && counted && owes_answer(frame.tag) {
                self.track_client_message(frame.tag, start, &mut pos);
            }
        }
        self.c_ready = pos;
        Ok(())
    }

    /// Records what the server owes for the message at `c2s[start..*end]` and maps its
    /// statement names, rewriting it in place if need be.
    fn track_client_message(&mut self, t: u8, start: usize, end: &mut usize) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let mut to_client = Vec::new();
        let p = self.prepared.get_or_insert_with(Box::default);
        let (action, effects) = {
            let mut cx = prepared::Ctx {
                client: &mut p.statements,
                server: &mut server.statements,
                pipeline: &mut p.pipeline,
                cache: &self.shared.statements,
                max_per_server: self.shared.config().pgtide.max_prepared_statements as usize,
                search_path: self.login.params.search_path().unwrap_or("").as_bytes(),
                to_client: &mut to_client,
            };
            prepared::on_client_message(t, &self.c2s[start + 5..*end], &mut cx)
        };
        self.dealloc_pending |= effects.deallocates_all;
        if let prepared::ClientAction::Replace(bytes) = action {
            splice(&mut self.c2s, start..*end, &bytes);
            *end = start + bytes.len();
        }
        if !to_client.is_empty() {
            let at = self.s_ready;
            splice(&mut self.s2c, at..at, &to_client);
            self.s_ready += to_client.len();
        }
    }

    /// Frames new server bytes and follows the transaction state.
    fn scan_server(&mut self) -> Result<(), End> {
        let mut pos = self.s_ready;
        pos += self.s_scan.resume(&self.s2c[pos..]);
        // CommandComplete is looked at whole while a BEGIN's reply is to be hidden.
        let whole = if self.tracked || self.hide_begin_reply() {
            server_whole_tracked
        } else {
            server_whole
        };
        loop {
            let start = pos;
            let frame = match self.s_scan.next(&self.s2c, &mut pos, whole) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // The server broke framing: nothing more it sends can be trusted.
                    self.s2c.truncate(start);
                    pos = start;
                    self.rare().server_fatal = Some(format!("invalid data from the server: {e}"));
                    break;
                }
            };
            let mut error_code = None;
            let t = frame.tag;
            match (frame.tag, frame.body) {
                (tag::READY_FOR_QUERY, Some(body)) => {
                    self.pending = self.pending.saturating_sub(1);
                    let previous = self.tx_status;
                    self.tx_status = body.first().copied().unwrap_or(status::IDLE);
                    self.copy_in = false;
                    self.count_ready_for_query(previous);
                }
                (tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE, _) => {
                    if self.login.pool.metrics.collect {
                        self.login.pool.metrics.queries.inc();
                    }
                    self.did_work = true;
                }
                (tag::PARAMETER_STATUS, Some(body)) => {
                    if let Some((k, v)) = backend::parse_parameter_status(body) {
                        self.login.params.observe(k, v);
                        if let Some(s) = self.server.as_mut() {
                            s.params.insert(k.to_ascii_lowercase(), v.to_string());
                            s.params_match = None;
                        }
                    }
                }
                (tag::ERROR_RESPONSE, Some(body)) => {
                    let f = backend::parse_error_fields(body);
                    error_code = Some(f.code.to_string());
                    self.login.pool.metrics.error(f.code);
                    if f.code == "25006" {
                        if let Some(rare) = self.rare.as_mut().filter(|r| r.retry.is_some()) {
                            rare.retry_to_primary = true;
                        }
                    }
                    if self.login.pool.metrics.collect {
                        self.login.pool.metrics.queries.inc();
                    }
                    self.did_work = true;
                    if f.is_fatal() {
                        let msg = format!("{} (SQLSTATE {})", f.message, f.code);
                        self.s2c.truncate(start);
                        pos = start;
                        self.rare().server_fatal = Some(msg);
                        break;
                    }
                }
                (tag::COPY_IN_RESPONSE, _) => {
                    // Syncs the client sent after the message that started this COPY
                    // (and before it ended it) are swallowed by the server.
                    self.pending = self.pending.saturating_sub(self.copy_window_syncs);
                    if let Some(p) = self.prepared.as_mut() {
                        p.pipeline.drop_syncs(self.copy_window_syncs);
                    }
                    self.copy_window_syncs = 0;
                    self.copy_in = self.copy_window_open;
                }
                _ => {}
            }
            if self.hide_begin_reply() && matches!(t, tag::COMMAND_COMPLETE | tag::READY_FOR_QUERY)
            {
                // The reply to the BEGIN pgtide already answered.
                self.rare().hide_begin_reply -= 1;
                let mut after = Vec::new();
                if self.tracked {
                    if let Some(server) = self.server.as_mut() {
                        let p = self.prepared.get_or_insert_with(Box::default);
                        prepared::on_server_message(
                            t,
                            None,
                            prepared::ServerCtx {
                                pipeline: &mut p.pipeline,
                                server: &mut server.statements,
                                client: &mut p.statements,
                                cache: &self.shared.statements,
                                after: &mut after,
                            },
                        );
                    }
                }
                // Answers pgtide owes right after it still go out.
                splice(&mut self.s2c, start..pos, &after);
                pos = start + after.len();
                continue;
            }
            if self.tracked {
                if let Some(server) = self.server.as_mut() {
                    let mut after = Vec::new();
                    let p = self.prepared.get_or_insert_with(Box::default);
                    let hide = prepared::on_server_message(
                        t,
                        error_code.as_deref(),
                        prepared::ServerCtx {
                            pipeline: &mut p.pipeline,
                            server: &mut server.statements,
                            client: &mut p.statements,
                            cache: &self.shared.statements,
                            after: &mut after,
                        },
                    );
                    if hide {
                        splice(&mut self.s2c, start..pos, &[]);
                        pos = start;
                    }
                    if !after.is_empty() {
                        splice(&mut self.s2c, pos..pos, &after);
                        pos += after.len();
                    }
                }
            }
        }
        self.s_ready = pos;
        Ok(())
    }

    /// Counts a ReadyForQuery: the end of a request when nothing more is owed, and of a
    /// transaction when the server is idle again after doing something.
    fn count_ready_for_query(&mut self, previous: u8) {
        let m = &self.login.pool.metrics;
        if !m.collect {
            return;
        }
        if self.pending == 0 {
            if let Some(t) = self.req_started.take() {
                m.query_seconds.observe(t.elapsed().as_secs_f64());
            }
        }
        if self.tx_status == status::IDLE && (self.did_work || previous != status::IDLE) {
            m.transactions.inc();
            if let Some(t) = self.tx_started.take() {
                m.transaction_seconds.observe(t.elapsed().as_secs_f64());
            }
            self.did_work = false;
        } else if self.tx_status == status::IDLE {
            self.tx_started = None;
        }
    }

    /// The SQL texts of the complete messages waiting in `c2s` (Query and Parse texts,
    /// and the text of each named statement a Bind uses), and whether the batch is
    /// complete (its last message is a Query or a Sync).
    fn pending_texts(&self) -> (Vec<&[u8]>, bool) {
        let mut texts = Vec::new();
        let mut complete = false;
        let mut scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        let buf = &self.c2s[..];
        let mut pos = 0;
        while let Ok(Some(f)) = scan.next(buf, &mut pos, |_| true) {
            let Some(body) = f.body else { break };
            complete = matches!(f.tag, tag::QUERY | tag::SYNC);
            match f.tag {
                tag::QUERY => texts.extend(frontend::query_text(body)),
                tag::PARSE => texts.extend(frontend::parse_statement(body).map(|(_, sql)| sql)),
                tag::BIND => {
                    let name = crate::protocol::cstr(body)
                        .and_then(|(_, rest)| crate::protocol::cstr(rest))
                        .map(|(n, _)| n);
                    if let Some(sql) = name.and_then(|n| self.statement_text(n)) {
                        texts.push(sql);
                    }
                }
                _ => {}
            }
        }
        (texts, complete)
    }

    /// True when a Query, Parse or Bind (of a named statement) must run on the primary.
    fn writes(&self, t: u8, body: Option<&[u8]>) -> bool {
        use crate::router::classify::{classify, ClassifyOptions, Route};
        let Some(body) = body else { return false };
        let sql = match t {
            tag::QUERY => frontend::query_text(body),
            tag::PARSE => frontend::parse_statement(body).map(|(_, sql)| sql),
            tag::BIND => crate::protocol::cstr(body)
                .and_then(|(_, rest)| crate::protocol::cstr(rest))
                .and_then(|(n, _)| self.statement_text(n)),
            _ => None,
        };
        let opts = ClassifyOptions {
            write_functions: &self.shared.config().pgtide.write_functions,
            hints: self.shared.config().pgtide.routing_hints,
        };
        sql.is_some_and(|sql| classify(sql, &opts).route == Route::Primary)
    }

    /// Where the transaction the client is starting should run. `Err` carries the message
    /// for a read that may not fall back to the primary.
    fn choose_pool(&self) -> Result<Choice, String> {
        use crate::config::{LoadBalance, ReplicaFallback, Route as Override};
        use crate::router::classify::{classify, transaction_mode, ClassifyOptions, Route};
        let primary = || {
            Ok(Choice {
                pool: self.login.pool_for_primary(&self.shared),
                replica: false,
                replica_tx: false,
                write: false,
                outcome: Some(Outcome::Primary),
            })
        };
        let Some(cluster) = self.shared.cluster(self.login.database()) else {
            return primary().map(|c| Choice { outcome: None, ..c });
        };
        if self.rare.as_ref().is_some_and(|r| r.force_primary) {
            return primary().map(|c| Choice {
                write: true,
                outcome: Some(Outcome::RetriedPrimary),
                ..c
            });
        }
        let deferred_read_only = self.deferred_begin() && {
            // The transaction pgtide began: read-only if its first statement says so.
            let (texts, _) = self.pending_texts();
            texts
                .first()
                .and_then(|sql| transaction_mode(sql))
                .is_some_and(|tx| {
                    tx.kind == crate::router::classify::TxKind::SetTransaction
                        && tx.read_only == Some(true)
                        && tx.replica_ok(false)
                })
        };
        if self.login.mode != PoolMode::Transaction {
            return primary();
        }
        let Some(settings) = self
            .shared
            .config()
            .cluster_settings(self.login.database(), self.login.user())
        else {
            return primary();
        };
        let r = &settings.routing;
        let mut explicit = false;
        // Routed by a hint: a pgtide: comment, the pgtide.route setting, a route override.
        let mut hinted = r.route != Override::Auto
            || matches!(
                self.login.params.value("pgtide.route"),
                Some("primary" | "replica")
            );
        let route = match (r.route, self.login.params.value("pgtide.route")) {
            _ if self.deferred_begin() => {
                explicit = true;
                if deferred_read_only {
                    Route::Replica
                } else {
                    return primary().map(|c| Choice { write: true, ..c });
                }
            }
            (_, Some("primary")) | (Override::Primary, _) => Route::Primary,
            (_, Some("replica")) | (Override::Replica, _) => {
                // Everything goes to a replica, writes too (they fail there): nothing is
                // held back for the primary.
                explicit = true;
                Route::Replica
            }
            _ => {
                let (texts, complete) = self.pending_texts();
                let default_ro = matches!(
                    self.login.params.value("default_transaction_read_only"),
                    Some("on" | "true" | "1" | "yes")
                );
                let opts = ClassifyOptions {
                    write_functions: &r.write_functions,
                    hints: r.routing_hints,
                };
                let mut route = if complete && !texts.is_empty() {
                    Route::Replica
                } else {
                    Route::Primary
                };
                for (i, sql) in texts.iter().enumerate() {
                    if i == 0 {
                        if let Some(tx) = transaction_mode(sql) {
                            if tx.starts_transaction() {
                                // An explicit transaction: all of it goes where its start says.
                                route = if tx.replica_ok(default_ro) {
                                    Route::Replica
                                } else {
                                    Route::Primary
                                };
                                explicit = true;
                                break;
                            }
                        }
                    }
                    let decision = classify(sql, &opts);
                    if matches!(
                        decision.reason,
                        crate::router::classify::Reason::HintPrimary
                            | crate::router::classify::Reason::HintReplica
                    ) {
                        hinted = true;
                    }
                    if decision.route == Route::Primary {
                        route = Route::Primary;
                        break;
                    }
                }
                route
            }
        };
        let outcome = |o: Outcome| Some(if hinted { Outcome::Hint } else { o });
        if route == Route::Primary {
            return primary().map(|c| Choice {
                write: true,
                outcome: outcome(Outcome::Primary),
                ..c
            });
        }
        let mut replicas = cluster.replicas_within(r.max_replica_lag_bytes, r.max_replica_lag);
        if let Some(lsn) = self.rare.as_ref().and_then(|r| r.written_lsn) {
            // Read your writes: only replicas seen to have replayed the client's last write.
            let usable = replicas.len();
            replicas.retain(|id| {
                cluster
                    .host(*id)
                    .and_then(|h| h.replay_lsn)
                    .is_some_and(|replayed| replayed.0 >= lsn)
            });
            if replicas.len() < usable && self.login.pool.metrics.collect {
                self.login.pool.metrics.routing.read_your_writes.inc();
            }
        }
        if r.primary_reads {
            if let Some(p) = cluster.primary() {
                replicas.push(p);
            }
        }
        if replicas.is_empty() {
            return match r.replica_fallback {
                ReplicaFallback::Primary => primary().map(|c| Choice {
                    outcome: outcome(Outcome::Fallback),
                    ..c
                }),
                ReplicaFallback::Error => Err(format!(
                    "no replica of database \"{}\" is up and within max_replica_lag, and replica_fallback is \"error\"",
                    self.login.database()
                )),
            };
        }
        let turn = self
            .shared
            .replica_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let weight = |id: crate::cluster::HostId| cluster.host(id).map_or(1, |h| h.weight.max(1));
        let pick = match r.load_balance {
            LoadBalance::Random => {
                // In proportion to weight.
                let total: u32 = replicas.iter().map(|id| weight(*id)).sum();
                let mut n = rand::random::<u32>() % total.max(1);
                let mut pick = replicas[0];
                for id in &replicas {
                    if n < weight(*id) {
                        pick = *id;
                        break;
                    }
                    n -= weight(*id);
                }
                pick
            }
            LoadBalance::RoundRobin => replicas[turn % replicas.len()],
            LoadBalance::LeastOutstanding => {
                // Fewest connections in use or waited for, per unit of weight; ties go
                // in turn.
                let load = |id: crate::cluster::HostId| {
                    let busy = self
                        .shared
                        .pool_on(self.login.database(), self.login.user(), id.0)
                        .map_or(0, |p| {
                            let (total, idle, waiting) = p.counts();
                            total as usize - idle + waiting
                        });
                    busy as f64 / f64::from(weight(id))
                };
                let n = replicas.len();
                let mut best = replicas[turn % n];
                let mut best_load = load(best);
                for k in 1..n {
                    let id = replicas[(turn + k) % n];
                    let l = load(id);
                    if l < best_load {
                        best = id;
                        best_load = l;
                    }
                }
                best
            }
        };
        let is_replica = Some(pick) != cluster.primary();
        match self
            .shared
            .pool_on(self.login.database(), self.login.user(), pick.0)
        {
            Some(pool) => Ok(Choice {
                pool,
                replica: is_replica,
                replica_tx: is_replica && explicit,
                write: false,
                outcome: outcome(if is_replica {
                    Outcome::Replica
                } else {
                    Outcome::Primary
                }),
            }),
            None => primary().map(|c| Choice {
                outcome: outcome(Outcome::Fallback),
                ..c
            }),
        }
    }

    /// True when the client's only pending message is a plain `BEGIN` (no read mode) on a
    /// routed database: pgtide can answer it and route the transaction by what follows.
    fn begin_can_wait(&self) -> bool {
        use crate::config::Route as Override;
        use crate::router::classify::{transaction_mode, TxKind};
        if self.login.mode != PoolMode::Transaction
            || !self.shared.clusters().contains_key(self.login.database())
        {
            return false;
        }
        let routed_by_text = self
            .shared
            .config()
            .cluster_settings(self.login.database(), self.login.user())
            .is_some_and(|s| s.routing.route == Override::Auto);
        if !routed_by_text || self.login.params.value("pgtide.route").is_some() {
            return false;
        }
        let mut scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        let mut pos = 0;
        let Ok(Some(f)) = scan.next(&self.c2s, &mut pos, |_| true) else {
            return false;
        };
        if f.tag != tag::QUERY || pos != self.c2s.len() {
            return false;
        }
        let Some(sql) = f.body.and_then(frontend::query_text) else {
            return false;
        };
        transaction_mode(sql).is_some_and(|tx| {
            tx.kind == TxKind::Begin && tx.read_only.is_none() && !self.session_read_only()
        }) && crate::router::lexer::Lexer::new(sql)
            .filter(|t| matches!(t, crate::router::lexer::Token::Semicolon))
            .count()
            <= 1
    }

    fn session_read_only(&self) -> bool {
        matches!(
            self.login.params.value("default_transaction_read_only"),
            Some("on" | "true" | "1" | "yes")
        )
    }

    /// The replica refused the request as a write (25006) and nothing of its answer reached
    /// the client: drop the answer, give the replica back, and send the request again,
    /// to the primary.
    async fn retry_on_primary(&mut self) -> Result<(), End> {
        let idle = self.server_idle();
        let rare = self.rare();
        rare.retry_to_primary = false;
        if !idle {
            // The replica is not idle (say, its answer is still arriving): no retry; the
            // client gets the replica's answer, error included.
            rare.retry = None;
            return Ok(());
        }
        let Some(kept) = rare.retry.take() else {
            return Ok(());
        };
        let mark = rare.retry_mark;
        tracing::debug!("a replica refused a write (25006); running it on the primary");
        self.s2c.truncate(mark);
        self.s_ready = mark;
        self.release().await;
        let mut again = kept;
        again.extend_from_slice(&self.c2s[self.c_ready..]);
        self.c2s = again;
        self.c_ready = 0;
        self.c_scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        self.rare().force_primary = true;
        Ok(())
    }

    /// The client's database has a monitor that knows no primary (failover under way).
    fn primary_unknown(&self) -> bool {
        self.shared
            .clusters()
            .get(self.login.database())
            .is_some_and(|c| c.primary().is_none())
    }

    /// A database whose monitor knows no primary (failover under way): wait up to
    /// `primary_wait_timeout` for one, then take its pool.
    async fn wait_for_primary(&mut self) {
        let Some(cluster) = self.shared.cluster(self.login.database()) else {
            return;
        };
        if cluster.primary().is_some() {
            return;
        }
        let wait = self
            .shared
            .config()
            .cluster_settings(self.login.database(), self.login.user())
            .map_or(Duration::ZERO, |s| s.routing.primary_wait_timeout);
        let mut changes = cluster.primary_changes();
        let _ = Box::pin(tokio::time::timeout(
            wait,
            changes.wait_for(|p| p.is_some()),
        ))
        .await;
        self.pool = self.login.pool_for_primary(&self.shared);
    }

    /// read_your_writes = lsn: after a transaction on the primary, remembers where its
    /// WAL ends (one extra round trip), so that the client's reads avoid replicas that
    /// have not replayed it yet.
    async fn note_written_lsn(&mut self, server: &mut ServerConn) {
        // Cheap checks first: this runs at every release.
        if !self.rare.as_ref().is_some_and(|r| r.for_write)
            || !self.shared.clusters().contains_key(self.login.database())
        {
            return;
        }
        let on = self
            .shared
            .config()
            .cluster_settings(self.login.database(), self.login.user())
            .is_some_and(|s| s.routing.read_your_writes == crate::config::ReadYourWrites::Lsn);
        if !on {
            return;
        }
        let timeout = login::internal_timeout(&self.shared);
        if let Ok(r) =
            Box::pin(server.run_internal("SELECT pg_current_wal_insert_lsn()", timeout)).await
        {
            let lsn = r
                .rows
                .first()
                .and_then(|row| row.first().cloned().flatten())
                .and_then(|t| crate::cluster::Lsn::parse(&t));
            if let Some(lsn) = lsn {
                let rare = self.rare();
                rare.written_lsn = Some(rare.written_lsn.map_or(lsn.0, |w| w.max(lsn.0)));
            }
        }
    }

    /// The checkout that waits (for a server to come back, or to be opened), ended by
    /// shutdown or KILL; a replica that cannot be reached gives way to the primary.
    async fn checkout(
        &mut self,
        wait: Duration,
        outcome: &mut Option<Outcome>,
    ) -> Result<Result<Box<ServerConn>, crate::pool::CheckoutError>, End> {
        let mut signal = self.signal.clone();
        let entry = &self.login.entry;
        let mut r = tokio::select! {
            r = self.pool.checkout(wait) => r,
            _ = signal.reached(Phase::Now) => {
                return Err(self.tell(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down").await);
            }
            _ = entry.killed() => return Err(self.killed().await),
        };
        if self.on_replica && matches!(r, Err(crate::pool::CheckoutError::Connect { .. })) {
            // The replica went away before the monitor noticed: this read runs on the
            // primary rather than failing the client.
            tracing::warn!(
                server = %self.pool.target().address(),
                "replica unreachable; running the transaction on the primary"
            );
            self.pool = self.login.pool_for_primary(&self.shared);
            self.on_replica = false;
            self.replica_tx = false;
            if *outcome == Some(Outcome::Replica) {
                *outcome = Some(Outcome::Fallback);
            }
            r = tokio::select! {
                r = self.pool.checkout(wait) => r,
                _ = signal.reached(Phase::Now) => {
                    return Err(self.tell(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down").await);
                }
            };
        }
        Ok(r)
    }

    /// Checks out a server for the transaction the client has started, and brings the
    /// server's settings in line with the client's: as far as it can without waiting.
    /// The usual attach (an idle server whose settings match) ends here; the rest
    /// ([`Self::attach_rest`]) is boxed by the caller, so that the session's future does
    /// not carry the attach's state while the client is idle.
    fn attach_now(&mut self) -> Attaching {
        self.set_state(ClientState::Waiting);
        let waiting_since = Instant::now();
        let Choice {
            pool,
            replica: on_replica,
            replica_tx,
            write,
            outcome,
        } = match self.choose_pool() {
            Ok(p) => p,
            Err(msg) => {
                return Attaching::Refuse(
                    sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION.into(),
                    msg,
                );
            }
        };
        self.pool = pool;
        self.on_replica = on_replica;
        self.replica_tx = replica_tx;
        let retry = on_replica && !replica_tx;
        if write || retry || self.rare.is_some() {
            // Routed databases only: a plain pool's transactions leave `rare` unmade.
            let mark = self.s2c.len();
            let rare = self.rare();
            rare.for_write = write;
            rare.force_primary = false;
            rare.retry_to_primary = false;
            rare.retry = retry.then(BytesMut::new);
            rare.retry_mark = mark;
        }
        let wait_primary = !on_replica && self.primary_unknown();
        if !wait_primary {
            if let Some(conn) = self.pool.try_checkout() {
                return self.checked_out(Ok(conn), outcome, waiting_since);
            }
        }
        Attaching::Wait {
            wait_primary,
            outcome,
            waiting_since,
        }
    }

    /// What [`Self::attach_now`] left: waiting for a primary or a server, applying
    /// settings, or telling the client why it gets no server.
    async fn attach_rest(&mut self, mut next: Attaching) -> Result<(), End> {
        loop {
            next = match next {
                Attaching::Done => return Ok(()),
                Attaching::Refuse(code, msg) => return Err(self.tell(&code, &msg).await),
                Attaching::Wait {
                    wait_primary,
                    mut outcome,
                    waiting_since,
                } => {
                    if wait_primary {
                        self.wait_for_primary().await;
                    }
                    let wait = self.shared.config().pgtide.query_wait_timeout.0;
                    let r = match self.pool.try_checkout() {
                        Some(conn) => Ok(conn),
                        // Waiting for a server, or opening one.
                        None => self.checkout(wait, &mut outcome).await?,
                    };
                    self.checked_out(r, outcome, waiting_since)
                }
                Attaching::Sync(mut server, sql) => {
                    let timeout = login::internal_timeout(&self.shared);
                    match Box::pin(server.run_internal(&sql, timeout)).await {
                        Ok(r) => match r.error {
                            None => {
                                self.login.params.synced_to(&mut server.params);
                                self.attached(server);
                                Attaching::Done
                            }
                            Some((code, message)) => {
                                self.pool.checkin(server);
                                let msg = format!(
                                    "invalid run-time parameter for this session: {message}"
                                );
                                Attaching::Refuse(code.into(), msg)
                            }
                        },
                        Err(e) => {
                            self.pool.discard(server);
                            let msg = format!(
                                "server connection failed while applying session settings: {e}"
                            );
                            Attaching::Refuse(sqlstate::CONNECTION_FAILURE.into(), msg)
                        }
                    }
                }
            }
        }
    }

    /// The checkout's result: counted, linked for SHOW CLIENTS / SERVERS, and attached
    /// unless the server's settings must be brought in line first.
    fn checked_out(
        &mut self,
        r: Result<Box<ServerConn>, crate::pool::CheckoutError>,
        outcome: Option<Outcome>,
        waiting_since: Instant,
    ) -> Attaching {
        if let Some(o) = outcome.filter(|_| self.login.pool.metrics.collect) {
            let m = &self.login.pool.metrics.routing;
            match o {
                Outcome::Primary => &m.primary,
                Outcome::Replica => &m.replica,
                Outcome::Fallback => &m.fallback,
                Outcome::Hint => &m.hint,
                Outcome::RetriedPrimary => &m.retried_primary,
            }
            .inc();
        }
        let mut server = match r {
            Ok(s) => {
                if self.login.pool.metrics.collect {
                    self.login
                        .pool
                        .metrics
                        .wait_seconds
                        .observe(waiting_since.elapsed().as_secs_f64());
                }
                self.set_state(ClientState::Active);
                if let Some(e) = &s.entry {
                    // For SHOW SERVERS / SHOW CLIENTS; the pool clears it at checkin.
                    e.link
                        .store(self.login.entry.id, std::sync::atomic::Ordering::Relaxed);
                    self.login.entry.link.store(
                        s.entry.as_ref().map_or(0, |e| e.id),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                s
            }
            Err(e @ crate::pool::CheckoutError::Exhausted { .. }) => {
                return Attaching::Refuse(sqlstate::TOO_MANY_CONNECTIONS.into(), e.to_string());
            }
            Err(e) => {
                let msg = format!(
                    "pgtide could not connect to the server {}: {e}",
                    self.pool.target().address()
                );
                return Attaching::Refuse(sqlstate::CONNECTION_FAILURE.into(), msg);
            }
        };
        // The same settings as the last client that found this server matching: nothing
        // to compare (the fingerprint is renewed whenever the client's settings change,
        // `params_match` cleared whenever the server's do).
        let fingerprint = self.login.params.fingerprint();
        let sync = match server.params_match {
            Some(f) if f == fingerprint => None,
            _ => self.login.params.sync_sql(&server.params),
        };
        match sync {
            None => {
                server.params_match = Some(fingerprint);
                self.attached(server);
                Attaching::Done
            }
            Some(sql) => {
                server.params_match = None;
                Attaching::Sync(server, sql)
            }
        }
    }

    /// The server is the client's for this transaction.
    fn attached(&mut self, server: Box<ServerConn>) {
        self.login.cancel.attach(server.cancel.clone());
        self.tx_status = status::IDLE;
        self.server = Some(server);
    }

    /// Gives the idle server back to the pool, after reading back settings the
    /// transaction may have changed.
    async fn release(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.set_state(ClientState::Idle);
        self.flush_metrics();
        if let Some(rare) = self.rare.as_mut() {
            rare.retry = None;
        }
        self.login.cancel.detach().await;
        if let Some(p) = self.prepared.as_mut().filter(|p| !p.pipeline.is_empty()) {
            // Every answer came back, yet the bookkeeping says otherwise: do not trust
            // this connection's statement set.
            tracing::warn!(pipeline = ?p.pipeline, "answers left unmatched at release; closing the server connection");
            p.pipeline = Pipeline::default();
            self.pool.discard(server);
            return;
        }
        if std::mem::take(&mut self.settings_changed) && !self.refresh_settings(&mut server).await {
            self.pool.discard(server);
            return;
        }
        self.note_written_lsn(&mut server).await;
        if std::mem::take(&mut self.dealloc_pending) && !self.deallocate_all(&mut server).await {
            self.pool.discard(server);
            return;
        }
        // Any bytes left in the scanner state belong to no message: start clean.
        self.s_scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        self.pool.checkin(server);
    }

    /// Puts the server's prepared statements in a known state: none.
    async fn deallocate_all(&mut self, server: &mut ServerConn) -> bool {
        let timeout = login::internal_timeout(&self.shared);
        match Box::pin(server.run_internal("DEALLOCATE ALL", timeout)).await {
            Ok(r) if r.error.is_none() => {
                server.statements.clear();
                true
            }
            _ => false,
        }
    }

    /// Reads back unreported settings after a statement that may have changed them.
    async fn refresh_settings(&mut self, server: &mut ServerConn) -> bool {
        let Some((sql, names)) = self.login.params.refresh_sql(&server.params) else {
            return true;
        };
        match Box::pin(server.run_internal(&sql, login::internal_timeout(&self.shared))).await {
            Ok(r) if r.error.is_none() && r.rows.len() == 1 => {
                self.login
                    .params
                    .refreshed(&names, &r.rows[0], &mut server.params);
                server.params_match = None;
                true
            }
            Ok(r) => {
                tracing::warn!(error = ?r.error, "could not read back session settings; closing the server connection");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read back session settings; closing the server connection");
                false
            }
        }
    }

    /// Sends the client a FATAL and ends the session. Boxed, like every rare await of
    /// the session: a future's size is that of its largest state, and the session's is
    /// held for as long as the client is connected, idle or not.
    fn tell<'a>(&'a mut self, code: &'a str, message: &'a str) -> BoxFuture<'a, End> {
        Box::pin(self.tell_now(code, message))
    }

    async fn tell_now(&mut self, code: &str, message: &str) -> End {
        // What the server already said goes first.
        let mut ready = self.s_ready;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if ready > 0 {
                let _ = self.client.send(&self.s2c[..ready]).await;
                self.s2c.advance(ready);
                ready = 0;
            }
        })
        .await;
        self.s_ready = ready;
        let mut b = BytesMut::with_capacity(128 + message.len());
        backend::error_response(&mut b, Severity::Fatal, code, message, None, None);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.send(&b)).await;
        self.login.pool.metrics.error(code);
        End::Told(message.to_string())
    }

    fn protocol_error(&mut self, e: ScanError) -> End {
        End::ClientError(format!("protocol violation: {e}"))
    }

    /// The server connection broke while the client was using it.
    fn server_lost(&mut self, why: &str) -> ServerLost {
        if let Some(server) = self.server.take() {
            self.pool.discard(server);
        }
        self.pending = 0;
        self.unsynced = false;
        self.copy_in = false;
        if let Some(p) = self.prepared.as_mut() {
            p.pipeline = Pipeline::default();
        }
        self.c_ready = 0;
        self.c2s.clear();
        self.c_scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        ServerLost(format!(
            "server connection lost ({}): {why}; the transaction's outcome is unknown, reconnect and check",
            self.pool.target().address()
        ))
    }

    /// Ends the session: the server goes back clean or is closed.
    async fn finish(&mut self, end: &End) {
        if let End::ClientError(msg) = end {
            if msg.starts_with("protocol violation") {
                let mut b = BytesMut::new();
                backend::error_response(
                    &mut b,
                    Severity::Fatal,
                    sqlstate::PROTOCOL_VIOLATION,
                    msg,
                    None,
                    None,
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), self.client.send(&b)).await;
            }
        }
        // A plain client that left has nothing more to read or be told: dropping the
        // socket sends the FIN (a shutdown first would be one more syscall per
        // connection). TLS sends its close_notify; an error ends with everything sent.
        if !matches!(end, End::ClientLeft) || self.client.is_tls() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncWriteExt::shutdown(&mut self.client),
            )
            .await;
        }
        let Some(server) = self.server.take() else {
            return;
        };
        self.login.cancel.detach().await;
        let pool = self.pool.clone();
        let resetting = pool.resetting();
        if let Some(server) = self.recover(server).await {
            self.pool.checkin(server);
        }
        drop(resetting);
    }

    /// Brings a server whose client is gone back to idle: ends a COPY, syncs an open
    /// extended batch, cancels a running query, rolls back a transaction, and in session
    /// mode runs `server_reset_query`. `None` when that fails (the connection is closed).
    async fn recover(&mut self, mut server: Box<ServerConn>) -> Option<Box<ServerConn>> {
        let timeout = login::internal_timeout(&self.shared);
        let pool = self.pool.clone();
        let give_up = |server: Box<ServerConn>| {
            pool.discard(server);
            None
        };
        if self.c_scan.mid_message()
            || self.c_ready > 0
            || self.rare.as_ref().is_some_and(|r| r.server_fatal.is_some())
        {
            // Part of a message went out, or unsent client bytes: the server's state
            // cannot be completed safely.
            return give_up(server);
        }
        let mut out = BytesMut::new();
        if self.copy_in {
            out.extend_from_slice(&[tag::COPY_FAIL, 0, 0, 0, 4 + 19]);
            out.extend_from_slice(b"client disconnected");
            out.extend_from_slice(&[0]);
            let len = (out.len() - 1) as u32;
            out[1..5].copy_from_slice(&len.to_be_bytes());
        }
        if self.unsynced || self.copy_in {
            // After CopyFail an extended-protocol COPY skips to the next Sync; a simple
            // one answers the Sync with one more ReadyForQuery. Either way one is owed.
            out.extend_from_slice(&[tag::SYNC, 0, 0, 0, 4]);
            self.pending += 1;
        }
        if !out.is_empty()
            && tokio::time::timeout(timeout, server.stream.send(&out))
                .await
                .is_err()
        {
            return give_up(server);
        }
        if self.pending > 0 {
            if !self.copy_in {
                // A query may be running for a client that left: cancel it. A backend
                // that is idle when the signal arrives ignores it.
                let _ = crate::server::send_cancel(server.cancel.clone(), timeout).await;
            }
            if !self.drain(&mut server, timeout).await {
                return give_up(server);
            }
        }
        if self.tx_status != status::IDLE {
            match server.run_internal("ROLLBACK", timeout).await {
                Ok(r) if r.error.is_none() => {}
                _ => return give_up(server),
            }
        }
        if self.login.mode == PoolMode::Session {
            let reset = self.shared.config().pgtide.server_reset_query.clone();
            if !reset.trim().is_empty() {
                match server.run_internal(&reset, timeout).await {
                    Ok(r) if r.error.is_none() => {
                        // DISCARD ALL / RESET ALL put every setting back to its default.
                        let login = pool.login_params().unwrap_or_default();
                        server.params = login
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect();
                        server.params_match = None;
                    }
                    _ => return give_up(server),
                }
            }
        } else {
            if std::mem::take(&mut self.settings_changed)
                && !self.refresh_settings(&mut server).await
            {
                return give_up(server);
            }
            // Parses whose answers were drained unread may or may not have prepared
            // their statements: start the server's set afresh.
            let unsure = self
                .prepared
                .as_ref()
                .is_some_and(|p| !p.pipeline.is_empty())
                || server.statements.has_unconfirmed();
            if let Some(p) = self.prepared.as_mut() {
                p.pipeline = Pipeline::default();
            }
            if (std::mem::take(&mut self.dealloc_pending) || unsure)
                && !self.deallocate_all(&mut server).await
            {
                return give_up(server);
            }
        }
        Some(server)
    }

    /// Reads and drops server output until every ReadyForQuery owed has arrived.
    async fn drain(&mut self, server: &mut ServerConn, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        // Start from what the server sent that was not framed yet.
        let mut buf = self.s2c.split_off(self.s_ready);
        let mut scan = self.s_scan.clone();
        loop {
            let mut pos = scan.resume(&buf);
            loop {
                match scan.next(&buf, &mut pos, server_whole) {
                    Ok(Some(f)) => {
                        if let (tag::READY_FOR_QUERY, Some(body)) = (f.tag, f.body) {
                            self.pending = self.pending.saturating_sub(1);
                            self.tx_status = body.first().copied().unwrap_or(status::IDLE);
                        }
                        if let (tag::ERROR_RESPONSE, Some(body)) = (f.tag, f.body) {
                            if backend::parse_error_fields(body).is_fatal() {
                                return false;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return false,
                }
            }
            buf.advance(pos);
            if self.pending == 0 {
                return buf.is_empty();
            }
            buf.reserve(READ_CHUNK);
            let read = tokio::time::timeout_at(deadline, async {
                use tokio::io::AsyncReadExt;
                server.stream.read_buf(&mut buf).await
            });
            match read.await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return false,
            }
        }
    }
}

/// The message for a client whose server connection broke; sending it ends the session.
struct ServerLost(String);

impl ServerLost {
    async fn await_told(self, session: &mut Session) -> End {
        session.tell(sqlstate::CONNECTION_FAILURE, &self.0).await
    }
}

impl From<ServerLost> for End {
    fn from(s: ServerLost) -> End {
        End::Told(s.0)
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
        let serve = ret2::<Session, super::super::ClientSlot, _>(serve);
        let run = ret1::<&'static mut Session, _>(Session::run);
        let step = ret1::<&'static mut Session, _>(Session::step);
        let wait = ret2::<&'static mut Session, Phase, _>(Session::wait);
        let attach_rest = ret2::<&'static mut Session, Attaching, _>(Session::attach_rest);
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
