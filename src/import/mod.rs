//! `pgtide import`: a PgBouncer configuration (`pgbouncer.ini`, and optionally its
//! `userlist.txt`) translated into a `pooler.toml`.
//!
//! The file is read with [`ini`] (PgBouncer's own rules), each option is mapped onto its
//! pgtide equivalent, and every option pgtide has no equivalent for becomes a TOML
//! comment that says what to do instead. Where PgBouncer's default differs from
//! pgtide's (`pool_mode`, `max_client_conn`, `auth_type`, ...), PgBouncer's is written
//! out, so that the pooler behaves as before. The document is built with `toml_edit`
//! (values from the config types' own names, comments as decoration), then loaded back
//! with [`Config::from_toml_str`]: what pgtide would refuse is reported as a warning.
//!
//! With `--userlist`, the users of the userlist become `[users.NAME]` tables holding
//! their password, md5 hash or SCRAM verifier (the file is then not needed); without
//! it, `auth_file` keeps pointing at PgBouncer's file, which pgtide reads as is.

pub mod ini;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, Value};

use crate::auth::userlist::UserList;
use crate::config::{AuthType, ClientSslMode, Config, General, HostRole, PoolMode, ServerSslMode};
use ini::Entry;

/// What to import.
pub struct Input<'a> {
    /// The text of `pgbouncer.ini`.
    pub ini: &'a str,
    /// Its name, for messages and the header of the output.
    pub ini_name: &'a str,
    /// The text and name of a `userlist.txt` whose users are written into `[users]`.
    pub userlist: Option<(&'a str, &'a str)>,
}

/// The translation.
#[derive(Debug)]
pub struct Imported {
    /// The `pooler.toml`.
    pub toml: String,
    /// What pgtide would refuse in it as it stands (`key: problem`), and what needs a
    /// decision before the file is used.
    pub warnings: Vec<String>,
}

/// Why nothing could be imported: the file, the line when known, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "{}: line {n}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ImportError {}

/// PgBouncer's "wait forever" (0) for timeouts where pgtide's 0 would mean "at once".
const FOREVER: Duration = Duration::from_secs(24 * 3600);

/// Parameters pgtide always keeps per client (no need to list them).
const BUILT_IN_TRACKED: &[&str] = crate::params::TRACKED;

const TLS_CIPHERS: &str =
    "pgtide uses rustls with its safe default cipher suites; there is no cipher setting.";
const TLS_KEX: &str =
    "rustls chooses the key exchange (X25519, P-256, P-384); there is no setting.";
const TLS_PROTOCOLS: &str = "pgtide speaks TLS 1.2 and 1.3 only (PgBouncer's \"secure\"); TLS 1.0 and 1.1 are not available.";
const DNS: &str = "pgtide resolves host names through the system resolver at each new server connection, with no cache of its own; configure DNS in the system.";
const SYSLOG: &str = "pgtide logs to stderr (text, or JSON with --log-format json); let systemd-journald or your log collector forward it to syslog.";
const TCP: &str = "pgtide sets no TCP socket options besides TCP_NODELAY; use the system's settings (sysctl net.ipv4.tcp_keepalive_time and friends).";
const UNIX_SOCKET: &str = "pgtide listens on TCP only (listen): clients that used the Unix socket connect to host 127.0.0.1 (or the listen address) instead.";
const RESERVE: &str = "pgtide has no reserve pool: add the reserve to pool_size (a pool opens connections only while clients wait for one) and watch the waits (SHOW POOLS, pgtide_ metrics).";
const SERVER_CHECK: &str = "pgtide runs no check query: an idle connection the server closed is noticed at checkout and replaced, and every host is health-checked (health_check_interval, health_check_timeout).";

