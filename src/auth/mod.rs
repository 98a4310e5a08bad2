//! TEMPORARY STUB (replaced by the auth branch).
use crate::config::AuthType;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
pub struct StoredCredential;
#[derive(Default)]
pub struct SaltedPasswordCache;
#[derive(Default)]
pub struct CredentialCache;
impl CredentialCache {
    pub fn get(&self, _user: &str, _password: &str) -> std::sync::Arc<StoredCredential> {
        std::sync::Arc::new(StoredCredential)
    }
}
#[derive(Debug)]
pub enum AuthError {
    Failed,
    Protocol(String),
    Io(std::io::Error),
    Server { code: String, message: String },
    NoServerPassword(String),
}
impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
impl std::error::Error for AuthError {}
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    _s: &mut S,
    _m: AuthType,
    _u: &str,
    _c: Option<&StoredCredential>,
    _max: usize,
) -> Result<(), AuthError> {
    Ok(())
}
pub async fn authenticate_server<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    _u: &str,
    _c: Option<&StoredCredential>,
    _cache: &SaltedPasswordCache,
) -> Result<(), AuthError> {
    let mut b = [0u8; 9];
    s.read_exact(&mut b).await.map_err(AuthError::Io)?;
    Ok(())
}
