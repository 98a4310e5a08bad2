//! Per-client run-time parameters: what the client set at startup or with SET, and the
//! statements that bring a server connection in line with them.
//!
//! Reported parameters (those a server announces with ParameterStatus, such as
//! `DateStyle` or `application_name`) are tracked from ParameterStatus. The others
//! (`search_path`, `track_extra_params`, anything the client sent at startup that the
//! server does not report) are read back with `current_setting()` after a transaction
//! whose text may have changed them.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use crate::router::lexer::{any_statement, contains_ci, has_word, Lexer, Token};
use crate::router::quote::{quote_ident, quote_literal};

/// Parameters pgtide keeps per client and re-applies on every server it gets, besides
/// the configured extras and whatever the client sent at startup.
pub const TRACKED: &[&str] = &[
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "application_name",
    "search_path",
    "default_transaction_read_only",
];

/// Reported parameters that only the server decides; never synced.
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
    "scram_iterations",
];

/// What every client of a pool starts from: the pool's login ParameterStatus set with
/// lower-case names, and the names synced to servers for a client that set nothing
/// (the tracked ones and the configured extras). Built once per (login set, extras) and
/// shared by every client that logs in with them ([`LoginSets::get`]), so a client
/// keeps only its differences from it.
#[derive(Debug, Default)]
pub struct LoginSet {
    /// The pool's set as servers reported it (names as spelled by the server).
    login: Arc<Vec<(String, String)>>,
    /// `track_extra_params` as configured (lower-case), for [`LoginSets::get`].
    extras: Vec<String>,
    /// Lower-case name -> value of the login set.
    values: HashMap<String, String>,
    /// Lower-case names of the login set, in its order: the reported parameters.
    reported: Vec<String>,
    /// Lower-case names synced to servers for every client, sorted.
    synced: Vec<String>,
    /// A keyed hash of `values` and `synced`.
    hash: u64,
    /// `values["search_path"]`, looked up once: every tracked Parse and Query reads it.
    search_path: Option<String>,
}

impl LoginSet {
    fn build(login: &Arc<Vec<(String, String)>>, extras: Vec<String>) -> LoginSet {
        let reported: Vec<String> = login.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
        let values: HashMap<String, String> = reported
            .iter()
            .zip(login.iter())
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        let mut synced: Vec<String> = TRACKED.iter().map(|s| s.to_string()).collect();
        synced.extend(extras.iter().cloned());
        synced.sort();
        synced.dedup();
        let mut h = fingerprint_key().build_hasher();
        synced.hash(&mut h);
        let mut sorted: Vec<(&String, &String)> = values.iter().collect();
        sorted.sort_unstable();
        sorted.hash(&mut h);
        let hash = h.finish();
        let search_path = values.get("search_path").cloned();
        LoginSet {
            search_path,
            login: login.clone(),
            extras,
            values,
            reported,
            synced,
            hash,
        }
    }

    fn is_synced(&self, k: &str) -> bool {
        self.synced.binary_search_by(|s| s.as_str().cmp(k)).is_ok()
    }
}

/// The [`LoginSet`]s clients hold, so that every client of a pool shares one (kept in
/// `Shared`).
#[derive(Default)]
pub struct LoginSets(Mutex<Vec<Arc<LoginSet>>>);

impl LoginSets {
    /// The set for clients of a pool whose servers report `login`, with `extras`
    /// configured: the one already made for them if any client still holds it.
    pub fn get(&self, login: &Arc<Vec<(String, String)>>, extras: &[String]) -> Arc<LoginSet> {
        let extras: Vec<String> = extras.iter().map(|e| e.to_ascii_lowercase()).collect();
        let mut sets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sets
            .iter()
            .find(|s| Arc::ptr_eq(&s.login, login) && s.extras == extras)
        {
            return s.clone();
        }
        // Sets no client holds any more (their pool was retired, extras reloaded) go.
        sets.retain(|s| Arc::strong_count(s) > 1);
        let set = Arc::new(LoginSet::build(login, extras));
        sets.push(set.clone());
        set
    }
}

