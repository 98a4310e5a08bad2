//! The read/write classifier: decides whether a SQL string may run on a streaming replica
//! or must go to the primary, and says why ([`classify`]); and recognizes the statements
//! that start a transaction or set its access mode ([`transaction_mode`]).
//!
//! Both work on the bytes of the query with the non-allocating [`Lexer`], so comments,
//! string literals (`E''` escapes included), quoted identifiers and dollar-quoted bodies
//! never count as keywords. Nothing is allocated per call. The classifier is conservative:
//! whatever it does not recognize, or cannot lex to the end (an unterminated string or
//! comment), goes to the primary. It keeps no state between calls, so one statement's
//! route never leaks into the next.
//!
//! What goes where (DESIGN.md, Routing):
//! - Replica: `SELECT`, `VALUES`, `TABLE`, `SHOW`, a `WITH` without data-modifying parts,
//!   `EXPLAIN` without `ANALYZE` (nothing is executed), `EXPLAIN ANALYZE` of a read,
//!   `COPY ... TO` (including `COPY (SELECT ...) TO STDOUT`), and session settings
//!   (`SET`, `RESET`, `DISCARD`; see [`Reason::SessionSetting`]).
//! - Primary: DML, DDL, locking reads (`FOR UPDATE/SHARE/NO KEY UPDATE/KEY SHARE`),
//!   `SELECT ... INTO`, writable CTEs, calls of functions that write or need the primary
//!   (`nextval`, `setval`, `currval`, `lastval`, every advisory lock function,
//!   `txid_current`, `pg_current_xact_id`, `set_config`, `pg_notify`, large-object writes,
//!   WAL and replication-slot functions, plus [`ClassifyOptions::write_functions`]),
//!   `CALL`, `DO`, `LOCK`, `REFRESH MATERIALIZED VIEW`, `LISTEN`/`UNLISTEN`/`NOTIFY`,
//!   `COPY ... FROM`, `PREPARE`/`EXECUTE`/`DEALLOCATE`, cursors, maintenance commands,
//!   transaction control, and anything unknown.
//! - A string of several statements goes to the primary if any of them must.
//! - A leading `/* pgtide: primary */` or `/* pgtide: replica */` comment (or the same as a
//!   `--` line comment; case and spaces do not matter) overrides all of this when
//!   [`ClassifyOptions::hints`] is on.

use std::fmt;

use super::lexer::{Lexer, Token};

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Primary,
    Replica,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Primary => "primary",
            Route::Replica => "replica",
        })
    }
}

/// The name of a function that writes, as found in the query (lower-cased, at most 63
/// bytes like a PostgreSQL identifier). Kept inline so a [`Decision`] stays `Copy` and
/// classification allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FnName {
    len: u8,
    bytes: [u8; 63],
}

impl FnName {
    const fn new(name: &[u8]) -> Self {
        let mut bytes = [0u8; 63];
        let len = if name.len() < 63 { name.len() } else { 63 };
        let mut i = 0;
        while i < len {
            bytes[i] = name[i].to_ascii_lowercase();
            i += 1;
        }
        FnName {
            len: len as u8,
            bytes,
        }
    }

    /// The name, lower-cased (lossy if it is not UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Display for FnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Debug for FnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FnName({self})")
    }
}