/// The `[pgbouncer]` options pgtide has no equivalent for, and what to do instead.
const NO_EQUIVALENT: &[(&str, &str)] = &[
    ("application_name_add_host", "pgtide does not change application_name; SHOW CLIENTS lists each client's address, and log_connections logs it."),
    ("auth_dbname", "pgtide runs auth_query in the database the client asked for, over auth_user's pool: install the lookup (e.g. a SECURITY DEFINER function) in every database."),
    ("auth_ident_file", "pgtide has no ident maps (they serve peer authentication over Unix sockets, which pgtide does not listen on); use md5, scram-sha-256 or cert lines in auth_hba_file."),
    ("auth_ldap_options", "pgtide has no LDAP authentication; give the users passwords ([users], auth_file) or look them up with auth_user and auth_query."),
    ("autodb_idle_timeout", "pgtide has no automatic databases (the \"*\" entry): every database is listed under [databases]."),
    ("cancel_wait_timeout", "pgtide forwards a cancel request at once to the server running the client's query; nothing to set."),
    ("client_tls13_ciphers", TLS_CIPHERS),
    ("client_tls_ciphers", TLS_CIPHERS),
    ("client_tls_dheparams", TLS_KEX),
    ("client_tls_ecdhcurve", TLS_KEX),
    ("client_tls_protocols", TLS_PROTOCOLS),
    ("conffile", "pgtide reads the file given with --config; SIGHUP and RELOAD read it again."),
    ("disable_pqexec", "pgtide cannot refuse the simple query protocol; restrict what the application's role may do in PostgreSQL instead."),
    ("dns_max_ttl", DNS),
    ("dns_nxdomain_ttl", DNS),
    ("dns_zone_check_period", DNS),
    ("ignore_startup_parameters", "pgtide accepts every startup parameter (extra_float_digits, options, search_path, ...) and applies it on the client's server connections: no list is needed."),
    ("job_name", "the name of a Windows service; not used by pgtide."),
    ("listen_backlog", "pgtide uses tokio's listen backlog (1024, capped by net.core.somaxconn); there is no setting."),
    ("log_pooler_errors", "there is no switch; the log level is set with PGTIDE_LOG (e.g. PGTIDE_LOG=debug)."),
    ("log_stats", "pgtide writes no statistics to the log: scrape the Prometheus endpoint (metrics_listen, /metrics) or run SHOW STATS on the console."),
    ("logfile", "pgtide logs to stderr: redirect it (2>>FILE) or let systemd-journald keep it; --log-format json suits a log collector."),
    ("max_db_client_connections", "pgtide has no client limit per database; max_client_conn limits clients in total and max_db_connections the server connections of each database."),
    ("max_user_client_connections", "pgtide has no client limit per user; max_client_conn limits clients in total."),
    ("max_user_connections", "pgtide has no server-connection limit per user; pool_size (per user: [users.NAME] pool_size) limits each (database, user) pool and max_db_connections each database."),
    ("pidfile", "pgtide does not daemonize or write a PID file: run it in the foreground under systemd (or another supervisor), which tracks the process."),
    ("pkt_buf", "pgtide sizes its buffers itself (they grow as needed and shrink back); max_message_size bounds one message."),
    ("query_wait_notify", "pgtide sends no notice while a client waits; waits show in SHOW POOLS and the pgtide_ metrics."),
    ("reserve_pool_size", RESERVE),
    ("reserve_pool_timeout", RESERVE),
    ("resolv_conf", DNS),
    ("sbuf_loopcnt", "pgtide has no such setting; each session forwards one batch at a time."),
    ("scram_iterations", "pgtide derives SCRAM secrets for plain passwords with 4096 iterations (PgBouncer's default) and uses each stored verifier's own count; no setting."),
    ("server_check_delay", SERVER_CHECK),
    ("server_check_query", SERVER_CHECK),
    ("server_fast_close", "after RECONNECT, or a RELOAD that changes a database's servers, pgtide closes a session-mode server when its client leaves (PgBouncer's default behaviour); there is no switch to cut sessions short."),
    ("server_login_retry", "pgtide retries a failed connect server_connect_retries times, waiting server_connect_backoff (doubled each time), and marks a host down after health_check_failures failed checks; tune those instead."),
    ("server_reset_query_always", "pgtide runs server_reset_query in session mode only; in transaction mode it replays each client's settings and pins a client that creates session state (session_state), so no reset is needed."),
    ("server_round_robin", "there is no switch; several servers of one database go in its hosts list, and reads are spread with load_balance."),
    ("server_tls13_ciphers", TLS_CIPHERS),
    ("server_tls_ciphers", TLS_CIPHERS),
    ("server_tls_protocols", TLS_PROTOCOLS),
    ("service_name", "the name of a Windows service; not used by pgtide."),
    ("stats_period", "SHOW STATS averages are refreshed every 15 s and the Prometheus metrics are live; there is no setting."),
    ("stats_users", "pgtide's console has no read-only role: a user needs admin_users for any console command (including PAUSE and SHUTDOWN). For read-only monitoring, scrape /metrics (metrics_listen) instead."),
    ("suspend_timeout", "pgtide has no SUSPEND or online restart (-R); on SIGTERM it lets transactions finish within shutdown_timeout."),
    ("syslog", SYSLOG),
    ("syslog_facility", SYSLOG),
    ("syslog_ident", SYSLOG),
    ("tcp_defer_accept", TCP),
    ("tcp_keepalive", TCP),
    ("tcp_keepcnt", TCP),
    ("tcp_keepidle", TCP),
    ("tcp_keepintvl", TCP),
    ("tcp_socket_buffer", TCP),
    ("tcp_user_timeout", TCP),
    ("unix_socket_dir", UNIX_SOCKET),
    ("unix_socket_group", UNIX_SOCKET),
    ("unix_socket_mode", UNIX_SOCKET),
    ("user", "pgtide does not switch users: start it as that user (systemd User=)."),
    ("verbose", "set the log level with PGTIDE_LOG (e.g. PGTIDE_LOG=debug)."),
];

/// The `[pgbouncer]` options that map onto pgtide options.
const MAPPED: &[&str] = &[
    "admin_users",
    "peer_id",
    "so_reuseport",
    "auth_file",
    "auth_hba_file",
    "auth_query",
    "auth_type",
    "auth_user",
    "client_idle_timeout",
    "client_login_timeout",
    "client_tls_ca_file",
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_sslmode",
    "default_pool_size",
    "idle_transaction_timeout",
    "listen_addr",
    "listen_port",
    "log_connections",
    "log_disconnections",
    "max_client_conn",
    "max_db_connections",
    "max_packet_size",
    "max_prepared_statements",
    "min_pool_size",
    "pool_mode",
    "query_timeout",
    "query_wait_timeout",
    "server_connect_timeout",
    "server_idle_timeout",
    "server_lifetime",
    "server_reset_query",
    "server_tls_ca_file",
    "server_tls_cert_file",
    "server_tls_key_file",
    "server_tls_sslmode",
    "track_extra_parameters",
    "transaction_timeout",
];

/// Comment lines (`# ...`), wrapped at 90 columns. Control characters (which a TOML
/// comment cannot hold) are replaced.
fn comment(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect();
    let mut out = String::new();
    for para in text.lines() {
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() > 1 && line.len() + 1 + word.len() > 90 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#  ");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One table being written: its keys, and the comments waiting for the next key.
#[derive(Default)]
struct Out {
    table: Table,
    pending: String,
}

impl Out {
    fn note(&mut self, text: impl AsRef<str>) {
        self.pending.push_str(&comment(text.as_ref()));
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.table.insert(key, Item::Value(value.into()));
        if !self.pending.is_empty() {
            let prefix = std::mem::take(&mut self.pending);
            if let Some(mut k) = self.table.key_mut(key) {
                k.leaf_decor_mut().set_prefix(prefix);
            }
        }
    }

    fn set_noted(&mut self, key: &str, value: impl Into<Value>, note: impl AsRef<str>) {
        self.note(note);
        self.set(key, value);
    }
}

fn duration(d: Duration) -> Value {
    // The form `ConfigDuration` writes and reads.
    Value::from(humantime::format_duration(d).to_string())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Array(Array::from_iter(items))
}

/// A value PgBouncer reads with `strtol`/`atoi` as a count: a non-negative integer.
fn count(e: &Entry, file: &str) -> Result<u32, ImportError> {
    e.value.trim().parse::<u32>().map_err(|_| ImportError {
        file: file.to_string(),
        line: Some(e.line),
        message: format!("{} = {:?} is not a non-negative integer", e.key, e.value),
    })
}

/// A PgBouncer time in seconds (a decimal number, `15` or `0.5`).
fn seconds_of(key: &str, value: &str) -> Result<Duration, String> {
    match value.trim().parse::<f64>() {
        Ok(v) if (0.0..1e12).contains(&v) => {
            Ok(Duration::from_micros((v * 1e6).round() as u64))
        }
        _ => Err(format!(
            "{key} = {value:?} is not a number of seconds (PgBouncer times are seconds, e.g. 15 or 0.5)"
        )),
    }
}

/// Parses a PgBouncer enum value (case-insensitive) with a pgtide config type's own names.
fn parse_enum<T: serde::de::DeserializeOwned>(value: &str) -> Option<T> {
    toml::Value::String(value.trim().to_ascii_lowercase())
        .try_into()
        .ok()
}

/// The last value of each `[pgbouncer]` option, and the lines that set it.
struct Settings {
    last: BTreeMap<String, Entry>,
}

impl Settings {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.last.get(key)
    }
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(|e| e.value.as_str())
    }
}

