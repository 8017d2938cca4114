//! [`LocalPlatform`]: the whole platform in this process on embedded
//! defaults. The backend (SQLite job store, local-disk blob store) and the
//! trainer service (libtorch, the same engine as `vtp-trainer-service`)
//! serve on loopback ports chosen by the OS, so `vtp.local()` hands back an
//! ordinary `vtp.Client` and the same job objects as a remote backend.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vtp_launch::HttpLauncher;
use vtp_server::AppState;
use vtp_storage::BlobStoreBuilder;
use vtp_trainer::service::{ServiceOptions, TrainerService};

use crate::errors::{VtpError, from_core};
use crate::runtime::block_on;

/// A job without a report for this long is failed by the sweeper.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// How long `close()` waits for the servers to stop.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

struct Running {
    stop: CancellationToken,
    trainer: Arc<TrainerService>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

/// The backend and a trainer service, in process, under one directory.
#[pyclass(module = "vtp._vtp", frozen)]
pub struct LocalPlatform {
    root: PathBuf,
    base_url: String,
    trainer_url: String,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for LocalPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPlatform")
            .field("root", &self.root)
            .field("base_url", &self.base_url)
            .finish()
    }
}

fn io_err(path: &Path, e: std::io::Error) -> PyErr {
    VtpError::new_err(format!("{}: {e}", path.display()))
}

async fn start(root: PathBuf, concurrency: usize, python: PathBuf) -> PyResult<LocalPlatform> {
    let database = format!("sqlite://{}", root.join("vtp.db").display());
    let stores = vtp_storage::connect_stores(&database)
        .await
        .map_err(from_core)?;
    let blobs = BlobStoreBuilder::new()
        .with_url(format!("file://{}", root.join("blobs").display()))
        .build()
        .map_err(from_core)?;

    let loopback = |what: &'static str| async move {
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| VtpError::new_err(format!("binding the {what} on loopback: {e}")))
    };
    let trainer_listener = loopback("trainer service").await?;
    let backend_listener = loopback("backend").await?;
    let trainer_url = format!(
        "http://{}",
        trainer_listener
            .local_addr()
            .map_err(|e| io_err(&root, e))?
    );
    let base_url = format!(
        "http://{}",
        backend_listener
            .local_addr()
            .map_err(|e| io_err(&root, e))?
    );

    // The in-process trainer reports only to this backend, and answers only
    // this backend's token.
    let trainer = TrainerService::with_options(
        Arc::new(vtp_trainer::TchEngine),
        blobs.clone(),
        &root.join("trainer"),
        ServiceOptions {
            concurrency,
            backend_url: base_url.clone(),
            // `python` jobs run with this very interpreter (its venv).
            script: vtp_trainer::service::script::ScriptOptions {
                python,
                ..Default::default()
            },
            ..ServiceOptions::default()
        },
    )
    .map_err(from_core)?;
    let trainer_token = vtp_core::auth::random_token();
    let launcher = Arc::new(
        HttpLauncher::new(&trainer_url)
            .map_err(from_core)?
            .with_token(&trainer_token)
            .with_slots(u32::try_from(concurrency).ok()),
    );
    // One local user, running their own code anyway: `python` jobs are taken.
    let state = AppState::new(stores, blobs, launcher, &base_url)
        .with_stale_after(STALE_AFTER)
        .with_user_code(true);
    let stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(vtp_trainer::service::http::serve_trainer(
            trainer_listener,
            trainer.clone(),
            Some(trainer_token),
            stop.clone().cancelled_owned(),
        )),
        // Jobs a previous session left running have no trainer now: the
        // backend (the leader of its own database) ends them as it starts.
        tokio::spawn(vtp_server::serve(
            backend_listener,
            state,
            stop.clone().cancelled_owned(),
        )),
    ];
    Ok(LocalPlatform {
        root,
        base_url,
        trainer_url,
        running: Mutex::new(Some(Running {
            stop,
            trainer,
            tasks,
        })),
    })
}

#[pymethods]
impl LocalPlatform {
    /// Starts the platform with its state under `root` (created if
    /// missing): `vtp.db` (SQLite), `blobs/` (datasets, checkpoints) and
    /// `trainer/` (scratch). `concurrency` jobs train at once.
    #[new]
    #[pyo3(signature = (root, concurrency=1))]
    fn new(py: Python<'_>, root: PathBuf, concurrency: usize) -> PyResult<Self> {
        std::fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let root = root.canonicalize().map_err(|e| io_err(&root, e))?;
        // `sys.executable` as Python started it (the venv's, not the
        // interpreter it links to), so scripts find the same packages.
        let python: PathBuf = py.import("sys")?.getattr("executable")?.extract()?;
        block_on(py, start(root, concurrency, python))
    }

    /// The backend's URL, for `vtp.Client`.
    #[getter]
    fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The in-process trainer service's URL.
    #[getter]
    fn trainer_url(&self) -> &str {
        &self.trainer_url
    }

    /// Where the platform keeps its state.
    #[getter]
    fn root(&self) -> String {
        self.root.display().to_string()
    }

    /// Whether the servers are up.
    #[getter]
    fn running(&self) -> bool {
        self.running.lock().is_ok_and(|r| r.is_some())
    }

    /// Cancels the jobs in training (each keeps its `last` checkpoint) and
    /// stops the servers. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(running) = self.running.lock().ok().and_then(|mut r| r.take()) else {
            return Ok(());
        };
        block_on(py, async move {
            for job in running.trainer.jobs() {
                running.trainer.cancel(job);
            }
            // Let the cancelled jobs report before the backend goes away.
            let drained = async {
                while !running.trainer.jobs().is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, drained).await;
            running.stop.cancel();
            for task in running.tasks {
                let _ = tokio::time::timeout(CLOSE_GRACE, task).await;
            }
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "LocalPlatform(root={:?}, base_url={:?}, running={})",
            self.root.display().to_string(),
            self.base_url,
            self.running()
        )
    }
}

impl Drop for LocalPlatform {
    fn drop(&mut self) {
        if let Some(running) = self.running.get_mut().ok().and_then(Option::take) {
            running.stop.cancel();
            for job in running.trainer.jobs() {
                running.trainer.cancel(job);
            }
        }
    }
}
