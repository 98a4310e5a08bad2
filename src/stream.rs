//! The byte stream of a client or server connection: plain TCP or TLS over TCP.
//!
//! The session loop does readiness-based, non-blocking I/O: it waits for
//! [`Stream::readable`] / [`Stream::writable`], then calls [`Stream::try_read_buf`] /
//! [`Stream::try_write`], which never wait. For plain TCP these are tokio's own calls
//! (one enum match more, nothing else). For TLS two things differ, and the session
//! handles both:
//! - rustls may hold decrypted bytes the socket no longer signals: after a read that
//!   returned data, [`Stream::readable`] is ready at once until a read comes back empty;
//! - rustls may hold encrypted bytes not yet written: [`Stream::wants_flush`] says so,
//!   and [`Stream::try_flush`] pushes them when the socket is writable.
//!
//! The TLS calls poll tokio-rustls once with a no-op waker: a `Pending` there becomes
//! `WouldBlock`, and the session's next wait registers the real waker on the socket.
//! [`AsyncRead`] / [`AsyncWrite`] are implemented too, for login and internal queries.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::protocol::backend::{self, Severity};
use crate::protocol::ScanError;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A connection's stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

/// A TLS connection (either side) and whether rustls may hold decrypted bytes.
pub struct TlsConn {
    io: tokio_rustls::TlsStream<TcpStream>,
    /// The last read returned data: more may be buffered inside rustls.
    buffered: bool,
}

