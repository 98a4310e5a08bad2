//! Client authentication at pgtide and server login behind it, seen by real clients
//! (tokio-postgres and psql): every configured method, wrong passwords and unknown users,
//! passwords configured as md5 hashes and SCRAM verifiers, a login storm, and a client that
//! sends garbage in the middle of a SCRAM exchange.

use std::net::SocketAddr;
use std::time::Duration;

use pgtide::config::AuthType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, connect, tcp_connect_string};

/// Every network await and child process of this file gets at most this long.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The users of `harness::config_for`, with their passwords ("" = trust).
const USERS: [(&str, &str); 4] = [
    ("app", "apppass"),
    ("pgtide_md5", "md5pass"),
    ("pgtide_scram", "scrampass"),
    ("pgtide_trust", ""),
];

async fn try_connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    tokio::time::timeout(
        TIMEOUT,
        connect(&tcp_connect_string(addr, user, password, db)),
    )
    .await
    .unwrap_or_else(|_| panic!("login of {user} through pgtide did not finish within 30 s"))
}

async fn current_user(client: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    // Simple protocol: tokio-postgres's `query` prepares a named statement and binds it in a
    // later round trip, which pgtide's transaction mode does not support across servers yet
    // (README, "Limits in transaction mode").
    let rows = tokio::time::timeout(TIMEOUT, client.simple_query("SELECT current_user::text"))
        .await
        .expect("select current_user did not finish within 30 s")?;
    Ok(first_value(&rows))
}

/// The first column of the first row of a simple-query result.
fn first_value(messages: &[tokio_postgres::SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("the query returned no row")
}

/// Logs in with tokio-postgres and returns `current_user`, panicking with context.
async fn login_and_whoami(addr: SocketAddr, user: &str, password: &str, db: &str) -> String {
    let client = try_connect(addr, user, password, db)
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in through pgtide: {e:?}"));
    current_user(&client)
        .await
        .unwrap_or_else(|e| panic!("select current_user as {user} through pgtide: {e:?}"))
}

/// (SQLSTATE, message) of a server error; panics if `e` is not one.
fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_string(), d.message().to_string()),
        None => panic!("expected an ErrorResponse from pgtide, got {e:?}"),
    }
}

