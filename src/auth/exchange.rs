//! The client-facing exchange: pgtide plays the PostgreSQL server for a client that has
//! just sent its StartupMessage (trust, md5, scram-sha-256, password), and bounded reading
//! of the few messages that authentication involves. The exchange is split in three
//! steps (read the response, judge it, answer it) so that a login can re-judge an md5 or
//! clear-text response against a re-fetched credential and delay its answer.

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::credential::mock_verifier;
use super::scram::{self, ScramServer, MECHANISM};
use super::{md5, AuthError, StoredCredential};
use crate::config::AuthType;
use crate::protocol::ScanError;
use crate::protocol::{backend, cstr, frontend, sqlstate, tag};
use crate::stream::ReadError;

/// A message tag for error messages: the character when printable, else its code.
pub(super) fn describe_tag(t: u8) -> String {
    if t.is_ascii_graphic() {
        format!("'{}'", char::from(t))
    } else {
        format!("{t}")
    }
}

/// Reads one tagged message whose length field is at most `max_len`, without allocating
/// more than that. EOF or a read error is [`AuthError::Io`].
pub(super) async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_len: usize,
) -> Result<(u8, Vec<u8>), AuthError> {
    let max = u32::try_from(max_len).unwrap_or(u32::MAX);
    crate::stream::read_message(stream, max)
        .await
        .map_err(|e| match e {
            ReadError::Io(e) => AuthError::Io(e),
            ReadError::Frame(ScanError::BadLength { tag, len }) => AuthError::Protocol(format!(
                "invalid message length {len} for message type {}",
                describe_tag(tag)
            )),
            ReadError::Frame(ScanError::TooLarge { tag, len, max }) => AuthError::Protocol(format!(
                "message type {} of {len} bytes exceeds the limit of {max} bytes during authentication",
                describe_tag(tag)
            )),
        })
}

pub(super) async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
) -> Result<(), AuthError> {
    stream.write_all(buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads the client's next message, which must be a PasswordMessage-type ('p') message.
async fn read_password_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_len: usize,
) -> Result<Vec<u8>, AuthError> {
    let (t, body) = read_message(stream, max_len).await?;
    if t != tag::PASSWORD_MESSAGE {
        return Err(AuthError::Protocol(format!(
            "expected password response, got message type {}",
            describe_tag(t)
        )));
    }
    Ok(body)
}

/// The password-checking method of one client login: `auth_type`, or the method of the
/// matching `auth_hba_file` line (`cert` and `reject` are decided before any exchange).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Trust,
    /// md5, or SCRAM when only a SCRAM verifier is stored (as PostgreSQL does).
    Md5,
    ScramSha256,
    /// The password in clear text (AuthenticationCleartextPassword).
    Password,
    /// A verified client certificate whose CN is the user name: no password exchange
    /// (decided by the caller from the TLS session, never by an exchange).
    Cert,
}

impl From<AuthType> for Method {
    fn from(a: AuthType) -> Self {
        match a {
            AuthType::Trust => Method::Trust,
            AuthType::Md5 => Method::Md5,
            AuthType::ScramSha256 => Method::ScramSha256,
            AuthType::Cert => Method::Cert,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Trust => "trust",
            Method::Md5 => "md5",
            Method::ScramSha256 => "scram-sha-256",
            Method::Password => "password",
            Method::Cert => "cert",
        })
    }
}

/// What a successful login proved, beyond "the client knows the password".
#[derive(Default)]
pub struct Verified {
    /// ClientKey from a SCRAM proof: lets pgtide log in to servers as this user when it
    /// holds only the verifier (SCRAM pass-through).
    pub client_key: Option<[u8; 32]>,
    /// The password a client sent in clear text (`password` method).
    pub password: Option<String>,
    /// The SCRAM server-final-message still to send (AuthenticationSASLFinal).
    server_final: Option<String>,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("client_key", &self.client_key.is_some())
            .field("password", &self.password.is_some())
            .finish()
    }
}

/// The client's answer to pgtide's authentication request, read but not yet judged
/// or answered, so that the caller can check it against a re-fetched credential and
/// delay the answer.
pub enum ClientResponse {
    Trust,
    Md5 {
        salt: [u8; 4],
        response: Vec<u8>,
    },
    /// A finished SCRAM exchange: the outcome is fixed by the verifier whose salt was
    /// sent (the proof cannot be checked against any other).
    Scram(Result<(String, Option<[u8; 32]>), ()>),
    Password(Vec<u8>),
}

