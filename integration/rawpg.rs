//! A tiny raw-protocol PostgreSQL client for tests: send arbitrary frontend messages,
//! read backend messages one by one or until ReadyForQuery. Logs in with trust only.
//! Every network await is bounded by [`IO_TIMEOUT`], so a hang fails the test.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const PROTOCOL_3_0: i32 = 3 << 16;
pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;

/// One backend message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The fields of an ErrorResponse / NoticeResponse, by field code.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&c, rest)) = b.split_first() {
            if c == 0 {
                break;
            }
            let end = rest.iter().position(|&x| x == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }
    pub fn severity(&self) -> Option<String> {
        self.field(b'V').or_else(|| self.field(b'S'))
    }
    pub fn message(&self) -> Option<String> {
        self.field(b'M')
    }
    /// The columns of a DataRow as text (None for NULL).
    pub fn data_row(&self) -> Vec<Option<String>> {
        assert_eq!(self.tag, b'D', "not a DataRow: {self:?}");
        let b = &self.body;
        let n = i16::from_be_bytes([b[0], b[1]]) as usize;
        let mut at = 2;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                let l = len as usize;
                out.push(Some(String::from_utf8_lossy(&b[at..at + l]).into_owned()));
                at += l;
            }
        }
        out
    }
    /// Name and value of a ParameterStatus.
    pub fn parameter_status(&self) -> (String, String) {
        assert_eq!(self.tag, b'S');
        let parts: Vec<&[u8]> = self.body.split(|&c| c == 0).collect();
        (
            String::from_utf8_lossy(parts[0]).into_owned(),
            String::from_utf8_lossy(parts[1]).into_owned(),
        )
    }
}

// ---- frontend message builders ----

fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(tag);
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// A StartupMessage (or any first packet) with `version` and parameters.
pub fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// An 8-byte request packet (SSLRequest, GSSENCRequest).
pub fn request_code(code: i32) -> Vec<u8> {
    let mut v = 8i32.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    framed(b'Q', &b)
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    framed(b'P', &b)
}

/// Bind with text parameters (None = NULL) and text results.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(s) => {
                b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    framed(b'B', &b)
}

pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, portal);
    framed(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    framed(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    framed(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    framed(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    framed(b'X', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    framed(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    framed(b'c', &[])
}

pub fn copy_fail(msg: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, msg);
    framed(b'f', &b)
}

/// FunctionCall with binary arguments and a binary result.
pub fn function_call(oid: u32, args: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        b.extend_from_slice(&(a.len() as i32).to_be_bytes());
        b.extend_from_slice(a);
    }
    b.extend_from_slice(&1i16.to_be_bytes());
    framed(b'F', &b)
}

/// A raw connection.
pub struct RawPg {
    pub stream: TcpStream,
    buf: BytesMut,
    /// ParameterStatus messages received at login, in order.
    pub login_params: Vec<(String, String)>,
    /// Every message of the login reply, in order.
    pub login_msgs: Vec<Msg>,
}

/// What a read ended with.
#[derive(Debug)]
pub enum ReadEnd {
    Eof,
    Err(String),
}

impl RawPg {
    /// Opens a TCP connection without sending anything.
    pub async fn connect(addr: SocketAddr) -> RawPg {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        RawPg {
            stream,
            buf: BytesMut::new(),
            login_params: Vec::new(),
            login_msgs: Vec::new(),
        }
    }

    /// Connects and logs in (trust) with protocol 3.0 and the given extra parameters.
    pub async fn login(addr: SocketAddr, user: &str, db: &str, extra: &[(&str, &str)]) -> RawPg {
        let mut c = RawPg::connect(addr).await;
        let mut params = vec![("user", user), ("database", db)];
        params.extend_from_slice(extra);
        c.send(&startup(PROTOCOL_3_0, &params)).await;
        c.finish_login().await;
        c
    }

    /// The PID of the BackendKeyData the login reply carried.
    pub fn key_pid(&self) -> i32 {
        let k = self
            .login_msgs
            .iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        i32::from_be_bytes([k.body[0], k.body[1], k.body[2], k.body[3]])
    }

    /// Reads the login reply up to ReadyForQuery; panics on ErrorResponse or EOF.
    pub async fn finish_login(&mut self) {
        loop {
            let m = self.recv().await;
            match m.tag {
                b'E' => panic!("login refused: {:?} {:?}", m.sqlstate(), m.message()),
                b'R' => {
                    let code = i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
                    assert_eq!(code, 0, "only trust logins are supported here");
                }
                b'S' => {
                    let p = m.parameter_status();
                    self.login_params.push(p);
                }
                _ => {}
            }
            let done = m.tag == b'Z';
            self.login_msgs.push(m);
            if done {
                return;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Writes, returning the I/O error instead of panicking.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .map_err(|_| std::io::Error::other("write timed out"))?
    }

    /// Reads one raw byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        assert!(self.buf.is_empty());
        tokio::time::timeout(IO_TIMEOUT, self.stream.read_u8())
            .await
            .expect("read timed out")
            .expect("read")
    }

    /// The next message, or how the stream ended.
    pub async fn try_recv(&mut self) -> Result<Msg, ReadEnd> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                assert!((4..=(1 << 30)).contains(&len), "bad backend length {len}");
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let frame = self.buf.split_to(total);
                    return Ok(Msg {
                        tag: frame[0],
                        body: frame[5..].to_vec(),
                    });
                }
            }
            self.buf.reserve(8192);
            match tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("read timed out after {IO_TIMEOUT:?}"),
                Ok(Ok(0)) => {
                    return Err(if self.buf.is_empty() {
                        ReadEnd::Eof
                    } else {
                        ReadEnd::Err(format!("EOF inside a message: {:?}", &self.buf[..]))
                    })
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ReadEnd::Err(e.to_string())),
            }
        }
    }

    /// The next message; panics at EOF.
    pub async fn recv(&mut self) -> Msg {
        match self.try_recv().await {
            Ok(m) => m,
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = match self.try_recv().await {
                Ok(m) => m,
                Err(e) => {
                    let errors: Vec<_> = out
                        .iter()
                        .filter(|m: &&Msg| m.tag == b'E')
                        .map(|m| (m.sqlstate(), m.message()))
                        .collect();
                    panic!(
                        "connection ended ({e:?}) before ReadyForQuery; got {}: {errors:?}",
                        tags(&out)
                    )
                }
            };
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Runs a simple query and returns its rows as text; panics on ErrorResponse.
    pub async fn simple(&mut self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.send(&query(sql)).await;
        let msgs = self.until_ready().await;
        let mut rows = Vec::new();
        for m in &msgs {
            match m.tag {
                b'E' => panic!("{sql}: {:?} {:?}", m.sqlstate(), m.message()),
                b'D' => rows.push(m.data_row()),
                _ => {}
            }
        }
        rows
    }

    /// First column of the first row of a simple query.
    pub async fn one(&mut self, sql: &str) -> String {
        let rows = self.simple(sql).await;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| panic!("{sql}: no value in {rows:?}"))
    }

    /// Reads until EOF and returns what arrived before it (the stream must end).
    pub async fn until_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            match self.try_recv().await {
                Ok(m) => out.push(m),
                Err(ReadEnd::Eof) => return out,
                Err(ReadEnd::Err(e)) => {
                    // A reset after the FATAL counts as the end too.
                    let _ = e;
                    return out;
                }
            }
        }
    }
}

/// Tags of messages, as a string, for assertions with readable failures.
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Put a 4-byte big-endian i32 into a Vec (for FunctionCall arguments).
pub fn be_i32(v: i32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(v);
    b.to_vec()
}
