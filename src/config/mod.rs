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

pub mod keys;
mod source;
mod validate;
pub use source::{ConfigSource, Overrides};
pub use validate::{ConfigError, Problem, ADMIN_DATABASES};

/// How long a server connection stays with one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// The server connection returns to the pool at every ReadyForQuery with status `I`.
    Transaction,
    /// The server connection stays with the client until it disconnects.
    Session,
}

/// What a transaction-mode client that creates session state (a temp table, a session
/// advisory lock, LISTEN, a WITH HOLD cursor, LOAD, SET SESSION AUTHORIZATION, an SQL
/// PREPARE among other statements or through Parse; a Query that is one PREPARE is
/// pgtide's own and creates none) gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// The client keeps its server connection, as in session mode, until the state is
    /// gone or it leaves; then the server is reset (`DISCARD ALL`) before anyone else
    /// gets it.
    Pin,
    /// The statement fails with SQLSTATE 0A000 before it reaches the server.
    Reject,
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionState::Pin => "pin",
            SessionState::Reject => "reject",
        })
    }
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
    /// The client's TLS certificate, verified against `client_tls_ca_file`, must have a
    /// common name (CN) equal to the user name.
    #[serde(rename = "cert")]
    Cert,
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthType::Trust => "trust",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Cert => "cert",
        })
    }
}

/// What pgtide asks of clients' TLS (PgBouncer's `client_tls_sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientSslMode {
    /// No TLS: SSLRequest is answered 'N', a direct TLS handshake is refused.
    Disable,
    /// TLS when the client asks for it; plain connections are accepted too.
    Allow,
    /// The same as `allow` on the client side (as in PgBouncer).
    Prefer,
    /// Every client must use TLS.
    Require,
    /// TLS with a client certificate signed by `client_tls_ca_file`.
    VerifyCa,
    /// The same as `verify-ca` on the client side (as in PgBouncer): a client
    /// certificate has no host name to check.
    VerifyFull,
}

impl fmt::Display for ClientSslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientSslMode::Disable => "disable",
            ClientSslMode::Allow => "allow",
            ClientSslMode::Prefer => "prefer",
            ClientSslMode::Require => "require",
            ClientSslMode::VerifyCa => "verify-ca",
            ClientSslMode::VerifyFull => "verify-full",
        })
    }
}

/// How pgtide uses TLS to the servers (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it (no certificate check), else plain.
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a server certificate signed by `server_tls_ca_file`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host pgtide connects to.
    VerifyFull,
}

impl fmt::Display for ServerSslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerSslMode::Disable => "disable",
            ServerSslMode::Prefer => "prefer",
            ServerSslMode::Require => "require",
            ServerSslMode::VerifyCa => "verify-ca",
            ServerSslMode::VerifyFull => "verify-full",
        })
    }
}

/// What a configured host is, or how its role is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Takes writes. At most one host of a database is configured as primary; one that
    /// reports being in recovery is treated as a replica.
    Primary,
    /// A streaming replica (hot standby); one that reports not being in recovery (it was
    /// promoted) becomes a primary candidate.
    Replica,
    /// Whatever `pg_is_in_recovery()` says at each health check.
    Auto,
}

impl fmt::Display for HostRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostRole::Primary => "primary",
            HostRole::Replica => "replica",
            HostRole::Auto => "auto",
        })
    }
}

/// How a read picks among the usable replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// The replica with the fewest queries in flight (per weight).
    LeastOutstanding,
    /// In turn, each replica `weight` times.
    RoundRobin,
    /// At random, in proportion to `weight`.
    Random,
}

impl fmt::Display for LoadBalance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadBalance::LeastOutstanding => "least_outstanding",
            LoadBalance::RoundRobin => "round_robin",
            LoadBalance::Random => "random",
        })
    }
}

/// What a read does when no replica is usable (all down or lagging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaFallback {
    /// Run it on the primary.
    Primary,
    /// Fail it with an error.
    Error,
}

impl fmt::Display for ReplicaFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaFallback::Primary => "primary",
            ReplicaFallback::Error => "error",
        })
    }
}

