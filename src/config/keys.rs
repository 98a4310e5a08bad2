//! The one table of `[pgtide]` settings that says, per key, whether a reload applies it
//! live or it needs a restart. `reload` keeps the running value of every restart key
//! ([`keep_restart_settings`]), `SHOW CONFIG` reports it, `check-config` tells which of a
//! file's settings need one, and tests hold `pooler.toml.example` and the README to it.

use serde::Deserialize;

use super::General;

/// How a change of a setting takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// A reload (SIGHUP, RELOAD) applies it.
    Live,
    /// Only a restart applies it; a reload reports the change and keeps the running
    /// value.
    Restart,
}

use Reload::{Live, Restart};

/// Every `[pgtide]` key and how it reloads. A test checks that this lists every field of
/// [`General`] exactly once.
pub const GENERAL_KEYS: &[(&str, Reload)] = &[
    // Sockets and threads are set up once.
    ("listen", Restart),
    ("metrics_listen", Restart),
    ("so_reuseport", Restart),
    ("peer_listen", Restart),
    // In every cancel key handed out.
    ("peer_id", Restart),
    ("worker_threads", Restart),
    // Built once at start.
    ("collect_metrics", Restart),
    ("prepared_statement_cache_size", Restart),
    ("prepared_statement_cache_bytes", Restart),
    ("auth_query_cache_ttl", Restart),
    ("auth_failure_threshold", Restart),
    ("auth_failure_delay", Restart),
    ("auth_failure_delay_max", Restart),
    // The TLS holders are built from the modes and paths; the files are read again on
    // every reload.
    ("client_tls_sslmode", Restart),
    ("client_tls_cert_file", Restart),
    ("client_tls_key_file", Restart),
    ("client_tls_ca_file", Restart),
    ("server_tls_sslmode", Restart),
    ("server_tls_ca_file", Restart),
    ("server_tls_cert_file", Restart),
    ("server_tls_key_file", Restart),
    // Everything else applies live.
    ("pool_mode", Live),
    ("session_state", Live),
    ("pool_size", Live),
    ("min_pool_size", Live),
    ("max_db_connections", Live),
    ("max_client_conn", Live),
    ("query_wait_timeout", Live),
    ("server_connect_timeout", Live),
    ("server_connect_retries", Live),
    ("server_connect_backoff", Live),
    ("server_idle_timeout", Live),
    ("server_lifetime", Live),
    ("idle_transaction_timeout", Live),
    ("query_timeout", Live),
    ("transaction_timeout", Live),
    ("client_idle_timeout", Live),
    ("client_login_timeout", Live),
    ("shutdown_timeout", Live),
    ("shutdown_delay", Live),
    ("peers", Live),
    ("server_reset_query", Live),
    ("auth_type", Live),
    ("auth_file", Live),
    ("auth_hba_file", Live),
    ("auth_user", Live),
    ("auth_query", Live),
    ("track_extra_params", Live),
    ("max_message_size", Live),
    ("log_connections", Live),
    ("max_prepared_statements", Live),
    ("admin_users", Live),
    ("load_balance", Live),
    ("max_replica_lag_bytes", Live),
    ("max_replica_lag", Live),
    ("replica_fallback", Live),
    ("read_your_writes", Live),
    ("primary_reads", Live),
    ("routing_hints", Live),
    ("write_functions", Live),
    ("primary_wait_timeout", Live),
    ("health_check_interval", Live),
    ("health_check_timeout", Live),
    ("health_check_failures", Live),
    ("health_check_successes", Live),
    ("health_check_backoff_max", Live),
    ("health_check_user", Live),
];

/// How a change of `key` takes effect; `None` for a key that does not exist.
pub fn reload_of(key: &str) -> Option<Reload> {
    GENERAL_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, r)| *r)
}

/// The keys that need a restart, in table order.
pub fn restart_keys() -> impl Iterator<Item = &'static str> {
    GENERAL_KEYS
        .iter()
        .filter(|(_, r)| *r == Restart)
        .map(|(k, _)| *k)
}

/// `[pgtide]` as a TOML table (every key, at its value).
pub fn as_table(g: &General) -> toml::Table {
    toml::Table::try_from(g).unwrap_or_default()
}

