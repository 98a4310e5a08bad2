//! The HTTP endpoint: `/metrics`, `/healthz` and `/readyz` served with hyper's HTTP/1.1
//! server, as tasks on the runtime that runs everything else (no thread of its own).
//!
//! What a client gets (each bound is a const below, [`Limits::DEFAULT`]):
//! - keep-alive: requests on one connection are answered in turn until the client closes
//!   it or asks for `Connection: close` (or speaks HTTP/1.0 without keep-alive);
//! - `HEAD`: the status and headers of the `GET` (its `Content-Length` too), no body;
//! - a request head may arrive in any number of pieces, but it must be complete within
//!   [`HEADER_READ_TIMEOUT`] of the moment the server starts waiting for it, else the
//!   connection is closed without an answer. The same clock runs while a keep-alive
//!   connection is idle between requests, so an idle connection lives that long too;
//! - a head larger than [`MAX_HEAD`] is answered `431 Request Header Fields Too Large`
//!   and the connection closed;
//! - a connection is served for at most [`MAX_CONNECTION_AGE`]; then it is asked to close
//!   after the response in progress, and dropped if that is not done within
//!   [`HEADER_READ_TIMEOUT`] more (a client that stops reading a response holds nothing
//!   longer than that);
//! - at most [`MAX_CONNECTIONS`] connections are served at once; past that pgtide stops
//!   accepting until one ends, so further clients wait in the kernel's listen backlog
//!   (they are answered late, not refused, and a flood costs no memory here; a JoinSet
//!   of the connection tasks counts them, and aborts what is left when `serve` returns);
//! - when `stop` resolves the listening socket is closed, idle connections are closed,
//!   responses in progress get up to [`STOP_GRACE`] to finish, and `serve` returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{readiness, Metrics, Probe};

/// How long a request head may take to arrive, counted from when the server starts
/// waiting for it: the whole head of a slow client, or the idle time of a keep-alive
/// connection between two requests.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head (request line and headers) that is read; also the bound of
/// a connection's read buffer (hyper's `max_buf_size`).
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// How long one connection is served before it is asked to close.
pub(crate) const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Connections served at once; more wait in the listen backlog.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How long responses in progress may take to finish once `stop` resolves.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(1);

/// The bounds of the endpoint (the consts above; tests shorten them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub header_read_timeout: Duration,
    pub max_head: usize,
    pub max_connection_age: Duration,
    pub max_connections: usize,
    pub stop_grace: Duration,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_head: MAX_HEAD,
        max_connection_age: MAX_CONNECTION_AGE,
        max_connections: MAX_CONNECTIONS,
        stop_grace: STOP_GRACE,
    };
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    stop: impl Future<Output = ()>,
) {
    serve_with(listener, metrics, probe, stop, Limits::DEFAULT).await
}

