//! Configuration: the serde types, their defaults, validation, and the zero-config
//! `--upstream URL` / `DATABASE_URL` quick mode.
//!
//! This module is a leaf: it imports nothing else of pgtide. Every default lives in one
//! `Default` impl; `Config::validate` runs after loading and reports every problem it
//! finds, not just the first one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

mod validate;
pub use validate::{ConfigError, Problem};

/// How long a server connection stays with one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// The server connection returns to the pool at every ReadyForQuery with status `I`.
    Transaction,
    /// The server connection stays with the client until it disconnects.
    Session,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        })
    }
}

/// How a client proves who it is to pgtide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthType::Trust => "trust",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
        })
    }
}

/// A duration written as a humantime string ("5s", "250ms", "2m", "1h 30m") or as an
/// integer number of milliseconds. Zero means "disabled" where the option says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn secs(s: u64) -> Self {
        ConfigDuration(Duration::from_secs(s))
    }
    /// `None` when zero (the option is disabled).
    pub fn enabled(self) -> Option<Duration> {
        if self.0.is_zero() {
            None
        } else {
            Some(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(ConfigDuration(Duration::from_millis(ms))),
            Raw::Text(s) => parse_duration(&s)
                .map(ConfigDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// Parses "5s", "250ms", "0", "1h 30m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\" or an integer of milliseconds")
    })
}

/// Settings that apply to the whole process, with per-database and per-user overrides
/// for the pool settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct General {
    /// Address clients connect to. Needs a restart to change.
    pub listen: SocketAddr,
    /// `transaction` (default) or `session`.
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) pool.
    pub pool_size: u32,
    /// Server connections each pool keeps open even when idle.
    pub min_pool_size: u32,
    /// Server connections per database across all users; 0 = no limit.
    pub max_db_connections: u32,
    /// Client connections pgtide accepts in total; further clients get 53300.
    pub max_client_conn: u32,
    /// How long a client may wait in the queue for a server connection.
    pub query_wait_timeout: ConfigDuration,
    /// How long one attempt to connect and log in to a server may take.
    pub server_connect_timeout: ConfigDuration,
    /// Connect attempts before a client is told that the server is unreachable.
    pub server_connect_retries: u32,
    /// First back-off between connect attempts; doubles on each retry.
    pub server_connect_backoff: ConfigDuration,
    /// Idle server connections older than this (since last use) are closed; 0 = never.
    pub server_idle_timeout: ConfigDuration,
    /// Server connections older than this are closed when next released; 0 = never.
    pub server_lifetime: ConfigDuration,
    /// A client idle inside a transaction this long is disconnected; 0 = never.
    pub idle_transaction_timeout: ConfigDuration,
    /// A client idle outside a transaction this long is disconnected; 0 = never.
    pub client_idle_timeout: ConfigDuration,
    /// A client must finish startup and authentication within this.
    pub client_login_timeout: ConfigDuration,
    /// On SIGTERM/SIGINT, in-flight transactions get this long to finish.
    pub shutdown_timeout: ConfigDuration,
    /// Run on a session-mode server connection before it returns to the pool.
    pub server_reset_query: String,
    /// Default client authentication method for users without their own `auth_type`.
    pub auth_type: AuthType,
    /// Extra run-time parameters (besides the built-in tracked set) whose per-client
    /// values pgtide keeps and re-applies on every server connection the client gets.
    pub track_extra_params: Vec<String>,
    /// Largest protocol message pgtide accepts from a client or server, in bytes.
    pub max_message_size: u32,
    /// Log each client connection and disconnection at info level.
    pub log_connections: bool,
    /// Named prepared statements each server connection keeps in transaction mode (the
    /// least recently used is closed beyond it); 0 turns the tracking off, so named
    /// statements pass through untouched (only safe in session mode).
    pub max_prepared_statements: u32,
    /// Distinct prepared statements (text and parameter types) pgtide remembers across
    /// all clients.
    pub prepared_statement_cache_size: u32,
    /// Bytes of statement text pgtide remembers across all clients.
    pub prepared_statement_cache_bytes: u32,
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz; empty turns
    /// it off. Needs a restart to change.
    pub metrics_listen: String,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            min_pool_size: 0,
            max_db_connections: 0,
            max_client_conn: 10_000,
            query_wait_timeout: ConfigDuration::secs(120),
            server_connect_timeout: ConfigDuration::secs(5),
            server_connect_retries: 3,
            server_connect_backoff: ConfigDuration(Duration::from_millis(100)),
            server_idle_timeout: ConfigDuration::secs(600),
            server_lifetime: ConfigDuration::secs(3600),
            idle_transaction_timeout: ConfigDuration::secs(0),
            client_idle_timeout: ConfigDuration::secs(0),
            client_login_timeout: ConfigDuration::secs(60),
            shutdown_timeout: ConfigDuration::secs(30),
            server_reset_query: "DISCARD ALL".to_string(),
            auth_type: AuthType::ScramSha256,
            track_extra_params: Vec::new(),
            max_message_size: 64 * 1024 * 1024,
            log_connections: false,
            max_prepared_statements: 200,
            prepared_statement_cache_size: 10_000,
            prepared_statement_cache_bytes: 64 * 1024 * 1024,
            metrics_listen: "127.0.0.1:9930".to_string(),
        }
    }
}

