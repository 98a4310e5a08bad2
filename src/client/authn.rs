//! Client authentication at login, once the user and database are known: the
//! `auth_hba_file` decision, the credential (config, `auth_file`, or `auth_query` through
//! the `auth_user` pool of the database), the exchange, one re-fetch when a cached
//! `auth_query` secret fails, the failed-login slowdown, and what a successful login
//! teaches the pool's server logins (SCRAM pass-through).
//!
//! Logged: each failed login (user, database, client address and why) at info level,
//! an address entering the slowdown at warn level, auth_query failures at warn level.
//! Never logged: passwords, hashes, verifiers, ClientKeys.

use std::sync::Arc;

use crate::stream::Stream;

use crate::auth::hba::HbaMethod;
use crate::auth::Peer;
use crate::auth::{self, AuthError, Method, StoredCredential};
use crate::protocol::sqlstate;
use crate::shared::Shared;
use crate::stream::send_fatal;

/// How a connection attempt ended without a session.
pub(super) enum NoSession {
    /// A CancelRequest (handled), or the client went away.
    Done,
    /// A FATAL was sent, or the client broke the protocol.
    Refused,
    /// An admin user logged in to the admin console (nothing sent yet after the
    /// authentication exchange).
    Admin {
        user: String,
        /// `pgtide` or `pgbouncer`, as the client asked.
        database: String,
        application_name: String,
        /// The client's connection: set by [`login`], which owns it.
        stream: Option<Stream>,
    },
}

/// Where the credential of a login came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// `[users]` or `auth_file`.
    Static,
    /// `auth_query`; `fresh` when fetched for this login rather than from the cache.
    Query { fresh: bool },
}

/// The "no encryption" / "SSL encryption" tail of PostgreSQL's hba messages.
fn encryption(peer: &Peer) -> &'static str {
    if peer.tls {
        "SSL encryption"
    } else {
        "no encryption"
    }
}

/// Refuses the login with FATAL 28000 (an hba rule, a missing or wrong certificate).
async fn refuse(stream: &mut Stream, message: &str) -> NoSession {
    send_fatal(
        stream,
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        message,
        None,
    )
    .await;
    NoSession::Refused
}

/// Authenticates `user` for `database`. On error the client has been told why (FATAL).
pub(super) async fn authenticate(
    stream: &mut Stream,
    shared: &Arc<Shared>,
    peer: &Peer,
    database: &str,
    user: &str,
) -> Result<(), NoSession> {
    let config = shared.config().clone();
    let host = peer.addr.ip().to_canonical();

    // 1. Which method: the first matching hba line, else auth_type.
    let files = shared.auth_files();
    let method: Method = match &files.hba {
        None => config.auth_type(user).into(),
        Some(hba) => {
            let Some(rule) = hba.find(peer, database, user) else {
                tracing::info!(%user, %database, client = %host, "login refused: no auth_hba_file line matches");
                let m = format!(
                    "no pg_hba.conf entry for host \"{host}\", user \"{user}\", database \"{database}\", {}",
                    encryption(peer)
                );
                return Err(refuse(stream, &m).await);
            };
            match rule.method {
                HbaMethod::Reject => {
                    tracing::info!(%user, %database, client = %host, line = rule.line, "login refused: auth_hba_file line says reject");
                    let m = format!(
                        "pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{database}\", {}",
                        encryption(peer)
                    );
                    return Err(refuse(stream, &m).await);
                }
                HbaMethod::Cert => Method::Cert,
                HbaMethod::Trust => Method::Trust,
                HbaMethod::Md5 => Method::Md5,
                HbaMethod::ScramSha256 => Method::ScramSha256,
                HbaMethod::Password => Method::Password,
            }
        }
    };

    // A verified client certificate whose CN is the user name proves who the client is
    // (auth_type "cert", or an hba line with method cert): no password exchange.
    if method == Method::Cert {
        if peer.cert_common_name.as_deref() == Some(user) {
            return Ok(());
        }
        tracing::info!(%user, %database, client = %host, "login refused: no client certificate for this user");
        let m = if peer.cert_common_name.is_none() {
            "connection requires a valid client certificate".to_string()
        } else {
            format!("certificate authentication failed for user \"{user}\"")
        };
        shared.credentials().failed_logins.record_failure(host);
        shared.metrics().auth_failures.inc();
        return Err(refuse(stream, &m).await);
    }

    // 2. The credential.
    let static_cred = shared.credential(user);
    let known_static = shared.is_static_user(user);
    let query = config
        .databases
        .contains_key(database)
        .then(|| config.auth_query(database))
        .flatten();
    let (mut cred, source) = match (&static_cred, query) {
        (Some(c), _) => (Some(c.clone()), Source::Static),
        (None, Some(_)) if known_static && method == Method::Trust => (None, Source::Static),
        (None, Some((auth_user, sql))) => {
            let looked = shared
                .credentials()
                .auth_cache
                .get(database, user, || {
                    fetch_secret(shared, database, auth_user, sql, user)
                })
                .await;
            match looked {
                Ok(l) => (l.cred, Source::Query { fresh: l.fresh }),
                Err(e) => return Err(lookup_failed(stream, user, database, &e).await),
            }
        }
        (None, None) => (None, Source::Static),
    };
    let known = cred.is_some() || (known_static && source == Source::Static);
    if known && method == Method::Trust {
        return Ok(());
    }
    // Unknown users go through a full exchange that fails, revealing nothing.
    let method = match method {
        m if known => m,
        Method::Password => Method::Password,
        _ => Method::ScramSha256,
    };
    let cred_for_exchange = if known { cred.clone() } else { None };

    // 3. The exchange, then the judgement (re-fetched once if a cached secret fails).
    let max = config.pgtide.max_message_size as usize;
    let result = match auth::read_client_response(
        stream,
        method,
        user,
        cred_for_exchange.as_deref(),
        max,
    )
    .await
    {
        Err(AuthError::Io(_)) => return Err(NoSession::Done),
        Err(e) => Err(e),
        Ok(response) => {
            let mut r = response.verify(user, cred_for_exchange.as_deref()).await;
            if matches!(r, Err(AuthError::Failed)) && source == (Source::Query { fresh: false }) {
                if let Some((auth_user, sql)) = query {
                    let refetched = shared
                        .credentials()
                        .auth_cache
                        .refetch(database, user, || {
                            fetch_secret(shared, database, auth_user, sql, user)
                        })
                        .await;
                    match refetched {
                        // A changed secret: md5 and clear-text answers can be judged
                        // again; a SCRAM proof is bound to the salt already sent, so that
                        // login fails and the next one uses the new secret.
                        Ok((l, true)) => {
                            tracing::info!(%user, %database, "the auth_query secret changed since it was cached; cache refreshed");
                            cred = l.cred;
                            r = response.verify(user, cred.as_deref()).await;
                        }
                        Ok((_, false)) => {}
                        Err(e) => return Err(lookup_failed(stream, user, database, &e).await),
                    }
                }
            }
            r
        }
    };

    // 4. The answer, late for an address that keeps failing (whatever the outcome, so
    //    that a right guess cannot be told by its speed).
    let delay = shared.credentials().failed_logins.delay(host);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match result {
        Ok(verified) => {
            shared.credentials().failed_logins.record_success(host);
            if let Some(c) = cred.as_deref() {
                learn_server_secret(shared, database, user, c, &verified);
            }
            if let Err(e) = auth::send_success(stream, &verified).await {
                tracing::debug!(%user, error = %e, "client left during authentication");
                return Err(NoSession::Done);
            }
            Ok(())
        }
        Err(e) => {
            let failures = shared.credentials().failed_logins.record_failure(host);
            shared.metrics().auth_failures.inc();
            let reason = match &e {
                AuthError::Failed if !known => "unknown user or no usable password",
                AuthError::Failed => "wrong password",
                _ => "protocol violation",
            };
            tracing::info!(%user, %database, client = %host, %method, reason, detail = %e, "login failed");
            if shared.credentials().failed_logins.is_threshold(failures) {
                tracing::warn!(client = %host, failures, "client address keeps failing logins: its logins are now slowed down (auth_failure_delay)");
            }
            auth::send_failure(stream, e, user).await;
            Err(NoSession::Refused)
        }
    }
}

