//! The start of a client connection: the transport (SSLRequest answered 'S' and a TLS
//! handshake when client TLS is on, else 'N'; a direct TLS handshake as PostgreSQL 17
//! clients may start with; GSSENCRequest answered 'N'), CancelRequest, StartupMessage,
//! authentication at the pooler (including `cert`: the client certificate's CN must be
//! the user), and the login reply (AuthenticationOk, ParameterStatus, an invented
//! BackendKeyData, ReadyForQuery).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::Peer;
use crate::cancel::CancelSlot;
use crate::config::{ClientSslMode, PoolMode, SessionState};
use crate::params::ClientParams;
use crate::pool::{Pool, PoolSet};
use crate::protocol::backend;
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{sqlstate, status, tag};
use crate::registry::{ClientEntry, Registration};
use crate::shared::Shared;
use crate::stream::{send_fatal, Stream};

use super::authn::NoSession;

/// A logged-in client, ready for its first query.
pub(super) struct LoggedIn {
    /// The pools of the (database, user) the client logged in to; their names are the
    /// client's (not copied per client). Replaced when a reload or KILL retires them.
    pub pools: Arc<PoolSet>,
    pub mode: PoolMode,
    /// Transaction mode: what session state the client creates gets.
    pub session_state: SessionState,
    pub params: ClientParams,
    pub key_pid: i32,
    pub cancel: Arc<CancelSlot>,
    /// This client in the registry `SHOW CLIENTS` reads; `KILL` reaches it through here.
    pub entry: Registration<ClientEntry>,
}

impl LoggedIn {
    pub fn database(&self) -> &str {
        &self.pools.database
    }

    pub fn user(&self) -> &str {
        &self.pools.user
    }

    /// The pool of this client's (database, user) on the current primary (which may have
    /// changed since login). No lock and no lookup by name, unless a reload or KILL
    /// retired the client's set.
    pub fn primary_pool(&mut self, shared: &Shared) -> Arc<Pool> {
        if self.pools.is_retired() {
            if let Some(set) = shared.pool_set(self.database(), self.user()) {
                self.pools = set;
            }
        }
        let host = if shared.is_routed(self.database()) {
            shared.primary_host(self.database())
        } else {
            0
        };
        self.pools
            .host(host)
            .unwrap_or_else(|| self.pools.first())
            .clone()
    }
}

/// Negotiates the transport (plain or TLS), then reads the first packet(s) and logs the
/// client in, all within `client_login_timeout`. Returns the stream the session goes on
/// with.
pub(super) async fn login(
    mut tcp: TcpStream,
    shared: &Arc<Shared>,
    over_limit: bool,
) -> Result<(Stream, LoggedIn), NoSession> {
    let timeout = shared.config().pgtide.client_login_timeout.0;
    let deadline = tokio::time::Instant::now() + timeout;
    let late = "client did not complete login within client_login_timeout";
    let Ok(addr) = tcp.peer_addr() else {
        return Err(NoSession::Done);
    };
    let opening = match tokio::time::timeout_at(deadline, opening(&mut tcp, shared)).await {
        Ok(r) => r?,
        Err(_) => {
            send_fatal(&mut tcp, sqlstate::PROTOCOL_VIOLATION, late, None).await;
            return Err(NoSession::Refused);
        }
    };
    let (mut stream, first) = match opening {
        Opening::Plain(first) => (Stream::Plain(tcp), Some(first)),
        Opening::Tls { direct } => {
            match tokio::time::timeout_at(deadline, accept_tls(tcp, shared, direct)).await {
                Ok(Some(s)) => (s, None),
                // The handshake failed or took too long: nothing can be said in clear.
                _ => return Err(NoSession::Refused),
            }
        }
    };
    let peer = Peer {
        addr,
        tls: stream.is_tls(),
        cert_common_name: stream
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| crate::tls::common_name(leaf)),
    };
    let work = login_inner(&mut stream, first, &peer, shared, over_limit);
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Err(NoSession::Admin {
            user,
            database,
            application_name,
            ..
        })) => Err(NoSession::Admin {
            user,
            database,
            application_name,
            stream: Some(stream),
        }),
        Ok(r) => r.map(|l| (stream, l)),
        Err(_) => {
            send_fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, late, None).await;
            Err(NoSession::Refused)
        }
    }
}

/// How a connection starts.
enum Opening {
    /// In clear, with this first packet (a StartupMessage or CancelRequest).
    Plain(StartupPacket),
    /// With a TLS handshake: after SSLRequest and 'S', or (`direct`) at once.
    Tls { direct: bool },
}

