//! One client connection, from its first byte to its end: [`connection`] runs the login
//! ([`login`], with the authentication step in `authn`) and hands the logged-in client
//! to its transaction loop ([`session`]) or to the admin console.

mod authn;
pub mod connection;
mod login;
mod session;
