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
//! What needs a restart is the table in [`crate::config::keys`]; a change to such a key
//! is reported and the running value stays.
//!
//! An invalid file changes nothing: the reason is logged and returned.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::auth::sources::AuthFiles;
use crate::config::{keys, Config};
use crate::shared::{pool_timeouts, Shared};

/// Reads the configuration file again and applies it. `Ok` describes what changed; `Err`
/// says why nothing was applied.
pub async fn reload(shared: &Arc<Shared>) -> Result<String, String> {
    // Certificates and keys are read again in every mode (a file that cannot be used
    // keeps the previous certificates in force; the error is logged).
    let tls = shared.tls().reload();
    let Some(source) = shared.source() else {
        let msg = "pgtide runs in zero-config mode (--upstream / DATABASE_URL): there is no configuration file to reload (TLS files were read again)".to_string();
        tracing::warn!("reload: {msg}");
        return Err(msg);
    };
    let _one_at_a_time = shared.reload_lock().lock().await;
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
    let restart = keys::keep_restart_settings(&old.pgtide, &mut new.pgtide);
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
            shared.credentials().cache.get(user, p);
        }
    }
    let new = Arc::new(new);
    shared.store_config(new.clone());
    // auth_file and auth_hba_file: later logins use the new contents, and pools whose
    // user's password changed log in to servers with the new one.
    let old_file_users = shared.credentials().file_users();
    shared.set_auth_files(files);
    shared.credentials().retain_configured(&new);
    let file_users = shared.credentials().file_users();

    // Clusters: kept when nothing about their hosts or monitoring changed.
    shared.rebuild_clusters(&new, |name| {
        old.cluster_settings(name, "").map(|s| (s.hosts, s.health))
            == new.cluster_settings(name, "").map(|s| (s.hosts, s.health))
            && monitor_login(old, name) == monitor_login(&new, name)
            && old_file_users == file_users
    });

    // Pools: updated in place when their server side is the same, else replaced.
    shared.retire_sets(|set| {
        let (db, user) = (set.database.as_str(), set.user.as_str());
        let known = shared.is_static_user(user) || new.auth_query(db).is_some();
        let same_servers = shared.pool_spec(&new, db, user).is_some_and(|spec| {
            let now = set.targets();
            spec.targets.len() == now.len()
                && spec
                    .targets
                    .iter()
                    .zip(&now)
                    .all(|(t, o)| t.host == o.host && t.port == o.port && t.dbname == o.dbname)
        });
        !(known && same_servers && password(old, user) == password(&new, user))
    });
    for set in shared.pool_sets() {
        let routing = new
            .cluster_settings(&set.database, &set.user)
            .filter(|s| s.hosts.len() > 1)
            .map(|s| s.routing);
        set.update(
            new.pool_settings(&set.database, &set.user),
            pool_timeouts(&new),
            routing,
        );
    }
    for db in new.databases.keys() {
        if let Some(limit) = shared.db_limit(db) {
            limit.set_max(new.pool_settings(db, "").max_db_connections);
        }
    }

    // Clients of a removed database or user have nothing left to run on.
    for (_, c) in shared.clients().snapshot() {
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
    // The same choice as Cluster::from_config.
    let can_log_in = |p: &str| !matches!(Secret::parse(p), Secret::Scram(_));
    let (user, password) = config.health_check_login(database, &[], can_log_in)?;
    Some((
        d.dbname.clone(),
        user.to_string(),
        password.map(str::to_string),
    ))
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
