//! Server connections.
