//! Integration tests against real PostgreSQL (a primary and a streaming replica started by
//! [`harness`]). Each area of pgtide adds its own `mod` here.

mod admin;
mod auth;
mod cli;
mod cluster;
mod credentials;
mod drivers;
mod failover;
mod fidelity;
mod harness;
mod import;
mod isolation;
mod layers;
mod metrics;
mod peers;
mod pgbench;
mod pooling;
mod positions;
mod prepared;
mod protocol;
mod rawpg;
mod routing;
mod smoke;
mod sql_prepared;
mod tls;