/// The TLS byte a handshake record starts with; a StartupMessage starts with its length,
/// whose first byte is 0.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Reads up to the first packet that is not an encryption request, answering
/// SSLRequest with 'S' (TLS configured) or 'N', and GSSENCRequest with 'N'.
async fn opening(tcp: &mut TcpStream, shared: &Shared) -> Result<Opening, NoSession> {
    let tls_on = shared.tls().acceptor().is_some();
    if tls_on {
        // PostgreSQL 17 direct TLS: the client starts with a ClientHello.
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => return Ok(Opening::Tls { direct: true }),
            Ok(1) => {}
            _ => return Err(NoSession::Done),
        }
    }
    // One SSLRequest and one GSSENCRequest each, in either order, as PostgreSQL allows
    // (libpq with a Kerberos ticket sends GSSENCRequest, then SSLRequest).
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        match read_first_packet(tcp).await? {
            p @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                let ssl = matches!(p, StartupPacket::SslRequest);
                let done = if ssl { &mut ssl_done } else { &mut gss_done };
                if std::mem::replace(done, true) {
                    return Err(second_request(tcp).await);
                }
                if ssl && tls_on {
                    if tcp.write_all(b"S").await.is_err() {
                        return Err(NoSession::Done);
                    }
                    return Ok(Opening::Tls { direct: false });
                }
                // No GSSAPI encryption (nor TLS): the client goes on in plain text.
                if tcp.write_all(b"N").await.is_err() {
                    return Err(NoSession::Done);
                }
            }
            p => return Ok(Opening::Plain(p)),
        }
    }
}

async fn second_request<S: AsyncWrite + Unpin>(stream: &mut S) -> NoSession {
    send_fatal(
        stream,
        sqlstate::PROTOCOL_VIOLATION,
        "unexpected second encryption request of the same kind",
        None,
    )
    .await;
    NoSession::Refused
}

/// The TLS handshake with a client. A direct TLS client must have negotiated ALPN
/// "postgresql", as PostgreSQL 17 requires.
async fn accept_tls(tcp: TcpStream, shared: &Shared, direct: bool) -> Option<Stream> {
    let acceptor = shared.tls().acceptor()?;
    let tls = match acceptor.accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "client TLS handshake failed");
            return None;
        }
    };
    let stream = Stream::tls(tls);
    if direct && stream.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
        tracing::debug!("direct TLS client did not negotiate ALPN \"postgresql\"");
        return None;
    }
    Some(stream)
}

pub(super) async fn read_first_packet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<StartupPacket, NoSession> {
    let mut len = [0u8; 4];
    if stream.read_exact(&mut len).await.is_err() {
        return Err(NoSession::Done);
    }
    let n = match startup::body_len(len) {
        Ok(n) => n,
        Err(e) => {
            send_fatal(stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string(), None).await;
            return Err(NoSession::Refused);
        }
    };
    let mut body = vec![0u8; n];
    if stream.read_exact(&mut body).await.is_err() {
        return Err(NoSession::Done);
    }
    match startup::parse(&body) {
        Ok(p) => Ok(p),
        Err(e) => {
            send_fatal(stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string(), None).await;
            Err(NoSession::Refused)
        }
    }
}