/// Polls `f` once without a waker that does anything: `Pending` is `WouldBlock`.
fn poll_once<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Stream {
    /// A TLS stream from a finished handshake.
    pub fn tls(io: impl Into<tokio_rustls::TlsStream<TcpStream>>) -> Stream {
        Stream::Tls(Box::new(TlsConn {
            io: io.into(),
            // The peer may have sent data along with its last handshake message.
            buffered: true,
        }))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.io.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// The peer's certificate chain, leaf first (TLS with a verified client certificate).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => match &t.io {
                tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
                tokio_rustls::TlsStream::Client(c) => c.get_ref().1.peer_certificates(),
            },
        }
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t.io.get_ref().1.alpn_protocol(),
        }
    }

    /// Waits until a read may find something.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.readable().await,
            Stream::Tls(t) if t.buffered => Ok(()),
            Stream::Tls(t) => t.io.get_ref().0.readable().await,
        }
    }

    /// [`Self::readable`] as a poll, for a wait that keeps no future per socket (the
    /// waker goes to the socket's one reader slot: only the owning task may call it).
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(t) if t.buffered => Poll::Ready(Ok(())),
            Stream::Tls(t) => t.io.get_ref().0.poll_read_ready(cx),
        }
    }

    /// [`Self::writable`] as a poll (the socket's one writer slot).
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_write_ready(cx)
    }

    /// Waits until a write may go out.
    pub async fn writable(&self) -> io::Result<()> {
        self.tcp().writable().await
    }

    /// Reads what is available into `buf` without waiting: `WouldBlock` when nothing is.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => read_draining(s, buf),
            Stream::Tls(t) => {
                let r = poll_once(t.io.read_buf(buf));
                t.buffered = matches!(r, Ok(n) if n > 0);
                r
            }
        }
    }

    /// Writes what the socket takes now, without waiting: `WouldBlock` when nothing.
    /// With TLS, bytes accepted may still sit in rustls: see [`Stream::wants_flush`].
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(data),
            Stream::Tls(t) => poll_once(t.io.write(data)),
        }
    }

    /// Writes all of `data` and, with TLS, everything rustls holds: waits as needed.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        if self.is_tls() {
            self.flush().await?;
        }
        Ok(())
    }

    /// TLS bytes wait in rustls for the socket.
    pub fn wants_flush(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.io.get_ref().1.wants_write(),
        }
    }

    /// Pushes TLS bytes waiting in rustls as far as the socket takes them now.
    pub fn try_flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => match poll_once(t.io.flush()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                r => r,
            },
        }
    }

    /// A read that finds nothing (and no end of stream): the idle connection has no
    /// unexpected input. What is read is dropped: a connection failing this is closed.
    pub fn is_quiet(&mut self) -> bool {
        match self {
            Stream::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Tls(_) => {
                let mut probe = BytesMut::with_capacity(64);
                matches!(self.try_read_buf(&mut probe), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => {
                let before = buf.filled().len();
                let r = Pin::new(&mut t.io).poll_read(cx, buf);
                t.buffered = matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before;
                r
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_shutdown(cx),
        }
    }
}

/// Reads from a plain socket into the spare capacity of `buf` (which must have some).
///
/// A read that leaves room in `buf` has drained the socket, so its readiness is cleared
/// then and there (as tokio's own `poll_read` does): the next wait goes to the reactor
/// instead of costing a `recv` that only says EAGAIN. Data that arrives meanwhile sets
/// readiness anew, which clearing the old readiness does not undo.
fn read_draining(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        // A zero-length recv would look like the end of the stream.
        buf.reserve(4096);
    }
    let mut got = None;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        let n = socket2::SockRef::from(stream).recv(spare)?;
        // SAFETY: recv initialized the first n bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Why [`read_message`] returned no message.
#[derive(Debug)]
pub enum ReadError {
    /// The peer went away (EOF) or the socket failed.
    Io(io::Error),
    /// The length field is below 4 or above the limit: the peer is not speaking the
    /// protocol.
    Frame(ScanError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Reads exactly one tagged message (tag, length, body) and nothing past it, so that
/// what follows stays in the socket for whoever reads next. A length field below 4 or
/// above `max_len` is refused before anything is allocated for the body.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_len: u32,
) -> Result<(u8, Vec<u8>), ReadError> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let (tag, len) = (
        header[0],
        u32::from_be_bytes([header[1], header[2], header[3], header[4]]),
    );
    if len < 4 {
        return Err(ReadError::Frame(ScanError::BadLength { tag, len }));
    }
    if len > max_len {
        return Err(ReadError::Frame(ScanError::TooLarge {
            tag,
            len,
            max: max_len,
        }));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Writes an ErrorResponse of severity FATAL (the connection is about to close); a
/// failure to write it is ignored.
pub async fn send_fatal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let mut b = BytesMut::with_capacity(128 + message.len());
    backend::error_response(&mut b, Severity::Fatal, code, message, None, hint);
    let _ = stream.write_all(&b).await;
    let _ = stream.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::net::TcpListener;

    /// A TLS connection over loopback: (pgtide's side as a `Stream`, the peer).
    async fn pair() -> (Stream, tokio_rustls::client::TlsStream<TcpStream>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .expect("server handshake")
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("client handshake")
        };
        let (s, c) = tokio::join!(accept, connect);
        (Stream::tls(s), c)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    /// Records already decrypted inside rustls are read although the socket has nothing
    /// more to say: `readable` must not wait for the socket then.
    #[tokio::test]
    async fn bytes_buffered_in_rustls_are_readable() {
        let (mut ours, mut peer) = pair().await;
        let data = pattern(48 * 1024);
        peer.write_all(&data).await.expect("write");
        peer.flush().await.expect("flush");
        let mut got = Vec::new();
        let read_all = async {
            while got.len() < data.len() {
                ours.readable().await.expect("readable");
                // Small reads leave most of each 16 KiB record inside rustls.
                let mut chunk = BytesMut::with_capacity(1000);
                match ours.try_read_buf(&mut chunk) {
                    Ok(0) => panic!("unexpected end of stream"),
                    Ok(_) => got.extend_from_slice(&chunk),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        };
        let done = tokio::time::timeout(Duration::from_secs(10), read_all).await;
        assert!(
            done.is_ok(),
            "stalled after {} of {} bytes",
            got.len(),
            data.len()
        );
        assert_eq!(got, data);
    }

    /// Bytes rustls took but could not write yet go out through `try_flush` once the
    /// socket is writable, without another `try_write`.
    #[tokio::test]
    async fn bytes_held_by_rustls_are_flushed() {
        let (mut ours, mut peer) = pair().await;
        let data = pattern(8 * 1024 * 1024);
        let reader = tokio::spawn(async move {
            // Reads only after the writer has filled the socket buffers.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while got.len() < 8 * 1024 * 1024 {
                let n = peer.read(&mut buf).await.expect("peer read");
                assert!(n > 0, "end of stream after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let mut at = 0;
        let mut saw_pending_output = false;
        let write_all = async {
            while at < data.len() || ours.wants_flush() {
                if at < data.len() {
                    match ours.try_write(&data[at..]) {
                        Ok(n) => at += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("write: {e}"),
                    }
                }
                ours.try_flush().expect("flush");
                if ours.wants_flush() {
                    saw_pending_output = true;
                    ours.writable().await.expect("writable");
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), write_all)
            .await
            .expect("writing stalled");
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the peer did not get everything")
            .expect("reader task");
        assert!(got == data, "the peer got different bytes");
        assert!(saw_pending_output, "the socket never pushed back");
    }
}
