//! Tests of parsing, validation and the upstream-URL mode.

use super::super::{
    AuthType, Config, ConfigDuration, Database, General, HostConfig, HostRole, LoadBalance,
    PoolMode, ReadYourWrites, ReplicaFallback, Route, ServerSslMode, SessionState, User,
    DEFAULT_AUTH_QUERY,
};
use super::*;
use std::time::Duration;

const EXAMPLE: &str = include_str!("../../pooler.toml.example");

const SCRAM: &str = "SCRAM-SHA-256$4096:cGd0aWRlLWV4YW1wbGUtcw==$tfM6crE0U35wHzABYZlPsQOHs9cSIsgYSIW/DoerpYQ=:xfck9cYYGm81aWMXatoRkRWPEJv6Wb2yvDzSuPbFwX4=";
const MD5: &str = "md531db687e942b9b9f99b11f2ee54c34ed";

/// A valid base to which each test appends its own lines.
const BASE: &str = "[databases.app]\nhost = \"db\"\n[users.app]\npassword = \"pw\"\n";

fn problems(text: &str) -> Vec<Problem> {
    match Config::from_toml_str(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

/// The problems on `key`, as messages.
fn on(text: &str, key: &str) -> Vec<String> {
    problems(text)
        .into_iter()
        .filter(|p| p.key == key)
        .map(|p| p.message)
        .collect()
}

/// Asserts that exactly one problem is reported, on `key`, containing `needle`.
#[track_caller]
fn only(text: &str, key: &str, needle: &str) {
    let ps = problems(text);
    assert_eq!(ps.len(), 1, "expected one problem on {key}, got {ps:#?}");
    assert_eq!(ps[0].key, key, "{ps:#?}");
    assert!(
        ps[0].message.contains(needle),
        "{:?} does not contain {needle:?}",
        ps[0].message
    );
}

#[track_caller]
fn ok(text: &str) -> Config {
    match Config::from_toml_str(text) {
        Ok(c) => c,
        Err(e) => panic!("unexpected problems:\n{e}"),
    }
}

fn with_pgtide(lines: &str) -> String {
    format!("[pgtide]\n{lines}\n{BASE}")
}

fn with_user(lines: &str) -> String {
    format!("[databases.app]\n[users.u]\n{lines}\n")
}

// --- the example file --------------------------------------------------------------------

#[test]
fn example_parses_and_validates() {
    let c = ok(EXAMPLE);
    assert_eq!(c.databases.len(), 2);
    assert_eq!(c.users.len(), 3);
    assert_eq!(c.pgtide.pool_size, 10);
    assert_eq!(
        c.databases["analytics"].dbname.as_deref(),
        Some("warehouse")
    );
    assert_eq!(c.auth_type("reporting"), AuthType::Md5);
    assert_eq!(c.auth_type("app"), AuthType::ScramSha256);
    assert_eq!(
        c.pool_settings("analytics", "app").pool_mode,
        PoolMode::Session
    );
    assert_eq!(c.users["admin"].password.as_deref(), Some(SCRAM));
    assert_eq!(c.users["reporting"].password.as_deref(), Some(MD5));
    // A primary with two replicas.
    let app = c.cluster_settings("app", "app").unwrap();
    let roles: Vec<HostRole> = app.hosts.iter().map(|h| h.role).collect();
    assert_eq!(
        roles,
        [HostRole::Primary, HostRole::Replica, HostRole::Replica]
    );
    assert_eq!(app.hosts[1].weight, 2);
    assert_eq!(app.hosts[2].port, 5432);
    assert_eq!(app.routing.max_replica_lag, Duration::from_secs(5));
    assert_eq!(app.routing.write_functions, ["audit.log_event"]);
    assert_eq!(
        c.cluster_settings("app", "reporting")
            .unwrap()
            .routing
            .route,
        Route::Replica
    );
    let analytics = c.cluster_settings("analytics", "app").unwrap();
    assert_eq!(analytics.hosts.len(), 1);
    assert_eq!(analytics.hosts[0].role, HostRole::Primary);
    assert_eq!(analytics.hosts[0].port, 5433);
}

/// Every `#key = value` and `# default: key = value` line of `[pgtide]` in the example
/// must be the real default.
#[test]
fn example_shows_the_real_defaults() {
    let section: String = EXAMPLE
        .split("\n[pgtide]\n")
        .nth(1)
        .and_then(|s| s.split("\n[databases.").next())
        .unwrap_or_default()
        .to_string();
    let mut shown = String::new();
    let mut keys = BTreeSet::new();
    for line in section.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = rest.strip_prefix("default: ").unwrap_or(rest);
        let Some((key, _)) = rest.split_once(" = ") else {
            continue;
        };
        if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            assert!(keys.insert(key.to_string()), "{key} shown twice");
            shown.push_str(rest);
            shown.push('\n');
        }
    }
    let all: BTreeSet<String> = GENERAL_KEYS.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(keys, all, "every [pgtide] option shows its default");
    let parsed: General = toml::from_str(&shown).expect("defaults parse");
    assert_eq!(format!("{parsed:?}"), format!("{:?}", General::default()));
}

// --- the key tables match the types --------------------------------------------------

fn serialized_keys<T: serde::Serialize>(value: &T) -> BTreeSet<String> {
    match toml::Value::try_from(value) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        other => panic!("not a table: {other:?}"),
    }
}

fn table_keys(keys: &[(&str, Kind)]) -> BTreeSet<String> {
    keys.iter().map(|(k, _)| k.to_string()).collect()
}

