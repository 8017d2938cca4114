//! [`Client`]: the backend API over HTTP (`vtp._vtp.Client`), on the typed
//! client of `vtp-client` (the same requests, answers, retries and error
//! mapping as the `vtp` CLI). Answers come back as Python dicts and lists
//! (the typed answers serialised); the Python layer (`vtp.Client`) wraps
//! them in `Job` objects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pyo3::prelude::*;
use serde_json::Value;
use vtp_core::{JobId, JobStatus, NewJob};

use crate::errors::{InvalidInput, from_core};
use crate::runtime::block_on;

/// A client of one VTP backend.
#[pyclass(module = "vtp._vtp", frozen)]
#[derive(Debug, Clone)]
pub struct Client {
    inner: vtp_client::Client,
}

impl Client {
    /// Runs `call` on the client, with the GIL released, and maps its error
    /// to the exception of its category.
    fn call<T, Fut>(
        &self,
        py: Python<'_>,
        call: impl FnOnce(vtp_client::Client) -> Fut,
    ) -> PyResult<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = vtp_core::Result<T>> + Send + 'static,
    {
        let future = call(self.inner.clone());
        block_on(py, async move { future.await.map_err(from_core) })
    }
}

/// A typed answer as Python objects.
fn answer<T: serde::Serialize>(py: Python<'_>, value: &T) -> PyResult<Py<PyAny>> {
    let json =
        serde_json::to_value(value).map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?;
    to_python(py, &json)
}

