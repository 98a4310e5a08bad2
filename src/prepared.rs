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

/// One distinct (query text, parameter types), prepared on servers under `server_name`.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The cache key: Parse body after the name, then the search_path.
    key: Bytes,
    pub server_name: String,
    /// A complete Parse message that prepares the statement under `server_name`.
    pub parse: Bytes,
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
    /// Key: the Parse body after the statement name (query, NUL, types).
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
        let mut key = Vec::with_capacity(rest.len() + search_path.len());
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
        let mut parse = BytesMut::with_capacity(rest.len() + server_name.len() + 6);
        parse.put_u8(tag::PARSE);
        parse.put_i32((4 + server_name.len() + 1 + rest.len()) as i32);
        parse.put_slice(server_name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(rest);
        let key = Bytes::from(key);
        let stmt = Arc::new(Statement {
            id,
            key: key.clone(),
            server_name,
            parse: parse.freeze(),
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

/// A client's named statements: its name -> the shared statement.
#[derive(Default, Debug)]
pub struct ClientStatements {
    map: HashMap<Bytes, Arc<Statement>>,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
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
    },
}

fn real(kind: u8) -> Expect {
    Expect::Real {
        kind,
        hide: false,
        prepares: None,
        uses: None,
        undo: Undo::Nothing,
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
    }
}

fn hidden(kind: u8, prepares: Option<u64>) -> Expect {
    Expect::Real {
        kind,
        hide: true,
        prepares,
        uses: None,
        undo: Undo::Nothing,
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
            Expect::Real { prepares, undo, .. } => {
                if let Some(id) = prepares {
                    server.forget(id);
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

/// The message that replaces SQL-level PREPARE / EXECUTE / DEALLOCATE in transaction
/// mode: it fails on the server with a clear error, so the transaction state stays true.
const SQL_PREPARE_REJECTED: &str = "DO $pgtide$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
MESSAGE = 'SQL-level PREPARE, EXECUTE and DEALLOCATE are not supported in transaction pooling mode', \
HINT = 'Use your driver''s protocol-level prepared statements, or a pool in session mode.'; END$pgtide$";

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
                // form's spelling only when ALL follows (checked by single_deallocate).
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

/// The name in a statement text that is exactly `DEALLOCATE [PREPARE] name` (psycopg 3
/// evicts its statements this way), if it is that.
fn single_deallocate(sql: &[u8]) -> Option<&[u8]> {
    use crate::router::lexer::{Lexer, Token};
    if !contains_ci(sql, b"deallocate") {
        return None;
    }
    let mut tokens = Lexer::new(sql);
    match tokens.next()? {
        Token::Word(w) if w.eq_ignore_ascii_case(b"deallocate") => {}
        _ => return None,
    }
    let mut name = match tokens.next()? {
        Token::Word(w) => w,
        _ => return None,
    };
    if name.eq_ignore_ascii_case(b"prepare") {
        name = match tokens.next()? {
            Token::Word(w) => w,
            _ => return None,
        };
    }
    match tokens.next() {
        None => Some(name),
        Some(Token::Semicolon) if tokens.next().is_none() => Some(name),
        _ => None,
    }
}

/// Stands in for a client's `DEALLOCATE name` of a statement pgtide mapped: the server
/// must not drop the shared statement, but the client gets a successful command.
const DEALLOCATE_DONE: &str = "DO $pgtide$BEGIN END$pgtide$";

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
            cx.push(real(t));
            let sql = cstr(body).map(|(s, _)| s).unwrap_or(body);
            if let Some(name) = single_deallocate(sql) {
                if name.eq_ignore_ascii_case(b"all") {
                    cx.client.clear();
                    cx.server.clear();
                    fx.deallocates_all = true;
                    return (ClientAction::Forward, fx);
                }
                // Lower-case, as PostgreSQL folds an unquoted name.
                let folded = name.to_ascii_lowercase();
                if !matches!(cx.client.remove(&folded), Undo::Nothing) {
                    return (ClientAction::Replace(query_message(DEALLOCATE_DONE)), fx);
                }
                if !folded.starts_with(b"pgtide_") {
                    // Not a statement of this client: PostgreSQL answers 26000.
                    return (ClientAction::Forward, fx);
                }
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

/// Handles one server message in transaction mode; `error_code` is the SQLSTATE of an
/// ErrorResponse. Returns whether to hide the message.
pub fn on_server_message(t: u8, error_code: Option<&str>, cx: ServerCtx<'_>) -> bool {
    if !server_tag_tracked(t) {
        return false;
    }
    let Some(Expect::Real { kind, .. }) = cx.pipeline.queue.front() else {
        return false;
    };
    let kind = *kind;
    let is_error = t == tag::ERROR_RESPONSE;
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
        return false;
    }
    let Some(entry) = cx.pipeline.queue.pop_front() else {
        return false;
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
        return false;
    }
    let Expect::Real { hide, prepares, .. } = entry else {
        return false;
    };
    if t == tag::PARSE_COMPLETE {
        if let Some(id) = prepares {
            cx.server.confirm(id);
        }
    }
    cx.pipeline.release_fakes(cx.after);
    hide && !is_error
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
            let mut after = Vec::new();
            let hide = on_server_message(
                t,
                None,
                ServerCtx {
                    pipeline: &mut self.pipeline,
                    server: &mut self.server,
                    client: &mut self.client,
                    cache: &self.cache,
                    after: &mut after,
                },
            );
            (hide, after)
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
    fn sql_level_prepare_is_replaced_by_an_error_and_discard_all_clears_names() {
        let mut w = World::new(10);
        let mut q = b"PREPARE p AS SELECT 1".to_vec();
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
        assert_eq!(single_deallocate(b"deallocate prepare x;"), Some(&b"x"[..]));
        assert_eq!(single_deallocate(b"deallocate all"), Some(&b"all"[..]));
        assert_eq!(single_deallocate(b"deallocate x; select 1"), None);
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
