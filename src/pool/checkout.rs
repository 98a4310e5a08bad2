//! The [`Checkout`] guard: the only way to hold a server connection outside its pool.
//!
//! Whoever holds one says how it goes back: [`Checkout::checkin`] when the connection is
//! idle and clean (ReadyForQuery `I`, nothing owed, nothing half sent), or
//! [`Checkout::discard`] when it must not be reused. A guard dropped without either (an
//! early return, a panic, a task cancelled mid-transaction) closes the connection: its
//! state is unknown, so it is never handed to another client, and the pool's slot is
//! given back (or used to open a connection for a waiting client) all the same.

use std::sync::Arc;

use super::{InState, Pool};
use crate::server::ServerConn;

/// A server connection checked out of its pool.
pub struct Checkout {
    /// `Some` until `checkin` or `discard` (or the drop) takes it.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
}

impl Checkout {
    pub(super) fn new(conn: Box<ServerConn>, pool: Arc<Pool>) -> Checkout {
        Checkout {
            conn: Some(conn),
            pool,
        }
    }

    /// The pool the connection belongs to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The connection is idle and clean: back to the pool (or to the first waiter).
    pub fn checkin(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }

    /// The connection must not be reused: it is closed and its slot given back.
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.discard(conn);
        }
    }

    /// Counts the connection in the `used` server state (being brought back to idle
    /// after its client left) until the returned guard drops.
    pub fn resetting(&self) -> InState<'_> {
        self.pool.resetting()
    }
}

impl std::ops::Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        // `conn` is taken only by the methods that consume the guard.
        self.conn
            .as_deref()
            .expect("a checkout holds its connection")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_deref_mut()
            .expect("a checkout holds its connection")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::warn!(
                server = %self.pool.target().address(),
                "a server connection was let go in an unknown state; closing it"
            );
            self.pool.discard(conn);
        }
    }
}
