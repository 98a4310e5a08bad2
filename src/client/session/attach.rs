//! Checkout and release: choosing the pool (through [`super::route`]), taking a server
//! from it — without a future when one is idle ([`Session::attach_now`]), boxed when the
//! client must wait ([`Session::attach_rest`]) —, bringing the server's settings in line
//! with the client's, and giving it back at the end of the transaction with what the
//! transaction may have changed read back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::route::Choice;
use super::{End, Session};
use crate::error::Error;
use crate::pool::{Checkout, CheckoutError, Pool};
use crate::prepared::Pipeline;
use crate::protocol::{sqlstate, status, tag, Scanner};
use crate::registry::ClientState;
use crate::router::route::Outcome;
use crate::server::ServerConn;
use crate::shutdown::Phase;

/// What is left of an attach after its synchronous part ([`Session::attach_now`]).
pub(super) enum Attaching {
    /// The server is attached.
    Done,
    /// No server for this client: what it is told (a FATAL).
    Refuse(Error),
    /// No server could be opened for this batch: it fails with an ERROR and the client
    /// stays (when the batch can be answered whole; otherwise as `Refuse`).
    Fail(Error),
    /// Wait for the monitor to find a primary (if `wait_primary`), then for a server of
    /// `pool`.
    Wait {
        pool: Arc<Pool>,
        wait_primary: bool,
        outcome: Option<Outcome>,
        waiting_since: Instant,
    },
    /// A server was checked out; these statements bring its settings in line first.
    Sync(Checkout, String),
}

