//! TEMPORARY STUB (replaced by the cluster branch).
pub async fn run_demo(_listen: Option<std::net::SocketAddr>) -> Result<(), String> {
    Err("todo".into())
}
