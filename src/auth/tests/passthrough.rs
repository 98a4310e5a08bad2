//! SCRAM pass-through (a ClientKey recovered from a client's proof logs pgtide in to a
//! server that stores the same verifier) and the clear-text `password` method.

use bytes::BytesMut;
use tokio::io::{duplex, AsyncWriteExt};

use super::{assert_28p01, cred, MAX};
use crate::auth::*;
use crate::protocol::backend;

/// Runs `authenticate_client` with `method` against a client using `client_cred`;
/// returns what the pooler side got and what the client side got.
async fn exchange(
    method: Method,
    pooler: Option<StoredCredential>,
    client_cred: Option<StoredCredential>,
) -> (Result<Verified, AuthError>, Result<(), AuthError>) {
    let (mut a, mut b) = duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let r = authenticate_client(&mut a, method, "u", pooler.as_ref(), MAX).await;
        if r.is_ok() {
            let mut buf = BytesMut::new();
            backend::authentication_ok(&mut buf);
            a.write_all(&buf).await.unwrap();
        }
        r
    });
    let c = authenticate_server(
        &mut b,
        "u",
        client_cred.as_ref(),
        &SaltedPasswordCache::new(),
    )
    .await;
    // A client that gave up mid-exchange hangs up, as a real one does.
    drop(b);
    (server.await.unwrap(), c)
}

#[tokio::test]
async fn client_key_from_a_client_logs_in_to_a_server_with_the_same_verifier() {
    let verifier = ScramVerifier::generate("pw");
    let only_verifier = || Some(StoredCredential::new("u", &verifier.to_string()));
    // A client logs in to pgtide, which holds only the verifier.
    let (s, c) = exchange(Method::ScramSha256, only_verifier(), cred("u", "pw")).await;
    c.unwrap();
    let key = s.unwrap().client_key.expect("a ClientKey was recovered");
    // The verifier alone cannot log in to a server...
    let (_, c) = exchange(Method::ScramSha256, only_verifier(), only_verifier()).await;
    assert!(matches!(c, Err(AuthError::NoServerPassword(_))), "{c:?}");
    // ...the verifier with the client's ClientKey can.
    let passthrough = StoredCredential::with_client_key(verifier.clone(), key);
    assert!(!format!("{passthrough:?}").contains(&format!("{key:?}")));
    let (s, c) = exchange(
        Method::ScramSha256,
        only_verifier(),
        Some(passthrough.clone()),
    )
    .await;
    s.unwrap();
    c.unwrap();
    // A server with another verifier of the same password (another salt): refused with
    // an explanation, without sending a proof.
    let other = Some(StoredCredential::new(
        "u",
        &ScramVerifier::generate("pw").to_string(),
    ));
    let (s, c) = exchange(Method::ScramSha256, other, Some(passthrough)).await;
    assert!(s.is_err());
    match c {
        Err(AuthError::NoServerPassword(m)) => assert!(m.contains("different salt"), "{m}"),
        other => panic!("expected a salt mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_password_yields_no_client_key() {
    let verifier = ScramVerifier::generate("pw").to_string();
    let (s, c) = exchange(Method::ScramSha256, cred("u", &verifier), cred("u", "nope")).await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "u");
}

#[tokio::test]
async fn clear_text_password_against_every_kind_of_secret() {
    let md5 = postgres_protocol::password::md5(b"pw", "u");
    let scram = ScramVerifier::generate("pw").to_string();
    for stored in ["pw", md5.as_str(), scram.as_str()] {
        let (s, c) = exchange(Method::Password, cred("u", stored), cred("u", "pw")).await;
        c.unwrap();
        assert_eq!(s.unwrap().password.as_deref(), Some("pw"));
        let (s, c) = exchange(Method::Password, cred("u", stored), cred("u", "pw2")).await;
        assert!(matches!(s, Err(AuthError::Failed)));
        assert_28p01(c, "u");
    }
    let (s, c) = exchange(Method::Password, None, cred("u", "pw")).await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "u");
}

#[tokio::test]
async fn an_md5_response_can_be_judged_again_against_a_new_hash() {
    let (mut a, mut b) = duplex(64 * 1024);
    let old = StoredCredential::new("u", &postgres_protocol::password::md5(b"old", "u"));
    let new = StoredCredential::new("u", &postgres_protocol::password::md5(b"new", "u"));
    let client = tokio::spawn(async move {
        let _ = authenticate_server(
            &mut b,
            "u",
            cred("u", "new").as_ref(),
            &SaltedPasswordCache::new(),
        )
        .await;
    });
    let response = read_client_response(&mut a, Method::Md5, "u", Some(&old), MAX)
        .await
        .unwrap();
    assert!(matches!(
        response.verify("u", Some(&old)).await,
        Err(AuthError::Failed)
    ));
    response.verify("u", Some(&new)).await.unwrap();
    drop(a);
    client.await.unwrap();
}