#[test]
fn key_tables_match_the_types() {
    assert_eq!(
        serialized_keys(&General::default()),
        table_keys(GENERAL_KEYS)
    );
    let d = Database {
        dbname: Some("x".into()),
        pool_mode: Some(PoolMode::Session),
        pool_size: Some(1),
        min_pool_size: Some(1),
        max_db_connections: Some(1),
        auth_user: Some("a".into()),
        auth_query: Some("q $1".into()),
        hosts: Some(vec![]),
        route: Some(Route::Auto),
        load_balance: Some(LoadBalance::Random),
        max_replica_lag_bytes: Some(1),
        max_replica_lag: Some(ConfigDuration::secs(1)),
        replica_fallback: Some(ReplicaFallback::Error),
        read_your_writes: Some(ReadYourWrites::Lsn),
        primary_reads: Some(false),
        routing_hints: Some(false),
        write_functions: Some(vec![]),
        primary_wait_timeout: Some(ConfigDuration::secs(1)),
        health_check_interval: Some(ConfigDuration::secs(1)),
        health_check_timeout: Some(ConfigDuration::secs(1)),
        health_check_failures: Some(1),
        health_check_successes: Some(1),
        health_check_backoff_max: Some(ConfigDuration::secs(1)),
        health_check_user: Some("mon".into()),
        query_timeout: Some(ConfigDuration::secs(1)),
        transaction_timeout: Some(ConfigDuration::secs(1)),
        server_tls_sslmode: Some(ServerSslMode::Require),
        server_tls_ca_file: Some("ca.pem".into()),
        server_tls_cert_file: Some("c.pem".into()),
        server_tls_key_file: Some("k.pem".into()),
        session_state: Some(SessionState::Reject),
        ..Database::default()
    };
    assert_eq!(serialized_keys(&d), table_keys(DATABASE_KEYS));
    let h = HostConfig {
        host: "h".into(),
        port: 1,
        role: HostRole::Auto,
        weight: 1,
    };
    assert_eq!(serialized_keys(&h), table_keys(HOST_KEYS));
    let u = User {
        password: Some("x".into()),
        auth_type: Some(AuthType::Md5),
        pool_mode: Some(PoolMode::Session),
        session_state: Some(SessionState::Reject),
        pool_size: Some(1),
        route: Some(Route::Primary),
        query_timeout: Some(ConfigDuration::secs(1)),
        transaction_timeout: Some(ConfigDuration::secs(2)),
    };
    assert_eq!(serialized_keys(&u), table_keys(USER_KEYS));
}

#[test]
fn timeouts_of_a_user_win_over_its_database() {
    let c = Config::from_toml_str(
        r#"
[pgtide]
query_timeout = "10s"
transaction_timeout = "1m"
[databases.app]
host = "h"
query_timeout = "20s"
[databases.other]
host = "h"
[users.batch]
password = "p"
query_timeout = "5m"
transaction_timeout = "0"
[users.web]
password = "p"
"#,
    )
    .expect("valid");
    let s = Duration::from_secs;
    assert_eq!(c.query_timeout("app", "batch"), Some(s(300)));
    assert_eq!(c.query_timeout("app", "web"), Some(s(20)));
    assert_eq!(c.query_timeout("other", "web"), Some(s(10)));
    // A user's 0 turns it off, whatever the database and [pgtide] say.
    assert_eq!(c.transaction_timeout("app", "batch"), None);
    assert_eq!(c.transaction_timeout("other", "web"), Some(s(60)));
}

#[test]
fn enum_tables_match_the_types() {
    for m in POOL_MODES {
        let v: PoolMode = toml::Value::String(m.to_string()).try_into().unwrap();
        assert_eq!(v.to_string(), *m);
    }
    for m in SESSION_STATES {
        let v: SessionState = toml::Value::String(m.to_string()).try_into().unwrap();
        assert_eq!(v.to_string(), *m);
    }
    for a in AUTH_TYPES {
        let v: AuthType = toml::Value::String(a.to_string()).try_into().unwrap();
        assert_eq!(v.to_string(), *a);
    }
    fn round_trip<T>(names: &[&str])
    where
        T: serde::de::DeserializeOwned + std::fmt::Display,
    {
        for n in names {
            let v: T = toml::Value::String(n.to_string()).try_into().unwrap();
            assert_eq!(v.to_string(), *n);
        }
    }
    round_trip::<HostRole>(HOST_ROLES);
    round_trip::<LoadBalance>(LOAD_BALANCES);
    round_trip::<ReplicaFallback>(REPLICA_FALLBACKS);
    round_trip::<ReadYourWrites>(READ_YOUR_WRITES);
    round_trip::<Route>(ROUTES);
}

// --- every problem, each with its key -------------------------------------------------

#[test]
fn three_mistakes_are_all_reported() {
    let text = r#"
[pgtide]
pool_size = "ten"
pool_mode = "statement"

[databases.app]
host = "db"
prot = 5433

[users.app]
password = "pw"
"#;
    let ps = problems(text);
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["pgtide.pool_mode", "pgtide.pool_size", "databases.app.prot"],
        "sections in a fixed order: {ps:#?}"
    );
    assert_eq!(
        ps[0].message,
        "\"statement\" is not allowed; use \"transaction\" or \"session\""
    );
    assert_eq!(ps[1].message, "expected an integer, got the string \"ten\"");
    assert!(
        ps[2].message.contains("did you mean \"port\"?"),
        "{}",
        ps[2].message
    );
    // And the Display has one line per problem, each starting with its key.
    let shown = ConfigError { problems: ps }.to_string();
    assert_eq!(shown.lines().count(), 3);
    assert!(shown.contains("pgtide.pool_size: expected an integer, got the string \"ten\""));
}

#[test]
fn shape_and_semantic_problems_are_reported_together() {
    let text = "[pgtide]\npool_size = true\nmax_client_conn = 0\n";
    let ps = problems(text);
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["pgtide.pool_size", "pgtide.max_client_conn", "databases"],
        "{ps:#?}"
    );
}

#[test]
fn unknown_keys_list_the_allowed_keys() {
    let ps = on(&with_pgtide("colour = 1"), "pgtide.colour");
    assert_eq!(ps.len(), 1);
    for (k, _) in GENERAL_KEYS {
        assert!(ps[0].contains(k), "{} lacks {k}", ps[0]);
    }
    assert!(ps[0].contains("allowed keys in [pgtide]"), "{}", ps[0]);

    let ps = on(
        &format!("{BASE}[databases.app2]\npasword = 1\n"),
        "databases.app2.pasword",
    );
    assert!(ps[0].contains("[databases.app2]"), "{}", ps[0]);
    assert!(ps[0].contains("host, port, dbname"), "{}", ps[0]);

    let ps = on(
        &format!("{BASE}[users.x]\npasword = \"p\"\n"),
        "users.x.pasword",
    );
    assert!(ps[0].contains("did you mean \"password\"?"), "{}", ps[0]);
    assert!(
        ps[0].contains("password, auth_type, pool_mode, session_state, pool_size"),
        "{}",
        ps[0]
    );

    only(
        &format!("{BASE}[database.x]\n"),
        "database",
        "did you mean \"databases\"?",
    );
    only(
        &format!("{BASE}[pgbouncer]\n"),
        "pgbouncer",
        "pgtide, databases, users",
    );
}

