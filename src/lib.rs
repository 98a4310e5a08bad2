//! pgtide: a PostgreSQL connection pooler.
//!
//! Data flows one way: [`listener`] accepts a socket and hands it to a [`client`] session,
//! which checks out a [`server`] connection from a [`pool`] for each transaction.
//! [`protocol`] and [`config`] are leaves that import nothing of ours.

pub mod admin;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod reload;
pub mod router;
pub mod server;
mod shutdown;
pub mod stream;
pub mod tls;

pub use listener::{start, start_from, Pooler};
