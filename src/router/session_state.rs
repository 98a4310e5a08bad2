//! Statements that create state living past their transaction on the server
//! connection: in transaction mode such state would reach the next client of that
//! connection, so the session pins the client to its server (or refuses the statement,
//! as `session_state` says). Pure and allocation-free, over the lexer.
//!
//! What counts (PostgreSQL's session-scoped objects):
//! - `CREATE [GLOBAL | LOCAL] TEMP | TEMPORARY TABLE / VIEW / SEQUENCE`, unless the table
//!   is `ON COMMIT DROP` (it ends with the transaction);
//! - session advisory locks: `pg_advisory_lock`, `pg_advisory_lock_shared`,
//!   `pg_try_advisory_lock`, `pg_try_advisory_lock_shared` (not the `_xact_` ones);
//! - `LISTEN`;
//! - `DECLARE ... WITH HOLD` cursors;
//! - SQL-level `PREPARE` (not `PREPARE TRANSACTION`; in transaction mode a Query that
//!   is only a PREPARE is pgtide's, see [`SQL_PREPARE`]);
//! - `LOAD`;
//! - `SET SESSION AUTHORIZATION`.
//!
//! `SET`, `RESET` and `set_config` are not here: pgtide replays a client's settings on
//! every server it gets (see `params`).

use super::lexer::{contains_ci, Lexer, Token};

/// [`session_state`]'s name for an SQL-level PREPARE. In transaction mode with
/// prepared-statement tracking, a Query that is exactly one PREPARE is handled by
/// pgtide (`prepared`, [`super::sql_prepare`]) and creates no state on the server; only
/// other forms (among other statements, or in a Parse) are reported.
pub const SQL_PREPARE: &str = "SQL PREPARE";

/// What of `sql` creates session state, named for the client and the logs; `None` for
/// the (very common) statement that creates none.
pub fn session_state(sql: &[u8]) -> Option<&'static str> {
    // Cheap filters first: every statement that matters holds one of these words.
    const NEEDLES: &[&[u8]] = &[
        b"temp",
        b"advisory",
        b"listen",
        b"hold",
        b"prepare",
        b"load",
        b"authorization",
    ];
    if !NEEDLES.iter().any(|n| contains_ci(sql, n)) {
        return None;
    }
    let mut lexer = Lexer::new(sql);
    let mut found = None;
    // The words of the current statement, up to a few, and flags over all of it.
    let mut first: &[u8] = &[];
    let mut words = 0usize;
    let mut st = Statement::default();
    let finish = |first: &[u8], st: &Statement| -> Option<&'static str> {
        let is = |w: &[u8]| first.eq_ignore_ascii_case(w);
        if st.advisory {
            return Some("a session advisory lock (pg_advisory_lock)");
        }
        if is(b"create") && st.temp && !st.on_commit_drop {
            return Some("a temporary table (CREATE TEMP)");
        }
        if is(b"listen") {
            return Some("LISTEN");
        }
        if is(b"declare") && st.with_hold {
            return Some("a WITH HOLD cursor");
        }
        if is(b"prepare") && !st.prepare_transaction {
            return Some(SQL_PREPARE);
        }
        if is(b"load") {
            return Some("LOAD");
        }
        if is(b"set") && st.session_authorization {
            return Some("SET SESSION AUTHORIZATION");
        }
        None
    };
    loop {
        let token = lexer.next();
        match token {
            None | Some(Token::Semicolon) => {
                if words > 0 {
                    found = found.or(finish(first, &st));
                }
                if token.is_none() || found.is_some() {
                    return found;
                }
                first = &[];
                words = 0;
                st = Statement::default();
            }
            Some(Token::Word(w)) => {
                let is = |x: &[u8]| w.eq_ignore_ascii_case(x);
                if words == 0 {
                    first = w;
                } else if words <= 4 && !st.object && (is(b"temp") || is(b"temporary")) {
                    st.temp = true;
                } else if words == 1 && is(b"transaction") {
                    st.prepare_transaction = true;
                } else if words == 2 && is(b"authorization") && st.second_session {
                    st.session_authorization = true;
                }
                if is(b"table") || is(b"view") || is(b"sequence") {
                    st.object = true;
                }
                if words == 1 && is(b"session") {
                    st.second_session = true;
                }
                if is(b"hold") && st.last_with {
                    st.with_hold = true;
                }
                if is(b"drop") && st.last_commit {
                    st.on_commit_drop = true;
                }
                if is(b"pg_advisory_lock")
                    || is(b"pg_advisory_lock_shared")
                    || is(b"pg_try_advisory_lock")
                    || is(b"pg_try_advisory_lock_shared")
                {
                    st.advisory = true;
                }
                st.last_with = is(b"with");
                st.last_commit = is(b"commit") && st.last_on;
                st.last_on = is(b"on");
                words += 1;
            }
            Some(Token::Other) => {
                if words == 0 {
                    words = 1;
                }
                st.last_with = false;
                st.last_commit = false;
                st.last_on = false;
            }
        }
    }
}

