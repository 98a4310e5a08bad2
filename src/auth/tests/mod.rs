//! Tests of both exchanges over in-memory pipes: our server side against our client side
//! here, hand-written misbehaving peers in `client_facing` and `server_facing`.

use bytes::BytesMut;
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

use super::exchange::read_message;
use super::*;
use crate::config::AuthType;
use crate::protocol::backend;

mod client_facing;
mod passthrough;
mod server_facing;

const MAX: usize = 8192;

/// Runs `authenticate_client` on one end (sending AuthenticationOk on success, as the
/// caller would) and `authenticate_server` on the other.
async fn login(
    method: AuthType,
    user: &str,
    pooler_cred: Option<StoredCredential>,
    client_cred: Option<StoredCredential>,
    cache: &SaltedPasswordCache,
) -> (Result<(), AuthError>, Result<(), AuthError>) {
    let (mut a, mut b) = duplex(64 * 1024);
    let u = user.to_owned();
    let server = tokio::spawn(async move {
        let r = authenticate_client(&mut a, method, &u, pooler_cred.as_ref(), MAX)
            .await
            .map(|_| ());
        if r.is_ok() {
            let mut buf = BytesMut::new();
            backend::authentication_ok(&mut buf);
            a.write_all(&buf).await.unwrap();
        }
        r
    });
    let client = authenticate_server(&mut b, user, client_cred.as_ref(), cache).await;
    (server.await.unwrap(), client)
}

fn cred(user: &str, pw: &str) -> Option<StoredCredential> {
    Some(StoredCredential::new(user, pw))
}

fn assert_28p01(r: Result<(), AuthError>, user: &str) {
    match r {
        Err(AuthError::Server { code, message }) => {
            assert_eq!(code, "28P01");
            assert_eq!(
                message,
                format!("password authentication failed for user \"{user}\"")
            );
        }
        other => panic!("expected 28P01, got {other:?}"),
    }
}

#[tokio::test]
async fn scram_login_succeeds_and_caches_salted_password() {
    let cache = SaltedPasswordCache::new();
    let pooler = cred("alice", "s3cret");
    for _ in 0..2 {
        let (s, c) = login(
            AuthType::ScramSha256,
            "alice",
            pooler.clone(),
            cred("alice", "s3cret"),
            &cache,
        )
        .await;
        s.unwrap();
        c.unwrap();
    }
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn scram_wrong_password_fails_with_28p01() {
    let cache = SaltedPasswordCache::new();
    let (s, c) = login(
        AuthType::ScramSha256,
        "alice",
        cred("alice", "right"),
        cred("alice", "wrong"),
        &cache,
    )
    .await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "alice");
}

#[tokio::test]
async fn md5_login_plain_and_hash() {
    let cache = SaltedPasswordCache::new();
    let hash = postgres_protocol::password::md5(b"pw", "bob");
    for client in [cred("bob", "pw"), cred("bob", &hash)] {
        let (s, c) = login(
            AuthType::Md5,
            "bob",
            cred("bob", "pw"),
            client.clone(),
            &cache,
        )
        .await;
        s.unwrap();
        c.unwrap();
        // The pooler may hold the hash instead of the password.
        let (s, c) = login(AuthType::Md5, "bob", cred("bob", &hash), client, &cache).await;
        s.unwrap();
        c.unwrap();
    }
    let (s, c) = login(
        AuthType::Md5,
        "bob",
        cred("bob", "pw"),
        cred("bob", "pw2"),
        &cache,
    )
    .await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "bob");
}

#[tokio::test]
async fn md5_method_uses_scram_for_a_scram_verifier() {
    let cache = SaltedPasswordCache::new();
    let verifier = ScramVerifier::generate("pw").to_string();
    let (s, c) = login(
        AuthType::Md5,
        "carol",
        cred("carol", &verifier),
        cred("carol", "pw"),
        &cache,
    )
    .await;
    s.unwrap();
    c.unwrap();
    assert_eq!(cache.len(), 1, "SCRAM was used");
    let (s, c) = login(
        AuthType::Md5,
        "carol",
        cred("carol", &verifier),
        cred("carol", "nope"),
        &cache,
    )
    .await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "carol");
}

#[tokio::test]
async fn unknown_user_gets_a_full_mock_exchange() {
    let cache = SaltedPasswordCache::new();
    let (s, c) = login(
        AuthType::ScramSha256,
        "ghost",
        None,
        cred("ghost", "pw"),
        &cache,
    )
    .await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "ghost");
    // The client ran PBKDF2 with the mock salt, which is stable for the user.
    assert!(cache
        .get("pw", &mock_verifier("ghost").salt, 4096)
        .is_some());

    let (s, c) = login(AuthType::Md5, "ghost", None, cred("ghost", "pw"), &cache).await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "ghost");
}

#[tokio::test]
async fn scram_method_with_md5_only_secret_fails_like_unknown_user() {
    let cache = SaltedPasswordCache::new();
    let hash = postgres_protocol::password::md5(b"pw", "dave");
    let (s, c) = login(
        AuthType::ScramSha256,
        "dave",
        cred("dave", &hash),
        cred("dave", "pw"),
        &cache,
    )
    .await;
    assert!(matches!(s, Err(AuthError::Failed)));
    assert_28p01(c, "dave");
}

#[tokio::test]
async fn trust_writes_nothing() {
    let (mut a, _b) = duplex(1024);
    authenticate_client(&mut a, AuthType::Trust, "x", None, MAX)
        .await
        .unwrap();
}

async fn write(s: &mut DuplexStream, f: impl FnOnce(&mut BytesMut)) {
    let mut buf = BytesMut::new();
    f(&mut buf);
    s.write_all(&buf).await.unwrap();
}

#[test]
fn auth_error_display() {
    assert_eq!(
        AuthError::Failed.to_string(),
        "password authentication failed"
    );
    let e = AuthError::Server {
        code: "28P01".into(),
        message: "nope".into(),
    };
    assert!(e.to_string().contains("28P01"));
    let io = AuthError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    assert!(std::error::Error::source(&io).is_some());
}
