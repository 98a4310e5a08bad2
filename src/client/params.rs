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
use std::sync::OnceLock;

use crate::router::lexer::{any_statement, contains_ci, has_word};
use crate::server::{quote_ident, quote_literal};

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

#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    /// Lower-case name -> value the client should see.
    values: HashMap<String, String>,
    /// Lower-case names that are synced to servers.
    synced: Vec<String>,
    /// Lower-case names the server reports with ParameterStatus.
    reported: Vec<String>,
    /// A keyed hash of `values` and `synced`, renewed on every change: equal
    /// fingerprints mean equal settings, so a server made to match one client matches
    /// every client with the same settings without comparing them one by one.
    fingerprint: u64,
}

/// The process's random key for [`ClientParams::fingerprint`]: collisions cannot be
/// chosen by a client.
fn fingerprint_key() -> &'static RandomState {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new)
}

impl ClientParams {
    /// `login` is the ParameterStatus set of the pool's servers; `startup` the client's
    /// settings (startup packet and `options`), `extras` the configured extra names.
    pub fn new(
        login: &[(String, String)],
        startup: &[(String, String)],
        extras: &[String],
    ) -> Self {
        let mut values = HashMap::new();
        let mut reported = Vec::new();
        for (k, v) in login {
            let k = k.to_ascii_lowercase();
            reported.push(k.clone());
            values.insert(k, v.clone());
        }
        let mut synced: Vec<String> = TRACKED.iter().map(|s| s.to_string()).collect();
        for e in extras {
            synced.push(e.to_ascii_lowercase());
        }
        for (k, v) in startup {
            let k = k.to_ascii_lowercase();
            if READ_ONLY.contains(&k.as_str()) {
                continue;
            }
            values.insert(k.clone(), v.clone());
            synced.push(k);
        }
        synced.sort();
        synced.dedup();
        let mut p = ClientParams {
            values,
            synced,
            reported,
            fingerprint: 0,
        };
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
        self.synced.hash(&mut h);
        let mut values: Vec<(&String, &String)> = self.values.iter().collect();
        values.sort_unstable();
        values.hash(&mut h);
        self.fingerprint = h.finish();
    }

    /// The ParameterStatus set this client sees at login: the pool's, with the client's
    /// own values for the reported names it set.
    pub fn login_status<'a>(
        &'a self,
        login: &'a [(String, String)],
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        login.iter().map(|(k, v)| {
            let own = self.values.get(&k.to_ascii_lowercase()).map(String::as_str);
            (k.as_str(), own.unwrap_or(v.as_str()))
        })
    }

    fn is_reported(&self, k: &str) -> bool {
        self.reported.iter().any(|r| r == k)
    }

    /// The client's current value of `name` (lower-case), if known.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A ParameterStatus the client saw while it had a server.
    pub fn observe(&mut self, name: &str, value: &str) {
        let k = name.to_ascii_lowercase();
        match self.values.get_mut(&k) {
            Some(v) if v == value => return,
            Some(v) => *v = value.to_string(),
            None => {
                self.values.insert(k, value.to_string());
            }
        }
        self.refingerprint();
    }

    /// The statement that makes a server with `server` parameters match this client,
    /// or `None` when they match already.
    pub fn sync_sql(&self, server: &HashMap<String, String>) -> Option<String> {
        let mut sets = Vec::new();
        for k in &self.synced {
            if let Some(v) = self.values.get(k) {
                if server.get(k) != Some(v) {
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
            if !self.values.contains_key(k) && !READ_ONLY.contains(&k.as_str()) {
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
        server.retain(|k, _| self.values.contains_key(k) || READ_ONLY.contains(&k.as_str()));
        for k in &self.synced {
            if let Some(v) = self.values.get_mut(k) {
                if self.reported.iter().any(|r| r == k) {
                    if let Some(sv) = server.get(k) {
                        *v = sv.clone();
                    }
                } else {
                    server.insert(k.clone(), v.clone());
                }
            }
        }
        self.refingerprint();
    }

    /// The query that reads back the unreported parameters after a SET, with the names
    /// in the order of its columns.
    pub fn refresh_sql(&self, server: &HashMap<String, String>) -> Option<(String, Vec<String>)> {
        let mut names: Vec<String> = self
            .synced
            .iter()
            .chain(server.keys())
            .filter(|k| !self.is_reported(k))
            .cloned()
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
                    self.values.insert(k.clone(), v.clone());
                    server.insert(k.clone(), v.clone());
                    if !self.synced.contains(k) {
                        self.synced.push(k.clone());
                    }
                }
                None => {
                    self.values.remove(k);
                    server.remove(k);
                }
            }
        }
        self.refingerprint();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn login() -> Vec<(String, String)> {
        vec![
            ("DateStyle".into(), "ISO, MDY".into()),
            ("application_name".into(), "".into()),
            ("server_version".into(), "15".into()),
        ]
    }

    #[test]
    fn sync_sets_differences_and_resets_foreign_settings() {
        let c = ClientParams::new(
            &login(),
            &[
                ("application_name".into(), "app".into()),
                ("extra_float_digits".into(), "3".into()),
            ],
            &[],
        );
        let mut server: HashMap<String, String> = login()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
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
        let other = ClientParams::new(&login(), &[], &[]);
        let sql = other.sync_sql(&server).unwrap();
        assert!(sql.contains("RESET \"extra_float_digits\""), "{sql}");
        assert!(
            sql.contains("set_config(E'application_name', E'', false)"),
            "{sql}"
        );
    }
}