#[test]
fn names_that_are_not_bare_keys_are_quoted() {
    only(
        "[databases.\"my.db\"]\nport = 0\n",
        "databases.\"my.db\".port",
        "not a port",
    );
}

#[test]
fn wrong_types() {
    only(
        &with_pgtide("log_connections = \"yes\""),
        "pgtide.log_connections",
        "expected true or false, got the string \"yes\"",
    );
    only(
        &with_pgtide("max_client_conn = 1.5"),
        "pgtide.max_client_conn",
        "expected an integer, got the float 1.5",
    );
    only(
        &with_pgtide("pool_size = -1"),
        "pgtide.pool_size",
        "-1 is out of range",
    );
    only(
        &with_pgtide("pool_size = 4294967296"),
        "pgtide.pool_size",
        "out of range",
    );
    only(
        &with_pgtide("server_reset_query = 1"),
        "pgtide.server_reset_query",
        "expected a string, got the integer 1",
    );
    only(
        &with_pgtide("auth_type = 5"),
        "pgtide.auth_type",
        "expected a string (\"trust\", \"md5\", \"scram-sha-256\" or \"cert\")",
    );
    only(
        &with_pgtide("auth_type = \"password\""),
        "pgtide.auth_type",
        "\"password\" is not allowed; use \"trust\", \"md5\", \"scram-sha-256\" or \"cert\"",
    );
    only(
        &with_pgtide("track_extra_params = \"search_path\""),
        "pgtide.track_extra_params",
        "expected an array of strings",
    );
    only(
        &with_pgtide("track_extra_params = [\"a\", 2]"),
        "pgtide.track_extra_params[1]",
        "expected a string, got the integer 2",
    );
    only(
        &format!("pgtide = 3\n{BASE}"),
        "pgtide",
        "expected a table ([pgtide]), got the integer 3",
    );
    only("databases = []\n", "databases", "expected a table");
    only(
        &format!("{BASE}[databases]\nhost = \"x\"\n"),
        "databases.host",
        "describing one database",
    );
    only(
        &format!("{BASE}[databases.b]\nport = 70000\n"),
        "databases.b.port",
        "70000 is not a port; use 1 to 65535",
    );
    only(
        &format!("{BASE}[databases.b]\nport = \"5432\"\n"),
        "databases.b.port",
        "expected a port number",
    );
}

#[test]
fn a_wrongly_typed_password_is_not_echoed() {
    let ps = on(
        &with_user("password = 123456\nauth_type = \"md5\""),
        "users.u.password",
    );
    assert_eq!(ps, ["expected a string, got an integer"]);
}

#[test]
fn durations() {
    let c = ok(&with_pgtide(
        "query_wait_timeout = \"1m 30s\"\nserver_connect_timeout = 250\nserver_lifetime = \"0\"\nclient_idle_timeout = 0",
    ));
    assert_eq!(c.pgtide.query_wait_timeout.0.as_secs(), 90);
    assert_eq!(c.pgtide.server_connect_timeout.0.as_millis(), 250);
    assert_eq!(c.pgtide.server_lifetime.enabled(), None);
    only(
        &with_pgtide("shutdown_timeout = \"5 parsecs\""),
        "pgtide.shutdown_timeout",
        "\"5 parsecs\" is not a duration",
    );
    only(
        &with_pgtide("shutdown_timeout = -5"),
        "pgtide.shutdown_timeout",
        "-5 is negative",
    );
    only(
        &with_pgtide("shutdown_timeout = 1.5"),
        "pgtide.shutdown_timeout",
        "expected a duration",
    );
    only(
        &with_pgtide("shutdown_timeout = true"),
        "pgtide.shutdown_timeout",
        "got the boolean true",
    );
}

