//! SQL-level prepared statements: recognizes a statement text that is exactly one
//! `PREPARE name [ ( type [, ...] ) ] AS statement`, `EXECUTE name [ ( arg [, ...] ) ]` or
//! `DEALLOCATE [ PREPARE ] { name | ALL }` (comments, whitespace and trailing semicolons
//! around it allowed), so that transaction mode can keep the client's statement names
//! itself (`crate::prepared`). Pure, over the lexer; only a name that must be unquoted or
//! folded is copied.
//!
//! The name is returned as PostgreSQL sees it: an unquoted name folded to lower case
//! (ASCII, as PostgreSQL does in UTF-8), a quoted one with `""` unescaped, either cut to
//! 63 bytes (NAMEDATALEN - 1) at a character boundary. Anything else — several
//! statements, `U&"..."` names, unterminated strings or comments — is not recognized
//! ([`parse`] gives `None`) and keeps the session-state guard's treatment. A reserved
//! word as the name is a syntax error in PostgreSQL: [`Parsed::Invalid`] says so, and
//! such a text can go to the server as it is (it creates nothing).

use std::borrow::Cow;
use std::ops::Range;

use super::lexer::{contains_ci, Lexer, Token};

/// Which statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prepare,
    Execute,
    Deallocate,
    DeallocateAll,
}

/// One recognized statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    pub kind: Kind,
    /// The statement name as PostgreSQL sees it (empty for `DEALLOCATE ALL`).
    pub name: Cow<'a, [u8]>,
    /// Where the name was written (bytes of the text).
    pub name_span: Range<usize>,
    /// The text after the name, up to the end of its last token (trailing semicolons and
    /// comments left out): a PREPARE's types and statement, an EXECUTE's arguments.
    pub rest: Range<usize>,
}

/// What [`parse`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    Command(Command<'a>),
    /// PREPARE / EXECUTE / DEALLOCATE of a reserved word, or with something after the
    /// name that cannot follow it: PostgreSQL rejects it with a syntax error.
    Invalid,
}

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

/// Keywords that cannot be a statement name (PostgreSQL's reserved and
/// type_func_name keywords; a name is a `ColId`).
const NOT_A_NAME: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Cuts `name` to [`MAX_NAME`] bytes without splitting a UTF-8 character.
fn truncated(name: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut end = MAX_NAME;
    while end > 0 && (name[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    match name {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..end]),
        Cow::Owned(mut v) => {
            v.truncate(end);
            Cow::Owned(v)
        }
    }
}

enum Name<'a> {
    Ok(Cow<'a, [u8]>),
    /// A reserved word, or an empty quoted name.
    Invalid,
    /// Not a name this parser reads.
    Unknown,
}

/// The statement name of the token the lexer returned last.
fn name_of<'a>(token: Token<'a>, lexer: &Lexer<'a>) -> Name<'a> {
    match token {
        Token::Word(w) => {
            if NOT_A_NAME
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
            {
                return Name::Invalid;
            }
            let name = if w.iter().any(u8::is_ascii_uppercase) {
                Cow::Owned(w.to_ascii_lowercase())
            } else {
                Cow::Borrowed(w)
            };
            Name::Ok(truncated(name))
        }
        Token::Other => {
            let text = lexer.token_text();
            if text.len() < 2 || text[0] != b'"' || text[text.len() - 1] != b'"' {
                return Name::Unknown;
            }
            let inner = &text[1..text.len() - 1];
            if inner.is_empty() {
                // PostgreSQL: zero-length delimited identifier.
                return Name::Invalid;
            }
            let name = if inner.windows(2).any(|p| p == b"\"\"") {
                let mut v = Vec::with_capacity(inner.len());
                let mut i = 0;
                while i < inner.len() {
                    v.push(inner[i]);
                    i += if inner[i] == b'"' { 2 } else { 1 };
                }
                Cow::Owned(v)
            } else {
                Cow::Borrowed(inner)
            };
            Name::Ok(truncated(name))
        }
        Token::Semicolon => Name::Unknown,
    }
}

