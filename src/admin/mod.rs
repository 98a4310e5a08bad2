//! The admin console: the virtual database `pgtide` (also `pgbouncer`, for tools written
//! for PgBouncer) where the users in `admin_users` run `SHOW ...`, `PAUSE`, `RESUME`,
//! `RELOAD`, `RECONNECT`, `KILL` and `SHUTDOWN` over the simple query protocol.
//!
//! The console itself is [`console`]; the result sets of the SHOW commands are in
//! [`show`]; [`stats`] keeps `SHOW STATS`' averaging window up to date. What it reads and
//! changes (the registries, the PAUSE gate, the pools) is the hub's
//! ([`crate::shared::Shared`]).

pub mod console;
mod show;
pub mod stats;

/// True when `database` names the admin console.
pub fn is_admin_database(database: &str) -> bool {
    crate::config::ADMIN_DATABASES.contains(&database)
}
