//! Credentials: what a configured password string is ([`Secret`]), what pgtide keeps of it
//! for one user ([`StoredCredential`]), the caches that make sure PBKDF2 does not run per
//! login ([`CredentialCache`] for clients, [`SaltedPasswordCache`] for servers), what a
//! pool logs in to its servers with ([`ServerSecret`], which logins of clients can teach a
//! ClientKey or password), and the mock verifier used for users that do not exist.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use rand::RngCore;

use super::md5;
use super::scram::{self, ScramVerifier, DEFAULT_ITERATIONS, SALT_LEN};

/// A password string from the config, classified the way PostgreSQL classifies
/// `rolpassword`: an md5 hash, a SCRAM verifier, or else a plain-text password.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// The 32 lowercase hex digits after `md5`.
    Md5(String),
    Scram(ScramVerifier),
}

impl Secret {
    pub fn parse(s: &str) -> Secret {
        if md5::is_md5_hash(s) {
            Secret::Md5(s[md5::PREFIX.len()..].to_owned())
        } else if let Some(v) = ScramVerifier::parse(s) {
            Secret::Scram(v)
        } else {
            Secret::Plain(s.to_owned())
        }
    }

    /// For config validation: a reason to warn when `s` looks like a hash but is not a
    /// valid one, and would therefore be taken as a plain-text password.
    pub fn malformed_hash_warning(s: &str) -> Option<String> {
        if s.starts_with("SCRAM-SHA-256$") && ScramVerifier::parse(s).is_none() {
            return Some(
                "password starts with \"SCRAM-SHA-256$\" but is not a valid verifier \
                 (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>); it will be used as a plain-text password"
                    .into(),
            );
        }
        if s.len() == 35 && s.starts_with(md5::PREFIX) && !md5::is_md5_hash(s) {
            return Some(
                "password looks like an md5 hash but is not \"md5\" followed by 32 lowercase hex digits; \
                 it will be used as a plain-text password"
                    .into(),
            );
        }
        None
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "Secret::Plain(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
            Secret::Scram(_) => "Secret::Scram(..)",
        })
    }
}

/// What pgtide knows about one user's password, in every form it can use.
///
/// From a plain password: the password itself (to log in to servers), its md5 hash for
/// this user, and a SCRAM verifier derived once with a random salt. From an md5 hash: the
/// hash only. From a SCRAM verifier: the verifier only (enough to check clients, not to
/// log in to servers, until a client's SCRAM login adds its ClientKey: see
/// [`Self::with_client_key`]).
#[derive(Clone)]
pub struct StoredCredential {
    plain: Option<String>,
    md5: Option<String>,
    scram: Option<ScramVerifier>,
    /// ClientKey of `scram`, recovered from a client's proof (SCRAM pass-through).
    client_key: Option<[u8; 32]>,
}

impl StoredCredential {
    /// Parses a configured password for `user`. Runs PBKDF2 once for a plain password;
    /// prefer [`CredentialCache::get`], which does that once per (user, password).
    pub fn new(user: &str, configured: &str) -> Self {
        Self::from_secret(user, Secret::parse(configured))
    }

    pub fn from_secret(user: &str, secret: Secret) -> Self {
        match secret {
            Secret::Plain(p) => StoredCredential {
                md5: Some(md5::password_hash(&p, user)),
                scram: Some(ScramVerifier::generate(&p)),
                plain: Some(p),
                client_key: None,
            },
            Secret::Md5(h) => StoredCredential {
                plain: None,
                md5: Some(h),
                scram: None,
                client_key: None,
            },
            Secret::Scram(v) => StoredCredential {
                plain: None,
                md5: None,
                scram: Some(v),
                client_key: None,
            },
        }
    }

    /// A plain password a client sent in clear text, kept to log in to servers: the
    /// password and its md5 hash, without deriving a SCRAM verifier (no PBKDF2).
    pub fn plain_for_server(user: &str, password: &str) -> Self {
        StoredCredential {
            plain: Some(password.to_owned()),
            md5: Some(md5::password_hash(password, user)),
            scram: None,
            client_key: None,
        }
    }

