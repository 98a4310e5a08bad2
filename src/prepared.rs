//! Named prepared statements across server connections in transaction mode.
//!
//! A client's `Parse` of a named statement is interned in a process-wide
//! [`StatementCache`] by its exact text and parameter types, and gets a server-side name
//! (`pgtide_<n>`) shared by every client that prepares the same thing. Each server
//! connection remembers which of those it has ([`ServerStatements`], at most
//! `max_prepared_statements`, least recently used closed first). Bind / Describe /
//! Close that name a client statement are rewritten to the server name, and the
//! statement is prepared first on a server that lacks it.
//!
//! Responses stay in protocol order through a [`Pipeline`]: one entry per message sent
//! (or answered by pgtide itself), popped as the server completes each. Answers pgtide
//! gives itself (ParseComplete for a Parse the server did not need, CloseComplete for a
//! client's Close) are released when their turn comes; answers to messages pgtide added
//! (a Parse it injected, a Close that evicts) are hidden. After an error the server skips
//! to the next Sync, and so does the pipeline, undoing what the skipped messages would
//! have done to the client's names.
//!
//! SQL-level prepared statements (a Query that is exactly one `PREPARE`, `EXECUTE` or
//! `DEALLOCATE`, recognized by [`crate::router::sql_prepare`]) use the same machinery:
//! the text after the client's name is interned ([`StatementCache::intern_sql`]) and
//! prepared on a server as `PREPARE pgtide_<n> ...`; the client's names are kept apart
//! from its protocol-level ones. The Query is rewritten in place: a PREPARE to pgtide's
//! name (or to a no-op when the server has the statement), an EXECUTE to pgtide's name,
//! preceded on a server that lacks the statement by its PREPARE, a DEALLOCATE to a
//! no-op; names the client does not hold reach the server as they are (PostgreSQL's own
//! `26000`), except pgtide's own. Its `SqlReply` makes the answer read as
//! PostgreSQL's answer to the client's text. Since an SQL `PREPARE` of a name the server
//! has fails, every server-side PREPARE is preceded by a `DO` block that deallocates the
//! name if it is there (the counterpart of the Close before every Parse).
//!
//! pgtide's record of a server's statements may only err on the side of "absent": every
//! Parse it sends of a `pgtide_<n>` name is preceded by a Close of that name (not an error
//! when absent), so a statement the server kept after a skipped Close or a failed
//! DEALLOCATE ALL never causes "already exists". The statement key includes the client's
//! `search_path`, which changes what a text means; a statement whose plan the server
//! refuses after a schema change ("cached plan must not change result type") is dropped
//! from the cache, so that the client's re-prepare gets a fresh one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::{cstr, tag};
use crate::router::lexer::{any_statement, contains_ci};
use crate::router::quote::quote_literal;
use crate::router::sql_prepare::{self, Kind, Parsed};

/// One distinct (query text, parameter types), prepared on servers under `server_name`.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The cache key: `P` (a Parse) or `Q` (an SQL PREPARE), the text after the
    /// statement name, then the search_path.
    key: Bytes,
    pub server_name: String,
    /// A complete Parse message that prepares the statement under `server_name`; for an
    /// SQL-level statement (`sql`), the SQL text `PREPARE <server_name> ...` instead.
    pub parse: Bytes,
    /// Prepared by an SQL-level PREPARE (run by EXECUTE), not by a Parse.
    pub sql: bool,
    last_used: AtomicU64,
    /// A server accepted this Parse once: the text is valid SQL, so a client's Parse of
    /// it can be answered without a server.
    validated: AtomicBool,
}

/// Process-wide statements, bounded by count and bytes (least recently used evicted).
/// Evicting a statement here only means that the next client to prepare the same text
/// gets a new server-side name; clients and servers that hold it keep working.
pub struct StatementCache {
    inner: Mutex<CacheInner>,
    max_count: usize,
    max_bytes: usize,
    next_id: AtomicU64,
    clock: AtomicU64,
}

#[derive(Default)]
struct CacheInner {
    /// Key: see [`Statement::key`].
    map: HashMap<Bytes, Arc<Statement>>,
    bytes: usize,
}

impl StatementCache {
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        StatementCache {
            inner: Mutex::new(CacheInner::default()),
            max_count: max_count.max(1),
            max_bytes: max_bytes.max(1024),
            next_id: AtomicU64::new(1),
            clock: AtomicU64::new(1),
        }
    }

    /// The statement for a Parse body's text and types (`rest` = body after the name),
    /// prepared under `search_path`.
    pub fn intern(&self, rest: &[u8], search_path: &[u8]) -> Arc<Statement> {
        self.intern_kind(false, rest, search_path, |server_name| {
            let mut parse = BytesMut::with_capacity(rest.len() + server_name.len() + 6);
            parse.put_u8(tag::PARSE);
            parse.put_i32((4 + server_name.len() + 1 + rest.len()) as i32);
            parse.put_slice(server_name.as_bytes());
            parse.put_u8(0);
            parse.put_slice(rest);
            parse.freeze()
        })
    }

    /// The statement of an SQL-level `PREPARE name <rest>` (`rest`: the types and the
    /// statement, as the client wrote them after its name), prepared under
    /// `search_path`. Its [`Statement::parse`] is the SQL that prepares it on a server:
    /// `PREPARE pgtide_<n><rest>`. SQL and protocol statements never share an entry.
    pub fn intern_sql(&self, rest: &[u8], search_path: &[u8]) -> Arc<Statement> {
        self.intern_kind(true, rest, search_path, |server_name| {
            let mut sql = BytesMut::with_capacity(rest.len() + server_name.len() + 8);
            sql.put_slice(b"PREPARE ");
            sql.put_slice(server_name.as_bytes());
            sql.put_slice(rest);
            sql.freeze()
        })
    }

    fn intern_kind(
        &self,
        sql: bool,
        rest: &[u8],
        search_path: &[u8],
        make: impl FnOnce(&str) -> Bytes,
    ) -> Arc<Statement> {
        let mut key = Vec::with_capacity(1 + rest.len() + search_path.len());
        key.push(if sql { b'Q' } else { b'P' });
        key.extend_from_slice(rest);
        key.extend_from_slice(search_path);
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = inner.map.get(key.as_slice()) {
            s.last_used.store(now, Ordering::Relaxed);
            return s.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let server_name = format!("pgtide_{id}");
        let parse = make(&server_name);
        let key = Bytes::from(key);
        let stmt = Arc::new(Statement {
            id,
            key: key.clone(),
            server_name,
            parse,
            sql,
            last_used: AtomicU64::new(now),
            validated: AtomicBool::new(false),
        });
        inner.bytes += key.len() + stmt.parse.len();
        inner.map.insert(key, stmt.clone());
        if inner.map.len() > self.max_count || inner.bytes > self.max_bytes {
            Self::evict(&mut inner, self.max_count * 9 / 10, self.max_bytes * 9 / 10);
        }
        stmt
    }

    /// Drops `stmt` from the cache (its plan went stale): the next Parse of the same
    /// text gets a new server-side statement.
    pub fn forget(&self, stmt: &Statement) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.map.get(&stmt.key).is_some_and(|s| s.id == stmt.id) {
            if let Some(s) = inner.map.remove(&stmt.key) {
                inner.bytes -= s.key.len() + s.parse.len();
            }
        }
    }

    fn evict(inner: &mut CacheInner, count: usize, bytes: usize) {
        let mut by_age: Vec<(u64, Bytes)> = inner
            .map
            .iter()
            .map(|(k, s)| (s.last_used.load(Ordering::Relaxed), k.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(t, _)| *t);
        for (_, k) in by_age {
            if inner.map.len() <= count && inner.bytes <= bytes {
                break;
            }
            if let Some(s) = inner.map.remove(&k) {
                inner.bytes -= k.len() + s.parse.len();
            }
        }
    }

    /// (statements, bytes) held.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.map.len(), inner.bytes)
    }
}

/// The statements one server connection has (as far as pgtide knows: it may only
/// believe a statement absent that is there, never the other way round).
#[derive(Default, Debug)]
pub struct ServerStatements {
    /// id -> (statement, last use, ParseComplete seen).
    held: HashMap<u64, (Arc<Statement>, u64, bool)>,
    clock: u64,
}