#[pymethods]
impl Client {
    /// Connects nothing yet: `base_url` like `http://127.0.0.1:8000`;
    /// `token` is sent as `Authorization: Bearer`; `timeout` (seconds)
    /// bounds each request, not uploads and downloads; `ca_cert` is a PEM
    /// bundle of CAs to trust besides the system's (an https backend whose
    /// certificate a private CA signed). Reads, uploads, and the create and
    /// start of a job (under an `Idempotency-Key`) are retried while the
    /// backend is unreachable; a cancel is not.
    #[new]
    #[pyo3(signature = (base_url, token=None, timeout=30.0, ca_cert=None))]
    fn new(
        base_url: &str,
        token: Option<String>,
        timeout: f64,
        ca_cert: Option<PathBuf>,
    ) -> PyResult<Self> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(InvalidInput::new_err(
                "timeout must be a positive number of seconds",
            ));
        }
        let mut builder =
            vtp_client::Client::builder(base_url).timeout(Duration::from_secs_f64(timeout));
        if let Some(token) = token {
            builder = builder.token(token);
        }
        if let Some(path) = ca_cert {
            builder = builder.ca_cert(path);
        }
        Ok(Client {
            inner: builder.build().map_err(from_core)?,
        })
    }

    /// The backend's base URL.
    #[getter]
    fn base_url(&self) -> String {
        self.inner
            .base_url()
            .as_str()
            .trim_end_matches('/')
            .to_owned()
    }

    /// `GET /health`.
    fn health(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let health = self.call(py, |c| async move { c.health().await })?;
        answer(py, &health)
    }

    /// `POST /training/jobs`: creates a job (status `pending`).
    /// A `user_id` of `None` is left out: the backend takes the token's user.
    #[pyo3(signature = (dataset_uri, model_name, config=None, user_id=None, framework="tch", priority=0))]
    #[allow(clippy::too_many_arguments)]
    fn create_job(
        &self,
        py: Python<'_>,
        dataset_uri: &str,
        model_name: &str,
        config: Option<&Bound<'_, PyAny>>,
        user_id: Option<&str>,
        framework: &str,
        priority: i32,
    ) -> PyResult<Py<PyAny>> {
        let config: Value = match config {
            Some(config) if !config.is_none() => pythonize::depythonize(config).map_err(|e| {
                InvalidInput::new_err(format!("invalid config: not JSON-serialisable: {e}"))
            })?,
            _ => Value::Object(serde_json::Map::new()),
        };
        let new = NewJob {
            user_id: user_id.unwrap_or_default().to_owned(),
            model_name: model_name.to_owned(),
            framework: framework.to_owned(),
            dataset_s3_uri: dataset_uri.to_owned(),
            config,
            priority,
        };
        let job = self.call(py, |c| async move { c.create_job(&new).await })?;
        answer(py, &job)
    }

    /// `GET /training/jobs`: a page `{"jobs": [...], "total", ...}`.
    #[pyo3(signature = (user_id=None, status=None, limit=None, offset=None))]
    fn list_jobs(
        &self,
        py: Python<'_>,
        user_id: Option<String>,
        status: Option<String>,
        limit: Option<u32>,
        offset: Option<u32>,
    ) -> PyResult<Py<PyAny>> {
        let status = status
            .map(|s| {
                serde_json::from_value::<JobStatus>(Value::String(s.clone()))
                    .map_err(|_| InvalidInput::new_err(format!("invalid status: {s:?}")))
            })
            .transpose()?;
        let query = vtp_client::ListJobs {
            user_id,
            status,
            limit,
            offset,
        };
        let page = self.call(py, |c| async move { c.list_jobs(&query).await })?;
        answer(py, &page)
    }

    /// `GET /training/jobs/{id}`.
    fn get_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        let id = job_id_of(job_id)?;
        let job = self.call(py, |c| async move { c.job(id).await })?;
        answer(py, &job)
    }

    /// `POST /training/jobs/{id}/start`: the job, now `queued`.
    fn start_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        let id = job_id_of(job_id)?;
        let started = self.call(py, |c| async move { c.start_job(id).await })?;
        answer(py, &started.job)
    }

    /// `DELETE /training/jobs/{id}`: the job, `cancelling` or `cancelled`.
    fn cancel_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        let id = job_id_of(job_id)?;
        let job = self.call(py, |c| async move { c.cancel_job(id).await })?;
        answer(py, &job)
    }

    /// `DELETE /training/jobs/{id}?purge=true`: deletes a finished job with
    /// everything stored for it.
    fn delete_job(&self, py: Python<'_>, job_id: &str) -> PyResult<()> {
        let id = job_id_of(job_id)?;
        self.call(py, |c| async move { c.delete_job(id).await })
    }

    /// `DELETE /datasets/{dataset_name}`: deletes a dataset of `user_id`
    /// (the token's user when `None`).
    #[pyo3(signature = (dataset_name, user_id=None))]
    fn delete_dataset(
        &self,
        py: Python<'_>,
        dataset_name: &str,
        user_id: Option<String>,
    ) -> PyResult<()> {
        let name = dataset_name.to_owned();
        self.call(py, |c| async move {
            c.delete_dataset(&name, user_id.as_deref()).await
        })
    }

    /// `GET /training/jobs/{id}/events`: the job's changes as they happen
    /// (after revision `after`; -1: from its creation), as an iterator of
    /// dicts (`revision`, `kind`, `job`, `metrics`); it reconnects where it
    /// left off when the connection drops and ends after the job's final
    /// change.
    #[pyo3(signature = (job_id, after=-1))]
    fn events(&self, job_id: &str, after: i64) -> PyResult<EventStream> {
        let id = job_id_of(job_id)?;
        Ok(EventStream {
            inner: std::sync::Arc::new(tokio::sync::Mutex::new(self.inner.events(id, after))),
        })
    }

    /// `GET /training/jobs/{id}/metrics`: one dict per epoch.
    fn metrics(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        let id = job_id_of(job_id)?;
        let rows = self.call(py, |c| async move { c.metrics(id).await })?;
        answer(py, &rows)
    }

    /// `POST /datasets/upload`: uploads an archive (zip, tar, tar.gz) or a
    /// folder (packed into a zip first, in a temporary file), streaming it.
    /// Returns the answer, whose `s3_uri` is the dataset URI for jobs.
    #[pyo3(signature = (path, dataset_name=None, user_id=None))]
    fn upload_dataset(
        &self,
        py: Python<'_>,
        path: PathBuf,
        dataset_name: Option<String>,
        user_id: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let inner = self.inner.clone();
        let uploaded = block_on(py, async move {
            let (archive, _scratch) = archive_of(&path).await?;
            let name = dataset_name.unwrap_or_else(|| dataset_name_of(&path));
            inner
                .upload_dataset(&archive, &name, user_id.as_deref())
                .await
                .map_err(from_core)
        })?;
        answer(py, &uploaded)
    }

    /// `POST /code/upload`: uploads a code archive (zip, tar, tar.gz) or a
    /// folder (packed into a zip first) for `python` jobs. Returns the
    /// answer, whose `s3_uri` is the jobs' `config.code_s3_uri`.
    #[pyo3(signature = (path, code_name=None, user_id=None))]
    fn upload_code(
        &self,
        py: Python<'_>,
        path: PathBuf,
        code_name: Option<String>,
        user_id: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let inner = self.inner.clone();
        let uploaded = block_on(py, async move {
            let (archive, _scratch) = archive_of(&path).await?;
            let name = code_name.unwrap_or_else(|| dataset_name_of(&path));
            inner
                .upload_code(&archive, &name, user_id.as_deref())
                .await
                .map_err(from_core)
        })?;
        answer(py, &uploaded)
    }

    /// Downloads the job's final checkpoint into the directory `dest`: the
    /// weights (`best.safetensors`) and the sidecar beside them
    /// (`best.json`) that `vtp.load_checkpoint` needs; or `file`, another
    /// file of the set, with its sidecar when it is safetensors weights.
    /// Returns the path of the weights.
    #[pyo3(signature = (job_id, dest, file = None))]
    fn download_checkpoint(
        &self,
        py: Python<'_>,
        job_id: &str,
        dest: PathBuf,
        file: Option<String>,
    ) -> PyResult<String> {
        let id = job_id_of(job_id)?;
        let inner = self.inner.clone();
        let weights = block_on(py, async move {
            let job = inner.job(id).await.map_err(from_core)?;
            if job.checkpoint_s3_uri.is_none() {
                return Err(crate::errors::NotFound::new_err(format!(
                    "job {id} has no checkpoint yet (status {})",
                    job.status
                )));
            }
            match file {
                Some(file) => inner.download_set_file(id, &file, &dest).await,
                None => inner.download_model(id, &dest).await,
            }
            .map_err(from_core)
        })?;
        Ok(weights.display().to_string())
    }

    fn __repr__(&self) -> String {
        format!("Client({:?})", self.base_url())
    }
}

