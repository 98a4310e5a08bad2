//! Every credential pgtide holds, in one place: the configured passwords (parsed, SCRAM
//! verifiers derived once), the `auth_file` and `auth_hba_file` contents, the
//! `auth_query` cache, the failed-login table, and the [`ServerSecret`] each (database,
//! user) logs in to servers with.
//!
//! The configuration is passed in where a lookup needs it (the caller holds the one in
//! force), so that this module stays below the hub that swaps it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use super::sources::{AuthFiles, AuthQueryCache};
use super::throttle::FailedLogins;
use super::{CredentialCache, SaltedPasswordCache, ServerSecret, StoredCredential};
use crate::config::Config;

/// The credentials of a running pooler.
pub struct Credentials {
    /// Parsed configured passwords, with their derived SCRAM verifiers.
    pub cache: CredentialCache,
    /// Salted passwords of server logins (reconnects skip PBKDF2).
    pub salted: Arc<SaltedPasswordCache>,
    /// `auth_file` users and `auth_hba_file` rules; replaced by [`Self::set_auth_files`].
    auth_files: RwLock<Arc<AuthFiles>>,
    /// Secrets fetched with `auth_query`.
    pub auth_cache: AuthQueryCache,
    /// Consecutive failed logins per client address (the slowdown).
    pub failed_logins: FailedLogins,
    /// What the pools of (database, user) log in to servers with.
    server_secrets: Mutex<HashMap<(String, String), ServerSecret>>,
}

impl Credentials {
    /// The credentials of `config` and the files it names (`files`, loaded by
    /// [`AuthFiles::load`]). Derives every SCRAM verifier now, once, rather than during a
    /// login.
    pub fn new(config: &Config, files: AuthFiles) -> Credentials {
        let cache = CredentialCache::default();
        for (user, u) in &config.users {
            if let Some(password) = &u.password {
                cache.get(user, password);
            }
        }
        warm(&cache, &files);
        let g = &config.pgtide;
        Credentials {
            cache,
            salted: Arc::new(SaltedPasswordCache::default()),
            auth_files: RwLock::new(Arc::new(files)),
            auth_cache: AuthQueryCache::new(g.auth_query_cache_ttl.0),
            failed_logins: FailedLogins::new(
                g.auth_failure_threshold,
                g.auth_failure_delay.0,
                g.auth_failure_delay_max.0,
            ),
            server_secrets: Mutex::new(HashMap::new()),
        }
    }

    /// The configured credential of `user` (its `[users]` password, else its `auth_file`
    /// password), parsed (and for a plain password, its SCRAM verifier derived) once.
    pub fn credential(&self, config: &Config, user: &str) -> Option<Arc<StoredCredential>> {
        let password = config
            .users
            .get(user)
            .and_then(|u| u.password.as_deref())
            .map(str::to_owned)
            .or_else(|| {
                let files = self.auth_files();
                Some(files.users.as_ref()?.get(user).flatten()?.to_owned())
            })?;
        Some(self.cache.get(user, &password))
    }

    /// The current `auth_file` and `auth_hba_file` contents.
    pub fn auth_files(&self) -> Arc<AuthFiles> {
        self.auth_files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the `auth_file` and `auth_hba_file` contents (a reload): later logins
    /// use them, and pools of users whose configured credential changed log in to their
    /// servers with the new one. Runs PBKDF2 for new plain passwords: call it off the
    /// async workers (e.g. `spawn_blocking`).
    pub fn set_auth_files(&self, config: &Config, files: AuthFiles) {
        warm(&self.cache, &files);
        *self.auth_files.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(files);
        let secrets: Vec<((String, String), ServerSecret)> = self
            .server_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((_, user), secret) in secrets {
            if let Some(cred) = self.credential(config, &user) {
                let stale = secret.current().is_none_or(|old| {
                    old.plain() != cred.plain() || old.md5_hash() != cred.md5_hash()
                });
                // A SCRAM secret alone cannot log in: the next client login teaches it.
                if stale && (cred.has_plain() || cred.md5_hash().is_some()) {
                    secret.set(cred);
                }
            }
        }
    }

    /// Whether `user` is in `[users]` or the `auth_file` (with or without a password).
    pub fn is_static_user(&self, config: &Config, user: &str) -> bool {
        config.users.contains_key(user)
            || self
                .auth_files()
                .users
                .as_ref()
                .is_some_and(|l| l.get(user).is_some())
    }

    /// What the pools of (database, user) log in to servers with: the configured
    /// credential, or what a client's login taught pgtide (SCRAM pass-through).
    pub fn server_secret(&self, config: &Config, database: &str, user: &str) -> ServerSecret {
        self.server_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((database.to_string(), user.to_string()))
            .or_insert_with(|| ServerSecret::new(self.credential(config, user)))
            .clone()
    }

    /// The `auth_file` users and passwords in name order: the health monitors may log in
    /// as one of them.
    pub fn file_users(&self) -> Vec<(String, String)> {
        let mut users: Vec<(String, String)> = self
            .auth_files()
            .users
            .iter()
            .flat_map(|l| l.entries())
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        users.sort();
        users
    }

    /// Forgets derived verifiers of passwords no longer configured (a reload).
    pub fn retain_configured(&self, config: &Config) {
        let files = self.auth_files();
        self.cache.retain(|user, configured| {
            config
                .users
                .get(user)
                .and_then(|u| u.password.as_deref())
                .is_some_and(|p| p == configured)
                || files
                    .users
                    .as_ref()
                    .and_then(|l| l.get(user).flatten())
                    .is_some_and(|p| p == configured)
        });
    }
}

/// Derives the SCRAM verifier of every plain `auth_file` password once, now.
fn warm(cache: &CredentialCache, files: &AuthFiles) {
    if let Some(list) = &files.users {
        for (user, password) in list.entries() {
            cache.get(user, password);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::userlist::UserList;

    fn files(list: &str) -> AuthFiles {
        AuthFiles {
            users: Some(UserList::parse(list).unwrap()),
            hba: None,
        }
    }

    #[test]
    fn auth_file_users_and_a_reload_reach_the_pools_credentials() {
        let mut config = Config::default();
        config
            .databases
            .insert("app".into(), crate::config::Database::default());
        config.users.insert(
            "bob".into(),
            crate::config::User {
                password: Some("config wins".into()),
                ..Default::default()
            },
        );
        let creds = Credentials::new(
            &config,
            files("\"alice\" \"pw1\"\n\"bob\" \"file\"\n\"carol\" \"\"\n"),
        );
        assert!(creds.is_static_user(&config, "alice") && creds.is_static_user(&config, "carol"));
        assert!(!creds.is_static_user(&config, "dave"));
        assert_eq!(
            creds.credential(&config, "alice").unwrap().plain(),
            Some("pw1")
        );
        assert_eq!(
            creds.credential(&config, "bob").unwrap().plain(),
            Some("config wins")
        );
        assert!(creds.credential(&config, "carol").is_none());
        let secret = creds.server_secret(&config, "app", "alice");
        assert_eq!(secret.current().unwrap().plain(), Some("pw1"));

        creds.set_auth_files(&config, files("\"alice\" \"pw2\"\n"));
        assert_eq!(
            creds.credential(&config, "alice").unwrap().plain(),
            Some("pw2")
        );
        // The pool's handle sees the new password.
        assert_eq!(secret.current().unwrap().plain(), Some("pw2"));
        assert!(!creds.is_static_user(&config, "carol"));
    }
}
