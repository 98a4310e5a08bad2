//! TLS for both sides of pgtide, with rustls (ring provider, TLS 1.2 and 1.3 only).
//!
//! [`Tls`] holds the rustls configurations built from the `client_tls_*` and
//! `server_tls_*` settings: one server-side configuration for clients connecting to
//! pgtide, and one client-side configuration per database for pgtide connecting to its
//! servers ([`ServerTls`]). Each sits in an `ArcSwapOption`, so [`Tls::reload`] (SIGHUP)
//! reads the certificate, key and CA files again and swaps the new configurations in:
//! connections made later use them, connections already open keep the session they have.
//!
//! Server certificate checking follows libpq's `sslmode`: `prefer` and `require` encrypt
//! without checking the certificate, `verify-ca` checks the chain against
//! `server_tls_ca_file`, `verify-full` also checks that the certificate names the host.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{ClientSslMode, Config, ServerSslMode, ServerTlsSettings};

/// The ALPN protocol name of PostgreSQL (required for direct TLS since PostgreSQL 17).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configurations of a running pooler.
pub struct Tls {
    config: Arc<Config>,
    client_mode: ClientSslMode,
    /// What clients connecting to pgtide handshake with; `None` when TLS is off.
    client_side: ArcSwapOption<ServerConfig>,
    /// Per database: how pgtide connects to its servers.
    servers: HashMap<String, Arc<ServerTls>>,
    /// The `[pgtide]` server settings, for a database not in `servers`.
    global_server: Arc<ServerTls>,
}

/// How pgtide uses TLS to the servers of one database.
pub struct ServerTls {
    settings: ServerTlsSettings,
    config: ArcSwapOption<ClientConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({})", self.settings.sslmode)
    }
}

impl ServerTls {
    /// Plain TCP to the server (`server_tls_sslmode = "disable"`).
    pub fn disabled() -> Arc<ServerTls> {
        Arc::new(ServerTls {
            settings: ServerTlsSettings {
                sslmode: ServerSslMode::Disable,
                ca_file: String::new(),
                cert_file: String::new(),
                key_file: String::new(),
            },
            config: ArcSwapOption::empty(),
        })
    }

    /// Builds the configuration for `settings`, reading its files.
    pub fn new(settings: ServerTlsSettings) -> Result<Arc<ServerTls>, String> {
        let config = server_side_config(&settings)?;
        Ok(Arc::new(ServerTls {
            settings,
            config: ArcSwapOption::new(config),
        }))
    }

    pub fn sslmode(&self) -> ServerSslMode {
        self.settings.sslmode
    }

    /// The configuration to connect with now (`None` when TLS is off).
    pub fn current(&self) -> Option<Arc<ClientConfig>> {
        self.config.load_full()
    }

    fn reload(&self) -> Result<(), String> {
        let c = server_side_config(&self.settings)?;
        self.config.store(c);
        Ok(())
    }
}

impl Tls {
    /// Reads every certificate, key and CA file the configuration names; any problem is
    /// an error (pgtide does not start with a TLS setting it cannot honour).
    pub fn new(config: Arc<Config>) -> Result<Tls, String> {
        let client_side = client_side_config(&config)?;
        let global_server = ServerTls::new(config.server_tls(""))?;
        let mut servers = HashMap::new();
        for name in config.databases.keys() {
            let settings = config.server_tls(name);
            let t = ServerTls::new(settings).map_err(|e| format!("database {name:?}: {e}"))?;
            servers.insert(name.clone(), t);
        }
        Ok(Tls {
            client_mode: config.pgtide.client_tls_sslmode,
            config,
            client_side: ArcSwapOption::new(client_side),
            servers,
            global_server,
        })
    }

    /// The `client_tls_sslmode` in force.
    pub fn client_mode(&self) -> ClientSslMode {
        self.client_mode
    }

