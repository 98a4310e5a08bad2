//! Tests of the SCRAM state machines: RFC 7677 vectors, PostgreSQL's verifier format,
//! and interoperability with postgres-protocol's SCRAM client and verifier.

use super::*;

const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

fn rfc_verifier() -> ScramVerifier {
    ScramVerifier::derive("pencil", &B64.decode(RFC_SALT).unwrap(), 4096)
}

fn server(v: ScramVerifier) -> ScramServer {
    ScramServer::new(v, RFC_SERVER_NONCE.to_string())
}

#[test]
fn rfc7677_server_side() {
    let mut s = server(rfc_verifier());
    assert_eq!(
        s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap(),
        RFC_SERVER_FIRST
    );
    assert_eq!(
        s.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap(),
        RFC_SERVER_FINAL
    );
}

#[test]
fn rfc7677_client_side() {
    let mut c = ScramClient::new("user", RFC_CLIENT_NONCE.to_string());
    assert_eq!(c.client_first(), RFC_CLIENT_FIRST);
    let first = c.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
    assert_eq!(first.iterations, 4096);
    let salted = salted_password("pencil", &first.salt, first.iterations);
    assert_eq!(c.client_final(&salted).unwrap(), RFC_CLIENT_FINAL);
    c.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
}

#[test]
fn client_rejects_wrong_server_signature() {
    let mut c = ScramClient::new("user", RFC_CLIENT_NONCE.to_string());
    let first = c.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
    c.client_final(&salted_password("pencil", &first.salt, 4096))
        .unwrap();
    let bad = "v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    assert!(matches!(
        c.server_final(bad.as_bytes()),
        Err(ScramError::Protocol(_))
    ));
}

#[test]
fn client_rejects_server_nonce_not_extending_ours() {
    let mut c = ScramClient::new("", "abc".to_string());
    assert!(matches!(
        c.server_first(b"r=xyzdef,s=AAAA,i=4096"),
        Err(ScramError::Protocol(_))
    ));
    let mut c = ScramClient::new("", "abc".to_string());
    assert!(matches!(
        c.server_first(b"r=abc,s=AAAA,i=4096"),
        Err(ScramError::Protocol(_))
    ));
    let mut c = ScramClient::new("", "abc".to_string());
    assert!(matches!(
        c.server_first(b"r=abcd,s=AAAA,i=0"),
        Err(ScramError::Protocol(_))
    ));
}

