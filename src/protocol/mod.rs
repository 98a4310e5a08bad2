//! The PostgreSQL wire protocol (version 3.0), sans IO: message tags, a scanner that
//! frames a byte stream without copying it, typed views of the few messages pgtide
//! inspects, and builders for the messages pgtide writes itself.
//!
//! This module is a leaf: it imports nothing else of pgtide.

pub mod backend;
pub mod frontend;
mod scan;
pub mod startup;

pub use scan::{Frame, ScanError, Scanner};

/// Message tags, as the protocol chapter of the PostgreSQL documentation names them.
pub mod tag {
    // Frontend (client to server).
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const FLUSH: u8 = b'H';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD_MESSAGE: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';

    // Backend (server to client).
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Transaction status byte of ReadyForQuery.
pub mod status {
    pub const IDLE: u8 = b'I';
    pub const IN_TRANSACTION: u8 = b'T';
    pub const FAILED: u8 = b'E';
}

/// Authentication request codes (the Int32 after the `R` header).
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// SQLSTATE codes pgtide sends itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const TRANSACTION_TIMEOUT: &str = "25P04";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";

    /// Class 57P, operator intervention (shutdown, crash, restart): the server is going
    /// away or not there yet, and a later attempt may succeed.
    pub fn is_operator_intervention(code: &str) -> bool {
        code.starts_with("57P")
    }

    /// A refusal worth trying again after a pause: the server is starting or shutting
    /// down, or has no connection slot free right now.
    pub fn is_transient(code: &str) -> bool {
        is_operator_intervention(code) || code == TOO_MANY_CONNECTIONS
    }
}

/// Appends a message: the tag (if any; the first packet of a connection has none), a
/// length placeholder, what `body` writes, then patches the length in.
pub(crate) fn put_message(
    buf: &mut bytes::BytesMut,
    t: Option<u8>,
    body: impl FnOnce(&mut bytes::BytesMut),
) {
    use bytes::BufMut;
    if let Some(t) = t {
        buf.put_u8(t);
    }
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads a big-endian i32 from the first four bytes of `b` (caller checks the length).
#[inline]
pub fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Splits a NUL-terminated string off the front of `b`: (string, rest).
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}
