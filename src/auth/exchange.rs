//! The client-facing exchange: pgtide plays the PostgreSQL server for a client that has
//! just sent its StartupMessage (trust, md5, scram-sha-256), and bounded reading of the
//! few messages that authentication involves.

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::credential::mock_verifier;
use super::scram::{self, ScramServer, MECHANISM};
use super::{md5, AuthError, StoredCredential};
use crate::config::AuthType;
use crate::protocol::{backend, cstr, frontend, sqlstate, tag};

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
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let t = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(AuthError::Protocol(format!(
            "invalid message length {len} for message type {}",
            describe_tag(t)
        )));
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max_len {
        return Err(AuthError::Protocol(format!(
            "message type {} of {len} bytes exceeds the limit of {max_len} bytes during authentication",
            describe_tag(t)
        )));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((t, body))
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

/// Authenticates a client that has just sent its StartupMessage. On success nothing more
/// has been written (the caller sends AuthenticationOk); on failure the client has been
/// sent a FATAL ErrorResponse (28P01 for a bad password or unknown user, 08P01 for a
/// protocol violation), except for [`AuthError::Io`].
///
/// `cred` is `None` for an unknown user: the exchange still runs and then fails the same
/// way a wrong password does. `max_message_len` caps the length field of each message.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthType,
    user: &str,
    cred: Option<&StoredCredential>,
    max_message_len: usize,
) -> Result<(), AuthError> {
    let result = match method {
        AuthType::Trust => return Ok(()),
        // Decided by the caller from the verified client certificate; never here.
        AuthType::Cert => Err(AuthError::Failed),
        AuthType::Md5 => match (
            cred.and_then(|c| c.md5_hash()),
            cred.and_then(|c| c.scram()),
        ) {
            (Some(hash), _) => md5_exchange(stream, Some(hash), max_message_len).await,
            // PostgreSQL does SCRAM under `md5` when only a SCRAM verifier is stored.
            (None, Some(v)) => {
                scram_exchange(
                    stream,
                    ScramServer::new(v.clone(), scram::random_nonce()),
                    max_message_len,
                )
                .await
            }
            (None, None) => md5_exchange(stream, None, max_message_len).await,
        },
        AuthType::ScramSha256 => {
            let server = match cred.and_then(|c| c.scram()) {
                Some(v) => ScramServer::new(v.clone(), scram::random_nonce()),
                // Unknown user, or only an md5 hash: a mock exchange that always fails.
                None => ScramServer::mock(mock_verifier(user), scram::random_nonce()),
            };
            scram_exchange(stream, server, max_message_len).await
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(reject(stream, e, user).await),
    }
}

/// Tells the client why it is being disconnected (best effort) and returns the error.
async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, err: AuthError, user: &str) -> AuthError {
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
    hash: Option<&str>,
    max_len: usize,
) -> Result<(), AuthError> {
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
    let Some(hash) = hash else {
        return Err(AuthError::Failed);
    };
    let expected = md5::salted_response(hash, salt);
    if scram::ct_eq(response, expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Failed)
    }
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut server: ScramServer,
    max_len: usize,
) -> Result<(), AuthError> {
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
    let server_final = server.client_final(&body)?;
    buf.clear();
    backend::authentication_sasl_final(&mut buf, server_final.as_bytes());
    send(stream, &buf).await
}
