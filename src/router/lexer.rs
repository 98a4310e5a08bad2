//! A small SQL lexer: words (keywords and unquoted identifiers) and statement-ending
//! semicolons, skipping whitespace, `--` and nested `/* */` comments, string literals
//! (`'...'` with `''`, `E'...'` with backslash escapes), quoted identifiers and dollar
//! quoting. It allocates nothing and never fails: unterminated input simply ends (and
//! [`Lexer::unterminated`] says so). [`Lexer::token_text`] gives the raw bytes of the last
//! token, for callers that need to look inside `Other` (parentheses, quoted identifiers).

/// A token that matters for statement analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// A keyword or unquoted identifier, as written.
    Word(&'a [u8]),
    /// `;` at the top level.
    Semicolon,
    /// Anything else: literals, quoted identifiers, operators, numbers, parameters.
    Other,
}

/// Iterates over the tokens of `sql`.
pub struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
    /// Where the last token returned began.
    start: usize,
    /// Input ended inside a string, quoted identifier, dollar quote or block comment.
    unterminated: bool,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a [u8]) -> Self {
        Lexer {
            sql,
            pos: 0,
            start: 0,
            unterminated: false,
        }
    }

    /// The raw bytes of the token last returned by `next` (quotes included).
    pub fn token_text(&self) -> &'a [u8] {
        let end = self.pos.min(self.sql.len());
        &self.sql[self.start.min(end)..end]
    }

    /// Where the token last returned by `next` begins and ends (byte offsets in the
    /// input).
    pub fn token_span(&self) -> (usize, usize) {
        let end = self.pos.min(self.sql.len());
        (self.start.min(end), end)
    }

    /// True once the input has ended inside a string literal, quoted identifier, dollar
    /// quote or block comment.
    pub fn unterminated(&self) -> bool {
        self.unterminated
    }

    fn skip_block_comment(&mut self) {
        // At "/*"; comments nest in PostgreSQL.
        let s = self.sql;
        let mut depth = 0usize;
        while self.pos < s.len() {
            if s[self.pos] == b'/' && s.get(self.pos + 1) == Some(&b'*') {
                depth += 1;
                self.pos += 2;
            } else if s[self.pos] == b'*' && s.get(self.pos + 1) == Some(&b'/') {
                depth -= 1;
                self.pos += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
        self.unterminated = true;
    }

    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        // At the opening quote.
        let s = self.sql;
        self.pos += 1;
        while self.pos < s.len() {
            let c = s[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
                continue;
            }
            self.pos += 1;
            if c == quote {
                if s.get(self.pos) == Some(&quote) {
                    self.pos += 1;
                    continue;
                }
                return;
            }
        }
        self.pos = s.len();
        self.unterminated = true;
    }

    /// At '$': a dollar quote `$tag$...$tag$` if the tag is valid; returns false if this
    /// is not a dollar quote (a parameter like `$1`, or an operator).
    fn skip_dollar_quote(&mut self) -> bool {
        let s = self.sql;
        let start = self.pos;
        let mut end = start + 1;
        while end < s.len() && (s[end].is_ascii_alphanumeric() || s[end] == b'_' || s[end] >= 0x80)
        {
            end += 1;
        }
        if end >= s.len() || s[end] != b'$' {
            return false;
        }
        if end > start + 1 && s[start + 1].is_ascii_digit() {
            return false;
        }
        let tag = &s[start..=end];
        let mut p = end + 1;
        while p + tag.len() <= s.len() {
            if &s[p..p + tag.len()] == tag {
                self.pos = p + tag.len();
                return true;
            }
            p += 1;
        }
        self.pos = s.len();
        self.unterminated = true;
        true
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let s = self.sql;
        loop {
            self.start = self.pos;
            let c = *s.get(self.pos)?;
            match c {
                c if c.is_ascii_whitespace() => self.pos += 1,
                b'-' if s.get(self.pos + 1) == Some(&b'-') => {
                    while self.pos < s.len() && s[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                b'/' if s.get(self.pos + 1) == Some(&b'*') => self.skip_block_comment(),
                b';' => {
                    self.pos += 1;
                    return Some(Token::Semicolon);
                }
                b'\'' => {
                    self.skip_quoted(b'\'', false);
                    return Some(Token::Other);
                }
                b'"' => {
                    self.skip_quoted(b'"', false);
                    return Some(Token::Other);
                }
                b'$' => {
                    if !self.skip_dollar_quote() {
                        self.pos += 1;
                        while self.pos < s.len() && s[self.pos].is_ascii_digit() {
                            self.pos += 1;
                        }
                    }
                    return Some(Token::Other);
                }
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let start = self.pos;
                    if (c == b'e' || c == b'E') && s.get(self.pos + 1) == Some(&b'\'') {
                        self.pos += 1;
                        self.skip_quoted(b'\'', true);
                        return Some(Token::Other);
                    }
                    while self.pos < s.len() {
                        let d = s[self.pos];
                        if d.is_ascii_alphanumeric() || d == b'_' || d == b'$' || d >= 0x80 {
                            self.pos += 1;
                        } else {
                            break;
                        }
                    }
                    return Some(Token::Word(&s[start..self.pos]));
                }
                _ => {
                    self.pos += 1;
                    return Some(Token::Other);
                }
            }
        }
    }
}

/// Calls `f` with the first two words of every statement in `sql` (either may be empty)
/// and stops early when `f` returns true; returns whether it did.
pub fn any_statement(sql: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) -> bool {
    let mut lexer = Lexer::new(sql);
    loop {
        let first = match lexer.next() {
            None => return false,
            Some(Token::Semicolon) => continue,
            Some(Token::Word(w)) => w,
            Some(Token::Other) => &[][..],
        };
        let second = match lexer.next() {
            Some(Token::Word(w)) => w,
            Some(Token::Semicolon) | None => {
                if f(first, &[]) {
                    return true;
                }
                continue;
            }
            Some(Token::Other) => &[][..],
        };
        if f(first, second) {
            return true;
        }
        // Skip to the end of this statement.
        loop {
            match lexer.next() {
                None => return false,
                Some(Token::Semicolon) => break,
                _ => {}
            }
        }
    }
}

/// True when `needle` (lower-case ASCII) occurs anywhere in `haystack`, ignoring ASCII
/// case: a cheap filter before lexing, for text that almost never matters.
pub fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    if haystack.len() < needle.len() {
        return false;
    }
    // Candidates are found with memchr (vectorized): this runs on every statement text
    // in the forwarding path, and most texts hold few of the first letter.
    let starts = &haystack[..=haystack.len() - needle.len()];
    memchr::memchr2_iter(
        first.to_ascii_lowercase(),
        first.to_ascii_uppercase(),
        starts,
    )
    .any(|i| haystack[i + 1..i + needle.len()].eq_ignore_ascii_case(rest))
}

