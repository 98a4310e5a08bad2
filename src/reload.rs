//! Live reload (SIGHUP, the admin console's `RELOAD`): read the configuration file again,
//! validate it, and apply it without dropping connected clients.
//!
//! What applies live: pool sizes and modes (existing pools resize: surplus idle servers
//! close now, busy ones when released), timeouts, users and passwords, databases added
//! or removed, hosts and their roles (the monitors of a database whose hosts or health
//! settings changed are rebuilt), routing settings, `admin_users`. A pool whose server
//! side changed (host, port, dbname, the user's password) is replaced: its connections
//! close as they are released and new ones use the new settings. Clients of a removed
//! database or user are disconnected.
//!
//! The `auth_file` and `auth_hba_file` are read again too; a file that does not load
//! refuses the reload like an invalid config.
//!
//! What needs a restart: `listen`, `metrics_listen`, the prepared-statement cache
//! sizes, `auth_query_cache_ttl` and the failed-login slowdown settings; a change to them
//! is reported and the running value stays.
//!
//! An invalid file changes nothing: the reason is logged and returned.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::sources::AuthFiles;
use crate::client::Shared;
use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};

/// Where the running configuration came from, and the command-line overrides to apply
/// again on every reload.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<String>,
}

impl ConfigSource {
    /// A source with no command-line overrides.
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            path: path.into(),
            listen: None,
            metrics_listen: None,
        }
    }

    /// Reads and validates the file and applies the overrides.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::from_file(&self.path)?;
        if let Some(l) = self.listen {
            config.pgtide.listen = l;
        }
        if let Some(m) = &self.metrics_listen {
            config.pgtide.metrics_listen = m.clone();
        }
        Ok(config)
    }
}

