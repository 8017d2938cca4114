//! For the binaries: the signals that end a service.

use std::time::Duration;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Resolves when the parent process exits (the process is re-parented) or on
/// a shutdown signal: a child trainer never outlives its backend.
pub async fn parent_exited() {
    #[cfg(unix)]
    let orphaned = async {
        let parent = std::os::unix::process::parent_id();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if std::os::unix::process::parent_id() != parent {
                return;
            }
        }
    };
    #[cfg(not(unix))]
    let orphaned = std::future::pending::<()>();
    tokio::select! {
        () = orphaned => tracing::warn!("parent process exited; stopping"),
        () = shutdown_signal() => {},
    }
}
