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
    if signal.phase() != Phase::Running {
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