/// Puts the running value of every restart key back into `new` (a reload), and returns
/// the keys whose value the file changed, with the old and new values.
pub fn keep_restart_settings(old: &General, new: &mut General) -> Vec<String> {
    let (o, mut n) = (as_table(old), as_table(new));
    let mut changed = Vec::new();
    for key in restart_keys() {
        if o.get(key) == n.get(key) {
            continue;
        }
        let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
        changed.push(format!(
            "{key} ({} -> {})",
            show(o.get(key)),
            show(n.get(key))
        ));
        match o.get(key) {
            Some(v) => n.insert(key.to_string(), v.clone()),
            None => n.remove(key),
        };
    }
    if !changed.is_empty() {
        match General::deserialize(toml::Value::Table(n)) {
            Ok(kept) => *new = kept,
            // Cannot happen for a table made from a General; keep everything running.
            Err(_) => *new = old.clone(),
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_table_lists_every_setting_once() {
        let fields: BTreeSet<String> = as_table(&General::default()).keys().cloned().collect();
        let listed: Vec<&str> = GENERAL_KEYS.iter().map(|(k, _)| *k).collect();
        let unique: BTreeSet<String> = listed.iter().map(|k| k.to_string()).collect();
        assert_eq!(unique.len(), listed.len(), "a key is listed twice");
        assert_eq!(fields, unique, "GENERAL_KEYS and General's fields differ");
    }

    #[test]
    fn a_reload_keeps_the_running_value_of_restart_keys() {
        let old = General::default();
        let mut new = General {
            listen: "127.0.0.1:7777".parse().unwrap(),
            pool_size: 3,
            worker_threads: 4,
            ..General::default()
        };
        let changed = keep_restart_settings(&old, &mut new);
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert!(changed[0].starts_with("listen (") && changed[1].starts_with("worker_threads ("));
        assert_eq!(new.listen, old.listen);
        assert_eq!(new.worker_threads, old.worker_threads);
        // Live keys keep the file's value.
        assert_eq!(new.pool_size, 3);
        let mut same = General::default();
        assert!(keep_restart_settings(&old, &mut same).is_empty());
    }

    /// The paragraph of `pooler.toml.example` that documents `key` (its comment block
    /// and the key's line), `None` when the example does not show the key.
    fn paragraph<'a>(example: &'a str, key: &str) -> Option<String> {
        let lines: Vec<&'a str> = example.lines().collect();
        let at = lines.iter().position(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })?;
        // The key's line and the key lines right above it (keys documented together),
        // then the comment lines above those.
        let is_key = |l: &str| l.contains(" = ") && !l.starts_with("# ");
        let mut start = at;
        while start > 0 && is_key(lines[start - 1]) {
            start -= 1;
        }
        while start > 0 && lines[start - 1].starts_with('#') && !is_key(lines[start - 1]) {
            start -= 1;
        }
        Some(lines[start..=at].join("\n"))
    }

    #[test]
    fn the_example_says_which_keys_need_a_restart() {
        let example = include_str!("../../pooler.toml.example");
        let pgtide = example
            .split("\n[databases")
            .next()
            .expect("the example has a [pgtide] section");
        for (key, reload) in GENERAL_KEYS {
            let p = paragraph(pgtide, key)
                .unwrap_or_else(|| panic!("pooler.toml.example does not show {key}"));
            let says = p.contains("Needs a restart to change");
            match reload {
                Restart => assert!(
                    says,
                    "{key} needs a restart; its paragraph does not say so:\n{p}"
                ),
                Live => assert!(
                    !says,
                    "{key} applies live; its paragraph says it needs a restart:\n{p}"
                ),
            }
        }
    }

    #[test]
    fn the_readme_lists_the_restart_keys() {
        let readme = include_str!("../../README.md");
        let at = readme
            .find("What needs a restart:")
            .expect("the README says what needs a restart");
        // The first sentence lists them; `prefix_*` stands for every key it starts.
        let rest = &readme[at..];
        let end = [". ", ".\n"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min()
            .unwrap_or(rest.len());
        let para = &rest[..end];
        let named: BTreeSet<&str> =
            para.split('`')
                .skip(1)
                .step_by(2)
                .flat_map(|w| {
                    GENERAL_KEYS.iter().map(|(k, _)| *k).filter(move |k| {
                        match w.strip_suffix('*') {
                            Some(prefix) => k.starts_with(prefix),
                            None => *k == w,
                        }
                    })
                })
                .collect();
        let expected: BTreeSet<&str> = restart_keys().collect();
        assert_eq!(named, expected, "README: {para}");
    }
}