/// Whether a client's reads must see its own committed writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    Off,
    /// After a write, reads go only to replicas that replayed its commit LSN.
    Lsn,
}

impl fmt::Display for ReadYourWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadYourWrites::Off => "off",
            ReadYourWrites::Lsn => "lsn",
        })
    }
}

/// Where a user's or a database's transactions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Reads to replicas, writes to the primary, as the classifier decides.
    Auto,
    /// Everything to the primary.
    Primary,
    /// Everything to replicas (a reporting user); writes fail there.
    Replica,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Auto => "auto",
            Route::Primary => "primary",
            Route::Replica => "replica",
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

/// PgBouncer's default `auth_query`: the secret from `pg_authid`, NULL once the role's
/// `VALID UNTIL` has passed, only for roles that can log in.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

/// Settings that apply to the whole process, with per-database and per-user overrides
/// for the pool settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct General {
    /// Address clients connect to. Needs a restart to change.
    pub listen: SocketAddr,
    /// `transaction` (default) or `session`.
    pub pool_mode: PoolMode,
    /// Transaction mode: what a client that creates session state gets (`pin`, the
    /// default, or `reject`).
    pub session_state: SessionState,
    /// Server connections per (database, user) pool.
    pub pool_size: u32,
    /// Server connections each pool keeps open even when idle.
    pub min_pool_size: u32,
    /// Server connections per database across all users; 0 = no limit.
    pub max_db_connections: u32,
    /// Client connections pgtide accepts in total; further clients get 53300.
    pub max_client_conn: u32,
    /// Threads of the runtime that serves clients: 1 = one event loop on one thread (the
    /// default), 0 = one per CPU core. Needs a restart.
    pub worker_threads: u32,
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
    /// A query (a request the server has not finished answering) running longer than
    /// this is cancelled on the server: the client gets 57014 and stays. A server that
    /// does not answer the cancel within 2 s more is disconnected. 0 = off.
    pub query_timeout: ConfigDuration,
    /// A client whose transaction (or autocommit statement) has lasted longer than this
    /// is disconnected with 25P04; the server's transaction is rolled back. 0 = off.
    pub transaction_timeout: ConfigDuration,
    /// A client idle outside a transaction this long is disconnected; 0 = never.
    pub client_idle_timeout: ConfigDuration,
    /// A client must finish startup and authentication within this.
    pub client_login_timeout: ConfigDuration,
    /// On SIGTERM/SIGINT, in-flight transactions get this long to finish.
    pub shutdown_timeout: ConfigDuration,
    /// On SIGTERM/SIGINT (or SHUTDOWN), how long pgtide goes on serving, and accepting,
    /// while `/readyz` says it is shutting down, so that load balancers stop sending it
    /// clients before it stops accepting; 0 = stop accepting at once.
    pub shutdown_delay: ConfigDuration,
    /// Listen with `SO_REUSEPORT`, so that several pgtide processes share `listen` and
    /// the kernel spreads new connections over them. Needs a restart to change.
    pub so_reuseport: bool,
    /// This process's number among peered pgtide processes (1..=16383), encoded in the
    /// cancel keys it hands out; 0 = no peering. Needs a restart to change.
    pub peer_id: u32,
    /// Peers by number: the address where each peer takes forwarded cancel requests
    /// (its `peer_listen`). A cancel request whose key another peer handed out is
    /// forwarded there.
    pub peers: BTreeMap<String, String>,
    /// An address of this process alone (not shared with `SO_REUSEPORT`) where peers send
    /// forwarded cancel requests; clients may connect there too. Empty = none. Needs a
    /// restart to change.
    pub peer_listen: String,
    /// Run on a session-mode server connection before it returns to the pool.
    pub server_reset_query: String,
    /// Default client authentication method for users without their own `auth_type`.
    pub auth_type: AuthType,
    /// A PgBouncer `userlist.txt` (`"user" "password-or-md5-or-SCRAM-secret"` lines) with
    /// more users; "" = none. A relative path is relative to the config file.
    pub auth_file: String,
    /// A `pg_hba.conf`-style file whose first matching line decides, per connection,
    /// whether and how a client authenticates (overriding `auth_type`); "" = none.
    pub auth_hba_file: String,
    /// The role that runs `auth_query` for users not in the config or `auth_file`;
    /// "" = no lookup. Its own password comes from the config or `auth_file`.
    pub auth_user: String,
    /// The query that returns (user name, password secret) for `$1`; a NULL secret or no
    /// row means the user cannot log in.
    pub auth_query: String,
    /// How long a secret fetched with `auth_query` is reused; 0 = fetch at every login.
    pub auth_query_cache_ttl: ConfigDuration,
    /// Consecutive failed logins from one client address after which its logins are
    /// slowed down; 0 = never slow down.
    pub auth_failure_threshold: u32,
    /// The delay of the first slowed-down login; it doubles with each further failure.
    pub auth_failure_delay: ConfigDuration,
    /// The longest delay.
    pub auth_failure_delay_max: ConfigDuration,
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
    /// Users allowed on the admin console (the virtual database `pgtide`, also reachable
    /// as `pgbouncer`). Each must be a configured user; it logs in with its own
    /// credential and auth method. Empty (the default) turns the console off.
    pub admin_users: Vec<String>,
    /// Whether sessions and pools count what they do (the `pgtide_` counters, gauges and
    /// histograms, which SHOW STATS reads too). Off only to measure what metrics cost:
    /// the counters then stay at zero. Needs a restart to change.
    pub collect_metrics: bool,

    // TLS. Certificate and key files are read at start and again on SIGHUP.
    /// TLS towards clients.
    pub client_tls_sslmode: ClientSslMode,
    /// PEM certificate chain pgtide presents to clients; empty = none.
    pub client_tls_cert_file: String,
    /// PEM private key of `client_tls_cert_file`; empty = none.
    pub client_tls_key_file: String,
    /// PEM CA certificates that client certificates must chain to; empty = client
    /// certificates are not asked for.
    pub client_tls_ca_file: String,
    /// TLS towards the servers; can be overridden per database.
    pub server_tls_sslmode: ServerSslMode,
    /// PEM CA certificates the servers' certificates must chain to (verify-ca,
    /// verify-full); empty = none.
    pub server_tls_ca_file: String,
    /// PEM certificate chain pgtide presents to servers that ask for one; empty = none.
    pub server_tls_cert_file: String,
    /// PEM private key of `server_tls_cert_file`; empty = none.
    pub server_tls_key_file: String,

    // Routing and health checks; each can be overridden per database.
    /// How reads pick a replica.
    pub load_balance: LoadBalance,
    /// A replica whose replay position is more than this many bytes of WAL behind the
    /// primary gets no reads; 0 = no limit.
    pub max_replica_lag_bytes: u64,
    /// A replica whose last replayed transaction is older than this gets no reads
    /// (a replica that replayed everything the primary has counts as 0); 0 = no limit.
    pub max_replica_lag: ConfigDuration,
    /// What a read does when no replica is usable.
    pub replica_fallback: ReplicaFallback,
    /// `lsn`: a client's reads after its write go only where that write is visible.
    pub read_your_writes: ReadYourWrites,
    /// Whether the primary also serves reads (with the replicas). Default false: the
    /// primary reads only when no replica is eligible (or read-your-writes needs it).
    pub primary_reads: bool,
    /// Whether `/* pgtide: primary */` and `/* pgtide: replica */` comments are obeyed.
    pub routing_hints: bool,
    /// Functions that write, besides the built-in ones (`nextval`, `setval`, ...): a
    /// statement calling one goes to the primary. Names, optionally schema-qualified.
    pub write_functions: Vec<String>,
    /// A write that finds no primary waits this long for one to appear.
    pub primary_wait_timeout: ConfigDuration,
    /// Time between two health checks of a host that is not down.
    pub health_check_interval: ConfigDuration,
    /// One health check (connect, log in, query) must finish within this.
    pub health_check_timeout: ConfigDuration,
    /// Consecutive failed checks after which a host is marked down.
    pub health_check_failures: u32,
    /// Consecutive successful checks after which a down host is marked up.
    pub health_check_successes: u32,
    /// Longest time between two checks of a down host (the interval doubles up to this).
    pub health_check_backoff_max: ConfigDuration,
    /// The user the health monitors log in as ("" = the automatic choice: see
    /// [`Config::health_check_login`]); its password comes from `[users]` or `auth_file`.
    pub health_check_user: String,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            pool_mode: PoolMode::Transaction,
            session_state: SessionState::Pin,
            pool_size: 20,
            min_pool_size: 0,
            max_db_connections: 0,
            max_client_conn: 10_000,
            worker_threads: 1,
            query_wait_timeout: ConfigDuration::secs(120),
            server_connect_timeout: ConfigDuration::secs(5),
            server_connect_retries: 3,
            server_connect_backoff: ConfigDuration(Duration::from_millis(100)),
            server_idle_timeout: ConfigDuration::secs(600),
            server_lifetime: ConfigDuration::secs(3600),
            idle_transaction_timeout: ConfigDuration::secs(0),
            query_timeout: ConfigDuration::secs(0),
            transaction_timeout: ConfigDuration::secs(0),
            client_idle_timeout: ConfigDuration::secs(0),
            client_login_timeout: ConfigDuration::secs(60),
            shutdown_timeout: ConfigDuration::secs(30),
            shutdown_delay: ConfigDuration::secs(0),
            so_reuseport: false,
            peer_id: 0,
            peers: BTreeMap::new(),
            peer_listen: String::new(),
            server_reset_query: "DISCARD ALL".to_string(),
            auth_type: AuthType::ScramSha256,
            auth_file: String::new(),
            auth_hba_file: String::new(),
            auth_user: String::new(),
            auth_query: DEFAULT_AUTH_QUERY.to_string(),
            auth_query_cache_ttl: ConfigDuration::secs(30),
            auth_failure_threshold: 5,
            auth_failure_delay: ConfigDuration::secs(1),
            auth_failure_delay_max: ConfigDuration::secs(30),
            track_extra_params: Vec::new(),
            max_message_size: 64 * 1024 * 1024,
            log_connections: false,
            max_prepared_statements: 200,
            prepared_statement_cache_size: 10_000,
            prepared_statement_cache_bytes: 64 * 1024 * 1024,
            metrics_listen: "127.0.0.1:9930".to_string(),
            admin_users: Vec::new(),
            collect_metrics: true,
            client_tls_sslmode: ClientSslMode::Disable,
            client_tls_cert_file: String::new(),
            client_tls_key_file: String::new(),
            client_tls_ca_file: String::new(),
            server_tls_sslmode: ServerSslMode::Prefer,
            server_tls_ca_file: String::new(),
            server_tls_cert_file: String::new(),
            server_tls_key_file: String::new(),
            load_balance: LoadBalance::LeastOutstanding,
            max_replica_lag_bytes: 16 * 1024 * 1024,
            max_replica_lag: ConfigDuration::secs(10),
            replica_fallback: ReplicaFallback::Primary,
            read_your_writes: ReadYourWrites::Off,
            primary_reads: false,
            routing_hints: true,
            write_functions: Vec::new(),
            primary_wait_timeout: ConfigDuration::secs(10),
            health_check_interval: ConfigDuration::secs(1),
            health_check_timeout: ConfigDuration::secs(2),
            health_check_failures: 3,
            health_check_successes: 2,
            health_check_backoff_max: ConfigDuration::secs(30),
            health_check_user: String::new(),
        }
    }
}

