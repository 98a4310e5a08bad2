//! Parsing with precise error reports, semantic checks, and the upstream-URL quick mode.
//!
//! A document is checked in three passes, and every problem of every pass is reported:
//! 1. TOML syntax (`toml::Table`), with the line and column of the error;
//! 2. shape: a walker checks each key against a table of allowed keys per section and
//!    checks each value on its own against the key's [`Kind`]; unknown and invalid
//!    keys are reported and dropped;
//! 3. meaning: what is left is deserialized into [`Config`] and [`semantic_problems`]
//!    checks the rules that span several keys (pool sizes, passwords and auth types...).
//!    Problems on keys already reported in pass 2 are not reported twice.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use toml::{Table, Value};

use super::{AuthType, Config, ConfigDuration, Database, General, HostRole, Route, User};

/// Every problem found in a configuration, each with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem: the dotted key (`databases.app.port`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    pub fn single(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem::new(key, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}", p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Pass 2: the shape of the document.

/// What a key's value must look like.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Bool,
    U32,
    /// A u32 that must be at least 1 (0 is reported by the semantic checks).
    Size,
    Port,
    Str,
    /// A string that is never echoed back in an error message.
    Secret,
    Duration,
    Enum(&'static [&'static str]),
    Listen,
    StrList,
    /// A non-negative integer up to i64::MAX (TOML's range).
    U64,
    /// `hosts = [{ host, port, role, weight }, ...]`.
    Hosts,
    /// A table of strings (`[pgtide.peers]`: `1 = "127.0.0.1:16432"`).
    StrMap,
}

pub(super) const POOL_MODES: &[&str] = &["transaction", "session"];
pub(super) const SESSION_STATES: &[&str] = &["pin", "reject"];
pub(super) const AUTH_TYPES: &[&str] = &["trust", "md5", "scram-sha-256", "cert"];
pub(super) const CLIENT_SSLMODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];
pub(super) const SERVER_SSLMODES: &[&str] =
    &["disable", "prefer", "require", "verify-ca", "verify-full"];
pub(super) const HOST_ROLES: &[&str] = &["primary", "replica", "auto"];
pub(super) const LOAD_BALANCES: &[&str] = &["least_outstanding", "round_robin", "random"];
pub(super) const REPLICA_FALLBACKS: &[&str] = &["primary", "error"];
pub(super) const READ_YOUR_WRITES: &[&str] = &["off", "lsn"];
pub(super) const ROUTES: &[&str] = &["auto", "primary", "replica"];

/// The keys of one entry of `hosts`.
pub(super) const HOST_KEYS: &[(&str, Kind)] = &[
    ("host", Kind::Str),
    ("port", Kind::Port),
    ("role", Kind::Enum(HOST_ROLES)),
    ("weight", Kind::U32),
];

/// The routing and health-check keys, allowed in `[pgtide]` and in `[databases.NAME]`.
const ROUTING_KEYS: [(&str, Kind); 15] = [
    ("load_balance", Kind::Enum(LOAD_BALANCES)),
    ("max_replica_lag_bytes", Kind::U64),
    ("max_replica_lag", Kind::Duration),
    ("replica_fallback", Kind::Enum(REPLICA_FALLBACKS)),
    ("read_your_writes", Kind::Enum(READ_YOUR_WRITES)),
    ("primary_reads", Kind::Bool),
    ("routing_hints", Kind::Bool),
    ("write_functions", Kind::StrList),
    ("primary_wait_timeout", Kind::Duration),
    ("health_check_interval", Kind::Duration),
    ("health_check_timeout", Kind::Duration),
    ("health_check_failures", Kind::U32),
    ("health_check_successes", Kind::U32),
    ("health_check_backoff_max", Kind::Duration),
    ("health_check_user", Kind::Str),
];

/// The server-side TLS keys, allowed in `[pgtide]` and in `[databases.NAME]`.
const SERVER_TLS_KEYS: [(&str, Kind); 4] = [
    ("server_tls_sslmode", Kind::Enum(SERVER_SSLMODES)),
    ("server_tls_ca_file", Kind::Str),
    ("server_tls_cert_file", Kind::Str),
    ("server_tls_key_file", Kind::Str),
];

/// The keys of `[pgtide]`, in the order of [`super::General`].
pub(super) const GENERAL_KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Listen),
    ("pool_mode", Kind::Enum(POOL_MODES)),
    ("session_state", Kind::Enum(SESSION_STATES)),
    ("pool_size", Kind::Size),
    ("min_pool_size", Kind::U32),
    ("max_db_connections", Kind::U32),
    ("max_client_conn", Kind::U32),
    ("worker_threads", Kind::U32),
    ("query_wait_timeout", Kind::Duration),
    ("server_connect_timeout", Kind::Duration),
    ("server_connect_retries", Kind::U32),
    ("server_connect_backoff", Kind::Duration),
    ("server_idle_timeout", Kind::Duration),
    ("server_lifetime", Kind::Duration),
    ("idle_transaction_timeout", Kind::Duration),
    ("query_timeout", Kind::Duration),
    ("transaction_timeout", Kind::Duration),
    ("client_idle_timeout", Kind::Duration),
    ("client_login_timeout", Kind::Duration),
    ("shutdown_timeout", Kind::Duration),
    ("shutdown_delay", Kind::Duration),
    ("so_reuseport", Kind::Bool),
    ("peer_id", Kind::U32),
    ("peers", Kind::StrMap),
    ("peer_listen", Kind::Str),
    ("server_reset_query", Kind::Str),
    ("auth_type", Kind::Enum(AUTH_TYPES)),
    ("auth_file", Kind::Str),
    ("auth_hba_file", Kind::Str),
    ("auth_user", Kind::Str),
    ("auth_query", Kind::Str),
    ("auth_query_cache_ttl", Kind::Duration),
    ("auth_failure_threshold", Kind::U32),
    ("auth_failure_delay", Kind::Duration),
    ("auth_failure_delay_max", Kind::Duration),
    ("track_extra_params", Kind::StrList),
    ("max_message_size", Kind::U32),
    ("log_connections", Kind::Bool),
    ("max_prepared_statements", Kind::U32),
    ("prepared_statement_cache_size", Kind::U32),
    ("prepared_statement_cache_bytes", Kind::U32),
    ("metrics_listen", Kind::Str),
    ("admin_users", Kind::StrList),
    ("collect_metrics", Kind::Bool),
    ("client_tls_sslmode", Kind::Enum(CLIENT_SSLMODES)),
    ("client_tls_cert_file", Kind::Str),
    ("client_tls_key_file", Kind::Str),
    ("client_tls_ca_file", Kind::Str),
    SERVER_TLS_KEYS[0],
    SERVER_TLS_KEYS[1],
    SERVER_TLS_KEYS[2],
    SERVER_TLS_KEYS[3],
    ROUTING_KEYS[0],
    ROUTING_KEYS[1],
    ROUTING_KEYS[2],
    ROUTING_KEYS[3],
    ROUTING_KEYS[4],
    ROUTING_KEYS[5],
    ROUTING_KEYS[6],
    ROUTING_KEYS[7],
    ROUTING_KEYS[8],
    ROUTING_KEYS[9],
    ROUTING_KEYS[10],
    ROUTING_KEYS[11],
    ROUTING_KEYS[12],
    ROUTING_KEYS[13],
    ROUTING_KEYS[14],
];