/// Why a statement goes where it goes. `Display` gives the short human reason that
/// `pgtide route` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // ---- replica ----
    /// A `SELECT` (or a parenthesized one) with nothing that writes or locks.
    ReadOnlySelect,
    /// A `WITH` whose parts and main statement only read.
    ReadOnlyWith,
    /// A `VALUES` list.
    Values,
    /// `TABLE name`.
    Table,
    /// `SHOW`.
    Show,
    /// `EXPLAIN` without `ANALYZE`: the statement is planned, not run, so even a DML
    /// statement is fine on a hot standby.
    Explain,
    /// `EXPLAIN ANALYZE` of a statement that only reads.
    ExplainAnalyzeRead,
    /// `COPY ... TO` (a table or a read-only query, to STDOUT, a file or a program).
    CopyTo,
    /// `SET`, `RESET`, `DISCARD`. These write nothing and run on a hot standby; which
    /// server connection carries the client's settings is the session layer's job (it
    /// tracks them and replays them on every server it checks out), so sending them to the
    /// primary would gain nothing and take a primary connection. `SET TRANSACTION` is
    /// different: it is [`Reason::TransactionControl`].
    SessionSetting,
    /// Only whitespace, comments and semicolons: any server can answer it.
    Empty,
    /// A leading `/* pgtide: replica */` comment.
    HintReplica,

    // ---- primary ----
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `UPSERT`, `TRUNCATE` (the keyword), or the
    /// main statement of a `WITH`.
    Dml(&'static str),
    /// A data-modifying statement inside `WITH` (the keyword).
    WritableCte(&'static str),
    /// A call of a function that writes or needs the primary.
    WriteFunction(FnName),
    /// A locking clause (`"FOR UPDATE"`, `"FOR SHARE"`, `"FOR NO KEY UPDATE"`,
    /// `"FOR KEY SHARE"`).
    LockingRead(&'static str),
    /// `SELECT ... INTO` creates a table.
    SelectInto,
    /// `EXPLAIN ANALYZE` runs the statement, and it writes.
    ExplainAnalyzeWrite,
    /// `CREATE`, `ALTER`, `DROP`, `COMMENT`, `GRANT`, `REVOKE`, `SECURITY LABEL`,
    /// `IMPORT FOREIGN SCHEMA`, `REASSIGN OWNED` (the keyword).
    Ddl(&'static str),
    /// `VACUUM`, `ANALYZE`, `CLUSTER`, `REINDEX`, `CHECKPOINT` (the keyword).
    Maintenance(&'static str),
    /// `COPY ... FROM`.
    CopyFrom,
    /// `LISTEN`, `UNLISTEN` or `NOTIFY` (the keyword); not allowed on a hot standby.
    ListenNotify(&'static str),
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `SET TRANSACTION`,
    /// ... The session layer routes explicit transactions as a whole (see
    /// [`transaction_mode`]); taken alone they go to the primary.
    TransactionControl,
    /// `PREPARE`, `EXECUTE`, `DEALLOCATE`, `EXPLAIN EXECUTE` (the keyword): the statement
    /// that will run is not in this text, so it cannot be classified.
    PreparedStatement(&'static str),
    /// `CALL` of a procedure.
    Call,
    /// A `DO` block.
    Do,
    /// `LOCK TABLE`.
    Lock,
    /// `REFRESH MATERIALIZED VIEW`.
    RefreshMaterializedView,
    /// `DECLARE`, `FETCH`, `MOVE`, `CLOSE` (the keyword): a cursor lives on one server.
    Cursor(&'static str),
    /// A statement the classifier does not recognize, or malformed (unbalanced
    /// parentheses).
    CouldNotClassify,
    /// The text ends inside a string, quoted identifier, dollar quote or comment.
    Unterminated,
    /// A leading `/* pgtide: primary */` comment.
    HintPrimary,
}

impl Reason {
    /// Where a statement with this reason goes.
    pub fn route(&self) -> Route {
        use Reason::*;
        match self {
            ReadOnlySelect | ReadOnlyWith | Values | Table | Show | Explain
            | ExplainAnalyzeRead | CopyTo | SessionSetting | Empty | HintReplica => Route::Replica,
            _ => Route::Primary,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Reason::*;
        match self {
            ReadOnlySelect => f.write_str("read-only SELECT"),
            ReadOnlyWith => f.write_str("read-only WITH"),
            Values => f.write_str("read-only VALUES"),
            Table => f.write_str("read-only TABLE"),
            Show => f.write_str("SHOW"),
            Explain => f.write_str("EXPLAIN without ANALYZE"),
            ExplainAnalyzeRead => f.write_str("EXPLAIN ANALYZE of a read"),
            CopyTo => f.write_str("COPY TO"),
            SessionSetting => f.write_str("session setting"),
            Empty => f.write_str("empty query"),
            HintReplica => f.write_str("hint: replica"),
            Dml(k) => write!(f, "DML ({k})"),
            WritableCte(k) => write!(f, "writable CTE ({k} inside WITH)"),
            WriteFunction(name) => write!(f, "function {name} writes"),
            LockingRead(clause) => write!(f, "SELECT ... {clause}"),
            SelectInto => f.write_str("SELECT ... INTO"),
            ExplainAnalyzeWrite => f.write_str("EXPLAIN ANALYZE of a write"),
            Ddl(k) => write!(f, "DDL ({k})"),
            Maintenance(k) => write!(f, "maintenance ({k})"),
            CopyFrom => f.write_str("COPY FROM"),
            ListenNotify(k) => write!(f, "LISTEN/NOTIFY ({k})"),
            TransactionControl => f.write_str("transaction control"),
            PreparedStatement(k) => {
                write!(f, "prepared statement ({k}): the statement is not visible")
            }
            Call => f.write_str("CALL of a procedure"),
            Do => f.write_str("DO block"),
            Lock => f.write_str("LOCK TABLE"),
            RefreshMaterializedView => f.write_str("REFRESH MATERIALIZED VIEW"),
            Cursor(k) => write!(f, "cursor ({k}) lives on one server"),
            CouldNotClassify => f.write_str("could not classify"),
            Unterminated => f.write_str(
                "could not classify (unterminated string, quoted identifier or comment)",
            ),
            HintPrimary => f.write_str("hint: primary"),
        }
    }
}

/// The classifier's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    pub route: Route,
    pub reason: Reason,
    /// 1-based index of the last statement examined: for `Primary`, the statement that
    /// decided it (the classifier stops there); for `Replica`, the number of statements.
    /// 0 for a hint or an empty query.
    pub statement: u32,
}

impl Decision {
    fn new(reason: Reason, statement: u32) -> Self {
        Decision {
            route: reason.route(),
            reason,
            statement,
        }
    }

    /// True when a write was found after one or more statements that only read.
    pub fn is_multi_statement_write(&self) -> bool {
        self.route == Route::Primary && self.statement > 1
    }
}

impl fmt::Display for Decision {
    /// `primary: writable CTE (DELETE inside WITH)`, `replica: read-only SELECT`,
    /// `primary: multi-statement with a write (statement 2: DML (DELETE))`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_multi_statement_write() {
            write!(
                f,
                "{}: multi-statement with a write (statement {}: {})",
                self.route, self.statement, self.reason
            )
        } else {
            write!(f, "{}: {}", self.route, self.reason)
        }
    }
}

/// Knobs of the classifier (from the config).
#[derive(Debug, Clone, Copy)]
pub struct ClassifyOptions<'a> {
    /// Functions that write, in addition to the built-in ones: lower-case names, either
    /// bare (`"audit_log"`, matching any schema) or schema-qualified (`"app.bump"`,
    /// matching only that qualified call).
    pub write_functions: &'a [String],
    /// Whether `/* pgtide: primary|replica */` hints are honoured.
    pub hints: bool,
}

impl Default for ClassifyOptions<'_> {
    fn default() -> Self {
        ClassifyOptions {
            write_functions: &[],
            hints: true,
        }
    }
}

/// Classifies `sql` (one or more statements, as sent in a Query or Parse message).
pub fn classify(sql: &[u8], opts: &ClassifyOptions) -> Decision {
    if opts.hints {
        if let Some(route) = leading_hint(sql) {
            let reason = match route {
                Route::Primary => Reason::HintPrimary,
                Route::Replica => Reason::HintReplica,
            };
            return Decision::new(reason, 0);
        }
    }
    let mut cx = Classifier {
        toks: Toks::new(sql),
        opts,
    };
    let mut n = 0u32;
    let mut first_read = None;
    while let Some(first) = cx.toks.next() {
        if first == Tok::Semi {
            continue;
        }
        n += 1;
        match cx.statement(first, false) {
            Outcome::Write(reason) => return Decision::new(reason, n),
            Outcome::Read(reason) => {
                first_read.get_or_insert(reason);
            }
        }
    }
    if cx.toks.lx.unterminated() {
        return Decision::new(Reason::Unterminated, n.max(1));
    }
    Decision::new(first_read.unwrap_or(Reason::Empty), n)
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a [u8]),
    /// A quoted identifier, without its quotes.
    Quoted(&'a [u8]),
    LParen,
    RParen,
    Dot,
    Comma,
    Semi,
    /// Anything else, as written (literals, operators, single digits, parameters).
    Other(&'a [u8]),
}

struct Toks<'a> {
    lx: Lexer<'a>,
}

impl<'a> Toks<'a> {
    fn new(sql: &'a [u8]) -> Self {
        Toks {
            lx: Lexer::new(sql),
        }
    }

    fn next(&mut self) -> Option<Tok<'a>> {
        Some(match self.lx.next()? {
            Token::Word(w) => Tok::Word(w),
            Token::Semicolon => Tok::Semi,
            Token::Other => match self.lx.token_text() {
                b"(" => Tok::LParen,
                b")" => Tok::RParen,
                b"." => Tok::Dot,
                b"," => Tok::Comma,
                t @ [b'"', inner @ .., b'"'] if t.len() >= 2 => Tok::Quoted(inner),
                t => Tok::Other(t),
            },
        })
    }

    /// Consumes the rest of the statement (through `;`).
    fn skip_statement(&mut self) {
        while let Some(t) = self.next() {
            if t == Tok::Semi {
                return;
            }
        }
    }
}

fn is(w: &[u8], kw: &[u8]) -> bool {
    w.eq_ignore_ascii_case(kw)
}

fn is_word(t: Option<Tok>, kw: &[u8]) -> bool {
    matches!(t, Some(Tok::Word(w)) if is(w, kw))
}

/// Lower-cases a keyword into `buf` for matching; words longer than any keyword give "".
fn lower<'b>(w: &[u8], buf: &'b mut [u8; 16]) -> &'b [u8] {
    if w.len() > buf.len() {
        return b"";
    }
    for (d, s) in buf.iter_mut().zip(w) {
        *d = s.to_ascii_lowercase();
    }
    &buf[..w.len()]
}