/// Runs the exchange of `method` with a client that has just sent its StartupMessage,
/// up to and including the client's last message, and returns that message unjudged.
/// Nothing is sent on error: pass the error to [`send_failure`].
///
/// `cred` is `None` for an unknown user: the exchange still runs (a mock SCRAM exchange
/// for SCRAM) and then fails the same way a wrong password does. `max_message_len` caps
/// the length field of each message.
pub async fn read_client_response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: Method,
    user: &str,
    cred: Option<&StoredCredential>,
    max_message_len: usize,
) -> Result<ClientResponse, AuthError> {
    let max = max_message_len;
    let scram_server = |v: Option<&scram::ScramVerifier>| match v {
        Some(v) => ScramServer::new(v.clone(), scram::random_nonce()),
        // Unknown user, or only an md5 hash: a mock exchange that always fails.
        None => ScramServer::mock(mock_verifier(user), scram::random_nonce()),
    };
    match method {
        Method::Trust => Ok(ClientResponse::Trust),
        // Decided by the caller from the verified client certificate; never here.
        Method::Cert => Err(AuthError::Failed),
        Method::Md5 => match (
            cred.and_then(|c| c.md5_hash()),
            cred.and_then(|c| c.scram()),
        ) {
            // PostgreSQL does SCRAM under `md5` when only a SCRAM verifier is stored.
            (None, Some(v)) => scram_exchange(stream, scram_server(Some(v)), max).await,
            _ => md5_exchange(stream, max).await,
        },
        Method::ScramSha256 => {
            scram_exchange(stream, scram_server(cred.and_then(|c| c.scram())), max).await
        }
        Method::Password => {
            let mut buf = BytesMut::new();
            backend::authentication_cleartext(&mut buf);
            send(stream, &buf).await?;
            let body = read_password_message(stream, max).await?;
            let (password, rest) = cstr(&body)
                .ok_or_else(|| AuthError::Protocol("invalid password packet size".into()))?;
            if !rest.is_empty() {
                return Err(AuthError::Protocol("invalid password packet size".into()));
            }
            if password.is_empty() {
                return Err(AuthError::Protocol(
                    "empty password returned by client".into(),
                ));
            }
            Ok(ClientResponse::Password(password.to_vec()))
        }
    }
}

impl ClientResponse {
    /// Judges the response against `cred` (`None`: unknown user). md5 and clear-text
    /// responses can be judged against any credential, e.g. one fetched again after a
    /// failure; a SCRAM response only against the verifier its exchange used.
    pub async fn verify(
        &self,
        user: &str,
        cred: Option<&StoredCredential>,
    ) -> Result<Verified, AuthError> {
        match self {
            ClientResponse::Trust => Ok(Verified::default()),
            ClientResponse::Md5 { salt, response } => {
                let hash = cred.and_then(|c| c.md5_hash()).ok_or(AuthError::Failed)?;
                let expected = md5::salted_response(hash, *salt);
                if scram::ct_eq(response, expected.as_bytes()) {
                    Ok(Verified::default())
                } else {
                    Err(AuthError::Failed)
                }
            }
            ClientResponse::Scram(Ok((server_final, client_key))) => Ok(Verified {
                client_key: *client_key,
                password: None,
                server_final: Some(server_final.clone()),
            }),
            ClientResponse::Scram(Err(())) => Err(AuthError::Failed),
            ClientResponse::Password(p) => {
                let cred = cred.ok_or(AuthError::Failed)?;
                let password = std::str::from_utf8(p).map_err(|_| AuthError::Failed)?;
                if check_plain(user, password, cred).await {
                    Ok(Verified {
                        client_key: None,
                        password: Some(password.to_owned()),
                        server_final: None,
                    })
                } else {
                    Err(AuthError::Failed)
                }
            }
        }
    }
}

/// Whether `password` is the password of `cred`, whatever form `cred` holds it in.
async fn check_plain(user: &str, password: &str, cred: &StoredCredential) -> bool {
    if let Some(p) = cred.plain() {
        return scram::ct_eq(p.as_bytes(), password.as_bytes());
    }
    if let Some(h) = cred.md5_hash() {
        return scram::ct_eq(md5::password_hash(password, user).as_bytes(), h.as_bytes());
    }
    if let Some(v) = cred.scram() {
        let (p, v) = (password.to_owned(), v.clone());
        // PBKDF2: off the async workers.
        return tokio::task::spawn_blocking(move || {
            let derived = scram::ScramVerifier::derive(&p, &v.salt, v.iterations);
            scram::ct_eq(&derived.stored_key, &v.stored_key)
                && scram::ct_eq(&derived.server_key, &v.server_key)
        })
        .await
        .unwrap_or(false);
    }
    false
}

