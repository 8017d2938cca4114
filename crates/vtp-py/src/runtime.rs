//! One tokio runtime for the module, and [`block_on`]: runs a future with
//! the GIL released while staying interruptible by Ctrl-C.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::errors::VtpError;

/// The module's runtime (two workers: HTTP and uploads, not training).
pub(crate) fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vtp-py")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// How often a blocked call looks for a pending signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Runs `future` on the runtime with the GIL released, checking for signals
/// every 100 ms: Ctrl-C aborts the future and raises `KeyboardInterrupt`.
pub(crate) fn block_on<T, F>(py: Python<'_>, future: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = PyResult<T>> + Send + 'static,
{
    let mut task = runtime().spawn(future);
    loop {
        let finished = py.detach(|| {
            runtime().block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut task).await })
        });
        match finished {
            Ok(Ok(result)) => return result,
            Ok(Err(join)) => return Err(VtpError::new_err(format!("the call failed: {join}"))),
            Err(_still_running) => {
                if let Err(interrupt) = py.check_signals() {
                    task.abort();
                    return Err(interrupt);
                }
            }
        }
    }
}