// ---------------------------------------------------------------------------------------
// Statements

enum Outcome {
    Read(Reason),
    Write(Reason),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    Select,
    With,
    Values,
    Table,
    Copy,
}

struct Classifier<'a, 'o> {
    toks: Toks<'a>,
    opts: &'o ClassifyOptions<'o>,
}

impl<'a> Classifier<'a, '_> {
    /// Classifies the statement starting with `first`, consuming it through its `;` when
    /// it reads (a write stops the whole classification, so the rest does not matter).
    fn statement(&mut self, first: Tok<'a>, in_explain: bool) -> Outcome {
        use Outcome::{Read, Write};
        use Reason::*;
        let w = match first {
            Tok::Word(w) => w,
            Tok::LParen => return self.scan(Scan::Select, 1, Tok::LParen),
            _ => return Write(CouldNotClassify),
        };
        let mut buf = [0u8; 16];
        match lower(w, &mut buf) {
            b"select" => self.scan(Scan::Select, 0, first),
            b"with" => self.scan(Scan::With, 0, first),
            b"values" => self.scan(Scan::Values, 0, first),
            b"table" => self.scan(Scan::Table, 0, first),
            b"show" => {
                self.toks.skip_statement();
                Read(Show)
            }
            b"explain" if !in_explain => self.explain(),
            b"copy" => self.scan(Scan::Copy, 0, first),
            b"insert" => Write(Dml("INSERT")),
            b"update" => Write(Dml("UPDATE")),
            b"delete" => Write(Dml("DELETE")),
            b"merge" => Write(Dml("MERGE")),
            b"upsert" => Write(Dml("UPSERT")),
            b"truncate" => Write(Dml("TRUNCATE")),
            b"create" => Write(Ddl("CREATE")),
            b"alter" => Write(Ddl("ALTER")),
            b"drop" => Write(Ddl("DROP")),
            b"comment" => Write(Ddl("COMMENT")),
            b"grant" => Write(Ddl("GRANT")),
            b"revoke" => Write(Ddl("REVOKE")),
            b"security" => Write(Ddl("SECURITY LABEL")),
            b"import" => Write(Ddl("IMPORT FOREIGN SCHEMA")),
            b"reassign" => Write(Ddl("REASSIGN OWNED")),
            b"vacuum" => Write(Maintenance("VACUUM")),
            b"analyze" | b"analyse" => Write(Maintenance("ANALYZE")),
            b"cluster" => Write(Maintenance("CLUSTER")),
            b"reindex" => Write(Maintenance("REINDEX")),
            b"checkpoint" => Write(Maintenance("CHECKPOINT")),
            b"call" => Write(Call),
            b"do" => Write(Do),
            b"lock" => Write(Lock),
            b"refresh" => Write(RefreshMaterializedView),
            b"listen" => Write(ListenNotify("LISTEN")),
            b"unlisten" => Write(ListenNotify("UNLISTEN")),
            b"notify" => Write(ListenNotify("NOTIFY")),
            b"prepare" => {
                if is_word(self.toks.next(), b"transaction") {
                    Write(TransactionControl)
                } else {
                    Write(PreparedStatement("PREPARE"))
                }
            }
            b"execute" => Write(PreparedStatement("EXECUTE")),
            b"deallocate" => Write(PreparedStatement("DEALLOCATE")),
            b"begin" | b"start" | b"commit" | b"end" | b"rollback" | b"abort" | b"savepoint"
            | b"release" => Write(TransactionControl),
            b"declare" => Write(Cursor("DECLARE")),
            b"fetch" => Write(Cursor("FETCH")),
            b"move" => Write(Cursor("MOVE")),
            b"close" => Write(Cursor("CLOSE")),
            b"set" => {
                let next = self.toks.next();
                if is_word(next, b"transaction") {
                    return Write(TransactionControl);
                }
                if next != Some(Tok::Semi) {
                    self.toks.skip_statement();
                }
                Read(SessionSetting)
            }
            b"reset" | b"discard" => {
                self.toks.skip_statement();
                Read(SessionSetting)
            }
            _ => Write(CouldNotClassify),
        }
    }

    /// After `EXPLAIN`: its options, then the statement.
    fn explain(&mut self) -> Outcome {
        let mut analyze = false;
        let mut t = self.toks.next();
        if t == Some(Tok::LParen) {
            // EXPLAIN ( option [ value ] [, ...] ) statement
            loop {
                let name = match self.toks.next() {
                    Some(Tok::RParen) => break,
                    Some(Tok::Comma) => continue,
                    Some(Tok::Word(w)) => w,
                    _ => return Outcome::Write(Reason::CouldNotClassify),
                };
                let is_analyze = is(name, b"analyze") || is(name, b"analyse");
                match self.toks.next() {
                    Some(Tok::Comma) => analyze |= is_analyze,
                    Some(Tok::RParen) => {
                        analyze |= is_analyze;
                        break;
                    }
                    Some(Tok::Word(v)) | Some(Tok::Other(v)) => {
                        if is_analyze {
                            analyze = parse_bool(v).unwrap_or(true);
                        }
                    }
                    _ => return Outcome::Write(Reason::CouldNotClassify),
                }
            }
            t = self.toks.next();
        } else {
            // EXPLAIN [ ANALYZE ] [ VERBOSE ] statement
            while let Some(Tok::Word(w)) = t {
                if is(w, b"analyze") || is(w, b"analyse") {
                    analyze = true;
                } else if !is(w, b"verbose") {
                    break;
                }
                t = self.toks.next();
            }
        }
        let Some(first) = t.filter(|t| *t != Tok::Semi) else {
            return Outcome::Write(Reason::CouldNotClassify);
        };
        if is_word(Some(first), b"explain") {
            return Outcome::Write(Reason::CouldNotClassify);
        }
        if is_word(Some(first), b"execute") {
            return Outcome::Write(Reason::PreparedStatement("EXPLAIN EXECUTE"));
        }
        if !analyze {
            // Planned, not run: nothing in it executes.
            self.toks.skip_statement();
            return Outcome::Read(Reason::Explain);
        }
        match self.statement(first, true) {
            Outcome::Read(_) => Outcome::Read(Reason::ExplainAnalyzeRead),
            Outcome::Write(Reason::CouldNotClassify) => Outcome::Write(Reason::CouldNotClassify),
            Outcome::Write(_) => Outcome::Write(Reason::ExplainAnalyzeWrite),
        }
    }

    /// Scans a query that reads unless something in it writes or locks: write functions,
    /// locking clauses, `INTO`, data-modifying statements after `(` or inside `WITH`;
    /// for `COPY`, the `FROM`/`TO` at the top level decides.
    fn scan(&mut self, mode: Scan, mut depth: i32, first: Tok<'a>) -> Outcome {
        use Outcome::{Read, Write};
        let mut in_with = mode == Scan::With;
        // The three tokens before the current one, most recent first.
        let mut prev = [first, Tok::Semi, Tok::Semi];
        // Progress through FOR [NO] KEY UPDATE|SHARE: 1 after FOR, 2 after FOR NO,
        // 3 after FOR NO KEY, 4 after FOR KEY.
        let mut lock = 0u8;
        while let Some(t) = self.toks.next() {
            match t {
                Tok::Semi => break,
                Tok::LParen => {
                    if let Some(name) = self.write_function(&prev) {
                        return Write(Reason::WriteFunction(name));
                    }
                    depth += 1;
                }
                Tok::RParen => {
                    depth -= 1;
                    if depth < 0 {
                        return Write(Reason::CouldNotClassify);
                    }
                }
                Tok::Word(w) => {
                    let step = match lock {
                        1 if is(w, b"update") => return Write(Reason::LockingRead("FOR UPDATE")),
                        1 if is(w, b"share") => return Write(Reason::LockingRead("FOR SHARE")),
                        1 if is(w, b"no") => 2,
                        1 if is(w, b"key") => 4,
                        2 if is(w, b"key") => 3,
                        3 if is(w, b"update") => {
                            return Write(Reason::LockingRead("FOR NO KEY UPDATE"))
                        }
                        4 if is(w, b"share") => return Write(Reason::LockingRead("FOR KEY SHARE")),
                        _ => 0,
                    };
                    lock = if step == 0 && is(w, b"for") { 1 } else { step };
                    if lock == 0 {
                        if let Some(outcome) = self.word(mode, w, depth, prev[0], &mut in_with) {
                            return outcome;
                        }
                    }
                }
                _ => {}
            }
            if !matches!(t, Tok::Word(_)) {
                lock = 0;
            }
            prev = [t, prev[0], prev[1]];
        }
        if depth != 0 {
            return Write(Reason::CouldNotClassify);
        }
        Read(match mode {
            Scan::Select => Reason::ReadOnlySelect,
            Scan::With => Reason::ReadOnlyWith,
            Scan::Values => Reason::Values,
            Scan::Table => Reason::Table,
            // COPY with neither TO nor FROM at the top level is malformed.
            Scan::Copy => return Write(Reason::CouldNotClassify),
        })
    }

    /// One word of a scanned query (not part of a locking clause).
    fn word(
        &mut self,
        mode: Scan,
        w: &[u8],
        depth: i32,
        prev: Tok<'a>,
        in_with: &mut bool,
    ) -> Option<Outcome> {
        use Outcome::{Read, Write};
        let mut buf = [0u8; 16];
        let dml = match lower(w, &mut buf) {
            b"into" => return Some(Write(Reason::SelectInto)),
            b"with" => {
                *in_with = true;
                return None;
            }
            b"from" if mode == Scan::Copy && depth == 0 => return Some(Write(Reason::CopyFrom)),
            b"to" if mode == Scan::Copy && depth == 0 => {
                // The rest is the destination and options.
                self.toks.skip_statement();
                return Some(Read(Reason::CopyTo));
            }
            b"insert" => "INSERT",
            b"update" => "UPDATE",
            b"delete" => "DELETE",
            b"merge" => "MERGE",
            _ => return None,
        };
        // A data-modifying statement: inside WITH, or in parentheses (`COPY (DELETE ...
        // RETURNING *) TO STDOUT`). Elsewhere these words are column names.
        if *in_with && depth > 0 {
            Some(Write(Reason::WritableCte(dml)))
        } else if *in_with || prev == Tok::LParen {
            Some(Write(Reason::Dml(dml)))
        } else {
            None
        }
    }

    /// At `(`: the function being called, when it is one that writes.
    fn write_function(&self, prev: &[Tok<'a>; 3]) -> Option<FnName> {
        let (name, quoted) = match prev[0] {
            Tok::Word(w) => (w, false),
            Tok::Quoted(w) => (w, true),
            _ => return None,
        };
        let qualifier = match (prev[1], prev[2]) {
            (Tok::Dot, Tok::Word(q) | Tok::Quoted(q)) => Some(q),
            _ => None,
        };
        let eq = |a: &[u8], b: &[u8]| if quoted { a == b } else { is(a, b) };
        if is_builtin_write_function(name, quoted) {
            return Some(FnName::new(name));
        }
        for f in self.opts.write_functions {
            let f = f.as_bytes();
            let hit = match f.iter().rposition(|&c| c == b'.') {
                Some(dot) => qualifier.is_some_and(|q| is(q, &f[..dot])) && eq(name, &f[dot + 1..]),
                None => eq(name, f),
            };
            if hit {
                return Some(FnName::new(name));
            }
        }
        None
    }
}

