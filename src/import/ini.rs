//! PgBouncer's `pgbouncer.ini` and the connection strings of its `[databases]`,
//! `[users]` and `[peers]` lines, read as PgBouncer 1.25 reads them (`lib/usual/
//! cfparser.c` and `src/loader.c`):
//!
//! - a line whose first non-blank character is `;` or `#` is a comment; both are plain
//!   characters later in a line (`logfile = /var/log/a;b` keeps the `;`);
//! - `[name]` opens a section; `key = value` sets a key, the value running to the end
//!   of the line (trailing blanks removed); a key is letters, digits and `_.-*`, or
//!   anything between single quotes (or, as the documentation says for database
//!   names, double quotes with `""` for one `"`);
//! - `%include file` is not followed: it is reported as unsupported;
//! - a connection string is `key=value` pairs separated by blanks; a value with blanks
//!   is written in single quotes, `''` standing for one `'`; an empty value is an error.
//!
//! Errors carry the 1-based line number.

use std::fmt;

/// One `key = value` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// One `[section]` and its entries, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub line: usize,
    pub entries: Vec<Entry>,
}

/// The sections PgBouncer knows.
pub const SECTIONS: &[&str] = &["databases", "pgbouncer", "users", "peers"];

/// A problem in the file, at a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Reads a quoted name at the start of `s` (`q` is the quote; a doubled `q` stands for
/// one); returns the name and the rest of the line.
fn quoted_key(s: &str, q: char, line: usize) -> Result<(String, &str), ParseError> {
    let mut out = String::new();
    let mut rest = &s[q.len_utf8()..];
    loop {
        let Some(i) = rest.find(q) else {
            return Err(err(line, format!("the name in {q}quotes{q} is not closed")));
        };
        out.push_str(&rest[..i]);
        rest = &rest[i + q.len_utf8()..];
        // PgBouncer's single quotes have no escape; the documented double quotes do.
        if q == '"' && rest.starts_with('"') {
            out.push('"');
            rest = &rest[1..];
        } else {
            return Ok((out, rest));
        }
    }
}

/// Parses the whole file into its sections.
pub fn parse_ini(text: &str) -> Result<Vec<Section>, ParseError> {
    let mut sections: Vec<Section> = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("%include") {
            if rest.starts_with([' ', '\t']) {
                return Err(err(
                    n,
                    format!(
                        "%include {} is not supported by pgtide import; paste the included file's lines here (or import it on its own) and run the import again",
                        rest.trim()
                    ),
                ));
            }
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(end) = rest.find(']') else {
                return Err(err(n, "a section name is not closed: write [name]"));
            };
            let name = &rest[..end];
            let after = rest[end + 1..].trim_start();
            if !(after.is_empty() || after.starts_with(';') || after.starts_with('#')) {
                return Err(err(
                    n,
                    format!("unexpected text after [{name}]; put settings on their own lines"),
                ));
            }
            if !SECTIONS.contains(&name) {
                return Err(err(
                    n,
                    format!(
                        "unknown section [{name}]; PgBouncer has [databases], [pgbouncer], [users] and [peers]"
                    ),
                ));
            }
            sections.push(Section {
                name: name.to_string(),
                line: n,
                entries: Vec::new(),
            });
            continue;
        }
        let (key, rest) = if line.starts_with('\'') || line.starts_with('"') {
            let q = if line.starts_with('\'') { '\'' } else { '"' };
            let (k, rest) = quoted_key(line, q, n)?;
            if k.is_empty() {
                return Err(err(n, "an empty name in quotes"));
            }
            (k, rest)
        } else {
            let end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || "_.-*".contains(c)))
                .unwrap_or(line.len());
            (line[..end].to_string(), &line[end..])
        };
        let Some(value) = rest.trim_start_matches([' ', '\t']).strip_prefix('=') else {
            return Err(err(
                n,
                if key.is_empty() {
                    "expected `key = value`, a [section] or a comment (a name with characters other than letters, digits and _.-* goes in quotes)".to_string()
                } else {
                    format!("expected `=` after {key:?}; write `key = value`")
                },
            ));
        };
        if key.is_empty() {
            return Err(err(n, "a setting without a name before `=`"));
        }
        let Some(section) = sections.last_mut() else {
            return Err(err(
                n,
                format!("{key:?} is set before any section; put it under [pgbouncer] (or [databases], [users], [peers])"),
            ));
        };
        section.entries.push(Entry {
            key,
            value: value.trim().to_string(),
            line: n,
        });
    }
    Ok(sections)
}