/// The keys of `[databases.NAME]`.
pub(super) const DATABASE_KEYS: &[(&str, Kind)] = &[
    ("host", Kind::Str),
    ("port", Kind::Port),
    ("dbname", Kind::Str),
    ("hosts", Kind::Hosts),
    ("route", Kind::Enum(ROUTES)),
    ("pool_mode", Kind::Enum(POOL_MODES)),
    ("query_timeout", Kind::Duration),
    ("transaction_timeout", Kind::Duration),
    ("session_state", Kind::Enum(SESSION_STATES)),
    ("pool_size", Kind::Size),
    ("min_pool_size", Kind::U32),
    ("max_db_connections", Kind::U32),
    ("auth_user", Kind::Str),
    ("auth_query", Kind::Str),
    ROUTING_KEYS[0],
    ROUTING_KEYS[1],
    ROUTING_KEYS[2],
    ROUTING_KEYS[3],
    ROUTING_KEYS[4],
    ROUTING_KEYS[5],
    ROUTING_KEYS[6],
    ROUTING_KEYS[7],
    ROUTING_KEYS[8],
    ROUTING_KEYS[9],
    ROUTING_KEYS[10],
    ROUTING_KEYS[11],
    ROUTING_KEYS[12],
    ROUTING_KEYS[13],
    ROUTING_KEYS[14],
    SERVER_TLS_KEYS[0],
    SERVER_TLS_KEYS[1],
    SERVER_TLS_KEYS[2],
    SERVER_TLS_KEYS[3],
];

/// The keys of `[users.NAME]`.
pub(super) const USER_KEYS: &[(&str, Kind)] = &[
    ("password", Kind::Secret),
    ("auth_type", Kind::Enum(AUTH_TYPES)),
    ("pool_mode", Kind::Enum(POOL_MODES)),
    ("session_state", Kind::Enum(SESSION_STATES)),
    ("pool_size", Kind::Size),
    ("route", Kind::Enum(ROUTES)),
    ("query_timeout", Kind::Duration),
    ("transaction_timeout", Kind::Duration),
];

const TOP_KEYS: &[&str] = &["pgtide", "databases", "users"];

/// Joins a dotted key, quoting `name` the way TOML would when it is not a bare key.
fn join(parent: &str, name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let name = if bare {
        name.to_string()
    } else {
        format!("{name:?}")
    };
    if parent.is_empty() {
        name
    } else {
        format!("{parent}.{name}")
    }
}