/// Built-in functions that write or only work on the primary.
const WRITE_FUNCTIONS: &[&[u8]] = &[
    b"nextval",
    b"setval",
    // currval and lastval read session state left by nextval, which ran on the primary.
    b"currval",
    b"lastval",
    b"txid_current",
    b"txid_current_if_assigned",
    b"pg_current_xact_id",
    b"pg_current_xact_id_if_assigned",
    b"set_config",
    b"pg_notify",
    b"lo_creat",
    b"lo_create",
    b"lo_import",
    b"lo_unlink",
    b"lo_open",
    b"lo_write",
    b"lowrite",
    b"lo_put",
    b"lo_from_bytea",
    b"lo_truncate",
    b"lo_truncate64",
    b"pg_current_wal_lsn",
    b"pg_current_wal_insert_lsn",
    b"pg_current_wal_flush_lsn",
    b"pg_switch_wal",
    b"pg_create_restore_point",
    b"pg_create_logical_replication_slot",
    b"pg_create_physical_replication_slot",
    b"pg_drop_replication_slot",
    b"pg_logical_slot_get_changes",
    b"pg_logical_slot_get_binary_changes",
    b"pg_replication_slot_advance",
    b"dblink_exec",
];

/// Prefixes of built-in function families that write: every advisory lock function.
const WRITE_FUNCTION_PREFIXES: &[&[u8]] = &[b"pg_advisory_", b"pg_try_advisory_"];