#[test]
fn listen_addresses() {
    assert_eq!(
        ok(&with_pgtide("listen = \"[::]:7000\""))
            .pgtide
            .listen
            .port(),
        7000
    );
    only(
        &with_pgtide("listen = \"localhost:6432\""),
        "pgtide.listen",
        "is not an IP address and port",
    );
    only(
        &with_pgtide("listen = \"10.1.2.3\""),
        "pgtide.listen",
        "has no port; write e.g. \"10.1.2.3:6432\"",
    );
    only(
        &with_pgtide("listen = \"::1\""),
        "pgtide.listen",
        "\"[::1]:6432\"",
    );
    only(
        &with_pgtide("listen = 6432"),
        "pgtide.listen",
        "expected an address",
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let ps = problems("[pgtide]\npool_size = 10\npool_mode = transaction\n");
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert!(
        ps[0]
            .message
            .starts_with("TOML syntax error at line 3, column 13"),
        "{}",
        ps[0].message
    );
    let ps = problems("[pgtide]\npool_size = 1\npool_size = 2\n");
    assert!(ps[0].message.contains("line 3"), "{}", ps[0].message);
    assert!(problems("[pgtide\n")[0].message.contains("line 1"));
}

// --- semantic rules ---------------------------------------------------------------------

#[test]
fn at_least_one_database() {
    only("", "databases", "no database is configured");
    only(
        "[users.u]\nauth_type = \"trust\"\n",
        "databases",
        "add a [databases.NAME] table",
    );
}

#[test]
fn pool_sizes() {
    only(
        &with_pgtide("pool_size = 0"),
        "pgtide.pool_size",
        "must be at least 1",
    );
    only(
        &with_pgtide("min_pool_size = 21"),
        "pgtide.min_pool_size",
        "21 is larger than pgtide.pool_size (20)",
    );
    ok(&with_pgtide("min_pool_size = 20"));
    only(
        &format!("{BASE}[databases.b]\npool_size = 0\n"),
        "databases.b.pool_size",
        "must be at least 1",
    );
    only(
        &format!("{BASE}[databases.b]\npool_size = 3\nmin_pool_size = 4\n"),
        "databases.b.min_pool_size",
        "min_pool_size 4 is larger than pool_size 3",
    );
    only(
        &format!("[pgtide]\nmin_pool_size = 5\n{BASE}[databases.b]\npool_size = 3\n"),
        "databases.b.pool_size",
        "inherited from pgtide.min_pool_size",
    );
    only(
        &format!("{BASE}[users.x]\nauth_type = \"trust\"\npool_size = 0\n"),
        "users.x.pool_size",
        "must be at least 1",
    );
    only(&format!("{BASE}[databases.app]\nmin_pool_size = 3\n[users.x]\nauth_type = \"trust\"\npool_size = 2\n").replace("[databases.app]\nhost = \"db\"\n", ""), "users.x.pool_size", "smaller than min_pool_size 3 of database \"app\"");
}

#[test]
fn limits() {
    only(
        &with_pgtide("max_client_conn = 0"),
        "pgtide.max_client_conn",
        "must be at least 1",
    );
    only(
        &with_pgtide("max_message_size = 1023"),
        "pgtide.max_message_size",
        "use 1024 (1 KiB) to 1073741824 (1 GiB)",
    );
    only(
        &with_pgtide("max_message_size = 1073741825"),
        "pgtide.max_message_size",
        "out of range",
    );
    ok(&with_pgtide("max_message_size = 1024"));
    ok(&with_pgtide("max_message_size = 1073741824"));
}

#[test]
fn databases() {
    only(
        "[databases.a]\nhost = \" \"\n",
        "databases.a.host",
        "must not be empty",
    );
    only(
        "[databases.a]\nport = 0\n",
        "databases.a.port",
        "not a port",
    );
    only(
        "[databases.a]\ndbname = \"\"\n",
        "databases.a.dbname",
        "must not be empty",
    );
    only(
        "[databases.\"\"]\n",
        "databases.\"\"",
        "a database name cannot be empty",
    );
    let c = ok("[databases.a]\nhost = \"::1\"\nport = 65535\n");
    assert_eq!(c.databases["a"].port, 65535);
}

#[test]
fn server_reset_query_may_be_empty() {
    assert_eq!(
        ok(&with_pgtide("server_reset_query = \"\""))
            .pgtide
            .server_reset_query,
        ""
    );
}

#[test]
fn track_extra_params_are_guc_names() {
    let c = ok(&with_pgtide(
        "track_extra_params = [\"search_path\", \"myext.some_setting2\"]",
    ));
    assert_eq!(c.pgtide.track_extra_params.len(), 2);
    only(
        &with_pgtide("track_extra_params = [\"ok\", \"search path\"]"),
        "pgtide.track_extra_params[1]",
        "\"search path\" is not a run-time parameter name",
    );
    only(
        &with_pgtide("track_extra_params = [\"\"]"),
        "pgtide.track_extra_params[0]",
        "not a run-time parameter name",
    );
    only(
        &with_pgtide("track_extra_params = [\"x;drop\"]"),
        "pgtide.track_extra_params[0]",
        "letters, digits",
    );
}

#[test]
fn passwords_and_auth_types() {
    // A password is needed unless the user is trusted.
    only(
        &with_user("auth_type = \"md5\""),
        "users.u.password",
        "required for auth_type md5",
    );
    only(
        &with_user("auth_type = \"scram-sha-256\""),
        "users.u.password",
        "required for auth_type scram-sha-256",
    );
    only(
        &with_user(""),
        "users.u.password",
        "required for auth_type scram-sha-256 (inherited from pgtide.auth_type)",
    );
    ok(&with_user("auth_type = \"trust\""));
    ok(&format!(
        "[pgtide]\nauth_type = \"trust\"\n{}",
        with_user("")
    ));
    only(
        &with_user("password = \"\"\nauth_type = \"trust\""),
        "users.u.password",
        "empty password",
    );

    // Plain passwords work with every method.
    for auth in AUTH_TYPES.iter().filter(|a| **a != "cert") {
        ok(&with_user(&format!(
            "password = \"pw\"\nauth_type = \"{auth}\""
        )));
    }
    // md5 with a SCRAM verifier is fine: PostgreSQL falls back to SCRAM.
    ok(&with_user(&format!(
        "password = \"{SCRAM}\"\nauth_type = \"md5\""
    )));
    ok(&with_user(&format!(
        "password = \"{SCRAM}\"\nauth_type = \"scram-sha-256\""
    )));
    // md5 hash: fine for md5, not for SCRAM.
    ok(&with_user(&format!(
        "password = \"{MD5}\"\nauth_type = \"md5\""
    )));
    only(
        &with_user(&format!(
            "password = \"{MD5}\"\nauth_type = \"scram-sha-256\""
        )),
        "users.u.password",
        "a SCRAM exchange cannot be checked against an md5 hash",
    );
    only(
        &with_user(&format!("password = \"{MD5}\"")),
        "users.u.password",
        "inherited from pgtide.auth_type",
    );
    // "md5" and 32 more characters must be hex.
    only(
        &with_user("password = \"md5zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\"\nauth_type = \"md5\""),
        "users.u.password",
        "not lowercase hex digits",
    );
    only(
        &with_user(&format!(
            "password = \"{}\"\nauth_type = \"md5\"",
            MD5.to_uppercase().replacen("MD5", "md5", 1)
        )),
        "users.u.password",
        "lowercase hex",
    );
    // Other lengths are plain passwords.
    ok(&with_user("password = \"md5-is-a-fine-prefix\""));
}

#[test]
fn scram_verifiers() {
    assert_eq!(check_scram_verifier(SCRAM), Ok(()));
    let (head, keys) = SCRAM.rsplit_once('$').unwrap();
    let (stored, server) = keys.split_once(':').unwrap();
    let cases = [
        ("SCRAM-SHA-256$4096:c2FsdA==".to_string(), "'$' between"),
        (
            "SCRAM-SHA-256$4096$a:b".to_string(),
            "':' between <iterations>",
        ),
        (SCRAM.replace("$4096:", "$0:"), "iteration count"),
        (SCRAM.replace("$4096:", "$many:"), "iteration count"),
        (SCRAM.replace("cGd0aWRlLWV4YW1wbGUtcw==", "***"), "salt"),
        (SCRAM.replace("cGd0aWRlLWV4YW1wbGUtcw==", ""), "salt"),
        (format!("{head}${stored}"), "':' between <StoredKey>"),
        (format!("{head}$!!!:{server}"), "StoredKey is not base64"),
        (
            format!("{head}${stored}:c2hvcnQ="),
            "ServerKey is 5 bytes, not 32",
        ),
    ];
    for (verifier, needle) in cases {
        let text = with_user(&format!("password = {verifier:?}"));
        only(&text, "users.u.password", needle);
        let ps = problems(&text);
        assert!(
            ps[0].message.contains("<base64 StoredKey>"),
            "{}",
            ps[0].message
        );
        assert!(
            !ps[0].message.contains(stored),
            "the verifier is not echoed"
        );
    }
}

#[test]
fn no_input_panics() {
    let texts = [
        "", "=", "[", "[[pgtide]]\n", "[[databases]]\n", "[users]\nx = []\n", "a.b.c = 1\n",
        "[databases.a]\nport = -1\n", "[pgtide]\nlisten = \"\u{1F600}\"\n",
        "[databases.\"\u{e9}\"]\n[users.\"\"]\npassword = \"md5\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\"\n",
        "[users.u]\npassword = \"SCRAM-SHA-256$\"\n", "x = \"\u{e9}\n",
    ];
    for t in texts {
        assert!(
            Config::from_toml_str(t).is_err(),
            "{t:?} should not be valid"
        );
    }
    assert_eq!(line_column("a\n\u{e9}\u{e9}x", 100), (2, 4));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
}

#[test]
fn validate_checks_configs_built_in_code() {
    let mut c = ok(BASE);
    assert_eq!(c.validate(), Ok(()));
    c.pgtide.pool_size = 0;
    c.users.insert(String::new(), User::default());
    let keys: Vec<String> = c
        .validate()
        .unwrap_err()
        .problems
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(
        keys,
        ["pgtide.pool_size", "users.\"\"", "users.\"\".password"]
    );
}

// --- hosts, routing and health checks -------------------------------------------------

fn with_db(lines: &str) -> String {
    format!("[databases.app]\n{lines}\n[users.app]\npassword = \"pw\"\n")
}

#[test]
fn host_and_port_mean_one_primary() {
    let c = ok(BASE);
    let s = c.cluster_settings("app", "app").unwrap();
    assert_eq!(
        s.hosts,
        [HostConfig {
            host: "db".into(),
            port: 5432,
            role: HostRole::Primary,
            weight: 1
        }]
    );
    assert!(c.cluster_settings("nope", "app").is_none());
}

#[test]
fn hosts_defaults() {
    let c = ok(&with_db(
        "hosts = [{ host = \"a\" }, { host = \"b\", port = 6000 }]",
    ));
    let s = c.cluster_settings("app", "app").unwrap();
    assert_eq!(s.hosts.len(), 2);
    assert_eq!(
        (s.hosts[0].port, s.hosts[0].role, s.hosts[0].weight),
        (5432, HostRole::Auto, 1)
    );
    assert_eq!(s.hosts[1].port, 6000);
}

#[test]
fn hosts_and_host_are_exclusive() {
    let text = with_db("host = \"x\"\nport = 5000\nhosts = [{ host = \"a\" }]");
    let ps = problems(&text);
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["databases.app.host", "databases.app.port"],
        "{ps:#?}"
    );
    assert!(ps[0].message.contains("either host or hosts"), "{ps:#?}");
    // Built in code: reported on hosts.
    let mut c = ok(BASE);
    c.databases.get_mut("app").unwrap().hosts = Some(vec![HostConfig {
        host: "a".into(),
        port: 5432,
        role: HostRole::Auto,
        weight: 1,
    }]);
    let e = c.validate().unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].key, "databases.app.hosts");
}