/// Reads the configuration file again and applies it. `Ok` describes what changed; `Err`
/// says why nothing was applied.
pub async fn reload(shared: &Arc<Shared>) -> Result<String, String> {
    // Certificates and keys are read again in every mode (a file that cannot be used
    // keeps the previous certificates in force; the error is logged).
    let tls = shared.tls.reload();
    let Some(source) = shared.admin.source() else {
        let msg = "pgtide runs in zero-config mode (--upstream / DATABASE_URL): there is no configuration file to reload (TLS files were read again)".to_string();
        tracing::warn!("reload: {msg}");
        return Err(msg);
    };
    let _one_at_a_time = shared.admin.reload_lock.lock().await;
    let loaded = source
        .load()
        .and_then(|c| crate::auth::sources::AuthFiles::load(&c).map(|files| (c, files)));
    let (mut new, files) = match loaded {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "{} is invalid; the running configuration stays in force: {}",
                source.path.display(),
                e.problems
                    .iter()
                    .map(|p| if p.key.is_empty() {
                        p.message.clone()
                    } else {
                        format!("{}: {}", p.key, p.message)
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            tracing::warn!("reload refused: {msg}");
            return Err(msg);
        }
    };
    let old = shared.config().clone();
    let mut restart = Vec::new();
    {
        let (o, n) = (&old.pgtide, &mut new.pgtide);
        if o.listen != n.listen {
            restart.push(format!("listen ({} -> {})", o.listen, n.listen));
            n.listen = o.listen;
        }
        if o.metrics_listen != n.metrics_listen {
            restart.push(format!(
                "metrics_listen ({:?} -> {:?})",
                o.metrics_listen, n.metrics_listen
            ));
            n.metrics_listen = o.metrics_listen.clone();
        }
        if o.prepared_statement_cache_size != n.prepared_statement_cache_size {
            restart.push("prepared_statement_cache_size".into());
            n.prepared_statement_cache_size = o.prepared_statement_cache_size;
        }
        if o.prepared_statement_cache_bytes != n.prepared_statement_cache_bytes {
            restart.push("prepared_statement_cache_bytes".into());
            n.prepared_statement_cache_bytes = o.prepared_statement_cache_bytes;
        }
        // The TLS holder was built from these; the files themselves are read again below.
        let client_tls = |g: &crate::config::General| {
            (
                g.client_tls_sslmode,
                g.client_tls_cert_file.clone(),
                g.client_tls_key_file.clone(),
                g.client_tls_ca_file.clone(),
            )
        };
        if client_tls(o) != client_tls(n) {
            restart.push("client_tls_* settings".into());
            n.client_tls_sslmode = o.client_tls_sslmode;
            n.client_tls_cert_file = o.client_tls_cert_file.clone();
            n.client_tls_key_file = o.client_tls_key_file.clone();
            n.client_tls_ca_file = o.client_tls_ca_file.clone();
        }
        let server_tls = |g: &crate::config::General| {
            (
                g.server_tls_sslmode,
                g.server_tls_ca_file.clone(),
                g.server_tls_cert_file.clone(),
                g.server_tls_key_file.clone(),
            )
        };
        if server_tls(o) != server_tls(n) {
            restart.push("server_tls_* settings".into());
            n.server_tls_sslmode = o.server_tls_sslmode;
            n.server_tls_ca_file = o.server_tls_ca_file.clone();
            n.server_tls_cert_file = o.server_tls_cert_file.clone();
            n.server_tls_key_file = o.server_tls_key_file.clone();
        }
        if o.worker_threads != n.worker_threads {
            restart.push("worker_threads".into());
            n.worker_threads = o.worker_threads;
        }
        if o.collect_metrics != n.collect_metrics {
            restart.push("collect_metrics".into());
            n.collect_metrics = o.collect_metrics;
        }
        if o.auth_query_cache_ttl != n.auth_query_cache_ttl {
            restart.push("auth_query_cache_ttl".into());
            n.auth_query_cache_ttl = o.auth_query_cache_ttl;
        }
        if (
            o.auth_failure_threshold,
            o.auth_failure_delay,
            o.auth_failure_delay_max,
        ) != (
            n.auth_failure_threshold,
            n.auth_failure_delay,
            n.auth_failure_delay_max,
        ) {
            restart.push(
                "auth_failure_threshold / auth_failure_delay / auth_failure_delay_max".into(),
            );
            n.auth_failure_threshold = o.auth_failure_threshold;
            n.auth_failure_delay = o.auth_failure_delay;
            n.auth_failure_delay_max = o.auth_failure_delay_max;
        }
    }
    let changes = describe_changes(&old, &new);
    // Deriving SCRAM verifiers of new passwords is CPU work: off the async workers.
    let on = shared.clone();
    let applied = tokio::task::spawn_blocking(move || apply(&on, &old, new, files)).await;
    if let Err(e) = applied {
        tracing::error!(error = %e, "reload: applying the configuration failed");
        return Err(format!("applying the configuration failed: {e}"));
    }

    let mut summary = if changes.is_empty() {
        "configuration reloaded: nothing changed".to_string()
    } else {
        format!("configuration reloaded: {}", changes.join("; "))
    };
    if let Err(e) = tls {
        summary.push_str(&format!(
            "; TLS files not reloaded, the previous certificates stay in use: {e}"
        ));
    }
    if !restart.is_empty() {
        summary.push_str(&format!(
            "; not applied, needs a restart: {}",
            restart.join(", ")
        ));
        tracing::warn!(settings = %restart.join(", "), "reload: these settings need a restart to change");
    }
    tracing::info!(file = %source.path.display(), "{summary}");
    Ok(summary)
}

/// Applies a validated configuration: credentials, the config itself, clusters, pools.
fn apply(shared: &Arc<Shared>, old: &Config, new: Config, files: AuthFiles) {
    // Verifiers of new or changed passwords are derived now, not during a login.
    for (user, u) in &new.users {
        if let Some(p) = &u.password {
            shared.credentials.get(user, p);
        }
    }
    let new = Arc::new(new);
    shared.store_config(new.clone());
    shared.credentials.retain(|user, configured| {
        new.users
            .get(user)
            .and_then(|u| u.password.as_deref())
            .is_some_and(|p| p == configured)
            || files
                .users
                .as_ref()
                .and_then(|l| l.get(user).flatten())
                .is_some_and(|p| p == configured)
    });
    // auth_file and auth_hba_file: later logins use the new contents, and pools whose
    // user's password changed log in to servers with the new one.
    let old_file_users = crate::client::file_users(&shared.auth_files());
    shared.set_auth_files(files);
    let file_users = crate::client::file_users(&shared.auth_files());

    // Clusters: kept when nothing about their hosts or monitoring changed.
    let current = shared.clusters();
    let mut clusters = HashMap::new();
    for (name, d) in &new.databases {
        if d.host_list().len() < 2 {
            continue;
        }
        let unchanged = current.get(name).is_some_and(|_| {
            old.cluster_settings(name, "").map(|s| (s.hosts, s.health))
                == new.cluster_settings(name, "").map(|s| (s.hosts, s.health))
                && monitor_login(old, name) == monitor_login(&new, name)
                && old_file_users == file_users
        });
        let cluster = match current.get(name) {
            Some(c) if unchanged => Some(c.clone()),
            _ => Cluster::from_config(
                &new,
                name,
                shared.salted.clone(),
                &file_users,
                shared.tls.server(name),
            ),
        };
        if let Some(c) = cluster {
            clusters.insert(name.clone(), c);
        }
    }
    drop(current);
    shared.replace_clusters(clusters);

    // Pools: resized in place when their server side is the same, else replaced.
    shared.retire_pools(|(db, user, host), pool| {
        let same = (shared.is_static_user(user) || new.auth_query(db).is_some())
            && shared
                .pool_target(&new, db, user, *host)
                .is_some_and(|(t, _)| {
                    let o = pool.target();
                    t.host == o.host
                        && t.port == o.port
                        && t.dbname == o.dbname
                        && password(old, user) == password(&new, user)
                });
        !same
    });
    for pool in shared.pools() {
        if let Some((_, timeouts)) = shared.pool_target(&new, &pool.database, &pool.user, 0) {
            pool.update(new.pool_settings(&pool.database, &pool.user), timeouts);
        }
    }
    for db in new.databases.keys() {
        if let Some(limit) = shared.db_limit(db) {
            limit.set_max(new.pool_settings(db, "").max_db_connections);
        }
    }

    // Clients of a removed database or user have nothing left to run on.
    for (_, c) in shared.admin.clients.snapshot() {
        if crate::admin::is_admin_database(&c.database) {
            if !new.pgtide.admin_users.contains(&c.user) {
                c.kill();
            }
            continue;
        }
        let user_known = shared.is_static_user(&c.user) || new.auth_query(&c.database).is_some();
        if !new.databases.contains_key(&c.database) || !user_known {
            c.kill();
        }
    }
}

fn password<'a>(config: &'a Config, user: &str) -> Option<&'a str> {
    config.users.get(user).and_then(|u| u.password.as_deref())
}