fn is_builtin_write_function(name: &[u8], quoted: bool) -> bool {
    let eq = |a: &[u8], b: &[u8]| if quoted { a == b } else { is(a, b) };
    WRITE_FUNCTIONS.iter().any(|f| eq(name, f))
        || WRITE_FUNCTION_PREFIXES
            .iter()
            .any(|p| name.len() > p.len() && eq(&name[..p.len()], p))
}

// ---------------------------------------------------------------------------------------
// Hints

/// The route of a `pgtide: primary|replica` hint in the comments before the first token.
fn leading_hint(sql: &[u8]) -> Option<Route> {
    let mut i = 0;
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        let rest = &sql[i..];
        let (body, len) = if rest.starts_with(b"/*") {
            let mut depth = 0usize;
            let mut j = 0;
            loop {
                if j + 1 >= rest.len() {
                    return None; // unterminated
                }
                if rest[j] == b'/' && rest[j + 1] == b'*' {
                    depth += 1;
                    j += 2;
                } else if rest[j] == b'*' && rest[j + 1] == b'/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            (&rest[2..j - 2], j)
        } else if rest.starts_with(b"--") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            (&rest[2..end], end)
        } else {
            return None;
        };
        if let Some(route) = parse_hint(body) {
            return Some(route);
        }
        i += len;
    }
}