#[test]
fn hosts_entries_are_checked() {
    only(
        &with_db("hosts = []"),
        "databases.app.hosts",
        "at least one host",
    );
    only(
        &with_db("hosts = \"a\""),
        "databases.app.hosts",
        "expected an array of hosts",
    );
    only(
        &with_db("hosts = [\"a\"]"),
        "databases.app.hosts[0]",
        "expected a table",
    );
    only(
        &with_db("hosts = [{ port = 5 }]"),
        "databases.app.hosts[0].host",
        "missing",
    );
    only(
        &with_db("hosts = [{ host = \"a\", rol = \"replica\" }]"),
        "databases.app.hosts[0].rol",
        "did you mean \"role\"",
    );
    only(
        &with_db("hosts = [{ host = \"a\", role = \"standby\" }]"),
        "databases.app.hosts[0].role",
        "\"primary\", \"replica\" or \"auto\"",
    );
    only(
        &with_db("hosts = [{ host = \"a\", port = 70000 }]"),
        "databases.app.hosts[0].port",
        "not a port",
    );
    only(
        &with_db("hosts = [{ host = \"a\", weight = -1 }]"),
        "databases.app.hosts[0].weight",
        "out of range",
    );
    only(
        &with_db("hosts = [{ host = \" \" }]"),
        "databases.app.hosts[0].host",
        "must not be empty",
    );
    only(
        &with_db(
            "hosts = [{ host = \"a\", role = \"primary\" }, { host = \"b\", role = \"primary\" }]",
        ),
        "databases.app.hosts[1].role",
        "at most one host",
    );
    only(
        &with_db("hosts = [{ host = \"a\", role = \"replica\", weight = 0 }]"),
        "databases.app.hosts[0].weight",
        "at least 1",
    );
    ok(&with_db("hosts = [{ host = \"a\", role = \"auto\", weight = 0 }, { host = \"b\", role = \"primary\", weight = 0 }]"));
    only(
        &with_db("hosts = [{ host = \"a\" }, { host = \"a\", port = 5432 }]"),
        "databases.app.hosts[1]",
        "listed twice",
    );
    // Several mistakes in several entries are all reported.
    let ps = problems(&with_db(
        "hosts = [{ host = \"a\", role = \"x\" }, { host = 1 }, { port = 0 }]",
    ));
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "databases.app.hosts[0].role",
            "databases.app.hosts[1].host",
            "databases.app.hosts[2].port",
            "databases.app.hosts[2].host"
        ],
        "{ps:#?}"
    );
}

#[test]
fn routing_defaults() {
    let c = ok(BASE);
    let r = c.cluster_settings("app", "app").unwrap();
    assert_eq!(r.routing.route, Route::Auto);
    assert_eq!(r.routing.load_balance, LoadBalance::LeastOutstanding);
    assert_eq!(r.routing.max_replica_lag_bytes, 16 * 1024 * 1024);
    assert_eq!(r.routing.max_replica_lag, Duration::from_secs(10));
    assert_eq!(r.routing.replica_fallback, ReplicaFallback::Primary);
    assert_eq!(r.routing.read_your_writes, ReadYourWrites::Off);
    assert!(!r.routing.primary_reads);
    assert!(r.routing.routing_hints);
    assert!(r.routing.write_functions.is_empty());
    assert_eq!(r.routing.primary_wait_timeout, Duration::from_secs(10));
    assert_eq!(r.health.interval, Duration::from_secs(1));
    assert_eq!(r.health.timeout, Duration::from_secs(2));
    assert_eq!((r.health.failures, r.health.successes), (3, 2));
    assert_eq!(r.health.backoff_max, Duration::from_secs(30));
    assert_eq!(r.health, super::super::HealthSettings::default());
}

