//! The session's side of routing: the facts it hands to [`crate::router::route`] (the
//! SQL texts of the messages waiting in `c2s`, its settings, its last write), the pool
//! the decision names, the plain `BEGIN` pgtide may answer itself, the retry of a
//! replica's 25006 on the primary, the wait for a primary during a failover, and
//! read-your-writes' commit position.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::io::splice;
use super::{End, Session};
use crate::config::PoolMode;
use crate::error::Error;
use crate::pool::Pool;
use crate::protocol::{backend, cstr, frontend, sqlstate, tag, Scanner};
use crate::router::route::{self, Decision, Facts, NoReplica, Outcome, Pick, Target};
use crate::server::ServerConn;

/// The ParameterStatus that tells a client the WAL position of its last write.
pub const LAST_WRITE_LSN: &str = "pgtide.last_write_lsn";
/// The setting with which a client asks its reads to have seen a position.
pub const MIN_LSN: &str = "pgtide.min_lsn";

/// Where a transaction runs, as [`Session::choose_pool`] decides.
pub(super) struct Choice {
    pub pool: Arc<Pool>,
    /// The pool is a replica's.
    pub replica: bool,
    /// An explicit read-only transaction (or a forced route) on a replica.
    pub replica_tx: bool,
    /// The primary was chosen because the transaction may write.
    pub write: bool,
    /// For the routing metrics (databases with several hosts only).
    pub outcome: Option<Outcome>,
}

/// The SQL texts of the complete messages in a buffer: Query and Parse texts, and the
/// text of the named statement each Bind uses.
struct Texts<'a> {
    session: &'a Session,
    scan: Scanner,
    pos: usize,
}

impl<'a> Iterator for Texts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let buf: &'a [u8] = &self.session.c2s;
        loop {
            let f = self.scan.next(buf, &mut self.pos, |_| true).ok()??;
            let body = f.body?;
            let text = match f.tag {
                tag::QUERY => frontend::query_text(body),
                tag::PARSE => frontend::parse_statement(body).map(|(_, sql)| sql),
                tag::BIND => bound_statement(body).and_then(|n| self.session.statement_text(n)),
                _ => None,
            };
            if text.is_some() {
                return text;
            }
        }
    }
}

/// The statement name of a Bind's body.
fn bound_statement(body: &[u8]) -> Option<&[u8]> {
    cstr(body).and_then(|(_, rest)| cstr(rest)).map(|(n, _)| n)
}

