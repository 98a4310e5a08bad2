//! Where a client's credential comes from besides `[users]`: the files named in the
//! config ([`AuthFiles`]: `auth_file` and `auth_hba_file`, loaded at start and by
//! `check-config`), and secrets fetched from the server with `auth_query`
//! ([`AuthQueryCache`]: kept `auth_query_cache_ttl`, fetched once for concurrent logins
//! of the same user).
//!
//! The cache does not fetch by itself: the caller passes the fetch (a query through the
//! `auth_user` pool of the database), so that this module stays below `pool` and
//! `server`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::hba::HbaRules;
use super::userlist::UserList;
use super::StoredCredential;
use crate::config::{ClientSslMode, Config, ConfigError, Problem};

/// The contents of `auth_file` and `auth_hba_file`.
#[derive(Clone, Debug, Default)]
pub struct AuthFiles {
    pub users: Option<UserList>,
    pub hba: Option<HbaRules>,
}

impl AuthFiles {
    /// Reads and parses the files `config` names (paths as given: [`Config::from_file`]
    /// has made relative ones relative to the config file). Every problem is reported.
    pub fn load(config: &Config) -> Result<AuthFiles, ConfigError> {
        let g = &config.pgtide;
        let mut problems = Vec::new();
        let mut files = AuthFiles::default();
        if !g.auth_file.is_empty() {
            match UserList::load(&g.auth_file) {
                Ok(u) => files.users = Some(u),
                Err(message) => problems.push(Problem {
                    key: "pgtide.auth_file".into(),
                    message,
                }),
            }
        }
        if !g.auth_hba_file.is_empty() {
            match HbaRules::load(&g.auth_hba_file) {
                Ok(h) => {
                    let tls = g.client_tls_sslmode != ClientSslMode::Disable;
                    let client_certificates = tls && !g.client_tls_ca_file.is_empty();
                    for message in h.tls_problems(tls, client_certificates) {
                        problems.push(Problem {
                            key: "pgtide.auth_hba_file".into(),
                            message: format!("{}: {message}", g.auth_hba_file),
                        });
                    }
                    files.hba = Some(h);
                }
                Err(message) => problems.push(Problem {
                    key: "pgtide.auth_hba_file".into(),
                    message,
                }),
            }
        }
        if problems.is_empty() {
            Ok(files)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Most (database, user) entries the cache holds; beyond it, expired ones are dropped.
const MAX_ENTRIES: usize = 10_000;

struct Cached {
    /// The secret as the query returned it, to tell a changed one.
    secret: String,
    cred: Arc<StoredCredential>,
    fetched: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// What a lookup found.
#[derive(Clone, Debug)]
pub struct Looked {
    /// `None`: no such user, or no usable secret (NULL: expired `VALID UNTIL`, ...).
    pub cred: Option<Arc<StoredCredential>>,
    /// Whether it was fetched for this lookup (not taken from the cache).
    pub fresh: bool,
}

/// Secrets fetched with `auth_query`, per (database, user), kept for `ttl`. Only found
/// secrets are cached: an unknown user is looked up at every login, so that a role
/// created a moment ago can log in at once.
pub struct AuthQueryCache {
    ttl: Duration,
    map: Mutex<HashMap<(String, String), Slot>>,
}

impl AuthQueryCache {
    /// `ttl` zero: every lookup fetches.
    pub fn new(ttl: Duration) -> Self {
        AuthQueryCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, database: &str, user: &str) -> Slot {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (database.to_owned(), user.to_owned());
        if !map.contains_key(&key) && map.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            map.retain(|_, slot| match slot.try_lock() {
                Ok(g) => g.as_ref().is_some_and(|c| c.fetched.elapsed() < ttl),
                // In use by a login right now.
                Err(_) => true,
            });
        }
        map.entry(key).or_default().clone()
    }

    /// The secret of `user` for `database`: from the cache while it is younger than the
    /// ttl, else from `fetch` (which returns the secret string, `None` for no user or a
    /// NULL secret). Concurrent lookups of the same key wait for one fetch.
    pub async fn get<F, Fut>(&self, database: &str, user: &str, fetch: F) -> Result<Looked, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<String>, String>>,
    {
        let slot = self.slot(database, user);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.fetched.elapsed() < self.ttl {
                return Ok(Looked {
                    cred: Some(c.cred.clone()),
                    fresh: false,
                });
            }
        }
        self.fill(&mut cached, user, fetch().await?)
    }

    /// Fetches again, whatever the cache holds (after a failed login against a cached
    /// secret). Returns the new lookup and whether the secret changed.
    pub async fn refetch<F, Fut>(
        &self,
        database: &str,
        user: &str,
        fetch: F,
    ) -> Result<(Looked, bool), String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<String>, String>>,
    {
        let slot = self.slot(database, user);
        let mut cached = slot.lock().await;
        let before = cached.as_ref().map(|c| c.secret.clone());
        let secret = fetch().await?;
        let changed = before != secret;
        Ok((self.fill(&mut cached, user, secret)?, changed))
    }

    fn fill(
        &self,
        cached: &mut Option<Cached>,
        user: &str,
        secret: Option<String>,
    ) -> Result<Looked, String> {
        let Some(secret) = secret.filter(|s| !s.is_empty()) else {
            *cached = None;
            return Ok(Looked {
                cred: None,
                fresh: true,
            });
        };
        let cred = match cached.as_ref() {
            // Same secret: keep the parsed credential (and its derived verifier).
            Some(c) if c.secret == secret => c.cred.clone(),
            _ => Arc::new(StoredCredential::new(user, &secret)),
        };
        *cached = (!self.ttl.is_zero()).then(|| Cached {
            secret,
            cred: cred.clone(),
            fetched: Instant::now(),
        });
        Ok(Looked {
            cred: Some(cred),
            fresh: true,
        })
    }

    /// Entries held now (including expired ones not yet dropped).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An hba file whose lines need client TLS, loaded with `client_tls_sslmode` `mode`
    /// and a client CA or not: the problems reported.
    fn hba_problems(mode: ClientSslMode, ca: bool) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg_hba.conf");
        std::fs::write(
            &path,
            "host all all 10.0.0.0/8 md5\nhostssl all all all scram-sha-256\nhostssl all alice all cert\n",
        )
        .unwrap();
        let mut config = Config::default();
        config.pgtide.auth_hba_file = path.display().to_string();
        config.pgtide.client_tls_sslmode = mode;
        if ca {
            config.pgtide.client_tls_ca_file = "/etc/ssl/ca.pem".into();
        }
        match AuthFiles::load(&config) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .problems
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
        }
    }

