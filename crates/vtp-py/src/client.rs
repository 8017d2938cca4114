//! [`Client`]: the backend API over HTTP (`vtp._vtp.Client`). Answers come
//! back as the server's JSON, converted to Python dicts and lists; the
//! Python layer (`vtp.Client`) wraps them in `Job` objects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pyo3::prelude::*;
use reqwest::{Method, RequestBuilder, Url};
use serde_json::{Value, json};

use crate::errors::{InvalidInput, from_core, from_status, from_transport};
use crate::runtime::block_on;

/// A client of one VTP backend.
#[pyclass(module = "vtp._vtp", frozen)]
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    fn request(&self, method: Method, path: &str) -> PyResult<RequestBuilder> {
        let url = self
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|e| InvalidInput::new_err(format!("bad path {path:?}: {e}")))?;
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }

    /// Sends `request`; an error status becomes an exception carrying the
    /// server's message. Returns the URL (for messages) and the response.
    async fn execute(request: RequestBuilder) -> PyResult<(String, reqwest::Response)> {
        let (client, request) = request.build_split();
        let request = request.map_err(|e| InvalidInput::new_err(e.to_string()))?;
        let url = request.url().to_string();
        let response = client
            .execute(request)
            .await
            .map_err(|e| from_transport(&url, &e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(from_status(status.as_u16(), &body));
        }
        Ok((url, response))
    }

    /// Sends and reads the whole answer.
    async fn send(request: RequestBuilder) -> PyResult<bytes::Bytes> {
        let (url, response) = Self::execute(request).await?;
        response.bytes().await.map_err(|e| from_transport(&url, &e))
    }

    async fn send_json(request: RequestBuilder) -> PyResult<Value> {
        let body = Self::send(request).await?;
        serde_json::from_slice(&body).map_err(|e| {
            crate::errors::VtpError::new_err(format!("the server answered with bad JSON: {e}"))
        })
    }

    /// Sends `request` and converts the JSON answer to Python.
    fn call(&self, py: Python<'_>, request: RequestBuilder) -> PyResult<Py<PyAny>> {
        let value = block_on(py, Self::send_json(request))?;
        to_python(py, &value)
    }

    /// Streams the answer of `request` into `dest`, through a temporary
    /// file beside it, so a failed download leaves nothing behind.
    async fn download(request: RequestBuilder, dest: PathBuf) -> PyResult<u64> {
        use futures::TryStreamExt;
        use tokio::io::AsyncWriteExt;

        let (url, response) = Self::execute(request).await?;
        let dir = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
        let io = |e: std::io::Error| {
            crate::errors::VtpError::new_err(format!("{}: {e}", dest.display()))
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        let partial = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
        let mut file = tokio::fs::File::from_std(partial.reopen().map_err(io)?);
        let mut stream = response.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| from_transport(&url, &e))?
        {
            file.write_all(&chunk).await.map_err(io)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        partial.persist(&dest).map_err(|e| io(e.error))?;
        Ok(written)
    }
}

#[pymethods]
impl Client {
    /// Connects nothing yet: `base_url` like `http://127.0.0.1:8000`;
    /// `token` is sent as `Authorization: Bearer`; `timeout` (seconds)
    /// bounds each request, not uploads and downloads; `ca_cert` is a PEM
    /// bundle of CAs to trust besides the system's (an https backend whose
    /// certificate a private CA signed).
    #[new]
    #[pyo3(signature = (base_url, token=None, timeout=30.0, ca_cert=None))]
    fn new(
        base_url: &str,
        token: Option<String>,
        timeout: f64,
        ca_cert: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut base = Url::parse(base_url)
            .map_err(|e| InvalidInput::new_err(format!("base_url {base_url:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(InvalidInput::new_err(format!(
                "base_url {base_url:?} is not an http(s) URL"
            )));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(InvalidInput::new_err(
                "timeout must be a positive number of seconds",
            ));
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &ca_cert {
            builder =
                vtp_trainer::tls::trust_ca_file(builder, "ca_cert", path).map_err(from_core)?;
        }
        let http = builder
            .connect_timeout(Duration::from_secs_f64(timeout.min(10.0)))
            .read_timeout(Duration::from_secs_f64(timeout))
            .build()
            .map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?;
        Ok(Client { http, base, token })
    }

    /// The backend's base URL.
    #[getter]
    fn base_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    /// `GET /health`.
    fn health(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.call(py, self.request(Method::GET, "/health")?)
    }

    /// `POST /training/jobs`: creates a job (status `pending`).
    /// A `user_id` of `None` is left out: the backend takes the token's user.
    #[pyo3(signature = (dataset_uri, model_name, config=None, user_id=None, framework="tch"))]
    fn create_job(
        &self,
        py: Python<'_>,
        dataset_uri: &str,
        model_name: &str,
        config: Option<&Bound<'_, PyAny>>,
        user_id: Option<&str>,
        framework: &str,
    ) -> PyResult<Py<PyAny>> {
        let config: Value = match config {
            Some(config) if !config.is_none() => pythonize::depythonize(config).map_err(|e| {
                InvalidInput::new_err(format!("invalid config: not JSON-serialisable: {e}"))
            })?,
            _ => json!({}),
        };
        let mut body = json!({
            "model_name": model_name,
            "framework": framework,
            "dataset_s3_uri": dataset_uri,
            "config": config,
        });
        if let Some(user_id) = user_id {
            body["user_id"] = user_id.into();
        }
        self.call(
            py,
            self.request(Method::POST, "/training/jobs")?.json(&body),
        )
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
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(user_id) = user_id {
            query.push(("user_id", user_id));
        }
        if let Some(status) = status {
            query.push(("status", status));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(offset) = offset {
            query.push(("offset", offset.to_string()));
        }
        self.call(
            py,
            self.request(Method::GET, "/training/jobs")?.query(&query),
        )
    }

    /// `GET /training/jobs/{id}`.
    fn get_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        self.call(py, self.request(Method::GET, &job_path(job_id, "")?)?)
    }

    /// `POST /training/jobs/{id}/start`: the job, now `queued`.
    fn start_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        let request = self.request(Method::POST, &job_path(job_id, "/start")?)?;
        // The answer is `{"status": "started", "job": {...}}`.
        let mut answer = block_on(py, Self::send_json(request))?;
        to_python(py, &answer["job"].take())
    }

    /// `DELETE /training/jobs/{id}`: the job, `cancelling` or `cancelled`.
    fn cancel_job(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        self.call(py, self.request(Method::DELETE, &job_path(job_id, "")?)?)
    }

    /// `GET /training/jobs/{id}/metrics`: one dict per epoch.
    fn metrics(&self, py: Python<'_>, job_id: &str) -> PyResult<Py<PyAny>> {
        self.call(
            py,
            self.request(Method::GET, &job_path(job_id, "/metrics")?)?,
        )
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
        let request = self.request(Method::POST, "/datasets/upload")?;
        let value = block_on(py, async move {
            let (archive, _scratch) = archive_of(&path).await?;
            let name = dataset_name.unwrap_or_else(|| dataset_name_of(&path));
            let file_name = archive
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dataset.zip".into());
            let file = tokio::fs::File::open(&archive).await.map_err(|e| {
                crate::errors::NotFound::new_err(format!("{}: {e}", archive.display()))
            })?;
            let size = file
                .metadata()
                .await
                .map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?
                .len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let part = reqwest::multipart::Part::stream_with_length(body, size)
                .file_name(file_name)
                .mime_str("application/octet-stream")
                .map_err(|e| crate::errors::VtpError::new_err(e.to_string()))?;
            let mut form = reqwest::multipart::Form::new();
            if let Some(user_id) = user_id {
                form = form.text("user_id", user_id);
            }
            let form = form.text("dataset_name", name).part("file", part);
            Client::send_json(request.multipart(form)).await
        })?;
        to_python(py, &value)
    }

    /// Downloads the job's final checkpoint into the directory `dest`: the
    /// weights (`best.safetensors`) and the sidecar beside them
    /// (`best.json`) that `vtp.load_checkpoint` needs. Returns the path of
    /// the weights.
    fn download_checkpoint(&self, py: Python<'_>, job_id: &str, dest: PathBuf) -> PyResult<String> {
        let job = block_on(
            py,
            Client::send_json(self.request(Method::GET, &job_path(job_id, "")?)?),
        )?;
        let uri = job["checkpoint_s3_uri"].as_str().ok_or_else(|| {
            crate::errors::NotFound::new_err(format!(
                "job {job_id} has no checkpoint yet (status {})",
                job["status"]
            ))
        })?;
        let weights = uri
            .rsplit('/')
            .next()
            .unwrap_or("best.safetensors")
            .to_owned();
        let stem = weights.strip_suffix(".safetensors").unwrap_or(&weights);
        let sidecar = format!("{stem}.json");
        let weights_request = self.request(Method::GET, &job_path(job_id, "/checkpoint")?)?;
        let sidecar_request = self.request(
            Method::GET,
            &job_path(job_id, &format!("/checkpoint/{sidecar}"))?,
        )?;
        let (weights_path, sidecar_path) = (dest.join(&weights), dest.join(&sidecar));
        let out = weights_path.clone();
        block_on(py, async move {
            Client::download(weights_request, weights_path).await?;
            Client::download(sidecar_request, sidecar_path).await?;
            Ok(())
        })?;
        Ok(out.display().to_string())
    }

    fn __repr__(&self) -> String {
        format!("Client({:?})", self.base_url())
    }
}

/// `/training/jobs/{id}{suffix}`, refusing ids that are not UUIDs.
fn job_path(job_id: &str, suffix: &str) -> PyResult<String> {
    let id: vtp_core::JobId = job_id
        .parse()
        .map_err(|_| InvalidInput::new_err(format!("invalid job_id: {job_id:?} is not a UUID")))?;
    Ok(format!("/training/jobs/{id}{suffix}"))
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