impl Session {
    fn texts(&self) -> Texts<'_> {
        Texts {
            session: self,
            scan: Scanner::new(self.shared.config().pgtide.max_message_size),
            pos: 0,
        }
    }

    /// Whether the complete messages waiting in `c2s` end in a Query or a Sync.
    fn batch_complete(&self) -> bool {
        let mut scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        let mut pos = 0;
        let mut complete = false;
        while let Ok(Some(f)) = scan.next(&self.c2s, &mut pos, |_| true) {
            complete = matches!(f.tag, tag::QUERY | tag::SYNC);
        }
        complete
    }

    /// True when a Query, Parse or Bind (of a named statement) must run on the primary.
    pub(super) fn writes(&self, t: u8, body: Option<&[u8]>) -> bool {
        let Some(body) = body else { return false };
        let sql = match t {
            tag::QUERY => frontend::query_text(body),
            tag::PARSE => frontend::parse_statement(body).map(|(_, sql)| sql),
            tag::BIND => bound_statement(body).and_then(|n| self.statement_text(n)),
            _ => None,
        };
        let routing = self.login.pools.routing();
        match (sql, routing.as_deref()) {
            (Some(sql), Some(settings)) => route::writes(sql, settings),
            _ => false,
        }
    }

    /// What the router needs to know of this client.
    fn facts(&self) -> Facts<'_> {
        let rare = self.rare.as_deref();
        Facts {
            session_mode: self.login.mode != PoolMode::Transaction,
            force_primary: rare.is_some_and(|r| r.force_primary),
            deferred_begin: self.deferred_begin(),
            route_setting: self.login.params.value("pgtide.route"),
            default_read_only: route::read_only_value(
                self.login.params.value("default_transaction_read_only"),
            ),
            complete: false,
            written_lsn: self.min_lsn(),
        }
    }

    /// Where the transaction the client is starting should run.
    pub(super) fn choose_pool(&mut self) -> Result<Choice, Error> {
        let routing = self.login.pools.routing();
        let (Some(settings), Some(cluster)) = (
            routing.as_deref(),
            self.shared.cluster(self.login.database()),
        ) else {
            drop(routing);
            return Ok(Choice {
                pool: self.login.primary_pool(&self.shared),
                replica: false,
                replica_tx: false,
                write: false,
                outcome: None,
            });
        };
        let facts = Facts {
            complete: self.batch_complete(),
            ..self.facts()
        };
        let snapshot = cluster.route_snapshot();
        let set = &self.login.pools;
        let load = |i: usize| {
            set.made(i).map_or(0, |p| {
                let (total, idle, waiting) = p.counts();
                total as usize - idle + waiting
            })
        };
        let pick = Pick {
            turn: self.shared.next_replica_turn(),
            random: rand::random(),
            load: &load,
        };
        let decision = route::route(&facts, self.texts(), settings, snapshot.hosts(), &pick);
        let decision: Decision = match decision {
            Ok(d) => d,
            Err(NoReplica) => {
                return Err(Error::pooler(
                    sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    format!(
                        "no replica of database \"{}\" is up and within max_replica_lag, and replica_fallback is \"error\"",
                        self.login.database()
                    ),
                ));
            }
        };
        drop(routing);
        if decision.read_your_writes_filtered && self.login.pools.metrics.collect {
            self.login.pools.metrics.routing.read_your_writes.inc();
        }
        let primary = |s: &mut Session, outcome: Outcome| Choice {
            pool: s.login.primary_pool(&s.shared),
            replica: false,
            replica_tx: false,
            write: decision.write,
            outcome: Some(outcome),
        };
        Ok(match decision.target {
            Target::Primary => primary(self, decision.outcome),
            Target::Host(i) => match self.login.pools.host(i) {
                Some(pool) => Choice {
                    pool: pool.clone(),
                    replica: decision.replica,
                    replica_tx: decision.replica_tx,
                    write: false,
                    outcome: Some(decision.outcome),
                },
                None => primary(self, Outcome::Fallback),
            },
        })
    }

    /// True when the client's only pending message is a plain `BEGIN` (no read mode) on a
    /// routed database: pgtide can answer it and route the transaction by what follows.
    pub(super) fn begin_can_wait(&self) -> bool {
        if self.login.mode != PoolMode::Transaction || !self.shared.is_routed(self.login.database())
        {
            return false;
        }
        let routing = self.login.pools.routing();
        let Some(settings) = routing.as_deref() else {
            return false;
        };
        let mut scan = Scanner::new(self.shared.config().pgtide.max_message_size);
        let mut pos = 0;
        let Ok(Some(f)) = scan.next(&self.c2s, &mut pos, |_| true) else {
            return false;
        };
        if f.tag != tag::QUERY || pos != self.c2s.len() {
            return false;
        }
        f.body
            .and_then(frontend::query_text)
            .is_some_and(|sql| route::may_defer_begin(sql, &self.facts(), settings))
    }

    /// The replica refused the request as a write (25006) and nothing of its answer reached
    /// the client: drop the answer, give the replica back, and send the request again,
    /// to the primary.
    pub(super) async fn retry_on_primary(&mut self) -> Result<(), End> {
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
    pub(super) fn primary_unknown(&self) -> bool {
        self.shared
            .clusters()
            .get(self.login.database())
            .is_some_and(|c| c.primary().is_none())
    }

    /// Why pgtide refuses every primary of the client's database right now (see
    /// [`crate::cluster::Cluster::write_refusal`]), as the client's error.
    pub(super) fn refusal(&self) -> Option<Error> {
        let cluster = self.shared.cluster(self.login.database())?;
        if cluster.primary().is_some() {
            return None;
        }
        let why = cluster.write_refusal()?;
        Some(Error::pooler(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            format!(
                "pgtide refuses to use a primary of database \"{}\": {why} (SHOW HOSTS on the admin console lists the hosts)",
                cluster.database()
            ),
        ))
    }

    /// A database whose monitor knows no primary (failover under way): wait up to
    /// `primary_wait_timeout` for one, then take its pool. Refused at once (an ERROR, the
    /// client stays) while the monitor refuses every primary: hosts out of recovery it
    /// cannot order, or only diverged ones up.
    pub(super) async fn wait_for_primary(&mut self) -> Result<Arc<Pool>, Error> {
        if let Some(cluster) = self.shared.cluster(self.login.database()) {
            if cluster.primary().is_none() {
                if let Some(e) = self.refusal() {
                    return Err(e);
                }
                let wait = self
                    .login
                    .pools
                    .routing()
                    .as_deref()
                    .map_or(Duration::ZERO, |s| s.primary_wait_timeout);
                let mut changes = cluster.primary_changes();
                let _ = Box::pin(tokio::time::timeout(
                    wait,
                    changes.wait_for(|p| p.is_some()),
                ))
                .await;
                if let Some(e) = self.refusal() {
                    return Err(e);
                }
            }
        }
        Ok(self.login.primary_pool(&self.shared))
    }

    /// Whether the transaction that just ended on the primary has its WAL position
    /// learned at release (read_your_writes = lsn).
    pub(super) fn tracks_this_write(&self) -> bool {
        // Cheap checks first: this runs at every release.
        self.rare.as_ref().is_some_and(|r| r.for_write)
            && self
                .login
                .pools
                .routing()
                .as_deref()
                .is_some_and(route::tracks_writes)
    }

    /// read_your_writes = lsn: after a transaction on the primary, remembers where its
    /// WAL ends (one extra round trip), so that the client's reads avoid replicas that
    /// have not replayed it yet, and tells the client (ParameterStatus
    /// `pgtide.last_write_lsn`, before the transaction's ReadyForQuery when that is still
    /// here), so that it can hand the position to another connection (`pgtide.min_lsn`).
    pub(super) async fn note_written_lsn(&mut self, server: &mut ServerConn) {
        if !self.tracks_this_write() {
            return;
        }
        let timeout = self.shared.internal_timeout();
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
                let newest = rare.written_lsn.map_or(lsn.0, |w| w.max(lsn.0));
                rare.written_lsn = Some(newest);
                let mut status = BytesMut::new();
                backend::parameter_status(
                    &mut status,
                    LAST_WRITE_LSN,
                    &crate::cluster::Lsn(newest).to_string(),
                );
                // Before the final ReadyForQuery if it has not gone out yet.
                let rfq = self
                    .s_ready
                    .checked_sub(6)
                    .filter(|&at| self.s2c.get(at) == Some(&tag::READY_FOR_QUERY));
                let at = rfq.unwrap_or(self.s_ready);
                splice(&mut self.s2c, at..at, &status);
                self.s_ready += status.len();
            }
        }
    }

    /// The position the client asked its reads to have seen (`pgtide.min_lsn`, from a
    /// `SET` or the startup packet), combined with its own last write's. A value that is
    /// not an LSN asks for everything: reads go to the primary. Empty is unset.
    fn min_lsn(&self) -> Option<u64> {
        let own = self.rare.as_deref().and_then(|r| r.written_lsn);
        let asked = self
            .login
            .params
            .value(MIN_LSN)
            // Empty: never set, or RESET (what the server reads back for a placeholder).
            .filter(|v| !v.is_empty())
            .map(|v| crate::cluster::Lsn::parse(v).map_or(u64::MAX, |l| l.0));
        match (own, asked) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}
