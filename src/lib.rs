//! pgtide: a PostgreSQL connection pooler.
//!
//! The modules stand in floors, and a file imports only what stands below it (see
//! ARCHITECTURE.md; `integration/layers.rs` checks it):
//!
//! - top: [`listener`] (bind, accept, maintenance), [`demo`], [`import`] (a PgBouncer
//!   configuration into a pooler.toml);
//! - features: [`client`] (one connection: login, then its session or the console),
//!   [`admin`] (the console), [`reload`];
//! - the hub: [`shared`];
//! - services: [`cluster`], [`pool`], [`cancel`], [`server`], [`params`], [`prepared`],
//!   [`auth`], [`tls`], [`router`];
//! - leaves: [`config`], [`stream`], [`metrics`], [`registry`], [`shutdown`],
//!   [`protocol`], [`error`].
//!
//! Data flows one way: a client session asks the router where a transaction runs, takes
//! a server from a pool, and forwards bytes to it.

pub mod listener;

pub mod demo;
pub mod import;

pub mod admin;
pub mod client;
pub mod reload;

pub mod shared;

pub mod cancel;
pub mod cluster;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod server;

pub mod auth;
pub mod router;
pub mod tls;

pub mod config;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod registry;
mod shutdown;
pub mod stream;

pub use listener::{start, start_from, Pooler};