/// A client's settings: the pool's [`LoginSet`] (shared), and what this client has
/// differently. Most clients set nothing or one or two names, so an idle client holds
/// two empty lists and a pointer.
#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    base: Arc<LoginSet>,
    /// Lower-case name -> the client's value where it differs from the login set
    /// (`None`: the client has no value where the login set has one); sorted by name.
    own: Vec<(Box<str>, Option<Box<str>>)>,
    /// Lower-case names synced to servers besides the login set's, sorted.
    synced: Vec<Box<str>>,
    /// A keyed hash of the login set and the differences, renewed on every change:
    /// equal fingerprints mean equal settings, so a server made to match one client
    /// matches every client with the same settings without comparing them one by one.
    fingerprint: u64,
}

/// The process's random key for [`ClientParams::fingerprint`]: collisions cannot be
/// chosen by a client.
fn fingerprint_key() -> &'static RandomState {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new)
}

impl ClientParams {
    /// `base` is the pool's login set ([`LoginSets::get`]); `startup` the client's
    /// settings (startup packet and `options`).
    pub fn new(base: Arc<LoginSet>, startup: &[(String, String)]) -> Self {
        let mut p = ClientParams {
            base,
            own: Vec::new(),
            synced: Vec::new(),
            fingerprint: 0,
        };
        for (k, v) in startup {
            let k = k.to_ascii_lowercase();
            if READ_ONLY.contains(&k.as_str()) {
                continue;
            }
            // Reported back as the server spells it (PostgreSQL does the same).
            let v = match k.as_str() {
                "client_encoding" => canonical_encoding(v).unwrap_or(v),
                _ => v,
            };
            p.set(&k, Some(v));
            p.sync(&k);
        }
        p.refingerprint();
        p
    }