/// "the string \"ten\"", "the integer 5", ...
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 60 => {
            let short: String = s.chars().take(57).collect();
            format!("the string {:?}", short + "...")
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(x) => format!("the float {x}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the datetime {d}"),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// Like [`describe`] but without the value itself.
fn describe_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of(options: &[&str]) -> String {
    let quoted: Vec<String> = options.iter().map(|o| format!("{o:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn wrong_type(expected: &str, got: &Value) -> String {
    format!("expected {expected}, got {}", describe(got))
}

/// Checks one value against its kind; array items get their own keys (`key[2]`).
fn check_value(kind: Kind, key: &str, v: &Value, out: &mut Vec<Problem>) {
    let message = match (kind, v) {
        (Kind::Bool, Value::Boolean(_)) => return,
        (Kind::Bool, _) => wrong_type("true or false", v),
        (Kind::U32, Value::Integer(i)) if u32::try_from(*i).is_ok() => return,
        (Kind::U32, Value::Integer(i)) => {
            format!("{i} is out of range; use a whole number from 0 to {}", u32::MAX)
        }
        (Kind::U32, _) => wrong_type("an integer", v),
        (Kind::Size, Value::Integer(i)) if u32::try_from(*i).is_ok() => return,
        (Kind::Size, Value::Integer(i)) => {
            format!("{i} is out of range; use a whole number from 1 to {}", u32::MAX)
        }
        (Kind::Size, _) => wrong_type("an integer", v),
        (Kind::Port, Value::Integer(i)) if (1..=65535).contains(i) => return,
        (Kind::Port, Value::Integer(i)) => format!("{i} is not a port; use 1 to 65535"),
        (Kind::Port, _) => wrong_type("a port number (an integer from 1 to 65535)", v),
        (Kind::Str, Value::String(_)) | (Kind::Secret, Value::String(_)) => return,
        (Kind::Str, _) => wrong_type("a string", v),
        (Kind::Secret, _) => format!("expected a string, got {}", describe_type(v)),
        (Kind::Duration, Value::Integer(i)) if *i >= 0 => return,
        (Kind::Duration, Value::Integer(i)) => format!(
            "{i} is negative; a duration is a string like \"30s\" or an integer of milliseconds, 0 or more"
        ),
        (Kind::Duration, Value::String(s)) => match super::parse_duration(s) {
            Ok(_) => return,
            Err(e) => e,
        },
        (Kind::Duration, _) => wrong_type(
            "a duration (a string like \"500ms\", \"30s\", \"5m\" or an integer of milliseconds)",
            v,
        ),
        (Kind::Enum(options), Value::String(s)) if options.contains(&s.as_str()) => return,
        (Kind::Enum(options), Value::String(s)) => {
            format!("{s:?} is not allowed; use {}", one_of(options))
        }
        (Kind::Enum(options), _) => wrong_type(&format!("a string ({})", one_of(options)), v),
        (Kind::Listen, Value::String(s)) => match s.trim().parse::<SocketAddr>() {
            Ok(_) => return,
            Err(_) => match s.trim().parse::<IpAddr>() {
                Ok(ip) => format!(
                    "{s:?} has no port; write e.g. {:?}",
                    SocketAddr::new(ip, 6432).to_string()
                ),
                Err(_) => format!(
                    "{s:?} is not an IP address and port; write e.g. \"127.0.0.1:6432\", \"0.0.0.0:6432\" or \"[::]:6432\" (host names are not resolved)"
                ),
            },
        },
        (Kind::Listen, _) => wrong_type("an address like \"127.0.0.1:6432\"", v),
        (Kind::StrList, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_value(Kind::Str, &format!("{key}[{i}]"), item, out);
            }
            return;
        }
        (Kind::StrList, _) => wrong_type("an array of strings, e.g. [\"search_path\"]", v),
        (Kind::U64, Value::Integer(i)) if *i >= 0 => return,
        (Kind::U64, Value::Integer(i)) => format!("{i} is negative; use a whole number, 0 or more"),
        (Kind::U64, _) => wrong_type("an integer", v),
        (Kind::Hosts, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_host_entry(&format!("{key}[{i}]"), item, out);
            }
            return;
        }
        (Kind::Hosts, _) => wrong_type(
            "an array of hosts, e.g. [{ host = \"10.0.0.5\", role = \"primary\" }, { host = \"10.0.0.6\", role = \"replica\" }]",
            v,
        ),
        (Kind::StrMap, Value::Table(t)) => {
            for (k, item) in t {
                if !item.is_str() {
                    out.push(Problem::new(
                        format!("{key}.{k}"),
                        wrong_type("a string", item),
                    ));
                }
            }
            return;
        }
        (Kind::StrMap, _) => wrong_type(
            "a table of strings, e.g. [pgtide.peers] with 1 = \"127.0.0.1:16432\"",
            v,
        ),
    };
    out.push(Problem::new(key, message));
}

/// Checks one entry of `hosts`: a table with a `host` and only known keys.
fn check_host_entry(key: &str, v: &Value, out: &mut Vec<Problem>) {
    let Value::Table(t) = v else {
        out.push(Problem::new(
            key,
            wrong_type(
                "a table like { host = \"10.0.0.6\", role = \"replica\" }",
                v,
            ),
        ));
        return;
    };
    let names: Vec<&str> = HOST_KEYS.iter().map(|(k, _)| *k).collect();
    for (name, value) in t {
        let item_key = join(key, name);
        match HOST_KEYS.iter().find(|(k, _)| *k == name) {
            Some((_, kind)) => check_value(*kind, &item_key, value, out),
            None => out.push(unknown_key(item_key, name, "a hosts entry", &names)),
        }
    }
    if !t.contains_key("host") {
        out.push(Problem::new(
            join(key, "host"),
            "missing; every hosts entry needs a host name or IP address",
        ));
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn unknown_key(key: String, name: &str, section: &str, allowed: &[&str]) -> Problem {
    let hint = allowed
        .iter()
        .map(|a| (distance(&name.to_ascii_lowercase(), a), a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min()
        .map(|(_, a)| format!("did you mean {a:?}? "))
        .unwrap_or_default();
    Problem::new(
        key,
        format!(
            "unknown key; {hint}allowed keys in {section} are: {}",
            allowed.join(", ")
        ),
    )
}

/// Checks the keys of one table; drops unknown and invalid ones, remembering the latter.
fn walk_table(
    table: &mut Table,
    path: &str,
    section: &str,
    keys: &[(&str, Kind)],
    out: &mut Vec<Problem>,
    bad: &mut BTreeSet<String>,
) {
    let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
    table.retain(|name, value| {
        let key = join(path, name);
        let Some((_, kind)) = keys.iter().find(|(k, _)| *k == name) else {
            out.push(unknown_key(key, name, section, &names));
            return false;
        };
        let before = out.len();
        check_value(*kind, &key, value, out);
        if out.len() == before {
            true
        } else {
            bad.insert(key);
            false
        }
    });
}

/// Makes sure `value` is a table (replacing it with an empty one if not) and returns it.
fn expect_table<'a>(
    value: &'a mut Value,
    key: &str,
    what: &str,
    out: &mut Vec<Problem>,
    bad: &mut BTreeSet<String>,
) -> &'a mut Table {
    if !value.is_table() {
        out.push(Problem::new(
            key,
            format!("expected a table ({what}), got {}", describe(value)),
        ));
        bad.insert(key.to_string());
        *value = Value::Table(Table::new());
    }
    match value {
        Value::Table(t) => t,
        _ => unreachable!("replaced by a table above"),
    }
}

/// Walks the whole document. Returns the problems and the keys that had a type problem.
fn walk(doc: &mut Table) -> (Vec<Problem>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut bad = BTreeSet::new();
    doc.retain(|name, value| {
        let key = join("", name);
        match name {
            "pgtide" => {
                let t = expect_table(value, &key, "[pgtide]", &mut out, &mut bad);
                walk_table(t, &key, "[pgtide]", GENERAL_KEYS, &mut out, &mut bad);
            }
            "databases" | "users" => {
                let (one, keys) = if name == "databases" {
                    ("database", DATABASE_KEYS)
                } else {
                    ("user", USER_KEYS)
                };
                let what = format!("[{name}.NAME] tables");
                let entries = expect_table(value, &key, &what, &mut out, &mut bad);
                for (entry_name, entry) in entries.iter_mut() {
                    let entry_key = join(&key, entry_name);
                    let section = format!("[{entry_key}]");
                    let what = format!("{section}, describing one {one}");
                    let t = expect_table(entry, &entry_key, &what, &mut out, &mut bad);
                    if name == "databases" && t.contains_key("hosts") {
                        for single in ["host", "port"] {
                            if t.remove(single).is_some() {
                                let k = join(&entry_key, single);
                                out.push(Problem::new(
                                    k.clone(),
                                    format!("give either {single} or hosts, not both; with hosts, write each server's host and port in its entry"),
                                ));
                                bad.insert(k);
                            }
                        }
                    }
                    walk_table(t, &entry_key, &section, keys, &mut out, &mut bad);
                }
            }
            _ => {
                out.push(unknown_key(key, name, "the top level", TOP_KEYS));
                return false;
            }
        }
        true
    });
    (out, bad)
}

/// "line 3, column 7" of a byte offset, counting columns in characters like toml does.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

pub(super) fn parse_and_validate(text: &str) -> Result<Config, ConfigError> {
    let mut doc: Table = text.parse().map_err(|e: toml::de::Error| {
        let message = e.message().trim().replace('\n', "; ");
        match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                ConfigError::single(
                    "",
                    format!("TOML syntax error at line {line}, column {column}: {message}"),
                )
            }
            None => ConfigError::single("", format!("TOML syntax error: {message}")),
        }
    })?;
    let (mut problems, bad) = walk(&mut doc);
    let result = finish(doc, &mut problems, &bad);
    // Report section by section: syntax, [pgtide], [databases.*], [users.*], the rest.
    problems.sort_by_key(|p| {
        let section = p.key.split(['.', '[']).next().unwrap_or("");
        match section {
            "" => 0,
            "pgtide" => 1,
            "databases" => 2,
            "users" => 3,
            _ => 4,
        }
    });
    match result {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(ConfigError { problems }),
    }
}

/// Deserializes what the walker left and adds the semantic problems that do not concern
/// keys in `bad`.
fn finish(doc: Table, problems: &mut Vec<Problem>, bad: &BTreeSet<String>) -> Option<Config> {
    // What is left has only known keys with values of the right type, so this succeeds;
    // `deny_unknown_fields` on the types is the backstop if the key tables drift.
    match Value::Table(doc).try_into::<Config>() {
        Ok(config) => {
            problems.extend(
                semantic_problems(&config)
                    .into_iter()
                    .filter(|p| !bad.contains(&p.key)),
            );
            Some(config)
        }
        Err(e) => {
            problems.push(Problem::new("", e.message().trim().replace('\n', "; ")));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pass 3: rules that need the whole configuration.

pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    let problems = semantic_problems(config);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

/// The names of the admin console's virtual database.
pub const ADMIN_DATABASES: &[&str] = &["pgtide", "pgbouncer"];

const MIN_MESSAGE_SIZE: u32 = 1024;
const MAX_MESSAGE_SIZE: u32 = 1 << 30;

/// The largest `peer_id`: it takes the low 14 bits of a cancel key's secret.
pub const MAX_PEER_ID: u32 = 0x3fff;

fn semantic_problems(config: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let g = &config.pgtide;
    let mut push = |key: String, message: String| out.push(Problem::new(key, message));

    if config.databases.is_empty() {
        push(
            "databases".into(),
            "no database is configured; add a [databases.NAME] table".into(),
        );
    }
    if !g.peer_listen.is_empty() && g.peer_listen.parse::<std::net::SocketAddr>().is_err() {
        push(
            "pgtide.peer_listen".into(),
            format!(
                "{:?} is not an address; write an IP and a port such as \"127.0.0.1:16432\", or \"\" for none",
                g.peer_listen
            ),
        );
    }
    if g.peer_id > MAX_PEER_ID {
        push(
            "pgtide.peer_id".into(),
            format!(
                "{} is out of range: 0 (no peering) to {MAX_PEER_ID}",
                g.peer_id
            ),
        );
    }
    for (id, addr) in &g.peers {
        if !id
            .parse::<u32>()
            .is_ok_and(|n| (1..=MAX_PEER_ID).contains(&n))
        {
            push(
                format!("pgtide.peers.{id}"),
                format!("a peer's key is its peer_id, 1 to {MAX_PEER_ID}"),
            );
        }
        if addr.parse::<std::net::SocketAddr>().is_err() {
            push(
                format!("pgtide.peers.{id}"),
                format!("{addr:?} is not an address (the peer's peer_listen, such as \"127.0.0.1:16432\")"),
            );
        }
    }
    if !g.peers.is_empty() && g.peer_id == 0 {
        push(
            "pgtide.peer_id".into(),
            "peers are listed but peer_id is 0: give this process its own number from the list"
                .into(),
        );
    }
    if !g.metrics_listen.is_empty() && g.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
        push(
            "pgtide.metrics_listen".into(),
            format!(
                "{:?} is not an address; write an IP and a port such as \"127.0.0.1:9930\", or \"\" to turn the endpoint off",
                g.metrics_listen
            ),
        );
    }
    if g.pool_size == 0 {
        push("pgtide.pool_size".into(), "must be at least 1".into());
    } else if g.min_pool_size > g.pool_size {
        push(
            "pgtide.min_pool_size".into(),
            format!(
                "{} is larger than pgtide.pool_size ({}); it must be at most pool_size",
                g.min_pool_size, g.pool_size
            ),
        );
    }
    if g.max_client_conn == 0 {
        push("pgtide.max_client_conn".into(), "must be at least 1".into());
    }
    if g.worker_threads > 1024 {
        push(
            "pgtide.worker_threads".into(),
            format!(
                "{} is too many; use 0 (one per CPU core) or 1 to 1024",
                g.worker_threads
            ),
        );
    }
    if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&g.max_message_size) {
        push(
            "pgtide.max_message_size".into(),
            format!(
                "{} is out of range; use {MIN_MESSAGE_SIZE} (1 KiB) to {MAX_MESSAGE_SIZE} (1 GiB) bytes",
                g.max_message_size
            ),
        );
    }
    for (i, name) in g.track_extra_params.iter().enumerate() {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid {
            push(
                format!("pgtide.track_extra_params[{i}]"),
                format!(
                    "{name:?} is not a run-time parameter name; use letters, digits, '_' and '.' only"
                ),
            );
        }
    }

    check_general_routing(g, &mut push);
    check_auth_sources(config, &mut push);

    for (i, name) in g.admin_users.iter().enumerate() {
        if !config.users.contains_key(name) {
            push(
                format!("pgtide.admin_users[{i}]"),
                format!(
                    "{name:?} is not a configured user; add a [users.{name}] table (admin users log in with their own credential)"
                ),
            );
        }
    }
    check_client_tls(config, &mut push);
    check_server_tls("pgtide", &config.server_tls(""), &mut push);

    for (name, d) in &config.databases {
        let key = join("databases", name);
        if name.is_empty() {
            push(key.clone(), "a database name cannot be empty".into());
        }
        if ADMIN_DATABASES.contains(&name.as_str()) {
            push(
                key.clone(),
                format!("the name {name:?} is reserved for the admin console; give the database another name (dbname = \"{name}\" keeps the server-side name)"),
            );
        }
        check_database(&key, d, g, &mut push);
        check_hosts(&key, d, &mut push);
        check_database_routing(&key, d, g, &mut push);
        let own_tls = d.server_tls_sslmode.is_some()
            || d.server_tls_ca_file.is_some()
            || d.server_tls_cert_file.is_some()
            || d.server_tls_key_file.is_some();
        if own_tls {
            check_server_tls(&key, &config.server_tls(name), &mut push);
        }
    }

    for (name, u) in &config.users {
        let key = join("users", name);
        if name.is_empty() {
            push(key.clone(), "a user name cannot be empty".into());
        }
        if let Some(size) = u.pool_size {
            if size == 0 {
                push(format!("{key}.pool_size"), "must be at least 1".into());
            } else {
                for (db_name, d) in &config.databases {
                    let min = d.min_pool_size.unwrap_or(g.min_pool_size);
                    if min > size {
                        push(
                            format!("{key}.pool_size"),
                            format!(
                                "{size} is smaller than min_pool_size {min} of database {db_name:?}; it must be at least min_pool_size"
                            ),
                        );
                    }
                }
            }
        }
        let (auth, origin) = match u.auth_type {
            Some(a) => (a, ""),
            None => (g.auth_type, " (inherited from pgtide.auth_type)"),
        };
        let elsewhere = config.has_other_credential_sources();
        check_password(
            &format!("{key}.password"),
            u,
            auth,
            origin,
            elsewhere,
            &mut push,
        );
    }
    out
}

/// `client_tls_*`: what each sslmode needs, and `cert` auth needs client certificates.
fn check_client_tls(config: &Config, push: &mut impl FnMut(String, String)) {
    use super::ClientSslMode as M;
    let g = &config.pgtide;
    let mode = g.client_tls_sslmode;
    if mode != M::Disable {
        for (key, value) in [
            ("client_tls_cert_file", &g.client_tls_cert_file),
            ("client_tls_key_file", &g.client_tls_key_file),
        ] {
            if value.is_empty() {
                push(
                    format!("pgtide.{key}"),
                    format!("required when client_tls_sslmode is \"{mode}\"; give a PEM file, or set client_tls_sslmode = \"disable\""),
                );
            }
        }
    }
    if matches!(mode, M::VerifyCa | M::VerifyFull) && g.client_tls_ca_file.is_empty() {
        push(
            "pgtide.client_tls_ca_file".into(),
            format!("required when client_tls_sslmode is \"{mode}\": client certificates are checked against it"),
        );
    }
    if mode == M::Disable
        && (!g.client_tls_cert_file.is_empty()
            || !g.client_tls_key_file.is_empty()
            || !g.client_tls_ca_file.is_empty())
    {
        push(
            "pgtide.client_tls_sslmode".into(),
            "is \"disable\" but client_tls files are given; set client_tls_sslmode (e.g. \"prefer\" or \"require\") or remove the files".into(),
        );
    }
    let cert_users = (g.auth_type == AuthType::Cert)
        || config
            .users
            .values()
            .any(|u| u.auth_type == Some(AuthType::Cert));
    if cert_users && (mode == M::Disable || g.client_tls_ca_file.is_empty()) {
        push(
            "pgtide.client_tls_ca_file".into(),
            "auth_type \"cert\" needs client certificates: set client_tls_sslmode (not \"disable\") and client_tls_ca_file".into(),
        );
    }
}

/// `server_tls_*` of `[pgtide]` or of one database (`settings` has the overrides applied).
fn check_server_tls(
    section: &str,
    t: &super::ServerTlsSettings,
    push: &mut impl FnMut(String, String),
) {
    use super::ServerSslMode as M;
    if matches!(t.sslmode, M::VerifyCa | M::VerifyFull) && t.ca_file.is_empty() {
        push(
            format!("{section}.server_tls_ca_file"),
            format!(
                "required when server_tls_sslmode is \"{}\": server certificates are checked against it",
                t.sslmode
            ),
        );
    }
    if t.cert_file.is_empty() != t.key_file.is_empty() {
        let missing = if t.cert_file.is_empty() {
            "server_tls_cert_file"
        } else {
            "server_tls_key_file"
        };
        push(
            format!("{section}.{missing}"),
            "server_tls_cert_file and server_tls_key_file go together; give both or neither".into(),
        );
    }
}

fn check_database(
    key: &str,
    d: &Database,
    g: &super::General,
    push: &mut impl FnMut(String, String),
) {
    if d.host.trim().is_empty() {
        push(
            format!("{key}.host"),
            "must not be empty; give a host name or IP address".into(),
        );
    }
    if d.port == 0 {
        push(
            format!("{key}.port"),
            "0 is not a port; use 1 to 65535".into(),
        );
    }
    if d.dbname.as_deref().is_some_and(|n| n.is_empty()) {
        push(
            format!("{key}.dbname"),
            "must not be empty; remove it to use the name clients connect with".into(),
        );
    }
    if d.pool_size == Some(0) {
        push(format!("{key}.pool_size"), "must be at least 1".into());
    }
    let size = d.pool_size.unwrap_or(g.pool_size);
    let min = d.min_pool_size.unwrap_or(g.min_pool_size);
    let overridden = d.pool_size.is_some() || d.min_pool_size.is_some();
    if overridden && size > 0 && min > size {
        let (at, which) = if d.min_pool_size.is_some() {
            ("min_pool_size", "")
        } else {
            ("pool_size", " (inherited from pgtide.min_pool_size)")
        };
        push(
            format!("{key}.{at}"),
            format!("min_pool_size {min}{which} is larger than pool_size {size}; min_pool_size must be at most pool_size"),
        );
    }
}

/// `auth_file`, `auth_hba_file`, `auth_user`, `auth_query` and the failed-login slowdown.
/// The files' contents are checked when they are loaded (at start and by check-config).
fn check_auth_sources(config: &Config, push: &mut impl FnMut(String, String)) {
    let g = &config.pgtide;
    for (name, value) in [
        ("auth_file", &g.auth_file),
        ("auth_hba_file", &g.auth_hba_file),
    ] {
        if !value.is_empty() && value.trim().is_empty() {
            push(
                format!("pgtide.{name}"),
                "is only white space; give a file path, or \"\" for none".into(),
            );
        }
    }
    let mut check_query = |key: String, q: &str| {
        if q.trim().is_empty() {
            push(
                key,
                "must not be empty; it returns (user name, password secret) for the user name $1"
                    .into(),
            );
        } else if !q.contains("$1") {
            push(
                key,
                "does not use $1; the query receives the user name as parameter $1, e.g. \"SELECT usename, passwd FROM pgtide.user_lookup($1)\"".into(),
            );
        } else if q.contains("$2") {
            push(
                key,
                "uses $2, but the query gets only one parameter: the user name as $1".into(),
            );
        }
    };
    check_query("pgtide.auth_query".into(), &g.auth_query);
    for (name, d) in &config.databases {
        if let Some(q) = &d.auth_query {
            check_query(format!("{}.auth_query", join("databases", name)), q);
        }
    }
    if g.auth_failure_threshold > 0 && !g.auth_failure_delay.0.is_zero() {
        if g.auth_failure_delay_max.0 < g.auth_failure_delay.0 {
            push(
                "pgtide.auth_failure_delay_max".into(),
                format!(
                    "{} is shorter than auth_failure_delay {}; the delay starts at auth_failure_delay and doubles up to this, so it must be at least auth_failure_delay",
                    humantime::format_duration(g.auth_failure_delay_max.0),
                    humantime::format_duration(g.auth_failure_delay.0)
                ),
            );
        } else if !g.client_login_timeout.0.is_zero()
            && g.auth_failure_delay_max.0 >= g.client_login_timeout.0
        {
            push(
                "pgtide.auth_failure_delay_max".into(),
                format!(
                    "{} is not shorter than client_login_timeout {}; a slowed-down login would hit the login timeout instead of getting its answer, so make it shorter",
                    humantime::format_duration(g.auth_failure_delay_max.0),
                    humantime::format_duration(g.client_login_timeout.0)
                ),
            );
        }
    }
}

/// The routing and health-check values of `[pgtide]`.
fn check_general_routing(g: &General, push: &mut impl FnMut(String, String)) {
    let key = |name: &str| format!("pgtide.{name}");
    if g.health_check_interval.0.is_zero() {
        push(key("health_check_interval"), HEALTH_INTERVAL_ZERO.into());
    }
    if g.health_check_timeout.0.is_zero() {
        push(key("health_check_timeout"), HEALTH_TIMEOUT_ZERO.into());
    }
    if g.health_check_failures == 0 {
        push(key("health_check_failures"), "must be at least 1".into());
    }
    if g.health_check_successes == 0 {
        push(key("health_check_successes"), "must be at least 1".into());
    }
    if !g.health_check_interval.0.is_zero()
        && g.health_check_backoff_max.0 < g.health_check_interval.0
    {
        push(
            key("health_check_backoff_max"),
            backoff_below_interval(g.health_check_backoff_max, g.health_check_interval, ""),
        );
    }
    check_write_functions(&key("write_functions"), &g.write_functions, push);
}

const HEALTH_INTERVAL_ZERO: &str =
    "must be more than 0; it is the pause between two health checks of a host";
const HEALTH_TIMEOUT_ZERO: &str =
    "must be more than 0; it bounds each health check (connect, log in, query)";

fn backoff_below_interval(max: ConfigDuration, interval: ConfigDuration, origin: &str) -> String {
    format!(
        "{} is shorter than health_check_interval {}{origin}; the back-off of a down host starts at the interval and grows up to this, so it must be at least the interval",
        humantime::format_duration(max.0),
        humantime::format_duration(interval.0)
    )
}

/// Function names: an identifier, optionally schema-qualified (`audit.log_event`).
fn check_write_functions(key: &str, names: &[String], push: &mut impl FnMut(String, String)) {
    fn ident(s: &str) -> bool {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
    }
    for (i, name) in names.iter().enumerate() {
        let valid = match name.split_once('.') {
            Some((schema, function)) => ident(schema) && ident(function),
            None => ident(name),
        };
        if !valid {
            push(
                format!("{key}[{i}]"),
                format!(
                    "{name:?} is not a function name; write a name like \"log_event\" or \"audit.log_event\" (no parentheses or arguments)"
                ),
            );
        }
    }
}

/// `hosts`: not empty, valid entries, at most one primary, no host listed twice.
fn check_hosts(key: &str, d: &Database, push: &mut impl FnMut(String, String)) {
    let Some(hosts) = &d.hosts else {
        return;
    };
    let hosts_key = format!("{key}.hosts");
    let defaults = Database::default();
    if d.host != defaults.host || d.port != defaults.port {
        push(
            hosts_key.clone(),
            "give either host/port or hosts, not both; with hosts, write each server's host and port in its entry".into(),
        );
    }
    if hosts.is_empty() {
        push(
            hosts_key.clone(),
            "must list at least one host; remove it to use host and port".into(),
        );
    }
    let mut primary: Option<usize> = None;
    for (i, h) in hosts.iter().enumerate() {
        let entry = format!("{hosts_key}[{i}]");
        if h.host.trim().is_empty() {
            push(
                format!("{entry}.host"),
                "must not be empty; give a host name or IP address".into(),
            );
        }
        if h.port == 0 {
            push(
                format!("{entry}.port"),
                "0 is not a port; use 1 to 65535".into(),
            );
        }
        if h.role == HostRole::Primary {
            match primary {
                Some(first) => push(
                    format!("{entry}.role"),
                    format!(
                        "a second primary (hosts[{first}] is one already); at most one host may have role \"primary\": use \"auto\" to let pgtide find out which one is"
                    ),
                ),
                None => primary = Some(i),
            }
        }
        if h.role == HostRole::Replica && h.weight == 0 {
            push(
                format!("{entry}.weight"),
                "a replica's weight must be at least 1 (its share of the reads)".into(),
            );
        }
        if let Some(j) = hosts[..i]
            .iter()
            .position(|o| o.host == h.host && o.port == h.port)
        {
            push(
                entry,
                format!(
                    "{}:{} is listed twice (also hosts[{j}]); list each server once",
                    h.host, h.port
                ),
            );
        }
    }
}

/// A database's routing and health-check overrides, checked as resolved with `[pgtide]`.
fn check_database_routing(
    key: &str,
    d: &Database,
    g: &General,
    push: &mut impl FnMut(String, String),
) {
    let at = |name: &str| format!("{key}.{name}");
    if d.health_check_interval.is_some_and(|v| v.0.is_zero()) {
        push(at("health_check_interval"), HEALTH_INTERVAL_ZERO.into());
    }
    if d.health_check_timeout.is_some_and(|v| v.0.is_zero()) {
        push(at("health_check_timeout"), HEALTH_TIMEOUT_ZERO.into());
    }
    if d.health_check_failures == Some(0) {
        push(at("health_check_failures"), "must be at least 1".into());
    }
    if d.health_check_successes == Some(0) {
        push(at("health_check_successes"), "must be at least 1".into());
    }
    let interval = d.health_check_interval.unwrap_or(g.health_check_interval);
    let max = d
        .health_check_backoff_max
        .unwrap_or(g.health_check_backoff_max);
    let overridden = d.health_check_interval.is_some() || d.health_check_backoff_max.is_some();
    if overridden && !interval.0.is_zero() && max.0 < interval.0 {
        let (name, origin) = if d.health_check_backoff_max.is_some() {
            (
                "health_check_backoff_max",
                if d.health_check_interval.is_some() {
                    ""
                } else {
                    " (inherited from pgtide.health_check_interval)"
                },
            )
        } else {
            ("health_check_interval", "")
        };
        let message = if name == "health_check_interval" {
            format!(
                "{} is longer than health_check_backoff_max {} (inherited from pgtide.health_check_backoff_max); the back-off of a down host starts at the interval, so the maximum must be at least the interval",
                humantime::format_duration(interval.0),
                humantime::format_duration(max.0)
            )
        } else {
            backoff_below_interval(max, interval, origin)
        };
        push(at(name), message);
    }
    if let Some(names) = &d.write_functions {
        check_write_functions(&at("write_functions"), names, push);
    }
    if d.route == Some(Route::Replica) {
        let hosts = d.host_list();
        if !hosts.iter().any(|h| h.role != HostRole::Primary) {
            push(
                at("route"),
                "\"replica\" but the database has no host that can be a replica (role \"replica\" or \"auto\" in hosts)".into(),
            );
        }
    }
}

/// What a `password` value holds.
#[derive(Debug, PartialEq, Eq)]
enum Secret {
    Plain,
    Md5,
    Scram,
}

fn secret_kind(password: &str) -> Secret {
    if password.starts_with("SCRAM-SHA-256$") {
        Secret::Scram
    } else if password.starts_with("md5") && password.chars().count() == 35 {
        Secret::Md5
    } else {
        Secret::Plain
    }
}

fn check_password(
    key: &str,
    u: &User,
    auth: AuthType,
    origin: &str,
    elsewhere: bool,
    push: &mut impl FnMut(String, String),
) {
    let password = match u.password.as_deref() {
        None => {
            // The password may come from auth_file or auth_query.
            if auth != AuthType::Trust && auth != AuthType::Cert && !elsewhere {
                push(
                    key.to_string(),
                    format!(
                        "required for auth_type {auth}{origin}; set a password, an auth_file or auth_user with the password, or auth_type = \"trust\""
                    ),
                );
            }
            return;
        }
        Some(p) => p,
    };
    if password.is_empty() {
        push(
            key.to_string(),
            "an empty password is not allowed; remove the key for a user without a password".into(),
        );
        return;
    }
    match secret_kind(password) {
        Secret::Plain => {}
        Secret::Md5 => {
            let hex = password.get(3..).unwrap_or("");
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                push(
                    key.to_string(),
                    "looks like an md5 hash (\"md5\" and 32 more characters) but those are not lowercase hex digits; an md5 hash is \"md5\" followed by the 32 hex digits of md5(password || user name)".into(),
                );
            } else if auth == AuthType::ScramSha256 {
                push(
                    key.to_string(),
                    format!(
                        "auth_type is scram-sha-256{origin}, and a SCRAM exchange cannot be checked against an md5 hash; give the plain password or a SCRAM verifier, or set auth_type = \"md5\""
                    ),
                );
            }
        }
        Secret::Scram => {
            if let Err(e) = check_scram_verifier(password) {
                push(
                    key.to_string(),
                    format!(
                        "not a valid SCRAM verifier: {e}; the shape is SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>"
                    ),
                );
            }
        }
    }
}

/// Checks `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as stored in
/// `pg_authid.rolpassword`. Never echoes the parts.
fn check_scram_verifier(v: &str) -> Result<(), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let rest = v
        .strip_prefix("SCRAM-SHA-256$")
        .ok_or("it does not start with SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest
        .split_once('$')
        .ok_or("the '$' between <iterations>:<salt> and <StoredKey>:<ServerKey> is missing")?;
    let (iterations, salt) = iter_salt
        .split_once(':')
        .ok_or("the ':' between <iterations> and <salt> is missing")?;
    match iterations.parse::<u32>() {
        Ok(n) if n >= 1 => {}
        _ => return Err("the iteration count is not a positive integer".into()),
    }
    match b64.decode(salt) {
        Ok(s) if !s.is_empty() => {}
        _ => return Err("the salt is not non-empty base64".into()),
    }
    let (stored, server) = keys
        .split_once(':')
        .ok_or("the ':' between <StoredKey> and <ServerKey> is missing")?;
    for (name, part) in [("StoredKey", stored), ("ServerKey", server)] {
        match b64.decode(part) {
            Ok(k) if k.len() == 32 => {}
            Ok(k) => return Err(format!("{name} is {} bytes, not 32", k.len())),
            Err(_) => return Err(format!("{name} is not base64")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The zero-config `--upstream URL` / `DATABASE_URL` mode.

const URL_SHAPE: &str = "postgres://user:password@host:port/dbname";

fn decode(part: &str, what: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} is not valid UTF-8 once percent-decoded"))
}

pub(super) fn from_upstream_url(text: &str) -> Result<Config, ConfigError> {
    const KEY: &str = "upstream";
    // The URL holds a password: never echo it.
    let url = url::Url::parse(text.trim()).map_err(|e| {
        ConfigError::single(
            KEY,
            format!("not a valid URL ({e}); expected {URL_SHAPE}, with special characters percent-encoded"),
        )
    })?;
    if url.scheme() != "postgres" && url.scheme() != "postgresql" {
        return Err(ConfigError::single(
            KEY,
            format!(
                "the URL must start with postgres:// or postgresql://, not {}://",
                url.scheme()
            ),
        ));
    }
    let mut problems = Vec::new();
    let mut fail = |m: String| problems.push(Problem::new(KEY, m));

    let user = decode(url.username(), "user name").unwrap_or_else(|e| {
        fail(e);
        String::new()
    });
    if user.is_empty() && url.username().is_empty() {
        fail(format!("the URL must name a user: {URL_SHAPE}"));
    }
    let password = match url.password().map(|p| decode(p, "password")) {
        None => None,
        Some(Ok(p)) if p.is_empty() => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            fail(e);
            None
        }
    };
    let host = match url.host() {
        None => "127.0.0.1".to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(url::Host::Domain(d)) => decode(d, "host").unwrap_or_else(|e| {
            fail(e);
            String::new()
        }),
    };
    let port = url.port().unwrap_or(5432);
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    let dbname = if path.is_empty() {
        user.clone()
    } else if path.contains('/') {
        fail("the URL path must be a single database name (write '/' in a name as %2F)".into());
        String::new()
    } else {
        decode(path, "database name").unwrap_or_else(|e| {
            fail(e);
            String::new()
        })
    };
    let mut sslmode = super::ServerSslMode::Prefer;
    let mut sslrootcert = None;
    for (name, value) in url.query_pairs() {
        match name.as_ref() {
            "sslmode" => match value.as_ref() {
                "disable" => sslmode = super::ServerSslMode::Disable,
                // libpq's allow tries plain text first; pgtide asks for TLS first.
                "allow" | "prefer" => sslmode = super::ServerSslMode::Prefer,
                "require" => sslmode = super::ServerSslMode::Require,
                "verify-ca" => sslmode = super::ServerSslMode::VerifyCa,
                "verify-full" => sslmode = super::ServerSslMode::VerifyFull,
                _ => fail(format!(
                    "sslmode={value:?} is not a valid sslmode; use disable, allow, prefer, require, verify-ca or verify-full"
                )),
            },
            "sslrootcert" => sslrootcert = Some(value.into_owned()),
            "application_name" => {}
            _ => fail(format!(
                "unknown URL parameter {name:?}; pgtide accepts sslmode, sslrootcert and application_name"
            )),
        }
    }
    if matches!(
        sslmode,
        super::ServerSslMode::VerifyCa | super::ServerSslMode::VerifyFull
    ) && sslrootcert.is_none()
    {
        fail(format!(
            "sslmode={sslmode} needs sslrootcert=<path of the CA certificates (PEM)> in the URL"
        ));
    }
    if url.fragment().is_some() {
        fail("the URL has a '#' fragment; if the password contains '#', write it as %23".into());
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }

    let mut config = Config::default();
    config.databases.insert(
        dbname,
        Database {
            host,
            port,
            server_tls_sslmode: Some(sslmode),
            server_tls_ca_file: sslrootcert,
            ..Database::default()
        },
    );
    let auth_type = if password.is_some() {
        AuthType::ScramSha256
    } else {
        AuthType::Trust
    };
    config.users.insert(
        user,
        User {
            password,
            auth_type: Some(auth_type),
            ..User::default()
        },
    );
    // The checks name config keys the user never wrote: report them on the URL.
    check(&config).map_err(|e| ConfigError {
        problems: e
            .problems
            .into_iter()
            .map(|p| Problem::new(KEY, p.message))
            .collect(),
    })?;
    Ok(config)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
