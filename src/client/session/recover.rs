//! The end of a session and of a server connection's use: a client's protocol
//! violation, a server lost mid-transaction, and bringing a server whose client left
//! back to idle (or closing it) before anyone else may have it.

use std::time::Duration;

use bytes::{Buf, BytesMut};

use super::scan::server_whole;
use super::{End, ServerEnd, Session, READ_CHUNK};
use crate::config::PoolMode;
use crate::error::Error;
use crate::pool::Checkout;
use crate::prepared::Pipeline;
use crate::protocol::{backend, sqlstate, status, tag, ScanError, Scanner};
use crate::server::ServerConn;

impl Session {
    /// The client broke the framing of the protocol.
    pub(super) fn protocol_error(&mut self, e: ScanError) -> End {
        End::Client(Box::new(Error::client(
            sqlstate::PROTOCOL_VIOLATION,
            format!("protocol violation: {e}"),
        )))
    }

    /// The client sent a message type the protocol does not have (PostgreSQL would end
    /// the session with the same error): nothing of it reaches the server.
    pub(super) fn invalid_message_type(&mut self, t: u8) -> End {
        End::Client(Box::new(Error::client(
            sqlstate::PROTOCOL_VIOLATION,
            format!("protocol violation: invalid frontend message type {t}"),
        )))
    }

    /// The server ended the connection under the client: with its own FATAL, which the
    /// client gets with the server's SQLSTATE and message (drivers map the code to an
    /// exception: 25P03 idle-in-transaction timeout, 57P01 terminated by an
    /// administrator, ...), or by breaking the protocol (08006, as a lost connection).
    pub(super) fn server_ended(&mut self, end: ServerEnd) -> ServerLost {
        match end {
            ServerEnd::Broken(why) => self.server_lost(&why),
            ServerEnd::Fatal { code, message } => {
                let address = self.drop_server();
                ServerLost(Error::server(code, message).with_hint(format!(
                    "the server ({address}) ended this connection; pgtide passes its error on"
                )))
            }
        }
    }

    /// The server connection broke while the client was using it.
    pub(super) fn server_lost(&mut self, why: &str) -> ServerLost {
        let address = self.drop_server();
        ServerLost(Error::server(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "server connection lost ({address}): {why}; the transaction's outcome is unknown, reconnect and check"
            ),
        ))
    }

    /// Closes the server the client was using and forgets what it owed; returns its
    /// address.
    fn drop_server(&mut self) -> String {
        let address = self
            .server
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |s| s.pool().target().address());
        if let Some(server) = self.server.take() {
            server.discard();
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
        address
    }

    /// Ends the session: the server goes back clean or is closed.
    pub(super) async fn finish(&mut self, end: &End) {
        if let End::Client(e) = end {
            if e.code == sqlstate::PROTOCOL_VIOLATION {
                let (user, database) = (self.login.user(), self.login.database());
                tracing::warn!(%user, %database, error = %e.message, has_server = self.server.is_some(), "client broke the protocol: its session ends");
                let fatal = crate::stream::send_fatal(&mut self.client, &e.code, &e.message, None);
                let _ = tokio::time::timeout(Duration::from_secs(1), fatal).await;
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
        let pool = server.pool().clone();
        let resetting = pool.resetting();
        if let Some(server) = self.recover(server).await {
            server.checkin();
        }
        drop(resetting);
    }

    /// Brings a server whose client is gone back to idle: ends a COPY, cancels a running
    /// query, rolls back a transaction, and in session mode runs `server_reset_query`
    /// (`DISCARD ALL` for a pinned transaction-mode client). An extended batch the client
    /// never synced closes the connection instead (a Sync would commit it). `None` when
    /// the server is not reusable (the connection is closed).
    async fn recover(&mut self, mut server: Checkout) -> Option<Checkout> {
        let timeout = self.shared.internal_timeout();
        let give_up = |server: Checkout| {
            server.discard();
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
        if self.unsynced && !self.copy_in {
            // Extended-protocol messages without their Sync: a Sync now would commit
            // the implicit transaction they run in, which the client never asked for.
            // PostgreSQL itself sees the client's socket close and rolls back: so does
            // closing this connection.
            tracing::debug!("client left inside an unsynced batch: closing its server connection");
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
        let pinned = self.pinned().is_some();
        if self.login.mode == PoolMode::Session || pinned {
            // A pinned client's session state (temp tables, advisory locks, LISTEN,
            // cursors, prepared statements, settings) goes, whatever is configured.
            let reset = if pinned {
                "DISCARD ALL".to_string()
            } else {
                self.shared.config().pgtide.server_reset_query.clone()
            };
            if !reset.trim().is_empty() {
                match server.run_internal(&reset, timeout).await {
                    Ok(r) if r.error.is_none() => {
                        // DISCARD ALL / RESET ALL put every setting back to its default.
                        let login = server.pool().login_params().unwrap_or_default();
                        server.params = login
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect();
                        server.params_match = None;
                        if pinned {
                            // DISCARD ALL deallocated them.
                            server.statements.clear();
                        }
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

/// The error for a client whose server connection broke; telling it ends the session.
pub(super) struct ServerLost(Error);

impl ServerLost {
    pub(super) async fn await_told(self, session: &mut Session) -> End {
        session.tell(self.0).await
    }
}