/// Recognizes `sql` as exactly one PREPARE, EXECUTE or DEALLOCATE statement.
pub fn parse(sql: &[u8]) -> Option<Parsed<'_>> {
    if !(contains_ci(sql, b"prepare")
        || contains_ci(sql, b"execute")
        || contains_ci(sql, b"deallocate"))
    {
        return None;
    }
    let mut lexer = Lexer::new(sql);
    let kind = match lexer.next()? {
        Token::Word(w) if w.eq_ignore_ascii_case(b"prepare") => Kind::Prepare,
        Token::Word(w) if w.eq_ignore_ascii_case(b"execute") => Kind::Execute,
        Token::Word(w) if w.eq_ignore_ascii_case(b"deallocate") => Kind::Deallocate,
        _ => return None,
    };
    let mut token = lexer.next();
    if kind == Kind::Deallocate {
        // DEALLOCATE PREPARE name: PREPARE is optional, and is a name when alone.
        if matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(b"prepare")) {
            let mut ahead = Lexer::new(&sql[lexer.token_span().1..]);
            if !matches!(ahead.next(), None | Some(Token::Semicolon)) {
                token = lexer.next();
            }
        }
        if matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(b"all")) {
            let at = lexer.token_span();
            return match tail(lexer) {
                Some(true) => Some(Parsed::Command(Command {
                    kind: Kind::DeallocateAll,
                    name: Cow::Borrowed(&[]),
                    name_span: at.0..at.1,
                    rest: at.1..at.1,
                })),
                Some(false) => Some(Parsed::Invalid),
                None => None,
            };
        }
    }
    let name = match name_of(token?, &lexer) {
        Name::Ok(n) => n,
        Name::Invalid => return Some(Parsed::Invalid),
        Name::Unknown => return None,
    };
    let name_span = {
        let (a, b) = lexer.token_span();
        a..b
    };
    let after = name_span.end;
    let mut end = after;
    // What may follow the name.
    match (kind, lexer.next()) {
        (Kind::Prepare, Some(Token::Word(w))) if w.eq_ignore_ascii_case(b"as") => {}
        (Kind::Prepare | Kind::Execute, Some(Token::Other)) if lexer.token_text() == b"(" => {}
        (Kind::Execute | Kind::Deallocate, None | Some(Token::Semicolon)) => {
            return statement_end(lexer, kind, name, name_span, after..end);
        }
        (Kind::Prepare, _) => return None,
        _ => return Some(Parsed::Invalid),
    }
    end = lexer.token_span().1;
    // The rest of the statement, to its last token.
    loop {
        match lexer.next() {
            None => break,
            Some(Token::Semicolon) => {
                return statement_end(lexer, kind, name, name_span, after..end);
            }
            Some(_) => end = lexer.token_span().1,
        }
    }
    if lexer.unterminated() {
        return None;
    }
    Some(Parsed::Command(Command {
        kind,
        name,
        name_span,
        rest: after..end,
    }))
}

/// After the statement's first semicolon (or its end): only semicolons may follow.
fn statement_end<'a>(
    lexer: Lexer<'a>,
    kind: Kind,
    name: Cow<'a, [u8]>,
    name_span: Range<usize>,
    rest: Range<usize>,
) -> Option<Parsed<'a>> {
    if !only_semicolons(lexer) {
        return None;
    }
    Some(Parsed::Command(Command {
        kind,
        name,
        name_span,
        rest,
    }))
}

fn only_semicolons(mut lexer: Lexer<'_>) -> bool {
    for t in lexer.by_ref() {
        if t != Token::Semicolon {
            return false;
        }
    }
    !lexer.unterminated()
}

