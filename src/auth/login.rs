//! The server-facing login: pgtide plays the client after writing its StartupMessage and
//! answers the server's authentication requests (cleartext, md5, SCRAM-SHA-256 without
//! channel binding) until AuthenticationOk.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::exchange::{describe_tag, read_message, send};
use super::scram::{self, ScramClient, MECHANISM};
use super::{md5, AuthError, SaltedPasswordCache, StoredCredential};
use crate::protocol::{auth_code, backend, be_i32, cstr, frontend, tag};

/// Cap on the length of a message from the server during authentication.
const SERVER_MESSAGE_MAX: usize = 1 << 20;

/// Answers the server's authentication requests for `user` with `secret` (the password
/// the config holds for that user, if any). Returns right after consuming
/// AuthenticationOk, leaving ParameterStatus, BackendKeyData and ReadyForQuery unread.
pub async fn authenticate_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    secret: Option<&StoredCredential>,
    cache: &SaltedPasswordCache,
) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    loop {
        let (code, data) = next_auth_request(stream).await?;
        buf.clear();
        match code {
            auth_code::OK => return Ok(()),
            auth_code::CLEARTEXT_PASSWORD => {
                let password = secret
                    .and_then(|s| s.plain())
                    .ok_or_else(|| no_password(user, "password (cleartext)", "a plain-text"))?;
                frontend::password_message(&mut buf, password.as_bytes());
                send(stream, &buf).await?;
            }
            auth_code::MD5_PASSWORD => {
                let salt: [u8; 4] =
                    data.get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| {
                            AuthError::Protocol(
                                "AuthenticationMD5Password without a 4-byte salt".into(),
                            )
                        })?;
                let hash = secret
                    .and_then(|s| s.md5_hash())
                    .ok_or_else(|| no_password(user, "md5", "a plain-text or md5-hashed"))?;
                frontend::password_message(&mut buf, md5::salted_response(hash, salt).as_bytes());
                send(stream, &buf).await?;
            }
            auth_code::SASL => scram_login(stream, user, &data, secret, cache).await?,
            auth_code::SASL_CONTINUE | auth_code::SASL_FINAL => {
                return Err(AuthError::Protocol(
                    "server sent a SASL continuation before any SASL exchange began".into(),
                ))
            }
            other => {
                return Err(AuthError::Protocol(format!(
                    "server requested an unsupported authentication method (request code {other}); \
                     pgtide supports trust, password, md5 and scram-sha-256 towards servers"
                )))
            }
        }
    }
}

fn no_password(user: &str, method: &str, kind: &str) -> AuthError {
    AuthError::NoServerPassword(format!(
        "the server requested {method} authentication for user \"{user}\", but pgtide holds no \
         usable password for it: give {kind} password for user \"{user}\" (in [users] or the \
         auth_file of the configuration file, or in the --upstream URL / DATABASE_URL)"
    ))
}

/// The next authentication request: (request code, data after the code). An
/// ErrorResponse becomes [`AuthError::Server`]; NoticeResponse and
/// NegotiateProtocolVersion are skipped.
async fn next_auth_request<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(i32, Vec<u8>), AuthError> {
    loop {
        let (t, mut body) = read_message(stream, SERVER_MESSAGE_MAX).await?;
        match t {
            tag::AUTHENTICATION => {
                if body.len() < 4 {
                    return Err(AuthError::Protocol(
                        "authentication request message too short".into(),
                    ));
                }
                let data = body.split_off(4);
                return Ok((be_i32(&body), data));
            }
            tag::ERROR_RESPONSE => {
                let f = backend::parse_error_fields(&body);
                return Err(AuthError::Server {
                    code: f.code.to_owned(),
                    message: f.message.to_owned(),
                });
            }
            tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => continue,
            other => {
                return Err(AuthError::Protocol(format!(
                    "server sent message type {} during authentication",
                    describe_tag(other)
                )))
            }
        }
    }
}

async fn expect_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    want: i32,
    what: &str,
) -> Result<Vec<u8>, AuthError> {
    let (code, data) = next_auth_request(stream).await?;
    if code != want {
        return Err(AuthError::Protocol(format!(
            "expected {what} from the server, got authentication request code {code}"
        )));
    }
    Ok(data)
}

async fn scram_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    mechanisms: &[u8],
    secret: Option<&StoredCredential>,
    cache: &SaltedPasswordCache,
) -> Result<(), AuthError> {
    let mut offered = Vec::new();
    let mut rest = mechanisms;
    while let Some((m, next)) = cstr(rest) {
        if m.is_empty() {
            break;
        }
        offered.push(String::from_utf8_lossy(m).into_owned());
        rest = next;
    }
    if !offered.iter().any(|m| m == MECHANISM) {
        return Err(AuthError::Protocol(format!(
            "server offers SASL mechanisms [{}]; pgtide supports only {MECHANISM} (without channel binding)",
            offered.join(", ")
        )));
    }
    let password = secret.and_then(|s| s.plain());
    // SCRAM pass-through: a verifier plus the ClientKey a client's login recovered.
    let keys = secret.and_then(|s| Some((s.scram()?, s.client_key()?)));
    if password.is_none() && keys.is_none() {
        return Err(no_password(user, "SCRAM-SHA-256", "a plain-text"));
    }

    // PostgreSQL ignores the SCRAM user name (the StartupMessage names the user).
    let mut client = ScramClient::new("", scram::random_nonce());
    let mut buf = BytesMut::new();
    frontend::sasl_initial_response(&mut buf, MECHANISM, client.client_first().as_bytes());
    send(stream, &buf).await?;

    let data = expect_request(
        stream,
        auth_code::SASL_CONTINUE,
        "AuthenticationSASLContinue",
    )
    .await?;
    let first = client.server_first(&data)?;
    let client_final = match (password, keys) {
        (Some(password), _) => {
            let salted = cache
                .salted_password(password, &first.salt, first.iterations)
                .await?;
            client.client_final(&salted)?
        }
        (None, Some((verifier, client_key))) => {
            if first.salt != verifier.salt || first.iterations != verifier.iterations {
                return Err(AuthError::NoServerPassword(format!(
                    "the server's SCRAM secret for user \"{user}\" is not the one pgtide checked the \
                     client against (different salt or iteration count): the password was changed on \
                     the server, or the auth_file/auth_query secret is not this server's; log in again \
                     so that pgtide fetches the current secret, or update the auth_file"
                )));
            }
            client.client_final_with_keys(client_key, &verifier.server_key)?
        }
        (None, None) => return Err(no_password(user, "SCRAM-SHA-256", "a plain-text")),
    };
    buf.clear();
    frontend::sasl_response(&mut buf, client_final.as_bytes());
    send(stream, &buf).await?;

    let data = expect_request(stream, auth_code::SASL_FINAL, "AuthenticationSASLFinal").await?;
    client.server_final(&data)?;
    Ok(())
}