/// After a successful login with a credential that has no plain password: keep what the
/// login proved for the pool's server logins. A ClientKey (SCRAM pass-through), a
/// clear-text password, or the md5 hash itself (for md5 servers).
fn learn_server_secret(
    shared: &Shared,
    database: &str,
    user: &str,
    cred: &StoredCredential,
    verified: &auth::Verified,
) {
    if cred.has_plain() {
        return;
    }
    let learned = if let Some(p) = &verified.password {
        StoredCredential::plain_for_server(user, p)
    } else if let (Some(key), Some(v)) = (verified.client_key, cred.scram()) {
        StoredCredential::with_client_key(v.clone(), key)
    } else if cred.md5_hash().is_some() {
        cred.clone()
    } else {
        return;
    };
    shared.server_secret(database, user).set(Arc::new(learned));
}

async fn lookup_failed(stream: &mut Stream, user: &str, database: &str, e: &str) -> NoSession {
    tracing::warn!(%user, %database, error = %e, "auth_query lookup failed");
    send_fatal(
        stream,
        sqlstate::CONNECTION_FAILURE,
        &format!("pgtide could not look up the password of user \"{user}\": the auth_query failed"),
        Some("the pgtide log says why"),
    )
    .await;
    NoSession::Refused
}

/// Runs `sql` with `$1` = `user` as `auth_user` on `database`, and returns the second
/// column of the first row (`None` for no row or NULL).
async fn fetch_secret(
    shared: &Arc<Shared>,
    database: &str,
    auth_user: &str,
    sql: &str,
    user: &str,
) -> Result<Option<String>, String> {
    let pool = shared
        .primary_pool(database, auth_user)
        .ok_or_else(|| format!("database {database:?} is not configured"))?;
    let timeout = shared.internal_timeout();
    let mut conn = pool.checkout(timeout).await.map_err(|e| {
        format!("cannot connect as auth_user {auth_user:?} to database {database:?}: {e}")
    })?;
    match conn.run_internal_params(sql, &[Some(user)], timeout).await {
        Ok(r) => {
            conn.checkin();
            if let Some((code, message)) = r.error {
                return Err(format!(
                    "auth_query as auth_user {auth_user:?} failed: {message} (SQLSTATE {code})"
                ));
            }
            match r.rows.first() {
                None => Ok(None),
                Some(row) if row.len() >= 2 => Ok(row[1].clone()),
                Some(row) => Err(format!(
                    "auth_query returned {} column(s); it must return two: the user name and the password secret",
                    row.len()
                )),
            }
        }
        Err(e) => {
            conn.discard();
            Err(format!("auth_query as auth_user {auth_user:?} failed: {e}"))
        }
    }
}