/// After `DEALLOCATE ALL`: `Some(true)` when the statement ends there, `Some(false)` when
/// something else follows in the same statement (a syntax error), `None` when another
/// statement follows.
fn tail(mut lexer: Lexer<'_>) -> Option<bool> {
    match lexer.next() {
        None => Some(!lexer.unterminated()),
        Some(Token::Semicolon) => only_semicolons(lexer).then_some(true),
        Some(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(sql: &str) -> Option<(Kind, String, String)> {
        match parse(sql.as_bytes())? {
            Parsed::Command(c) => Some((
                c.kind,
                String::from_utf8_lossy(&c.name).into_owned(),
                sql[c.rest.clone()].to_string(),
            )),
            Parsed::Invalid => Some((Kind::Prepare, "<invalid>".into(), String::new())),
        }
    }

    fn some(kind: Kind, name: &str, rest: &str) -> Option<(Kind, String, String)> {
        Some((kind, name.to_string(), rest.to_string()))
    }

    #[test]
    fn prepare_names_types_and_statement() {
        use Kind::*;
        assert_eq!(
            cmd("PREPARE q AS SELECT $1::int + 1"),
            some(Prepare, "q", " AS SELECT $1::int + 1")
        );
        assert_eq!(
            cmd("prepare Q(int, text) as select $1, $2;"),
            some(Prepare, "q", "(int, text) as select $1, $2")
        );
        assert_eq!(
            cmd("/* c */ PrePare \"My \"\"Q\"\"\" AS SELECT ';' -- trailing\n ;; "),
            some(Prepare, "My \"Q\"", " AS SELECT ';'")
        );
        assert_eq!(
            cmd("-- leading\nPREPARE q AS SELECT 1 /* end */"),
            some(Prepare, "q", " AS SELECT 1")
        );
        assert_eq!(
            cmd("PREPARE transaction AS SELECT 1"),
            some(Prepare, "transaction", " AS SELECT 1")
        );
        assert_eq!(
            cmd("PREPARE q AS SELECT $x$;$x$"),
            some(Prepare, "q", " AS SELECT $x$;$x$")
        );
        let long = "a".repeat(70);
        assert_eq!(
            cmd(&format!("PREPARE {long} AS SELECT 1")),
            some(Prepare, &"a".repeat(63), " AS SELECT 1")
        );
        // Not a single prepared statement: left to the session-state guard.
        for sql in [
            "PREPARE TRANSACTION 'gid'",
            "PREPARE q AS SELECT 1; SELECT 2",
            "SELECT 1; PREPARE q AS SELECT 1",
            "PREPARE U&\"q\" AS SELECT 1",
            "PREPARE q AS SELECT 'unterminated",
            "PREPARE q SELECT 1",
            "PREPARE",
            "SELECT 'prepare q as select 1'",
            "EXPLAIN EXECUTE q",
            "CREATE TABLE t AS EXECUTE q",
        ] {
            assert_eq!(cmd(sql), None, "{sql}");
        }
        assert_eq!(parse(b"PREPARE select AS SELECT 1"), Some(Parsed::Invalid));
        assert_eq!(parse(b"PREPARE \"\" AS SELECT 1"), Some(Parsed::Invalid));
    }

    #[test]
    fn execute_names_and_arguments() {
        use Kind::*;
        assert_eq!(cmd("EXECUTE q"), some(Execute, "q", ""));
        assert_eq!(cmd("execute Q;"), some(Execute, "q", ""));
        assert_eq!(
            cmd("EXECUTE q(1, 'a;b') -- c"),
            some(Execute, "q", "(1, 'a;b')")
        );
        assert_eq!(
            cmd("  EXECUTE \"Q\" ( $$x$$ ) ; ; "),
            some(Execute, "Q", " ( $$x$$ )")
        );
        assert_eq!(cmd("EXECUTE q(1); EXECUTE q(2)"), None);
        assert_eq!(cmd("EXECUTE"), None);
        assert_eq!(parse(b"EXECUTE q 1"), Some(Parsed::Invalid));
        assert_eq!(parse(b"EXECUTE all"), Some(Parsed::Invalid));
    }

    #[test]
    fn deallocate_forms() {
        use Kind::*;
        assert_eq!(cmd("DEALLOCATE q"), some(Deallocate, "q", ""));
        assert_eq!(cmd("deallocate prepare Q;"), some(Deallocate, "q", ""));
        assert_eq!(cmd("DEALLOCATE prepare"), some(Deallocate, "prepare", ""));
        assert_eq!(cmd("DEALLOCATE \"ALL\""), some(Deallocate, "ALL", ""));
        assert_eq!(cmd("DEALLOCATE ALL"), some(DeallocateAll, "", ""));
        assert_eq!(
            cmd("deallocate prepare all ; "),
            some(DeallocateAll, "", "")
        );
        assert_eq!(cmd("DEALLOCATE q; SELECT 1"), None);
        assert_eq!(cmd("DEALLOCATE ALL; SELECT 1"), None);
        assert_eq!(parse(b"DEALLOCATE q r"), Some(Parsed::Invalid));
        assert_eq!(parse(b"DEALLOCATE ALL x"), Some(Parsed::Invalid));
    }
}
