//! One accepted client connection: the login, then the logged-in client's transaction
//! loop ([`super::session`]) or, for the virtual database `pgtide`, the admin console.
//! The only place that knows both, so that the session never imports the console.

use tokio::net::TcpStream;

use super::authn::NoSession;
use super::login;
use super::session;
use crate::protocol::sqlstate;
use crate::shared::ConnectedClient;
use crate::shutdown::{Phase, ShutdownSignal};

/// Runs one client connection from its first byte to its end. This is the client's
/// task (spawned as it is, no wrapping future): what it holds while the client is idle is
/// what an idle client costs.
pub async fn run(
    mut tcp: TcpStream,
    slot: ConnectedClient,
    signal: ShutdownSignal,
    over_limit: bool,
) {
    let _ = tcp.set_nodelay(true);
    let shared = slot.shared();
    // Accepted before the drain began (the listener closes when it does): served, as a
    // client that connected an instant earlier is; only a forced shutdown refuses it.
    if signal.phase() == Phase::Now {
        Box::pin(crate::stream::send_fatal(
            &mut tcp,
            sqlstate::ADMIN_SHUTDOWN,
            "pgtide is shutting down",
            None,
        ))
        .await;
        return;
    }
    // Boxed: the login's state is freed once it is done, not kept in this task's.
    match Box::pin(login::login(tcp, shared, over_limit)).await {
        // Moved into the session in this arm: a binding that outlived the match would
        // keep its own copy in the task's future for the client's whole life.
        Ok((stream, logged_in)) => session::start(stream, logged_in, signal, slot),
        Err(NoSession::Done) | Err(NoSession::Refused) => {}
        Err(NoSession::Admin { stream: None, .. }) => {}
        Err(NoSession::Admin {
            user,
            database,
            application_name,
            stream: Some(stream),
        }) => {
            let who = crate::admin::console::Login {
                user,
                database,
                application_name,
            };
            Box::pin(crate::admin::console::run(
                stream,
                shared.clone(),
                who,
                signal,
            ))
            .await;
        }
    }
}

/// A connection to `peer_listen` while pgtide drains: a CancelRequest (a peer's
/// forwarded one, or a client's) is still handled, so that the queries still running
/// here can be cancelled; anything else is told that pgtide is shutting down.
pub async fn cancel_only(mut tcp: TcpStream, shared: std::sync::Arc<crate::shared::Shared>) {
    let first = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        login::read_first_packet(&mut tcp),
    )
    .await;
    match first {
        Ok(Ok(crate::protocol::startup::StartupPacket::CancelRequest {
            pid,
            secret,
            forwarded,
        })) => shared.cancel_request(pid, secret, forwarded).await,
        Ok(Ok(_)) => {
            crate::stream::send_fatal(
                &mut tcp,
                sqlstate::ADMIN_SHUTDOWN,
                "pgtide is shutting down",
                None,
            )
            .await
        }
        _ => {}
    }
}