/// [`serve`] with the given bounds.
pub(crate) async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    stop: impl Future<Output = ()>,
    limits: Limits,
) {
    tokio::pin!(stop);
    // Each connection watches this and closes gracefully once it turns true (or the
    // sender is gone).
    let (stopping, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept(), if connections.len() < limits.max_connections => {
                let stream = match r {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors or the like: pause rather than spin.
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                connections.spawn(connection(
                    stream,
                    metrics.clone(),
                    probe.clone(),
                    limits,
                    stop_rx.clone(),
                ));
            }
            // Reaps finished connections, which frees their slots.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    drop(listener);
    let _ = stopping.send(true);
    let _ = tokio::time::timeout(limits.stop_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // Dropping the set aborts what is left.
}

/// Serves one connection until it closes, its age is up or the endpoint stops.
async fn connection(
    stream: TcpStream,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let route = route(req.method(), req.uri().path());
        let metrics = metrics.clone();
        let probe = probe.clone();
        async move { Ok::<_, Infallible>(respond(route, &metrics, &*probe).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(limits.max_connection_age) => None,
        _ = stop.wait_for(|s| *s) => None,
    };
    let result = match done {
        Some(r) => r,
        None => {
            // Closes an idle connection now, a busy one after its response.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_read_timeout, conn).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!("metrics endpoint: a connection did not close in time");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        // A client that left mid-request, a timeout, a malformed head: that client's
        // business, not the operator's.
        tracing::debug!(error = %e, "metrics endpoint: connection ended");
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
    MethodNotAllowed,
}

/// `HEAD` is routed as `GET` (hyper sends the headers, including the body's
/// `Content-Length`, and leaves the body out); the query string is ignored.
fn route(method: &Method, path: &str) -> Route {
    if method != Method::GET && method != Method::HEAD {
        return Route::MethodNotAllowed;
    }
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        _ => Route::NotFound,
    }
}

/// Answers one request.
async fn respond(route: Route, metrics: &Metrics, probe: &dyn Probe) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain";
    match route {
        Route::Metrics => {
            probe.refresh();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.encode(),
            )
        }
        Route::Healthz => reply(StatusCode::OK, TEXT, b"ok\n".to_vec()),
        Route::Readyz => match readiness(probe).await {
            Ok(()) => reply(StatusCode::OK, TEXT, b"ready\n".to_vec()),
            Err(down) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {}\n", down.join("; ")).into_bytes(),
            ),
        },
        Route::NotFound => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            b"try /metrics, /healthz or /readyz\n".to_vec(),
        ),
        Route::MethodNotAllowed => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                b"use GET or HEAD\n".to_vec(),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A probe with nothing to refresh and no database.
    struct NoDatabases;

    impl Probe for NoDatabases {
        fn refresh(&self) {}
        fn primaries(&self) -> Vec<super::super::PrimaryCheck> {
            Vec::new()
        }
    }

    const SHORT: Limits = Limits {
        header_read_timeout: Duration::from_millis(400),
        ..Limits::DEFAULT
    };

    /// Starts the endpoint on a free loopback port; dropping the sender stops it.
    async fn start(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(
            listener,
            Arc::new(Metrics::new()),
            Arc::new(NoDatabases),
            async move {
                let _ = rx.await;
            },
            limits,
        ));
        (addr, tx, task)
    }

    /// Reads one response: its head (up to the blank line) and a body of its
    /// `Content-Length`.
    async fn response(s: &mut TcpStream) -> (String, Vec<u8>) {
        next_response(s)
            .await
            .expect("a response, not the end of the connection")
    }

    /// [`response`], or `None` when the server closed the connection before one began.
    async fn next_response(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut byte).await.unwrap_or(0);
            if n == 0 && buf.is_empty() {
                return None;
            }
            assert_eq!(
                n, 1,
                "the connection closed inside a response head: {buf:?}"
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).expect("an ASCII head");
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().expect("a length"))
            })
            .expect("a Content-Length");
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.expect("the body");
        Some((head, body))
    }

    /// Reads until the server closes the connection; returns what came and when.
    async fn until_closed(s: &mut TcpStream) -> (Vec<u8>, Instant) {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        // A reset counts as closed too.
        assert!(r.is_ok(), "the server still holds the connection after 5 s");
        (rest, Instant::now())
    }

    #[test]
    fn routes() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::HEAD, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(route(&Method::HEAD, "/readyz"), Route::Readyz);
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/metrics"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::PUT, "/nope"), Route::MethodNotAllowed);
    }

    /// A client that sends part of a head and stalls is disconnected, unanswered, once
    /// the header read timeout is up, and not before.
    #[tokio::test]
    async fn a_stalled_head_is_cut_off() {
        let (addr, _stop, _task) = start(SHORT).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let sent = Instant::now();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n")
            .await
            .expect("write");
        let (rest, closed) = until_closed(&mut s).await;
        let waited = closed - sent;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(
            waited >= Duration::from_millis(350),
            "cut off after {waited:?}, before the timeout"
        );
        assert!(waited < Duration::from_secs(2), "cut off after {waited:?}");
    }

    /// The same clock bounds an idle keep-alive connection: it is answered, stays open
    /// for the next request, and is closed once idle for the timeout.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let (addr, _stop, _task) = start(SHORT).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = response(&mut s).await;
        let answered = Instant::now();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert_eq!(body, b"ok\n");
        let (rest, closed) = until_closed(&mut s).await;
        let idle = closed - answered;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(
            idle >= Duration::from_millis(350),
            "closed after {idle:?} idle"
        );
        assert!(idle < Duration::from_secs(2), "closed after {idle:?} idle");
    }

    /// A connection past its age is closed, even when its client keeps it busy: after
    /// the response in progress (which says `Connection: close`), or at once when idle.
    #[tokio::test]
    async fn an_old_connection_is_closed() {
        let (addr, _stop, _task) = start(Limits {
            max_connection_age: Duration::from_millis(300),
            ..Limits::DEFAULT
        })
        .await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let opened = Instant::now();
        let mut answered = 0;
        loop {
            assert!(
                opened.elapsed() < Duration::from_secs(3),
                "still served after {answered} requests"
            );
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
            let Some((head, body)) = next_response(&mut s).await else {
                break;
            };
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert_eq!(body, b"ok\n");
            answered += 1;
            if head.to_ascii_lowercase().contains("connection: close") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (rest, _) = until_closed(&mut s).await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(answered >= 3, "closed after {answered} requests");
        assert!(
            opened.elapsed() >= Duration::from_millis(300),
            "closed after {:?}",
            opened.elapsed()
        );
    }

    /// Past `max_connections` a client waits (unanswered, not refused) until a slot
    /// frees.
    #[tokio::test]
    async fn connections_beyond_the_limit_wait() {
        let (addr, _stop, _task) = start(Limits {
            max_connections: 2,
            ..Limits::DEFAULT
        })
        .await;
        let request = b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n";
        let mut first = TcpStream::connect(addr).await.expect("connect");
        first.write_all(request).await.expect("write");
        assert!(response(&mut first)
            .await
            .0
            .starts_with("HTTP/1.1 200 OK\r\n"));
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second.write_all(request).await.expect("write");
        assert!(response(&mut second)
            .await
            .0
            .starts_with("HTTP/1.1 200 OK\r\n"));

        // Both are kept alive: a third waits.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(request).await.expect("write");
        let early = tokio::time::timeout(Duration::from_millis(300), response(&mut third)).await;
        assert!(early.is_err(), "a third connection was served: {early:?}");

        // The first leaves: the third is served.
        drop(first);
        let (head, body) = tokio::time::timeout(Duration::from_secs(2), response(&mut third))
            .await
            .expect("the third connection is served once a slot frees");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, b"ok\n");
    }

    /// `stop`: the endpoint returns, its listening socket is closed, an idle
    /// connection is closed.
    #[tokio::test]
    async fn stop_closes_the_endpoint() {
        let (addr, stop, task) = start(Limits::DEFAULT).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pgtide\r\n\r\n")
            .await
            .expect("write");
        assert!(response(&mut s).await.0.starts_with("HTTP/1.1 200 OK\r\n"));
        let stopped = Instant::now();
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("serve returns")
            .expect("serve does not panic");
        assert!(
            stopped.elapsed() < STOP_GRACE,
            "an idle connection held serve"
        );
        let (rest, _) = until_closed(&mut s).await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listening socket is closed"
        );
    }
}
