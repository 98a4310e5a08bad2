//! TLS on both sides of pgtide, with certificates made in the test (rcgen): psql and
//! tokio-postgres (rustls) clients with sslmode require / verify-ca / verify-full, a
//! wrong CA and a wrong host name, plain clients under `require`, `cert` authentication,
//! `auth_hba_file` `hostssl` / `hostnossl` / `cert` lines, PostgreSQL 17 direct TLS, pgtide to a `hostssl`-only server with verify-full,
//! certificate reload, and pgbench over TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pgtide::config::{AuthType, ClientSslMode, Config, Database, ServerSslMode};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::harness::{self, to, APP_PASSWORD, APP_USER};

use crate::rawpg;

// --- certificates ------------------------------------------------------------------------

/// A CA made for one test.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A certificate signed by this CA: (certificate PEM, key PEM).
    pub(crate) fn issue(&self, cn: &str, names: &[&str], client: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        p.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    pub(crate) fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

/// Writes `text` to `dir/name` with mode 0600 (libpq refuses readable key files).
pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and client certificates with
/// CN `app` and `pgtide_trust`, in a temporary directory.
struct Certs {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("pgtide test CA");
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());
        let (c, k) = ca.issue("pgtide", &["localhost", "127.0.0.1"], false);
        let server_cert = write(dir.path(), "server.crt", &c);
        let server_key = write(dir.path(), "server.key", &k);
        for user in ["app", "pgtide_trust"] {
            let (c, k) = ca.issue(user, &[], true);
            write(dir.path(), &format!("{user}.crt"), &c);
            write(dir.path(), &format!("{user}.key"), &k);
        }
        Certs {
            dir,
            ca,
            ca_file,
            server_cert,
            server_key,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Client TLS on with `mode`, with the server certificate and the CA.
    fn client_tls(&self, config: &mut Config, mode: ClientSslMode) {
        config.pgtide.client_tls_sslmode = mode;
        config.pgtide.client_tls_cert_file = self.server_cert.display().to_string();
        config.pgtide.client_tls_key_file = self.server_key.display().to_string();
        config.pgtide.client_tls_ca_file = self.ca_file.display().to_string();
    }
}

// --- clients -------------------------------------------------------------------------------

/// Runs psql with a connection string and one command: (success, stdout, stderr).
async fn psql(conninfo: &str, command: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            command,
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "20")
        .env_remove("PGSSLMODE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = to("psql", out).await.expect("cannot run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn conninfo(addr: SocketAddr, user: &str, db: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname={db} {extra}",
        addr.port()
    )
}

/// A rustls client configuration trusting `roots`, with an optional client certificate.
fn rustls_client(roots: &[CertificateDer<'static>], alpn: bool) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    if alpn {
        c.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    c
}

/// tokio-postgres over rustls.
#[derive(Clone)]
struct MakeRustls(Arc<rustls::ClientConfig>);

struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string()).map_err(io::Error::other)?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(s))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connects with tokio-postgres over rustls (`sslmode=require` in `conn_str`).
pub(crate) async fn connect_tls(
    conn_str: &str,
    roots: &[CertificateDer<'static>],
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_rustls(conn_str, rustls_client(roots, false)).await
}

/// Connects with tokio-postgres over rustls, presenting the client certificate and key
/// in the PEM files `cert` and `key`.
pub(crate) async fn connect_tls_with_cert(
    conn_str: &str,
    roots: &[CertificateDer<'static>],
    cert: &Path,
    key: &Path,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("client certificate file")
        .collect::<Result<_, _>>()
        .expect("client certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("client key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_client_auth_cert(chain, key)
        .expect("client certificate and key");
    connect_rustls(conn_str, c).await
}

async fn connect_rustls(
    conn_str: &str,
    config: rustls::ClientConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = MakeRustls(Arc::new(config));
    let (client, connection) = to("TLS login", tokio_postgres::connect(conn_str, tls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub(crate) async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    let row = to(sql, c.query_one(sql, &[]))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get::<_, String>(0)
}

// --- client side ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_require_verify_ca_and_verify_full() {
    let certs = Certs::new();
    let (db, _pooler, addr) = harness::setup("tls_psql", |c| {
        certs.client_tls(c, ClientSslMode::Require);
    })
    .await;
    let ca = format!("sslrootcert={}", certs.ca_file.display());

    for (what, extra) in [
        ("require", "sslmode=require".to_string()),
        ("verify-ca", format!("sslmode=verify-ca {ca}")),
    ] {
        let (ok, out, err) = psql(&conninfo(addr, APP_USER, &db, &extra), "SELECT 40 + 2").await;
        assert!(ok, "psql {what}: {err}");
        assert_eq!(out, "42", "psql {what}");
    }
    // verify-full by name and by address: the certificate has both.
    let by_name = format!(
        "host=localhost port={} user={APP_USER} dbname={db} sslmode=verify-full {ca}",
        addr.port()
    );
    let (ok, out, err) = psql(&by_name, "\\conninfo").await;
    assert!(ok, "psql verify-full: {err}");
    assert!(out.contains("SSL connection"), "{out}");
    let (ok, _, err) = psql(
        &conninfo(addr, APP_USER, &db, &format!("sslmode=verify-full {ca}")),
        "SELECT 1",
    )
    .await;
    assert!(ok, "psql verify-full to 127.0.0.1: {err}");

    // Another CA: refused by the client.
    let other = Ca::new("someone else");
    let other_file = write(certs.dir.path(), "other-ca.pem", &other.pem());
    let (ok, _, err) = psql(
        &conninfo(
            addr,
            APP_USER,
            &db,
            &format!("sslmode=verify-ca sslrootcert={}", other_file.display()),
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a certificate from another CA was accepted");
    assert!(err.contains("certificate verify failed"), "{err}");

    // A host name the certificate does not have: refused under verify-full.
    let wrong_name = format!(
        "host=db.example.invalid hostaddr=127.0.0.1 port={} user={APP_USER} dbname={db} sslmode=verify-full {ca}",
        addr.port()
    );
    let (ok, _, err) = psql(&wrong_name, "SELECT 1").await;
    assert!(!ok, "a certificate for another host name was accepted");
    assert!(err.contains("does not match host name"), "{err}");

    // Without TLS: a clear FATAL.
    let (ok, _, err) = psql(
        &conninfo(addr, APP_USER, &db, "sslmode=disable"),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a plain connection was accepted under require");
    assert!(err.contains("TLS is required"), "{err}");
    let plain = harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db);
    let e = harness::connect(&format!("{plain} sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("a plain tokio-postgres connection was accepted under require");
    let db_err = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "28000");
    assert!(db_err.message().contains("TLS is required"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_with_rustls() {
    let certs = Certs::new();
    let (db, _pooler, addr) = harness::setup("tls_tokio", |c| {
        certs.client_tls(c, ClientSslMode::Prefer);
    })
    .await;
    let base = harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db);
    let c = connect_tls(&format!("{base} sslmode=require"), &[certs.ca.der()])
        .await
        .expect("TLS connection");
    assert_eq!(one(&c, "SELECT 'over tls'").await, "over tls");
    // Extended protocol, many rows: the TLS session loop forwards it all.
    let rows = to(
        "generate_series",
        c.query(
            "SELECT g, repeat('x', 100) FROM generate_series(1, $1) g",
            &[&20000i32],
        ),
    )
    .await
    .expect("query");
    assert_eq!(rows.len(), 20000);
    assert_eq!(rows[19999].get::<_, i32>(0), 20000);

    // Under prefer, plain clients are served too.
    let plain = harness::connect(&format!("{base} sslmode=disable"))
        .await
        .expect("plain connection under prefer");
    assert_eq!(one(&plain, "SELECT 'plain'").await, "plain");

    // Another CA: the handshake fails.
    let other = Ca::new("someone else");
    let e = connect_tls(&format!("{base} sslmode=require"), &[other.der()])
        .await
        .map(|_| ())
        .expect_err("a certificate from another CA was accepted");
    assert!(
        format!("{e:?}").contains("UnknownIssuer"),
        "unexpected error: {e:?}"
    );
    // A host name the certificate does not have.
    let wrong = base.replace("host=127.0.0.1", "host=other.invalid hostaddr=127.0.0.1");
    let e = connect_tls(&format!("{wrong} sslmode=require"), &[certs.ca.der()])
        .await
        .map(|_| ())
        .expect_err("a certificate for another name was accepted");
    assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_auth_maps_the_common_name_to_the_user() {
    let certs = Certs::new();
    let (db, _pooler, addr) = harness::setup("tls_cert", |c| {
        certs.client_tls(c, ClientSslMode::VerifyFull);
        c.users
            .get_mut("pgtide_trust")
            .expect("pgtide_trust")
            .auth_type = Some(AuthType::Cert);
    })
    .await;
    let ca = format!("sslrootcert={}", certs.ca_file.display());
    let with_cert = |cn: &str| {
        format!(
            "sslmode=verify-full {ca} sslcert={} sslkey={}",
            certs.path(&format!("{cn}.crt")),
            certs.path(&format!("{cn}.key"))
        )
    };

    let (ok, out, err) = psql(
        &conninfo(addr, "pgtide_trust", &db, &with_cert("pgtide_trust")),
        "SELECT current_user",
    )
    .await;
    assert!(ok, "cert auth with the right CN: {err}");
    assert_eq!(out, "pgtide_trust");

    // A certificate for another user.
    let (ok, _, err) = psql(
        &conninfo(addr, "pgtide_trust", &db, &with_cert("app")),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a certificate with CN app logged in as pgtide_trust");
    assert!(
        err.contains("certificate authentication failed for user \"pgtide_trust\""),
        "{err}"
    );

    // Password users still use their password (with a valid certificate, as verify-full
    // requires one).
    let (ok, out, err) = psql(
        &conninfo(addr, APP_USER, &db, &with_cert("app")),
        "SELECT current_user",
    )
    .await;
    assert!(ok, "password user under verify-full: {err}");
    assert_eq!(out, APP_USER);

    // No client certificate: verify-full refuses the handshake.
    let (ok, _, err) = psql(
        &conninfo(
            addr,
            "pgtide_trust",
            &db,
            &format!("sslmode=verify-full {ca}"),
        ),
        "SELECT 1",
    )
    .await;
    assert!(
        !ok,
        "a client without a certificate was accepted under verify-full"
    );
    assert!(!err.is_empty());
}

// --- auth_hba_file with TLS ---------------------------------------------------------------

/// `no pg_hba.conf entry ...` as PostgreSQL words it.
fn no_hba_entry(user: &str, db: &str, tls: bool) -> String {
    let encryption = if tls {
        "SSL encryption"
    } else {
        "no encryption"
    };
    format!("no pg_hba.conf entry for host \"127.0.0.1\", user \"{user}\", database \"{db}\", {encryption}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_hostssl_and_hostnossl_lines_tell_tls_clients_from_plain_ones() {
    let certs = Certs::new();
    let db = harness::fresh_database("tls_hba_ssl");
    let mut config = harness::config_for(&db);
    // prefer: both TLS and plain clients reach the hba check.
    certs.client_tls(&mut config, ClientSslMode::Prefer);
    let hba = format!(
        "# TYPE   DATABASE USER          ADDRESS       METHOD\n\
         hostssl   {db}     app           127.0.0.1/32  scram-sha-256\n\
         hostnossl {db}     pgtide_scram  127.0.0.1/32  scram-sha-256\n"
    );
    config.pgtide.auth_hba_file = write(certs.dir.path(), "pg_hba.conf", &hba)
        .display()
        .to_string();
    let pooler = harness::start_pgtide(config).await;
    let addr = pooler.local_addr();
    let app = harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db);
    let scram = harness::tcp_connect_string(addr, "pgtide_scram", "scrampass", &db);
    let roots = [certs.ca.der()];

    // hostssl: a TLS client logs in, the same client in clear text matches no line.
    let c = connect_tls(&format!("{app} sslmode=require"), &roots)
        .await
        .expect("app over TLS on a hostssl line");
    assert_eq!(one(&c, "SELECT current_user::text").await, APP_USER);
    let (code, message) =
        crate::credentials::refused(harness::connect(&format!("{app} sslmode=disable")).await);
    assert_eq!(code, "28000");
    assert_eq!(message, no_hba_entry(APP_USER, &db, false));
    let (ok, out, err) = psql(
        &conninfo(addr, APP_USER, &db, "sslmode=require"),
        "\\conninfo",
    )
    .await;
    assert!(ok, "psql sslmode=require on a hostssl line: {err}");
    assert!(out.contains("SSL connection"), "{out}");
    let (ok, _, err) = psql(
        &conninfo(addr, APP_USER, &db, "sslmode=disable"),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a plain psql matched a hostssl line");
    assert!(err.contains(&no_hba_entry(APP_USER, &db, false)), "{err}");
    // libpq's sslmode=allow tries clear text first and, refused, again with TLS.
    let (ok, out, err) = psql(
        &conninfo(addr, APP_USER, &db, "sslmode=allow"),
        "\\conninfo",
    )
    .await;
    assert!(ok, "psql sslmode=allow on a hostssl line: {err}");
    assert!(out.contains("SSL connection"), "{out}");

    // hostnossl: the other way round.
    let c = harness::connect(&format!("{scram} sslmode=disable"))
        .await
        .expect("plain client on a hostnossl line");
    assert_eq!(one(&c, "SELECT current_user::text").await, "pgtide_scram");
    let (code, message) =
        crate::credentials::refused(connect_tls(&format!("{scram} sslmode=require"), &roots).await);
    assert_eq!(code, "28000");
    assert_eq!(message, no_hba_entry("pgtide_scram", &db, true));
    let with_password = "password=scrampass";
    let (ok, _, err) = psql(
        &conninfo(
            addr,
            "pgtide_scram",
            &db,
            &format!("{with_password} sslmode=require"),
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a TLS psql matched a hostnossl line");
    assert!(
        err.contains(&no_hba_entry("pgtide_scram", &db, true)),
        "{err}"
    );
    // libpq's default sslmode=prefer tries TLS first and, refused, again in clear text.
    let (ok, out, err) = psql(
        &conninfo(
            addr,
            "pgtide_scram",
            &db,
            &format!("{with_password} sslmode=prefer"),
        ),
        "\\conninfo",
    )
    .await;
    assert!(ok, "psql sslmode=prefer on a hostnossl line: {err}");
    assert!(out.contains("You are connected"), "{out}");
    assert!(!out.contains("SSL connection"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_cert_line_maps_the_common_name_to_the_user() {
    let certs = Certs::new();
    let db = harness::fresh_database("tls_hba_cert");
    let mut config = harness::config_for(&db);
    // require with a CA: a client certificate is asked for and checked, not demanded in
    // the handshake; the hba line decides.
    certs.client_tls(&mut config, ClientSslMode::Require);
    // pgtide_scram has a password in the config; its cert line means it is never asked.
    let hba = format!(
        "hostssl {db} pgtide_scram 127.0.0.1/32 cert\n\
         hostssl {db} app          127.0.0.1/32 scram-sha-256\n"
    );
    config.pgtide.auth_hba_file = write(certs.dir.path(), "pg_hba.conf", &hba)
        .display()
        .to_string();
    let pooler = harness::start_pgtide(config).await;
    let addr = pooler.local_addr();
    let (cert, key) = certs.ca.issue("pgtide_scram", &[], true);
    let user_crt = write(certs.dir.path(), "pgtide_scram.crt", &cert);
    let user_key = write(certs.dir.path(), "pgtide_scram.key", &key);
    let roots = [certs.ca.der()];
    // A wrong password: the login must not depend on it.
    let base = harness::tcp_connect_string(addr, "pgtide_scram", "not the password", &db);
    let base = format!("{base} sslmode=require");

    // The certificate of the user: in, without a password.
    let c = connect_tls_with_cert(&base, &roots, &user_crt, &user_key)
        .await
        .expect("cert login with the user's certificate");
    assert_eq!(one(&c, "SELECT current_user::text").await, "pgtide_scram");
    let ca = format!("sslrootcert={}", certs.ca_file.display());
    let psql_with = |crt: &str, key: &str| {
        format!("password=wrong sslmode=verify-full {ca} sslcert={crt} sslkey={key}")
    };
    let (ok, out, err) = psql(
        &conninfo(
            addr,
            "pgtide_scram",
            &db,
            &psql_with(
                &user_crt.display().to_string(),
                &user_key.display().to_string(),
            ),
        ),
        "SELECT current_user",
    )
    .await;
    assert!(ok, "psql cert login: {err}");
    assert_eq!(out, "pgtide_scram");

    // Another user's certificate (CN app).
    let refusal = "certificate authentication failed for user \"pgtide_scram\"";
    let (code, message) = crate::credentials::refused(
        connect_tls_with_cert(
            &base,
            &roots,
            &certs.dir.path().join("app.crt"),
            &certs.dir.path().join("app.key"),
        )
        .await,
    );
    assert_eq!((code.as_str(), message.as_str()), ("28000", refusal));
    let (ok, _, err) = psql(
        &conninfo(
            addr,
            "pgtide_scram",
            &db,
            &psql_with(&certs.path("app.crt"), &certs.path("app.key")),
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a certificate with CN app logged in as pgtide_scram");
    assert!(err.contains(refusal), "{err}");

    // TLS without a client certificate.
    let missing = "connection requires a valid client certificate";
    let (code, message) = crate::credentials::refused(connect_tls(&base, &roots).await);
    assert_eq!((code.as_str(), message.as_str()), ("28000", missing));
    let nowhere = certs.path("none.crt");
    let (ok, _, err) = psql(
        &conninfo(
            addr,
            "pgtide_scram",
            &db,
            &format!("password=scrampass sslmode=require sslcert={nowhere}"),
        ),
        "SELECT 1",
    )
    .await;
    assert!(!ok, "a TLS client without a certificate passed a cert line");
    assert!(err.contains(missing), "{err}");

    // The other line of the same file still asks app for its password, certificate or not.
    let app = harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db);
    let c = connect_tls_with_cert(
        &format!("{app} sslmode=require"),
        &roots,
        &certs.dir.path().join("app.crt"),
        &certs.dir.path().join("app.key"),
    )
    .await
    .expect("app with its password");
    assert_eq!(one(&c, "SELECT current_user::text").await, APP_USER);
    let wrong = harness::tcp_connect_string(addr, APP_USER, "wrong", &db);
    let (code, _) = crate::credentials::refused(
        connect_tls_with_cert(
            &format!("{wrong} sslmode=require"),
            &roots,
            &certs.dir.path().join("app.crt"),
            &certs.dir.path().join("app.key"),
        )
        .await,
    );
    assert_eq!(code, "28P01");
}

/// Reads one backend message from a TLS stream.
async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> rawpg::Msg {
    let mut head = [0u8; 5];
    to("read", s.read_exact(&mut head)).await.expect("read");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    to("read", s.read_exact(&mut body)).await.expect("read");
    rawpg::Msg { tag: head[0], body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_gets_a_session() {
    let certs = Certs::new();
    let (db, _pooler, addr) = harness::setup("tls_direct", |c| {
        certs.client_tls(c, ClientSslMode::Require);
    })
    .await;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&[certs.ca.der()], true)));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    // The first bytes on the wire are the ClientHello: no SSLRequest.
    let mut tls = to("handshake", connector.connect(name, tcp))
        .await
        .expect("direct TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&rawpg::startup(
        rawpg::PROTOCOL_3_0,
        &[("user", "pgtide_trust"), ("database", &db)],
    ))
    .await
    .expect("startup");
    loop {
        let m = read_msg(&mut tls).await;
        assert_ne!(m.tag, b'E', "login refused: {:?}", m.message());
        if m.tag == b'Z' {
            break;
        }
    }
    tls.write_all(&rawpg::query("SELECT 6 * 7"))
        .await
        .expect("query");
    let mut value = None;
    loop {
        let m = read_msg(&mut tls).await;
        assert_ne!(m.tag, b'E', "query failed: {:?}", m.message());
        if m.tag == b'D' {
            value = m.data_row()[0].clone();
        }
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(value.as_deref(), Some("42"));

    // Direct TLS without ALPN "postgresql" is refused, as PostgreSQL 17 does.
    let no_alpn =
        tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&[certs.ca.der()], false)));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    if let Ok(mut tls) = to("handshake", no_alpn.connect(name, tcp)).await {
        let _ = tls
            .write_all(&rawpg::startup(
                rawpg::PROTOCOL_3_0,
                &[("user", "pgtide_trust"), ("database", &db)],
            ))
            .await;
        let mut b = [0u8; 1];
        let n = to("read", tls.read(&mut b)).await.unwrap_or(0);
        assert_eq!(n, 0, "a direct TLS client without ALPN got an answer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_clients() {
    let certs = Certs::new();
    let (db, pooler, addr) = harness::setup("tls_reload", |c| {
        certs.client_tls(c, ClientSslMode::Require);
    })
    .await;
    let base = format!(
        "{} sslmode=require",
        harness::tcp_connect_string(addr, APP_USER, APP_PASSWORD, &db)
    );
    let old_roots = [certs.ca.der()];
    let before = connect_tls(&base, &old_roots).await.expect("connect");
    assert_eq!(one(&before, "SELECT 'before'").await, "before");

    // A new CA and server certificate in the same files.
    let ca2 = Ca::new("pgtide test CA 2");
    let (c, k) = ca2.issue("pgtide", &["localhost", "127.0.0.1"], false);
    write(certs.dir.path(), "server.crt", &c);
    write(certs.dir.path(), "server.key", &k);
    // Not yet reloaded: still the old certificate.
    connect_tls(&base, &old_roots)
        .await
        .expect("the old certificate until reload");
    pooler.reload_tls().expect("reload");

    let e = connect_tls(&base, &old_roots)
        .await
        .map(|_| ())
        .expect_err("the old certificate is still served after reload");
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    let after = connect_tls(&base, &[ca2.der()])
        .await
        .expect("the new certificate after reload");
    assert_eq!(one(&after, "SELECT 'after'").await, "after");
    // The client connected before the reload keeps its session.
    assert_eq!(one(&before, "SELECT 'still here'").await, "still here");

    // A broken file on reload: the error is reported and the current certificate stays.
    write(certs.dir.path(), "server.key", "not a key");
    let err = pooler
        .reload_tls()
        .expect_err("a broken key must fail the reload");
    assert!(err.contains("client_tls_key_file"), "{err}");
    connect_tls(&base, &[ca2.der()])
        .await
        .expect("the certificate in use stays after a failed reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_over_tls_has_no_failures() {
    let certs = Certs::new();
    let (db, _pooler, addr) = harness::setup("tls_pgbench", |c| {
        certs.client_tls(c, ClientSslMode::Require);
        c.pgtide.pool_size = 5;
    })
    .await;
    let env = [("PGSSLMODE", "require")];
    let (ok, out, err) =
        crate::pgbench::pgbench_env(addr.port(), &db, &["-i", "-s", "1", "-q"], &env).await;
    assert!(ok, "pgbench -i over TLS failed:\n{out}\n{err}");
    let simple = crate::pgbench::run_env(addr, &db, "simple", 4, false, &env).await;
    let extended = crate::pgbench::run_env(addr, &db, "extended", 4, false, &env).await;
    crate::pgbench::check_balances(&db, simple + extended);
}

// --- server side ---------------------------------------------------------------------------

/// A PostgreSQL of the test's own with `ssl = on`, a certificate from the CA of `certs`
/// for the name `localhost` only (not 127.0.0.1), and only `hostssl` rules for TCP.
/// Database `tlsdb`, user app (SCRAM).
async fn tls_only_server(certs: &Certs) -> Arc<pgtide::demo::LocalCluster> {
    use pgtide::demo::ClusterOptions;
    use std::os::unix::fs::MetadataExt;
    let lc = harness::own_cluster(ClusterOptions {
        users: vec![(APP_USER.to_string(), APP_PASSWORD.to_string(), true)],
        databases: vec!["tlsdb".to_string()],
        with_replica: false,
    })
    .await;
    let data = lc.dir.join("primary");
    let owner = std::fs::metadata(&data).expect("data dir");
    let (cert, key) = certs.ca.issue("postgres", &["localhost"], false);
    for (text, to_name) in [(cert, "server.crt"), (key, "server.key")] {
        let path = write(&data, to_name, &text);
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).expect("chown");
    }
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("postgresql.conf");
    std::io::Write::write_all(
        &mut conf,
        b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
    )
    .expect("write postgresql.conf");
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("pg_hba.conf");
    lc.psql(lc.primary_port, "postgres", "SELECT pg_reload_conf()")
        .expect("reload");
    // Wait until the reload took: a TLS connection works.
    let direct = harness::tcp_connect_string(
        harness::direct_addr(lc.primary_port),
        APP_USER,
        APP_PASSWORD,
        "tlsdb",
    )
    .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1");
    let mut last = String::new();
    for _ in 0..100 {
        match connect_tls(&format!("{direct} sslmode=require"), &[certs.ca.der()]).await {
            Ok(_) => return Arc::new(lc),
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the server did not start TLS: {last}");
}

/// A client login through a pgtide whose connections to the server at `host:port` use
/// `mode` with `ca_file`; the pooler is returned too, to keep it running.
async fn login_through_server_tls(
    host: &str,
    port: u16,
    mode: ServerSslMode,
    ca_file: &Path,
) -> (
    pgtide::Pooler,
    Result<tokio_postgres::Client, tokio_postgres::Error>,
) {
    let pooler = harness::start_pgtide(config_for_server(host, port, mode, ca_file)).await;
    let url = harness::tcp_connect_string(pooler.local_addr(), APP_USER, APP_PASSWORD, "tlsdb");
    let login = harness::connect(&url).await;
    (pooler, login)
}

/// A login refused with 08006 whose message says `why`.
fn assert_server_unreachable(
    login: Result<tokio_postgres::Client, tokio_postgres::Error>,
    what: &str,
    why: &str,
) {
    let e = login.map(|_| ()).expect_err(what);
    let d = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(d.code().code(), "08006", "{d:?}");
    assert!(d.message().contains(why), "{}", d.message());
}

fn config_for_server(host: &str, port: u16, mode: ServerSslMode, ca_file: &Path) -> Config {
    let mut config = harness::config_for("tlsdb");
    *config.databases.get_mut("tlsdb").expect("tlsdb") = Database {
        host: host.to_string(),
        port,
        server_tls_sslmode: Some(mode),
        server_tls_ca_file: Some(ca_file.display().to_string()),
        ..Database::default()
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgtide_to_a_tls_only_server_with_verify_full() {
    let certs = Certs::new();
    let lc = tls_only_server(&certs).await;
    let port = lc.primary_port;

    // The server takes no plain TCP connection (hostssl rules only).
    let plain_direct =
        harness::tcp_connect_string(harness::direct_addr(port), APP_USER, APP_PASSWORD, "tlsdb");
    let e = harness::connect(&format!("{plain_direct} sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("the server accepted a plain connection");
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("28000"),
        "{e}"
    );

    let pooler = harness::start_pgtide(config_for_server(
        "localhost",
        port,
        ServerSslMode::VerifyFull,
        &certs.ca_file,
    ))
    .await;
    let url = harness::tcp_connect_string(pooler.local_addr(), APP_USER, APP_PASSWORD, "tlsdb");
    let c = harness::connect(&url).await.expect("through pgtide");
    assert_eq!(
        one(
            &c,
            "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        "true"
    );
    let rows = to(
        "rows",
        c.query("SELECT g FROM generate_series(1, $1) g", &[&5000i32]),
    )
    .await
    .expect("query");
    assert_eq!(rows.len(), 5000);

    // A cancel reaches the server over TLS (hostssl only) too.
    let sleeper = harness::connect(&url).await.expect("second client");
    let token = sleeper.cancel_token();
    let sleep = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    to("cancel", token.cancel_query(tokio_postgres::NoTls))
        .await
        .expect("cancel");
    let e = to("cancelled query", sleep)
        .await
        .expect("join")
        .map(|_| ())
        .expect_err("the query was not cancelled");
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("57014"),
        "{e}"
    );
    drop(pooler);

    // TLS on both sides under load: pgbench (its COPY and 20 clients on a pool of 4).
    let mut config =
        config_for_server("localhost", port, ServerSslMode::VerifyFull, &certs.ca_file);
    certs.client_tls(&mut config, ClientSslMode::Require);
    config.pgtide.pool_size = 4;
    let pooler = harness::start_pgtide(config).await;
    let addr = pooler.local_addr();
    let env = [("PGSSLMODE", "require")];
    let (ok, out, err) =
        crate::pgbench::pgbench_env(addr.port(), "tlsdb", &["-i", "-s", "1", "-q"], &env).await;
    assert!(
        ok,
        "pgbench -i with TLS on both sides failed:\n{out}\n{err}"
    );
    let args = ["-c", "20", "-j", "2", "-T", "3", "-M", "extended", "-n"];
    let (ok, out, err) = crate::pgbench::pgbench_env(addr.port(), "tlsdb", &args, &env).await;
    assert!(ok, "pgbench with TLS on both sides failed:\n{out}\n{err}");
    assert!(
        out.contains("number of failed transactions: 0 "),
        "pgbench with TLS on both sides:\n{out}\n{err}"
    );
    let history = lc
        .psql(port, "tlsdb", "SELECT count(*) > 0 FROM pgbench_history")
        .expect("history");
    assert_eq!(history, "t", "no pgbench transaction reached the server");
    drop(pooler);

    // verify-full against another CA: the client hears why.
    let other = Ca::new("someone else");
    let other_file = write(certs.dir.path(), "other-ca.pem", &other.pem());
    let (_pooler, login) =
        login_through_server_tls("localhost", port, ServerSslMode::VerifyFull, &other_file).await;
    assert_server_unreachable(
        login,
        "a server certificate from another CA was accepted",
        "TLS handshake with the server failed",
    );

    // The certificate names localhost, not 127.0.0.1: verify-full to 127.0.0.1 fails,
    // verify-ca (no host name check) works.
    let (_pooler, login) =
        login_through_server_tls("127.0.0.1", port, ServerSslMode::VerifyFull, &certs.ca_file)
            .await;
    assert_server_unreachable(
        login,
        "a server certificate for another host name was accepted",
        "not valid for name",
    );
    let (pooler, login) =
        login_through_server_tls("127.0.0.1", port, ServerSslMode::VerifyCa, &certs.ca_file).await;
    let c = login.expect("verify-ca ignores the host name");
    assert_eq!(one(&c, "SELECT 'verify-ca'").await, "verify-ca");
    drop(pooler);

    // disable to a hostssl-only server: the server's own refusal reaches the client.
    let (_pooler, login) =
        login_through_server_tls("localhost", port, ServerSslMode::Disable, &certs.ca_file).await;
    let e = login
        .map(|_| ())
        .expect_err("pgtide reached a hostssl-only server without TLS");
    assert!(e.as_db_error().is_some(), "{e}");
    drop(lc);
}