impl ServerStatements {
    pub fn has(&self, id: u64) -> bool {
        self.held.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn touch(&mut self, id: u64) {
        self.clock += 1;
        if let Some(e) = self.held.get_mut(&id) {
            e.1 = self.clock;
        }
    }

    fn begin(&mut self, stmt: &Arc<Statement>) {
        self.clock += 1;
        self.held.insert(stmt.id, (stmt.clone(), self.clock, false));
    }

    fn confirm(&mut self, id: u64) {
        if let Some(e) = self.held.get_mut(&id) {
            e.2 = true;
            e.0.validated.store(true, Ordering::Relaxed);
        }
    }

    fn forget(&mut self, id: u64) {
        self.held.remove(&id);
    }

    /// The least recently used statement other than `keep`.
    fn victim(&self, keep: u64) -> Option<Arc<Statement>> {
        self.held
            .iter()
            .filter(|(id, _)| **id != keep)
            .min_by_key(|(_, e)| e.1)
            .map(|(_, e)| e.0.clone())
    }

    /// True when a Parse was sent whose answer has not been seen.
    pub fn has_unconfirmed(&self) -> bool {
        self.held.values().any(|e| !e.2)
    }

    /// Forget everything (the server deallocated all, or was reset).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

/// A client's named statements: its name -> the shared statement; protocol-level ones
/// (Parse) and SQL-level ones (PREPARE) apart, as PostgreSQL's one namespace is used by
/// different messages (Bind and Describe use the first, EXECUTE the second; a PREPARE
/// of a name in either fails).
#[derive(Default, Debug)]
pub struct ClientStatements {
    map: HashMap<Bytes, Arc<Statement>>,
    sql: HashMap<Bytes, Arc<Statement>>,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.map.len() + self.sql.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.sql.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.sql.clear();
    }

    /// The client holds a statement of this name (either kind).
    fn holds(&self, name: &[u8]) -> bool {
        self.map.contains_key(name) || self.sql.contains_key(name)
    }

    /// Maps the SQL-level name `name` to `stmt`; returns how to undo it.
    fn set_sql(&mut self, name: Bytes, stmt: Arc<Statement>) -> Undo {
        match self.sql.insert(name.clone(), stmt) {
            Some(old) => Undo::SqlRestore(name, old),
            None => Undo::SqlForget(name),
        }
    }

    /// Drops the SQL-level name `name`; returns how to undo it.
    fn remove_sql(&mut self, name: &[u8]) -> Undo {
        match self.sql.remove_entry(name) {
            Some((name, old)) => Undo::SqlRestore(name, old),
            None => Undo::Nothing,
        }
    }

    /// The SQL text of the client's statement `name`.
    pub fn text_of(&self, name: &[u8]) -> Option<&[u8]> {
        let stmt = self.map.get(name)?;
        // The Parse message: tag, length, server name, NUL, then the text.
        let rest = stmt.parse.get(5 + stmt.server_name.len() + 1..)?;
        crate::protocol::cstr(rest).map(|(sql, _)| sql)
    }

    /// Maps `name` to `stmt`; returns how to undo it.
    fn set(&mut self, name: Bytes, stmt: Arc<Statement>) -> Undo {
        match self.map.insert(name.clone(), stmt) {
            Some(old) => Undo::Restore(name, old),
            None => Undo::Forget(name),
        }
    }

    /// Drops `name`; returns how to undo it.
    fn remove(&mut self, name: &[u8]) -> Undo {
        match self.map.remove_entry(name) {
            Some((name, old)) => Undo::Restore(name, old),
            None => Undo::Nothing,
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::Forget(name) => {
                self.map.remove(&name);
            }
            Undo::Restore(name, stmt) => {
                self.map.insert(name, stmt);
            }
            Undo::SqlForget(name) => {
                self.sql.remove(&name);
            }
            Undo::SqlRestore(name, stmt) => {
                self.sql.insert(name, stmt);
            }
        }
    }
}

/// How to take back what a message did to the client's names, if the server skips it
/// (after an earlier error) or rejects it.
#[derive(Debug, Default)]
enum Undo {
    #[default]
    Nothing,
    Forget(Bytes),
    Restore(Bytes, Arc<Statement>),
    /// The same for the client's SQL-level names.
    SqlForget(Bytes),
    SqlRestore(Bytes, Arc<Statement>),
}

/// What the server owes, in order.
#[derive(Debug)]
enum Expect {
    /// pgtide answers this itself (ParseComplete or CloseComplete) when its turn comes.
    Fake { tag: u8, undo: Undo },
    /// The server answers this message.
    Real {
        kind: u8,
        /// The answer is for a message pgtide added: hide the success reply.
        hide: bool,
        /// This Parse prepares that statement on the server.
        prepares: Option<u64>,
        /// This Bind or Describe uses that statement.
        uses: Option<Arc<Statement>>,
        undo: Undo,
        /// A Query pgtide rewrote for SQL-level prepared statements: how to answer it.
        sql: Option<Box<SqlReply>>,
    },
}

/// How the answer to a Query that pgtide rewrote (SQL-level PREPARE / EXECUTE /
/// DEALLOCATE) is made to read as PostgreSQL's answer to the client's own text.
#[derive(Debug, Default)]
struct SqlReply {
    /// Statements pgtide put before the client's, in order: their CommandComplete is
    /// hidden; one that prepares a statement on the server names it.
    prefix: VecDeque<Option<u64>>,
    /// The command tag the client's statement answers with, when pgtide replaced it by
    /// a no-op (`DO`).
    tag: Option<&'static str>,
    /// The server's statement name and the client's: the second replaces the first in
    /// error messages.
    rename: Option<(String, String)>,
    /// The error is raised by a `DO` block pgtide wrote: its PL/pgSQL CONTEXT goes.
    raised: bool,
    /// Error positions: (characters before the client's own text in what was sent,
    /// characters before it in what the client sent).
    position: Option<(u32, u32)>,
}

fn real(kind: u8) -> Expect {
    Expect::Real {
        kind,
        hide: false,
        prepares: None,
        uses: None,
        undo: Undo::Nothing,
        sql: None,
    }
}

/// A Bind or Describe of `stmt`.
fn using(kind: u8, stmt: Arc<Statement>) -> Expect {
    Expect::Real {
        kind,
        hide: false,
        prepares: None,
        uses: Some(stmt),
        undo: Undo::Nothing,
        sql: None,
    }
}

fn hidden(kind: u8, prepares: Option<u64>) -> Expect {
    Expect::Real {
        kind,
        hide: true,
        prepares,
        uses: None,
        undo: Undo::Nothing,
        sql: None,
    }
}

/// The answers owed for the messages sent so far (transaction mode only).
#[derive(Debug, Default)]
pub struct Pipeline {
    queue: VecDeque<Expect>,
    /// Counts for metrics, taken by the session: Parses answered without preparing,
    /// statements prepared on a server, statements closed to stay within the limit.
    pub hits: u64,
    pub prepares: u64,
    pub evictions: u64,
    /// The server reported an error and skips messages until the next Sync, which the
    /// client has not sent yet.
    skipping: bool,
}

impl Pipeline {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && !self.skipping
    }

    /// Takes back what a message the server skips (or rejects) would have done.
    fn skipped(e: Expect, server: &mut ServerStatements, client: &mut ClientStatements) {
        match e {
            Expect::Fake { undo, .. } => client.undo(undo),
            Expect::Real {
                prepares,
                undo,
                sql,
                ..
            } => {
                if let Some(id) = prepares {
                    server.forget(id);
                }
                for id in sql.iter().flat_map(|r| r.prefix.iter().flatten()) {
                    server.forget(*id);
                }
                client.undo(undo);
            }
        }
    }

    fn push(
        &mut self,
        e: Expect,
        cx_server: &mut ServerStatements,
        client: &mut ClientStatements,
        to_client: &mut Vec<u8>,
    ) {
        if self.skipping {
            if matches!(
                e,
                Expect::Real {
                    kind: tag::SYNC,
                    ..
                }
            ) {
                self.skipping = false;
            } else {
                Self::skipped(e, cx_server, client);
                return;
            }
        }
        if self.queue.is_empty() {
            if let Expect::Fake { tag: t, .. } = e {
                to_client.extend_from_slice(&[t, 0, 0, 0, 4]);
                return;
            }
        }
        self.queue.push_back(e);
    }

    /// A Query that goes to the server before every message already recorded (a BEGIN
    /// pgtide answered early and sends ahead of what followed it): its answer comes
    /// first.
    pub fn expect_query_first(&mut self) {
        self.queue.push_front(real(tag::QUERY));
    }

