//! The session-state guard (transaction mode): a statement that creates state living
//! past its transaction on the server connection ([`crate::router::session_state`])
//! either pins the client to that connection until the state is gone (checked with
//! [`LEFT_QUERY`] after a transaction that may have ended it) or the client leaves
//! (`session_state = "pin"`; the connection is then reset with `DISCARD ALL` before
//! anyone else gets it) or is
//! replaced, before it reaches the server, by one that fails with SQLSTATE 0A000
//! (`"reject"`), so that the client's transaction state stays the server's own.

use bytes::{BufMut, BytesMut};

use super::io::splice;
use super::Session;
use crate::config::{PoolMode, SessionState};
use crate::protocol::{cstr, tag};
use crate::router::quote::quote_literal;
use crate::router::session_state::{can_end, LEFT_QUERY};

impl Session {
    /// Whether statements must be checked for session state: transaction mode.
    pub(super) fn guards_session_state(&self) -> bool {
        self.login.mode == PoolMode::Transaction
    }

    /// What pinned this client to its server, if anything did.
    pub(super) fn pinned(&self) -> Option<&'static str> {
        self.rare.as_ref().and_then(|r| r.pinned)
    }

    /// After a pinned client's transaction that may have ended its session state: asks
    /// the server whether any is left, and unpins the client when none is (its next
    /// transaction may get any server; its settings follow it as usual).
    pub(super) async fn try_unpin(&mut self) {
        let Some(rare) = self.rare.as_mut() else {
            return;
        };
        rare.unpin_check = false;
        if rare.pinned.is_none() || rare.pinned_for_good {
            return;
        }
        let timeout = self.shared.internal_timeout();
        let Some(server) = self.server.as_mut() else {
            return;
        };
        match server.run_internal(LEFT_QUERY, timeout).await {
            Ok(r) if r.error.is_none() => {
                let left = r
                    .rows
                    .first()
                    .and_then(|row| row.first().cloned().flatten());
                if left.as_deref() == Some("0") {
                    let (user, database) = (self.login.user(), self.login.database());
                    tracing::info!(%user, %database, "client unpinned: its session state is gone");
                    self.login.entry.set_pinned(None);
                    self.login.pools.metrics.clients_pinned.dec();
                    self.rare().pinned = None;
                }
            }
            Ok(r) => {
                // The check itself failed (the server is idle, so this is odd): stay
                // pinned; the reset at the end covers it.
                tracing::warn!(error = ?r.error, "could not check a pinned client's session state");
            }
            Err(e) => {
                self.rare().server_fatal = Some(super::ServerEnd::Broken(format!(
                    "checking the session state failed: {e}"
                )));
            }
        }
    }

    /// The message at `c2s[start..*end]` (a Query or a Parse) creates `what`.
    pub(super) fn on_session_state(
        &mut self,
        t: u8,
        what: &'static str,
        start: usize,
        end: &mut usize,
    ) {
        match self.login.session_state {
            SessionState::Pin => {
                if !can_end(what) {
                    self.rare().pinned_for_good = true;
                }
                if self.pinned().is_some() {
                    return;
                }
                let (user, database) = (self.login.user(), self.login.database());
                tracing::info!(%user, %database, reason = what, "client pinned to its server connection (session_state = \"pin\")");
                self.login.entry.set_pinned(Some(what));
                self.login.pools.metrics.clients_pinned.inc();
                self.rare().pinned = Some(what);
            }
            SessionState::Reject => {
                let (user, database) = (self.login.user(), self.login.database());
                tracing::info!(%user, %database, feature = what, "statement refused (session_state = \"reject\")");
                let message = format!(
                    "{what} is not supported in transaction pooling mode: it would outlive the transaction on a shared server connection (session_state = \"reject\")"
                );
                let hint = "use a transaction-scoped form (ON COMMIT DROP, pg_advisory_xact_lock, a cursor without HOLD), or connect to a pool with pool_mode = \"session\" or session_state = \"pin\"";
                let sql = format!(
                    "DO $pgtide_reject$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE = {}, HINT = {}; END$pgtide_reject$",
                    quote_literal(&message),
                    quote_literal(hint)
                );
                let body = &self.c2s[start + 5..*end];
                let mut out = BytesMut::with_capacity(sql.len() + 64);
                out.put_u8(t);
                out.put_u32(0);
                if t == tag::PARSE {
                    // Keep the statement name and the parameter types: the client's Bind
                    // still fits, and its Execute gets the error.
                    let Some((name, rest)) = cstr(body) else {
                        return;
                    };
                    let Some((_, types)) = cstr(rest) else {
                        return;
                    };
                    out.put_slice(name);
                    out.put_u8(0);
                    out.put_slice(sql.as_bytes());
                    out.put_u8(0);
                    out.put_slice(types);
                } else {
                    out.put_slice(sql.as_bytes());
                    out.put_u8(0);
                }
                let len = (out.len() - 1) as u32;
                out[1..5].copy_from_slice(&len.to_be_bytes());
                splice(&mut self.c2s, start..*end, &out);
                *end = start + out.len();
            }
        }
    }
}
