//! The accept loop both services run: axum's router on hyper, with the
//! bounds `axum::serve` does not set.
//!
//! - **Header-read timeout**: a client must send its whole request head
//!   within [`ServeOptions::header_read_timeout`] (hyper's
//!   `header_read_timeout`, which needs a timer that `axum::serve` does not
//!   give it), so a connection that trickles a header never holds a task
//!   for good.
//! - **Header size**: hyper's read buffer, and so one request head, is at
//!   most [`ServeOptions::max_header_bytes`].
//! - **Connections**: at most [`ServeOptions::max_connections`] at once;
//!   further ones wait in the listen backlog until one closes.
//! - **Shutdown**: once `shutdown` resolves no connection is accepted, open
//!   ones finish their requests, and those still open after
//!   [`ServeOptions::shutdown_grace`] are dropped.
//!
//! Each request carries the peer's address as axum's
//! [`ConnectInfo`], for limits per client.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt as _;

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// How long a client may take to send a request's head.
    pub header_read_timeout: Duration,
    /// The largest request head, in bytes.
    pub max_header_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long open connections get to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves (see the module).
///
/// # Errors
/// Never for a failed connection (it is logged); the listener's errors are
/// retried after a pause, as `axum::serve` does.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    let permits = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request.map(axum::body::Body::new)
            },
        );
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?options.shutdown_grace,
            "connections still open after the shutdown grace; dropping them"
        );
    }
    Ok(())
}
