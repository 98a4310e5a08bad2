//! One server connection: connect and log in, the run-time parameters it has, internal
//! queries pgtide runs on it (parameter sync, reset, rollback), and its identity for
//! CancelRequest.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{self, SaltedPasswordCache, ServerSecret};
use crate::config::ServerSslMode;
use crate::protocol::{backend, frontend, status, tag, Scanner};
use crate::stream::Stream;
use crate::tls::ServerTls;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// What to log in with; a client's login may update it (SCRAM pass-through).
    pub secret: ServerSecret,
    /// `server_tls_*` of the database.
    pub tls: Arc<ServerTls>,
}

impl ServerTarget {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What a CancelRequest for this server connection needs.
#[derive(Clone, Debug)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// The host name the connection was made to (for TLS certificate checks).
    pub host: Arc<str>,
    /// A CancelRequest goes over TLS when the connection would.
    pub tls: Arc<ServerTls>,
}

impl PartialEq for CancelTarget {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.pid, self.secret) == (other.addr, other.pid, other.secret)
    }
}

/// Why a server connection could not be used.
#[derive(Debug)]
pub enum ServerError {
    Io(io::Error),
    Timeout,
    /// The server answered with an ErrorResponse.
    Rejected {
        code: String,
        message: String,
    },
    /// The server sent something pgtide did not expect.
    Protocol(String),
    Auth(auth::AuthError),
    /// TLS could not be set up as `server_tls_sslmode` asks.
    Tls(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Io(e) => write!(f, "{e}"),
            ServerError::Timeout => f.write_str("timed out"),
            ServerError::Rejected { code, message } => write!(f, "{message} (SQLSTATE {code})"),
            ServerError::Protocol(m) => write!(f, "protocol error: {m}"),
            ServerError::Auth(e) => write!(f, "{e}"),
            ServerError::Tls(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    /// Worth another attempt after a pause: the network failed or timed out, or the
    /// server is starting, shutting down or out of connection slots.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Io(_) | ServerError::Timeout => true,
            ServerError::Rejected { code, .. } => crate::protocol::sqlstate::is_transient(code),
            _ => false,
        }
    }
}

impl From<io::Error> for ServerError {
    fn from(e: io::Error) -> Self {
        ServerError::Io(e)
    }
}

/// The outcome of an internal query.
#[derive(Debug, Default)]
pub struct InternalResult {
    /// Every DataRow, each field as text (`None` for NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// The first ErrorResponse, if any: (SQLSTATE, message).
    pub error: Option<(String, String)>,
}

/// An open, logged-in server connection.
pub struct ServerConn {
    pub stream: Stream,
    pub cancel: CancelTarget,
    /// Last known value of each run-time parameter, keyed by lower-case name: those the
    /// server reported with ParameterStatus and those pgtide set or read itself.
    pub params: HashMap<String, String>,
    /// The [`ClientParams::fingerprint`](crate::params::ClientParams::fingerprint)
    /// of settings `params` was found to match; `None` after any change to `params`.
    pub params_match: Option<u64>,
    pub created: Instant,
    pub last_used: Instant,
    /// Named statements pgtide prepared on this connection (transaction mode).
    pub statements: crate::prepared::ServerStatements,
    max_message: u32,
    /// This connection's entry in the registry `SHOW SERVERS` reads (set by the pool).
    pub entry: Option<crate::registry::Registration<crate::registry::ServerEntry>>,
}

/// Parameters reported at login, in the order the server sent them, with their
/// original spelling: what a client of this pool sees at its own login.
pub type LoginParams = Arc<Vec<(String, String)>>;

