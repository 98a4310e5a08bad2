//! Authentication: SCRAM-SHA-256 and md5 primitives (exchanges to follow).

pub mod md5;
pub mod scram;
mod credential;

pub use credential::{mock_verifier, CredentialCache, SaltedPasswordCache, Secret, StoredCredential};
