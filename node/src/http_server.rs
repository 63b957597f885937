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
        let header_timeout = limits.header_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The protocol is read from the first bytes, which hyper would wait for without a
            // deadline: a client that connects and sends nothing is closed here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, tcp.peek(&mut first)).await, Ok(Ok(1..))) {
                tracing::trace!(client = %addr, "connection sent nothing in time: closed");
                return;
            }
            let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn).await {
                tracing::trace!(client = %addr, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
