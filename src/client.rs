//! Client sessions (being written).
use std::sync::Arc;
use tokio::net::TcpListener;
use crate::config::Config;
use crate::shutdown::ShutdownController;

pub struct Shared { pub config: Arc<Config> }
impl Shared { pub fn new(config: Arc<Config>) -> Arc<Shared> { Arc::new(Shared { config }) } }
pub async fn accept_loop(_l: TcpListener, _s: Arc<Shared>, c: ShutdownController) { c.wait().await }