/// `pgtide: primary` / `pgtide: replica`, any case, spaces allowed around the colon.
fn parse_hint(body: &[u8]) -> Option<Route> {
    let body = body.trim_ascii();
    if body.len() < 6 || !is(&body[..6], b"pgtide") {
        return None;
    }
    let rest = body[6..].trim_ascii_start();
    let value = rest.strip_prefix(b":")?.trim_ascii();
    if is(value, b"primary") {
        Some(Route::Primary)
    } else if is(value, b"replica") {
        Some(Route::Replica)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Transaction modes

/// What kind of statement [`transaction_mode`] recognized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// `BEGIN` / `START TRANSACTION` (with its modes, and those of a `SET TRANSACTION`
    /// that directly follows it in the same string).
    Begin,
    /// `SET TRANSACTION ...` or `SET transaction_read_only = ...`: the current transaction.
    SetTransaction,
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION ...` or
    /// `SET default_transaction_read_only = ...` (and the isolation/deferrable defaults):
    /// the session's default for later transactions.
    SetSessionDefault,
    /// `RESET default_transaction_read_only`, `SET default_transaction_... TO DEFAULT`,
    /// `RESET ALL`, `DISCARD ALL`: the session default goes back to its value at
    /// connection start.
    ResetSessionDefault,
}

/// `ISOLATION LEVEL ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

/// A statement that starts a transaction or sets transaction modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxStart {
    pub kind: TxKind,
    /// `Some(true)` for READ ONLY, `Some(false)` for READ WRITE, `None` when not said (the
    /// session default applies).
    pub read_only: Option<bool>,
    pub isolation: Option<Isolation>,
    pub deferrable: Option<bool>,
}

impl TxStart {
    fn new(kind: TxKind) -> Self {
        TxStart {
            kind,
            read_only: None,
            isolation: None,
            deferrable: None,
        }
    }

    /// Whether the statement starts a transaction block.
    pub fn starts_transaction(&self) -> bool {
        self.kind == TxKind::Begin
    }

    /// Whether the transaction is read-only, given the session's
    /// `default_transaction_read_only`.
    pub fn is_read_only(&self, session_default: bool) -> bool {
        self.read_only.unwrap_or(session_default)
    }

    /// Whether a transaction with these modes may run on a hot standby: read-only and not
    /// SERIALIZABLE (which a standby refuses).
    pub fn replica_ok(&self, session_default_read_only: bool) -> bool {
        self.is_read_only(session_default_read_only)
            && self.isolation != Some(Isolation::Serializable)
    }
}

/// Recognizes the first statement of `sql` when it starts a transaction or sets
/// transaction modes; `None` for anything else (or a malformed one, which PostgreSQL will
/// reject). When `BEGIN` is directly followed by `SET TRANSACTION ...` in the same string,
/// the modes of both are merged.
pub fn transaction_mode(sql: &[u8]) -> Option<TxStart> {
    let mut toks = Toks::new(sql);
    let mut first = toks.next();
    while first == Some(Tok::Semi) {
        first = toks.next();
    }
    let Some(Tok::Word(w)) = first else {
        return None;
    };
    let mut buf = [0u8; 16];
    let mut tx = match lower(w, &mut buf) {
        b"begin" => {
            let mut t = toks.next();
            if is_word(t, b"work") || is_word(t, b"transaction") {
                t = toks.next();
            }
            let mut tx = TxStart::new(TxKind::Begin);
            modes(&mut toks, t, &mut tx)?;
            tx
        }
        b"start" => {
            if !is_word(toks.next(), b"transaction") {
                return None;
            }
            let mut tx = TxStart::new(TxKind::Begin);
            let t = toks.next();
            modes(&mut toks, t, &mut tx)?;
            tx
        }
        b"set" => return set_statement(&mut toks),
        b"reset" => {
            let t = toks.next();
            let ends = matches!(toks.next(), None | Some(Tok::Semi));
            match t {
                Some(Tok::Word(v)) if ends && (is(v, b"all") || default_setting(v).is_some()) => {
                    return Some(TxStart::new(TxKind::ResetSessionDefault))
                }
                _ => return None,
            }
        }
        b"discard" => {
            let all = is_word(toks.next(), b"all");
            let ends = matches!(toks.next(), None | Some(Tok::Semi));
            return (all && ends).then(|| TxStart::new(TxKind::ResetSessionDefault));
        }
        _ => return None,
    };
    // BEGIN; SET TRANSACTION READ ONLY; ...
    if is_word(toks.next(), b"set") {
        if let Some(set) = set_statement(&mut toks) {
            if set.kind == TxKind::SetTransaction {
                tx.read_only = set.read_only.or(tx.read_only);
                tx.isolation = set.isolation.or(tx.isolation);
                tx.deferrable = set.deferrable.or(tx.deferrable);
            }
        }
    }
    Some(tx)
}

/// After `SET`.
fn set_statement(toks: &mut Toks) -> Option<TxStart> {
    let mut t = toks.next();
    if is_word(t, b"transaction") {
        let mut tx = TxStart::new(TxKind::SetTransaction);
        let t = toks.next();
        modes(toks, t, &mut tx)?;
        return Some(tx);
    }
    if is_word(t, b"session") {
        t = toks.next();
        if is_word(t, b"characteristics") {
            if !is_word(toks.next(), b"as") || !is_word(toks.next(), b"transaction") {
                return None;
            }
            let mut tx = TxStart::new(TxKind::SetSessionDefault);
            let t = toks.next();
            modes(toks, t, &mut tx)?;
            return Some(tx);
        }
    } else if is_word(t, b"local") {
        t = toks.next();
    }
    // SET [SESSION|LOCAL] name {=|TO} value
    let Some(Tok::Word(name)) = t else {
        return None;
    };
    let (setting, session_default) = match default_setting(name) {
        Some(s) => (s, true),
        None => {
            let prefix = b"transaction_";
            if name.len() <= prefix.len() || !is(&name[..prefix.len()], prefix) {
                return None;
            }
            (default_setting_suffix(&name[prefix.len()..])?, false)
        }
    };
    match toks.next() {
        Some(Tok::Other(b"=")) => {}
        Some(Tok::Word(w)) if is(w, b"to") => {}
        _ => return None,
    }
    let value = match toks.next()? {
        Tok::Word(v) | Tok::Other(v) => v,
        _ => return None,
    };
    if !matches!(toks.next(), None | Some(Tok::Semi)) {
        return None;
    }
    if is(value, b"default") {
        return session_default.then(|| TxStart::new(TxKind::ResetSessionDefault));
    }
    let mut tx = TxStart::new(if session_default {
        TxKind::SetSessionDefault
    } else {
        TxKind::SetTransaction
    });
    match setting {
        Setting::ReadOnly => tx.read_only = Some(parse_bool(value)?),
        Setting::Deferrable => tx.deferrable = Some(parse_bool(value)?),
        Setting::Isolation => tx.isolation = Some(parse_isolation(value)?),
    }
    Some(tx)
}

#[derive(Clone, Copy)]
enum Setting {
    ReadOnly,
    Isolation,
    Deferrable,
}

/// `default_transaction_read_only` and friends.
fn default_setting(name: &[u8]) -> Option<Setting> {
    let prefix = b"default_transaction_";
    if name.len() <= prefix.len() || !is(&name[..prefix.len()], prefix) {
        return None;
    }
    default_setting_suffix(&name[prefix.len()..])
}

fn default_setting_suffix(s: &[u8]) -> Option<Setting> {
    if is(s, b"read_only") {
        Some(Setting::ReadOnly)
    } else if is(s, b"isolation") {
        Some(Setting::Isolation)
    } else if is(s, b"deferrable") {
        Some(Setting::Deferrable)
    } else {
        None
    }
}

/// Transaction modes, starting at `t`, through the end of the statement. `None` when
/// something else is there.
fn modes<'a>(toks: &mut Toks<'a>, mut t: Option<Tok<'a>>, tx: &mut TxStart) -> Option<()> {
    loop {
        let w = match t {
            None | Some(Tok::Semi) => return Some(()),
            Some(Tok::Comma) => {
                t = toks.next();
                continue;
            }
            Some(Tok::Word(w)) => w,
            Some(_) => return None,
        };
        if is(w, b"isolation") {
            if !is_word(toks.next(), b"level") {
                return None;
            }
            let Some(Tok::Word(level)) = toks.next() else {
                return None;
            };
            tx.isolation = Some(if is(level, b"serializable") {
                Isolation::Serializable
            } else if is(level, b"repeatable") && is_word(toks.next(), b"read") {
                Isolation::RepeatableRead
            } else if is(level, b"read") {
                match toks.next() {
                    Some(Tok::Word(x)) if is(x, b"committed") => Isolation::ReadCommitted,
                    Some(Tok::Word(x)) if is(x, b"uncommitted") => Isolation::ReadUncommitted,
                    _ => return None,
                }
            } else {
                return None;
            });
        } else if is(w, b"read") {
            match toks.next() {
                Some(Tok::Word(x)) if is(x, b"only") => tx.read_only = Some(true),
                Some(Tok::Word(x)) if is(x, b"write") => tx.read_only = Some(false),
                _ => return None,
            }
        } else if is(w, b"not") {
            if !is_word(toks.next(), b"deferrable") {
                return None;
            }
            tx.deferrable = Some(false);
        } else if is(w, b"deferrable") {
            tx.deferrable = Some(true);
        } else {
            return None;
        }
        t = toks.next();
    }
}