/// Result of one psql run.
struct PsqlRun {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `psql -X -At -c sql` against `addr` as `user` (PGPASSWORD unless empty), killing
/// psql if it takes longer than 30 s.
async fn psql_via(addr: SocketAddr, user: &str, password: &str, db: &str, sql: &str) -> PsqlRun {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-U")
        .arg(user)
        .arg("-d")
        .arg(db)
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "20")
        .env_remove("PGSERVICE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // On a timeout the future is dropped and tokio kills psql by its PID.
        .kill_on_drop(true);
    if password.is_empty() {
        cmd.env_remove("PGPASSWORD").arg("-w");
    } else {
        cmd.env("PGPASSWORD", password);
    }
    let child = cmd.spawn().expect("cannot run psql");
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("psql as {user} did not finish within 30 s"))
        .expect("psql");
    PsqlRun {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn failed_message(user: &str) -> String {
    format!("password authentication failed for user \"{user}\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_logs_in_with_its_method_tokio_postgres_and_psql() {
    let db = harness::fresh_database("auth_methods");
    let pooler = harness::start_pgtide(harness::config_for(&db)).await;
    let addr = pooler.local_addr();

    for (user, password) in USERS {
        assert_eq!(login_and_whoami(addr, user, password, &db).await, user);
        let run = psql_via(addr, user, password, &db, "select current_user").await;
        assert!(
            run.success,
            "psql as {user} through pgtide failed: {}",
            run.stderr
        );
        assert_eq!(run.stdout, user, "psql as {user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_28p01_with_the_same_message() {
    let db = harness::fresh_database("auth_wrong");
    let pooler = harness::start_pgtide(harness::config_for(&db)).await;
    let addr = pooler.local_addr();

    for (user, password) in USERS {
        if password.is_empty() {
            continue; // trust cannot fail
        }
        let wrong = format!("{password}-wrong");
        let err = try_connect(addr, user, &wrong, &db)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        let (code, message) = db_error(&err);
        assert_eq!(code, "28P01", "{user} with a wrong password: {message}");
        assert_eq!(message, failed_message(user));

        let run = psql_via(addr, user, &wrong, &db, "select current_user").await;
        assert!(
            !run.success,
            "psql as {user} with a wrong password succeeded"
        );
        assert!(
            run.stderr.contains(&failed_message(user)),
            "psql as {user} with a wrong password: {}",
            run.stderr
        );
    }

    // An unknown user: the same SQLSTATE and message shape, no hint that it does not exist.
    let ghost = "pgtide_no_such_user";
    let err = try_connect(addr, ghost, "whatever", &db)
        .await
        .expect_err("an unknown user logged in");
    let d = err
        .as_db_error()
        .expect("an ErrorResponse for an unknown user");
    assert_eq!(d.code().code(), "28P01", "unknown user: {}", d.message());
    assert_eq!(d.message(), failed_message(ghost));
    assert_eq!(d.detail(), None, "the detail must not reveal anything");
    assert_eq!(d.hint(), None, "the hint must not reveal anything");
    // The same fields as a known user with a wrong password.
    let known = try_connect(addr, "app", "nope", &db).await.err().unwrap();
    let k = known.as_db_error().unwrap();
    assert_eq!(
        (k.severity(), k.detail(), k.hint()),
        (d.severity(), d.detail(), d.hint())
    );

    let run = psql_via(addr, ghost, "whatever", &db, "select 1").await;
    assert!(!run.success, "psql as an unknown user succeeded");
    assert!(
        run.stderr.contains(&failed_message(ghost)),
        "psql as an unknown user: {}",
        run.stderr
    );
    let lower = run.stderr.to_lowercase();
    for word in ["does not exist", "unknown", "no such", "not found"] {
        assert!(
            !lower.contains(word),
            "psql stderr reveals '{word}': {}",
            run.stderr
        );
    }

    // Nothing broke: the good users still log in.
    assert_eq!(login_and_whoami(addr, "app", "apppass", &db).await, "app");
}

/// md5(password || user) as PostgreSQL stores it: "md5" + 32 hex digits.
fn md5_hash(password: &str, user: &str) -> String {
    use md5::{Digest, Md5};
    let digest = Md5::digest(format!("{password}{user}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("md5{hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_hash_in_config_checks_clients_and_logs_in_to_the_server() {
    let db = harness::fresh_database("auth_md5hash");
    let hash = md5_hash("md5pass", "pgtide_md5");
    // The test's hash is the one PostgreSQL stores for the role.
    assert_eq!(
        harness::psql(
            harness::primary_port(),
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'pgtide_md5'"
        ),
        hash
    );
    let mut cfg = harness::config_for(&db);
    let user = cfg.users.get_mut("pgtide_md5").unwrap();
    user.password = Some(hash);
    user.auth_type = Some(AuthType::Md5);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    assert_eq!(
        login_and_whoami(addr, "pgtide_md5", "md5pass", &db).await,
        "pgtide_md5"
    );
    let run = psql_via(addr, "pgtide_md5", "md5pass", &db, "select current_user").await;
    assert!(run.success, "psql: {}", run.stderr);
    assert_eq!(run.stdout, "pgtide_md5");

    let err = try_connect(addr, "pgtide_md5", "wrong", &db)
        .await
        .expect_err("a wrong password against an md5 hash logged in");
    assert_eq!(db_error(&err).0, "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_in_config_checks_clients_and_logs_in_through_pass_through() {
    let db = harness::fresh_database("auth_verifier");
    let verifier = harness::psql(
        harness::primary_port(),
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'pgtide_scram'",
    );
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let mut cfg = harness::config_for(&db);
    let user = cfg.users.get_mut("pgtide_scram").unwrap();
    user.password = Some(verifier);
    user.auth_type = Some(AuthType::ScramSha256);
    // The same password, but a verifier with another salt than the server's.
    let other = pgtide::auth::ScramVerifier::generate("md5pass").to_string();
    let user = cfg.users.get_mut("pgtide_md5").unwrap();
    user.password = Some(other);
    user.auth_type = Some(AuthType::ScramSha256);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    // A wrong password is refused at pgtide: the verifier is what checks the client.
    let err = try_connect(addr, "pgtide_scram", "wrong", &db)
        .await
        .expect_err("a wrong password against a SCRAM verifier logged in");
    assert_eq!(db_error(&err).0, "28P01");

    // The right password: the ClientKey recovered from the client's proof logs pgtide in
    // to the server, which stores the same verifier (SCRAM pass-through).
    assert_eq!(
        login_and_whoami(addr, "pgtide_scram", "scrampass", &db).await,
        "pgtide_scram"
    );
    let run = psql_via(
        addr,
        "pgtide_scram",
        "scrampass",
        &db,
        "select current_user",
    )
    .await;
    assert!(run.success, "psql as pgtide_scram: {}", run.stderr);
    assert_eq!(run.stdout, "pgtide_scram");

    // A verifier that is not the server's passes pgtide's check but cannot log in to the
    // server (and the md5 server would want a password anyway): the client gets a clear
    // error naming the user, not 28P01 (at login, when pgtide needs a server for the
    // first client of the pool, or at the first query).
    let err = match try_connect(addr, "pgtide_md5", "md5pass", &db).await {
        Err(e) => e,
        Ok(client) => current_user(&client)
            .await
            .expect_err("a query succeeded although pgtide cannot log in to the server"),
    };
    let (code, message) = db_error(&err);
    eprintln!("pgtide_md5 with a foreign verifier only: {code} {message}");
    assert_ne!(
        code, "28P01",
        "the client's password was right; the error must say why the server login failed: {message}"
    );
    assert!(
        message.contains("\"pgtide_md5\"") && message.contains("password"),
        "the error must name the user and the missing password: {code} {message}"
    );
    // pgtide keeps serving other users.
    assert_eq!(login_and_whoami(addr, "app", "apppass", &db).await, "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_md5_with_plain_password_while_server_uses_scram() {
    let db = harness::fresh_database("auth_md5_scram");
    let mut cfg = harness::config_for(&db);
    cfg.users.get_mut("app").unwrap().auth_type = Some(AuthType::Md5);
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    assert_eq!(login_and_whoami(addr, "app", "apppass", &db).await, "app");
    let run = psql_via(addr, "app", "apppass", &db, "select current_user").await;
    assert!(run.success, "psql: {}", run.stderr);
    assert_eq!(run.stdout, "app");
    let err = try_connect(addr, "app", "wrong", &db)
        .await
        .expect_err("md5 with a wrong password logged in");
    assert_eq!(db_error(&err).0, "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_storm_of_200_scram_clients() {
    const CLIENTS: usize = 200;
    let db = harness::fresh_database("auth_storm");
    let mut cfg = harness::config_for(&db);
    cfg.pgtide.pool_size = 5;
    let pooler = harness::start_pgtide(cfg).await;
    let addr = pooler.local_addr();

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let conn = tcp_connect_string(addr, "app", "apppass", &db);
                // Generous: 200 client-side PBKDF2 runs share two cores with everything else.
                let client = tokio::time::timeout(Duration::from_secs(90), connect(&conn))
                    .await
                    .map_err(|_| format!("client {i}: login timed out"))?
                    .map_err(|e| format!("client {i}: login failed: {e:?}"))?;
                let rows = tokio::time::timeout(
                    Duration::from_secs(90),
                    client.simple_query(&format!("SELECT {i} + 1")),
                )
                .await
                .map_err(|_| format!("client {i}: query timed out"))?
                .map_err(|e| format!("client {i}: query failed: {e:?}"))?;
                let got = first_value(&rows);
                if got != (i + 1).to_string() {
                    return Err(format!("client {i}: got {got}"));
                }
                Ok::<_, String>(client)
            })
        })
        .collect();
    let mut errors = Vec::new();
    let mut clients = Vec::new();
    for t in tasks {
        match t.await.expect("client task panicked") {
            Ok(c) => clients.push(c),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // pgtide kept to its pool size while serving them.
    let n = harness::psql(
        harness::primary_port(),
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND usename = 'app'"
        ),
    );
    let n: u32 = n.parse().unwrap();
    assert!(n <= 5, "{n} server connections for pool_size 5");
    drop(clients);
}

/// Builds a StartupMessage for `user` and `db`.
fn startup_message(user: &str, db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Reads one backend message (tag, body).
async fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
    assert!((4..1 << 20).contains(&len), "absurd message length {len}");
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

/// The fields of an ErrorResponse body, by field type.
fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// Starts a SCRAM exchange as `app` and then sends `initial_response` (a whole
/// SASLInitialResponse message); returns pgtide's ErrorResponse fields, and asserts that
/// pgtide then closes the connection.
async fn garbage_scram(addr: SocketAddr, db: &str, initial_response: &[u8]) -> Vec<(u8, String)> {
    let mut s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    tokio::time::timeout(TIMEOUT, s.write_all(&startup_message("app", db)))
        .await
        .unwrap()
        .unwrap();
    let (tag, body) = tokio::time::timeout(TIMEOUT, read_message(&mut s))
        .await
        .expect("no authentication request within 30 s")
        .unwrap();
    assert_eq!(tag, b'R', "expected an authentication request");
    assert_eq!(
        &body[..4],
        &10i32.to_be_bytes(),
        "expected AuthenticationSASL"
    );
    assert!(
        body.windows(13).any(|w| w == b"SCRAM-SHA-256"),
        "AuthenticationSASL must offer SCRAM-SHA-256"
    );
    tokio::time::timeout(TIMEOUT, s.write_all(initial_response))
        .await
        .unwrap()
        .unwrap();
    let (tag, body) = tokio::time::timeout(TIMEOUT, read_message(&mut s))
        .await
        .expect("no answer to a garbage SASLInitialResponse within 30 s")
        .expect("pgtide closed the connection without an ErrorResponse");
    assert_eq!(
        tag, b'E',
        "expected an ErrorResponse, got {:?}",
        tag as char
    );
    let fields = error_fields(&body);
    // Then the connection ends.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("pgtide kept the connection open after FATAL");
    assert!(
        n.is_err() || rest.is_empty(),
        "pgtide sent more after FATAL"
    );
    fields
}

fn sasl_initial_response(mechanism: &[u8], data_len: i32, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.to_vec();
    body.push(0);
    body.extend_from_slice(&data_len.to_be_bytes());
    body.extend_from_slice(data);
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_scram_initial_response_gets_fatal_and_spares_others() {
    let db = harness::fresh_database("auth_garbage");
    let pooler = harness::start_pgtide(harness::config_for(&db)).await;
    let addr = pooler.local_addr();

    // A good client, logged in and inside a transaction, before and during the garbage.
    let good = try_connect(addr, "app", "apppass", &db)
        .await
        .expect("good client login");
    tokio::time::timeout(TIMEOUT, good.batch_execute("BEGIN; CREATE TABLE t (x int)"))
        .await
        .unwrap()
        .unwrap();

    let garbage: &[u8] = b"\xff\xfe not a client-first-message \x00\x01";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage client-first-message",
            sasl_initial_response(b"SCRAM-SHA-256", garbage.len() as i32, garbage),
        ),
        (
            "unknown mechanism",
            sasl_initial_response(b"NOT-A-MECHANISM", 4, b"n,,x"),
        ),
        (
            "data length beyond the message",
            sasl_initial_response(b"SCRAM-SHA-256", 1 << 30, b"n,,n=,r=abc"),
        ),
        (
            "channel binding that was not offered",
            sasl_initial_response(b"SCRAM-SHA-256", 15, b"p=tls-unique,,x"),
        ),
    ];
    for (what, msg) in cases {
        let fields = garbage_scram(addr, &db, &msg).await;
        let get = |t: u8| {
            fields
                .iter()
                .find(|(k, _)| *k == t)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        eprintln!("{what}: {fields:?}");
        assert_eq!(get(b'S'), "FATAL", "{what}: {fields:?}");
        let code = get(b'C');
        assert!(
            code == "08P01" || code == "28P01",
            "{what}: SQLSTATE {code}, {fields:?}"
        );
    }

    // The good client is unaffected, and new clients still log in.
    tokio::time::timeout(
        TIMEOUT,
        good.batch_execute("INSERT INTO t VALUES (1); COMMIT"),
    )
    .await
    .unwrap()
    .expect("the good client's transaction");
    assert_eq!(current_user(&good).await.unwrap(), "app");
    let other = try_connect(addr, "app", "apppass", &db)
        .await
        .expect("a new client after the garbage");
    let rows = tokio::time::timeout(TIMEOUT, other.simple_query("SELECT count(*) FROM t"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_value(&rows), "1");
}
