//! The session's I/O: non-blocking reads and writes of both sockets, the buffers (and
//! the spare list idle sessions give theirs back to), the one wait of a turn, and telling
//! the client a FATAL.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};

use super::{BoxFuture, End, Event, Session, HIGH_WATER, READ_CHUNK};
use crate::error::Error;
use crate::protocol::status;
use crate::shutdown::Phase;
use crate::stream::Stream;

/// Replaces `buf[range]` with `with`.
pub(super) fn splice(buf: &mut BytesMut, range: std::ops::Range<usize>, with: &[u8]) {
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
pub(super) fn read_some(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
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

pub(super) fn take_spare() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK))
}

/// Keeps an emptied buffer for reuse (or frees it: too small, or enough are kept).
pub(super) fn put_spare(mut buf: BytesMut) {
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
pub(super) fn write_some(
    stream: &mut Stream,
    buf: &mut BytesMut,
    ready: &mut usize,
) -> io::Result<()> {
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

/// How long a server has to answer query_timeout's cancel before it is disconnected.
const QUERY_CANCEL_GRACE: Duration = Duration::from_secs(2);

impl Session {
    /// Waits for the next thing to do; `phase` is the shutdown phase the caller acted on.
    pub(super) async fn wait(&mut self, phase: Phase) -> Event {
        let timer = {
            // Read once per wait, not held across it (a reload may swap the config).
            let config = self.shared.config();
            let g = &config.pgtide;
            let now = tokio::time::Instant::now;
            if self.pending == 0 {
                self.query_since = None;
                self.query_cancelled = false;
            }
            let busy =
                self.server.is_some() && (self.pending > 0 || self.tx_status != status::IDLE);
            // Looked up only while a server is busy for the client (not per idle wait).
            let tx_deadline = match busy {
                true => config
                    .transaction_timeout(self.login.database(), self.login.user())
                    .map(|d| *self.tx_since.get_or_insert_with(now) + d),
                false => None,
            };
            if tx_deadline.is_none() {
                self.tx_since = None;
            }
            let other = match &self.server {
                None => g.client_idle_timeout.enabled().map(|d| now() + d),
                Some(_)
                    if self.pending == 0 && self.tx_status != status::IDLE && self.c_ready == 0 =>
                {
                    g.idle_transaction_timeout.enabled().map(|d| now() + d)
                }
                // A request the server owes: query_timeout counts from its first wait,
                // and once cancelled the server has QUERY_CANCEL_GRACE more to answer.
                Some(_) if self.pending > 0 => config
                    .query_timeout(self.login.database(), self.login.user())
                    .map(|d| {
                        let since = *self.query_since.get_or_insert_with(now);
                        let grace = if self.query_cancelled {
                            QUERY_CANCEL_GRACE
                        } else {
                            Duration::ZERO
                        };
                        since + d + grace
                    }),
                Some(_) => None,
            };
            let soonest = match (other, tx_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Draining: the end of a fresh client's grace wakes the session to tell it.
            match (
                soonest,
                self.drain_grace.filter(|_| phase == Phase::Draining),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
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
            Some(deadline) => {
                // One timer per session, made the first time one is needed and reset
                // for every wait after that.
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

    /// Whether the current transaction has outlived transaction_timeout.
    pub(super) fn transaction_timed_out(&self) -> bool {
        let Some(since) = self.tx_since else {
            return false;
        };
        self.shared
            .config()
            .transaction_timeout(self.login.database(), self.login.user())
            .is_some_and(|d| tokio::time::Instant::now() >= since + d)
    }

    /// query_timeout passed for the request the server owes: the first time, the query
    /// is cancelled on the server (which answers 57014 itself); if the server has not
    /// answered QUERY_CANCEL_GRACE later, it is disconnected and the client told 57014 —
    /// as an ERROR outside a transaction (it stays connected), as a FATAL inside one
    /// (the transaction is gone).
    pub(super) async fn query_timed_out(&mut self) -> Result<(), End> {
        let Some(server) = self.server.as_ref() else {
            return Ok(());
        };
        let limit = self
            .shared
            .config()
            .query_timeout(self.login.database(), self.login.user())
            .unwrap_or_default();
        if !self.query_cancelled {
            self.query_cancelled = true;
            tracing::info!(user = %self.login.user(), database = %self.login.database(), server = %server.pool().target().address(), "query_timeout: cancelling the query");
            let _ = crate::server::send_cancel(server.cancel.clone(), QUERY_CANCEL_GRACE).await;
            return Ok(());
        }
        let address = server.pool().target().address();
        tracing::warn!(user = %self.login.user(), database = %self.login.database(), server = %address, "query_timeout: the server did not answer the cancel; disconnecting it");
        let message = format!(
            "canceling statement due to query_timeout ({}): the server {address} did not answer and was disconnected; the statement's outcome is unknown",
            humantime::format_duration(limit)
        );
        let in_transaction = self.tx_status != status::IDLE;
        let owed = self.pending;
        let lost = self.server_lost("query_timeout");
        drop(lost);
        // What the gone server had half sent belongs to no message.
        self.s2c.truncate(self.s_ready);
        self.s_scan = crate::protocol::Scanner::new(self.shared.config().pgtide.max_message_size);
        self.query_since = None;
        self.query_cancelled = false;
        let e = Error::server(crate::protocol::sqlstate::QUERY_CANCELED, message);
        if in_transaction {
            return Err(self.tell(e).await);
        }
        if let Some(r) = self.rare.as_mut() {
            // The server is gone: nothing to retry, no answer to hold back.
            r.retry = None;
        }
        // As PostgreSQL answers a failed request: the error, then the ReadyForQuery of
        // every request it owed.
        let mut out = BytesMut::new();
        crate::protocol::backend::error(&mut out, &e.code, &e.message);
        for _ in 0..owed.max(1) {
            crate::protocol::backend::ready_for_query(&mut out, status::IDLE);
        }
        let at = self.s_ready;
        splice(&mut self.s2c, at..at, &out);
        self.s_ready += out.len();
        self.set_state(crate::registry::ClientState::Idle);
        Ok(())
    }

    /// Sends the client a FATAL and ends the session. Boxed, like every rare await of
    /// the session: a future's size is that of its largest state, and the session's is
    /// held for as long as the client is connected, idle or not.
    pub(super) fn tell(&mut self, e: Error) -> BoxFuture<'_, End> {
        Box::pin(self.tell_now(e))
    }

    async fn tell_now(&mut self, e: Error) -> End {
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
        let fatal =
            crate::stream::send_fatal(&mut self.client, &e.code, &e.message, e.hint.as_deref());
        let _ = tokio::time::timeout(Duration::from_secs(1), fatal).await;
        self.login.pools.metrics.error(&e.code);
        End::Told(Box::new(e))
    }
}