/// One server of a database, in `hosts = [...]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Host name or IP address. Required.
    pub host: String,
    /// Port; default 5432.
    #[serde(default = "default_port")]
    pub port: u16,
    /// `primary`, `replica` or `auto` (default).
    #[serde(default = "default_role")]
    pub role: HostRole,
    /// Share of the reads this host gets as a replica, relative to the others; default 1.
    /// At least 1 for a replica; 0 on an `auto` or `primary` host means no replica reads.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_port() -> u16 {
    5432
}
fn default_role() -> HostRole {
    HostRole::Auto
}
fn default_weight() -> u32 {
    1
}

/// One logical database clients can connect to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    /// Server host (name or address), when `hosts` is not given: one host, the primary.
    pub host: String,
    /// Server port, when `hosts` is not given.
    pub port: u16,
    /// The servers of this database, instead of `host`/`port` (giving both is an error).
    pub hosts: Option<Vec<HostConfig>>,
    /// Where this database's transactions go; a user's `route` wins.
    pub route: Option<Route>,
    /// Database name on the server; defaults to the name clients use.
    pub dbname: Option<String>,
    /// Overrides `[pgtide].pool_mode` for this database.
    pub pool_mode: Option<PoolMode>,
    /// Overrides `[pgtide].session_state` for this database.
    pub session_state: Option<SessionState>,
    /// Overrides `[pgtide].pool_size` for this database.
    pub pool_size: Option<u32>,
    /// Overrides `[pgtide].min_pool_size` for this database.
    pub min_pool_size: Option<u32>,
    /// Overrides `[pgtide].max_db_connections` for this database.
    pub max_db_connections: Option<u32>,
    /// Overrides `[pgtide].auth_user` for this database ("" turns the lookup off).
    pub auth_user: Option<String>,
    /// Overrides `[pgtide].auth_query` for this database.
    pub auth_query: Option<String>,
    /// Overrides `[pgtide].load_balance`.
    pub load_balance: Option<LoadBalance>,
    /// Overrides `[pgtide].max_replica_lag_bytes`.
    pub max_replica_lag_bytes: Option<u64>,
    /// Overrides `[pgtide].max_replica_lag`.
    pub max_replica_lag: Option<ConfigDuration>,
    /// Overrides `[pgtide].replica_fallback`.
    pub replica_fallback: Option<ReplicaFallback>,
    /// Overrides `[pgtide].read_your_writes`.
    pub read_your_writes: Option<ReadYourWrites>,
    /// Overrides `[pgtide].primary_reads`.
    pub primary_reads: Option<bool>,
    /// Overrides `[pgtide].routing_hints`.
    pub routing_hints: Option<bool>,
    /// Added to `[pgtide].write_functions` for this database.
    pub write_functions: Option<Vec<String>>,
    /// Overrides `[pgtide].primary_wait_timeout`.
    pub primary_wait_timeout: Option<ConfigDuration>,
    /// Overrides `[pgtide].health_check_interval`.
    pub health_check_interval: Option<ConfigDuration>,
    /// Overrides `[pgtide].health_check_timeout`.
    pub health_check_timeout: Option<ConfigDuration>,
    /// Overrides `[pgtide].health_check_failures`.
    pub health_check_failures: Option<u32>,
    /// Overrides `[pgtide].health_check_successes`.
    pub health_check_successes: Option<u32>,
    /// Overrides `[pgtide].health_check_backoff_max`.
    pub health_check_backoff_max: Option<ConfigDuration>,
    /// Overrides `[pgtide].health_check_user`.
    pub health_check_user: Option<String>,
    /// Overrides `[pgtide].query_timeout` for this database.
    pub query_timeout: Option<ConfigDuration>,
    /// Overrides `[pgtide].transaction_timeout` for this database.
    pub transaction_timeout: Option<ConfigDuration>,
    /// Overrides `[pgtide].server_tls_sslmode`.
    pub server_tls_sslmode: Option<ServerSslMode>,
    /// Overrides `[pgtide].server_tls_ca_file`.
    pub server_tls_ca_file: Option<String>,
    /// Overrides `[pgtide].server_tls_cert_file`.
    pub server_tls_cert_file: Option<String>,
    /// Overrides `[pgtide].server_tls_key_file`.
    pub server_tls_key_file: Option<String>,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            host: "127.0.0.1".to_string(),
            port: 5432,
            dbname: None,
            pool_mode: None,
            session_state: None,
            pool_size: None,
            min_pool_size: None,
            max_db_connections: None,
            auth_user: None,
            auth_query: None,
            hosts: None,
            route: None,
            load_balance: None,
            max_replica_lag_bytes: None,
            max_replica_lag: None,
            replica_fallback: None,
            read_your_writes: None,
            primary_reads: None,
            routing_hints: None,
            write_functions: None,
            primary_wait_timeout: None,
            health_check_interval: None,
            health_check_timeout: None,
            health_check_failures: None,
            health_check_successes: None,
            health_check_backoff_max: None,
            health_check_user: None,
            query_timeout: None,
            transaction_timeout: None,
            server_tls_sslmode: None,
            server_tls_ca_file: None,
            server_tls_cert_file: None,
            server_tls_key_file: None,
        }
    }
}