/// Parses a libpq-style connection string as PgBouncer does: `key=value` pairs, values
/// in single quotes when they hold blanks (`''` is one `'`). Returns the pairs in order;
/// errors do not echo values (a password may be among them).
pub fn parse_connstr(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..end];
        let after = rest[end..].trim_start();
        let Some(after) = after.strip_prefix('=') else {
            return Err(if key.is_empty() {
                "a `=` without a parameter name before it".to_string()
            } else {
                format!("parameter {key:?} has no `=value`; write {key}=value")
            });
        };
        if key.is_empty() {
            return Err("a `=` without a parameter name before it".to_string());
        }
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if q[i + 1..].starts_with('\'') {
                        v.push('\'');
                        chars.next();
                    } else {
                        close = Some(i + 1);
                        break;
                    }
                } else {
                    v.push(c);
                }
            }
            let Some(close) = close else {
                return Err(format!("the quoted value of {key} is not closed with '"));
            };
            let next = &q[close..];
            if !(next.is_empty() || next.starts_with(char::is_whitespace)) {
                return Err(format!(
                    "the quoted value of {key} must be followed by a blank before the next parameter"
                ));
            }
            (v, next)
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        if value.is_empty() {
            return Err(format!(
                "parameter {key} has an empty value (PgBouncer refuses it); remove it or give a value"
            ));
        }
        out.push((key.to_string(), value));
        rest = next.trim_start();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keys_comments_and_line_numbers() {
        let text = "\
;; a comment
# another
[databases]
foodb =
bardb = host=localhost dbname=bazdb
  'my db' = host=h
\"we\"\"ird\" = host=h
* = host=testserver

[pgbouncer] ; trailing comment
logfile = /var/log/pgbouncer/a;b#c
listen_port=6432
auth_query = SELECT usename, passwd FROM user_lookup($1)
[users]
user1 = pool_mode=session
";
        let s = parse_ini(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "databases");
        assert_eq!(s[0].line, 3);
        let keys: Vec<&str> = s[0].entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["foodb", "bardb", "my db", "we\"ird", "*"]);
        assert_eq!(s[0].entries[0].value, "");
        assert_eq!(s[0].entries[1].value, "host=localhost dbname=bazdb");
        assert_eq!(s[0].entries[1].line, 5);
        assert_eq!(s[1].entries[0].value, "/var/log/pgbouncer/a;b#c");
        assert_eq!(s[1].entries[1].key, "listen_port");
        assert_eq!(s[1].entries[1].value, "6432");
        assert_eq!(
            s[1].entries[2].value,
            "SELECT usename, passwd FROM user_lookup($1)"
        );
        assert_eq!(s[2].entries[0].line, 15);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_ini("[pgbouncer]\nlisten_port 6432\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("expected `=`"), "{e}");
        let e = parse_ini("[pgbouncer]\n\n[pgbounce]\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e
            .to_string()
            .starts_with("line 3: unknown section [pgbounce]"));
        let e = parse_ini("listen_port = 1\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("before any section"), "{e}");
        let e = parse_ini("[pgbouncer]\n%include /etc/pgbouncer/more.ini\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not supported"), "{e}");
        let e = parse_ini("[databases\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_ini("[databases]\n'open = x\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_ini("[databases]\né = host=x\n").unwrap_err();
        assert!(e.message.contains("quotes"), "{e}");
        let e = parse_ini("[databases]\n= host=x\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_ini("[users] x\n").unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn connection_strings() {
        let p = parse_connstr(
            "host=localhost port=300 user=baz password='a b''c' connect_query='SELECT 1'",
        )
        .unwrap();
        assert_eq!(
            p,
            [
                ("host".to_string(), "localhost".to_string()),
                ("port".into(), "300".into()),
                ("user".into(), "baz".into()),
                ("password".into(), "a b'c".into()),
                ("connect_query".into(), "SELECT 1".into()),
            ]
        );
        assert_eq!(parse_connstr("").unwrap(), []);
        assert_eq!(parse_connstr("   ").unwrap(), []);
        assert_eq!(
            parse_connstr("  pool_size = 5\treserve_pool_size=2 ").unwrap(),
            [
                ("pool_size".to_string(), "5".to_string()),
                ("reserve_pool_size".into(), "2".into())
            ]
        );
        assert_eq!(
            parse_connstr("host=a,b,c").unwrap(),
            [("host".to_string(), "a,b,c".to_string())]
        );
        for bad in [
            "host",
            "=x",
            "host=",
            "host=''",
            "password='secret",
            "password='x'y=1",
        ] {
            let e = parse_connstr(bad).unwrap_err();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }
}
