//! What pgtide knows about how a client connected: the facts hba rules and `cert`
//! authentication decide on.

/// A client's connection, as the login saw it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub tls: bool,
    pub cert_common_name: Option<String>,
}