    /// What a client that asks for TLS handshakes with; `None` when TLS is off.
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.client_side
            .load_full()
            .map(tokio_rustls::TlsAcceptor::from)
    }

    /// How pgtide connects to the servers of `database` (the `[pgtide]` settings for a
    /// database it was not built with).
    pub fn server(&self, database: &str) -> Arc<ServerTls> {
        match self.servers.get(database) {
            Some(t) => t.clone(),
            None => self.global_server.clone(),
        }
    }

    /// Whether any certificate, key or CA file is configured (a reload has something to
    /// read again).
    fn reads_files(&self) -> bool {
        let set = |f: &Option<String>| f.as_deref().is_some_and(|f| !f.is_empty());
        let g = &self.config.pgtide;
        self.client_mode != ClientSslMode::Disable
            || !g.server_tls_ca_file.is_empty()
            || !g.server_tls_cert_file.is_empty()
            || self
                .config
                .databases
                .values()
                .any(|d| set(&d.server_tls_ca_file) || set(&d.server_tls_cert_file))
    }

    /// Reads the certificate, key and CA files again and swaps in what they now hold.
    /// New connections use the new files; open ones are not touched. A configuration
    /// whose files cannot be used keeps the previous one (and the error is logged and
    /// returned).
    pub fn reload(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if self.client_mode != ClientSslMode::Disable {
            match client_side_config(&self.config) {
                Ok(c) => self.client_side.store(c),
                Err(e) => errors.push(e),
            }
        }
        if let Err(e) = self.global_server.reload() {
            errors.push(e);
        }
        let mut names: Vec<&String> = self.servers.keys().collect();
        names.sort();
        for name in names {
            if let Err(e) = self.servers[name].reload() {
                errors.push(format!("database {name:?}: {e}"));
            }
        }
        if errors.is_empty() {
            if self.reads_files() {
                tracing::info!("TLS certificates and keys reloaded");
            }
            Ok(())
        } else {
            let e = errors.join("; ");
            tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in use");
            Err(e)
        }
    }
}

fn load_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key} {path:?}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {path:?}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{key} {path:?}: no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &str, key: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{key} {path:?}: {e}"))
}

fn load_roots(path: &str, key: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, key)? {
        roots
            .add(c)
            .map_err(|e| format!("{key} {path:?}: not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// The configuration pgtide handshakes with as a TLS server, for its clients.
fn client_side_config(config: &Config) -> Result<Option<Arc<ServerConfig>>, String> {
    let g = &config.pgtide;
    let mode = g.client_tls_sslmode;
    if mode == ClientSslMode::Disable {
        return Ok(None);
    }
    let certs = load_certs(&g.client_tls_cert_file, "client_tls_cert_file")?;
    let key = load_key(&g.client_tls_key_file, "client_tls_key_file")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = if g.client_tls_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = load_roots(&g.client_tls_ca_file, "client_tls_ca_file")?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
        // A certificate a client presents is always checked; under verify-ca and
        // verify-full a client without one is refused in the handshake.
        let verifier = if matches!(mode, ClientSslMode::VerifyCa | ClientSslMode::VerifyFull) {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier
            .build()
            .map_err(|e| format!("client_tls_ca_file {:?}: {e}", g.client_tls_ca_file))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut c = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "client_tls_cert_file {:?} with client_tls_key_file {:?}: {e}",
            g.client_tls_cert_file, g.client_tls_key_file
        )
    })?;
    c.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // pgtide keeps no session cache for clients: every connection does a full handshake.
    c.send_tls13_tickets = 0;
    Ok(Some(Arc::new(c)))
}

/// The configuration pgtide handshakes with as a TLS client, for one database's servers.
fn server_side_config(t: &ServerTlsSettings) -> Result<Option<Arc<ClientConfig>>, String> {
    let verifier: Arc<dyn ServerCertVerifier> = match t.sslmode {
        ServerSslMode::Disable => return Ok(None),
        ServerSslMode::Prefer | ServerSslMode::Require => Arc::new(NoCertificateCheck(provider())),
        ServerSslMode::VerifyCa | ServerSslMode::VerifyFull => {
            let roots = load_roots(&t.ca_file, "server_tls_ca_file")?;
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| format!("server_tls_ca_file {:?}: {e}", t.ca_file))?;
            if t.sslmode == ServerSslMode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyHostName(webpki))
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let c = if t.cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs = load_certs(&t.cert_file, "server_tls_cert_file")?;
        let key = load_key(&t.key_file, "server_tls_key_file")?;
        builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!(
                "server_tls_cert_file {:?} with server_tls_key_file {:?}: {e}",
                t.cert_file, t.key_file
            )
        })?
    };
    Ok(Some(Arc::new(c)))
}

