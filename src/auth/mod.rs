//! Authentication, both ways.
//!
//! - Clients logging in to pgtide: [`authenticate_client`] plays the PostgreSQL server for
//!   `trust`, `md5` and `scram-sha-256`, against a [`StoredCredential`].
//! - pgtide logging in to PostgreSQL: [`authenticate_server`] plays the client for
//!   cleartext, md5 and SCRAM-SHA-256, with a [`SaltedPasswordCache`] so that reconnects
//!   skip PBKDF2.
//! - Configured passwords: [`Secret`] (plain, `md5…` hash, or `SCRAM-SHA-256$…` verifier)
//!   and [`CredentialCache`], which derives a SCRAM verifier once per plain password.
//! - Other credential sources: [`userlist`] (PgBouncer's `auth_file`), [`sources`] (the
//!   files at start, the `auth_query` cache), and [`ServerSecret`], which carries what a
//!   client's login taught pgtide (a SCRAM ClientKey: pass-through) to the pool's servers.
//! - Who may try at all: [`hba`] (`auth_hba_file` rules) and [`throttle`] (the slowdown
//!   of addresses that keep failing).

mod credential;
mod exchange;
pub mod hba;
mod login;
pub mod md5;
mod peer;
pub mod scram;
pub mod sources;
mod store;
pub mod throttle;
pub mod userlist;

use std::fmt;

pub use credential::{
    mock_verifier, CredentialCache, SaltedPasswordCache, Secret, ServerSecret, StoredCredential,
};
pub use exchange::{
    authenticate_client, read_client_response, send_failure, send_success, ClientResponse, Method,
    Verified,
};
pub use login::authenticate_server;
pub use peer::Peer;
pub use scram::{ScramClient, ScramError, ScramServer, ScramVerifier};
pub use store::Credentials;

/// Why an authentication did not succeed.
#[derive(Debug)]
pub enum AuthError {
    /// Wrong password or unknown user (the client was sent FATAL 28P01).
    Failed,
    /// The peer broke the protocol (a client was sent FATAL 08P01).
    Protocol(String),
    /// The connection failed or closed mid-exchange.
    Io(std::io::Error),
    /// The PostgreSQL server refused pgtide's login with this ErrorResponse.
    Server { code: String, message: String },
    /// The server asks for a password pgtide cannot provide from the config.
    NoServerPassword(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Failed => f.write_str("password authentication failed"),
            AuthError::Protocol(m) => write!(f, "protocol violation during authentication: {m}"),
            AuthError::Io(e) => write!(f, "connection lost during authentication: {e}"),
            AuthError::Server { code, message } => {
                write!(
                    f,
                    "server refused authentication: {message} (SQLSTATE {code})"
                )
            }
            AuthError::NoServerPassword(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuthError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for AuthError {
    fn from(e: std::io::Error) -> Self {
        AuthError::Io(e)
    }
}

impl From<ScramError> for AuthError {
    fn from(e: ScramError) -> Self {
        match e {
            ScramError::Protocol(m) => AuthError::Protocol(m),
            ScramError::Failed => AuthError::Failed,
        }
    }
}

#[cfg(test)]
mod tests;
