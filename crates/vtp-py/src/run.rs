//! [`RunConnection`]: the native half of `vtp.run()`, the SDK a user's
//! training script (`framework: "python"`) reports through. It is the
//! trainer service's own client ([`vtp_trainer::service::script::RunClient`]):
//! the service that runs the script signs and delivers the reports,
//! heartbeats while the script computes, and stores the checkpoint sets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use vtp_trainer::service::script::RunClient;
use vtp_trainer::service::script::protocol::{Reply, Request};

use crate::errors::from_core;

/// The script's connection to the trainer that runs it.
#[pyclass(module = "vtp._vtp", frozen)]
pub struct RunConnection {
    client: Mutex<RunClient>,
    /// The trainer asked the run to stop (a cancel, the trainer stopping).
    stop: AtomicBool,
}

impl std::fmt::Debug for RunConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConnection").finish_non_exhaustive()
    }
}

impl RunConnection {
    fn call(&self, py: Python<'_>, request: Request) -> PyResult<Reply> {
        let reply = py.detach(|| {
            self.client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .call(&request)
        });
        let reply = reply.map_err(from_core)?;
        if reply.stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(reply)
    }

    fn with_context<T>(
        &self,
        f: impl FnOnce(&vtp_trainer::service::script::protocol::Context) -> T,
    ) -> T {
        f(self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .context())
    }
}

#[pymethods]
impl RunConnection {
    /// Connects to the trainer named by the job's environment
    /// (`VTP_RUN_SOCKET`, `VTP_RUN_TOKEN`); `None` outside a job.
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Option<Self>> {
        let client = py.detach(RunClient::from_env).map_err(from_core)?;
        Ok(client.map(|client| RunConnection {
            client: Mutex::new(client),
            stop: AtomicBool::new(false),
        }))
    }

    /// The job's id.
    #[getter]
    fn job_id(&self) -> String {
        self.with_context(|c| c.job_id.clone())
    }

    /// Which attempt this is (1 for the first launch).
    #[getter]
    fn attempt(&self) -> i32 {
        self.with_context(|c| c.attempt)
    }

    /// This process's rank in a distributed run (0 in a plain one).
    #[getter]
    fn rank(&self) -> u32 {
        self.with_context(|c| c.rank)
    }

    /// Epochs to train.
    #[getter]
    fn epochs(&self) -> u32 {
        self.with_context(|c| c.epochs)
    }

    /// The dataset, downloaded and unpacked.
    #[getter]
    fn dataset_dir(&self) -> String {
        self.with_context(|c| c.dataset_dir.to_string_lossy().into_owned())
    }

    /// The job's config, whole.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let config = self.with_context(|c| c.config.clone());
        pythonize::pythonize(py, &config)
            .map_err(|e| crate::errors::VtpError::new_err(format!("the job's config: {e}")))
    }

    /// The checkpoint this attempt resumes from, `(dir, epoch)`, if any.
    #[getter]
    fn restored(&self) -> Option<(String, u32)> {
        self.with_context(|c| {
            c.restored
                .as_ref()
                .map(|r| (r.dir.to_string_lossy().into_owned(), r.epoch))
        })
    }

    /// Reports an epoch's metrics; whether the run should stop.
    fn report(&self, py: Python<'_>, epoch: u32, metrics: BTreeMap<String, f64>) -> PyResult<bool> {
        Ok(self.call(py, Request::Report { epoch, metrics })?.stop)
    }

    /// Reports progress inside an epoch; whether the run should stop.
    fn step(
        &self,
        py: Python<'_>,
        epoch: u32,
        step: usize,
        steps: usize,
        loss: f64,
    ) -> PyResult<bool> {
        Ok(self
            .call(
                py,
                Request::Step {
                    epoch,
                    step,
                    steps,
                    loss,
                },
            )?
            .stop)
    }

    /// Stores `path` (a file, or a flat directory of files) as the
    /// checkpoint of `epoch`; the stored set's URI (none for the final
    /// epoch, uploaded when the script ends).
    #[pyo3(signature = (path, epoch, best = false))]
    fn save_checkpoint(
        &self,
        py: Python<'_>,
        path: PathBuf,
        epoch: u32,
        best: bool,
    ) -> PyResult<Option<String>> {
        let path = std::path::absolute(&path).map_err(|e| {
            crate::errors::InvalidInput::new_err(format!("{}: {e}", path.display()))
        })?;
        Ok(self
            .call(py, Request::Checkpoint { path, epoch, best })?
            .stored)
    }

    /// Whether the trainer asked the run to stop (asks it now).
    fn should_stop(&self, py: Python<'_>) -> PyResult<bool> {
        if self.stop.load(Ordering::SeqCst) {
            return Ok(true);
        }
        Ok(self.call(py, Request::Poll)?.stop)
    }
}
