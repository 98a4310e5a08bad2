//! Credentials without a password per user in the config: an `auth_file` in PgBouncer's
//! format (plain, md5 and SCRAM-secret entries), `auth_query` (including a password
//! changed on the server after pgtide cached it, and an expired `VALID UNTIL`), SCRAM
//! pass-through to the server, `auth_hba_file` rules, the failed-login slowdown per
//! source address (clients bound to 127.0.0.2 and 127.0.0.3), and malformed or forged
//! authentication messages sent with the raw protocol.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pgtide::auth::{scram, ScramClient};
use pgtide::config::{AuthType, Config, ConfigDuration, User};
use tokio::net::TcpSocket;

use crate::harness::{self, connect, primary_port, psql, tcp_connect_string, to};

use crate::rawpg;
use rawpg::{startup, Msg, RawPg, PROTOCOL_3_0};

/// A role name unique to this test process and `db`.
fn role(prefix: &str, db: &str) -> String {
    format!("{prefix}_{}", db.rsplit('_').next().unwrap_or("0"))
}

/// Runs SQL on the primary as `postgres` in database `postgres`.
fn admin(sql: &str) -> String {
    psql(primary_port(), "postgres", sql)
}

/// The verifier or hash PostgreSQL stores for `name`.
fn rolpassword(name: &str) -> String {
    admin(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{name}'"
    ))
}