/// A job id, refusing what is not a UUID.
/// A job's event stream, from `Client.events`.
#[pyclass(module = "vtp._vtp", frozen)]
pub struct EventStream {
    inner: std::sync::Arc<
        tokio::sync::Mutex<
            futures::stream::BoxStream<'static, vtp_core::Result<vtp_core::JobEvent>>,
        >,
    >,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream")
    }
}

#[pymethods]
impl EventStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.next_event(py, None)
    }

    /// The next event, waiting at most `timeout` seconds (`None`: as long
    /// as it takes; raises `TimeoutError` after that); `None` when the
    /// stream has ended.
    #[pyo3(signature = (timeout=None))]
    fn next_event(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        use futures::StreamExt;
        let wait = match timeout {
            Some(secs) if !(secs.is_finite() && secs >= 0.0) => {
                return Err(InvalidInput::new_err(
                    "timeout must be a number of seconds, 0 or more",
                ));
            }
            Some(secs) => Some(Duration::from_secs_f64(secs)),
            None => None,
        };
        let inner = self.inner.clone();
        let event = block_on(py, async move {
            let mut stream = inner.lock().await;
            let next = match wait {
                Some(wait) => tokio::time::timeout(wait, stream.next())
                    .await
                    .map_err(|_| {
                        pyo3::exceptions::PyTimeoutError::new_err("no event within the timeout")
                    })?,
                None => stream.next().await,
            };
            next.transpose().map_err(from_core)
        })?;
        event.map(|event| answer(py, &event)).transpose()
    }
}

fn job_id_of(job_id: &str) -> PyResult<JobId> {
    job_id
        .parse()
        .map_err(|_| InvalidInput::new_err(format!("invalid job_id: {job_id:?} is not a UUID")))
}

/// The archive to upload for `path`: the file itself, or a zip of the
/// folder in a temporary directory (returned too, so it lives long enough).
async fn archive_of(path: &Path) -> PyResult<(PathBuf, Option<tempfile::TempDir>)> {
    let meta = tokio::fs::metadata(path).await.map_err(|e| {
        crate::errors::NotFound::new_err(format!("dataset {}: {e}", path.display()))
    })?;
    if meta.is_file() {
        if !vtp_trainer::data::is_archive(path) {
            return Err(InvalidInput::new_err(format!(
                "dataset {}: not a .zip, .tar, .tar.gz or .tgz file, nor a folder",
                path.display()
            )));
        }
        return Ok((path.to_path_buf(), None));
    }
    let scratch =
        tempfile::tempdir().map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?;
    let archive = scratch
        .path()
        .join(format!("{}.zip", dataset_name_of(path)));
    let (dir, out) = (path.to_path_buf(), archive.clone());
    tokio::task::spawn_blocking(move || vtp_trainer::data::pack_dir(&dir, &out))
        .await
        .map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?
        .map_err(from_core)?;
    Ok((archive, Some(scratch)))
}

/// A dataset name from a path: the folder or archive name without its
/// extension, reduced to the characters names allow.
pub(crate) fn dataset_name_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = [".tar.gz", ".tgz", ".tar", ".zip"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .unwrap_or(&name);
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "dataset".into()
    } else {
        cleaned
    }
}

/// JSON to Python objects.
pub(crate) fn to_python(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    Ok(pythonize::pythonize(py, value)
        .map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?
        .unbind())
}