/// One logical database clients can connect to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    /// Server host (name or address).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database name on the server; defaults to the name clients use.
    pub dbname: Option<String>,
    /// Overrides `[pgtide].pool_mode` for this database.
    pub pool_mode: Option<PoolMode>,
    /// Overrides `[pgtide].pool_size` for this database.
    pub pool_size: Option<u32>,
    /// Overrides `[pgtide].min_pool_size` for this database.
    pub min_pool_size: Option<u32>,
    /// Overrides `[pgtide].max_db_connections` for this database.
    pub max_db_connections: Option<u32>,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            host: "127.0.0.1".to_string(),
            port: 5432,
            dbname: None,
            pool_mode: None,
            pool_size: None,
            min_pool_size: None,
            max_db_connections: None,
        }
    }
}

/// One user clients can log in as.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct User {
    /// A plain password, an md5 hash (`md5` + 32 hex digits) or a SCRAM verifier
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`). Used to check the
    /// client and, when it is plain or md5, to log in to the server.
    pub password: Option<String>,
    /// Overrides `[pgtide].auth_type` for this user.
    pub auth_type: Option<AuthType>,
    /// Overrides the pool mode for this user (wins over the database's).
    pub pool_mode: Option<PoolMode>,
    /// Overrides the pool size for this user (wins over the database's).
    pub pool_size: Option<u32>,
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub pgtide: General,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
}

/// The resolved settings of one (database, user) pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    pub pool_mode: PoolMode,
    pub pool_size: u32,
    pub min_pool_size: u32,
    pub max_db_connections: u32,
}

impl Config {
    /// Parses and validates a TOML document; every problem is reported.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        validate::parse_and_validate(text)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
    }

    /// Runs the checks that span several keys (pool sizes, passwords and auth types, ...)
    /// on a configuration built in code; files get them from `from_toml_str`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::check(self)
    }

    /// Zero-config sidecar mode: one database and one user taken from a
    /// `postgres://user:pass@host:port/db` URL, transaction pooling, defaults elsewhere.
    pub fn from_upstream_url(url: &str) -> Result<Config, ConfigError> {
        validate::from_upstream_url(url)
    }

    /// The settings of the pool for (database, user): user overrides win over database
    /// overrides, which win over the global values.
    pub fn pool_settings(&self, database: &str, user: &str) -> PoolSettings {
        let g = &self.pgtide;
        let d = self.databases.get(database);
        let u = self.users.get(user);
        PoolSettings {
            pool_mode: u
                .and_then(|u| u.pool_mode)
                .or(d.and_then(|d| d.pool_mode))
                .unwrap_or(g.pool_mode),
            pool_size: u
                .and_then(|u| u.pool_size)
                .or(d.and_then(|d| d.pool_size))
                .unwrap_or(g.pool_size),
            min_pool_size: d.and_then(|d| d.min_pool_size).unwrap_or(g.min_pool_size),
            max_db_connections: d
                .and_then(|d| d.max_db_connections)
                .unwrap_or(g.max_db_connections),
        }
    }

    /// The authentication method for `user`.
    pub fn auth_type(&self, user: &str) -> AuthType {
        self.users
            .get(user)
            .and_then(|u| u.auth_type)
            .unwrap_or(self.pgtide.auth_type)
    }
}