#[test]
fn routing_overrides() {
    only(
        &with_pgtide("route = \"primary\""),
        "pgtide.route",
        "unknown key",
    );
    let text = "[pgtide]\nload_balance = \"round_robin\"\nmax_replica_lag_bytes = 100\n\
         write_functions = [\"f\", \"audit.g\"]\nhealth_check_interval = \"200ms\"\n\
         health_check_failures = 5\n\
         [databases.app]\nhosts = [{ host = \"a\" }, { host = \"b\", role = \"replica\" }]\n\
         route = \"replica\"\nload_balance = \"random\"\nmax_replica_lag = 0\n\
         write_functions = [\"h\", \"f\"]\nhealth_check_successes = 4\nprimary_reads = true\n\
         [databases.other]\n\
         [users.app]\npassword = \"pw\"\n[users.boss]\npassword = \"pw\"\nroute = \"primary\"\n";
    let c = ok(text);
    let app = c.cluster_settings("app", "app").unwrap();
    assert_eq!(app.routing.route, Route::Replica);
    assert_eq!(app.routing.load_balance, LoadBalance::Random);
    assert_eq!(app.routing.max_replica_lag_bytes, 100);
    assert_eq!(app.routing.max_replica_lag, Duration::ZERO);
    assert_eq!(app.routing.write_functions, ["f", "audit.g", "h"]);
    assert!(app.routing.primary_reads);
    assert_eq!(app.health.interval, Duration::from_millis(200));
    assert_eq!((app.health.failures, app.health.successes), (5, 4));
    // The user's route wins over the database's.
    let boss = c.cluster_settings("app", "boss").unwrap();
    assert_eq!(boss.routing.route, Route::Primary);
    let other = c.cluster_settings("other", "app").unwrap();
    assert_eq!(other.routing.route, Route::Auto);
    assert_eq!(other.routing.load_balance, LoadBalance::RoundRobin);
    assert_eq!(other.routing.write_functions, ["f", "audit.g"]);
    assert_eq!(other.health.successes, 2);
}

#[test]
fn routing_values_are_checked() {
    only(
        &with_pgtide("load_balance = \"fastest\""),
        "pgtide.load_balance",
        "\"least_outstanding\", \"round_robin\" or \"random\"",
    );
    only(
        &with_pgtide("max_replica_lag_bytes = -1"),
        "pgtide.max_replica_lag_bytes",
        "negative",
    );
    only(
        &with_pgtide("max_replica_lag_bytes = \"16MB\""),
        "pgtide.max_replica_lag_bytes",
        "expected an integer",
    );
    only(
        &with_pgtide("max_replica_lag = \"ten\""),
        "pgtide.max_replica_lag",
        "not a duration",
    );
    only(
        &with_pgtide("replica_fallback = \"none\""),
        "pgtide.replica_fallback",
        "\"primary\" or \"error\"",
    );
    only(
        &with_pgtide("read_your_writes = true"),
        "pgtide.read_your_writes",
        "\"off\" or \"lsn\"",
    );
    only(
        &with_pgtide("primary_reads = \"yes\""),
        "pgtide.primary_reads",
        "true or false",
    );
    only(
        &with_pgtide("write_functions = [\"ok\", \"f()\"]"),
        "pgtide.write_functions[1]",
        "not a function name",
    );
    only(
        &with_pgtide("write_functions = [\"a.b.c\"]"),
        "pgtide.write_functions[0]",
        "not a function name",
    );
    only(
        &with_pgtide("health_check_interval = 0"),
        "pgtide.health_check_interval",
        "more than 0",
    );
    only(
        &with_pgtide("health_check_timeout = \"0\""),
        "pgtide.health_check_timeout",
        "more than 0",
    );
    only(
        &with_pgtide("health_check_failures = 0"),
        "pgtide.health_check_failures",
        "at least 1",
    );
    only(
        &with_pgtide("health_check_successes = 0"),
        "pgtide.health_check_successes",
        "at least 1",
    );
    only(
        &with_pgtide("health_check_backoff_max = \"500ms\""),
        "pgtide.health_check_backoff_max",
        "shorter than health_check_interval 1s",
    );
    only(
        &with_user("password = \"pw\"\nroute = \"standby\""),
        "users.u.route",
        "\"auto\", \"primary\" or \"replica\"",
    );
    // Per database, checked as resolved with [pgtide].
    only(
        &with_db("health_check_failures = 0"),
        "databases.app.health_check_failures",
        "at least 1",
    );
    only(
        &with_db("health_check_backoff_max = \"100ms\""),
        "databases.app.health_check_backoff_max",
        "(inherited from pgtide.health_check_interval)",
    );
    only(
        &with_db("health_check_interval = \"1m\""),
        "databases.app.health_check_interval",
        "inherited from pgtide.health_check_backoff_max",
    );
    only(
        &with_db("write_functions = [\"\"]"),
        "databases.app.write_functions[0]",
        "not a function name",
    );
    only(
        &with_db("route = \"replica\""),
        "databases.app.route",
        "no host that can be a replica",
    );
    ok(&with_db(
        "route = \"replica\"\nhosts = [{ host = \"a\", role = \"replica\" }]",
    ));
}

// --- the upstream URL -------------------------------------------------------------------

