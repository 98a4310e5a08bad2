//! One admin console session: the login reply, then a loop of simple-protocol queries,
//! each one admin command. The extended protocol gets a clear 0A000 error (answered up to
//! its Sync), so that a driver that tries it learns why.

use std::sync::Arc;
use std::time::Duration;

use crate::stream::{ReadError, Stream};
use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::show::{self, ResultSet};
use crate::protocol::backend::{self, Severity};
use crate::protocol::{put_message, sqlstate, status, tag};
use crate::registry::{ClientEntry, Registration};
use crate::shared::Shared;
use crate::shutdown::{Phase, ShutdownSignal};

/// SQLSTATE for an admin command the console does not know.
const SYNTAX_ERROR: &str = "42601";

/// What one command produced.
enum Reply {
    Rows(ResultSet, String),
    Done(String),
    /// Success, with a notice for the operator first.
    DoneWithNotice(String, String),
    Empty,
}

type CommandError = (&'static str, String);

/// Who logged in to the console.
pub struct Login {
    pub user: String,
    /// `pgtide` or `pgbouncer`.
    pub database: String,
    pub application_name: String,
}

/// Runs an admin console session, its user already authenticated and allowed.
pub async fn run(
    mut stream: Stream,
    shared: Arc<Shared>,
    login: Login,
    mut signal: ShutdownSignal,
) {
    let Login {
        user,
        database,
        application_name,
    } = login;
    let id = shared.clients().next_id();
    let entry: Registration<ClientEntry> = shared.clients().register(
        id,
        ClientEntry::new(
            &user,
            &database,
            stream.peer_addr().ok(),
            stream.local_addr().ok(),
            &application_name,
        ),
    );
    let mut b = BytesMut::with_capacity(256);
    backend::authentication_ok(&mut b);
    for (k, v) in [
        (
            "server_version",
            format!("{}/pgtide", env!("CARGO_PKG_VERSION")).as_str(),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", application_name.as_str()),
    ] {
        backend::parameter_status(&mut b, k, v);
    }
    backend::backend_key_data(&mut b, rand::random::<i32>() & 0x7fff_ffff, rand::random());
    backend::ready_for_query(&mut b, status::IDLE);
    if stream.write_all(&b).await.is_err() {
        return;
    }
    let max = shared.config().pgtide.max_message_size;
    // After an extended-protocol message: skip until Sync, as PostgreSQL does after an
    // error.
    let mut skipping = false;
    loop {
        let msg = tokio::select! {
            m = crate::stream::read_message(&mut stream, max) => m,
            _ = entry.killed() => {
                fatal(&mut stream, sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command").await;
                return;
            }
            _ = signal.reached(Phase::Draining) => {
                fatal(&mut stream, sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down").await;
                return;
            }
        };
        let (t, body) = match msg {
            Ok(m) => m,
            // The client went away.
            Err(ReadError::Io(_)) => return,
            Err(ReadError::Frame(e)) => {
                fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
                return;
            }
        };
        let mut out = BytesMut::new();
        match t {
            tag::QUERY => {
                let sql =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
                tracing::debug!(%user, command = %sql, "admin command");
                let result = tokio::select! {
                    r = execute(&shared, &sql) => r,
                    // A PAUSE that waits must not hold up shutdown.
                    _ = signal.reached(Phase::Draining) => {
                        fatal(&mut stream, sqlstate::ADMIN_SHUTDOWN, "pgtide is shutting down").await;
                        return;
                    }
                };
                match result {
                    Ok(reply) => write_reply(&mut out, reply),
                    Err((code, message)) => backend::error(&mut out, code, &message),
                }
                backend::ready_for_query(&mut out, status::IDLE);
            }
            tag::TERMINATE => return,
            tag::SYNC => {
                skipping = false;
                backend::ready_for_query(&mut out, status::IDLE);
            }
            tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FLUSH
            | tag::FUNCTION_CALL => {
                if !skipping {
                    backend::error_response(
                        &mut out,
                        Severity::Error,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports only the simple query protocol",
                        None,
                        Some("send commands as plain queries, e.g. with psql"),
                    );
                    skipping = true;
                }
                if t == tag::FUNCTION_CALL {
                    skipping = false;
                    backend::ready_for_query(&mut out, status::IDLE);
                }
            }
            other => {
                fatal(
                    &mut stream,
                    sqlstate::PROTOCOL_VIOLATION,
                    &format!(
                        "unexpected message type {:?} on the admin console",
                        other as char
                    ),
                )
                .await;
                return;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn fatal(stream: &mut Stream, code: &str, message: &str) {
    crate::stream::send_fatal(stream, code, message, None).await;
}

fn write_reply(out: &mut BytesMut, reply: Reply) {
    match reply {
        Reply::Empty => put_message(out, Some(tag::EMPTY_QUERY_RESPONSE), |_| {}),
        Reply::Done(t) => command_complete(out, &t),
        Reply::DoneWithNotice(t, notice) => {
            backend::error_response(out, Severity::Notice, "00000", &notice, None, None);
            command_complete(out, &t);
        }
        Reply::Rows(rs, t) => {
            put_message(out, Some(tag::ROW_DESCRIPTION), |b| {
                b.put_i16(rs.columns.len() as i16);
                for (name, ty) in &rs.columns {
                    b.put_slice(name.as_bytes());
                    b.put_u8(0);
                    b.put_i32(0);
                    b.put_i16(0);
                    b.put_u32(ty.oid());
                    b.put_i16(if ty.oid() == 20 { 8 } else { -1 });
                    b.put_i32(-1);
                    b.put_i16(0);
                }
            });
            for row in &rs.rows {
                put_message(out, Some(tag::DATA_ROW), |b| {
                    b.put_i16(row.len() as i16);
                    for v in row {
                        match v {
                            Some(v) => {
                                b.put_i32(v.len() as i32);
                                b.put_slice(v.as_bytes());
                            }
                            None => b.put_i32(-1),
                        }
                    }
                });
            }
            command_complete(out, &format!("{t} {}", rs.rows.len()));
        }
    }
}

fn command_complete(out: &mut BytesMut, t: &str) {
    put_message(out, Some(tag::COMMAND_COMPLETE), |b| {
        b.put_slice(t.as_bytes());
        b.put_u8(0);
    });
}

/// A database name argument: unquoted (`"name"` keeps its case), checked against the
/// configuration.
fn database_arg(shared: &Shared, word: &str) -> Result<String, CommandError> {
    let name = match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => word.to_string(),
    };
    if shared.config().databases.contains_key(&name) {
        Ok(name)
    } else {
        Err((
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{name}\" is not configured"),
        ))
    }
}

/// Runs one admin command.
async fn execute(shared: &Arc<Shared>, sql: &str) -> Result<Reply, CommandError> {
    let text = sql
        .trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    if text.is_empty() {
        return Ok(Reply::Empty);
    }
    if text.contains(';') {
        return Err((
            sqlstate::FEATURE_NOT_SUPPORTED,
            "the admin console runs one command per query".into(),
        ));
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let verb = words[0].to_ascii_uppercase();
    let args = &words[1..];
    let no_args = |args: &[&str]| -> Result<(), CommandError> {
        if args.is_empty() {
            Ok(())
        } else {
            Err((SYNTAX_ERROR, format!("{verb} takes no argument")))
        }
    };
    let one_db = |args: &[&str]| -> Result<Option<String>, CommandError> {
        match args {
            [] => Ok(None),
            [db] => database_arg(shared, db).map(Some),
            _ => Err((
                SYNTAX_ERROR,
                format!("{verb} takes at most one database name"),
            )),
        }
    };
    match verb.as_str() {
        "SHOW" => {
            let [what] = args else {
                return Err((
                    SYNTAX_ERROR,
                    format!(
                        "SHOW needs one of: {}",
                        show::SHOW_COMMANDS.join(", ")
                    ),
                ));
            };
            let what = what.to_ascii_uppercase();
            match show::show(shared, &what) {
                Some(rs) => Ok(Reply::Rows(rs, "SHOW".into())),
                None => Err((
                    SYNTAX_ERROR,
                    format!(
                        "unknown SHOW command {what:?}; the admin console has SHOW {}",
                        show::SHOW_COMMANDS.join(", ")
                    ),
                )),
            }
        }
        "PAUSE" => {
            let db = one_db(args)?;
            pause(shared, db.as_deref()).await?;
            Ok(Reply::Done("PAUSE".into()))
        }
        "RESUME" => {
            let db = one_db(args)?;
            shared
                .gate()
                .resume(db.as_deref())
                .map_err(|m| (sqlstate::INVALID_PARAMETER_VALUE, m))?;
            tracing::info!(database = db.as_deref().unwrap_or("(all)"), "RESUME");
            Ok(Reply::Done("RESUME".into()))
        }
        "RECONNECT" => {
            let db = one_db(args)?;
            for pool in shared.pools() {
                if db.as_deref().is_none_or(|d| d == pool.database) {
                    pool.reconnect();
                }
            }
            tracing::info!(database = db.as_deref().unwrap_or("(all)"), "RECONNECT: server connections are closed as they are released");
            Ok(Reply::Done("RECONNECT".into()))
        }
        "KILL" => {
            let [db] = args else {
                return Err((SYNTAX_ERROR, "KILL needs a database name: KILL db".into()));
            };
            let db = database_arg(shared, db)?;
            kill(shared, &db);
            Ok(Reply::Done("KILL".into()))
        }
        "RELOAD" => {
            no_args(args)?;
            match crate::reload::reload(shared).await {
                Ok(summary) => Ok(Reply::DoneWithNotice("RELOAD".into(), summary)),
                Err(e) => Err((sqlstate::INVALID_PARAMETER_VALUE, e)),
            }
        }
        "SHUTDOWN" => {
            no_args(args)?;
            tracing::info!("SHUTDOWN from the admin console");
            shared.shutdown();
            Ok(Reply::Done("SHUTDOWN".into()))
        }
        _ => Err((
            SYNTAX_ERROR,
            format!(
                "unknown admin console command {:?}; the console has SHOW ..., PAUSE, RESUME, RECONNECT, KILL, RELOAD, SHUTDOWN (SHOW HELP lists them)",
                words[0]
            ),
        )),
    }
}

/// `PAUSE [db]`: closes the gate, waits until no server of those databases is in use,
/// then closes their idle servers, so that PostgreSQL can be restarted.
async fn pause(shared: &Arc<Shared>, db: Option<&str>) -> Result<(), CommandError> {
    shared
        .gate()
        .pause(db)
        .map_err(|m| (sqlstate::INVALID_PARAMETER_VALUE, m))?;
    tracing::info!(
        database = db.unwrap_or("(all)"),
        "PAUSE: waiting for running transactions"
    );
    let mut logged = std::time::Instant::now();
    loop {
        let pools: Vec<_> = shared
            .pools()
            .into_iter()
            .filter(|p| db.is_none_or(|d| d == p.database))
            .collect();
        let busy: u32 = pools.iter().map(|p| p.busy()).sum();
        if busy == 0 {
            for p in &pools {
                p.close_idle_and_wait().await;
            }
            // A connection checked in between the count and the close is idle too.
            if pools.iter().all(|p| p.counts().0 == 0) {
                break;
            }
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            tracing::info!(busy, "PAUSE: still waiting for running transactions");
            logged = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(
        database = db.unwrap_or("(all)"),
        "paused: no server connection open"
    );
    Ok(())
}

/// `KILL db`: disconnects the database's clients and closes its servers.
fn kill(shared: &Arc<Shared>, db: &str) {
    let mut n = 0;
    for (_, c) in shared.clients().snapshot() {
        if c.database == db {
            c.kill();
            n += 1;
        }
    }
    shared.retire_sets(|set| set.database == db);
    tracing::info!(
        database = db,
        clients = n,
        "KILL: clients disconnected, servers closed"
    );
}