    /// Equal for two clients (or one client at two moments) whose `sync_sql` would say
    /// the same for every server.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn refingerprint(&mut self) {
        let mut h = fingerprint_key().build_hasher();
        self.base.hash.hash(&mut h);
        self.own.hash(&mut h);
        self.synced.hash(&mut h);
        self.fingerprint = h.finish();
    }

    /// Sets the client's value of `k` (lower-case), keeping only a difference from the
    /// login set.
    fn set(&mut self, k: &str, v: Option<&str>) {
        let same = self.base.values.get(k).map(String::as_str) == v;
        match self.own.binary_search_by(|(n, _)| (**n).cmp(k)) {
            Ok(i) if same => {
                self.own.remove(i);
            }
            Ok(i) => self.own[i].1 = v.map(Box::from),
            Err(_) if same => {}
            Err(i) => self.own.insert(i, (k.into(), v.map(Box::from))),
        }
    }

    /// Makes `k` (lower-case) one of the names synced to servers.
    fn sync(&mut self, k: &str) {
        if self.base.is_synced(k) {
            return;
        }
        if let Err(i) = self.synced.binary_search_by(|n| (**n).cmp(k)) {
            self.synced.insert(i, k.into());
        }
    }

    /// A statement may have changed `name` (lower-case) for the session: it is synced
    /// from now on, and the read-back after the transaction learns its value.
    pub fn watch(&mut self, name: &str) {
        if READ_ONLY.contains(&name) || self.base.is_synced(name) {
            return;
        }
        if self.synced.binary_search_by(|n| (**n).cmp(name)).is_err() {
            self.sync(name);
            self.refingerprint();
        }
    }

    /// Every name synced to servers (the login set's, then the client's own).
    fn synced_names(&self) -> impl Iterator<Item = &str> {
        self.base
            .synced
            .iter()
            .map(String::as_str)
            .chain(self.synced.iter().map(|s| &**s))
    }

    /// The ParameterStatus set this client sees at login: the pool's, with the client's
    /// own values for the reported names it set.
    pub fn login_status(&self) -> impl Iterator<Item = (&str, &str)> {
        self.base
            .login
            .iter()
            .zip(&self.base.reported)
            .map(|((k, v), lower)| (k.as_str(), self.value(lower).unwrap_or(v.as_str())))
    }

    fn is_reported(&self, k: &str) -> bool {
        self.base.reported.iter().any(|r| r == k)
    }

    /// The client's current value of `name` (lower-case), if known.
    pub fn value(&self, name: &str) -> Option<&str> {
        match self.own.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => self.own[i].1.as_deref(),
            Err(_) => self.base.values.get(name).map(String::as_str),
        }
    }

    /// `value("search_path")` without hashing the name (read for every tracked message).
    pub fn search_path(&self) -> Option<&str> {
        match self.own.binary_search_by(|(n, _)| (**n).cmp("search_path")) {
            Ok(i) => self.own[i].1.as_deref(),
            Err(_) => self.base.search_path.as_deref(),
        }
    }

    /// A ParameterStatus the client saw while it had a server.
    pub fn observe(&mut self, name: &str, value: &str) {
        let k = name.to_ascii_lowercase();
        if self.value(&k) == Some(value) {
            return;
        }
        self.set(&k, Some(value));
        self.refingerprint();
    }

    /// The statement that makes a server with `server` parameters match this client,
    /// or `None` when they match already.
    pub fn sync_sql(&self, server: &HashMap<String, String>) -> Option<String> {
        let mut sets = Vec::new();
        for k in self.synced_names() {
            if let Some(v) = self.value(k) {
                if server.get(k).map(String::as_str) != Some(v) {
                    sets.push(format!(
                        "set_config({}, {}, false)",
                        quote_literal(k),
                        quote_literal(v)
                    ));
                }
            }
        }
        let mut resets = Vec::new();
        for k in server.keys() {
            if self.value(k).is_none() && !READ_ONLY.contains(&k.as_str()) {
                resets.push(format!("RESET {}", quote_ident(k)));
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
        }
        for r in resets {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&r);
        }
        Some(sql)
    }

    /// After `sync_sql` succeeded: the server now has the client's values. Reported
    /// values are taken from the server, which spells them canonically.
    pub fn synced_to(&mut self, server: &mut HashMap<String, String>) {
        server.retain(|k, _| self.value(k).is_some() || READ_ONLY.contains(&k.as_str()));
        let mut canonical = Vec::new();
        for k in self.synced_names() {
            if let Some(v) = self.value(k) {
                if self.is_reported(k) {
                    if let Some(sv) = server.get(k) {
                        if sv != v {
                            canonical.push((k.to_string(), sv.clone()));
                        }
                    }
                } else if server.get(k).map(String::as_str) != Some(v) {
                    server.insert(k.to_string(), v.to_string());
                }
            }
        }
        for (k, v) in canonical {
            self.set(&k, Some(&v));
        }
        self.refingerprint();
    }

    /// The query that reads back the unreported parameters after a SET, with the names
    /// in the order of its columns.
    pub fn refresh_sql(&self, server: &HashMap<String, String>) -> Option<(String, Vec<String>)> {
        let mut names: Vec<String> = self
            .synced_names()
            .chain(server.keys().map(String::as_str))
            .filter(|k| !self.is_reported(k))
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return None;
        }
        let cols: Vec<String> = names
            .iter()
            .map(|n| format!("current_setting({}, true)", quote_literal(n)))
            .collect();
        Some((format!("SELECT {}", cols.join(", ")), names))
    }

    /// Applies the row `refresh_sql` returned to both the client and the server.
    pub fn refreshed(
        &mut self,
        names: &[String],
        row: &[Option<String>],
        server: &mut HashMap<String, String>,
    ) {
        for (k, v) in names.iter().zip(row) {
            match v {
                Some(v) => {
                    self.set(k, Some(v));
                    server.insert(k.clone(), v.clone());
                    self.sync(k);
                }
                None => {
                    self.set(k, None);
                    server.remove(k);
                }
            }
        }
        self.refingerprint();
    }

    /// Whether the client keeps anything of its own (for tests of the sharing).
    #[cfg(test)]
    fn own_len(&self) -> usize {
        self.own.len() + self.synced.len()
    }
}