impl Session {
    /// The checkout that waits (for a server to come back, or to be opened), ended by
    /// shutdown or KILL; a replica that cannot be reached gives way to the primary.
    async fn checkout(
        &mut self,
        mut pool: Arc<Pool>,
        wait: Duration,
        outcome: &mut Option<Outcome>,
    ) -> Result<Result<Checkout, (Arc<Pool>, CheckoutError)>, End> {
        let started = tokio::time::Instant::now();
        let mut signal = self.signal.clone();
        let entry = self.login.entry.shared();
        let mut r = tokio::select! {
            r = pool.checkout(wait) => r,
            _ = signal.reached(Phase::Now) => {
                return Err(self.tell(Error::pooler(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down")).await);
            }
            _ = entry.killed() => return Err(self.killed().await),
        };
        if let Err(CheckoutError::Connect { error, .. }) = &r {
            if error.is_transient() {
                // Nothing was sent and the host did not answer: it is marked down on the
                // spot, so that routing moves off it now rather than at the monitor's
                // next checks (a refused login is not the host's fault: not marked).
                self.report_unreachable(&pool, &error.to_string());
            }
        }
        if !self.on_replica && matches!(r, Err(CheckoutError::Connect { .. })) {
            // A read the primary was to run, and the primary cannot be reached: a replica
            // runs it if one is eligible (the primary is now marked down).
            if let Ok(choice) = self.choose_pool() {
                if choice.replica && !choice.write {
                    tracing::warn!(
                        server = %pool.target().address(),
                        replica = %choice.pool.target().address(),
                        "primary unreachable; running the read on a replica"
                    );
                    pool = choice.pool;
                    self.on_replica = true;
                    self.replica_tx = choice.replica_tx;
                    self.arm(false, !choice.replica_tx);
                    *outcome = Some(Outcome::Fallback);
                    r = tokio::select! {
                        r = pool.checkout(wait) => r,
                        _ = signal.reached(Phase::Now) => {
                            return Err(self.tell(Error::pooler(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down")).await);
                        }
                    };
                }
            }
        }
        if self.on_replica && matches!(r, Err(CheckoutError::Connect { .. })) {
            // The replica went away before the monitor noticed: this read runs on the
            // primary rather than failing the client.
            tracing::warn!(
                server = %pool.target().address(),
                "replica unreachable; running the transaction on the primary"
            );
            pool = self.login.primary_pool(&self.shared);
            self.on_replica = false;
            self.replica_tx = false;
            if *outcome == Some(Outcome::Replica) {
                *outcome = Some(Outcome::Fallback);
            }
            r = tokio::select! {
                r = pool.checkout(wait) => r,
                _ = signal.reached(Phase::Now) => {
                    return Err(self.tell(Error::pooler(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down")).await);
                }
            };
        }
        // The server is unreachable for now (restarting, a failover under way): keep
        // trying, with back-off, until the client has waited query_wait_timeout; a
        // PostgreSQL restart then costs the client a delay, not its connection.
        let deadline = started + wait;
        let mut backoff = Duration::from_millis(100);
        while let Err(CheckoutError::Connect { error, .. }) = &r {
            let now = tokio::time::Instant::now();
            if !error.is_transient() || now >= deadline {
                break;
            }
            if !self.on_replica {
                if self.refusal().is_some() {
                    // No primary will do (the caller says why).
                    break;
                }
                // A failover meanwhile: the new primary runs it.
                if self
                    .shared
                    .cluster(self.login.database())
                    .is_some_and(|c| c.primary().is_some())
                {
                    pool = self.login.primary_pool(&self.shared);
                }
            }
            let nap = backoff.min(deadline - now);
            backoff = (backoff * 2).min(Duration::from_secs(1));
            r = tokio::select! {
                r = async {
                    tokio::time::sleep(nap).await;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    pool.checkout(left.max(Duration::from_millis(1))).await
                } => r,
                _ = signal.reached(Phase::Now) => {
                    return Err(self.tell(Error::pooler(sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down")).await);
                }
                _ = entry.killed() => return Err(self.killed().await),
            };
        }
        Ok(r.map_err(|e| (pool, e)))
    }

    /// Checks out a server for the transaction the client has started, and brings the
    /// server's settings in line with the client's: as far as it can without waiting.
    /// The usual attach (an idle server whose settings match) ends here; the rest
    /// ([`Self::attach_rest`]) is boxed by the caller, so that the session's future does
    /// not carry the attach's state while the client is idle.
    pub(super) fn attach_now(&mut self) -> Attaching {
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
            Err(e) => return Attaching::Refuse(e),
        };
        self.on_replica = on_replica;
        self.replica_tx = replica_tx;
        self.arm(write, on_replica && !replica_tx);
        let wait_primary = !on_replica && self.primary_unknown();
        if !wait_primary {
            if let Some(conn) = pool.try_checkout() {
                return self.checked_out(Ok(conn), outcome, waiting_since);
            }
        }
        Attaching::Wait {
            pool,
            wait_primary,
            outcome,
            waiting_since,
        }
    }

    /// The routing state of the transaction starting: whether it went to the primary to
    /// write, and whether its request is kept (`retry`) for a replay on the primary if
    /// the replica refuses it as a write.
    fn arm(&mut self, write: bool, retry: bool) {
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
    }

    /// Marks the host of `pool` down in its cluster (routed databases), after a connect
    /// to it failed.
    fn report_unreachable(&self, pool: &Arc<Pool>, error: &str) {
        let Some(cluster) = self.shared.cluster(self.login.database()) else {
            return;
        };
        let set = &self.login.pools;
        if let Some((i, _)) = set.pools().find(|(_, p)| Arc::ptr_eq(p, pool)) {
            cluster.report_unreachable(crate::cluster::HostId(i), error);
        }
    }

    /// What [`Self::attach_now`] left: waiting for a primary or a server, applying
    /// settings, or telling the client why it gets no server.
    pub(super) async fn attach_rest(&mut self, mut next: Attaching) -> Result<(), End> {
        loop {
            next = match next {
                Attaching::Done => return Ok(()),
                Attaching::Refuse(e) => return Err(self.tell(e).await),
                Attaching::Fail(e) => {
                    if self.fail_batch(&e) {
                        return Ok(());
                    }
                    return Err(self.tell(e).await);
                }
                Attaching::Wait {
                    mut pool,
                    wait_primary,
                    mut outcome,
                    waiting_since,
                } => {
                    if wait_primary {
                        pool = match self.wait_for_primary().await {
                            Ok(p) => p,
                            Err(e) => {
                                next = Attaching::Fail(e);
                                continue;
                            }
                        };
                    }
                    let wait = self.shared.config().pgtide.query_wait_timeout.0;
                    let r = match pool.try_checkout() {
                        Some(conn) => Ok(conn),
                        // Waiting for a server, or opening one.
                        None => self.checkout(pool, wait, &mut outcome).await?,
                    };
                    self.checked_out(r, outcome, waiting_since)
                }
                Attaching::Sync(mut server, sql) => {
                    let timeout = self.shared.internal_timeout();
                    match Box::pin(server.run_internal(&sql, timeout)).await {
                        Ok(r) => {
                            match r.error {
                                None => {
                                    self.login.params.synced_to(&mut server.params);
                                    self.attached(server);
                                    Attaching::Done
                                }
                                Some((code, message)) => {
                                    server.checkin();
                                    Attaching::Refuse(Error::client(
                                    code,
                                    format!("invalid run-time parameter for this session: {message}"),
                                ))
                                }
                            }
                        }
                        Err(e) => {
                            server.discard();
                            Attaching::Refuse(Error::server(
                                sqlstate::CONNECTION_FAILURE,
                                format!(
                                    "server connection failed while applying session settings: {e}"
                                ),
                            ))
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
        r: Result<Checkout, (Arc<Pool>, CheckoutError)>,
        outcome: Option<Outcome>,
        waiting_since: Instant,
    ) -> Attaching {
        if let Some(o) = outcome.filter(|_| self.login.pools.metrics.collect) {
            let m = &self.login.pools.metrics.routing;
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
                if self.login.pools.metrics.collect {
                    self.login
                        .pools
                        .metrics
                        .wait_seconds
                        .observe(waiting_since.elapsed().as_secs_f64());
                }
                self.set_state(ClientState::Active);
                if let Some(e) = &s.entry {
                    // For SHOW SERVERS / SHOW CLIENTS; the pool clears it at checkin.
                    e.link
                        .store(self.login.entry.id, std::sync::atomic::Ordering::Relaxed);
                    e.last_client
                        .store(self.login.entry.id, std::sync::atomic::Ordering::Relaxed);
                    self.login.entry.link.store(
                        s.entry.as_ref().map_or(0, |e| e.id),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                s
            }
            Err((_, e @ CheckoutError::Exhausted { .. })) => {
                return Attaching::Refuse(Error::pooler(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    e.to_string(),
                ));
            }
            Err((pool, e)) => {
                if let Some(refused) = self.refusal().filter(|_| !self.on_replica) {
                    // The primary went away and the one left up is refused.
                    return Attaching::Fail(refused);
                }
                let msg = format!(
                    "pgtide could not connect to the server {}: {e}; the statement did not run",
                    pool.target().address()
                );
                // Nothing was sent: the work could run elsewhere.
                return Attaching::Fail(
                    Error::server(sqlstate::CONNECTION_FAILURE, msg).retry_safe(),
                );
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
    fn attached(&mut self, server: Checkout) {
        self.served = true;
        self.login.cancel.attach(server.cancel.clone());
        self.tx_status = status::IDLE;
        self.server = Some(server);
    }

    /// Gives the idle server back to the pool, after reading back settings the
    /// transaction may have changed.
    pub(super) async fn release(&mut self) {
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
            server.discard();
            return;
        }
        if std::mem::take(&mut self.settings_changed) && !self.refresh_settings(&mut server).await {
            server.discard();
            return;
        }
        self.note_written_lsn(&mut server).await;
        if std::mem::take(&mut self.dealloc_pending) && !self.deallocate_all(&mut server).await {
            server.discard();
            return;
        }
        // Any bytes left in the scanner state belong to no message: start clean.
        self.s_scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        server.checkin();
    }

    /// Answers the batch waiting in `c2s` with `e` as an ERROR, as PostgreSQL answers a
    /// batch that fails: for each Query an ErrorResponse and a ReadyForQuery, for each
    /// extended batch one ErrorResponse and the ReadyForQuery of its Sync. Nothing of it
    /// ran, and the client keeps its connection. `false` when the waiting bytes are not
    /// whole batches (or pgtide answered a BEGIN the client believes open): the caller
    /// then ends the session with a FATAL.
    fn fail_batch(&mut self, e: &Error) -> bool {
        if self.server.is_some() || self.deferred_begin() || self.terminated || self.copy_in {
            return false;
        }
        let mut scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        let mut pos = 0;
        // Per batch end: true for a Query, false for a Sync.
        let mut ends = Vec::new();
        let mut at_end = false;
        while let Ok(Some(f)) = scan.next(&self.c2s, &mut pos, |_| true) {
            at_end = matches!(f.tag, tag::QUERY | tag::SYNC);
            if at_end {
                ends.push(f.tag == tag::QUERY);
            }
        }
        if pos != self.c2s.len() || !at_end {
            return false;
        }
        let mut out = BytesMut::new();
        for _ in ends {
            crate::protocol::backend::error(&mut out, &e.code, &e.message);
            crate::protocol::backend::ready_for_query(&mut out, status::IDLE);
        }
        self.c2s.clear();
        self.c_ready = 0;
        self.c_scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        self.pending = 0;
        self.unsynced = false;
        self.need_attach = false;
        if let Some(p) = self.prepared.as_mut() {
            p.pipeline = Pipeline::default();
        }
        if let Some(r) = self.rare.as_mut() {
            // Nothing ran: no answer to hold back for a retry.
            r.retry = None;
        }
        let at = self.s_ready;
        super::io::splice(&mut self.s2c, at..at, &out);
        self.s_ready += out.len();
        self.set_state(ClientState::Idle);
        self.login.pools.metrics.error(&e.code);
        tracing::info!(user = %self.login.user(), database = %self.login.database(), error = %e.message, "a batch failed: no server could be reached within query_wait_timeout; the client stays connected");
        true
    }

    /// Puts the server's prepared statements in a known state: none.
    pub(super) async fn deallocate_all(&mut self, server: &mut ServerConn) -> bool {
        let timeout = self.shared.internal_timeout();
        match Box::pin(server.run_internal("DEALLOCATE ALL", timeout)).await {
            Ok(r) if r.error.is_none() => {
                server.statements.clear();
                true
            }
            _ => false,
        }
    }

    /// Reads back unreported settings after a statement that may have changed them.
    pub(super) async fn refresh_settings(&mut self, server: &mut ServerConn) -> bool {
        let Some((sql, names)) = self.login.params.refresh_sql(&server.params) else {
            return true;
        };
        match Box::pin(server.run_internal(&sql, self.shared.internal_timeout())).await {
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
}
