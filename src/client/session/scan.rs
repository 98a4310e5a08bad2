//! Message accounting: framing both directions without copying, and following what
//! the server owes (ReadyForQuery per Query, Sync and FunctionCall), the transaction
//! status, COPY IN, ParameterStatus, FATAL errors, and the prepared-statement pipeline.

use super::io::splice;
use super::{End, Rare, ServerEnd, Session, RETRY_MAX};
use crate::params::{may_change_settings, settings_named, ClientParams};
use crate::prepared;
use crate::protocol::backend;
use crate::protocol::{frontend, sqlstate, status, tag};
use crate::router::session_state::{may_end_session_state, session_state, SQL_PREPARE};
use crate::router::sql_prepare;

pub(super) fn client_whole(t: u8) -> bool {
    matches!(t, tag::QUERY | tag::PARSE | tag::TERMINATE)
}

/// With prepared-statement tracking every message that owes an answer is looked at.
pub(super) fn client_whole_tracked(t: u8) -> bool {
    owes_answer(t) || matches!(t, tag::FLUSH | tag::TERMINATE)
}

pub(super) fn owes_answer(t: u8) -> bool {
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

pub(super) fn server_whole(t: u8) -> bool {
    matches!(
        t,
        tag::READY_FOR_QUERY
            | tag::PARAMETER_STATUS
            | tag::ERROR_RESPONSE
            | tag::NOTIFICATION_RESPONSE
    )
}

pub(super) fn server_whole_tracked(t: u8) -> bool {
    server_whole(t) || prepared::server_tag_tracked(t)
}

/// What a statement text (a Query's or a Parse's) means for the session: the settings it
/// may change are synced from now on (`settings_changed` asks for the read-back); in
/// transaction mode (`guard`), the session state it creates is returned, and for a pinned
/// client a text that may end that state asks for the check after the transaction.
/// With `maps_sql_prepare` (a Query, prepared statements tracked), a text that is one
/// SQL-level PREPARE creates no session state: pgtide keeps the client's name
/// (`prepared::on_client_message`).
fn note_statement(
    sql: &[u8],
    guard: bool,
    maps_sql_prepare: bool,
    params: &mut ClientParams,
    settings_changed: &mut bool,
    rare: Option<&mut Rare>,
) -> Option<&'static str> {
    if may_change_settings(sql) {
        *settings_changed = true;
        settings_named(sql, |n| params.watch(n));
    }
    if !guard {
        return None;
    }
    if let Some(r) = rare.filter(|r| r.pinned.is_some()) {
        r.unpin_check |= may_end_session_state(sql);
    }
    match session_state(sql) {
        Some(SQL_PREPARE) if maps_sql_prepare && sql_prepare::parse(sql).is_some() => None,
        state => state,
    }
}

