//! Frontend messages (client to server): builders for the ones pgtide sends to servers
//! itself, and views of the ones it inspects in a client's stream.

use bytes::{BufMut, BytesMut};

use super::{cstr, tag};

use super::put_message as with_len;

/// True for the message types a client may send once logged in (PostgreSQL's
/// `PostgresMain` accepts exactly these; any other type is a protocol violation that ends
/// the backend). CopyData, CopyDone and CopyFail are valid outside COPY too: the server
/// ignores them there.
pub fn is_message_type(t: u8) -> bool {
    matches!(
        t,
        tag::QUERY
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FLUSH
            | tag::SYNC
            | tag::FUNCTION_CALL
            | tag::TERMINATE
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_FAIL
    )
}

/// StartupMessage for protocol 3.0 with the given parameters.
pub fn startup_message<'a>(
    buf: &mut BytesMut,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    with_len(buf, None, |b| {
        b.put_i32(super::startup::PROTOCOL_3_0);
        for (k, v) in params {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

/// SSLRequest: asks the server to switch to TLS (it answers 'S' or 'N').
pub fn ssl_request(buf: &mut BytesMut) {
    with_len(buf, None, |b| b.put_i32(super::startup::SSL_REQUEST_CODE));
}

/// CancelRequest for a server's BackendKeyData.
pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    with_len(buf, None, |b| {
        b.put_i32(super::startup::CANCEL_REQUEST_CODE);
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// A CancelRequest forwarded to the peer pgtide that owns its key.
pub fn forwarded_cancel(buf: &mut BytesMut, pid: i32, secret: i32) {
    with_len(buf, None, |b| {
        b.put_i32(super::startup::FORWARDED_CANCEL_CODE);
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    with_len(buf, Some(tag::QUERY), |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    });
}

/// Parse, Bind, Execute and Sync of the unnamed statement and portal: `sql` run once
/// with text parameters (`None` = NULL), text results.
pub fn query_with_params(buf: &mut BytesMut, sql: &str, params: &[Option<&str>]) {
    with_len(buf, Some(tag::PARSE), |b| {
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    });
    with_len(buf, Some(tag::BIND), |b| {
        b.put_u8(0);
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    });
    with_len(buf, Some(tag::EXECUTE), |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    with_len(buf, Some(tag::SYNC), |_| {});
}

pub fn terminate(buf: &mut BytesMut) {
    with_len(buf, Some(tag::TERMINATE), |_| {});
}

pub fn password_message(buf: &mut BytesMut, password: &[u8]) {
    with_len(buf, Some(tag::PASSWORD_MESSAGE), |b| {
        b.put_slice(password);
        b.put_u8(0);
    });
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    with_len(buf, Some(tag::PASSWORD_MESSAGE), |b| {
        b.put_slice(mechanism.as_bytes());
        b.put_u8(0);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    with_len(buf, Some(tag::PASSWORD_MESSAGE), |b| b.put_slice(data));
}

/// The SQL text of a Query body (without its NUL).
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    cstr(body).map(|(s, _)| s)
}

/// The statement name and SQL text of a Parse body.
pub fn parse_statement(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    let (sql, _) = cstr(rest)?;
    Some((name, sql))
}

/// SASLInitialResponse body: (mechanism, initial data).
pub fn parse_sasl_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = cstr(body)?;
    if rest.len() < 4 {
        return None;
    }
    let n = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if n < 0 {
        return Some((mechanism, &[]));
    }
    if data.len() != n as usize {
        return None;
    }
    Some((mechanism, data))
}