/// PostgreSQL's own name for an encoding a client names (`utf8`, `Unicode`, `euc-jp`,
/// `latin1`, `win1252`, ...), as its `encnames.c` resolves them: the name lower-cased
/// without punctuation, looked up among the aliases. `None` for a name PostgreSQL does
/// not know (the server then refuses it, as directly).
pub fn canonical_encoding(name: &str) -> Option<&'static str> {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const ALIASES: &[(&str, &str)] = &[
        ("abc", "WIN1258"),
        ("alt", "WIN866"),
        ("big5", "BIG5"),
        ("euccn", "EUC_CN"),
        ("eucjis2004", "EUC_JIS_2004"),
        ("eucjp", "EUC_JP"),
        ("euckr", "EUC_KR"),
        ("euctw", "EUC_TW"),
        ("gb18030", "GB18030"),
        ("gbk", "GBK"),
        ("iso88591", "LATIN1"),
        ("iso885910", "LATIN6"),
        ("iso885913", "LATIN7"),
        ("iso885914", "LATIN8"),
        ("iso885915", "LATIN9"),
        ("iso885916", "LATIN10"),
        ("iso88592", "LATIN2"),
        ("iso88593", "LATIN3"),
        ("iso88594", "LATIN4"),
        ("iso88595", "ISO_8859_5"),
        ("iso88596", "ISO_8859_6"),
        ("iso88597", "ISO_8859_7"),
        ("iso88598", "ISO_8859_8"),
        ("iso88599", "LATIN5"),
        ("johab", "JOHAB"),
        ("koi8", "KOI8R"),
        ("koi8r", "KOI8R"),
        ("koi8u", "KOI8U"),
        ("latin1", "LATIN1"),
        ("latin10", "LATIN10"),
        ("latin2", "LATIN2"),
        ("latin3", "LATIN3"),
        ("latin4", "LATIN4"),
        ("latin5", "LATIN5"),
        ("latin6", "LATIN6"),
        ("latin7", "LATIN7"),
        ("latin8", "LATIN8"),
        ("latin9", "LATIN9"),
        ("mskanji", "SJIS"),
        ("muleinternal", "MULE_INTERNAL"),
        ("shiftjis", "SJIS"),
        ("shiftjis2004", "SHIFT_JIS_2004"),
        ("sjis", "SJIS"),
        ("sqlascii", "SQL_ASCII"),
        ("tcvn", "WIN1258"),
        ("tcvn5712", "WIN1258"),
        ("uhc", "UHC"),
        ("unicode", "UTF8"),
        ("utf8", "UTF8"),
        ("vscii", "WIN1258"),
        ("win", "WIN1251"),
        ("win1250", "WIN1250"),
        ("win1251", "WIN1251"),
        ("win1252", "WIN1252"),
        ("win1253", "WIN1253"),
        ("win1254", "WIN1254"),
        ("win1255", "WIN1255"),
        ("win1256", "WIN1256"),
        ("win1257", "WIN1257"),
        ("win1258", "WIN1258"),
        ("win866", "WIN866"),
        ("win874", "WIN874"),
        ("win932", "SJIS"),
        ("win936", "GBK"),
        ("win949", "UHC"),
        ("win950", "BIG5"),
        ("windows1250", "WIN1250"),
        ("windows1251", "WIN1251"),
        ("windows1252", "WIN1252"),
        ("windows1253", "WIN1253"),
        ("windows1254", "WIN1254"),
        ("windows1255", "WIN1255"),
        ("windows1256", "WIN1256"),
        ("windows1257", "WIN1257"),
        ("windows1258", "WIN1258"),
        ("windows866", "WIN866"),
        ("windows874", "WIN874"),
        ("windows932", "SJIS"),
        ("windows936", "GBK"),
        ("windows949", "UHC"),
        ("windows950", "BIG5"),
    ];
    ALIASES
        .binary_search_by(|(alias, _)| (*alias).cmp(clean.as_str()))
        .ok()
        .map(|i| ALIASES[i].1)
}