    /// The server swallowed `n` Syncs (sent during COPY IN): they owe nothing.
    pub fn drop_syncs(&mut self, mut n: u32) {
        let mut i = 0;
        while n > 0 && i < self.queue.len() {
            if matches!(
                self.queue[i],
                Expect::Real {
                    kind: tag::SYNC,
                    ..
                }
            ) {
                self.queue.remove(i);
                n -= 1;
            } else {
                i += 1;
            }
        }
    }

    fn release_fakes(&mut self, to_client: &mut Vec<u8>) {
        while let Some(Expect::Fake { tag: t, .. }) = self.queue.front() {
            to_client.extend_from_slice(&[*t, 0, 0, 0, 4]);
            self.queue.pop_front();
        }
    }
}

/// What the session does with a client message after [`on_client_message`].
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Send it as it is.
    Forward,
    /// Send these bytes instead (possibly empty: pgtide answered it itself).
    Replace(Vec<u8>),
}

/// Side effects a message has on prepared-statement bookkeeping beyond the wire.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The message deallocates every statement (DISCARD ALL / DEALLOCATE ALL).
    pub deallocates_all: bool,
}

/// Everything [`on_client_message`] needs.
pub struct Ctx<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub pipeline: &'a mut Pipeline,
    pub cache: &'a StatementCache,
    pub max_per_server: usize,
    /// The client's search_path (part of what a statement text means).
    pub search_path: &'a [u8],
    /// Answers pgtide gives at once (append to the client's output).
    pub to_client: &'a mut Vec<u8>,
    /// The client is pinned to this server (the session-state guard): its SQL-level
    /// PREPARE / EXECUTE / DEALLOCATE run there as on a dedicated connection.
    pub sql_prepared_allowed: bool,
}

impl Ctx<'_> {
    fn push(&mut self, e: Expect) {
        self.pipeline
            .push(e, self.server, self.client, self.to_client);
    }
}

fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(t);
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    message(tag::CLOSE, &body)
}

/// Appends what prepares `stmt` on the server: evicting Closes beyond the limit, a
/// Close of the name itself (in case the server kept it unbeknownst to pgtide), and the
/// Parse. The Parse's own entry is the caller's.
fn prepare(stmt: &Arc<Statement>, cx: &mut Ctx<'_>, out: &mut Vec<u8>) {
    while cx.server.len() >= cx.max_per_server.max(1) {
        let Some(victim) = cx.server.victim(stmt.id) else {
            break;
        };
        out.extend_from_slice(&close_statement(&victim.server_name));
        cx.server.forget(victim.id);
        cx.push(hidden(tag::CLOSE, None));
        cx.pipeline.evictions += 1;
    }
    out.extend_from_slice(&close_statement(&stmt.server_name));
    cx.push(hidden(tag::CLOSE, None));
    out.extend_from_slice(&stmt.parse);
    cx.server.begin(stmt);
    cx.pipeline.prepares += 1;
}

/// Makes sure the server has `stmt` before a message that uses it.
fn ensure(stmt: &Arc<Statement>, cx: &mut Ctx<'_>, out: &mut Vec<u8>) {
    if cx.server.has(stmt.id) {
        cx.server.touch(stmt.id);
        return;
    }
    prepare(stmt, cx, out);
    cx.push(hidden(tag::PARSE, Some(stmt.id)));
}

/// The message that replaces SQL-level EXECUTE / DEALLOCATE in transaction mode when
/// they are not a Query of their own (among other statements, in a Parse) and the client
/// is not pinned: it fails on the server with a clear error, so the transaction state
/// stays true.
const SQL_PREPARE_REJECTED: &str = "DO $pgtide$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
MESSAGE = 'SQL-level PREPARE, EXECUTE and DEALLOCATE are not supported in transaction pooling mode but as a simple query of that one statement', \
HINT = 'Send the statement alone (not among others, not through Parse/Bind), use your driver''s protocol-level prepared statements, or a pool in session mode.'; END$pgtide$";

/// What a statement text means for prepared statements: (uses SQL-level prepared
/// statements, deallocates all).
fn sql_prepared_use(sql: &[u8]) -> (bool, bool) {
    // Cheap filter first: the statements that matter all contain one of these.
    if !["prepare", "execute", "deallocate", "discard"]
        .iter()
        .any(|w| contains_ci(sql, w.as_bytes()))
    {
        return (false, false);
    }
    let mut rejected = false;
    let mut all = false;
    any_statement(sql, |first, second| {
        if first.eq_ignore_ascii_case(b"discard") {
            // DISCARD ALL deallocates; DISCARD PLANS / TEMP / SEQUENCES do not.
            all |= second.eq_ignore_ascii_case(b"all");
        } else if first.eq_ignore_ascii_case(b"deallocate") {
            if second.eq_ignore_ascii_case(b"all") || second.eq_ignore_ascii_case(b"prepare") {
                // DEALLOCATE PREPARE name is rare; treat DEALLOCATE PREPARE as the ALL
                // form's spelling only when ALL follows (alone in a Query, the statement
                // is handled by `sql_command`).
                all |= second.eq_ignore_ascii_case(b"all");
                rejected |= second.eq_ignore_ascii_case(b"prepare");
            } else {
                rejected = true;
            }
        } else if first.eq_ignore_ascii_case(b"prepare") {
            // PREPARE TRANSACTION (two-phase commit) is not a prepared statement.
            rejected |= !second.eq_ignore_ascii_case(b"transaction");
        } else if first.eq_ignore_ascii_case(b"execute") {
            rejected = true;
        }
        false
    });
    (rejected, all)
}

/// A statement that does nothing and cannot fail (but in an aborted transaction, as
/// any): stands in for a client's PREPARE or DEALLOCATE that needs nothing on the
/// server; the client sees the tag of its own command ([`SqlReply::tag`]).
const NO_OP: &str = "DO $pgtide$BEGIN END$pgtide$";

/// A `DO` block that raises `code` with `message`, as PostgreSQL would for the client's
/// statement (double-quoted as a literal: the message holds the client's name).
fn raise(code: &str, message: &str) -> String {
    let body = format!(
        "BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}; END",
        quote_literal(code),
        quote_literal(message)
    );
    format!("DO {}", quote_literal(&body))
}