/// The server name to check a server's certificate against (and send as SNI).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid host name for TLS"))
}

/// `prefer` / `require`: the connection is encrypted, the certificate is not checked
/// (as libpq does without a root certificate). The handshake signatures still are.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked against the CA; the host name is not.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        // The chain is checked before the name: a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The subject's common name (CN) of a DER certificate, if it has one that is a string.
/// Used for `cert` authentication, on certificates rustls has already verified.
pub fn common_name(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, ... }, ... }
    let (_, cert, _) = der_item(der)?;
    let (_, mut tbs, _) = der_item(cert)?;
    let mut fields = Vec::with_capacity(6);
    while fields.len() < 6 && !tbs.is_empty() {
        let (tag, body, rest) = der_item(tbs)?;
        if !(fields.is_empty() && tag == 0xa0) {
            fields.push(body);
        }
        tbs = rest;
    }
    // serialNumber, signature, issuer, validity, subject
    let mut subject = *fields.get(4)?;
    let mut found = None;
    while !subject.is_empty() {
        let (_, mut rdn, rest) = der_item(subject)?; // SET OF AttributeTypeAndValue
        subject = rest;
        while !rdn.is_empty() {
            let (_, atv, next) = der_item(rdn)?;
            rdn = next;
            let (oid_tag, oid, value) = der_item(atv)?;
            // 2.5.4.3 id-at-commonName
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (vtag, v, _) = der_item(value)?;
                // UTF8String, PrintableString, IA5String, T61String
                if matches!(vtag, 0x0c | 0x13 | 0x16 | 0x14) {
                    found = Some(String::from_utf8(v.to_vec()).ok()?);
                }
            }
        }
    }
    found
}

/// One DER item: (tag, contents, what follows). Single-byte tags only (all X.509 needs
/// up to the subject).
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    let body = b.get(start..end)?;
    Some((tag, body, &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_cn(cn: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "pgtide tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_database_without_its_own_settings_gets_the_global_ones() {
        use crate::config::Database;
        let mut config = Config::default();
        config.pgtide.server_tls_sslmode = ServerSslMode::Require;
        config.databases.insert(
            "plain".into(),
            Database {
                server_tls_sslmode: Some(ServerSslMode::Disable),
                ..Database::default()
            },
        );
        config.databases.insert("app".into(), Database::default());
        let tls = Tls::new(Arc::new(config)).expect("no files needed");
        assert_eq!(tls.server("plain").sslmode(), ServerSslMode::Disable);
        assert!(tls.server("plain").current().is_none());
        for db in ["app", "added later"] {
            assert_eq!(tls.server(db).sslmode(), ServerSslMode::Require);
            assert!(tls.server(db).current().is_some());
        }
        assert!(tls.acceptor().is_none());
        tls.reload().expect("nothing to read");
    }

    #[test]
    fn unreadable_files_name_their_setting() {
        let mut config = Config::default();
        config.pgtide.client_tls_sslmode = ClientSslMode::Require;
        config.pgtide.client_tls_cert_file = "/nonexistent/cert.pem".into();
        config.pgtide.client_tls_key_file = "/nonexistent/key.pem".into();
        let e = Tls::new(Arc::new(config)).err().expect("missing files");
        assert!(
            e.contains("client_tls_cert_file") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        let mut config = Config::default();
        config.pgtide.server_tls_sslmode = ServerSslMode::VerifyFull;
        config.pgtide.server_tls_ca_file = "/nonexistent/ca.pem".into();
        let e = Tls::new(Arc::new(config)).err().expect("missing CA");
        assert!(e.contains("server_tls_ca_file"), "{e}");
    }

    #[test]
    fn common_name_of_a_certificate() {
        assert_eq!(
            common_name(&cert_with_cn("alice")).as_deref(),
            Some("alice")
        );
        let long = "u".repeat(200);
        assert_eq!(common_name(&cert_with_cn(&long)), Some(long));
    }

    #[test]
    fn common_name_absent_or_garbage() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "no cn");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(common_name(&der), None);
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let good = cert_with_cn("bob");
        for cut in [1, 10, 50, good.len() / 2] {
            // Truncated certificates never panic.
            let _ = common_name(&good[..cut]);
        }
    }
}