/// Whether `sql` may end session state (UNLISTEN, an advisory unlock, DROP, CLOSE,
/// DEALLOCATE, DISCARD): a pinned client's transaction that may have is followed by a
/// check whether anything is left.
pub fn may_end_session_state(sql: &[u8]) -> bool {
    const NEEDLES: &[&[u8]] = &[
        b"unlisten",
        b"unlock",
        b"drop",
        b"close",
        b"deallocate",
        b"discard",
    ];
    NEEDLES.iter().any(|n| contains_ci(sql, n))
}

/// Whether the state `what` ([`session_state`]'s answer) can be gone while the session
/// goes on: a loaded library and a changed session authorization cannot be seen to go.
pub fn can_end(what: &str) -> bool {
    what != "LOAD" && what != "SET SESSION AUTHORIZATION"
}

/// The query that counts what session state a server connection holds (temporary
/// relations, advisory locks, channels listened to, open cursors, SQL-level prepared
/// statements the client made under its own names): 0 means none. pgtide's own
/// statements (`pgtide_<n>`, SQL-level ones included) are shared, not session state.
pub const LEFT_QUERY: &str = "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) + (SELECT count(*) FROM pg_listening_channels()) + (SELECT count(*) FROM pg_cursors) + (SELECT count(*) FROM pg_prepared_statements WHERE from_sql AND name !~ '^pgtide_[0-9]+$') + (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())";

#[derive(Default)]
struct Statement {
    temp: bool,
    /// TABLE / VIEW / SEQUENCE was seen: a later `temp` is a name.
    object: bool,
    on_commit_drop: bool,
    advisory: bool,
    with_hold: bool,
    prepare_transaction: bool,
    second_session: bool,
    session_authorization: bool,
    last_with: bool,
    last_on: bool,
    last_commit: bool,
}

#[cfg(test)]
mod tests {
    use super::session_state;

    #[test]
    fn finds_what_outlives_the_transaction() {
        let state = [
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t as select 1",
            "CREATE GLOBAL TEMPORARY TABLE t (a int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "create temp sequence s",
            "SELECT pg_advisory_lock(1)",
            "select pg_catalog.pg_try_advisory_lock_shared(1, 2)",
            "LISTEN ch",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "declare c no scroll cursor with hold for select 1",
            "PREPARE p AS SELECT 1",
            "LOAD 'auto_explain'",
            "SET SESSION AUTHORIZATION alice",
            "SELECT 1; CREATE TEMP TABLE t (a int)",
        ];
        for sql in state {
            assert!(session_state(sql.as_bytes()).is_some(), "{sql}");
        }
    }

    #[test]
    fn leaves_transaction_scoped_and_ordinary_statements_alone() {
        let fine = [
            "SELECT 1",
            "SELECT * FROM temperatures WHERE hold = 1",
            "CREATE TABLE temp (a int)",
            "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_try_advisory_xact_lock(1)",
            "SELECT pg_advisory_unlock(1)",
            "DECLARE c CURSOR FOR SELECT 1",
            "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
            "PREPARE TRANSACTION 'x'",
            "SELECT 'LISTEN ch'",
            "-- LISTEN ch\nSELECT 1",
            "UPDATE t SET loaded = true",
            "SET ROLE alice",
            "SET SESSION statement_timeout = 0",
            "NOTIFY ch",
            "UNLISTEN *",
        ];
        for sql in fine {
            assert_eq!(session_state(sql.as_bytes()), None, "{sql}");
        }
    }
}