async fn login_inner(
    stream: &mut Stream,
    first: Option<StartupPacket>,
    peer: &Peer,
    shared: &Arc<Shared>,
    over_limit: bool,
) -> Result<LoggedIn, NoSession> {
    let packet = match first {
        Some(p) => p,
        None => read_first_packet(stream).await?,
    };
    let (version, params) = match packet {
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            // Inside TLS already.
            send_fatal(
                stream,
                sqlstate::PROTOCOL_VIOLATION,
                "unexpected encryption request on an encrypted connection",
                None,
            )
            .await;
            return Err(NoSession::Refused);
        }
        StartupPacket::CancelRequest {
            pid,
            secret,
            forwarded,
        } => {
            shared.cancel_request(pid, secret, forwarded).await;
            return Err(NoSession::Done);
        }
        StartupPacket::Startup { version, params } => (version, params),
    };
    if !peer.tls && shared.tls().client_mode() >= ClientSslMode::Require {
        send_fatal(
            stream,
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            &format!(
                "TLS is required: pgtide accepts only encrypted connections (client_tls_sslmode = \"{}\")",
                shared.tls().client_mode()
            ),
            Some("connect with sslmode=require (or verify-ca / verify-full)"),
        )
        .await;
        return Err(NoSession::Refused);
    }
    if version >> 16 != 3 {
        send_fatal(
            stream,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &format!(
                "unsupported frontend protocol {}.{}: pgtide supports protocol 3.0",
                version >> 16,
                version & 0xffff
            ),
            None,
        )
        .await;
        return Err(NoSession::Refused);
    }
    if over_limit {
        let max = shared.config().pgtide.max_client_conn;
        send_fatal(
            stream,
            sqlstate::TOO_MANY_CONNECTIONS,
            &format!("too many client connections: pgtide accepts at most {max} (max_client_conn)"),
            None,
        )
        .await;
        return Err(NoSession::Refused);
    }

    // Split the startup parameters into identity, settings and protocol options.
    let mut user = None;
    let mut database = None;
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut unknown_protocol_options = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "replication" => {
                if !matches!(v.as_str(), "false" | "off" | "no" | "0") {
                    send_fatal(
                        stream,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "replication connections are not supported by pgtide; connect to the server directly",
                        None,
                    )
                    .await;
                    return Err(NoSession::Refused);
                }
            }
            "options" => {
                match startup::parse_options(&v) {
                    Ok(opts) => settings.extend(opts),
                    Err(word) => {
                        send_fatal(
                        stream,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        &format!("unsupported option {word:?} in the options startup parameter"),
                        Some("pgtide accepts only run-time settings: -c name=value or --name=value"),
                    )
                    .await;
                        return Err(NoSession::Refused);
                    }
                }
            }
            k if k.starts_with("_pq_.") => unknown_protocol_options.push(k.to_string()),
            _ => settings.push((k, v)),
        }
    }
    if version & 0xffff != 0 || !unknown_protocol_options.is_empty() {
        // NegotiateProtocolVersion: we speak 3.0 and none of the _pq_ options.
        let mut b = BytesMut::new();
        b.put_u8(tag::NEGOTIATE_PROTOCOL_VERSION);
        let at = b.len();
        b.put_i32(0);
        b.put_i32(startup::PROTOCOL_3_0);
        b.put_i32(unknown_protocol_options.len() as i32);
        for o in &unknown_protocol_options {
            b.put_slice(o.as_bytes());
            b.put_u8(0);
        }
        let len = (b.len() - at) as i32;
        b[at..at + 4].copy_from_slice(&len.to_be_bytes());
        if stream.write_all(&b).await.is_err() {
            return Err(NoSession::Done);
        }
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        send_fatal(
            stream,
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
            None,
        )
        .await;
        return Err(NoSession::Refused);
    };
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    // Authenticate before saying anything about the database, as PostgreSQL does.
    let config = shared.config().clone();
    super::authn::authenticate(stream, shared, peer, &database, &user).await?;

    if crate::admin::is_admin_database(&database) {
        if !config.pgtide.admin_users.contains(&user) {
            send_fatal(
                stream,
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                &format!("user \"{user}\" is not allowed to connect to the admin console"),
                Some("list the user in admin_users of the configuration file (zero-config mode has no console users: run pgtide with --config for a console)"),
            )
            .await;
            return Err(NoSession::Refused);
        }
        let application_name = settings
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        return Err(NoSession::Admin {
            user,
            database,
            application_name,
            stream: None,
        });
    }

    let Some(pools) = shared.pool_set(&database, &user) else {
        send_fatal(
            stream,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{database}\" does not exist"),
            Some("pgtide serves only the databases listed in its configuration"),
        )
        .await;
        return Err(NoSession::Refused);
    };
    let pool = pools
        .host(shared.primary_host(&database))
        .unwrap_or_else(|| pools.first())
        .clone();
    let login_params = match pool.login_params() {
        Some(p) => p,
        None => {
            // First client of this pool: learn the servers' ParameterStatus set.
            let wait = config.pgtide.query_wait_timeout.0;
            match pool.checkout(wait).await {
                Ok(conn) => {
                    conn.checkin();
                    match pool.login_params() {
                        Some(p) => p,
                        None => Arc::new(Vec::new()),
                    }
                }
                Err(e) => {
                    send_fatal(
                        stream,
                        sqlstate::CONNECTION_FAILURE,
                        &format!(
                            "pgtide could not connect to the server for database \"{database}\" ({}): {e}",
                            pool.target().address()
                        ),
                        None,
                    )
                    .await;
                    return Err(NoSession::Refused);
                }
            }
        }
    };
    let base = shared
        .login_sets()
        .get(&login_params, &config.pgtide.track_extra_params);
    let params = ClientParams::new(base, &settings);
    let (key_pid, key_secret, cancel) = shared.cancels().register();

    let mut b = BytesMut::with_capacity(512);
    backend::authentication_ok(&mut b);
    for (k, v) in params.login_status() {
        backend::parameter_status(&mut b, k, v);
    }
    backend::backend_key_data(&mut b, key_pid, key_secret);
    backend::ready_for_query(&mut b, status::IDLE);
    if stream.write_all(&b).await.is_err() || stream.flush().await.is_err() {
        shared.cancels().unregister(key_pid);
        return Err(NoSession::Done);
    }
    let settings = pool.settings();
    let (mode, session_state) = (settings.pool_mode, settings.session_state);
    if config.pgtide.log_connections {
        tracing::info!(%user, %database, %mode, addr = %peer.addr, tls = peer.tls, "client logged in");
    }
    let entry = shared.clients().register(
        shared.clients().next_id(),
        ClientEntry::new(
            &user,
            &database,
            Some(peer.addr),
            stream.local_addr().ok(),
            params.value("application_name").unwrap_or(""),
        ),
    );
    entry
        .key_pid
        .store(key_pid, std::sync::atomic::Ordering::Relaxed);
    drop(pool);
    Ok(LoggedIn {
        pools,
        mode,
        session_state,
        params,
        key_pid,
        cancel,
        entry,
    })
}
