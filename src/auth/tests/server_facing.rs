//! Hand-written PostgreSQL servers against `authenticate_server`.

use bytes::{BufMut, BytesMut};
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

use super::{cred, read_message, write, MAX};
use crate::auth::*;
use crate::protocol::{backend, frontend, tag};

/// Runs `authenticate_server` for user "u" against a scripted server.
async fn against_server<F, Fut>(
    secret: Option<StoredCredential>,
    script: F,
) -> Result<(), AuthError>
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut a, b) = duplex(64 * 1024);
    let server = tokio::spawn(script(b));
    let r = authenticate_server(&mut a, "u", secret.as_ref(), &SaltedPasswordCache::new()).await;
    drop(a);
    server.await.unwrap();
    r
}

#[tokio::test]
async fn server_trust_returns_after_authentication_ok() {
    let (mut a, mut b) = duplex(1024);
    let mut buf = BytesMut::new();
    backend::authentication_ok(&mut buf);
    backend::parameter_status(&mut buf, "TimeZone", "UTC");
    b.write_all(&buf).await.unwrap();
    authenticate_server(&mut a, "u", None, &SaltedPasswordCache::new())
        .await
        .unwrap();
    let (t, _) = read_message(&mut a, MAX).await.unwrap();
    assert_eq!(
        t,
        tag::PARAMETER_STATUS,
        "ParameterStatus is left for the caller"
    );
}

#[tokio::test]
async fn server_cleartext_sends_the_password() {
    let r = against_server(cred("u", "pw"), |mut s| async move {
        write(&mut s, backend::authentication_cleartext).await;
        let (t, body) = read_message(&mut s, MAX).await.unwrap();
        assert_eq!((t, body.as_slice()), (b'p', &b"pw\0"[..]));
        write(&mut s, backend::authentication_ok).await;
    })
    .await;
    r.unwrap();
}

#[tokio::test]
async fn server_error_response_is_reported() {
    let r = against_server(cred("u", "pw"), |mut s| async move {
        write(&mut s, |b| {
            backend::fatal(b, "3D000", "database \"nope\" does not exist")
        })
        .await;
    })
    .await;
    match r {
        Err(AuthError::Server { code, message }) => {
            assert_eq!(code, "3D000");
            assert_eq!(message, "database \"nope\" does not exist");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_needs_a_usable_password() {
    let scram_only = cred("u", &ScramVerifier::generate("pw").to_string());
    let md5_only = cred("u", &postgres_protocol::password::md5(b"pw", "u"));
    type Request = fn(&mut BytesMut);
    let cases: Vec<(Option<StoredCredential>, Request)> = vec![
        (None, |b| backend::authentication_md5(b, [1, 2, 3, 4])),
        (scram_only.clone(), |b| {
            backend::authentication_md5(b, [1, 2, 3, 4])
        }),
        (scram_only, backend::authentication_cleartext),
        (md5_only.clone(), backend::authentication_cleartext),
        (md5_only, |b| {
            backend::authentication_sasl(b, &["SCRAM-SHA-256"])
        }),
    ];
    for (secret, request) in cases {
        let r = against_server(
            secret,
            move |mut s| async move { write(&mut s, request).await },
        )
        .await;
        assert!(
            matches!(&r, Err(AuthError::NoServerPassword(m)) if m.contains("user \"u\"")),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn server_unsupported_requests_are_protocol_errors() {
    let requests: Vec<fn(&mut BytesMut)> = vec![
        |b| {
            b.put_u8(b'R');
            b.put_i32(8);
            b.put_i32(7); // GSS
        },
        |b| backend::authentication_sasl(b, &["SCRAM-SHA-256-PLUS"]),
        |b| backend::authentication_sasl_final(b, b"v=abc"),
        |b| {
            b.put_u8(b'R');
            b.put_i32(6);
            b.put_u8(0);
            b.put_u8(0);
        },
        |b| backend::ready_for_query(b, b'I'),
    ];
    for request in requests {
        let r = against_server(cred("u", "pw"), move |mut s| async move {
            write(&mut s, request).await
        })
        .await;
        assert!(matches!(r, Err(AuthError::Protocol(_))), "{r:?}");
    }
}

#[tokio::test]
async fn server_with_wrong_signature_is_rejected() {
    let r = against_server(cred("u", "pw"), |mut s| async move {
        write(&mut s, |b| {
            backend::authentication_sasl(b, &["SCRAM-SHA-256"])
        })
        .await;
        let (_, body) = read_message(&mut s, MAX).await.unwrap();
        let (_, first) = frontend::parse_sasl_initial_response(&body).unwrap();
        let first = std::str::from_utf8(first).unwrap().to_owned();
        let cnonce = first.rsplit_once("r=").unwrap().1.to_owned();
        let mut server = ScramServer::new(ScramVerifier::generate("other"), "srv".into());
        let sf = server.client_first(first.as_bytes()).unwrap();
        assert!(sf.starts_with(&format!("r={cnonce}srv")));
        write(&mut s, |b| {
            backend::authentication_sasl_continue(b, sf.as_bytes())
        })
        .await;
        let _ = read_message(&mut s, MAX).await.unwrap();
        // A server that does not know the password cannot sign; it sends garbage.
        write(&mut s, |b| {
            backend::authentication_sasl_final(b, b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        })
        .await;
    })
    .await;
    assert!(matches!(r, Err(AuthError::Protocol(m)) if m.contains("signature")));
}