    /// The SCRAM verifier together with the ClientKey a client proved it knows: enough
    /// to log in with SCRAM to a server that stores this very verifier.
    pub fn with_client_key(verifier: ScramVerifier, client_key: [u8; 32]) -> Self {
        StoredCredential {
            plain: None,
            md5: None,
            scram: Some(verifier),
            client_key: Some(client_key),
        }
    }

    /// ClientKey for SCRAM pass-through, when a client's login provided it.
    pub fn client_key(&self) -> Option<&[u8; 32]> {
        self.client_key.as_ref()
    }

    /// Whether this credential can answer a server's SCRAM or md5 request by itself
    /// (a plain password), rather than only check clients.
    pub fn has_plain(&self) -> bool {
        self.plain.is_some()
    }

    /// The plain-text password, when the config holds one.
    pub fn plain(&self) -> Option<&str> {
        self.plain.as_deref()
    }

    /// The md5 hash (32 hex digits, without the `md5` prefix).
    pub fn md5_hash(&self) -> Option<&str> {
        self.md5.as_deref()
    }

    pub fn scram(&self) -> Option<&ScramVerifier> {
        self.scram.as_ref()
    }
}

impl fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCredential")
            .field("plain", &self.plain.is_some())
            .field("md5", &self.md5.is_some())
            .field("scram", &self.scram.is_some())
            .field("client_key", &self.client_key.is_some())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type CredentialSlot = Arc<OnceLock<Arc<StoredCredential>>>;

/// (user, configured password string) -> [`StoredCredential`], each built once.
///
/// The map lock is held only to find or insert a slot; PBKDF2 runs outside it, once per
/// key (concurrent first logins of the same user wait for the one derivation). Keep one
/// cache for the life of the process so that a user's derived salt stays stable.
#[derive(Default)]
pub struct CredentialCache {
    map: Mutex<HashMap<(String, String), CredentialSlot>>,
}

impl CredentialCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The credential for `user` with `configured` password. The first call for a plain
    /// password runs PBKDF2 (4096 iterations, a few ms in release builds) on this thread:
    /// call it at config load to warm the cache, or from `spawn_blocking`.
    pub fn get(&self, user: &str, configured: &str) -> Arc<StoredCredential> {
        let key = (user.to_owned(), configured.to_owned());
        let slot = Arc::clone(lock(&self.map).entry(key).or_default());
        Arc::clone(slot.get_or_init(|| Arc::new(StoredCredential::new(user, configured))))
    }

    /// Drops entries whose (user, password) `keep` rejects, e.g. after a config reload.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        lock(&self.map).retain(|(u, p), _| keep(u, p));
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Upper bound on [`SaltedPasswordCache`] entries; the cache is emptied when it is full.
const SALTED_CACHE_MAX: usize = 4096;

/// (password, salt, iterations)
type SaltKey = (String, Vec<u8>, u32);

/// SaltedPassword per (password, salt, iterations) for pgtide's SCRAM logins to servers:
/// a server keeps its salt, so reconnects skip PBKDF2.
#[derive(Default)]
pub struct SaltedPasswordCache {
    map: Mutex<HashMap<SaltKey, [u8; 32]>>,
}

impl SaltedPasswordCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, password: &str, salt: &[u8], iterations: u32) -> Option<[u8; 32]> {
        lock(&self.map)
            .get(&(password.to_owned(), salt.to_vec(), iterations))
            .copied()
    }

    pub fn insert(&self, password: &str, salt: &[u8], iterations: u32, salted: [u8; 32]) {
        let mut map = lock(&self.map);
        if map.len() >= SALTED_CACHE_MAX {
            map.clear();
        }
        map.insert((password.to_owned(), salt.to_vec(), iterations), salted);
    }

    /// The cached SaltedPassword, or PBKDF2 on the blocking pool (then cached).
    pub async fn salted_password(
        &self,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> std::io::Result<[u8; 32]> {
        if let Some(sp) = self.get(password, salt, iterations) {
            return Ok(sp);
        }
        let (p, s) = (password.to_owned(), salt.to_vec());
        let sp = tokio::task::spawn_blocking(move || scram::salted_password(&p, &s, iterations))
            .await
            .map_err(std::io::Error::other)?;
        self.insert(password, salt, iterations, sp);
        Ok(sp)
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a pool logs in to its servers with: the configured credential, replaced by what
/// a client's login taught pgtide when the configuration has no plain password (a
/// ClientKey from a SCRAM login, a hash, or a password sent in clear text). Cheap to
/// clone; every clone sees the latest value. The ClientKey is never logged.
#[derive(Clone, Default)]
pub struct ServerSecret(Arc<RwLock<Option<Arc<StoredCredential>>>>);

impl ServerSecret {
    pub fn new(initial: Option<Arc<StoredCredential>>) -> Self {
        ServerSecret(Arc::new(RwLock::new(initial)))
    }

    /// The credential to log in with now.
    pub fn current(&self) -> Option<Arc<StoredCredential>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the credential (the next server login uses it).
    pub fn set(&self, cred: Arc<StoredCredential>) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(cred);
    }
}

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServerSecret")
            .field(&self.current())
            .finish()
    }
}