/// PgBouncer's pool modes.
fn pool_mode(value: &str) -> Option<(PoolMode, Option<&'static str>)> {
    match value.trim().to_ascii_lowercase().as_str() {
        "session" => Some((PoolMode::Session, None)),
        "transaction" => Some((PoolMode::Transaction, None)),
        "statement" => Some((
            PoolMode::Transaction,
            Some("pool_mode statement: pgtide has no statement mode; transaction mode is the closest (the server returns to the pool after each transaction; multi-statement transactions are allowed)."),
        )),
        _ => None,
    }
}

#[derive(Default)]
struct UserOut {
    password: Option<String>,
    auth_type: Option<AuthType>,
    pool_mode: Option<PoolMode>,
    pool_size: Option<u32>,
    /// `query_timeout`, `transaction_timeout` (0 = off, as in PgBouncer).
    timeouts: Vec<(&'static str, Duration)>,
    notes: Vec<String>,
    skip: bool,
}

/// Everything the mapping of `[pgbouncer]` decided that other sections need.
struct Global {
    auth_type: AuthType,
    pool_size: u32,
    min_pool_size: u32,
    admin_users: Vec<String>,
}

/// Translates a PgBouncer configuration.
pub fn import(input: &Input) -> Result<Imported, ImportError> {
    let file = input.ini_name;
    let at = |line: usize, message: String| ImportError {
        file: file.to_string(),
        line: Some(line),
        message,
    };
    let sections = ini::parse_ini(input.ini).map_err(|e| at(e.line, e.message))?;
    let userlist = match input.userlist {
        Some((text, name)) => Some((
            UserList::parse(text).map_err(|e| ImportError {
                file: name.to_string(),
                line: None,
                message: e,
            })?,
            name,
        )),
        None => None,
    };

    let mut settings = Settings {
        last: BTreeMap::new(),
    };
    let mut general = Out::default();
    for s in sections.iter().filter(|s| s.name == "pgbouncer") {
        for e in &s.entries {
            if !MAPPED.contains(&e.key.as_str()) && !NO_EQUIVALENT.iter().any(|(k, _)| *k == e.key)
            {
                return Err(at(
                    e.line,
                    format!("unknown PgBouncer option {:?} in [pgbouncer] (PgBouncer 1.25 refuses it too); fix or remove it", e.key),
                ));
            }
            if let Some(old) = settings.last.insert(e.key.clone(), e.clone()) {
                general.note(format!(
                    "{} is set on line {} and again on line {}: the later value counts (as in PgBouncer).",
                    e.key, old.line, e.line
                ));
            }
        }
    }
    let global = map_general(&settings, &mut general, &userlist, file)?;

    let mut doc = DocumentMut::new();
    let mut header = comment(&format!(
        "pooler.toml generated by `pgtide import` from {file}{}.",
        match &userlist {
            Some((_, name)) => format!(" and {name}"),
            None => String::new(),
        }
    ));
    header.push_str(&comment(
        "Every PgBouncer option is either mapped onto its pgtide equivalent or kept as a comment that says what to do instead. Where PgBouncer's default differs from pgtide's, PgBouncer's value is written out. Check the result with: pgtide check-config pooler.toml",
    ));
    header.push('\n');
    general.table.decor_mut().set_prefix(header);

    // Users first (the databases may add forced users), written last.
    let mut users: BTreeMap<String, UserOut> = BTreeMap::new();
    if let Some((list, name)) = &userlist {
        let mut listed: Vec<(&str, Option<&str>)> = list.users().collect();
        listed.sort();
        for (user, password) in listed {
            let mut u = UserOut {
                password: password.map(str::to_string),
                ..UserOut::default()
            };
            match password {
                None => u.notes.push(format!(
                    "{name} gives {user:?} an empty password: it can log in only with auth_type \"trust\"."
                )),
                Some(p)
                    if global.auth_type == AuthType::ScramSha256
                        && p.starts_with("md5")
                        && p.len() == 35 =>
                {
                    u.skip = true;
                    u.notes.push(format!(
                        "[users.{user}] is left out: {name} holds an md5 hash for it and auth_type is scram-sha-256, which cannot check an md5 hash (this user could not log in through PgBouncer either). Give it its plain password or a SCRAM verifier."
                    ));
                }
                Some(_) => {}
            }
            users.insert(user.to_string(), u);
        }
    }
    for s in sections.iter().filter(|s| s.name == "users") {
        for e in &s.entries {
            map_user(e, &mut users, file)?;
        }
    }
    for admin in &global.admin_users {
        users.entry(admin.clone()).or_default();
    }

    let mut db_notes = Out::default();
    let mut databases: Vec<(String, Out)> = Vec::new();
    for s in sections.iter().filter(|s| s.name == "databases") {
        for e in &s.entries {
            map_database(e, &global, &mut databases, &mut db_notes, &mut users, file)?;
        }
    }
    let mut trailing = String::new();
    let mut peers = toml_edit::InlineTable::new();
    for s in sections.iter().filter(|s| s.name == "peers") {
        for e in &s.entries {
            let pairs = ini::parse_connstr(&e.value)
                .map_err(|m| at(e.line, format!("peer {}: {m}", e.key)))?;
            for (k, _) in &pairs {
                if !["host", "port", "pool_size"].contains(&k.as_str()) {
                    return Err(at(
                        e.line,
                        format!(
                            "peer {}: unknown parameter {k:?}; a peer has host, port and pool_size",
                            e.key
                        ),
                    ));
                }
            }
            let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            let host = get("host").unwrap_or("");
            let host = if host == "localhost" {
                "127.0.0.1"
            } else {
                host
            };
            let addr = host.parse::<std::net::IpAddr>().ok().map(|ip| {
                std::net::SocketAddr::new(
                    ip,
                    get("port").and_then(|p| p.parse().ok()).unwrap_or(6432),
                )
            });
            match addr {
                Some(addr) => {
                    peers.insert(e.key.as_str(), Value::from(addr.to_string()));
                }
                None => trailing.push_str(&comment(&format!(
                    "[peers] {} = {} (line {}): pgtide peers are TCP addresses (no Unix sockets, no host names): give that process a peer_listen address and list it in [pgtide.peers].",
                    e.key, e.value, e.line
                ))),
            }
        }
    }

    let peering = settings
        .value("peer_id")
        .is_some_and(|v| v.trim().parse::<u32>().is_ok_and(|n| n != 0));
    if !peers.is_empty() && !peering {
        trailing.push_str(&comment(
            "[peers] is listed but peer_id is 0 or not set: peering is off (as in PgBouncer), so the peers are left out.",
        ));
    } else if !peers.is_empty() {
        general.set_noted(
            "peers",
            Value::InlineTable(peers),
            "PgBouncer's [peers], as the addresses where each process takes forwarded cancel requests: set each process's peer_listen to its own entry.",
        );
    }

    // Assemble: [pgtide], the databases, the users, then what is left to say.
    let mut carry = std::mem::take(&mut general.pending);
    doc.insert("pgtide", Item::Table(general.table));
    let mut db_parent = Table::new();
    db_parent.set_implicit(true);
    carry.push_str(&db_notes.pending);
    if databases.is_empty() {
        carry.push_str(&comment(
            "PgBouncer's file defines no database; pgtide needs at least one [databases.NAME] table (host, port, dbname) before it starts.",
        ));
    }
    for (name, mut out) in databases {
        let mut prefix = std::mem::take(&mut carry);
        prefix.push('\n');
        out.table.decor_mut().set_prefix(prefix);
        carry = std::mem::take(&mut out.pending);
        db_parent.insert(&name, Item::Table(out.table));
    }
    doc.insert("databases", Item::Table(db_parent));
    let mut user_parent = Table::new();
    user_parent.set_implicit(true);
    for (name, u) in users {
        if u.skip {
            for n in &u.notes {
                carry.push_str(&comment(n));
            }
            continue;
        }
        let mut out = Out::default();
        for n in &u.notes {
            out.note(n);
        }
        let mut prefix = std::mem::take(&mut carry);
        prefix.push('\n');
        out.table.decor_mut().set_prefix(prefix);
        if let Some(p) = &u.password {
            out.set("password", p.as_str());
        }
        if let Some(a) = u.auth_type {
            out.set("auth_type", a.to_string());
        }
        if let Some(m) = u.pool_mode {
            out.set("pool_mode", m.to_string());
        }
        if let Some(s) = u.pool_size {
            out.set("pool_size", i64::from(s));
        }
        for (k, d) in &u.timeouts {
            out.set(k, duration(*d));
        }
        carry.push_str(&out.pending);
        user_parent.insert(&name, Item::Table(out.table));
    }
    if !user_parent.is_empty() {
        doc.insert("users", Item::Table(user_parent));
    }
    carry.push_str(&trailing);
    if !carry.is_empty() {
        doc.set_trailing(format!("\n{carry}"));
    }

    let toml = doc.to_string();
    let mut warnings = Vec::new();
    if let Err(e) = Config::from_toml_str(&toml) {
        for p in e.problems {
            warnings.push(if p.key.is_empty() {
                p.message
            } else {
                format!("{}: {}", p.key, p.message)
            });
        }
    }
    Ok(Imported { toml, warnings })
}

/// `[pgbouncer]` onto `[pgtide]`.
fn map_general(
    s: &Settings,
    out: &mut Out,
    userlist: &Option<(UserList, &str)>,
    file: &str,
) -> Result<Global, ImportError> {
    let at = |e: &Entry, message: String| ImportError {
        file: file.to_string(),
        line: Some(e.line),
        message,
    };
    let pg = General::default();
    let seconds = |e: &Entry| seconds_of(&e.key, &e.value).map_err(|m| at(e, m));
    let shown = |e: &Entry| format!("{} = {} (line {})", e.key, e.value, e.line);

    // listen_addr + listen_port -> listen.
    let port = match s.get("listen_port") {
        Some(e) => match e.value.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(at(
                    e,
                    format!("listen_port = {:?} is not a port (1 to 65535)", e.value),
                ))
            }
        },
        None => 6432,
    };
    let (ip, listen_note) = match s.get("listen_addr") {
        None => (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "listen_addr is not set: PgBouncer listened on its Unix socket only. pgtide listens on TCP only, here on 127.0.0.1; clients connect with host=127.0.0.1.".to_string(),
        ),
        Some(e) => {
            let addrs: Vec<&str> = e.value.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
            let first = addrs.first().copied().unwrap_or("");
            let mut note = format!("from {}", shown(e));
            if let Some(p) = s.get("listen_port") {
                note.push_str(&format!(" and {}", shown(p)));
            }
            if addrs.len() > 1 {
                note.push_str(&format!(
                    ". pgtide listens on one address: {first} is used; \"0.0.0.0:{port}\" listens on every IPv4 address"
                ));
            }
            let ip = match first {
                "" => {
                    note.push_str(". PgBouncer listened on its Unix socket only; pgtide listens on TCP only, here on 127.0.0.1");
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                }
                "*" => {
                    note.push_str(&format!(". \"*\" is every IPv4 address here; write \"[::]:{port}\" to listen on IPv6 too"));
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                }
                "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                a => match a.trim_matches(['[', ']']).parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        let resolved = (a, port).to_socket_addrs().ok().and_then(|mut it| it.next());
                        match resolved {
                            Some(sa) => {
                                note.push_str(&format!(". pgtide listens on an address, not a name: {a} resolved to {} now", sa.ip()));
                                sa.ip()
                            }
                            None => return Err(at(e, format!("listen_addr {a:?} is neither an IP address nor a name that resolves; pgtide needs an IP address"))),
                        }
                    }
                },
            };
            note.push('.');
            (ip, note)
        }
    };
    out.set_noted("listen", SocketAddr::new(ip, port).to_string(), listen_note);

    // Where PgBouncer's defaults differ from pgtide's, write PgBouncer's.
    let mode = match s.get("pool_mode") {
        Some(e) => {
            let (m, n) = pool_mode(&e.value).ok_or_else(|| {
                at(
                    e,
                    format!(
                        "pool_mode = {:?}: PgBouncer has session, transaction and statement",
                        e.value
                    ),
                )
            })?;
            if let Some(n) = n {
                out.note(n);
            }
            m
        }
        None => {
            out.note(
                "pool_mode is not set: PgBouncer's default is session (pgtide's is transaction).",
            );
            PoolMode::Session
        }
    };
    out.set("pool_mode", mode.to_string());

    let pool_size = match s.get("default_pool_size") {
        Some(e) => {
            let n = count(e, file)?;
            if n == 0 {
                out.note(format!("{}: pgtide needs at least 1; 1 is used.", shown(e)));
                1
            } else {
                out.note(format!("from {}", shown(e)));
                n
            }
        }
        None => pg.pool_size,
    };
    if s.get("default_pool_size").is_some() {
        out.set("pool_size", i64::from(pool_size));
    }
    let mut min_pool_size = 0;
    if let Some(e) = s.get("min_pool_size") {
        let n = count(e, file)?;
        min_pool_size = n.min(pool_size);
        if n > pool_size {
            out.note(format!(
                "{}: PgBouncer caps it at the pool size; so does this file.",
                shown(e)
            ));
        }
        out.set("min_pool_size", i64::from(min_pool_size));
    }
    if let Some(e) = s.get("max_db_connections") {
        out.set("max_db_connections", i64::from(count(e, file)?));
    }
    match s.get("max_client_conn") {
        Some(e) => {
            let n = count(e, file)?;
            if n == 0 {
                out.note(format!("{}: pgtide needs at least 1; 1 is used.", shown(e)));
            }
            out.set("max_client_conn", i64::from(n.max(1)));
        }
        None => out.set_noted(
            "max_client_conn",
            100,
            "max_client_conn is not set: PgBouncer's default is 100 (pgtide's is 10000).",
        ),
    }

    // Timeouts: seconds -> durations.
    for key in [
        "query_wait_timeout",
        "server_connect_timeout",
        "client_login_timeout",
    ] {
        let Some(e) = s.get(key) else {
            continue;
        };
        let d = seconds(e)?;
        if d.is_zero() {
            out.set_noted(
                key,
                duration(FOREVER),
                format!("{}: 0 means no limit in PgBouncer; pgtide needs a duration, so one day is used.", shown(e)),
            );
        } else {
            out.set(key, duration(d));
        }
    }
    if s.get("server_connect_timeout").is_none() {
        out.set_noted(
            "server_connect_timeout",
            duration(Duration::from_secs(15)),
            "server_connect_timeout is not set: PgBouncer's default is 15 s (pgtide's is 5 s).",
        );
    }
    let login = match s.get("client_login_timeout") {
        Some(e) => {
            let d = seconds(e)?;
            if d.is_zero() {
                FOREVER
            } else {
                d
            }
        }
        None => pg.client_login_timeout.0,
    };
    if login <= pg.auth_failure_delay_max.0 {
        // pgtide slows down failed logins; the longest delay must fit in the login timeout.
        let max = login / 2;
        out.set_noted(
            "auth_failure_delay_max",
            duration(max),
            "pgtide slows down repeated failed logins (PgBouncer does not); the longest delay must be shorter than client_login_timeout, so it is half of it here.",
        );
        if pg.auth_failure_delay.0 > max {
            out.set("auth_failure_delay", duration(max));
        }
    }
    for key in [
        "server_idle_timeout",
        "idle_transaction_timeout",
        "client_idle_timeout",
        "query_timeout",
        "transaction_timeout",
    ] {
        if let Some(e) = s.get(key) {
            out.set(key, duration(seconds(e)?));
        }
    }
    if let Some(e) = s.get("server_lifetime") {
        let d = seconds(e)?;
        if d.is_zero() {
            out.set_noted(
                "server_lifetime",
                duration(Duration::from_millis(1)),
                format!("{}: 0 in PgBouncer means a server connection is used once and closed (in pgtide 0 means never closed), so 1 ms is used.", shown(e)),
            );
        } else {
            out.set("server_lifetime", duration(d));
        }
    }
    if let Some(e) = s.get("server_reset_query") {
        out.set("server_reset_query", e.value.as_str());
    }

    // Authentication.
    let (auth_type, hba) = match s.get("auth_type") {
        None => {
            out.note("auth_type is not set: PgBouncer's default is md5 (pgtide's is scram-sha-256); md5 also runs SCRAM for users whose secret is a SCRAM verifier.");
            (AuthType::Md5, false)
        }
        Some(e) => match e.value.trim().to_ascii_lowercase().as_str() {
            "md5" => (AuthType::Md5, false),
            "scram-sha-256" => (AuthType::ScramSha256, false),
            "trust" => (AuthType::Trust, false),
            "cert" => (AuthType::Cert, false),
            "plain" => {
                out.note(format!("{}: pgtide never asks for a clear-text password; md5 is used (SCRAM for users with a SCRAM verifier).", shown(e)));
                (AuthType::Md5, false)
            }
            "any" => {
                out.note(format!("{}: pgtide has no \"any\"; trust is the closest, but every user must still be listed under [users] (or auth_file), and the console still checks admin_users.", shown(e)));
                (AuthType::Trust, false)
            }
            "hba" => {
                out.note(format!("{}: pgtide applies auth_hba_file whenever it is set; auth_type is then only the method for users the rules send to it.", shown(e)));
                (AuthType::Md5, true)
            }
            "ldap" | "pam" => {
                out.note(format!("{}: pgtide has no LDAP or PAM; md5 is used, so the users need passwords ([users], auth_file) or an auth_query lookup.", shown(e)));
                (AuthType::Md5, false)
            }
            other => {
                return Err(at(e, format!("auth_type = {other:?}: PgBouncer has cert, md5, scram-sha-256, plain, trust, any, hba, ldap and pam")));
            }
        },
    };
    out.set("auth_type", auth_type.to_string());
    if let Some(e) = s.get("auth_file") {
        match userlist {
            Some((_, name)) => out.note(format!(
                "{}: the users of {name} are written under [users] below, so no auth_file is needed. To keep maintaining the file instead, set auth_file = {:?} and remove the passwords below.",
                shown(e), e.value
            )),
            None => {
                if std::path::Path::new(&e.value).is_relative() {
                    out.note("auth_file is a relative path: PgBouncer read it relative to its working directory, pgtide reads it relative to this file; make it absolute if they differ.");
                }
                out.note("pgtide reads PgBouncer's userlist.txt format as is.");
                out.set("auth_file", e.value.as_str());
            }
        }
    }
    if let Some(e) = s.get("auth_hba_file") {
        if hba {
            if std::path::Path::new(&e.value).is_relative() {
                out.note(
                    "auth_hba_file is a relative path: pgtide reads it relative to this file.",
                );
            }
            out.note("pgtide's hba rules: host, hostssl and hostnossl lines (local never matches) with trust, reject, md5, scram-sha-256, password or cert.");
            out.set("auth_hba_file", e.value.as_str());
        } else {
            out.note(format!("{}: left out. PgBouncer reads it only with auth_type = hba, while pgtide would apply it whenever it is set.", shown(e)));
        }
    }
    if let Some(e) = s.get("auth_user") {
        out.set("auth_user", e.value.as_str());
    }
    if let Some(e) = s.get("auth_query") {
        out.set("auth_query", e.value.as_str());
    }
    let split = |v: &str| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut admin_users = Vec::new();
    if let Some(e) = s.get("admin_users") {
        admin_users = split(&e.value);
        out.note("Each admin user needs a [users.NAME] table (added below when missing); it logs in to the console (database pgtide or pgbouncer) with its own password.");
        out.set(
            "admin_users",
            strings(admin_users.iter().map(String::as_str)),
        );
    }

    // Logging.
    let flag = |key: &str| -> Result<Option<bool>, ImportError> {
        match s.get(key) {
            None => Ok(None),
            Some(e) => Ok(Some(count(e, file)? != 0)),
        }
    };
    // Several processes on one port, and cancel forwarding between them.
    if flag("so_reuseport")? == Some(true) {
        out.set_noted(
            "so_reuseport",
            true,
            "On Linux also set the sysctl net.ipv4.tcp_migrate_req = 1, so that a process that stops hands the connections queued on it to the others instead of resetting them.",
        );
    }
    if let Some(e) = s.get("peer_id") {
        let n = count(e, file)?;
        if n != 0 {
            out.set_noted(
                "peer_id",
                i64::from(n),
                "Each process also needs peer_listen = an address of its own (not shared through so_reuseport) where the others forward cancel requests for its keys; [pgtide.peers] lists them by peer_id.",
            );
        }
    }
    let (conn, disconn) = (flag("log_connections")?, flag("log_disconnections")?);
    let log = conn.unwrap_or(true) || disconn.unwrap_or(true);
    if conn.is_none() && disconn.is_none() {
        out.note("log_connections and log_disconnections are not set: PgBouncer logs both by default (pgtide does not); pgtide's log_connections covers both.");
    } else {
        out.note("pgtide's log_connections logs logins and disconnections (PgBouncer's log_connections and log_disconnections).");
    }
    out.set("log_connections", log);

    if let Some(e) = s.get("max_packet_size") {
        let n = e.value.trim().parse::<u64>().map_err(|_| {
            at(
                e,
                format!(
                    "max_packet_size = {:?} is not a non-negative integer",
                    e.value
                ),
            )
        })?;
        let clamped = n.clamp(1024, 1 << 30);
        if clamped != n {
            out.note(format!(
                "{}: pgtide accepts 1 KiB to 1 GiB; {clamped} is used.",
                shown(e)
            ));
        }
        out.set("max_message_size", clamped as i64);
    }
    if let Some(e) = s.get("max_prepared_statements") {
        out.set("max_prepared_statements", i64::from(count(e, file)?));
    }
    if let Some(e) = s.get("track_extra_parameters") {
        let extra: Vec<String> = split(&e.value)
            .into_iter()
            .filter(|p| !BUILT_IN_TRACKED.contains(&p.to_ascii_lowercase().as_str()))
            .collect();
        out.note(format!("from {}: pgtide always keeps client_encoding, DateStyle, IntervalStyle, TimeZone, standard_conforming_strings, application_name, search_path and default_transaction_read_only per client; the others are listed here.", shown(e)));
        out.set(
            "track_extra_params",
            strings(extra.iter().map(String::as_str)),
        );
    }

    // TLS towards clients.
    let client_mode = match s.get("client_tls_sslmode") {
        Some(e) => parse_enum::<ClientSslMode>(&e.value).ok_or_else(|| {
            at(e, format!("client_tls_sslmode = {:?}: use disable, allow, prefer, require, verify-ca or verify-full", e.value))
        })?,
        None => ClientSslMode::Disable,
    };
    if s.get("client_tls_sslmode").is_some() {
        out.set("client_tls_sslmode", client_mode.to_string());
    }
    for key in [
        "client_tls_cert_file",
        "client_tls_key_file",
        "client_tls_ca_file",
    ] {
        let Some(e) = s.get(key) else {
            continue;
        };
        if e.value.is_empty() {
            continue;
        }
        if client_mode == ClientSslMode::Disable {
            out.note(format!("{}: left out, since client TLS is off (PgBouncer ignores the file then; pgtide refuses it). Set client_tls_sslmode to use it.", shown(e)));
        } else {
            out.set(key, e.value.as_str());
        }
    }

    // TLS towards the servers.
    let server_mode = match s.get("server_tls_sslmode") {
        Some(e) => {
            let m = if e.value.trim().eq_ignore_ascii_case("allow") {
                out.note(format!(
                    "{}: pgtide has no \"allow\"; prefer is the closest.",
                    shown(e)
                ));
                ServerSslMode::Prefer
            } else {
                parse_enum::<ServerSslMode>(&e.value).ok_or_else(|| {
                    at(e, format!("server_tls_sslmode = {:?}: use disable, allow, prefer, require, verify-ca or verify-full", e.value))
                })?
            };
            out.set("server_tls_sslmode", m.to_string());
            m
        }
        None => ServerSslMode::Prefer,
    };
    for key in [
        "server_tls_ca_file",
        "server_tls_cert_file",
        "server_tls_key_file",
    ] {
        if let Some(e) = s.get(key) {
            if !e.value.is_empty() {
                out.set(key, e.value.as_str());
            }
        }
    }
    let has_ca = s.value("server_tls_ca_file").is_some_and(|v| !v.is_empty());
    if matches!(
        server_mode,
        ServerSslMode::VerifyCa | ServerSslMode::VerifyFull
    ) && !has_ca
    {
        out.set_noted(
            "server_tls_ca_file",
            "/etc/ssl/certs/ca-certificates.crt",
            "server_tls_ca_file is not set: PgBouncer used the system's CA certificates; pgtide needs the file named. This is their place on Debian and Ubuntu (RHEL: /etc/pki/tls/certs/ca-bundle.crt).",
        );
    }

    // Everything without an equivalent, in the order of the file.
    let mut rest: Vec<&Entry> = s
        .last
        .values()
        .filter(|e| !MAPPED.contains(&e.key.as_str()))
        .collect();
    rest.sort_by_key(|e| e.line);
    for e in rest {
        let what = NO_EQUIVALENT
            .iter()
            .find(|(k, _)| *k == e.key)
            .map_or("", |(_, n)| n);
        let value = if e.key == "auth_ldap_options" {
            "(value not shown)".to_string()
        } else {
            e.value.clone()
        };
        out.note(format!(
            "{} = {} (line {}): none in pgtide: {what}",
            e.key, value, e.line
        ));
    }
    Ok(Global {
        auth_type,
        pool_size,
        min_pool_size,
        admin_users,
    })
}

