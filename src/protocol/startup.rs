//! The first packet of a connection: StartupMessage, SSLRequest, GSSENCRequest or
//! CancelRequest. It has a length but no tag.

use super::{be_i32, cstr};

pub const PROTOCOL_3_0: i32 = 196_608;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// A CancelRequest one pgtide process forwards to the peer that handed out its key
/// (pgtide's own code, not PostgreSQL's): the receiver handles it itself and never
/// forwards it again, so that peers that disagree about ids cannot bounce it forever.
pub const FORWARDED_CANCEL_CODE: i32 = 80_877_199;
/// PostgreSQL's own limit on a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A parsed first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Startup {
        /// Protocol version: major << 16 | minor.
        version: i32,
        /// Parameters in the order the client sent them.
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    CancelRequest {
        pid: i32,
        secret: i32,
        /// Sent by a peer pgtide ([`FORWARDED_CANCEL_CODE`]).
        forwarded: bool,
    },
}

/// Why a first packet was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupError {
    BadLength(i32),
    Malformed(&'static str),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::BadLength(n) => write!(f, "invalid length of startup packet: {n}"),
            StartupError::Malformed(what) => write!(f, "invalid startup packet: {what}"),
        }
    }
}

/// Validates the length word of a first packet; returns the body length after it.
pub fn body_len(len_word: [u8; 4]) -> Result<usize, StartupError> {
    let len = i32::from_be_bytes(len_word);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(StartupError::BadLength(len));
    }
    Ok(len as usize - 4)
}

/// Parses the body of a first packet (everything after the length word).
pub fn parse(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::Malformed("too short"));
    }
    let code = be_i32(body);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE | FORWARDED_CANCEL_CODE => {
            if rest.len() != 8 {
                return Err(StartupError::Malformed("cancel request must be 16 bytes"));
            }
            Ok(StartupPacket::CancelRequest {
                pid: be_i32(rest),
                secret: be_i32(&rest[4..]),
                forwarded: code == FORWARDED_CANCEL_CODE,
            })
        }
        version => {
            let mut params = Vec::new();
            let mut r = rest;
            if (version >> 16) == 3 {
                loop {
                    let Some((k, after)) = cstr(r) else {
                        return Err(StartupError::Malformed("missing terminator"));
                    };
                    if k.is_empty() {
                        break;
                    }
                    let Some((v, after)) = cstr(after) else {
                        return Err(StartupError::Malformed("parameter without a value"));
                    };
                    let k = String::from_utf8(k.to_vec())
                        .map_err(|_| StartupError::Malformed("parameter name is not UTF-8"))?;
                    let v = String::from_utf8(v.to_vec())
                        .map_err(|_| StartupError::Malformed("parameter value is not UTF-8"))?;
                    params.push((k, v));
                    r = after;
                }
            }
            Ok(StartupPacket::Startup { version, params })
        }
    }
}

/// Splits the `options` startup parameter into `name=value` settings: `-c name=value`,
/// `-cname=value` and `--name=value`, with backslash-escaped spaces, as PostgreSQL does.
/// Returns `Err(word)` for a switch pgtide cannot apply.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| "-c".to_string())?
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else {
            return Err(w);
        };
        let Some((k, v)) = setting.split_once('=') else {
            return Err(setting);
        };
        out.push((k.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_params() {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice\0database\0app\0\0");
        let p = parse(&body).unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "app".into())
                ]
            }
        );
    }

    #[test]
    fn rejects_missing_terminator() {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0alice");
        assert!(parse(&body).is_err());
    }

    #[test]
    fn parses_options() {
        assert_eq!(
            parse_options(r"-c search_path=a,b -cstatement_timeout=5s --work-mem=64kB -c x=a\ b")
                .unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64kB".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert_eq!(parse_options("-d 5"), Err("-d".to_string()));
    }

    #[test]
    fn lengths_are_capped() {
        assert!(body_len(7i32.to_be_bytes()).is_err());
        assert!(body_len(1_000_000i32.to_be_bytes()).is_err());
        assert_eq!(body_len(8i32.to_be_bytes()), Ok(4));
    }
}
