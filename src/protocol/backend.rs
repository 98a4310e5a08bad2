//! Backend messages (server to client): builders for the ones pgtide writes to clients,
//! and views of the ones it inspects in a server's stream.

use bytes::{BufMut, BytesMut};

use super::{auth_code, cstr, tag};

fn with_len(buf: &mut BytesMut, t: u8, body: impl FnOnce(&mut BytesMut)) {
    super::put_message(buf, Some(t), body);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    with_len(buf, tag::AUTHENTICATION, |b| b.put_i32(auth_code::OK));
}

pub fn authentication_cleartext(buf: &mut BytesMut) {
    with_len(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(auth_code::CLEARTEXT_PASSWORD)
    });
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    with_len(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(auth_code::MD5_PASSWORD);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    with_len(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(auth_code::SASL);
        for m in mechanisms {
            b.put_slice(m.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    with_len(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(auth_code::SASL_CONTINUE);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    with_len(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(auth_code::SASL_FINAL);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    with_len(buf, tag::PARAMETER_STATUS, |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    with_len(buf, tag::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    with_len(buf, tag::READY_FOR_QUERY, |b| b.put_u8(status));
}

/// Severity of an ErrorResponse / NoticeResponse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// ErrorResponse (or NoticeResponse for Notice/Warning) with SQLSTATE, message and an
/// optional detail and hint.
pub fn error_response(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    let t = match severity {
        Severity::Error | Severity::Fatal => tag::ERROR_RESPONSE,
        _ => tag::NOTICE_RESPONSE,
    };
    with_len(buf, t, |b| {
        let mut field = |k: u8, v: &str| {
            b.put_u8(k);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        };
        field(b'S', severity.as_str());
        field(b'V', severity.as_str());
        field(b'C', code);
        field(b'M', message);
        if let Some(d) = detail {
            field(b'D', d);
        }
        if let Some(h) = hint {
            field(b'H', h);
        }
        b.put_u8(0);
    });
}

/// Convenience: an ERROR with a SQLSTATE and message.
pub fn error(buf: &mut BytesMut, code: &str, message: &str) {
    error_response(buf, Severity::Error, code, message, None, None);
}

/// Convenience: a FATAL with a SQLSTATE and message.
pub fn fatal(buf: &mut BytesMut, code: &str, message: &str) {
    error_response(buf, Severity::Fatal, code, message, None, None);
}

/// The fields of an ErrorResponse / NoticeResponse body that pgtide looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    /// Non-localized severity (`V`), or `S` when the server sent no `V`.
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

impl ErrorFields<'_> {
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

/// Parses the body of an ErrorResponse or NoticeResponse.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut out = ErrorFields::default();
    let mut rest = body;
    let mut localized = "";
    while let Some((&k, after)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let Some((v, next)) = cstr(after) else { break };
        let v = std::str::from_utf8(v).unwrap_or("");
        match k {
            b'V' => out.severity = v,
            b'S' => localized = v,
            b'C' => out.code = v,
            b'M' => out.message = v,
            _ => {}
        }
        rest = next;
    }
    if out.severity.is_empty() {
        out.severity = localized;
    }
    out
}

/// Parses the body of a ParameterStatus: (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((
        std::str::from_utf8(name).ok()?,
        std::str::from_utf8(value).ok()?,
    ))
}

/// The fields of one DataRow body, each `None` for SQL NULL.
pub fn parse_data_row(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    if body.len() < 2 {
        return None;
    }
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut out = Vec::with_capacity(n.min(64));
    let mut rest = &body[2..];
    for _ in 0..n {
        if rest.len() < 4 {
            return None;
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            let len = len as usize;
            if rest.len() < len {
                return None;
            }
            out.push(Some(&rest[..len]));
            rest = &rest[len..];
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            "28P01",
            "password authentication failed",
            Some("d"),
            None,
        );
        assert_eq!(b[0], b'E');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let f = parse_error_fields(&b[5..]);
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.code, "28P01");
        assert_eq!(f.message, "password authentication failed");
        assert!(f.is_fatal());
    }

    #[test]
    fn parameter_status_round_trips() {
        let mut b = BytesMut::new();
        parameter_status(&mut b, "TimeZone", "UTC");
        assert_eq!(parse_parameter_status(&b[5..]), Some(("TimeZone", "UTC")));
    }
}