impl Session {
    /// Frames new client bytes and notes what they owe and change.
    pub(super) fn scan_client(&mut self) -> Result<(), End> {
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
                Err(e) => {
                    // What was framed before it is accounted for; nothing from here on
                    // may reach the server.
                    self.c_ready = start;
                    return Err(self.protocol_error(e));
                }
            };
            if !frontend::is_message_type(frame.tag) {
                self.c_ready = start;
                return Err(self.invalid_message_type(frame.tag));
            }
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
                        self.shared.statements(),
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
            let frame_tag = frame.tag;
            // Transaction mode: session state this message would create.
            let guard = self.guards_session_state();
            // The statement text of a Query or a Parse.
            let text = match frame.tag {
                tag::QUERY => frame.body.and_then(frontend::query_text),
                tag::PARSE => frame
                    .body
                    .and_then(frontend::parse_statement)
                    .map(|(_, sql)| sql),
                _ => None,
            };
            let maps_sql_prepare = self.tracked && frame.tag == tag::QUERY;
            let state = text.and_then(|sql| {
                note_statement(
                    sql,
                    guard,
                    maps_sql_prepare,
                    &mut self.login.params,
                    &mut self.settings_changed,
                    self.rare.as_deref_mut(),
                )
            });
            match frame.tag {
                tag::QUERY => {
                    self.pending += 1;
                    self.copy_window_open = true;
                    self.copy_window_syncs = 0;
                }
                tag::PARSE => self.unsynced = true,
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
            if let Some(what) = state {
                self.on_session_state(frame_tag, what, start, &mut pos);
            }
            if self.tracked && counted && owes_answer(frame_tag) {
                self.track_client_message(frame_tag, start, &mut pos);
            }
        }
        self.c_ready = pos;
        Ok(())
    }

    /// The PID pgtide gave the client whose transaction the server backend `pid` ran
    /// last: this client's own when it is its server, else found through the registries
    /// (a notification is rare; the lookup takes their locks). `None` for a backend that
    /// is not one of pgtide's server connections.
    fn client_pid_of_backend(&self, pid: i32) -> Option<i32> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.server.as_ref().is_some_and(|s| s.cancel.pid == pid) {
            return Some(self.login.key_pid);
        }
        let (_, server) = self
            .shared
            .servers()
            .snapshot()
            .into_iter()
            .find(|(_, e)| e.remote_pid == pid)?;
        let client = self
            .shared
            .clients()
            .get(server.last_client.load(Relaxed))?;
        Some(client.key_pid.load(Relaxed)).filter(|&p| p != 0)
    }

    /// Records what the server owes for the message at `c2s[start..*end]` and maps its
    /// statement names, rewriting it in place if need be.
    pub(super) fn track_client_message(&mut self, t: u8, start: usize, end: &mut usize) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let mut to_client = Vec::new();
        let pinned = self.rare.as_ref().is_some_and(|r| r.pinned.is_some());
        let p = self.prepared.get_or_insert_with(Box::default);
        let (action, effects) = {
            let mut cx = prepared::Ctx {
                client: &mut p.statements,
                server: &mut server.statements,
                pipeline: &mut p.pipeline,
                cache: self.shared.statements(),
                max_per_server: self.shared.config().pgtide.max_prepared_statements as usize,
                search_path: self.login.params.search_path().unwrap_or("").as_bytes(),
                to_client: &mut to_client,
                sql_prepared_allowed: pinned,
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
    pub(super) fn scan_server(&mut self) -> Result<(), End> {
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
                    self.rare().server_fatal = Some(ServerEnd::Broken(format!(
                        "invalid data from the server: {e}"
                    )));
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
                    if self.login.pools.metrics.collect {
                        self.login.pools.metrics.queries.inc();
                    }
                    self.did_work = true;
                }
                (tag::NOTIFICATION_RESPONSE, Some(body)) if body.len() >= 4 => {
                    // The notifying backend's PID, as the client knows it: its own
                    // BackendKeyData PID, or that of the client the notifying server
                    // connection served last.
                    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    if let Some(shown) = self.client_pid_of_backend(pid) {
                        self.s2c[start + 5..start + 9].copy_from_slice(&shown.to_be_bytes());
                    }
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
                    self.login.pools.metrics.error(f.code);
                    if f.code == sqlstate::READ_ONLY_SQL_TRANSACTION {
                        if let Some(rare) = self.rare.as_mut().filter(|r| r.retry.is_some()) {
                            rare.retry_to_primary = true;
                        }
                    }
                    if self.login.pools.metrics.collect {
                        self.login.pools.metrics.queries.inc();
                    }
                    self.did_work = true;
                    if f.is_fatal() {
                        let end = ServerEnd::Fatal {
                            code: f.code.to_string(),
                            message: f.message.to_string(),
                        };
                        self.s2c.truncate(start);
                        pos = start;
                        self.rare().server_fatal = Some(end);
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
                            None,
                            prepared::ServerCtx {
                                pipeline: &mut p.pipeline,
                                server: &mut server.statements,
                                client: &mut p.statements,
                                cache: self.shared.statements(),
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
                    let action = prepared::on_server_message(
                        t,
                        self.s2c.get(start + 5..pos),
                        error_code.as_deref(),
                        prepared::ServerCtx {
                            pipeline: &mut p.pipeline,
                            server: &mut server.statements,
                            client: &mut p.statements,
                            cache: self.shared.statements(),
                            after: &mut after,
                        },
                    );
                    match action {
                        prepared::ServerAction::Forward => {}
                        prepared::ServerAction::Hide => {
                            splice(&mut self.s2c, start..pos, &[]);
                            pos = start;
                        }
                        prepared::ServerAction::Replace(bytes) => {
                            splice(&mut self.s2c, start..pos, &bytes);
                            pos = start + bytes.len();
                        }
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
        let m = &self.login.pools.metrics;
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
}