/// One `[users]` line.
fn map_user(
    e: &Entry,
    users: &mut BTreeMap<String, UserOut>,
    file: &str,
) -> Result<(), ImportError> {
    let at = |message: String| ImportError {
        file: file.to_string(),
        line: Some(e.line),
        message,
    };
    let pairs = ini::parse_connstr(&e.value).map_err(|m| at(format!("user {}: {m}", e.key)))?;
    let u = users.entry(e.key.clone()).or_default();
    for (k, v) in pairs {
        let num = || {
            v.parse::<u32>().map_err(|_| {
                at(format!(
                    "user {}: {k}={v:?} is not a non-negative integer",
                    e.key
                ))
            })
        };
        match k.as_str() {
            "pool_mode" => {
                let (m, n) = pool_mode(&v).ok_or_else(|| {
                    at(format!("user {}: pool_mode={v:?}: PgBouncer has session, transaction and statement", e.key))
                })?;
                if let Some(n) = n {
                    u.notes.push(n.to_string());
                }
                u.pool_mode = Some(m);
            }
            "pool_size" => {
                let n = num()?;
                if n == 0 {
                    u.notes.push(format!(
                        "pool_size=0 (line {}): pgtide needs at least 1; 1 is used.",
                        e.line
                    ));
                }
                u.pool_size = Some(n.max(1));
            }
            "reserve_pool_size" => u.notes.push(format!("reserve_pool_size={v} (line {}): none in pgtide: {RESERVE}", e.line)),
            "query_timeout" | "transaction_timeout" => {
                let d = seconds_of(&k, &v).map_err(|m| at(format!("user {}: {m}", e.key)))?;
                let key = if k == "query_timeout" { "query_timeout" } else { "transaction_timeout" };
                u.timeouts.push((key, d));
            }
            "max_user_connections" | "max_user_client_connections" => {
                let what = NO_EQUIVALENT.iter().find(|(n, _)| *n == k).map_or("", |(_, n)| n);
                u.notes.push(format!("{k}={v} (line {}): none in pgtide: {what}", e.line));
            }
            "idle_transaction_timeout" | "client_idle_timeout" => u.notes.push(format!(
                "{k}={v} (line {}): pgtide has no per-user {k}; [pgtide] {k} applies to everyone.",
                e.line
            )),
            other => {
                return Err(at(format!(
                    "user {}: unknown parameter {other:?}; PgBouncer's [users] take pool_mode, pool_size, reserve_pool_size, max_user_connections, max_user_client_connections, query_timeout, idle_transaction_timeout, transaction_timeout and client_idle_timeout",
                    e.key
                )))
            }
        }
    }
    Ok(())
}

