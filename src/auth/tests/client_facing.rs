//! Hand-written clients, well-behaved and not, against `authenticate_client`.

use bytes::{BufMut, BytesMut};
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

use super::{read_message, write, MAX};
use crate::auth::*;
use crate::config::AuthType;
use crate::protocol::{auth_code, backend, be_i32, frontend, tag};

/// Starts `authenticate_client` with `method` for user "u" with password "pw" and returns
/// the raw client end.
fn start_server(
    method: AuthType,
) -> (tokio::task::JoinHandle<Result<(), AuthError>>, DuplexStream) {
    let (mut a, b) = duplex(64 * 1024);
    let handle = tokio::spawn(async move {
        let c = StoredCredential::new("u", "pw");
        authenticate_client(&mut a, method, "u", Some(&c), MAX)
            .await
            .map(|_| ())
    });
    (handle, b)
}

async fn read_request(s: &mut DuplexStream) -> (i32, Vec<u8>) {
    let (t, body) = read_message(s, MAX).await.unwrap();
    assert_eq!(t, tag::AUTHENTICATION);
    (be_i32(&body), body[4..].to_vec())
}

/// Reads the FATAL the pooler sent and returns its SQLSTATE and message.
async fn read_fatal(s: &mut DuplexStream) -> (String, String) {
    let (t, body) = read_message(s, MAX).await.unwrap();
    assert_eq!(t, tag::ERROR_RESPONSE);
    let f = backend::parse_error_fields(&body);
    assert_eq!(f.severity, "FATAL");
    (f.code.to_owned(), f.message.to_owned())
}

/// Runs a SCRAM exchange as a client up to the client-final-message, which `tamper` may
/// change before it is sent.
async fn scram_until_final(s: &mut DuplexStream, tamper: impl FnOnce(String) -> String) {
    assert_eq!(read_request(s).await.0, auth_code::SASL);
    let mut client = ScramClient::new("", scram::random_nonce());
    let first = client.client_first();
    write(s, |b| {
        frontend::sasl_initial_response(b, "SCRAM-SHA-256", first.as_bytes())
    })
    .await;
    let (code, data) = read_request(s).await;
    assert_eq!(code, auth_code::SASL_CONTINUE);
    let sf = client.server_first(&data).unwrap();
    let fin = tamper(
        client
            .client_final(&scram::salted_password("pw", &sf.salt, sf.iterations))
            .unwrap(),
    );
    write(s, |b| frontend::sasl_response(b, fin.as_bytes())).await;
}