/// A believable verifier for a user that does not exist (or has no SCRAM secret): the
/// salt depends only on the user name and a per-process random key, so repeated attempts
/// see the same salt, as they would for a real user.
pub fn mock_verifier(user: &str) -> ScramVerifier {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        k
    });
    let digest = scram::hmac(key, user.as_bytes());
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&digest[..SALT_LEN]);
    ScramVerifier {
        iterations: DEFAULT_ITERATIONS,
        salt: salt.to_vec(),
        stored_key: scram::hmac(&digest, b"Stored Key"),
        server_key: scram::hmac(&digest, b"Server Key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_classification() {
        assert!(
            matches!(Secret::parse("md553f48b7c4b76a86ce72276c5755f217d"), Secret::Md5(h) if h == "53f48b7c4b76a86ce72276c5755f217d")
        );
        let v = ScramVerifier::generate("x").to_string();
        assert!(matches!(Secret::parse(&v), Secret::Scram(_)));
        assert!(matches!(Secret::parse("hunter2"), Secret::Plain(p) if p == "hunter2"));
        assert!(matches!(Secret::parse("md5notahash"), Secret::Plain(_)));
        assert!(matches!(
            Secret::parse("SCRAM-SHA-256$broken"),
            Secret::Plain(_)
        ));
        assert!(Secret::malformed_hash_warning("SCRAM-SHA-256$broken").is_some());
        assert!(Secret::malformed_hash_warning("md553F48B7C4B76A86CE72276C5755F217D").is_some());
        assert!(Secret::malformed_hash_warning("hunter2").is_none());
        assert!(Secret::malformed_hash_warning(&v).is_none());
        assert!(!format!("{:?}", Secret::parse("hunter2")).contains("hunter2"));
    }

    #[test]
    fn plain_password_gets_all_forms() {
        let c = StoredCredential::new("postgres", "secret");
        assert_eq!(c.plain(), Some("secret"));
        assert_eq!(c.md5_hash(), Some("53f48b7c4b76a86ce72276c5755f217d"));
        let v = c.scram().unwrap();
        assert_eq!(v, &ScramVerifier::derive("secret", &v.salt, v.iterations));
        assert!(!format!("{c:?}").contains("secret\""));
    }

    #[test]
    fn cache_derives_once_and_shares() {
        let cache = Arc::new(CredentialCache::new());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || cache.get("alice", "pw"))
            })
            .collect();
        let creds: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for c in &creds {
            assert!(Arc::ptr_eq(c, &creds[0]));
        }
        assert_eq!(cache.len(), 1);
        assert!(!Arc::ptr_eq(&cache.get("bob", "pw"), &creds[0]));
        assert!(!Arc::ptr_eq(&cache.get("alice", "pw2"), &creds[0]));
        cache.retain(|u, _| u == "bob");
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn salted_password_cache_hits() {
        let cache = SaltedPasswordCache::new();
        let sp = cache
            .salted_password("pencil", b"salt", 4096)
            .await
            .unwrap();
        assert_eq!(sp, scram::salted_password("pencil", b"salt", 4096));
        assert_eq!(cache.get("pencil", b"salt", 4096), Some(sp));
        assert_eq!(cache.get("pencil", b"salt", 4097), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn mock_verifier_is_stable_per_user() {
        assert_eq!(mock_verifier("ghost"), mock_verifier("ghost"));
        assert_ne!(mock_verifier("ghost").salt, mock_verifier("casper").salt);
        assert_eq!(mock_verifier("ghost").salt.len(), SALT_LEN);
    }
}