impl Database {
    /// The servers of this database: `hosts`, or else `host`/`port` as the one primary.
    pub fn host_list(&self) -> Vec<HostConfig> {
        match &self.hosts {
            Some(hosts) => hosts.clone(),
            None => vec![HostConfig {
                host: self.host.clone(),
                port: self.port,
                role: HostRole::Primary,
                weight: 1,
            }],
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
    /// Overrides `session_state` for this user (wins over the database's).
    pub session_state: Option<SessionState>,
    /// Overrides the pool size for this user (wins over the database's).
    pub pool_size: Option<u32>,
    /// Where this user's transactions go (wins over the database's `route`).
    pub route: Option<Route>,
    /// Overrides `query_timeout` for this user (wins over the database's).
    pub query_timeout: Option<ConfigDuration>,
    /// Overrides `transaction_timeout` for this user (wins over the database's).
    pub transaction_timeout: Option<ConfigDuration>,
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub pgtide: General,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
}

/// The resolved server-side TLS settings of one database (empty path = not given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsSettings {
    pub sslmode: ServerSslMode,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

/// The resolved settings of one (database, user) pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    pub pool_mode: PoolMode,
    pub session_state: SessionState,
    pub pool_size: u32,
    pub min_pool_size: u32,
    pub max_db_connections: u32,
}

/// The resolved routing settings of one (database, user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingSettings {
    pub route: Route,
    pub load_balance: LoadBalance,
    /// 0 = no limit.
    pub max_replica_lag_bytes: u64,
    /// Zero = no limit.
    pub max_replica_lag: Duration,
    pub replica_fallback: ReplicaFallback,
    pub read_your_writes: ReadYourWrites,
    pub primary_reads: bool,
    pub routing_hints: bool,
    /// The global list followed by the database's own names.
    pub write_functions: Vec<String>,
    pub primary_wait_timeout: Duration,
}