/// True when a statement text may change session settings: a statement that starts
/// with SET, RESET or DISCARD, or a call of `set_config`. A false positive costs one
/// extra query; a setting changed some other way (inside a function) is not seen.
pub fn may_change_settings(sql: &[u8]) -> bool {
    // Every statement that matters contains "set" or "discard": most queries stop here.
    if !contains_ci(sql, b"set") && !contains_ci(sql, b"discard") {
        return false;
    }
    any_statement(sql, |first, _| {
        first.eq_ignore_ascii_case(b"set")
            || first.eq_ignore_ascii_case(b"reset")
            || first.eq_ignore_ascii_case(b"discard")
    }) || has_word(sql, b"set_config")
}

/// Calls `f` with the lower-case name of every setting `sql` may change for the rest of
/// the session: `SET [SESSION] name`, `RESET name`, the special forms (`SET ROLE`,
/// `SET TIME ZONE`, `SET NAMES`, `SET SCHEMA`, `SET XML OPTION`) and
/// `set_config('name', ...)`. `SET LOCAL`, `SET TRANSACTION` and `SET CONSTRAINTS` end
/// with the transaction and are skipped; `RESET ALL` and `DISCARD` name nothing (the
/// read-back covers every name the server has). Custom names (`app.tenant_id`) count.
pub fn settings_named(sql: &[u8], mut f: impl FnMut(&str)) {
    let mut lexer = Lexer::new(sql);
    let mut name = String::new();
    // Reads a (possibly dotted, possibly quoted) setting name whose first token is
    // `first`; leaves the lexer after it.
    fn read_name(lexer: &mut Lexer<'_>, first: Token<'_>, name: &mut String) {
        name.clear();
        let mut part = Some(first);
        loop {
            match part {
                Some(Token::Word(w)) => {
                    name.push_str(&String::from_utf8_lossy(w).to_ascii_lowercase())
                }
                Some(Token::Other) => {
                    let t = lexer.token_text();
                    if t.len() >= 2 && t[0] == b'"' && t[t.len() - 1] == b'"' {
                        name.push_str(
                            &String::from_utf8_lossy(&t[1..t.len() - 1]).replace("\"\"", "\""),
                        );
                    } else {
                        return;
                    }
                }
                _ => return,
            }
            match lexer.next() {
                Some(Token::Other) if lexer.token_text() == b"." => {
                    name.push('.');
                    part = lexer.next();
                }
                _ => return,
            }
        }
    }
    let mut first = true;
    let mut prev_set_config = false;
    while let Some(t) = lexer.next() {
        match t {
            Token::Semicolon => {
                first = true;
                continue;
            }
            Token::Word(w)
                if first
                    && (w.eq_ignore_ascii_case(b"set") || w.eq_ignore_ascii_case(b"reset")) =>
            {
                first = false;
                let mut next = lexer.next();
                if matches!(next, Some(Token::Word(x)) if x.eq_ignore_ascii_case(b"session")) {
                    next = lexer.next();
                    if matches!(next, Some(Token::Word(x)) if x.eq_ignore_ascii_case(b"authorization"))
                    {
                        f("session_authorization");
                        continue;
                    }
                }
                let special: Option<&str> = match next {
                    Some(Token::Word(x)) => {
                        let is = |k: &[u8]| x.eq_ignore_ascii_case(k);
                        if is(b"local") || is(b"transaction") || is(b"constraints") || is(b"all") {
                            Some("")
                        } else if is(b"role") {
                            Some("role")
                        } else if is(b"time") {
                            Some("timezone")
                        } else if is(b"names") {
                            Some("client_encoding")
                        } else if is(b"schema") {
                            Some("search_path")
                        } else if is(b"xml") {
                            Some("xmloption")
                        } else {
                            None
                        }
                    }
                    _ => None,
                };
                match special {
                    Some("") => {}
                    Some(n) => f(n),
                    None => {
                        if let Some(t) = next {
                            read_name(&mut lexer, t, &mut name);
                            if !name.is_empty() {
                                f(&name);
                            }
                        }
                    }
                }
                continue;
            }
            Token::Word(w) => {
                first = false;
                prev_set_config = w.eq_ignore_ascii_case(b"set_config");
                continue;
            }
            Token::Other => {
                first = false;
                if prev_set_config && lexer.token_text() == b"(" {
                    // set_config('name', value, is_local): the first argument, if a literal.
                    if let Some(Token::Other) = lexer.next() {
                        let t = lexer.token_text();
                        if t.len() >= 2 && t[0] == b'\'' && t[t.len() - 1] == b'\'' {
                            let n = String::from_utf8_lossy(&t[1..t.len() - 1])
                                .replace("\'\'", "\'")
                                .to_ascii_lowercase();
                            f(&n);
                        }
                    }
                }
                prev_set_config = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(sql: &str) -> Vec<String> {
        let mut v = Vec::new();
        settings_named(sql.as_bytes(), |n| v.push(n.to_string()));
        v
    }

    #[test]
    fn encodings_get_postgresqls_spelling() {
        assert_eq!(canonical_encoding("utf8"), Some("UTF8"));
        assert_eq!(canonical_encoding("UTF-8"), Some("UTF8"));
        assert_eq!(canonical_encoding("unicode"), Some("UTF8"));
        assert_eq!(canonical_encoding("euc_jp"), Some("EUC_JP"));
        assert_eq!(canonical_encoding("ISO-8859-1"), Some("LATIN1"));
        assert_eq!(canonical_encoding("win1252"), Some("WIN1252"));
        assert_eq!(canonical_encoding("klingon"), None);
    }

    #[test]
    fn names_every_setting_a_statement_changes_for_the_session() {
        assert_eq!(
            named("SET statement_timeout = '1ms'"),
            ["statement_timeout"]
        );
        assert_eq!(named("set session work_mem to '64MB'"), ["work_mem"]);
        assert_eq!(named("SET app.tenant_id = '42'"), ["app.tenant_id"]);
        assert_eq!(named("SET \"App\".\"Tenant\" = 1"), ["App.Tenant"]);
        assert_eq!(named("RESET lock_timeout"), ["lock_timeout"]);
        assert_eq!(named("SET ROLE alice"), ["role"]);
        assert_eq!(named("RESET ROLE"), ["role"]);
        assert_eq!(
            named("SET SESSION AUTHORIZATION bob"),
            ["session_authorization"]
        );
        assert_eq!(named("SET TIME ZONE 'UTC'"), ["timezone"]);
        assert_eq!(named("SET NAMES 'UTF8'"), ["client_encoding"]);
        assert_eq!(named("SET SCHEMA 'x'"), ["search_path"]);
        assert_eq!(
            named("SELECT set_config('app.user', '7', false), 1"),
            ["app.user"]
        );
        assert_eq!(named("select 1; set a.b = 1; reset c"), ["a.b", "c"]);
        for none in [
            "SET LOCAL statement_timeout = 0",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "RESET ALL",
            "SELECT 'SET x = 1'",
            "UPDATE t SET a = 1",
        ] {
            assert!(named(none).is_empty(), "{none}: {:?}", named(none));
        }
    }

    #[test]
    fn detects_set_statements() {
        assert!(may_change_settings(b"SET search_path = a"));
        assert!(may_change_settings(b"  /* c */ -- x\n set TimeZone='UTC'"));
        assert!(may_change_settings(b"select 1; reset all"));
        assert!(may_change_settings(b"select set_config('a.b','1',false)"));
        assert!(may_change_settings(b"DISCARD ALL"));
        assert!(!may_change_settings(b"select * from t offset 5"));
        assert!(!may_change_settings(b"update t set a = 1"));
        assert!(!may_change_settings(b"select 'x; set y = 1'"));
        assert!(!may_change_settings(b"do $$ begin perform 1; end $$"));
    }

    fn login() -> Arc<Vec<(String, String)>> {
        static LOGIN: OnceLock<Arc<Vec<(String, String)>>> = OnceLock::new();
        LOGIN
            .get_or_init(|| {
                Arc::new(vec![
                    ("DateStyle".into(), "ISO, MDY".into()),
                    ("application_name".into(), "".into()),
                    ("server_version".into(), "15".into()),
                ])
            })
            .clone()
    }

    fn params(startup: &[(String, String)], extras: &[String]) -> ClientParams {
        static SETS: OnceLock<LoginSets> = OnceLock::new();
        let base = SETS.get_or_init(LoginSets::default).get(&login(), extras);
        ClientParams::new(base, startup)
    }

    fn server_of(login: &[(String, String)]) -> HashMap<String, String> {
        login
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    }

    #[test]
    fn search_path_reads_what_value_reads() {
        // Servers that report search_path (PostgreSQL 18) put it in the login set.
        let sets = LoginSets::default();
        let reported = Arc::new(vec![(
            "search_path".to_string(),
            "\"$user\", public".to_string(),
        )]);
        let mut a = ClientParams::new(sets.get(&reported, &[]), &[]);
        assert_eq!(a.search_path(), Some("\"$user\", public"));
        a.observe("search_path", "app");
        assert_eq!(a.search_path(), Some("app"));
        assert_eq!(a.search_path(), a.value("search_path"));
        // PostgreSQL 15 does not report it: the client's startup value, or nothing.
        assert_eq!(params(&[], &[]).search_path(), None);
        let b = params(&[("search_path".into(), "s1".into())], &[]);
        assert_eq!(b.search_path(), Some("s1"));
        assert_eq!(b.search_path(), b.value("search_path"));
    }

    #[test]
    fn clients_share_the_login_set_and_keep_only_their_differences() {
        let a = params(&[], &["Pgtide.Route".into()]);
        let b = params(&[], &["pgtide.route".into()]);
        assert!(Arc::ptr_eq(&a.base, &b.base));
        assert_eq!(a.own_len(), 0);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.value("datestyle"), Some("ISO, MDY"));
        assert_eq!(a.value("server_version"), Some("15"));
        assert_eq!(a.value("search_path"), None);
        // Other extras: another set, same values.
        let c = params(&[], &[]);
        assert!(!Arc::ptr_eq(&a.base, &c.base));
        assert_ne!(a.fingerprint(), c.fingerprint());

        // A startup value equal to the login set's is no difference; another one is.
        let d = params(
            &[
                ("DateStyle".into(), "ISO, MDY".into()),
                ("application_name".into(), "app".into()),
                ("server_version".into(), "99".into()),
            ],
            &[],
        );
        assert_eq!(d.own_len(), 1);
        assert_eq!(d.value("application_name"), Some("app"));
        assert_eq!(d.value("server_version"), Some("15"), "read-only: ignored");
        let status: Vec<(&str, &str)> = d.login_status().collect();
        assert_eq!(
            status,
            [
                ("DateStyle", "ISO, MDY"),
                ("application_name", "app"),
                ("server_version", "15")
            ]
        );
        assert_eq!(
            d.sync_sql(&server_of(&login())).unwrap(),
            "SELECT set_config(E'application_name', E'app', false)"
        );

        // Going back to the login set's value leaves nothing of its own, and the same
        // fingerprint as a client that never changed it.
        let mut e = d.clone();
        e.observe("Application_Name", "");
        assert_eq!(e.own_len(), 0);
        assert_eq!(e.fingerprint(), c.fingerprint());
        assert_eq!(e.sync_sql(&server_of(&login())), None);
        e.observe("DateStyle", "German, DMY");
        assert_eq!(e.value("datestyle"), Some("German, DMY"));
        assert_ne!(e.fingerprint(), c.fingerprint());
    }

    #[test]
    fn refreshed_settings_are_kept_as_differences() {
        let mut c = params(&[], &[]);
        let mut server = server_of(&login());
        let (sql, names) = c.refresh_sql(&server).unwrap();
        assert_eq!(
            names,
            TRACKED
                .iter()
                .filter(|n| !matches!(**n, "datestyle" | "application_name"))
                .map(|n| n.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(
            sql.contains("current_setting(E'search_path', true)"),
            "{sql}"
        );
        // The client ran SET search_path and SET my.opt: read back.
        let mut names = names;
        names.push("my.opt".into());
        let mut row: Vec<Option<String>> = names.iter().map(|_| None).collect();
        let sp = names.iter().position(|n| n == "search_path").unwrap();
        row[sp] = Some("app, public".into());
        *row.last_mut().unwrap() = Some("7".into());
        let before = c.fingerprint();
        c.refreshed(&names, &row, &mut server);
        assert_ne!(c.fingerprint(), before);
        assert_eq!(c.value("search_path"), Some("app, public"));
        assert_eq!(c.value("my.opt"), Some("7"));
        assert_eq!(server.get("my.opt").map(String::as_str), Some("7"));
        assert_eq!(c.sync_sql(&server), None);
        // A fresh server of the pool gets both; a client without them resets my.opt.
        let sql = c.sync_sql(&server_of(&login())).unwrap();
        assert!(
            sql.contains("set_config(E'search_path', E'app, public', false)"),
            "{sql}"
        );
        assert!(sql.contains("set_config(E'my.opt', E'7', false)"), "{sql}");
        let plain = params(&[], &[]);
        let sql = plain.sync_sql(&server).unwrap();
        assert!(sql.contains("RESET \"my.opt\""), "{sql}");
        assert!(sql.contains("RESET \"search_path\""), "{sql}");
        // A reported setting the server spells differently is taken from the server.
        let mut d = params(&[("datestyle".into(), "iso,dmy".into())], &[]);
        let mut server = server_of(&login());
        assert!(d.sync_sql(&server).unwrap().contains("E'iso,dmy'"));
        server.insert("datestyle".into(), "ISO, DMY".into());
        d.synced_to(&mut server);
        assert_eq!(d.value("datestyle"), Some("ISO, DMY"));
        assert_eq!(d.sync_sql(&server), None);
        // A setting the server no longer has is gone for the client too.
        let row: Vec<Option<String>> = names.iter().map(|_| None).collect();
        c.refreshed(&names, &row, &mut server);
        assert_eq!(c.value("my.opt"), None);
        assert_eq!(c.value("search_path"), None);
    }

    #[test]
    fn sync_sets_differences_and_resets_foreign_settings() {
        let c = params(
            &[
                ("application_name".into(), "app".into()),
                ("extra_float_digits".into(), "3".into()),
            ],
            &[],
        );
        let mut server = server_of(&login());
        let sql = c.sync_sql(&server).unwrap();
        assert!(
            sql.contains("set_config(E'application_name', E'app', false)"),
            "{sql}"
        );
        assert!(
            sql.contains("set_config(E'extra_float_digits', E'3', false)"),
            "{sql}"
        );
        assert!(!sql.contains("RESET"), "{sql}");
        server.insert("application_name".into(), "app".into());
        let mut c2 = c.clone();
        c2.synced_to(&mut server);
        assert_eq!(c2.sync_sql(&server), None);
        // Another client without those settings gets them reset.
        let other = params(&[], &[]);
        let sql = other.sync_sql(&server).unwrap();
        assert!(sql.contains("RESET \"extra_float_digits\""), "{sql}");
        assert!(
            sql.contains("set_config(E'application_name', E'', false)"),
            "{sql}"
        );
    }
}