/// What the monitors of `database` log in with (see `Cluster::from_config`): changes to
/// it rebuild them.
type MonitorLogin = (Option<String>, String, Option<String>);

fn monitor_login(config: &Config, database: &str) -> Option<MonitorLogin> {
    use crate::auth::Secret;
    let d = config.databases.get(database)?;
    // The same choice as Cluster::from_config: the first user whose password can log in
    // to a server, else the first user.
    let can_log_in = |p: &Option<String>| {
        p.as_deref()
            .is_some_and(|p| !matches!(Secret::parse(p), Secret::Scram(_)))
    };
    let (user, u) = config
        .users
        .iter()
        .find(|(_, u)| can_log_in(&u.password))
        .or_else(|| config.users.iter().next())?;
    Some((d.dbname.clone(), user.clone(), u.password.clone()))
}

/// A line per change, for the log and the RELOAD reply. Passwords are never shown.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let table = |g: &crate::config::General| {
        toml::Value::try_from(g)
            .ok()
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default()
    };
    let (o, n) = (table(&old.pgtide), table(&new.pgtide));
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    for k in keys {
        if o.get(k) != n.get(k) {
            let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
            out.push(format!("{k}: {} -> {}", show(o.get(k)), show(n.get(k))));
        }
    }
    for name in new.databases.keys() {
        match old.databases.get(name) {
            None => out.push(format!("database {name} added")),
            Some(d) if format!("{d:?}") != format!("{:?}", new.databases[name]) => {
                out.push(format!("database {name} changed"))
            }
            Some(_) => {}
        }
    }
    for name in old.databases.keys() {
        if !new.databases.contains_key(name) {
            out.push(format!("database {name} removed"));
        }
    }
    for (name, u) in &new.users {
        match old.users.get(name) {
            None => out.push(format!("user {name} added")),
            Some(ou) => {
                if ou.password != u.password {
                    out.push(format!("user {name}: password changed"));
                }
                let strip = |u: &crate::config::User| crate::config::User {
                    password: None,
                    ..u.clone()
                };
                if format!("{:?}", strip(ou)) != format!("{:?}", strip(u)) {
                    out.push(format!("user {name} changed"));
                }
            }
        }
    }
    for name in old.users.keys() {
        if !new.users.contains_key(name) {
            out.push(format!("user {name} removed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml_str(text).expect("valid")
    }

    #[test]
    fn changes_are_described_without_passwords() {
        let old = config(
            "[pgtide]\npool_size = 5\n[databases.app]\n[databases.gone]\n[users.alice]\npassword = \"s3cret\"\n[users.bob]\npassword = \"x\"\n",
        );
        let new = config(
            "[pgtide]\npool_size = 7\n[databases.app]\nport = 5433\n[databases.new]\n[users.alice]\npassword = \"t0psecret\"\n[users.carol]\npassword = \"y\"\n",
        );
        let c = describe_changes(&old, &new);
        let text = c.join("\n");
        for expected in [
            "pool_size: 5 -> 7",
            "database app changed",
            "database new added",
            "database gone removed",
            "user alice: password changed",
            "user carol added",
            "user bob removed",
        ] {
            assert!(
                c.iter().any(|l| l == expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        for secret in ["s3cret", "t0psecret", "\"x\"", "\"y\""] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
        assert!(describe_changes(&old, &old).is_empty());
    }

    #[test]
    fn the_monitoring_login_follows_the_clusters_choice() {
        let a =
            config("[databases.app]\n[users.a]\npassword = \"p\"\n[users.b]\npassword = \"q\"\n");
        let b = config(
            "[databases.app]\n[users.a]\npassword = \"p\"\n[users.b]\npassword = \"changed\"\n",
        );
        // Only user a's login is used by the monitors: b's password does not rebuild them.
        assert_eq!(monitor_login(&a, "app"), monitor_login(&b, "app"));
        let c =
            config("[databases.app]\n[users.a]\npassword = \"new\"\n[users.b]\npassword = \"q\"\n");
        assert_ne!(monitor_login(&a, "app"), monitor_login(&c, "app"));
    }
}