/// One `[databases]` line.
fn map_database(
    e: &Entry,
    global: &Global,
    databases: &mut Vec<(String, Out)>,
    notes: &mut Out,
    users: &mut BTreeMap<String, UserOut>,
    file: &str,
) -> Result<(), ImportError> {
    let at = |message: String| ImportError {
        file: file.to_string(),
        line: Some(e.line),
        message,
    };
    let name = e.key.as_str();
    let pairs = ini::parse_connstr(&e.value).map_err(|m| at(format!("database {name}: {m}")))?;
    if name == "pgbouncer" {
        return Err(at("the database name \"pgbouncer\" is reserved for the admin console (PgBouncer refuses it too)".into()));
    }
    if name == "*" {
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        let host = pairs
            .iter()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v.as_str());
        notes.note(format!(
            "* = ... (line {}), PgBouncer's fallback for any database name (with {}): pgtide serves only the databases it lists. Add a [databases.NAME] table for each database the clients use, e.g. [databases.mydb] with host = {:?}.",
            e.line,
            if keys.is_empty() { "no parameters".to_string() } else { keys.join(", ") },
            host.unwrap_or("127.0.0.1")
        ));
        return Ok(());
    }
    if crate::config::ADMIN_DATABASES.contains(&name) {
        notes.note(format!(
            "database {name} (line {}) is left out: pgtide reserves the name for its admin console. Add it under another name with dbname = \"{name}\".",
            e.line
        ));
        return Ok(());
    }
    let mut out = Out::default();
    let shown: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            if k == "password" {
                format!("{k}=(not shown)")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    out.note(format!("line {}: {name} = {}", e.line, shown.join(" ")));
    if let Some(i) = databases.iter().position(|(n, _)| n == name) {
        databases.remove(i);
        out.note(format!("database {name} is defined again on line {}: this later definition counts (as in PgBouncer).", e.line));
    }
    let get = |k: &str| {
        pairs
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let port = match get("port") {
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(at(format!(
                    "database {name}: port={p:?} is not a port (1 to 65535)"
                )))
            }
        },
        None => 5432,
    };
    let unix = |h: &str| h.starts_with('/') || h.starts_with('@');
    match get("host") {
        None => out.set_noted(
            "host",
            "127.0.0.1",
            format!("database {name} has no host: PgBouncer connected over the Unix socket (unix_socket_dir). pgtide connects over TCP, here to 127.0.0.1 (PostgreSQL must listen on it)."),
        ),
        Some(h) if !h.contains(',') && unix(h) => out.set_noted(
            "host",
            "127.0.0.1",
            format!("database {name}: host={h} is a Unix socket; pgtide connects over TCP, here to 127.0.0.1 (PostgreSQL must listen on it)."),
        ),
        Some(h) if h.contains(',') => {
            let mut hosts = Array::new();
            let mut seen = Vec::new();
            for one in h.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                if unix(one) {
                    out.note(format!("host {one} is a Unix socket: left out (pgtide connects over TCP)."));
                    continue;
                }
                if seen.contains(&one) {
                    continue;
                }
                seen.push(one);
                let mut t = InlineTable::new();
                t.insert("host", Value::from(one));
                t.insert("port", Value::from(i64::from(port)));
                t.insert("role", Value::from(HostRole::Auto.to_string()));
                hosts.push(Value::InlineTable(t));
            }
            out.set_noted(
                "hosts",
                Value::Array(hosts),
                "PgBouncer spread new connections over these hosts in turn. pgtide asks each one pg_is_in_recovery() (role \"auto\"): writes go to the primary and reads may go to the replicas. If they are all equal copies, that is a change: keep one host.",
            );
        }
        Some(h) => out.set("host", h),
    }
    if get("host").is_none_or(|h| !h.contains(',')) && get("port").is_some() {
        out.set("port", i64::from(port));
    }
    if let Some(d) = get("dbname") {
        if d != name {
            out.set("dbname", d);
        }
    }
    let mut size = None;
    let mut min = None;
    for (k, v) in &pairs {
        let num = || {
            v.parse::<u32>().map_err(|_| {
                at(format!(
                    "database {name}: {k}={v:?} is not a non-negative integer"
                ))
            })
        };
        match k.as_str() {
            "dbname" | "host" | "port" | "user" | "password" => {}
            "pool_size" => {
                let n = num()?;
                if n == 0 {
                    out.note("pool_size=0: pgtide needs at least 1; 1 is used.");
                }
                size = Some(n.max(1));
            }
            "min_pool_size" => min = Some(num()?),
            "max_db_connections" => out.set("max_db_connections", i64::from(num()?)),
            "pool_mode" => {
                let (m, n) = pool_mode(v).ok_or_else(|| {
                    at(format!("database {name}: pool_mode={v:?}: PgBouncer has session, transaction and statement"))
                })?;
                if let Some(n) = n {
                    out.note(n);
                }
                out.set("pool_mode", m.to_string());
            }
            "auth_user" => out.set("auth_user", v.as_str()),
            "auth_query" => out.set("auth_query", v.as_str()),
            "auth_dbname" => out.note(format!("auth_dbname={v}: none in pgtide: pgtide runs auth_query in this database itself.")),
            "reserve_pool" | "reserve_pool_size" => out.note(format!("{k}={v}: none in pgtide: {RESERVE}")),
            "max_db_client_connections" => out.note(format!("{k}={v}: none in pgtide: pgtide has no client limit per database; max_client_conn limits clients in total.")),
            "server_lifetime" => out.note(format!("{k}={v}: pgtide has no per-database server_lifetime; [pgtide] server_lifetime applies to every database.")),
            "load_balance_hosts" => out.note(format!("{k}={v}: none in pgtide: with several hosts, writes go to the primary and reads are spread with load_balance.")),
            "connect_query" => out.note(format!("connect_query={v}: none in pgtide: pgtide runs no query on new server connections; set what it set with ALTER DATABASE/ROLE ... SET, or run it in the application.")),
            "application_name" | "client_encoding" | "datestyle" | "timezone" => out.note(format!(
                "{k}={v}: none in pgtide: set a default in PostgreSQL instead (ALTER DATABASE {} SET {k} = '{v}'); the settings a client sends follow it through pgtide.",
                get("dbname").unwrap_or(name)
            )),
            other => {
                return Err(at(format!(
                    "database {name}: unknown connection parameter {other:?} (PgBouncer refuses it too)"
                )))
            }
        }
    }
    if let Some(n) = size {
        out.set("pool_size", i64::from(n));
    }
    if let Some(m) = min {
        let cap = size.unwrap_or(global.pool_size);
        if m > cap {
            out.note(format!("min_pool_size={m} is above the pool size {cap}: PgBouncer caps it; so does this file."));
        }
        out.set("min_pool_size", i64::from(m.min(cap)));
    } else if size.is_some_and(|n| n < global.min_pool_size) {
        out.set("min_pool_size", i64::from(size.unwrap_or(1)));
    }
    match (get("user"), get("password")) {
        (Some(user), password) => {
            out.note(format!(
                "PgBouncer logged in to this database as {user:?} for every client (user=). pgtide logs in as the client's own user: clients of this database connect as {user:?}, whose password is under [users.{user}]."
            ));
            let u = users.entry(user.to_string()).or_default();
            if let Some(p) = password {
                if u.password.is_none() && !u.skip {
                    u.password = Some(p.to_string());
                } else if u.password.as_deref() != Some(p) {
                    u.notes.push(format!("database {name} (line {}) gives a different password for {user:?} than the userlist; the userlist's is kept.", e.line));
                }
            }
        }
        (None, Some(_)) => {
            out.note("password= without user=: PgBouncer uses it only with user=; left out.")
        }
        (None, None) => {}
    }
    databases.push((name.to_string(), out));
    Ok(())
}

#[cfg(test)]
mod tests;