/// True when any word of `sql` equals `word` (ASCII case-insensitive).
pub fn has_word(sql: &[u8], word: &[u8]) -> bool {
    Lexer::new(sql).any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case(word)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        Lexer::new(sql.as_bytes())
            .map(|t| match t {
                Token::Word(w) => String::from_utf8_lossy(w).to_lowercase(),
                Token::Semicolon => ";".into(),
                Token::Other => "_".into(),
            })
            .collect()
    }

    #[test]
    fn skips_comments_strings_and_dollar_quotes() {
        assert_eq!(
            words("select 1 -- set x\n; /* a /* nested; */ set */ reset"),
            ["select", "_", ";", "reset"]
        );
        assert_eq!(
            words("select 'a;''set' , E'\\'; set', \"x;y\""),
            ["select", "_", "_", "_", "_", "_"]
        );
        assert_eq!(
            words("do $f$ begin execute 'x'; end $f$; select $1"),
            ["do", "_", ";", "select", "_"]
        );
        assert_eq!(words("select $$;$$"), ["select", "_"]);
        assert_eq!(words("select 'unterminated"), ["select", "_"]);
    }

    #[test]
    fn contains_ci_ignores_case() {
        assert!(contains_ci(b"SELECT 1; ReSeT all", b"set"));
        assert!(!contains_ci(b"select 1", b"set"));
        assert!(contains_ci(b"x", b""));
        assert!(!contains_ci(b"se", b"set"));
    }

    #[test]
    fn finds_statement_starts() {
        let starts = |sql: &str| {
            let mut v = Vec::new();
            any_statement(sql.as_bytes(), |a, b| {
                v.push(format!(
                    "{} {}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                ));
                false
            });
            v
        };
        assert_eq!(
            starts("select 1; set search_path = a;; prepare p as select 1"),
            ["select ", "set search_path", "prepare p"]
        );
        assert_eq!(starts("do $$ begin; execute 'x'; end $$"), ["do "]);
        assert_eq!(starts("deallocate all"), ["deallocate all"]);
    }
}
