//! For the binaries: logging and the signals that end a service.

use std::time::Duration;

/// The variable that picks the log format: `text` (the default) or `json`.
pub const LOG_FORMAT_ENV: &str = "VTP_LOG_FORMAT";

/// Logs to stderr, filtered by `VTP_LOG` (default `info`), for the
/// binaries: readable text, or with `VTP_LOG_FORMAT=json` one JSON object
/// per line, carrying the fields of every span it is in (a request's
/// `request_id`, a job's `job_id`) beside its own.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VTP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}

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