/// Sends what a successful exchange still owes the client before AuthenticationOk (the
/// SCRAM server-final-message); the caller sends AuthenticationOk.
pub async fn send_success<S: AsyncWrite + Unpin>(
    stream: &mut S,
    verified: &Verified,
) -> Result<(), AuthError> {
    if let Some(server_final) = &verified.server_final {
        let mut buf = BytesMut::new();
        backend::authentication_sasl_final(&mut buf, server_final.as_bytes());
        send(stream, &buf).await?;
    }
    Ok(())
}

/// Authenticates a client that has just sent its StartupMessage: [`read_client_response`],
/// [`ClientResponse::verify`], then [`send_success`] or [`send_failure`]. On success the
/// caller sends AuthenticationOk; on failure the client has been sent a FATAL
/// ErrorResponse (28P01 for a bad password or unknown user, 08P01 for a protocol
/// violation), except for [`AuthError::Io`].
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: impl Into<Method>,
    user: &str,
    cred: Option<&StoredCredential>,
    max_message_len: usize,
) -> Result<Verified, AuthError> {
    let result =
        match read_client_response(stream, method.into(), user, cred, max_message_len).await {
            Ok(response) => response.verify(user, cred).await,
            Err(e) => Err(e),
        };
    match result {
        Ok(v) => {
            send_success(stream, &v).await?;
            Ok(v)
        }
        Err(e) => Err(send_failure(stream, e, user).await),
    }
}

/// Tells the client why it is being disconnected (best effort) and returns the error:
/// 28P01 for [`AuthError::Failed`], 08P01 for [`AuthError::Protocol`].
pub async fn send_failure<S: AsyncWrite + Unpin>(
    stream: &mut S,
    err: AuthError,
    user: &str,
) -> AuthError {
    let mut buf = BytesMut::new();
    match &err {
        AuthError::Failed => backend::fatal(
            &mut buf,
            sqlstate::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        ),
        AuthError::Protocol(m) => backend::fatal(&mut buf, sqlstate::PROTOCOL_VIOLATION, m),
        _ => return err,
    }
    // The client may already be gone; the error to report is the original one.
    let _ = send(stream, &buf).await;
    err
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    max_len: usize,
) -> Result<ClientResponse, AuthError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut buf = BytesMut::new();
    backend::authentication_md5(&mut buf, salt);
    send(stream, &buf).await?;

    let body = read_password_message(stream, max_len).await?;
    let (response, rest) =
        cstr(&body).ok_or_else(|| AuthError::Protocol("invalid password packet size".into()))?;
    if !rest.is_empty() {
        return Err(AuthError::Protocol("invalid password packet size".into()));
    }
    Ok(ClientResponse::Md5 {
        salt,
        response: response.to_vec(),
    })
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut server: ScramServer,
    max_len: usize,
) -> Result<ClientResponse, AuthError> {
    let mut buf = BytesMut::new();
    backend::authentication_sasl(&mut buf, &[MECHANISM]);
    send(stream, &buf).await?;

    let body = read_password_message(stream, max_len).await?;
    let (mechanism, data) = frontend::parse_sasl_initial_response(&body)
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse message".into()))?;
    if mechanism != MECHANISM.as_bytes() {
        return Err(AuthError::Protocol(format!(
            "client selected an invalid SASL authentication mechanism \"{}\"; pgtide offers {MECHANISM}",
            String::from_utf8_lossy(mechanism)
        )));
    }
    let server_first = server.client_first(data)?;
    buf.clear();
    backend::authentication_sasl_continue(&mut buf, server_first.as_bytes());
    send(stream, &buf).await?;

    let body = read_password_message(stream, max_len).await?;
    match server.client_final(&body) {
        Ok(server_final) => Ok(ClientResponse::Scram(Ok((
            server_final,
            server.client_key(),
        )))),
        Err(scram::ScramError::Failed) => Ok(ClientResponse::Scram(Err(()))),
        Err(e) => Err(e.into()),
    }
}
