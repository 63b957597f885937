//! The node's HTTP server: axum's router on hyper's HTTP/1.1 (what vLLM's server speaks), with
//! the bounds a server facing any client needs and `axum::serve` does not set: a deadline for each request's headers (hyper's
//! header-read timeout, which only runs with a timer), a cap on open connections, and the
//! client's address on every request (`ConnectInfo`). Stops accepting when its token is
//! cancelled and returns once every connection has finished (callers bound that wait).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// What the server allows one client.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (idle kept-alive connections included).
    pub header_timeout: Duration,
    /// A write the client accepts no byte of for this long ends the connection.
    pub write_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop`, then waits for open connections to finish.
/// `refused` counts connections closed at the limit.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    stop: CancellationToken,
    refused: prometheus::IntCounter,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.inc();
            tracing::debug!(client = %addr, limit = limits.max_connections, "connection limit reached: connection closed");
            continue;
        };
        // Streamed tokens are small writes: with Nagle's algorithm on, one could wait for the
        // client's delayed ACK (40 ms on Linux) before leaving.
        let _ = tcp.set_nodelay(true);
        let service = app.clone().map_request(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
            req.map(Body::new)
        });
        // HTTP/1.1 only, as vLLM's own server speaks: its header deadline covers every request
        // on a connection, where an HTTP/2 connection (or the bytes that would tell the two apart)
        // could be held open without one.
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
        let (header_timeout, write_timeout) = (limits.header_timeout, limits.write_timeout);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The protocol is read from the first bytes, which hyper would wait for without a
            // deadline: a client that connects and sends nothing is closed here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, tcp.peek(&mut first)).await, Ok(Ok(1..))) {
                tracing::trace!(client = %addr, "connection sent nothing in time: closed");
                return;
            }
            let io = TokioIo::new(WriteDeadline::new(tcp, write_timeout));
            let conn = builder.serve_connection(io, TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn).await {
                tracing::trace!(client = %addr, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection whose writes fail when the client accepts nothing for `deadline`: a client that
/// stops reading a stream would otherwise hold the connection, and the engine's work for it,
/// for as long as it likes. Reads pass through (their deadlines are hyper's and the body's).
struct WriteDeadline {
    tcp: tokio::net::TcpStream,
    deadline: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(tcp: tokio::net::TcpStream, deadline: Duration) -> Self {
        Self { tcp, deadline, stalled: None }
    }

    /// `Pending` from the socket starts (or continues) the clock; past the deadline, an error.
    fn stall(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let deadline = self.deadline;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client accepted nothing within the write deadline",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

impl tokio::io::AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.tcp).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx).map(|r| r.map(|()| 0)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.tcp).poll_flush(cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx).map(|r| r.map(|()| 0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}
