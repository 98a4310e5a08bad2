//! The start of a client connection: SSLRequest / GSSENCRequest (answered 'N'),
//! CancelRequest, StartupMessage, authentication at the pooler, and the login reply
//! (AuthenticationOk, ParameterStatus, an invented BackendKeyData, ReadyForQuery).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cancel::CancelSlot;
use super::params::ClientParams;
use super::Shared;
use crate::config::PoolMode;
use crate::pool::Pool;
use crate::protocol::backend::{self, Severity};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{sqlstate, status, tag};

/// A logged-in client, ready for its first query.
pub(super) struct LoggedIn {
    pub database: String,
    pub user: String,
    pub pool: Arc<Pool>,
    pub mode: PoolMode,
    pub params: ClientParams,
    pub key_pid: i32,
    pub cancel: Arc<CancelSlot>,
}

impl LoggedIn {
    /// The pool of this client's (database, user) on the current primary (which may have
    /// changed since login).
    pub fn pool_for_primary(&self, shared: &Shared) -> Arc<Pool> {
        if !shared.clusters.contains_key(&self.database) {
            // One server (no cluster): its pool is the one this client logged in with,
            // found without the pools' lock and key allocations on every transaction.
            return self.pool.clone();
        }
        shared
            .pool(&self.database, &self.user)
            .unwrap_or_else(|| self.pool.clone())
    }
}

/// How a connection attempt ended without a session.
pub(super) enum NoSession {
    /// A CancelRequest (handled), or the client went away.
    Done,
    /// A FATAL was sent, or the client broke the protocol.
    Refused,
}

/// Writes a FATAL ErrorResponse; errors writing it are ignored (the connection closes).
pub(super) async fn send_fatal(
    stream: &mut TcpStream,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let mut b = BytesMut::with_capacity(128 + message.len());
    backend::error_response(&mut b, Severity::Fatal, code, message, None, hint);
    let _ = stream.write_all(&b).await;
    let _ = stream.flush().await;
}

/// Reads the first packet(s) and logs the client in, within `client_login_timeout`.
pub(super) async fn login(
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    over_limit: bool,
) -> Result<LoggedIn, NoSession> {
    let timeout = shared.config.pgtide.client_login_timeout.0;
    match tokio::time::timeout(timeout, login_inner(stream, shared, over_limit)).await {
        Ok(r) => r,
        Err(_) => {
            send_fatal(
                stream,
                sqlstate::PROTOCOL_VIOLATION,
                "client did not complete login within client_login_timeout",
                None,
            )
            .await;
            Err(NoSession::Refused)
        }
    }
}

async fn read_first_packet(stream: &mut TcpStream) -> Result<StartupPacket, NoSession> {
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
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    over_limit: bool,
) -> Result<LoggedIn, NoSession> {
    // One SSLRequest and one GSSENCRequest each, in either order, as PostgreSQL allows
    // (libpq with a Kerberos ticket sends GSSENCRequest, then SSLRequest).
    let (mut ssl_done, mut gss_done) = (false, false);
    let (version, params) = loop {
        match read_first_packet(stream).await? {
            p @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                let done = match p {
                    StartupPacket::SslRequest => &mut ssl_done,
                    _ => &mut gss_done,
                };
                if *done {
                    send_fatal(
                        stream,
                        sqlstate::PROTOCOL_VIOLATION,
                        "unexpected second encryption request of the same kind",
                        None,
                    )
                    .await;
                    return Err(NoSession::Refused);
                }
                *done = true;
                // No TLS or GSSAPI encryption yet: the client goes on in plain text.
                if stream.write_all(b"N").await.is_err() {
                    return Err(NoSession::Done);
                }
            }
            StartupPacket::CancelRequest { pid, secret } => {
                let t = shared.config.pgtide.server_connect_timeout.0;
                shared.cancels.cancel(pid, secret, t).await;
                return Err(NoSession::Done);
            }
            StartupPacket::Startup { version, params } => break (version, params),
        }
    };
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
        let max = shared.config.pgtide.max_client_conn;
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
    let config = &shared.config;
    let known = config.users.contains_key(&user);
    let cred = if known {
        shared.credential(&user)
    } else {
        None
    };
    let method = config.auth_type(&user);
    let max = config.pgtide.max_message_size as usize;
    let method = if known {
        method
    } else {
        // Unknown users go through a full exchange that fails, revealing nothing.
        crate::config::AuthType::ScramSha256
    };
    if let Err(e) =
        crate::auth::authenticate_client(stream, method, &user, cred.as_deref(), max).await
    {
        tracing::debug!(%user, error = %e, "client authentication failed");
        if matches!(e, crate::auth::AuthError::Failed) {
            shared.metrics.auth_failures.inc();
        }
        return Err(NoSession::Refused);
    }
    if !known {
        // authenticate_client fails for unknown users; this is a second line of defence.
        send_fatal(
            stream,
            sqlstate::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
            None,
        )
        .await;
        return Err(NoSession::Refused);
    }

    let Some(pool) = shared.pool(&database, &user) else {
        send_fatal(
            stream,
            sqlstate::INVALID_CATALOG_NAME,
            &format!("database \"{database}\" does not exist"),
            Some("pgtide serves only the databases listed in its configuration"),
        )
        .await;
        return Err(NoSession::Refused);
    };
    let login_params = match pool.login_params() {
        Some(p) => p,
        None => {
            // First client of this pool: learn the servers' ParameterStatus set.
            let wait = config.pgtide.query_wait_timeout.0;
            match pool.checkout(wait).await {
                Ok(conn) => {
                    pool.checkin(conn);
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
    let params = ClientParams::new(&login_params, &settings, &config.pgtide.track_extra_params);
    let (key_pid, key_secret, cancel) = shared.cancels.register();

    let mut b = BytesMut::with_capacity(512);
    backend::authentication_ok(&mut b);
    for (k, v) in params.login_status(&login_params) {
        backend::parameter_status(&mut b, k, v);
    }
    backend::backend_key_data(&mut b, key_pid, key_secret);
    backend::ready_for_query(&mut b, status::IDLE);
    if stream.write_all(&b).await.is_err() {
        shared.cancels.unregister(key_pid);
        return Err(NoSession::Done);
    }
    let mode = pool.settings().pool_mode;
    if config.pgtide.log_connections {
        tracing::info!(%user, %database, %mode, "client logged in");
    }
    Ok(LoggedIn {
        database,
        user,
        pool,
        mode,
        params,
        key_pid,
        cancel,
    })
}

/// Used by the session for its own timeouts on internal queries.
pub(super) fn internal_timeout(shared: &Shared) -> Duration {
    shared
        .config
        .pgtide
        .server_connect_timeout
        .0
        .max(Duration::from_secs(5))
}