/// Logs in with tokio-postgres from `source` (an address on 127/8) to `addr`.
async fn connect_from(
    source: IpAddr,
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let stream = to("connect", socket.connect(addr))
        .await
        .expect("tcp connect");
    let config: tokio_postgres::Config = tcp_connect_string(addr, user, password, db)
        .parse()
        .expect("connection string");
    let (client, connection) =
        to("login", config.connect_raw(stream, tokio_postgres::NoTls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn login(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    to(
        "login",
        connect(&tcp_connect_string(addr, user, password, db)),
    )
    .await
}

/// `current_user` over the simple protocol.
async fn whoami(c: &tokio_postgres::Client) -> String {
    let rows = to(
        "select current_user",
        c.simple_query("SELECT current_user::text"),
    )
    .await
    .expect("select current_user");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

/// (SQLSTATE, message) of the ErrorResponse that refused a login.
pub(crate) fn refused(
    r: Result<tokio_postgres::Client, tokio_postgres::Error>,
) -> (String, String) {
    match r {
        Ok(_) => panic!("the login was accepted"),
        Err(e) => match e.as_db_error() {
            Some(d) => (d.code().code().to_string(), d.message().to_string()),
            None => panic!("expected an ErrorResponse, got {e:?}"),
        },
    }
}

fn wrong_password(user: &str) -> (String, String) {
    (
        "28P01".to_string(),
        format!("password authentication failed for user \"{user}\""),
    )
}

/// A config for `db` whose [users] hold only `app` (the harness's superuser) and
/// `keep`, plus whatever `tweak` adds.
fn config(db: &str, keep: &[&str]) -> Config {
    let mut c = harness::config_for(db);
    c.users
        .retain(|name, _| name == harness::APP_USER || keep.contains(&name.as_str()));
    c.pgtide.query_wait_timeout = ConfigDuration::secs(10);
    c
}

fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_file_plain_md5_and_scram_secret_users() {
    let db = harness::fresh_database("cred_file");
    let plain = role("cf_plain", &db);
    let secret = role("cf_secret", &db);
    admin(&format!(
        "CREATE ROLE {plain} LOGIN PASSWORD 'plain pw'; CREATE ROLE {secret} LOGIN PASSWORD 'scram \"pw\"'"
    ));
    let verifier = rolpassword(&secret);
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    // pgtide_md5 is stored as md5 on the server, which asks md5 for it.
    let md5 = rolpassword("pgtide_md5");
    assert!(md5.starts_with("md5"), "{md5}");
    let dir = tempfile::tempdir().unwrap();
    let userlist = format!(
        "; PgBouncer's format\n\"{plain}\" \"plain pw\"\n\"pgtide_md5\" \"{md5}\" \"extra fields are ignored\"\n# the SCRAM secret copied from pg_authid\n\"{secret}\" \"{verifier}\"\n"
    );
    let mut c = config(&db, &[]);
    c.pgtide.auth_file = write_file(&dir, "userlist.txt", &userlist);
    c.users.insert(
        "pgtide_md5".into(),
        User {
            auth_type: Some(AuthType::Md5),
            ..User::default()
        },
    );
    let pooler = harness::start_pgtide(c).await;
    let addr = pooler.local_addr();

    // Plain: pgtide checks the client with SCRAM and logs in to the server itself.
    let c1 = login(addr, &plain, "plain pw", &db)
        .await
        .expect("plain user");
    assert_eq!(whoami(&c1).await, plain);
    // md5 hash (and auth_type md5 from [users], which holds no password): the hash
    // checks the client and logs in to the md5 server.
    let c2 = login(addr, "pgtide_md5", "md5pass", &db)
        .await
        .expect("md5 user");
    assert_eq!(whoami(&c2).await, "pgtide_md5");
    // SCRAM secret: only the verifier is known; the client's own SCRAM login gives
    // pgtide the ClientKey that logs it in to the server (pass-through).
    let c3 = login(addr, &secret, "scram \"pw\"", &db)
        .await
        .expect("SCRAM-secret user");
    assert_eq!(whoami(&c3).await, secret);
    // A second client of the same pool in a transaction forces a second server
    // connection, also logged in with the ClientKey.
    to("begin", c3.batch_execute("BEGIN; SELECT pg_sleep(0)"))
        .await
        .unwrap();
    let c4 = login(addr, &secret, "scram \"pw\"", &db).await.unwrap();
    assert_eq!(whoami(&c4).await, secret);
    to("commit", c3.batch_execute("COMMIT")).await.unwrap();

    for user in [plain.as_str(), "pgtide_md5", secret.as_str()] {
        assert_eq!(
            refused(login(addr, user, "wrong", &db).await),
            wrong_password(user)
        );
    }
    assert_eq!(
        refused(login(addr, "cf_nobody", "x", &db).await),
        wrong_password("cf_nobody")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_through_a_security_definer_function() {
    let db = harness::fresh_database("cred_query");
    let lookup = role("aq_lookup", &db);
    let user = role("aq_user", &db);
    let expired = role("aq_expired", &db);
    admin(&format!(
        "CREATE ROLE {lookup} LOGIN PASSWORD 'lookup pw'; \
         CREATE ROLE {user} LOGIN PASSWORD 'one'; \
         CREATE ROLE {expired} LOGIN PASSWORD 'old' VALID UNTIL '2001-01-01'"
    ));
    // The lookup role is not a superuser: it calls a function owned by postgres.
    psql(
        primary_port(),
        &db,
        &format!(
            "CREATE FUNCTION user_lookup(u text, OUT usename name, OUT passwd text) RETURNS SETOF record \
             LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
             $$ SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
                FROM pg_authid WHERE rolname = u AND rolcanlogin $$; \
             REVOKE ALL ON FUNCTION user_lookup(text) FROM PUBLIC; \
             GRANT EXECUTE ON FUNCTION user_lookup(text) TO {lookup};"
        ),
    );
    let mut c = config(&db, &[]);
    c.users.insert(
        lookup.clone(),
        User {
            password: Some("lookup pw".into()),
            ..User::default()
        },
    );
    c.pgtide.auth_user = lookup.clone();
    c.pgtide.auth_query = "SELECT usename, passwd FROM user_lookup($1)".into();
    c.pgtide.auth_query_cache_ttl = ConfigDuration::secs(300);
    let pooler = harness::start_pgtide(c).await;
    let addr = pooler.local_addr();

    // Known only through the query: SCRAM against the fetched verifier, then
    // pass-through: the server runs the queries as that user.
    let c1 = login(addr, &user, "one", &db)
        .await
        .expect("auth_query user");
    assert_eq!(whoami(&c1).await, user);
    // psql too.
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(["-U", &user, "-d", &db, "-c", "SELECT session_user"])
        .env("PGPASSWORD", "one")
        .kill_on_drop(true)
        .output();
    let out = to("psql", out).await.expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), user);

    // Expired VALID UNTIL and unknown users: the same 28P01 as a wrong password.
    assert_eq!(
        refused(login(addr, &expired, "old", &db).await),
        wrong_password(&expired)
    );
    assert_eq!(
        refused(login(addr, &user, "two", &db).await),
        wrong_password(&user)
    );
    assert_eq!(
        refused(login(addr, "aq_ghost", "x", &db).await),
        wrong_password("aq_ghost")
    );

    // The password changes on the server while pgtide has the old verifier cached.
    admin(&format!("ALTER ROLE {user} PASSWORD 'two'"));
    // The cached verifier still accepts the old password (for up to the ttl)...
    let old = login(addr, &user, "one", &db)
        .await
        .expect("old password, cached");
    drop(old);
    // ...and the new password fails once against it, which re-fetches the secret: the
    // SCRAM proof is bound to the salt already sent, so this attempt cannot succeed.
    assert_eq!(
        refused(login(addr, &user, "two", &db).await),
        wrong_password(&user)
    );
    // The next login uses the new verifier, and logs in to the server with it.
    let c2 = login(addr, &user, "two", &db).await.expect("new password");
    assert_eq!(whoami(&c2).await, user);
    assert_eq!(
        refused(login(addr, &user, "one", &db).await),
        wrong_password(&user)
    );
    // The first client's server connections still work.
    assert_eq!(whoami(&c1).await, user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_rules_allow_reject_and_choose_the_method() {
    let db = harness::fresh_database("cred_hba");
    let changing = role("hba_changing", &db);
    admin(&format!("CREATE ROLE {changing} LOGIN PASSWORD 'first'"));
    let dir = tempfile::tempdir().unwrap();
    let hba = format!(
        "# TYPE   DATABASE  USER            ADDRESS        METHOD\n\
         host      all       pgtide_scram    0.0.0.0/0      reject\n\
         host      {db}      app             127.0.0.1/32   scram-sha-256\n\
         host      all       pgtide_trust    127.0.0.1/32   scram-sha-256\n\
         host      all       all             127.0.0.2/32   password\n\
         host      \"other db\",{db} {changing},app 127.0.0.3 255.255.255.255 md5\n"
    );
    let mut c = config(&db, &["pgtide_scram", "pgtide_trust", "pgtide_md5"]);
    c.pgtide.auth_hba_file = write_file(&dir, "pg_hba.conf", &hba);
    c.pgtide.auth_user = harness::APP_USER.into();
    c.pgtide.auth_query_cache_ttl = ConfigDuration::secs(300);
    let pooler = harness::start_pgtide(c).await;
    let addr = pooler.local_addr();
    let lo: IpAddr = [127, 0, 0, 1].into();
    let lo2: IpAddr = [127, 0, 0, 2].into();
    let lo3: IpAddr = [127, 0, 0, 3].into();

    // Allowed by its line.
    let app = connect_from(lo, addr, "app", "apppass", &db)
        .await
        .expect("app");
    assert_eq!(whoami(&app).await, "app");
    // Rejected by a reject line, whatever the password.
    let (code, message) = refused(connect_from(lo, addr, "pgtide_scram", "scrampass", &db).await);
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        format!("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"pgtide_scram\", database \"{db}\", no encryption")
    );
    // No line matches (no line for this database from 127.0.0.1).
    let (code, message) = refused(connect_from(lo, addr, "app", "apppass", "postgres").await);
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"postgres\", no encryption"
    );
    // The line's method overrides auth_type: pgtide_trust has auth_type trust in the
    // config, but its line says scram-sha-256 and it has no password.
    assert_eq!(
        refused(connect_from(lo, addr, "pgtide_trust", "nottrust", &db).await).0,
        "28P01"
    );
    // (hostssl and cert lines with TLS clients: integration/tls.rs.)

    // From 127.0.0.2 the method is password (clear text): checked against the SCRAM
    // verifier fetched with auth_query, and the password logs in to the server.
    let c = connect_from(lo2, addr, &changing, "first", &db)
        .await
        .expect("password method");
    assert_eq!(whoami(&c).await, changing);
    // The password changes on the server after pgtide cached the verifier: the failed
    // check re-fetches it and judges the same clear-text answer again, so the new
    // password works at once.
    admin(&format!("ALTER ROLE {changing} PASSWORD 'second'"));
    let c = connect_from(lo2, addr, &changing, "second", &db)
        .await
        .expect("new password after a re-fetch");
    assert_eq!(whoami(&c).await, changing);
    assert_eq!(
        refused(connect_from(lo2, addr, &changing, "first", &db).await),
        wrong_password(&changing)
    );
    // 127.0.0.3 with an address and mask, a quoted database name in a list: md5 (the
    // SCRAM verifier makes it a SCRAM exchange, as PostgreSQL does).
    let c = connect_from(lo3, addr, &changing, "second", &db)
        .await
        .expect("md5 line");
    assert_eq!(whoami(&c).await, changing);
    let (code, _) = refused(connect_from(lo3, addr, "pgtide_md5", "md5pass", &db).await);
    assert_eq!(code, "28000");
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_slowed_down_and_others_are_not() {
    // A current-thread runtime: pgtide and the clients share one thread, so a delay that
    // blocked it would hold up the other address's login too.
    let delay = Duration::from_secs(3);
    let (db, _pooler, addr) = harness::setup("cred_slow", |c| {
        c.pgtide.auth_failure_threshold = 2;
        c.pgtide.auth_failure_delay = ConfigDuration(delay);
        c.pgtide.auth_failure_delay_max = ConfigDuration(delay * 2);
    })
    .await;
    let bad: IpAddr = [127, 0, 0, 1].into();
    let good: IpAddr = [127, 0, 0, 2].into();

    // Below the threshold: answered at once (well under the delay).
    for _ in 0..2 {
        let t = Instant::now();
        assert_eq!(
            refused(connect_from(bad, addr, "app", "guess", &db).await),
            wrong_password("app")
        );
        assert!(t.elapsed() < delay, "{:?}", t.elapsed());
    }

    // The third failure waits for the delay; meanwhile another address logs in.
    let t = Instant::now();
    let slow = tokio::spawn({
        let db = db.clone();
        async move { refused(connect_from(bad, addr, "app", "guess", &db).await) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = connect_from(good, addr, "app", "apppass", &db)
        .await
        .expect("another address logs in");
    assert_eq!(whoami(&c).await, "app");
    assert!(
        !slow.is_finished(),
        "the other address's login finished only after the slowed-down one"
    );
    assert_eq!(slow.await.unwrap(), wrong_password("app"));
    assert!(t.elapsed() >= delay, "answered after {:?}", t.elapsed());

    // Even the right password from the failing address waits (doubled: 6 s), so that a
    // right guess cannot be told by its speed; it then clears the address's count.
    let t = Instant::now();
    let c = connect_from(bad, addr, "app", "apppass", &db)
        .await
        .expect("right password");
    assert!(t.elapsed() >= delay * 2, "answered after {:?}", t.elapsed());
    assert_eq!(whoami(&c).await, "app");
    let t = Instant::now();
    assert_eq!(
        refused(connect_from(bad, addr, "app", "guess", &db).await),
        wrong_password("app")
    );
    assert!(t.elapsed() < delay, "{:?}", t.elapsed());
}

// --- forged and malformed authentication messages ---------------------------------------

/// A PasswordMessage-type message ('p') with `body`, its length field set to `len`.
fn p_message(body: &[u8], len: u32) -> Vec<u8> {
    let mut m = vec![b'p'];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn p_ok(body: &[u8]) -> Vec<u8> {
    p_message(body, body.len() as u32 + 4)
}

fn sasl_initial(data: &[u8]) -> Vec<u8> {
    let mut b = b"SCRAM-SHA-256\0".to_vec();
    b.extend_from_slice(&(data.len() as i32).to_be_bytes());
    b.extend_from_slice(data);
    p_ok(&b)
}

fn auth_code(m: &Msg) -> i32 {
    assert_eq!(m.tag, b'R', "expected an authentication request, got {m:?}");
    i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]])
}

/// Starts a login as `user`; returns the connection and the authentication request.
async fn start(addr: SocketAddr, user: &str, db: &str) -> (RawPg, Msg) {
    let mut c = RawPg::connect(addr).await;
    c.send(&startup(PROTOCOL_3_0, &[("user", user), ("database", db)]))
        .await;
    let m = c.recv().await;
    (c, m)
}

/// A SCRAM exchange as `app` up to the client-final-message, which `tamper` changes.
async fn scram_with(addr: SocketAddr, db: &str, tamper: impl FnOnce(String) -> String) -> RawPg {
    let (mut c, m) = start(addr, "app", db).await;
    assert_eq!(auth_code(&m), 10);
    let mut client = ScramClient::new("", scram::random_nonce());
    c.send(&sasl_initial(client.client_first().as_bytes()))
        .await;
    let m = c.recv().await;
    assert_eq!(auth_code(&m), 11);
    let first = client.server_first(&m.body[4..]).expect("server-first");
    let salted = scram::salted_password(harness::APP_PASSWORD, &first.salt, first.iterations);
    let fin = tamper(client.client_final(&salted).expect("client-final"));
    c.send(&p_ok(fin.as_bytes())).await;
    c
}

/// The FATAL the connection gets, after which it must be closed.
async fn fatal_then_closed(mut c: RawPg, what: &str) -> String {
    let m = c.recv().await;
    assert_eq!(m.tag, b'E', "{what}: expected an ErrorResponse, got {m:?}");
    assert_eq!(m.severity().as_deref(), Some("FATAL"), "{what}");
    assert!(
        c.try_recv().await.is_err(),
        "{what}: the connection stayed open after FATAL"
    );
    m.sqlstate().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_auth_messages_get_a_clean_fatal_and_spare_others() {
    let (db, _pooler, addr) = harness::setup("cred_forged", |c| {
        // No slowdown: this test fails on purpose many times from one address.
        c.pgtide.auth_failure_threshold = 0;
    })
    .await;
    // A client in the middle of a transaction throughout.
    let good = login(addr, "app", "apppass", &db)
        .await
        .expect("good client");
    to("begin", good.batch_execute("BEGIN; CREATE TABLE t (x int)"))
        .await
        .unwrap();

    // Sanity: the untampered exchange succeeds.
    let mut ok = scram_with(addr, &db, |f| f).await;
    assert_eq!(auth_code(&ok.recv().await), 12);
    assert_eq!(auth_code(&ok.recv().await), 0);

    // A tampered ClientProof: a wrong password, 28P01.
    let c = scram_with(addr, &db, |f| {
        let (head, proof) = f.rsplit_once(",p=").unwrap();
        let mut raw = base64_decode(proof);
        raw[0] ^= 1;
        format!("{head},p={}", base64_encode(&raw))
    })
    .await;
    assert_eq!(fatal_then_closed(c, "tampered proof").await, "28P01");
    // A nonce that is not the one of this exchange: a protocol violation, 08P01.
    let c = scram_with(addr, &db, |f| f.replacen(",r=", ",r=X", 1)).await;
    assert_eq!(fatal_then_closed(c, "wrong nonce").await, "08P01");
    // A SASLResponse that is empty, and one cut short (its length says less than the
    // data that follows, leaving garbage as the next message).
    let (mut c, _) = start(addr, "app", &db).await;
    let client = ScramClient::new("", scram::random_nonce());
    c.send(&sasl_initial(client.client_first().as_bytes()))
        .await;
    assert_eq!(auth_code(&c.recv().await), 11);
    c.send(&p_ok(b"")).await;
    assert_eq!(fatal_then_closed(c, "empty SASLResponse").await, "08P01");

    // md5 computed with another salt: 28P01.
    let (mut c, m) = start(addr, "pgtide_md5", &db).await;
    assert_eq!(auth_code(&m), 5);
    let mut salt: [u8; 4] = m.body[4..8].try_into().unwrap();
    salt[3] = salt[3].wrapping_add(1);
    let hash = pgtide::auth::md5::password_hash("md5pass", "pgtide_md5");
    let response = pgtide::auth::md5::salted_response(&hash, salt);
    c.send(&p_ok(format!("{response}\0").as_bytes())).await;
    assert_eq!(fatal_then_closed(c, "md5 with a wrong salt").await, "28P01");

    // Length fields that lie: below the minimum, beyond max_message_size, and a
    // PasswordMessage whose content has no terminating NUL.
    for (what, user, bytes) in [
        ("length 3", "app", p_message(b"", 3)),
        ("length 2 GiB", "app", p_message(b"SCRAM", 0x7fff_fff0)),
        ("md5 without NUL", "pgtide_md5", p_ok(b"md5abc")),
        (
            "SASLInitialResponse data length beyond the message",
            "app",
            {
                let mut b = b"SCRAM-SHA-256\0".to_vec();
                b.extend_from_slice(&1000i32.to_be_bytes());
                b.extend_from_slice(b"n,,n=,r=abc");
                p_ok(&b)
            },
        ),
        (
            "a query instead of a password",
            "app",
            rawpg::query("SELECT 1"),
        ),
    ] {
        let (mut c, _) = start(addr, user, &db).await;
        c.send(&bytes).await;
        assert_eq!(fatal_then_closed(c, what).await, "08P01", "{what}");
    }
    // A message cut off by the client going away: nothing to answer, nothing breaks.
    let (mut c, _) = start(addr, "app", &db).await;
    c.send(&p_message(b"SCRAM-SHA-256\0", 100)).await;
    drop(c);

    // The transaction of the good client carries on; new clients log in.
    to(
        "commit",
        good.batch_execute("INSERT INTO t VALUES (1); COMMIT"),
    )
    .await
    .expect("the good client's transaction");
    let other = login(addr, "app", "apppass", &db)
        .await
        .expect("new client");
    let rows = to("count", other.simple_query("SELECT count(*)::text FROM t"))
        .await
        .unwrap();
    let n = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("1"));
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_monitors_log_in_as_an_auth_file_user() {
    use pgtide::config::{Database, HostConfig, HostRole};
    let db = harness::fresh_database("cred_monitor");
    let dir = tempfile::tempdir().unwrap();
    let mut c = harness::config_for(&db);
    // No [users] at all: every password is in the auth_file.
    c.users.clear();
    c.pgtide.auth_file = write_file(
        &dir,
        "userlist.txt",
        &format!("\"{}\" \"{}\"\n", harness::APP_USER, harness::APP_PASSWORD),
    );
    let host = |port, role| HostConfig {
        host: "127.0.0.1".into(),
        port,
        role,
        weight: 1,
    };
    let d = c.databases.get_mut(&db).unwrap();
    *d = Database {
        hosts: Some(vec![
            host(primary_port(), HostRole::Primary),
            host(harness::replica_port(), HostRole::Replica),
        ]),
        dbname: d.dbname.clone(),
        ..Database::default()
    };
    c.pgtide.primary_reads = false;
    c.pgtide.health_check_interval = ConfigDuration(Duration::from_millis(100));
    let pooler = harness::start_pgtide(c).await;
    let client = login(
        pooler.local_addr(),
        harness::APP_USER,
        harness::APP_PASSWORD,
        &db,
    )
    .await
    .expect("auth_file user");
    // Reads reach the replica only once its monitor has logged in and seen it up.
    for _ in 0..100 {
        let rows = to(
            "read",
            client.simple_query("SELECT pg_is_in_recovery()::text"),
        )
        .await
        .expect("read");
        let v = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        if v.as_deref() == Some("true") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reads never reached the replica: the monitors could not log in");
}
