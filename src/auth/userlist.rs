//! PgBouncer's `auth_file` format (`userlist.txt`), so that users migrating from PgBouncer
//! keep their file:
//!
//! ```text
//! ; comment
//! "alice" "plain password"
//! "bob"   "md5<32 hex digits of md5(password || user name)>"
//! "carol" "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>"
//! "say ""hi""" "quotes are doubled inside a field"
//! ```
//!
//! Each entry is two double-quoted fields; anything after the second field is ignored
//! (PgBouncer does the same). Blank lines and lines starting with `;` or `#` are skipped.
//! An empty password means the user has none (it can only log in with `trust`). A user
//! listed twice takes its last entry. Anything else is an error with its line number.

use std::collections::HashMap;

/// The users of an `auth_file`: name -> password string (plain, md5 hash or SCRAM
/// verifier, as [`super::Secret::parse`] classifies it); `None` for an empty password.
#[derive(Clone, Default)]
pub struct UserList {
    users: HashMap<String, Option<String>>,
}

impl std::fmt::Debug for UserList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passwords.
        f.debug_struct("UserList")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Reads one double-quoted field at the start of `s` (`""` stands for one `"`); returns
/// the field and the rest of the line.
fn quoted(s: &str) -> Result<(String, &str), &'static str> {
    let mut rest = s
        .strip_prefix('"')
        .ok_or("expected a double-quoted field")?;
    let mut out = String::new();
    loop {
        let Some(i) = rest.find('"') else {
            return Err("a double-quoted field is not closed on this line");
        };
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('"') {
            out.push('"');
            rest = after;
        } else {
            return Ok((out, rest));
        }
    }
}

impl UserList {
    /// Parses the file's text; errors are `line N: what is wrong` (never echoing a
    /// password).
    pub fn parse(text: &str) -> Result<UserList, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let (user, rest) = quoted(line).map_err(|e| {
                format!(
                    "line {n}: {e}; each entry is \"user name\" \"password\" (a plain password, an md5 hash or a SCRAM secret), comments start with ; or #"
                )
            })?;
            let rest = rest.trim_start();
            let (password, _ignored) = quoted(rest).map_err(|e| {
                format!("line {n}: the password of user {user:?}: {e}; write \"user name\" \"password\"")
            })?;
            if user.is_empty() {
                return Err(format!("line {n}: the user name is empty"));
            }
            users.insert(user, (!password.is_empty()).then_some(password));
        }
        Ok(UserList { users })
    }

    /// Reads and parses `path`.
    pub fn load(path: &str) -> Result<UserList, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{path}: {e}"))
    }

    /// `Some(password)` for a listed user (`Some(None)`: listed without a password).
    pub fn get(&self, user: &str) -> Option<Option<&str>> {
        self.users.get(user).map(|p| p.as_deref())
    }

    /// Every (user, password) with a password.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.users
            .iter()
            .filter_map(|(u, p)| Some((u.as_str(), p.as_deref()?)))
    }

    /// Every listed user with its password (`None`: listed with an empty one).
    pub fn users(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.users.iter().map(|(u, p)| (u.as_str(), p.as_deref()))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_format() {
        let text = r#"
; a comment
# another comment
"alice" "plain pw"
  "bob"	"md545f2603610af569b6155c45067268c6b" "ignored" extra
"say ""hi""" "pa""ss"
"nopass" ""
"alice" "second wins"
"#;
        let l = UserList::parse(text).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l.get("alice"), Some(Some("second wins")));
        assert_eq!(
            l.get("bob"),
            Some(Some("md545f2603610af569b6155c45067268c6b"))
        );
        assert_eq!(l.get("say \"hi\""), Some(Some("pa\"ss")));
        assert_eq!(l.get("nopass"), Some(None));
        assert_eq!(l.get("carol"), None);
        assert_eq!(l.entries().count(), 3);
        assert!(!format!("{l:?}").contains("second wins"));
    }

    #[test]
    fn errors_name_the_line_and_not_the_password() {
        for (text, needle) in [
            ("alice \"pw\"", "line 1: expected a double-quoted field"),
            ("\n\"alice\" pw", "line 2: the password of user \"alice\""),
            ("\"alice\" \"secret-pw", "not closed"),
            ("\"alice", "line 1: a double-quoted field is not closed"),
            ("\"\" \"pw\"", "line 1: the user name is empty"),
        ] {
            let e = UserList::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains("secret-pw"), "{e}");
        }
        assert!(UserList::load("/nonexistent/userlist.txt")
            .unwrap_err()
            .contains("cannot read /nonexistent/userlist.txt"));
    }
}