/// Makes the server ready to run `PREPARE <stmt.server_name> ...`: statements beyond
/// `max_per_server` are deallocated (least recently used first), and so is the name
/// itself in case the server kept it unbeknownst to pgtide, each in a block that ignores
/// "does not exist" (the SQL counterpart of the Close before every Parse). Appends that
/// block and a `;` to `out`.
fn make_room_sql(stmt: &Arc<Statement>, cx: &mut Ctx<'_>, out: &mut Vec<u8>) {
    let mut names = Vec::new();
    while cx.server.len() >= cx.max_per_server.max(1) {
        let Some(victim) = cx.server.victim(stmt.id) else {
            break;
        };
        cx.server.forget(victim.id);
        cx.pipeline.evictions += 1;
        names.push(victim.server_name.clone());
    }
    names.push(stmt.server_name.clone());
    out.extend_from_slice(b"DO $pgtide$BEGIN ");
    for name in names {
        // Names are pgtide_<n>: nothing to quote.
        out.extend_from_slice(
            format!(
                "BEGIN EXECUTE 'DEALLOCATE {name}'; EXCEPTION WHEN invalid_sql_statement_name THEN NULL; END; "
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"END$pgtide$; ");
    cx.server.begin(stmt);
    cx.pipeline.prepares += 1;
}

/// Characters (UTF-8) in `b`: error positions count characters.
fn chars(b: &[u8]) -> u32 {
    b.iter().filter(|&&c| (c & 0xC0) != 0x80).count() as u32
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn sql_entry(undo: Undo, prepares: Option<u64>, reply: SqlReply) -> Expect {
    Expect::Real {
        kind: tag::QUERY,
        hide: false,
        prepares,
        uses: None,
        undo,
        sql: Some(Box::new(reply)),
    }
}

/// The Query replaced by a `DO` block raising PostgreSQL's own error for the client's
/// statement.
fn raised(code: &str, message: &str) -> (ClientAction, Expect) {
    (
        ClientAction::Replace(query_message(&raise(code, message))),
        sql_entry(
            Undo::Nothing,
            None,
            SqlReply {
                raised: true,
                ..SqlReply::default()
            },
        ),
    )
}

/// A Query that is one SQL-level PREPARE, EXECUTE or DEALLOCATE: what to send and what
/// the server will owe. The client's names stay with pgtide; the server gets pgtide's
/// own names (`pgtide_<n>`, shared by every client that prepares the same text under
/// the same search_path), prepared where they are missing.
fn sql_command(
    c: &sql_prepare::Command<'_>,
    sql: &[u8],
    cx: &mut Ctx<'_>,
    fx: &mut Effects,
) -> (ClientAction, Expect) {
    let name = &c.name[..];
    match c.kind {
        Kind::DeallocateAll => {
            // The server drops every statement; so does the client.
            cx.client.clear();
            cx.server.clear();
            fx.deallocates_all = true;
            (ClientAction::Forward, real(tag::QUERY))
        }
        Kind::Prepare => {
            if cx.client.holds(name) {
                return raised(
                    "42P05",
                    &format!("prepared statement \"{}\" already exists", lossy(name)),
                );
            }
            let stmt = cx.cache.intern_sql(&sql[c.rest.clone()], cx.search_path);
            let undo = cx
                .client
                .set_sql(Bytes::copy_from_slice(name), stmt.clone());
            let rename = Some((stmt.server_name.clone(), lossy(name)));
            if cx.server.has(stmt.id) {
                // This server has the same text prepared already (for this client or
                // another): nothing to prepare, the client gets its PREPARE's answer.
                cx.server.touch(stmt.id);
                cx.pipeline.hits += 1;
                let reply = SqlReply {
                    tag: Some("PREPARE"),
                    rename,
                    ..SqlReply::default()
                };
                return (
                    ClientAction::Replace(query_message(NO_OP)),
                    sql_entry(undo, None, reply),
                );
            }
            let mut out = Vec::with_capacity(stmt.parse.len() + 200);
            make_room_sql(&stmt, cx, &mut out);
            let before = out.len() + b"PREPARE ".len() + stmt.server_name.len();
            out.extend_from_slice(&stmt.parse);
            out.push(0);
            let reply = SqlReply {
                prefix: VecDeque::from([None]),
                rename,
                position: Some((chars(&out[..before]), chars(&sql[..c.rest.start]))),
                ..SqlReply::default()
            };
            (
                ClientAction::Replace(message(tag::QUERY, &out)),
                sql_entry(undo, Some(stmt.id), reply),
            )
        }
        Kind::Execute => {
            let Some(stmt) = cx.client.sql.get(name).cloned() else {
                return unknown_name(name);
            };
            let mut out = Vec::with_capacity(stmt.parse.len() + 200);
            let mut prefix = VecDeque::new();
            if cx.server.has(stmt.id) {
                cx.server.touch(stmt.id);
            } else {
                make_room_sql(&stmt, cx, &mut out);
                out.extend_from_slice(&stmt.parse);
                out.extend_from_slice(b"; ");
                prefix.extend([None, Some(stmt.id)]);
            }
            out.extend_from_slice(b"EXECUTE ");
            out.extend_from_slice(stmt.server_name.as_bytes());
            let before = out.len();
            out.extend_from_slice(&sql[c.rest.clone()]);
            out.push(0);
            let reply = SqlReply {
                prefix,
                rename: Some((stmt.server_name.clone(), lossy(name))),
                position: Some((chars(&out[..before]), chars(&sql[..c.rest.start]))),
                ..SqlReply::default()
            };
            (
                ClientAction::Replace(message(tag::QUERY, &out)),
                sql_entry(Undo::Nothing, None, reply),
            )
        }
        Kind::Deallocate => {
            // Only the client's name goes; the shared server statement stays. If the
            // server refuses the no-op (an aborted transaction), the name comes back.
            let undo = match cx.client.remove_sql(name) {
                Undo::Nothing => cx.client.remove(name),
                undo => undo,
            };
            if matches!(undo, Undo::Nothing) {
                return unknown_name(name);
            }
            let reply = SqlReply {
                tag: Some("DEALLOCATE"),
                ..SqlReply::default()
            };
            (
                ClientAction::Replace(query_message(NO_OP)),
                sql_entry(undo, None, reply),
            )
        }
    }
}

/// EXECUTE or DEALLOCATE of a name the client does not hold: PostgreSQL's 26000. The
/// server answers it itself, but a name of pgtide's own (another client's statement)
/// must not reach it.
fn unknown_name(name: &[u8]) -> (ClientAction, Expect) {
    if name.starts_with(b"pgtide_") {
        return raised(
            "26000",
            &format!("prepared statement \"{}\" does not exist", lossy(name)),
        );
    }
    (ClientAction::Forward, real(tag::QUERY))
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    message(tag::QUERY, &q)
}

/// The body after the name of a Parse of `sql` with no parameter types.
fn parse_rest(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.extend_from_slice(&[0, 0, 0]);
    b
}

/// Handles one whole client message in transaction mode: records what the server will
/// owe for it and says what to send instead, if anything.
pub fn on_client_message(t: u8, body: &[u8], cx: &mut Ctx<'_>) -> (ClientAction, Effects) {
    let mut fx = Effects::default();
    match t {
        tag::QUERY => {
            let sql = cstr(body).map(|(s, _)| s).unwrap_or(body);
            match sql_prepare::parse(sql) {
                Some(Parsed::Command(c)) => {
                    let (action, entry) = sql_command(&c, sql, cx, &mut fx);
                    cx.push(entry);
                    return (action, fx);
                }
                // A syntax error on the server, which creates nothing.
                Some(Parsed::Invalid) => {
                    cx.push(real(t));
                    return (ClientAction::Forward, fx);
                }
                None => cx.push(real(t)),
            }
            let (rejected, all) = sql_prepared_use(sql);
            if all {
                // The server drops them all when it runs this; a failure leaves them
                // there, which the Close before every Parse makes harmless.
                cx.client.clear();
                cx.server.clear();
                fx.deallocates_all = true;
            }
            if rejected && !cx.sql_prepared_allowed {
                return (
                    ClientAction::Replace(query_message(SQL_PREPARE_REJECTED)),
                    fx,
                );
            }
            (ClientAction::Forward, fx)
        }
        tag::PARSE => {
            let Some((name, rest)) = cstr(body) else {
                cx.push(real(t));
                return (ClientAction::Forward, fx);
            };
            let sql = cstr(rest).map(|(s, _)| s).unwrap_or(rest);
            let (rejected, all) = sql_prepared_use(sql);
            if all {
                cx.client.clear();
                cx.server.clear();
                fx.deallocates_all = true;
            }
            let rejected_rest;
            let rest = if rejected && !cx.sql_prepared_allowed {
                rejected_rest = parse_rest(SQL_PREPARE_REJECTED);
                &rejected_rest[..]
            } else {
                rest
            };
            if name.is_empty() {
                cx.push(real(t));
                if rejected {
                    let mut b = vec![0];
                    b.extend_from_slice(rest);
                    return (ClientAction::Replace(message(tag::PARSE, &b)), fx);
                }
                return (ClientAction::Forward, fx);
            }
            let stmt = cx.cache.intern(rest, cx.search_path);
            let undo = cx.client.set(Bytes::copy_from_slice(name), stmt.clone());
            if cx.server.has(stmt.id) {
                cx.server.touch(stmt.id);
                cx.pipeline.hits += 1;
                cx.push(Expect::Fake {
                    tag: tag::PARSE_COMPLETE,
                    undo,
                });
                return (ClientAction::Replace(Vec::new()), fx);
            }
            let mut out = Vec::new();
            prepare(&stmt, cx, &mut out);
            cx.push(Expect::Real {
                kind: tag::PARSE,
                hide: false,
                prepares: Some(stmt.id),
                uses: None,
                undo,
                sql: None,
            });
            (ClientAction::Replace(out), fx)
        }
        tag::BIND => {
            let mapped = cstr(body).and_then(|(portal, rest)| {
                let (name, tail) = cstr(rest)?;
                if name.is_empty() {
                    return None;
                }
                let stmt = cx.client.map.get(name)?.clone();
                Some((portal, stmt, tail))
            });
            let Some((portal, stmt, tail)) = mapped else {
                cx.push(real(t));
                return (ClientAction::Forward, fx);
            };
            let mut out = Vec::new();
            ensure(&stmt, cx, &mut out);
            let mut b = Vec::with_capacity(body.len() + stmt.server_name.len());
            b.extend_from_slice(portal);
            b.push(0);
            b.extend_from_slice(stmt.server_name.as_bytes());
            b.push(0);
            b.extend_from_slice(tail);
            out.extend_from_slice(&message(tag::BIND, &b));
            cx.push(using(t, stmt));
            (ClientAction::Replace(out), fx)
        }
        tag::DESCRIBE | tag::CLOSE => {
            let named = match body.split_first() {
                Some((b'S', rest)) => cstr(rest).map(|(n, _)| n).filter(|n| !n.is_empty()),
                _ => None,
            };
            let Some(name) = named else {
                cx.push(real(t));
                return (ClientAction::Forward, fx);
            };
            if t == tag::CLOSE {
                // Closing a client statement drops only the client's name for it.
                let undo = cx.client.remove(name);
                cx.push(Expect::Fake {
                    tag: tag::CLOSE_COMPLETE,
                    undo,
                });
                return (ClientAction::Replace(Vec::new()), fx);
            }
            let Some(stmt) = cx.client.map.get(name).cloned() else {
                cx.push(real(t));
                return (ClientAction::Forward, fx);
            };
            let mut out = Vec::new();
            ensure(&stmt, cx, &mut out);
            let mut b = vec![b'S'];
            b.extend_from_slice(stmt.server_name.as_bytes());
            b.push(0);
            out.extend_from_slice(&message(tag::DESCRIBE, &b));
            cx.push(using(t, stmt));
            (ClientAction::Replace(out), fx)
        }
        tag::EXECUTE | tag::SYNC | tag::FUNCTION_CALL => {
            cx.push(real(t));
            (ClientAction::Forward, fx)
        }
        // Flush, CopyData, CopyDone, CopyFail: no answer of their own.
        _ => (ClientAction::Forward, fx),
    }
}

/// Answers a client message without a server, when that is possible and the client
/// holds none (so nothing is pending and the transaction status is idle): a Parse of a
/// statement some server has already accepted, a Close of a statement, and the Sync
/// that ends such a batch. Returns the answer, or `None` when a server is needed.
pub fn answer_without_server(
    t: u8,
    body: &[u8],
    client: &mut ClientStatements,
    cache: &StatementCache,
    search_path: &[u8],
) -> Option<Vec<u8>> {
    match t {
        tag::PARSE => {
            let (name, rest) = cstr(body)?;
            if name.is_empty() {
                return None;
            }
            let sql = cstr(rest).map(|(s, _)| s)?;
            if sql_prepared_use(sql) != (false, false) {
                return None;
            }
            let stmt = cache.intern(rest, search_path);
            if !stmt.validated.load(Ordering::Relaxed) {
                return None;
            }
            client.set(Bytes::copy_from_slice(name), stmt);
            Some(vec![tag::PARSE_COMPLETE, 0, 0, 0, 4])
        }
        tag::CLOSE => match body.split_first() {
            Some((b'S', rest)) => {
                let name = cstr(rest).map(|(n, _)| n).filter(|n| !n.is_empty())?;
                client.remove(name);
                Some(vec![tag::CLOSE_COMPLETE, 0, 0, 0, 4])
            }
            _ => None,
        },
        tag::SYNC => Some(vec![
            tag::READY_FOR_QUERY,
            0,
            0,
            0,
            5,
            crate::protocol::status::IDLE,
        ]),
        _ => None,
    }
}

/// True when `tag` from the server may end an answer the pipeline tracks (the session
/// must see such messages whole).
pub fn server_tag_tracked(t: u8) -> bool {
    matches!(
        t,
        tag::PARSE_COMPLETE
            | tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::NO_DATA
            | tag::ROW_DESCRIPTION
            | tag::COMMAND_COMPLETE
            | tag::EMPTY_QUERY_RESPONSE
            | tag::PORTAL_SUSPENDED
            | tag::READY_FOR_QUERY
            | tag::ERROR_RESPONSE
    )
}

/// Everything [`on_server_message`] needs.
pub struct ServerCtx<'a> {
    pub pipeline: &'a mut Pipeline,
    pub server: &'a mut ServerStatements,
    pub client: &'a mut ClientStatements,
    pub cache: &'a StatementCache,
    /// Answers pgtide owes the client right after this message.
    pub after: &'a mut Vec<u8>,
}

/// What the session does with a server message after [`on_server_message`].
#[derive(Debug, PartialEq, Eq)]
pub enum ServerAction {
    Forward,
    /// The answer is to a message pgtide added.
    Hide,
    /// Send this message instead (a command tag or an error made to read as the
    /// client's own statement's).
    Replace(Vec<u8>),
}

/// Handles one server message in transaction mode; `body` is its body when the
/// message was read whole, `error_code` the SQLSTATE of an ErrorResponse.
pub fn on_server_message(
    t: u8,
    body: Option<&[u8]>,
    error_code: Option<&str>,
    cx: ServerCtx<'_>,
) -> ServerAction {
    if !server_tag_tracked(t) {
        return ServerAction::Forward;
    }
    let Some(Expect::Real { kind, .. }) = cx.pipeline.queue.front() else {
        return ServerAction::Forward;
    };
    let kind = *kind;
    let is_error = t == tag::ERROR_RESPONSE;
    if kind == tag::QUERY && matches!(t, tag::COMMAND_COMPLETE | tag::ERROR_RESPONSE) {
        return sql_reply(t, body, cx);
    }
    let ends = match kind {
        tag::PARSE => t == tag::PARSE_COMPLETE || is_error,
        tag::BIND => t == tag::BIND_COMPLETE || is_error,
        tag::CLOSE => t == tag::CLOSE_COMPLETE || is_error,
        tag::DESCRIBE => t == tag::ROW_DESCRIPTION || t == tag::NO_DATA || is_error,
        tag::EXECUTE => {
            matches!(
                t,
                tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED
            ) || is_error
        }
        // Sync, Query, FunctionCall: errors are part of the answer.
        _ => t == tag::READY_FOR_QUERY,
    };
    if !ends {
        return ServerAction::Forward;
    }
    let Some(entry) = cx.pipeline.queue.pop_front() else {
        return ServerAction::Forward;
    };
    let extended = matches!(
        kind,
        tag::PARSE | tag::BIND | tag::CLOSE | tag::DESCRIBE | tag::EXECUTE
    );
    if is_error && extended {
        if let Expect::Real {
            uses: Some(stmt), ..
        } = &entry
        {
            if error_code == Some("0A000") {
                // "cached plan must not change result type": this statement's plan is
                // stale for good; the client's re-prepare must get a fresh statement.
                cx.cache.forget(stmt);
            }
        }
        Pipeline::skipped(entry, cx.server, cx.client);
        // The server now skips everything up to the next Sync.
        loop {
            match cx.pipeline.queue.front() {
                None => {
                    cx.pipeline.skipping = true;
                    break;
                }
                Some(Expect::Real {
                    kind: tag::SYNC, ..
                }) => break,
                Some(_) => {
                    if let Some(e) = cx.pipeline.queue.pop_front() {
                        Pipeline::skipped(e, cx.server, cx.client);
                    }
                }
            }
        }
        return ServerAction::Forward;
    }
    let Expect::Real { hide, prepares, .. } = entry else {
        return ServerAction::Forward;
    };
    if t == tag::PARSE_COMPLETE {
        if let Some(id) = prepares {
            cx.server.confirm(id);
        }
    }
    cx.pipeline.release_fakes(cx.after);
    if hide && !is_error {
        ServerAction::Hide
    } else {
        ServerAction::Forward
    }
}

/// A CommandComplete or ErrorResponse in the answer to a Query (the entry at the front
/// of the pipeline): for a Query pgtide rewrote, hides what answers its own additions
/// and makes the rest read as the answer to the client's text.
fn sql_reply(t: u8, body: Option<&[u8]>, cx: ServerCtx<'_>) -> ServerAction {
    let Some(Expect::Real {
        prepares,
        undo,
        sql,
        ..
    }) = cx.pipeline.queue.front_mut()
    else {
        return ServerAction::Forward;
    };
    let Some(reply) = sql.as_deref_mut() else {
        return ServerAction::Forward;
    };
    if t == tag::COMMAND_COMPLETE {
        if let Some(step) = reply.prefix.pop_front() {
            if let Some(id) = step {
                cx.server.confirm(id);
            }
            return ServerAction::Hide;
        }
        if let Some(id) = prepares.take() {
            cx.server.confirm(id);
        }
        *undo = Undo::Nothing;
        return match reply.tag {
            Some(tag) => {
                let mut b = tag.as_bytes().to_vec();
                b.push(0);
                ServerAction::Replace(message(tag::COMMAND_COMPLETE, &b))
            }
            None => ServerAction::Forward,
        };
    }
    // An error: the client's statement did not run (nor did the rest of what pgtide
    // put before it).
    for id in reply.prefix.drain(..).flatten() {
        cx.server.forget(id);
    }
    if let Some(id) = prepares.take() {
        cx.server.forget(id);
    }
    cx.client.undo(std::mem::take(undo));
    let Some(body) = body else {
        return ServerAction::Forward;
    };
    match fixed_error(body, reply) {
        Some(b) => ServerAction::Replace(message(tag::ERROR_RESPONSE, &b)),
        None => ServerAction::Forward,
    }
}

/// An ErrorResponse body made to read as the answer to the client's own text: pgtide's
/// statement name replaced by the client's, the position counted in the client's text
/// (dropped when it points into what pgtide added), the CONTEXT of pgtide's own `DO`
/// block dropped. `None` when nothing changes (or the body cannot be read). The whole
/// Query is parsed before any of it runs, so a syntax error in the client's part comes
/// before the answers to what pgtide put in front: positions, not the order of
/// answers, say whose text an error is in.
fn fixed_error(body: &[u8], reply: &SqlReply) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut rest = body;
    let mut changed = false;
    while let Some((&k, after)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let (v, next) = cstr(after)?;
        rest = next;
        let mut value = std::borrow::Cow::Borrowed(v);
        match k {
            b'W' if reply.raised => {
                changed = true;
                continue;
            }
            b'P' => {
                // Positions in what pgtide added (a PREPARE it put before an EXECUTE)
                // are dropped: the client did not send that text.
                if let Some((sent, theirs)) = reply.position {
                    let p: u32 = std::str::from_utf8(v).ok()?.parse().ok()?;
                    if p <= sent {
                        changed = true;
                        continue;
                    }
                    value = std::borrow::Cow::Owned(
                        (p - sent).saturating_add(theirs).to_string().into_bytes(),
                    );
                    changed = true;
                }
            }
            b'M' | b'D' | b'H' => {
                if let Some((server, client)) = &reply.rename {
                    let from = format!("\"{server}\"");
                    if contains_bytes(v, from.as_bytes()) {
                        let text =
                            String::from_utf8_lossy(v).replace(&from, &format!("\"{client}\""));
                        value = std::borrow::Cow::Owned(text.into_bytes());
                        changed = true;
                    }
                }
            }
            _ => {}
        }
        out.push(k);
        out.extend_from_slice(&value);
        out.push(0);
    }
    out.push(0);
    changed.then_some(out)
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_body(name: &str, sql: &str) -> Vec<u8> {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        b
    }

    fn bind_body(stmt: &str) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        b
    }

    struct World {
        client: ClientStatements,
        server: ServerStatements,
        pipeline: Pipeline,
        cache: StatementCache,
        to_client: Vec<u8>,
        max: usize,
    }

    impl World {
        fn new(max: usize) -> Self {
            World {
                client: ClientStatements::default(),
                server: ServerStatements::default(),
                pipeline: Pipeline::default(),
                cache: StatementCache::new(100, 1 << 20),
                to_client: Vec::new(),
                max,
            }
        }

        fn send(&mut self, t: u8, body: &[u8]) -> ClientAction {
            let mut cx = Ctx {
                client: &mut self.client,
                server: &mut self.server,
                pipeline: &mut self.pipeline,
                cache: &self.cache,
                max_per_server: self.max,
                search_path: b"",
                to_client: &mut self.to_client,
                sql_prepared_allowed: false,
            };
            on_client_message(t, body, &mut cx).0
        }

        /// The server answers `t`; returns (hidden, what pgtide adds after it).
        fn answer(&mut self, t: u8) -> (bool, Vec<u8>) {
            let (action, after) = self.answer_with(t, None);
            (action == ServerAction::Hide, after)
        }

        /// The server answers `t` with `body`; returns what pgtide does with it.
        fn answer_with(&mut self, t: u8, body: Option<&[u8]>) -> (ServerAction, Vec<u8>) {
            let mut after = Vec::new();
            let action = on_server_message(
                t,
                body,
                None,
                ServerCtx {
                    pipeline: &mut self.pipeline,
                    server: &mut self.server,
                    client: &mut self.client,
                    cache: &self.cache,
                    after: &mut after,
                },
            );
            (action, after)
        }
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i + 5 <= bytes.len() {
            out.push(bytes[i]);
            let len = u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]])
                as usize;
            i += 1 + len;
        }
        out
    }

    #[test]
    fn first_parse_is_renamed_and_the_second_is_answered_by_pgtide() {
        let mut w = World::new(10);
        let ClientAction::Replace(out) = w.send(tag::PARSE, &parse_body("s1", "select 1")) else {
            panic!("a named Parse is rewritten")
        };
        assert!(
            String::from_utf8_lossy(&out).contains("pgtide_"),
            "renamed: {out:?}"
        );
        assert_eq!(
            tags(&out),
            vec![tag::CLOSE, tag::PARSE],
            "a Close of the name goes first"
        );
        w.send(tag::SYNC, &[]);
        assert_eq!(w.answer(tag::CLOSE_COMPLETE), (true, vec![]));
        assert_eq!(w.answer(tag::PARSE_COMPLETE), (false, vec![]));
        assert_eq!(w.answer(tag::READY_FOR_QUERY), (false, vec![]));
        assert!(w.pipeline.is_empty());
        // Same text under another name, on the same server: no Parse goes out.
        assert_eq!(
            w.send(tag::PARSE, &parse_body("s2", "select 1")),
            ClientAction::Replace(vec![])
        );
        assert_eq!(
            tags(&w.to_client),
            vec![tag::PARSE_COMPLETE],
            "answered at once"
        );
    }

    /// The client prepares `sql` as `name` and the server accepts it.
    fn prepared(w: &mut World, name: &str, sql: &str) {
        w.send(tag::PARSE, &parse_body(name, sql));
        w.send(tag::SYNC, &[]);
        while !w.pipeline.is_empty() {
            let next = match w.pipeline.queue.front() {
                Some(Expect::Real {
                    kind: tag::CLOSE, ..
                }) => tag::CLOSE_COMPLETE,
                Some(Expect::Real {
                    kind: tag::PARSE, ..
                }) => tag::PARSE_COMPLETE,
                _ => tag::READY_FOR_QUERY,
            };
            w.answer(next);
        }
    }

    #[test]
    fn bind_on_a_server_without_the_statement_injects_a_hidden_parse() {
        let mut w = World::new(10);
        prepared(&mut w, "s1", "select 1");
        // A new server connection for the next transaction.
        w.server = ServerStatements::default();
        let ClientAction::Replace(out) = w.send(tag::BIND, &bind_body("s1")) else {
            panic!("a Bind of a client statement is rewritten")
        };
        assert_eq!(tags(&out), vec![tag::CLOSE, tag::PARSE, tag::BIND]);
        w.send(tag::EXECUTE, &[0, 0, 0, 0, 0]);
        w.send(tag::SYNC, &[]);
        assert!(w.answer(tag::CLOSE_COMPLETE).0);
        assert!(
            w.answer(tag::PARSE_COMPLETE).0,
            "the injected Parse's reply is hidden"
        );
        assert!(!w.answer(tag::BIND_COMPLETE).0);
        assert!(!w.answer(tag::COMMAND_COMPLETE).0);
        assert!(!w.answer(tag::READY_FOR_QUERY).0);
        assert!(w.pipeline.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_drops_pending_fakes() {
        let mut w = World::new(10);
        prepared(&mut w, "s1", "select 1");
        // Bind (fails), then a Parse pgtide would answer itself, then Close, then Sync.
        w.send(tag::BIND, &bind_body(""));
        w.send(tag::PARSE, &parse_body("s2", "select 1"));
        w.send(tag::CLOSE, b"Ss1\0");
        w.send(tag::SYNC, &[]);
        assert!(w.to_client.is_empty(), "fakes wait for their turn");
        let (hidden, after) = w.answer(tag::ERROR_RESPONSE);
        assert!(!hidden);
        assert!(
            after.is_empty(),
            "the server skipped those messages, so pgtide must too"
        );
        assert_eq!(w.answer(tag::READY_FOR_QUERY), (false, vec![]));
        assert!(w.pipeline.is_empty());
        // The skipped Parse created no name and the skipped Close removed none.
        assert!(w.client.map.contains_key(&b"s1"[..]), "s1 was not closed");
        assert!(
            !w.client.map.contains_key(&b"s2"[..]),
            "s2 was never prepared"
        );
    }

    #[test]
    fn a_failed_parse_forgets_the_client_name_and_the_server_statement() {
        let mut w = World::new(10);
        w.send(tag::PARSE, &parse_body("s1", "selec 1"));
        w.send(tag::SYNC, &[]);
        w.answer(tag::CLOSE_COMPLETE);
        w.answer(tag::ERROR_RESPONSE);
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.client.is_empty());
        assert!(w.server.is_empty());
        // A Bind of that name now reaches the server unchanged: PostgreSQL says 26000.
        assert_eq!(w.send(tag::BIND, &bind_body("s1")), ClientAction::Forward);
    }

    #[test]
    fn the_least_recently_used_statement_is_closed_beyond_the_limit() {
        let mut w = World::new(2);
        prepared(&mut w, "s0", "select 0");
        prepared(&mut w, "s1", "select 1");
        let ClientAction::Replace(out) = w.send(tag::PARSE, &parse_body("s2", "select 2")) else {
            panic!()
        };
        assert_eq!(
            tags(&out),
            vec![tag::CLOSE, tag::CLOSE, tag::PARSE],
            "the oldest is closed first"
        );
        assert_eq!(
            &out[5..14],
            b"Spgtide_1",
            "the least recently used goes: {out:?}"
        );
        assert_eq!(w.server.len(), 2);
        // Even statements whose ParseComplete has not come back can be evicted: a
        // pipeline of many statements stays bounded.
        for i in 3..10 {
            w.send(
                tag::PARSE,
                &parse_body(&format!("s{i}"), &format!("select {i}")),
            );
            assert!(w.server.len() <= 2);
        }
    }

    #[test]
    fn sql_level_execute_among_other_statements_is_replaced_by_an_error_and_discard_all_clears_names(
    ) {
        let mut w = World::new(10);
        let mut q = b"SELECT 1; EXECUTE p".to_vec();
        q.push(0);
        let ClientAction::Replace(out) = w.send(tag::QUERY, &q) else {
            panic!()
        };
        assert!(String::from_utf8_lossy(&out).contains("0A000"));
        let mut q = b"do $$ begin execute 'select 1'; end $$".to_vec();
        q.push(0);
        assert_eq!(
            w.send(tag::QUERY, &q),
            ClientAction::Forward,
            "plpgsql EXECUTE is fine"
        );
        w.send(tag::PARSE, &parse_body("s1", "select 1"));
        let mut q = b"DISCARD ALL".to_vec();
        q.push(0);
        let mut cx = Ctx {
            client: &mut w.client,
            server: &mut w.server,
            pipeline: &mut w.pipeline,
            cache: &w.cache,
            max_per_server: 10,
            search_path: b"",
            to_client: &mut w.to_client,
            sql_prepared_allowed: false,
        };
        let (_, fx) = on_client_message(tag::QUERY, &q, &mut cx);
        assert!(fx.deallocates_all);
        assert!(w.client.is_empty());
    }

    fn q(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        b
    }

    /// The text of a Query message pgtide sends instead.
    fn sent(action: ClientAction) -> String {
        let ClientAction::Replace(out) = action else {
            panic!("expected a rewritten Query, got {action:?}")
        };
        assert_eq!(out[0], tag::QUERY);
        String::from_utf8_lossy(&out[5..out.len() - 1]).into_owned()
    }

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in fields {
            b.push(*k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    /// The fields of an ErrorResponse message.
    fn error_fields(msg: &[u8]) -> Vec<(u8, String)> {
        assert_eq!(msg[0], tag::ERROR_RESPONSE);
        let mut out = Vec::new();
        let mut rest = &msg[5..];
        while let Some((&k, after)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let (v, next) = cstr(after).expect("a field");
            out.push((k, String::from_utf8_lossy(v).into_owned()));
            rest = next;
        }
        out
    }

    fn command_complete(tag_text: &str) -> Vec<u8> {
        q(tag_text)
    }

    #[test]
    fn sql_prepare_gets_pgtide_s_name_and_execute_prepares_where_missing() {
        let mut w = World::new(10);
        let out = sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT $1::int + 5;")));
        let server_name = w.client.sql[&b"q"[..]].server_name.clone();
        assert!(
            out.ends_with(&format!("; PREPARE {server_name} AS SELECT $1::int + 5")),
            "{out}"
        );
        assert!(
            out.starts_with("DO $pgtide$BEGIN BEGIN EXECUTE 'DEALLOCATE pgtide_"),
            "the name is made free first: {out}"
        );
        // The DO block's CommandComplete is hidden, the PREPARE's is the client's.
        let cc = command_complete("DO");
        assert_eq!(
            w.answer_with(tag::COMMAND_COMPLETE, Some(&cc)).0,
            ServerAction::Hide
        );
        let cc = command_complete("PREPARE");
        assert_eq!(
            w.answer_with(tag::COMMAND_COMPLETE, Some(&cc)).0,
            ServerAction::Forward
        );
        assert_eq!(w.answer(tag::READY_FOR_QUERY), (false, vec![]));
        assert!(w.pipeline.is_empty());
        assert!(w.server.has(w.client.sql[&b"q"[..]].id));

        // On the same server: EXECUTE runs pgtide's statement.
        let out = sent(w.send(tag::QUERY, &q("execute Q (1) -- one")));
        assert_eq!(out, format!("EXECUTE {server_name} (1)"));
        w.answer(tag::ROW_DESCRIPTION);
        w.answer(tag::COMMAND_COMPLETE);
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.pipeline.is_empty());

        // Another server: the statement is prepared there first, in the same Query.
        w.server = ServerStatements::default();
        let out = sent(w.send(tag::QUERY, &q("EXECUTE q(2)")));
        assert!(
            out.ends_with(&format!(
                "; PREPARE {server_name} AS SELECT $1::int + 5; EXECUTE {server_name}(2)"
            )),
            "{out}"
        );
        let cc = command_complete("DO");
        assert_eq!(
            w.answer_with(tag::COMMAND_COMPLETE, Some(&cc)).0,
            ServerAction::Hide
        );
        let cc = command_complete("PREPARE");
        assert_eq!(
            w.answer_with(tag::COMMAND_COMPLETE, Some(&cc)).0,
            ServerAction::Hide,
            "the PREPARE pgtide added is hidden"
        );
        let cc = command_complete("SELECT 1");
        assert_eq!(
            w.answer_with(tag::COMMAND_COMPLETE, Some(&cc)).0,
            ServerAction::Forward
        );
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.pipeline.is_empty());
        assert!(w.server.has(w.client.sql[&b"q"[..]].id));
        assert!(!w.server.has_unconfirmed());

        // A second client with the same name and another text gets another statement;
        // one with the same text shares it.
        let mut other = ClientStatements::default();
        std::mem::swap(&mut w.client, &mut other);
        sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT $1::int + 6")));
        assert_ne!(w.client.sql[&b"q"[..]].server_name, server_name);
        w.client.clear();
        w.pipeline = Pipeline::default();
        let out = sent(w.send(tag::QUERY, &q("PREPARE r AS SELECT $1::int + 5;")));
        assert_eq!(out, NO_OP, "this server has that text prepared already");
        let cc = command_complete("DO");
        let (action, _) = w.answer_with(tag::COMMAND_COMPLETE, Some(&cc));
        assert_eq!(
            action,
            ServerAction::Replace(message(tag::COMMAND_COMPLETE, &q("PREPARE")))
        );
        assert_eq!(w.client.sql[&b"r"[..]].server_name, server_name);
    }

    #[test]
    fn sql_duplicate_unknown_and_deallocated_names() {
        let mut w = World::new(10);
        prepared(&mut w, "proto", "select 1");
        sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT 1")));
        w.pipeline = Pipeline::default();
        for dup in ["PREPARE q AS SELECT 2", "PREPARE \"proto\" AS SELECT 2"] {
            let out = sent(w.send(tag::QUERY, &q(dup)));
            assert!(
                out.contains("42P05") && out.contains("already exists"),
                "{out}"
            );
            let name = if dup.contains("proto") { "proto" } else { "q" };
            assert!(out.contains(&format!("\"{name}\"")), "{out}");
            // The DO block's CONTEXT is not the client's business.
            let err = error_body(&[
                (b'S', "ERROR"),
                (b'C', "42P05"),
                (b'M', "x"),
                (b'W', "PL/pgSQL function inline_code_block line 1 at RAISE"),
            ]);
            let (ServerAction::Replace(m), _) = w.answer_with(tag::ERROR_RESPONSE, Some(&err))
            else {
                panic!("the error is rewritten")
            };
            assert!(error_fields(&m).iter().all(|(k, _)| *k != b'W'));
            w.answer(tag::READY_FOR_QUERY);
        }
        assert_eq!(w.client.sql[&b"q"[..]].server_name, "pgtide_2");
        // Unknown names reach the server (PostgreSQL's own 26000), but not pgtide's.
        assert_eq!(
            w.send(tag::QUERY, &q("EXECUTE nope")),
            ClientAction::Forward
        );
        assert_eq!(
            w.send(tag::QUERY, &q("DEALLOCATE nope")),
            ClientAction::Forward
        );
        let out = sent(w.send(tag::QUERY, &q("EXECUTE pgtide_1")));
        assert!(
            out.contains("26000") && out.contains("\"pgtide_1\" does not exist"),
            "{out}"
        );
        w.pipeline = Pipeline::default();
        // DEALLOCATE drops the client's name only, and answers with its own tag.
        assert_eq!(sent(w.send(tag::QUERY, &q("DEALLOCATE PREPARE q;"))), NO_OP);
        assert!(!w.client.sql.contains_key(&b"q"[..]));
        let cc = command_complete("DO");
        let (action, _) = w.answer_with(tag::COMMAND_COMPLETE, Some(&cc));
        assert_eq!(
            action,
            ServerAction::Replace(message(tag::COMMAND_COMPLETE, &q("DEALLOCATE")))
        );
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.server.has(2), "the shared statement stays on the server");
        // In an aborted transaction the no-op fails, and the name stays, as directly.
        sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT 1")));
        w.pipeline = Pipeline::default();
        sent(w.send(tag::QUERY, &q("DEALLOCATE q")));
        let err = error_body(&[(b'S', "ERROR"), (b'C', "25P02"), (b'M', "aborted")]);
        assert_eq!(
            w.answer_with(tag::ERROR_RESPONSE, Some(&err)).0,
            ServerAction::Forward
        );
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.client.sql.contains_key(&b"q"[..]));
        // DEALLOCATE ALL forgets both kinds.
        assert_eq!(
            w.send(tag::QUERY, &q("DEALLOCATE ALL")),
            ClientAction::Forward
        );
        assert!(w.client.is_empty());
    }

    #[test]
    fn a_failed_sql_prepare_records_nothing_and_its_error_reads_as_the_clients() {
        let mut w = World::new(10);
        let text = "/* é */ PREPARE q AS SELECT * FROM nope";
        sent(w.send(tag::QUERY, &q(text)));
        let id = w.client.sql[&b"q"[..]].id;
        let sent_text = {
            let stmt = &w.client.sql[&b"q"[..]];
            String::from_utf8_lossy(&stmt.parse).into_owned()
        };
        assert_eq!(
            sent_text,
            format!("PREPARE pgtide_{id} AS SELECT * FROM nope")
        );
        let cc = command_complete("DO");
        w.answer_with(tag::COMMAND_COMPLETE, Some(&cc));
        // The server's position counts its own text: the DO block, then the PREPARE.
        let Some(Expect::Real {
            sql: Some(reply), ..
        }) = w.pipeline.queue.front()
        else {
            panic!()
        };
        let (before_sent, before_theirs) = reply.position.expect("positions are mapped");
        let in_table = text.find("nope").unwrap()
            - text[..text.find("nope").unwrap()]
                .chars()
                .filter(|c| c.len_utf8() > 1)
                .count();
        let server_pos = before_sent as usize + (in_table - before_theirs as usize) + 1;
        let err = error_body(&[
            (b'S', "ERROR"),
            (b'C', "42P01"),
            (b'M', "relation \"nope\" does not exist"),
            (b'P', &server_pos.to_string()),
        ]);
        let (ServerAction::Replace(m), _) = w.answer_with(tag::ERROR_RESPONSE, Some(&err)) else {
            panic!("the position is the client's")
        };
        let p = error_fields(&m)
            .into_iter()
            .find(|(k, _)| *k == b'P')
            .map(|(_, v)| v);
        assert_eq!(
            p,
            Some((in_table + 1).to_string()),
            "as PostgreSQL counts it in the client's text"
        );
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.pipeline.is_empty());
        assert!(
            !w.client.sql.contains_key(&b"q"[..]),
            "the name is not recorded"
        );
        assert!(!w.server.has(id));
        // A later PREPARE of the name is a new one, not a duplicate.
        let out = sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT 1")));
        assert!(out.contains("PREPARE pgtide_"), "{out}");
    }

    #[test]
    fn errors_of_execute_name_the_clients_statement() {
        let mut w = World::new(10);
        sent(w.send(tag::QUERY, &q("PREPARE q(int) AS SELECT $1")));
        w.pipeline = Pipeline::default();
        let name = w.client.sql[&b"q"[..]].server_name.clone();
        w.server.confirm(w.client.sql[&b"q"[..]].id);
        sent(w.send(tag::QUERY, &q("EXECUTE q")));
        let msg = format!("wrong number of parameters for prepared statement \"{name}\"");
        let err = error_body(&[(b'S', "ERROR"), (b'C', "42601"), (b'M', &msg)]);
        let (ServerAction::Replace(m), _) = w.answer_with(tag::ERROR_RESPONSE, Some(&err)) else {
            panic!("renamed")
        };
        assert!(error_fields(&m).contains(&(
            b'M',
            "wrong number of parameters for prepared statement \"q\"".to_string()
        )));
        w.answer(tag::READY_FOR_QUERY);
        // An EXECUTE whose PREPARE (added by pgtide) fails forgets the server's copy.
        w.server = ServerStatements::default();
        sent(w.send(tag::QUERY, &q("EXECUTE q(1)")));
        let err = error_body(&[
            (b'S', "ERROR"),
            (b'C', "25P02"),
            (b'M', "aborted"),
            (b'P', "3"),
        ]);
        let (action, _) = w.answer_with(tag::ERROR_RESPONSE, Some(&err));
        let ServerAction::Replace(m) = action else {
            panic!()
        };
        assert!(
            error_fields(&m).iter().all(|(k, _)| *k != b'P'),
            "no position in pgtide's text"
        );
        w.answer(tag::READY_FOR_QUERY);
        assert!(w.server.is_empty());
        assert!(
            w.client.sql.contains_key(&b"q"[..]),
            "the client's name stays"
        );
    }

    #[test]
    fn sql_prepare_on_a_full_server_deallocates_the_least_recently_used() {
        let mut w = World::new(2);
        prepared(&mut w, "s0", "select 0");
        prepared(&mut w, "s1", "select 1");
        let out = sent(w.send(tag::QUERY, &q("PREPARE q AS SELECT 2")));
        assert!(out.contains("'DEALLOCATE pgtide_1'"), "{out}");
        assert!(!out.contains("'DEALLOCATE pgtide_2'"), "{out}");
        assert_eq!(w.server.len(), 2);
    }

    #[test]
    fn deallocate_of_a_client_statement_keeps_the_shared_one() {
        let mut w = World::new(10);
        w.send(tag::PARSE, &parse_body("_pg3_0", "select 1"));
        let mut q = b"DEALLOCATE _pg3_0".to_vec();
        q.push(0);
        let ClientAction::Replace(out) = w.send(tag::QUERY, &q) else {
            panic!("a DEALLOCATE of a mapped name is replaced")
        };
        assert!(
            String::from_utf8_lossy(&out).contains("BEGIN END"),
            "a no-op stands in"
        );
        assert!(w.client.is_empty());
        // Unknown names go to the server, which answers 26000 as it would directly.
        assert_eq!(w.send(tag::QUERY, &q), ClientAction::Forward);
    }

    #[test]
    fn known_statements_are_answered_without_a_server() {
        let w = World::new(10);
        let mut client = ClientStatements::default();
        let body = parse_body("s1", "select 1");
        assert_eq!(
            answer_without_server(tag::PARSE, &body, &mut client, &w.cache, b""),
            None,
            "never validated"
        );
        let stmt = w.cache.intern(&body[3..], b"");
        stmt.validated.store(true, Ordering::Relaxed);
        assert_eq!(
            answer_without_server(tag::PARSE, &body, &mut client, &w.cache, b""),
            Some(vec![tag::PARSE_COMPLETE, 0, 0, 0, 4])
        );
        assert_eq!(client.len(), 1);
        assert_eq!(
            answer_without_server(tag::BIND, &bind_body("s1"), &mut client, &w.cache, b""),
            None
        );
        // Another search_path is another statement, not validated yet.
        assert_eq!(
            answer_without_server(tag::PARSE, &body, &mut client, &w.cache, b"tenant_2"),
            None
        );
    }

    #[test]
    fn the_global_cache_is_bounded() {
        let cache = StatementCache::new(10, 1 << 20);
        for i in 0..100 {
            cache.intern(format!("select {i}\0\0\0").as_bytes(), b"");
        }
        assert!(cache.size().0 <= 10);
    }
}