/// A PostgreSQL boolean setting value (`on`, `true`, `1`, `'yes'`, unique prefixes...).
fn parse_bool(v: &[u8]) -> Option<bool> {
    let v = strip_quotes(v);
    if v.is_empty() {
        return None;
    }
    let prefix_of = |word: &[u8]| v.len() <= word.len() && is(v, &word[..v.len()]);
    if is(v, b"on") || is(v, b"1") || prefix_of(b"true") || prefix_of(b"yes") {
        Some(true)
    } else if (v.len() >= 2 && prefix_of(b"off"))
        || is(v, b"0")
        || prefix_of(b"false")
        || prefix_of(b"no")
    {
        Some(false)
    } else {
        None
    }
}

fn parse_isolation(v: &[u8]) -> Option<Isolation> {
    let v = strip_quotes(v);
    if is(v, b"serializable") {
        Some(Isolation::Serializable)
    } else if is(v, b"repeatable read") {
        Some(Isolation::RepeatableRead)
    } else if is(v, b"read committed") {
        Some(Isolation::ReadCommitted)
    } else if is(v, b"read uncommitted") {
        Some(Isolation::ReadUncommitted)
    } else {
        None
    }
}

fn strip_quotes(v: &[u8]) -> &[u8] {
    match v {
        [b'\'', inner @ .., b'\''] if v.len() >= 2 => inner,
        _ => v,
    }
}

#[cfg(test)]
#[path = "corpus.rs"]
mod corpus;