    #[test]
    fn hba_lines_that_cannot_work_without_client_tls_are_refused() {
        let p = hba_problems(ClientSslMode::Disable, false);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("pgtide.auth_hba_file: /"), "{p:?}");
        assert!(p[0].ends_with("pg_hba.conf: line 2: a hostssl line cannot match while client TLS is off (client_tls_sslmode = \"disable\"); set client_tls_sslmode and its certificate files, or make it a host line"), "{p:?}");
        assert!(
            p[1].contains("line 3: a hostssl line cannot match"),
            "{p:?}"
        );
        let p = hba_problems(ClientSslMode::Prefer, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].ends_with("line 3: method cert needs client certificates, and pgtide asks for none without client_tls_ca_file; set client_tls_ca_file"), "{p:?}");
        assert_eq!(
            hba_problems(ClientSslMode::Require, true),
            Vec::<String>::new()
        );
    }

    const MD5_A: &str = "md545f2603610af569b6155c45067268c6b";
    const MD5_B: &str = "md553f48b7c4b76a86ce72276c5755f217d";

    #[tokio::test]
    async fn cached_for_ttl_and_refetched_on_demand() {
        let cache = AuthQueryCache::new(Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let fetch = |s: Option<&'static str>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(s.map(str::to_string)) }
        };
        let a = cache.get("db", "u", || fetch(Some(MD5_A))).await.unwrap();
        assert!(a.fresh);
        let b = cache.get("db", "u", || fetch(Some(MD5_B))).await.unwrap();
        assert!(!b.fresh);
        assert_eq!(b.cred.unwrap().md5_hash(), Some(&MD5_A[3..]));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another database is another entry.
        let c = cache.get("db2", "u", || fetch(Some(MD5_B))).await.unwrap();
        assert!(c.fresh);
        let (d, changed) = cache
            .refetch("db", "u", || fetch(Some(MD5_B)))
            .await
            .unwrap();
        assert!(changed);
        assert_eq!(d.cred.unwrap().md5_hash(), Some(&MD5_B[3..]));
        let (_, changed) = cache
            .refetch("db", "u", || fetch(Some(MD5_B)))
            .await
            .unwrap();
        assert!(!changed);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn unknown_users_and_zero_ttl_are_not_cached() {
        let cache = AuthQueryCache::new(Duration::from_secs(60));
        let r = cache
            .get("db", "ghost", || async { Ok(None) })
            .await
            .unwrap();
        assert!(r.cred.is_none());
        let r = cache
            .get("db", "ghost", || async { Ok(Some(MD5_A.to_string())) })
            .await
            .unwrap();
        assert!(r.fresh && r.cred.is_some());
        let nocache = AuthQueryCache::new(Duration::ZERO);
        for _ in 0..2 {
            let r = nocache
                .get("db", "u", || async { Ok(Some(MD5_A.to_string())) })
                .await
                .unwrap();
            assert!(r.fresh);
        }
        let e = nocache
            .get("db", "u", || async { Err("boom".to_string()) })
            .await
            .unwrap_err();
        assert_eq!(e, "boom");
    }
}