/// The resolved health-check settings of one database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that mark a host down (at least 1).
    pub failures: u32,
    /// Consecutive successes that mark a down host up (at least 1).
    pub successes: u32,
    pub backoff_max: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        let g = General::default();
        HealthSettings {
            interval: g.health_check_interval.0,
            timeout: g.health_check_timeout.0,
            failures: g.health_check_failures,
            successes: g.health_check_successes,
            backoff_max: g.health_check_backoff_max.0,
        }
    }
}

/// Everything about one database's servers: its hosts, how (database, user) routes, and
/// how the hosts are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub hosts: Vec<HostConfig>,
    pub routing: RoutingSettings,
    pub health: HealthSettings,
}

impl Config {
    /// Parses and validates a TOML document; every problem is reported.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        validate::parse_and_validate(text)
    }

    /// Reads, parses and validates a file. Relative `auth_file` and `auth_hba_file`
    /// paths are made relative to the file's directory.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read {}: {e}", path.display())))?;
        let mut config = Self::from_toml_str(&text)?;
        let dir = path.parent().unwrap_or(std::path::Path::new(""));
        for file in [
            &mut config.pgtide.auth_file,
            &mut config.pgtide.auth_hba_file,
        ] {
            if !file.is_empty() && std::path::Path::new(file.as_str()).is_relative() {
                *file = dir.join(file.as_str()).to_string_lossy().into_owned();
            }
        }
        Ok(config)
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

    /// Zero-config mode with replicas: the upstream URL's database, served by the
    /// upstream host and each replica URL's host, every one with `role = "auto"` (roles
    /// come from `pg_is_in_recovery()`).
    pub fn from_upstream_with_replicas(
        url: &str,
        replicas: &[String],
    ) -> Result<Config, ConfigError> {
        let mut config = validate::from_upstream_url(url)?;
        if replicas.is_empty() {
            return Ok(config);
        }
        let Some(db) = config.databases.values_mut().next() else {
            return Ok(config);
        };
        let auto = |host: String, port: u16| HostConfig {
            host,
            port,
            role: HostRole::Auto,
            weight: 1,
        };
        let mut hosts = vec![auto(db.host.clone(), db.port)];
        for r in replicas {
            let rc = validate::from_upstream_url(r).map_err(|e| ConfigError {
                problems: e
                    .problems
                    .into_iter()
                    .map(|p| Problem {
                        key: "replica".into(),
                        message: p.message,
                    })
                    .collect(),
            })?;
            if let Some(rd) = rc.databases.values().next() {
                hosts.push(auto(rd.host.clone(), rd.port));
            }
        }
        db.hosts = Some(hosts);
        db.host = Database::default().host;
        db.port = Database::default().port;
        config.validate()?;
        Ok(config)
    }

    /// `query_timeout` for `user` of `database` (the user's, else the database's, else
    /// `[pgtide]`'s); `None` when off.
    pub fn query_timeout(&self, database: &str, user: &str) -> Option<Duration> {
        self.users
            .get(user)
            .and_then(|u| u.query_timeout)
            .or_else(|| self.databases.get(database).and_then(|d| d.query_timeout))
            .unwrap_or(self.pgtide.query_timeout)
            .enabled()
    }

    /// `transaction_timeout` for `user` of `database` (the user's, else the database's,
    /// else `[pgtide]`'s); `None` when off.
    pub fn transaction_timeout(&self, database: &str, user: &str) -> Option<Duration> {
        self.users
            .get(user)
            .and_then(|u| u.transaction_timeout)
            .or_else(|| {
                self.databases
                    .get(database)
                    .and_then(|d| d.transaction_timeout)
            })
            .unwrap_or(self.pgtide.transaction_timeout)
            .enabled()
    }

    /// The user (and its configured password, if any) the health monitors of `database`
    /// log in as: the database's `health_check_user`, else `[pgtide]`'s; else the first
    /// user, in name order, of `[users]` and then of `file_users` (the `auth_file`) that
    /// is not an admin-console user and whose password `can_log_in` to a server (a plain
    /// password or an md5 hash, not a SCRAM verifier); else the first such user at all;
    /// else the first user. `None` when there is no user.
    pub fn health_check_login<'a>(
        &'a self,
        database: &str,
        file_users: &'a [(String, String)],
        can_log_in: impl Fn(&str) -> bool,
    ) -> Option<(&'a str, Option<&'a str>)> {
        let password = |u: &str| {
            self.users
                .get(u)
                .and_then(|c| c.password.as_deref())
                .or_else(|| {
                    file_users
                        .iter()
                        .find(|(n, _)| n == u)
                        .map(|(_, p)| p.as_str())
                })
        };
        let named = self
            .databases
            .get(database)
            .and_then(|d| d.health_check_user.as_deref())
            .unwrap_or(&self.pgtide.health_check_user);
        if !named.is_empty() {
            let user = self
                .users
                .get_key_value(named)
                .map(|(k, _)| k.as_str())
                .or_else(|| {
                    file_users
                        .iter()
                        .find(|(n, _)| n == named)
                        .map(|(n, _)| n.as_str())
                })
                .unwrap_or(named);
            return Some((user, password(user)));
        }
        let all: Vec<(&str, Option<&str>)> = self
            .users
            .iter()
            .map(|(u, c)| (u.as_str(), c.password.as_deref()))
            .chain(
                file_users
                    .iter()
                    .map(|(u, p)| (u.as_str(), Some(p.as_str()))),
            )
            .collect();
        let admin = |u: &str| self.pgtide.admin_users.iter().any(|a| a == u);
        all.iter()
            .find(|(u, p)| !admin(u) && p.is_some_and(&can_log_in))
            .or_else(|| all.iter().find(|(u, _)| !admin(u)))
            .or_else(|| all.first())
            .copied()
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
            session_state: u
                .and_then(|u| u.session_state)
                .or(d.and_then(|d| d.session_state))
                .unwrap_or(g.session_state),
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

    /// The hosts, routing and health-check settings of `database` for `user`: a user's
    /// `route` wins over the database's; the database's other settings win over
    /// `[pgtide]`; its `write_functions` add to the global ones. `None` when the database
    /// is not configured.
    pub fn cluster_settings(&self, database: &str, user: &str) -> Option<ClusterSettings> {
        let g = &self.pgtide;
        let d = self.databases.get(database)?;
        let route = self
            .users
            .get(user)
            .and_then(|u| u.route)
            .or(d.route)
            .unwrap_or(Route::Auto);
        let mut write_functions = g.write_functions.clone();
        for f in d.write_functions.iter().flatten() {
            if !write_functions.contains(f) {
                write_functions.push(f.clone());
            }
        }
        Some(ClusterSettings {
            hosts: d.host_list(),
            routing: RoutingSettings {
                route,
                load_balance: d.load_balance.unwrap_or(g.load_balance),
                max_replica_lag_bytes: d.max_replica_lag_bytes.unwrap_or(g.max_replica_lag_bytes),
                max_replica_lag: d.max_replica_lag.unwrap_or(g.max_replica_lag).0,
                replica_fallback: d.replica_fallback.unwrap_or(g.replica_fallback),
                read_your_writes: d.read_your_writes.unwrap_or(g.read_your_writes),
                primary_reads: d.primary_reads.unwrap_or(g.primary_reads),
                routing_hints: d.routing_hints.unwrap_or(g.routing_hints),
                write_functions,
                primary_wait_timeout: d.primary_wait_timeout.unwrap_or(g.primary_wait_timeout).0,
            },
            health: health_settings(g, d),
        })
    }

    /// The `auth_user` and `auth_query` of `database` (its overrides applied), or `None`
    /// when no lookup is configured for it.
    pub fn auth_query(&self, database: &str) -> Option<(&str, &str)> {
        let d = self.databases.get(database);
        let user = d
            .and_then(|d| d.auth_user.as_deref())
            .unwrap_or(&self.pgtide.auth_user);
        let query = d
            .and_then(|d| d.auth_query.as_deref())
            .unwrap_or(&self.pgtide.auth_query);
        (!user.is_empty()).then_some((user, query))
    }

    /// Whether passwords may come from somewhere else than `[users]`: an `auth_file` or
    /// an `auth_user` (global or for some database).
    pub fn has_other_credential_sources(&self) -> bool {
        !self.pgtide.auth_file.is_empty()
            || !self.pgtide.auth_user.is_empty()
            || self
                .databases
                .values()
                .any(|d| d.auth_user.as_deref().is_some_and(|u| !u.is_empty()))
    }

    /// The TLS settings pgtide uses towards the servers of `database` (its overrides
    /// applied); the global ones for an unknown database.
    pub fn server_tls(&self, database: &str) -> ServerTlsSettings {
        let g = &self.pgtide;
        let d = self.databases.get(database);
        let file = |own: Option<&Option<String>>, global: &String| {
            own.and_then(|o| o.clone())
                .unwrap_or_else(|| global.clone())
        };
        ServerTlsSettings {
            sslmode: d
                .and_then(|d| d.server_tls_sslmode)
                .unwrap_or(g.server_tls_sslmode),
            ca_file: file(d.map(|d| &d.server_tls_ca_file), &g.server_tls_ca_file),
            cert_file: file(d.map(|d| &d.server_tls_cert_file), &g.server_tls_cert_file),
            key_file: file(d.map(|d| &d.server_tls_key_file), &g.server_tls_key_file),
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

/// The health-check settings of database `d`, its overrides applied.
fn health_settings(g: &General, d: &Database) -> HealthSettings {
    HealthSettings {
        interval: d.health_check_interval.unwrap_or(g.health_check_interval).0,
        timeout: d.health_check_timeout.unwrap_or(g.health_check_timeout).0,
        failures: d.health_check_failures.unwrap_or(g.health_check_failures),
        successes: d.health_check_successes.unwrap_or(g.health_check_successes),
        backoff_max: d
            .health_check_backoff_max
            .unwrap_or(g.health_check_backoff_max)
            .0,
    }
}