impl ServerConn {
    /// Connects, logs in and reads up to the first ReadyForQuery.
    pub async fn connect(
        target: &ServerTarget,
        salted: &SaltedPasswordCache,
        max_message: u32,
    ) -> Result<(ServerConn, LoginParams), ServerError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        let addr = tcp.peer_addr()?;
        let mut stream = start_tls(tcp, &target.host, &target.tls).await?;
        let mut out = BytesMut::with_capacity(128);
        frontend::startup_message(
            &mut out,
            [
                ("user", target.user.as_str()),
                ("database", target.dbname.as_str()),
            ],
        );
        stream.send(&out).await?;
        let secret = target.secret.current();
        auth::authenticate_server(&mut stream, &target.user, secret.as_deref(), salted)
            .await
            .map_err(|e| match e {
                auth::AuthError::Server { code, message } => {
                    ServerError::Rejected { code, message }
                }
                auth::AuthError::Io(e) => ServerError::Io(e),
                other => ServerError::Auth(other),
            })?;
        let mut conn = ServerConn {
            stream,
            cancel: CancelTarget {
                addr,
                pid: 0,
                secret: 0,
                host: target.host.as_str().into(),
                tls: target.tls.clone(),
            },
            params: HashMap::new(),
            params_match: None,
            created: Instant::now(),
            last_used: Instant::now(),
            statements: Default::default(),
            max_message,
            entry: None,
        };
        let mut login = Vec::new();
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            let (t, body) = conn.read_message(&mut buf).await?;
            match t {
                tag::PARAMETER_STATUS => {
                    if let Some((k, v)) = backend::parse_parameter_status(&body) {
                        conn.params.insert(k.to_ascii_lowercase(), v.to_string());
                        login.push((k.to_string(), v.to_string()));
                    }
                }
                tag::BACKEND_KEY_DATA if body.len() >= 8 => {
                    conn.cancel.pid = crate::protocol::be_i32(&body);
                    conn.cancel.secret = crate::protocol::be_i32(&body[4..]);
                }
                tag::READY_FOR_QUERY => return Ok((conn, Arc::new(login))),
                tag::ERROR_RESPONSE => {
                    let f = backend::parse_error_fields(&body);
                    return Err(ServerError::Rejected {
                        code: f.code.to_string(),
                        message: f.message.to_string(),
                    });
                }
                tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(ServerError::Protocol(format!(
                        "unexpected message '{}' during login",
                        other as char
                    )))
                }
            }
        }
    }

    /// Reads one whole message into `buf` (which may hold leftovers) and returns its tag
    /// and body.
    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<(u8, BytesMut), ServerError> {
        let mut scanner = Scanner::new(self.max_message);
        loop {
            let mut pos = 0;
            if let Some(f) = scanner
                .next(buf, &mut pos, |_| true)
                .map_err(|e| ServerError::Protocol(e.to_string()))?
            {
                let t = f.tag;
                let mut msg = buf.split_to(pos);
                let body = msg.split_off(5);
                return Ok((t, body));
            }
            buf.reserve(4096);
            if self.stream.read_buf(buf).await? == 0 {
                return Err(ServerError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Runs `sql` as a simple query that pgtide owns (nothing reaches a client), reads
    /// up to ReadyForQuery, keeps `params` current from ParameterStatus, and returns the
    /// rows and the first error. Fails if the connection ends up anywhere but idle.
    pub async fn run_internal(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<InternalResult, ServerError> {
        match tokio::time::timeout(timeout, self.run_internal_inner(sql)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout),
        }
    }

    /// Like [`Self::run_internal`], with `params` bound to `$1`, `$2`, ... through the
    /// extended protocol (unnamed statement and portal), as text.
    pub async fn run_internal_params(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        timeout: Duration,
    ) -> Result<InternalResult, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 64);
        frontend::query_with_params(&mut out, sql, params);
        match tokio::time::timeout(timeout, self.run_internal_message(&out, sql)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout),
        }
    }

    async fn run_internal_inner(&mut self, sql: &str) -> Result<InternalResult, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(&mut out, sql);
        self.run_internal_message(&out, sql).await
    }

    /// Sends `out` (a query ending in Sync or a simple Query) and reads up to
    /// ReadyForQuery.
    async fn run_internal_message(
        &mut self,
        out: &[u8],
        sql: &str,
    ) -> Result<InternalResult, ServerError> {
        self.stream.send(out).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut result = InternalResult::default();
        loop {
            let (t, body) = self.read_message(&mut buf).await?;
            match t {
                tag::DATA_ROW => {
                    let row = backend::parse_data_row(&body)
                        .ok_or_else(|| ServerError::Protocol("malformed DataRow".into()))?;
                    result.rows.push(
                        row.into_iter()
                            .map(|f| f.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    );
                }
                tag::PARAMETER_STATUS => {
                    if let Some((k, v)) = backend::parse_parameter_status(&body) {
                        self.params.insert(k.to_ascii_lowercase(), v.to_string());
                        self.params_match = None;
                    }
                }
                tag::ERROR_RESPONSE => {
                    let f = backend::parse_error_fields(&body);
                    if f.is_fatal() {
                        return Err(ServerError::Rejected {
                            code: f.code.to_string(),
                            message: f.message.to_string(),
                        });
                    }
                    if result.error.is_none() {
                        result.error = Some((f.code.to_string(), f.message.to_string()));
                    }
                }
                tag::READY_FOR_QUERY => {
                    if body.first() != Some(&status::IDLE) {
                        return Err(ServerError::Protocol(format!(
                            "internal query {sql:?} left the connection in a transaction"
                        )));
                    }
                    if !buf.is_empty() {
                        return Err(ServerError::Protocol(
                            "unexpected bytes after ReadyForQuery".into(),
                        ));
                    }
                    return Ok(result);
                }
                tag::COPY_IN_RESPONSE | tag::COPY_OUT_RESPONSE | tag::COPY_BOTH_RESPONSE => {
                    return Err(ServerError::Protocol("internal query started COPY".into()));
                }
                _ => {}
            }
        }
    }

    /// True when the idle connection has no unexpected input waiting and is not closed.
    /// A connection that fails this is closed rather than used: the server may have
    /// terminated it (FATAL 57P01) or sent something asynchronous.
    pub fn is_quiet(&mut self) -> bool {
        self.stream.is_quiet()
    }

    /// Says goodbye politely and waits (up to 1 s) until the server has closed its end:
    /// a backend closes its socket only after it has left `pg_stat_activity`, so once
    /// this returns PostgreSQL no longer counts the connection. Errors are ignored (the
    /// connection is going away anyway).
    pub async fn terminate(mut self) {
        let mut out = BytesMut::with_capacity(5);
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.stream.send(&out).await?;
            let mut sink = [0u8; 256];
            while tokio::io::AsyncReadExt::read(&mut self.stream, &mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

/// Sends a CancelRequest for `target` and waits until the server has taken it (the
/// postmaster closes the socket after signalling the backend).
pub async fn send_cancel(target: CancelTarget, timeout: Duration) -> io::Result<()> {
    let work = async {
        let tcp = TcpStream::connect(target.addr).await?;
        let mut s = start_tls(tcp, &target.host, &target.tls)
            .await
            .map_err(|e| match e {
                ServerError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
        let mut out = BytesMut::with_capacity(16);
        frontend::cancel_request(&mut out, target.pid, target.secret);
        s.send(&out).await?;
        let mut sink = [0u8; 64];
        loop {
            match s.read(&mut sink).await {
                Ok(n) if n > 0 => {}
                // The server closes the connection once it has taken the request (over
                // TLS, possibly without close_notify).
                Ok(_) => return Ok(()),
                Err(e) if s.is_tls() && e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "cancel request timed out",
        )),
    }
}

/// Asks the server for TLS as `server_tls_sslmode` says (SSLRequest, then the handshake
/// on 'S'; plain on 'N' only under `prefer`).
async fn start_tls(mut tcp: TcpStream, host: &str, tls: &ServerTls) -> Result<Stream, ServerError> {
    let mode = tls.sslmode();
    let Some(config) = tls.current() else {
        return Ok(Stream::Plain(tcp));
    };
    let mut out = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(host).map_err(ServerError::Tls)?;
            let connector = tokio_rustls::TlsConnector::from(config);
            match connector.connect(name, tcp).await {
                Ok(s) => Ok(Stream::tls(s)),
                Err(e) => Err(ServerError::Tls(format!(
                    "TLS handshake with the server failed: {e} (server_tls_sslmode = \"{mode}\")"
                ))),
            }
        }
        b'N' if mode == ServerSslMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(ServerError::Tls(format!(
            "the server does not accept TLS connections, and server_tls_sslmode is \"{mode}\""
        ))),
        other => Err(ServerError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}