fn url_ok(url: &str) -> (String, Database, String, User) {
    match Config::from_upstream_url(url) {
        Ok(c) => {
            let (db, d) = c.databases.into_iter().next().unwrap();
            let (user, u) = c.users.into_iter().next().unwrap();
            (db, d, user, u)
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

#[track_caller]
fn url_err(url: &str, needle: &str) {
    match Config::from_upstream_url(url) {
        Ok(_) => panic!("{url} should be refused"),
        Err(e) => assert!(
            e.problems
                .iter()
                .any(|p| p.key == "upstream" && p.message.contains(needle)),
            "{url}: {e} does not contain {needle:?}"
        ),
    }
}

#[test]
fn upstream_url_basics() {
    let (db, d, user, u) = url_ok("postgres://alice:secret@db.example.com:6543/shop");
    assert_eq!(
        (db.as_str(), d.host.as_str(), d.port),
        ("shop", "db.example.com", 6543)
    );
    assert_eq!(user, "alice");
    assert_eq!(u.password.as_deref(), Some("secret"));
    assert_eq!(u.auth_type, Some(AuthType::ScramSha256));

    let (db, d, user, u) = url_ok("postgresql://bob@localhost");
    assert_eq!(
        (db.as_str(), d.host.as_str(), d.port),
        ("bob", "localhost", 5432)
    );
    assert_eq!(user, "bob");
    assert_eq!(u.password, None);
    assert_eq!(u.auth_type, Some(AuthType::Trust));

    let (.., u) = url_ok("postgres://bob:@localhost/x");
    assert_eq!(u.password, None);
}

#[test]
fn upstream_url_percent_decoding() {
    let (db, _, user, u) = url_ok("postgres://al%40ice:p%40ss+w%2Frd%3A%25%20x@h/my%20db");
    assert_eq!(user, "al@ice");
    // '+' is not a space in the userinfo.
    assert_eq!(u.password.as_deref(), Some("p@ss+w/rd:% x"));
    assert_eq!(db, "my db");
    let (.., u) = url_ok("postgres://u:caf%C3%A9@h/d");
    assert_eq!(u.password.as_deref(), Some("caf\u{e9}"));
    url_err("postgres://u:%FF@h/d", "password is not valid UTF-8");
}

#[test]
fn upstream_url_ipv6() {
    let (_, d, ..) = url_ok("postgres://u:p@[::1]:5433/d");
    assert_eq!((d.host.as_str(), d.port), ("::1", 5433));
    let (_, d, ..) = url_ok("postgresql://u@[2001:db8::7]/d");
    assert_eq!(d.host, "2001:db8::7");
    let (_, d, ..) = url_ok("postgres://u@10.0.0.1/d");
    assert_eq!(d.host, "10.0.0.1");
}

#[test]
fn upstream_url_parameters() {
    for mode in ["disable", "allow", "prefer"] {
        url_ok(&format!("postgres://u:p@h/d?sslmode={mode}"));
    }
    url_ok("postgres://u:p@h/d?application_name=web&sslmode=disable");
    let (_, d, ..) = url_ok("postgres://u:p@h/d?sslmode=require");
    assert_eq!(d.server_tls_sslmode, Some(ServerSslMode::Require));
    let (_, d, ..) = url_ok("postgres://u:p@h/d?sslmode=verify-full&sslrootcert=/etc/ca.pem");
    assert_eq!(d.server_tls_sslmode, Some(ServerSslMode::VerifyFull));
    assert_eq!(d.server_tls_ca_file.as_deref(), Some("/etc/ca.pem"));
    let (_, d, ..) = url_ok("postgres://u:p@h/d");
    assert_eq!(d.server_tls_sslmode, Some(ServerSslMode::Prefer));
    for mode in ["verify-ca", "verify-full"] {
        url_err(
            &format!("postgres://u:p@h/d?sslmode={mode}"),
            "needs sslrootcert=",
        );
    }
    url_err(
        "postgres://u:p@h/d?sslmode=sometimes",
        "not a valid sslmode",
    );
    url_err(
        "postgres://u:p@h/d?connect_timeout=5",
        "unknown URL parameter \"connect_timeout\"",
    );
    // All problems at once.
    let e = Config::from_upstream_url("postgres://h/d/e?sslmode=verify-ca&x=1").unwrap_err();
    assert_eq!(e.problems.len(), 4, "{e}");
}

#[test]
fn upstream_url_mistakes() {
    url_err(
        "mysql://u:p@h/d",
        "must start with postgres:// or postgresql://",
    );
    url_err("postgres://h/d", "must name a user");
    url_err("postgres://u:p@h:0/d", "not a port");
    url_err("postgres://u:pa#ss@h/d", "not a valid URL");
    url_err("postgres://u@h/d#x", "'#' fragment");
    url_err("postgres://u@h/a/b", "single database name");
    // The password is never echoed.
    let e = Config::from_upstream_url("postgres://u:hunter2@h:99999/d").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = Config::from_upstream_url("not a url hunter2").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

// --- credential sources and the failed-login slowdown ------------------------------------

#[test]
fn auth_sources_and_slowdown() {
    let c = ok(&with_pgtide(
        "auth_user = \"lookup\"\nauth_file = \"users.txt\"",
    ));
    assert_eq!(c.auth_query("app"), Some(("lookup", DEFAULT_AUTH_QUERY)));
    assert_eq!(c.auth_query("nope"), Some(("lookup", DEFAULT_AUTH_QUERY)));
    let c = ok(&format!(
        "{}[databases.other]\nauth_user = \"\"\n[databases.third]\nauth_user = \"l3\"\nauth_query = \"SELECT u, p FROM f($1)\"\n",
        with_pgtide("auth_user = \"lookup\"")
    ));
    assert_eq!(c.auth_query("other"), None);
    assert_eq!(
        c.auth_query("third"),
        Some(("l3", "SELECT u, p FROM f($1)"))
    );
    assert_eq!(ok("[databases.app]\n").auth_query("app"), None);

    // With an auth_file or auth_user, a [users] entry needs no password.
    ok("[pgtide]\nauth_file = \"u.txt\"\n[databases.app]\n[users.u]\npool_size = 3\n");
    ok("[pgtide]\n[databases.app]\nauth_user = \"l\"\n[users.u]\npool_size = 3\n");
    only(
        "[databases.app]\n[users.u]\npool_size = 3\n",
        "users.u.password",
        "an auth_file or auth_user",
    );

    only(
        &with_pgtide("auth_query = \"SELECT 1\""),
        "pgtide.auth_query",
        "does not use $1",
    );
    only(
        &with_pgtide("auth_query = \"SELECT $1, $2\""),
        "pgtide.auth_query",
        "only one parameter",
    );
    only(
        "[databases.app]\nauth_query = \" \"\n",
        "databases.app.auth_query",
        "must not be empty",
    );
    only(
        &with_pgtide("auth_failure_delay = \"5s\"\nauth_failure_delay_max = \"1s\""),
        "pgtide.auth_failure_delay_max",
        "at least auth_failure_delay",
    );
    only(
        &with_pgtide("auth_failure_delay_max = \"2m\""),
        "pgtide.auth_failure_delay_max",
        "client_login_timeout",
    );
    // The slowdown switched off: no constraint.
    ok(&with_pgtide(
        "auth_failure_threshold = 0\nauth_failure_delay_max = \"2m\"",
    ));
    only(
        &with_pgtide("auth_file = \"  \""),
        "pgtide.auth_file",
        "white space",
    );
}

#[test]
fn auth_file_paths_are_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgtide.toml");
    std::fs::write(
        &path,
        "[pgtide]\nauth_file = \"userlist.txt\"\nauth_hba_file = \"/etc/hba.conf\"\n[databases.app]\n",
    )
    .unwrap();
    let c = Config::from_file(&path).unwrap();
    assert_eq!(
        c.pgtide.auth_file,
        dir.path().join("userlist.txt").to_string_lossy()
    );
    assert_eq!(c.pgtide.auth_hba_file, "/etc/hba.conf");
}

// --- admin console -------------------------------------------------------------------

#[test]
fn admin_users_must_be_configured_users() {
    let c = ok("[pgtide]\nadmin_users = [\"u\"]\n[databases.app]\n[users.u]\npassword = \"p\"\n");
    assert_eq!(c.pgtide.admin_users, ["u"]);
    only(
        "[pgtide]\nadmin_users = [\"u\", \"ghost\"]\n[databases.app]\n[users.u]\npassword = \"p\"\n",
        "pgtide.admin_users[1]",
        "\"ghost\" is not a configured user",
    );
    only(
        "[pgtide]\nadmin_users = \"u\"\n[databases.app]\n[users.u]\npassword = \"p\"\n",
        "pgtide.admin_users",
        "an array of strings",
    );
}

#[test]
fn the_admin_database_names_are_reserved() {
    for name in ["pgtide", "pgbouncer"] {
        only(
            &format!("[databases.{name}]\n[users.u]\npassword = \"p\"\n"),
            &format!("databases.{name}"),
            "reserved for the admin console",
        );
    }
}

// --- TLS ---------------------------------------------------------------------------------

fn tls_problems(extra: &str) -> Vec<(String, String)> {
    let text = format!(
        "[pgtide]\n{extra}\n[databases.app]\nhost = \"127.0.0.1\"\n[users.app]\npassword = \"x\"\n"
    );
    match Config::from_toml_str(&text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.into_iter().map(|p| (p.key, p.message)).collect(),
    }
}

#[test]
fn tls_defaults() {
    let g = General::default();
    assert_eq!(g.client_tls_sslmode, super::super::ClientSslMode::Disable);
    assert_eq!(g.server_tls_sslmode, ServerSslMode::Prefer);
    assert!(tls_problems("").is_empty());
}

#[test]
fn client_tls_needs_certificate_and_key() {
    let p = tls_problems("client_tls_sslmode = \"require\"");
    let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["pgtide.client_tls_cert_file", "pgtide.client_tls_key_file"]
    );
    assert!(
        p[0].1
            .contains("required when client_tls_sslmode is \"require\""),
        "{p:?}"
    );
    let p = tls_problems(
        "client_tls_sslmode = \"verify-ca\"\nclient_tls_cert_file = \"c\"\nclient_tls_key_file = \"k\"",
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "pgtide.client_tls_ca_file");
    let p = tls_problems("client_tls_sslmode = \"sometimes\"");
    assert_eq!(p[0].0, "pgtide.client_tls_sslmode");
    assert!(p[0].1.contains("\"verify-full\""), "{p:?}");
}

#[test]
fn client_tls_files_without_a_mode_are_an_error() {
    let p = tls_problems("client_tls_cert_file = \"c\"");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "pgtide.client_tls_sslmode");
}

#[test]
fn cert_auth_needs_client_certificates() {
    let p = tls_problems("auth_type = \"cert\"");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "pgtide.client_tls_ca_file");
    assert!(p[0].1.contains("auth_type \"cert\""), "{p:?}");
    let ok = tls_problems(
        "auth_type = \"cert\"\nclient_tls_sslmode = \"verify-full\"\nclient_tls_cert_file = \"c\"\nclient_tls_key_file = \"k\"\nclient_tls_ca_file = \"ca\"",
    );
    assert!(ok.is_empty(), "{ok:?}");
}