#[tokio::test]
async fn scram_untampered_hand_client_succeeds() {
    let (h, mut s) = start_server(AuthType::ScramSha256);
    scram_until_final(&mut s, |f| f).await;
    assert_eq!(read_request(&mut s).await.0, auth_code::SASL_FINAL);
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn scram_tampered_proof_is_28p01() {
    let (h, mut s) = start_server(AuthType::ScramSha256);
    scram_until_final(&mut s, |f| {
        let (head, proof) = f.rsplit_once(",p=").unwrap();
        let first = if proof.starts_with('A') { 'B' } else { 'A' };
        format!("{head},p={first}{}", &proof[1..])
    })
    .await;
    assert_eq!(
        read_fatal(&mut s).await,
        (
            "28P01".into(),
            "password authentication failed for user \"u\"".into()
        )
    );
    assert!(matches!(h.await.unwrap(), Err(AuthError::Failed)));
}

#[tokio::test]
async fn scram_wrong_nonce_is_08p01() {
    let (h, mut s) = start_server(AuthType::ScramSha256);
    scram_until_final(&mut s, |f| f.replacen(",r=", ",r=X", 1)).await;
    let (code, msg) = read_fatal(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("nonce"), "{msg}");
    assert!(matches!(h.await.unwrap(), Err(AuthError::Protocol(_))));
}

#[tokio::test]
async fn scram_channel_binding_request_is_refused_clearly() {
    let (h, mut s) = start_server(AuthType::ScramSha256);
    read_request(&mut s).await;
    write(&mut s, |b| {
        frontend::sasl_initial_response(b, "SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc")
    })
    .await;
    let (code, msg) = read_fatal(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("channel binding"), "{msg}");
    assert!(matches!(h.await.unwrap(), Err(AuthError::Protocol(_))));
}

#[tokio::test]
async fn scram_wrong_mechanism_is_08p01() {
    let (h, mut s) = start_server(AuthType::ScramSha256);
    read_request(&mut s).await;
    write(&mut s, |b| {
        frontend::sasl_initial_response(
            b,
            "SCRAM-SHA-256-PLUS",
            b"p=tls-server-end-point,,n=,r=abc",
        )
    })
    .await;
    assert_eq!(read_fatal(&mut s).await.0, "08P01");
    assert!(matches!(h.await.unwrap(), Err(AuthError::Protocol(_))));
}

#[tokio::test]
async fn md5_response_for_another_salt_is_28p01() {
    let (h, mut s) = start_server(AuthType::Md5);
    let (code, data) = read_request(&mut s).await;
    assert_eq!(code, auth_code::MD5_PASSWORD);
    let salt: [u8; 4] = data[..4].try_into().unwrap();
    let wrong_salt = [salt[0] ^ 1, salt[1], salt[2], salt[3]];
    let resp = md5::salted_response(&md5::password_hash("pw", "u"), wrong_salt);
    write(&mut s, |b| frontend::password_message(b, resp.as_bytes())).await;
    assert_eq!(read_fatal(&mut s).await.0, "28P01");
    assert!(matches!(h.await.unwrap(), Err(AuthError::Failed)));
}

#[tokio::test]
async fn md5_right_response_succeeds() {
    let (h, mut s) = start_server(AuthType::Md5);
    let (_, data) = read_request(&mut s).await;
    let resp = md5::salted_response(
        &md5::password_hash("pw", "u"),
        data[..4].try_into().unwrap(),
    );
    write(&mut s, |b| frontend::password_message(b, resp.as_bytes())).await;
    h.await.unwrap().unwrap();
}

/// Sends raw bytes after the first request and checks the pooler's verdict.
async fn raw_after_request(
    method: AuthType,
    bytes: &[u8],
    close: bool,
) -> (Result<(), AuthError>, Option<(String, String)>) {
    let (h, mut s) = start_server(method);
    read_request(&mut s).await;
    s.write_all(bytes).await.unwrap();
    if close {
        s.shutdown().await.unwrap();
    }
    let r = h.await.unwrap();
    let fatal = match read_message(&mut s, MAX).await {
        Ok((tag::ERROR_RESPONSE, body)) => {
            let f = backend::parse_error_fields(&body);
            Some((f.code.to_owned(), f.message.to_owned()))
        }
        _ => None,
    };
    (r, fatal)
}

fn header(t: u8, len: u32) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[tokio::test]
async fn oversized_message_is_refused_without_reading_it() {
    for method in [AuthType::Md5, AuthType::ScramSha256] {
        let (r, fatal) = raw_after_request(method, &header(b'p', 0x7fff_ffff), false).await;
        assert!(matches!(r, Err(AuthError::Protocol(m)) if m.contains("exceeds the limit")));
        assert_eq!(fatal.unwrap().0, "08P01");
    }
}

#[tokio::test]
async fn bad_length_and_wrong_type_are_08p01() {
    let (r, fatal) = raw_after_request(AuthType::Md5, &header(b'p', 3), false).await;
    assert!(matches!(r, Err(AuthError::Protocol(_))));
    assert_eq!(fatal.unwrap().0, "08P01");

    let mut q = BytesMut::new();
    frontend::query(&mut q, "select 1");
    let (r, fatal) = raw_after_request(AuthType::ScramSha256, &q, false).await;
    assert!(matches!(r, Err(AuthError::Protocol(m)) if m.contains("expected password response")));
    assert_eq!(fatal.unwrap().0, "08P01");
}

#[tokio::test]
async fn truncated_contents_are_08p01() {
    // SASLInitialResponse whose data length claims more than the message holds.
    let mut m = BytesMut::new();
    m.put_u8(b'p');
    m.put_i32(4 + 14 + 4 + 3);
    m.put_slice(b"SCRAM-SHA-256\0");
    m.put_i32(100);
    m.put_slice(b"n,,");
    let (r, fatal) = raw_after_request(AuthType::ScramSha256, &m, false).await;
    assert!(matches!(r, Err(AuthError::Protocol(m)) if m.contains("SASLInitialResponse")));
    assert_eq!(fatal.unwrap().0, "08P01");

    // PasswordMessage without its NUL terminator.
    let mut m = BytesMut::new();
    m.put_u8(b'p');
    m.put_i32(4 + 3);
    m.put_slice(b"md5");
    let (r, fatal) = raw_after_request(AuthType::Md5, &m, false).await;
    assert!(matches!(r, Err(AuthError::Protocol(_))));
    assert_eq!(fatal.unwrap().0, "08P01");
}

#[tokio::test]
async fn client_closing_mid_exchange_is_io() {
    // Half a message, then EOF.
    let mut m = header(b'p', 100);
    m.extend_from_slice(b"md5abc");
    let (r, fatal) = raw_after_request(AuthType::Md5, &m, true).await;
    assert!(matches!(r, Err(AuthError::Io(_))));
    assert!(fatal.is_none());
    let (r, _) = raw_after_request(AuthType::ScramSha256, b"", true).await;
    assert!(matches!(r, Err(AuthError::Io(_))));
}

#[tokio::test]
async fn garbage_never_panics() {
    let mut seed = 0x1234_5678u32;
    for round in 0..200 {
        let mut bytes = Vec::new();
        let n = 5 + (round % 40);
        for _ in 0..n {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            bytes.push((seed >> 16) as u8);
        }
        bytes[0] = b'p';
        bytes[1] = 0;
        bytes[2] = 0;
        let method = if round % 2 == 0 {
            AuthType::Md5
        } else {
            AuthType::ScramSha256
        };
        let (r, _) = raw_after_request(method, &bytes, true).await;
        assert!(r.is_err());
    }
}