#[test]
fn verifier_matches_postgres_format() {
    // StoredKey and ServerKey computed independently (Python hashlib/hmac).
    let expected = format!(
        "SCRAM-SHA-256$4096:{RFC_SALT}$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    );
    assert_eq!(rfc_verifier().to_string(), expected);
    assert_eq!(ScramVerifier::parse(&expected), Some(rfc_verifier()));
}

#[test]
fn verifier_parse_rejects_malformed() {
    let good = rfc_verifier().to_string();
    assert!(ScramVerifier::parse(&good).is_some());
    for bad in [
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==",
        "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        "SCRAM-SHA-256$-1:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        "SCRAM-SHA-256$4096:!!$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        "scram-sha-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
    ] {
        assert_eq!(ScramVerifier::parse(bad), None, "{bad}");
    }
}

#[test]
fn generated_verifier_round_trips_and_verifies() {
    let v = ScramVerifier::generate("hunter2");
    assert_eq!(v.salt.len(), SALT_LEN);
    assert_eq!(v.iterations, DEFAULT_ITERATIONS);
    let parsed = ScramVerifier::parse(&v.to_string()).unwrap();
    assert_eq!(parsed, v);
    assert!(run(parsed.clone(), "hunter2").is_ok());
    assert_eq!(run(parsed, "hunter3"), Err(ScramError::Failed));
}

/// One exchange between our client and our server.
fn run(v: ScramVerifier, password: &str) -> Result<(), ScramError> {
    let mut c = ScramClient::new("", random_nonce());
    let mut s = ScramServer::new(v, random_nonce());
    let sf = s.client_first(c.client_first().as_bytes())?;
    let first = c.server_first(sf.as_bytes())?;
    let cf = c.client_final(&salted_password(password, &first.salt, first.iterations))?;
    let fin = s.client_final(cf.as_bytes())?;
    c.server_final(fin.as_bytes())
}

#[test]
fn postgres_protocol_client_logs_in_to_our_server() {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    for (cb, password, ok) in [
        (ChannelBinding::unsupported(), "pencil", true),
        (ChannelBinding::unrequested(), "pencil", true),
        (ChannelBinding::unsupported(), "pencils", false),
    ] {
        let mut theirs = ScramSha256::new(password.as_bytes(), cb);
        let mut ours = server(rfc_verifier());
        let sf = ours.client_first(theirs.message()).unwrap();
        theirs.update(sf.as_bytes()).unwrap();
        match ours.client_final(theirs.message()) {
            Ok(fin) => {
                assert!(ok);
                theirs.finish(fin.as_bytes()).unwrap();
            }
            Err(e) => {
                assert!(!ok);
                assert_eq!(e, ScramError::Failed);
            }
        }
    }
}

#[test]
fn postgres_protocol_verifier_is_accepted() {
    let theirs = postgres_protocol::password::scram_sha_256(b"correct horse");
    let v = ScramVerifier::parse(&theirs).expect("postgres-protocol verifier parses");
    assert_eq!(v.to_string(), theirs);
    assert!(run(v.clone(), "correct horse").is_ok());
    assert_eq!(run(v, "wrong horse"), Err(ScramError::Failed));
}

#[test]
fn tampered_proof_fails() {
    let mut s = server(rfc_verifier());
    s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
    let tampered = RFC_CLIENT_FINAL.replace("p=dHzb", "p=dHzc");
    assert_eq!(s.client_final(tampered.as_bytes()), Err(ScramError::Failed));
}

#[test]
fn wrong_nonce_is_a_protocol_error() {
    let mut s = server(rfc_verifier());
    s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
    let wrong = RFC_CLIENT_FINAL.replace("hvYD", "hvYE");
    assert!(
        matches!(s.client_final(wrong.as_bytes()), Err(ScramError::Protocol(m)) if m.contains("nonce"))
    );
}

#[test]
fn channel_binding_flag_must_match() {
    // "y,," in client-first, but "biws" (n,,) in client-final.
    let mut s = server(rfc_verifier());
    s.client_first(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
    assert!(
        matches!(s.client_final(RFC_CLIENT_FINAL.as_bytes()), Err(ScramError::Protocol(m)) if m.contains("channel binding"))
    );
}

#[test]
fn mock_exchange_fails_even_with_right_proof() {
    let mut s = ScramServer::mock(rfc_verifier(), RFC_SERVER_NONCE.to_string());
    assert_eq!(
        s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap(),
        RFC_SERVER_FIRST
    );
    assert_eq!(
        s.client_final(RFC_CLIENT_FINAL.as_bytes()),
        Err(ScramError::Failed)
    );
}

#[test]
fn client_first_rejections() {
    for (msg, needle) in [
        ("p=tls-server-end-point,,n=,r=abc", "channel binding"),
        ("n,a=admin,n=,r=abc", "authorization identity"),
        ("n,,m=ext,n=,r=abc", "extension"),
        ("x,,n=,r=abc", "malformed"),
        ("n,,n=,r=", "malformed"),
        ("n,,r=abc", "malformed"),
        ("n,", "malformed"),
        ("", "malformed"),
    ] {
        let mut s = server(rfc_verifier());
        match s.client_first(msg.as_bytes()) {
            Err(ScramError::Protocol(m)) => assert!(m.contains(needle), "{msg}: {m}"),
            other => panic!("{msg}: {other:?}"),
        }
    }
    let mut s = server(rfc_verifier());
    assert!(matches!(
        s.client_first(&[0xff, 0xfe]),
        Err(ScramError::Protocol(_))
    ));
}

#[test]
fn client_final_rejections() {
    for msg in [
        "",
        "c=biws",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AAAA",
        "c=!!,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    ] {
        let mut s = server(rfc_verifier());
        s.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert!(matches!(s.client_final(msg.as_bytes()), Err(ScramError::Protocol(_))), "{msg}");
    }
    // Out of order: client-final before client-first.
    let mut s = server(rfc_verifier());
    assert!(matches!(
        s.client_final(RFC_CLIENT_FINAL.as_bytes()),
        Err(ScramError::Protocol(_))
    ));
}

#[test]
fn saslprep_is_applied_like_postgres() {
    // U+00AD (soft hyphen) is mapped to nothing by SASLprep: both spellings are one password.
    let salt = [7u8; 16];
    assert_eq!(
        salted_password("pen\u{ad}cil", &salt, 1),
        salted_password("pencil", &salt, 1)
    );
    // A password SASLprep rejects (control character) is used as raw bytes.
    let mut raw = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(b"a\x07b", &salt, 1, &mut raw);
    assert_eq!(salted_password("a\x07b", &salt, 1), raw);
}