#[test]
fn server_tls_settings_and_overrides() {
    let p = tls_problems("server_tls_sslmode = \"verify-full\"");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "pgtide.server_tls_ca_file");
    let p = tls_problems("server_tls_cert_file = \"c\"");
    assert_eq!(p[0].0, "pgtide.server_tls_key_file");
    let text = "[pgtide]\nserver_tls_ca_file = \"/ca.pem\"\n[databases.app]\nserver_tls_sslmode = \"verify-ca\"\n[databases.other]\nserver_tls_sslmode = \"disable\"\nserver_tls_ca_file = \"/other.pem\"\n[users.app]\npassword = \"x\"\n";
    let c = Config::from_toml_str(text).expect("valid");
    let app = c.server_tls("app");
    assert_eq!(app.sslmode, ServerSslMode::VerifyCa);
    assert_eq!(app.ca_file, "/ca.pem");
    let other = c.server_tls("other");
    assert_eq!(other.sslmode, ServerSslMode::Disable);
    assert_eq!(other.ca_file, "/other.pem");
    let text =
        "[databases.app]\nserver_tls_sslmode = \"verify-full\"\n[users.app]\npassword = \"x\"\n";
    let e = Config::from_toml_str(text).expect_err("no CA");
    assert_eq!(e.problems[0].key, "databases.app.server_tls_ca_file");
}

#[test]
fn health_checks_log_in_as_a_chosen_user_never_a_console_only_one() {
    let user = |p: &str| User {
        password: Some(p.into()),
        ..User::default()
    };
    let mut c = Config::default();
    c.databases.insert("app".into(), Database::default());
    // "admin" sorts first, but is a console user.
    c.users.insert("admin".into(), user("adminpass"));
    c.users.insert("app".into(), user("apppass"));
    c.users
        .insert("web".into(), user("SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"));
    c.pgtide.admin_users = vec!["admin".into()];
    let plain = |p: &str| !p.starts_with("SCRAM-SHA-256$");
    assert_eq!(
        c.health_check_login("app", &[], plain),
        Some(("app", Some("apppass")))
    );
    // Named: globally, then per database; the password from auth_file if not in [users].
    let file = vec![("mon".to_string(), "monpass".to_string())];
    c.pgtide.health_check_user = "web".into();
    assert_eq!(c.health_check_login("app", &file, plain).unwrap().0, "web");
    c.databases.get_mut("app").unwrap().health_check_user = Some("mon".into());
    assert_eq!(
        c.health_check_login("app", &file, plain),
        Some(("mon", Some("monpass")))
    );
    // Only console users: the first of them, rather than none.
    let mut only = Config::default();
    only.users.insert("admin".into(), user("x"));
    only.pgtide.admin_users = vec!["admin".into()];
    assert_eq!(
        only.health_check_login("app", &[], plain).unwrap().0,
        "admin"
    );
}
