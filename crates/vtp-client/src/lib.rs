//! # vtp-client
//!
//! A typed client of the VTP backend API. Requests and answers are the
//! wire types of `vtp-core` ([`Job`], [`NewJob`], [`JobPage`],
//! [`vtp_core::api`]), the same the backend's handlers use and its OpenAPI
//! document describes, so a renamed field breaks the build, not a user.
//! Error answers (`{"error": {"code", "message", "field"?}}`) become
//! [`vtp_core::Error`]s in one place ([`ErrorDetail::into_error`]), so
//! [`Error::is_retryable`] means the same on both sides of the wire.
//!
//! Retries with backoff happen only where a call is idempotent: reads,
//! dataset uploads (the same key is written whole again), and the create and
//! start of a job, which carry an `Idempotency-Key` (a fresh UUID per call,
//! or one the caller gives) so that a retry after a lost answer never makes
//! a second job or a second launch. A cancel is not retried.
//!
//! ```no_run
//! # async fn demo() -> vtp_core::Result<()> {
//! use vtp_client::Client;
//! use vtp_core::NewJob;
//!
//! let client = Client::builder("http://127.0.0.1:8000").token("...").build()?;
//! let dataset = client
//!     .upload_dataset("digits.zip".as_ref(), "digits", None)
//!     .await?;
//! let job = client
//!     .create_job(&NewJob {
//!         user_id: String::new(),
//!         model_name: "small_cnn".into(),
//!         framework: "tch".into(),
//!         dataset_s3_uri: dataset.s3_uri,
//!         config: serde_json::json!({"epochs": 5}),
//!         priority: 0,
//!     })
//!     .await?;
//! client.start_job(job.id).await?;
//! // Follows the job's event stream (no polling) until it ends.
//! let done = client.wait(job.id, |job| println!("{:.0}%", 100.0 * job.progress)).await?;
//! println!("{}", done.status);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::BoxStream;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use url::Url;
use vtp_core::api::{EpochMetrics, ErrorBody, ErrorDetail, Health, Started, Uploaded};
use vtp_core::{Error, Job, JobEvent, JobId, JobPage, JobStatus, NewJob, Result, RetryConfig};

pub mod tls;

/// The header that makes a create or a start safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Which jobs [`Client::list_jobs`] asks for; `None` fields are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListJobs {
    /// Only this user's jobs (your own by default; an admin sees everyone's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Only jobs in this status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    /// Page size (the backend's default is 50, at most 500).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Jobs to skip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u32>,
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientBuilder {
    base_url: String,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    timeout: Duration,
    retry: RetryConfig,
    poll: Duration,
}

impl ClientBuilder {
    /// Sends `Authorization: Bearer <token>` on every request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts the CAs of this PEM bundle besides the system's (an https
    /// backend whose certificate a private CA signed); without it,
    /// `VTP_CA_CERT` is read.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Bounds each request's wait for an answer (default 30 s); uploads and
    /// downloads stream for as long as they need.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How idempotent calls are retried (default: a few quick retries
    /// within a minute).
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The first pause before [`Client::events`] reconnects a dropped
    /// stream (default 500 ms; doubled on each failure in a row, up to 32
    /// times this).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(10));
        self
    }

    /// The client.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a URL that is not http(s), a token that is
    /// not a header value, or a CA bundle that cannot be read.
    pub fn build(self) -> Result<Client> {
        let mut base = Url::parse(&self.base_url)
            .map_err(|e| Error::invalid("url", format!("{:?}: {e}", self.base_url)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::invalid(
                "url",
                format!("{:?} is not an http(s) URL", self.base_url),
            ));
        }
        tls::require_for("url", &base)?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::invalid("token", "must be visible ASCII"))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let builder = match &self.ca_cert {
            Some(path) => tls::trust_ca_file(reqwest::Client::builder(), "ca_cert", path)?,
            None => tls::client_builder()?,
        };
        let http = builder
            .default_headers(headers)
            .connect_timeout(self.timeout.min(Duration::from_secs(10)))
            .read_timeout(self.timeout)
            .user_agent(concat!("vtp-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Client {
            base,
            http,
            retry: self.retry,
            poll: self.poll,
        })
    }
}

/// A client of one VTP backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    retry: RetryConfig,
    poll: Duration,
}

impl Client {
    /// A client of the backend at `base_url` with the default settings.
    ///
    /// # Errors
    /// As [`ClientBuilder::build`].
    pub fn new(base_url: &str) -> Result<Self> {
        Self::builder(base_url).build()
    }

    /// Settings for a client of the backend at `base_url`
    /// (`http://127.0.0.1:8000`).
    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.to_owned(),
            token: None,
            ca_cert: None,
            timeout: Duration::from_secs(30),
            retry: RetryConfig {
                max_retries: 5,
                timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            },
            poll: Duration::from_millis(500),
        }
    }

    /// The backend's base URL, ending in `/`.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = self
            .base
            .join(path.trim_start_matches('/'))
            .expect("API paths join onto an http base");
        self.http.request(method, url)
    }

    /// Sends `request` once and reads the answer as `T`, or the error it is.
    async fn once<T: DeserializeOwned>(request: RequestBuilder) -> Result<T> {
        let response = request.send().await.map_err(transport)?;
        let response = checked(response).await?;
        let url = response.url().to_string();
        let body = response.bytes().await.map_err(transport)?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::backend(
                "backend",
                format!("{url} answered with unexpected JSON: {e}"),
            )
        })
    }

    /// Sends `request` once, for an answer without a body (204, 202).
    async fn once_empty(request: RequestBuilder) -> Result<()> {
        let response = request.send().await.map_err(transport)?;
        checked(response).await.map(|_| ())
    }

    /// Sends what `make` builds until it succeeds or fails for good: for
    /// idempotent calls only.
    async fn retried<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<T> {
        self.retry.run(operation, || Self::once(make())).await
    }

    /// `GET /health`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the backend (or its database) is down.
    pub async fn health(&self) -> Result<Health> {
        self.retried("GET /health", || self.request(Method::GET, "health"))
            .await
    }

    /// `POST /training/jobs` under a fresh `Idempotency-Key`, retried: the
    /// job, `pending`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`config.epochs`), and the
    /// errors of any call.
    pub async fn create_job(&self, new: &NewJob) -> Result<Job> {
        self.create_job_with_key(new, &uuid::Uuid::new_v4().to_string())
            .await
    }

    /// `POST /training/jobs` under the caller's `Idempotency-Key`: the same
    /// key and request again, even from another process after a crash,
    /// answers with the job it made.
    ///
    /// # Errors
    /// As [`Client::create_job`]; [`Error::InvalidInput`] on
    /// `Idempotency-Key` for a key first sent with another request.
    pub async fn create_job_with_key(&self, new: &NewJob, key: &str) -> Result<Job> {
        self.retried("POST /training/jobs", || {
            self.request(Method::POST, "training/jobs")
                .header(IDEMPOTENCY_KEY, key)
                .json(new)
        })
        .await
    }

    /// `POST /training/jobs/{id}/start` under a fresh `Idempotency-Key`,
    /// retried: the job is launched once.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the job is not `pending`; [`Error::InvalidInput`]
    /// when its dataset does not exist.
    pub async fn start_job(&self, id: JobId) -> Result<Started> {
        let key = uuid::Uuid::new_v4().to_string();
        self.retried("POST /training/jobs/{id}/start", || {
            self.request(Method::POST, &format!("training/jobs/{id}/start"))
                .header(IDEMPOTENCY_KEY, &key)
        })
        .await
    }

    /// `GET /training/jobs/{id}`.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a job that does not exist (or is not yours).
    pub async fn job(&self, id: JobId) -> Result<Job> {
        self.retried("GET /training/jobs/{id}", || {
            self.request(Method::GET, &format!("training/jobs/{id}"))
        })
        .await
    }

    /// `GET /training/jobs`: a page of jobs, newest first.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a limit over 500.
    pub async fn list_jobs(&self, query: &ListJobs) -> Result<JobPage> {
        self.retried("GET /training/jobs", || {
            self.request(Method::GET, "training/jobs").query(query)
        })
        .await
    }

    /// `DELETE /training/jobs/{id}`: the job, `cancelled` or `cancelling`.
    /// Not retried: a second cancel of a finished job is a conflict.
    ///
    /// # Errors
    /// [`Error::Conflict`] for a job that has finished.
    pub async fn cancel_job(&self, id: JobId) -> Result<Job> {
        Self::once(self.request(Method::DELETE, &format!("training/jobs/{id}"))).await
    }

    /// `DELETE /training/jobs/{id}?purge=true`: deletes a finished job with
    /// its checkpoints, metrics and events. Done when this returns (the
    /// backend finishes removing its objects itself if it answered 202).
    /// Not retried: a second delete of a deleted job is a 404.
    ///
    /// # Errors
    /// [`Error::Conflict`] for a job not finished (cancel it first);
    /// [`Error::NotFound`] for a job that is not there (or not the caller's).
    pub async fn delete_job(&self, id: JobId) -> Result<()> {
        Self::once_empty(
            self.request(Method::DELETE, &format!("training/jobs/{id}"))
                .query(&[("purge", "true")]),
        )
        .await
    }

    /// `DELETE /datasets/{dataset_name}`: deletes a dataset of `user_id`
    /// (with a token, the token's user when `None`).
    ///
    /// # Errors
    /// [`Error::Conflict`] while a job under way names it;
    /// [`Error::NotFound`] for a dataset that is not there.
    /// Not retried, like [`Client::delete_job`].
    pub async fn delete_dataset(&self, dataset_name: &str, user_id: Option<&str>) -> Result<()> {
        let mut request = self.request(Method::DELETE, &format!("datasets/{dataset_name}"));
        if let Some(user_id) = user_id {
            request = request.query(&[("user_id", user_id)]);
        }
        Self::once_empty(request).await
    }

    /// `GET /training/jobs/{id}/metrics`: one row per epoch, in order (every
    /// page of them).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown job.
    pub async fn metrics(&self, id: JobId) -> Result<Vec<EpochMetrics>> {
        const PAGE: usize = 10_000;
        let mut rows: Vec<EpochMetrics> = Vec::new();
        loop {
            let offset = rows.len();
            let page: Vec<EpochMetrics> = self
                .retried("GET /training/jobs/{id}/metrics", || {
                    self.request(Method::GET, &format!("training/jobs/{id}/metrics"))
                        .query(&[("limit", PAGE), ("offset", offset)])
                })
                .await?;
            let last = page.len() < PAGE;
            rows.extend(page);
            if last {
                return Ok(rows);
            }
        }
    }

    /// Follows the job's events until it ends, calling `on_change` with the
    /// job after every change (status, progress, an epoch's metrics);
    /// returns it ended. See [`Client::events`].
    ///
    /// # Errors
    /// The errors of [`Client::events`].
    pub async fn wait(&self, id: JobId, mut on_change: impl FnMut(&Job)) -> Result<Job> {
        use futures::StreamExt;
        let mut events = self.events(id, -1);
        let mut last = None;
        while let Some(event) = events.next().await {
            let event = event?;
            on_change(&event.job);
            last = Some(event.job);
        }
        match last {
            Some(job) if job.status.is_terminal() => Ok(job),
            _ => self.job(id).await,
        }
    }

    /// `GET /training/jobs/{id}/events`: the job's changes as they happen,
    /// those after revision `after` (-1: from its creation), in order. When
    /// the connection drops it reconnects with `Last-Event-ID`, so no change
    /// is missed or seen twice; the stream ends after the job's final
    /// change, or with an error once reconnecting has failed for as long as
    /// the client's retries allow.
    pub fn events(&self, id: JobId, after: i64) -> BoxStream<'static, Result<JobEvent>> {
        use futures::StreamExt;
        let follow = Follow {
            client: self.clone(),
            id,
            after,
            inner: None,
            failures: 0,
            done: false,
        };
        futures::stream::unfold(follow, |mut follow| async move {
            let item = follow.next().await?;
            Some((item, follow))
        })
        .boxed()
    }

    /// `POST /datasets/upload`: streams the file at `path` (an archive:
    /// zip, tar, tar.gz of an ImageFolder or a YOLO dataset) as the
    /// dataset `dataset_name` of `user_id` (the token's user when `None`).
    /// Retried, reading the file again: the same dataset is written whole
    /// again.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a file that cannot be read or a bad name;
    /// [`Error::Backend`] (413) for a file over the backend's limit.
    pub async fn upload_dataset(
        &self,
        path: &Path,
        dataset_name: &str,
        user_id: Option<&str>,
    ) -> Result<Uploaded> {
        self.upload(
            path,
            "datasets/upload",
            "dataset_name",
            dataset_name,
            user_id,
        )
        .await
    }

    /// `POST /code/upload`: streams the code archive at `path` (zip, tar,
    /// tar.gz, holding a `python` job's entrypoint) as the code
    /// `code_name` of `user_id` (the token's user when `None`). Retried as
    /// [`Client::upload_dataset`] is.
    ///
    /// # Errors
    /// As [`Client::upload_dataset`].
    pub async fn upload_code(
        &self,
        path: &Path,
        code_name: &str,
        user_id: Option<&str>,
    ) -> Result<vtp_core::api::UploadedCode> {
        self.upload(path, "code/upload", "code_name", code_name, user_id)
            .await
    }

    /// A multipart upload of the file at `path` to `route`, named by the
    /// form field `name_field`.
    async fn upload<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        route: &'static str,
        name_field: &'static str,
        name: &str,
        user_id: Option<&str>,
    ) -> Result<T> {
        let file_name = path.file_name().map_or_else(
            || "upload.zip".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let open = || async {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| Error::invalid("path", format!("{}: {e}", path.display())))?;
            let size = file
                .metadata()
                .await
                .map_err(|e| Error::invalid("path", format!("{}: {e}", path.display())))?
                .len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let part = reqwest::multipart::Part::stream_with_length(body, size)
                .file_name(file_name.clone())
                .mime_str("application/octet-stream")
                .map_err(|e| Error::internal(e.to_string()))?;
            let mut form = reqwest::multipart::Form::new();
            if let Some(user_id) = user_id {
                form = form.text("user_id", user_id.to_owned());
            }
            let form = form.text(name_field, name.to_owned()).part("file", part);
            Self::once(self.request(Method::POST, route).multipart(form)).await
        };
        self.retry.run(route, open).await
    }

    /// Streams one file of the job's checkpoint into `dest`: the weights
    /// (`file` `None`) or a file beside them (`best.json`, `last.safetensors`,
    /// ...). Written to a temporary file beside `dest` and renamed, so a
    /// failed download leaves nothing; retried from the start. Returns the
    /// bytes written.
    ///
    /// # Errors
    /// [`Error::NotFound`] while the job has no checkpoint;
    /// [`Error::InvalidInput`] for a file name that is not a checkpoint file.
    pub async fn download_checkpoint(
        &self,
        id: JobId,
        file: Option<&str>,
        dest: &Path,
    ) -> Result<u64> {
        let path = match file {
            None => format!("training/jobs/{id}/checkpoint"),
            Some(file) => format!("training/jobs/{id}/checkpoint/{file}"),
        };
        self.retry
            .run("GET /training/jobs/{id}/checkpoint", || {
                download(self.request(Method::GET, &path), dest)
            })
            .await
    }

    /// Downloads the job's final checkpoint into the directory `dir`: the
    /// weights under their own name (`best.safetensors`) and the sidecar
    /// beside them (`best.json`) that loading the checkpoint needs. Returns
    /// the path of the weights.
    ///
    /// # Errors
    /// [`Error::NotFound`] while the job has no checkpoint.
    pub async fn download_model(&self, id: JobId, dir: &Path) -> Result<PathBuf> {
        let job = self.job(id).await?;
        let uri = job
            .checkpoint_s3_uri
            .or(job.last_checkpoint_s3_uri)
            .ok_or_else(|| {
                Error::not_found("checkpoint", format!("of job {id} ({})", job.status))
            })?;
        let weights = uri
            .rsplit('/')
            .next()
            .unwrap_or("best.safetensors")
            .to_owned();
        self.download_model_file(id, None, &weights, dir).await
    }

    /// Downloads `file`, one file of the job's final checkpoint set (the
    /// package engine's `best.weights.safetensors` beside its
    /// `best.weights.pt`), into the directory `dir`, with its sidecar when
    /// it is safetensors weights. Returns its path.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a file the set does not hold;
    /// [`Error::InvalidInput`] for a name no set file has.
    pub async fn download_set_file(&self, id: JobId, file: &str, dir: &Path) -> Result<PathBuf> {
        self.download_model_file(id, Some(file), file, dir).await
    }

    async fn download_model_file(
        &self,
        id: JobId,
        file: Option<&str>,
        weights: &str,
        dir: &Path,
    ) -> Result<PathBuf> {
        let weights_path = dir.join(weights);
        self.download_checkpoint(id, file, &weights_path).await?;
        // VTP's own weights come with the sidecar that opens them; a
        // script's checkpoint (`best.model.pt`) is the file alone.
        if let Some(stem) = weights.strip_suffix(".safetensors") {
            let sidecar = format!("{stem}.json");
            self.download_checkpoint(id, Some(&sidecar), &dir.join(&sidecar))
                .await?;
        }
        Ok(weights_path)
    }
}

/// A transport failure: unreachable or timed out is retryable; a
/// certificate the client does not trust fails the same way every time.
fn transport(err: reqwest::Error) -> Error {
    // rustls's reasons reach here only as text, through hyper's and
    // reqwest's error types.
    if vtp_core::error_chain(&err).contains("certificate") {
        return Error::backend("backend", err);
    }
    if err.is_connect() || err.is_timeout() || err.is_request() {
        Error::unavailable("backend", err)
    } else {
        Error::backend("backend", err)
    }
}

/// A job's event stream being followed across reconnects.
struct Follow {
    client: Client,
    id: JobId,
    /// The revision of the last event handed out.
    after: i64,
    inner: Option<BoxStream<'static, std::result::Result<eventsource_stream::Event, String>>>,
    /// Connections in a row that ended without an event.
    failures: usize,
    done: bool,
}

impl Follow {
    /// Opens the stream after revision `after`. (Takes the fields it needs,
    /// not `&self`: the stream held in `self` is `Send` but not `Sync`.)
    async fn connect(
        client: &Client,
        id: JobId,
        after: i64,
    ) -> Result<BoxStream<'static, std::result::Result<eventsource_stream::Event, String>>> {
        use eventsource_stream::Eventsource;
        use futures::StreamExt;
        let response = client
            .request(Method::GET, &format!("training/jobs/{id}/events"))
            .header("Last-Event-ID", after.to_string())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(transport)?;
        let response = checked(response).await?;
        Ok(response
            .bytes_stream()
            .eventsource()
            .map(|item| item.map_err(|e| e.to_string()))
            .boxed())
    }

    async fn next(&mut self) -> Option<Result<JobEvent>> {
        use futures::StreamExt;
        loop {
            if self.done {
                return None;
            }
            if self.inner.is_none() {
                if self.failures > 0 {
                    let pause = self.client.poll * (1u32 << self.failures.min(5));
                    tokio::time::sleep(pause).await;
                }
                match Self::connect(&self.client, self.id, self.after).await {
                    Ok(stream) => self.inner = Some(stream),
                    Err(e) if e.is_retryable() && self.failures < self.client.retry.max_retries => {
                        self.failures += 1;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let inner = self.inner.as_mut().expect("connected above");
            match inner.next().await {
                Some(Ok(message)) if message.event == "error" => {
                    // The backend could not read the job's events (its
                    // database is down): reconnect after a pause.
                    tracing::debug!(job_id = %self.id, code = %message.data, "event stream interrupted");
                    self.inner = None;
                    self.failures += 1;
                }
                Some(Ok(message)) => {
                    let event: JobEvent = match serde_json::from_str(&message.data) {
                        Ok(event) => event,
                        Err(e) => {
                            self.done = true;
                            return Some(Err(Error::backend(
                                "backend",
                                format!("an event of job {} is not a JobEvent: {e}", self.id),
                            )));
                        }
                    };
                    self.after = event.revision;
                    self.failures = 0;
                    // Nothing changes a job after its final status.
                    self.done = event.job.status.is_terminal();
                    return Some(Ok(event));
                }
                Some(Err(e)) => {
                    tracing::debug!(job_id = %self.id, error = %e, "event stream dropped; reconnecting");
                    self.inner = None;
                    self.failures += 1;
                }
                // The stream ended: the job was over before this connection
                // sent anything (the caller had seen its last event), or the
                // backend went away mid-job (restarted, say): reconnect.
                None => {
                    self.inner = None;
                    match self.client.job(self.id).await {
                        Ok(job) if job.status.is_terminal() && job.revision <= self.after => {
                            self.done = true;
                            return None;
                        }
                        Ok(_) => self.failures += 1,
                        Err(e) if !e.is_retryable() => {
                            self.done = true;
                            return Some(Err(e));
                        }
                        Err(_) => self.failures += 1,
                    }
                }
            }
            if self.failures > self.client.retry.max_retries {
                self.done = true;
                return Some(Err(Error::unavailable(
                    "backend",
                    format!("the event stream of job {} kept failing", self.id),
                )));
            }
        }
    }
}

/// `response` when it is a success, else the error its body describes.
async fn checked(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let url = response.url().to_string();
    let text = response.text().await.unwrap_or_default();
    let detail = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => body.error,
        // Not the API's shape (a proxy's page, say): the status decides.
        Err(_) => ErrorDetail {
            code: status_code(status).to_owned(),
            message: if text.is_empty() {
                format!("{url} answered {status}")
            } else {
                format!(
                    "{url} answered {status}: {}",
                    text.chars().take(500).collect::<String>()
                )
            },
            field: None,
        },
    };
    Err(detail.into_error(status.as_u16(), retry_after, "backend"))
}

fn status_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_input",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        429 => "rate_limited",
        502..=504 => "unavailable",
        _ => "internal",
    }
}

/// Streams the answer of `request` into `dest` through a temporary file.
async fn download(request: RequestBuilder, dest: &Path) -> Result<u64> {
    use futures::TryStreamExt;
    use tokio::io::AsyncWriteExt;

    let response = checked(request.send().await.map_err(transport)?).await?;
    let io = |e: std::io::Error| Error::internal(format!("{}: {e}", dest.display()));
    let dir = dest.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let partial = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let mut file = tokio::fs::File::from_std(partial.reopen().map_err(io)?);
    let mut stream = response.bytes_stream();
    let mut written = 0u64;
    while let Some(chunk) = stream.try_next().await.map_err(transport)? {
        file.write_all(&chunk).await.map_err(io)?;
        written += chunk.len() as u64;
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    partial.persist(dest).map_err(|e| io(e.error))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_must_be_http_or_https() {
        for url in ["ftp://vtp.example/", "not a url", "file:///etc/passwd"] {
            match Client::builder(url).build() {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "url"),
                other => panic!("{url}: {other:?}"),
            }
        }
        let client = Client::builder("http://127.0.0.1:8000/api")
            .build()
            .unwrap();
        assert_eq!(client.base_url().as_str(), "http://127.0.0.1:8000/api/");
    }

    #[test]
    fn an_https_backend_needs_the_tls_feature() {
        let built = Client::builder("https://vtp.example").build();
        if tls::ENABLED {
            built.unwrap();
        } else {
            let err = built.unwrap_err();
            assert!(err.to_string().contains("`tls` feature"), "{err}");
        }
    }

    /// A backend that answers every request with `status` and `body` (not
    /// the API's error shape: a proxy's page, say), and `Retry-After: 7`.
    async fn answering(status: u16, body: &'static str) -> Client {
        let app = axum::Router::new().fallback(move || async move {
            (
                StatusCode::from_u16(status).unwrap(),
                [(reqwest::header::RETRY_AFTER, "7")],
                body,
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let once = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        Client::builder(&url)
            .timeout(Duration::from_secs(10))
            .retry(once)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn an_answer_not_in_the_apis_shape_is_named_by_its_status() {
        let err = answering(502, "<html>bad gateway</html>")
            .await
            .health()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        let text = vtp_core::error_chain(&err);
        assert!(
            text.contains("502") && text.contains("<html>bad gateway</html>"),
            "{text}"
        );

        let err = answering(404, "").await.health().await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        assert!(
            vtp_core::error_chain(&err).contains("answered 404"),
            "{err:?}"
        );

        match answering(429, "slow down")
            .await
            .health()
            .await
            .unwrap_err()
        {
            Error::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(7))
            }
            other => panic!("{other:?}"),
        }
        let kinds = [
            (401, "unauthenticated"),
            (403, "forbidden"),
            (409, "conflict"),
            (422, "invalid_input"),
            (418, "internal"),
        ];
        for (status, code) in kinds {
            assert_eq!(status_code(StatusCode::from_u16(status).unwrap()), code);
            let err = answering(status, "no").await.health().await.unwrap_err();
            let text = vtp_core::error_chain(&err);
            assert!(
                text.contains(&format!("answered {status}")),
                "{status}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn a_success_whose_json_is_not_the_answer_says_so() {
        let err = answering(200, "{\"status\": 3}")
            .await
            .health()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        assert!(
            vtp_core::error_chain(&err).contains("unexpected JSON"),
            "{err:?}"
        );
    }

    #[test]
    fn the_event_streams_reconnect_pause_has_a_floor() {
        let client = Client::builder("http://127.0.0.1:8000")
            .poll_interval(Duration::ZERO)
            .build()
            .unwrap();
        assert_eq!(client.poll, Duration::from_millis(10));
        let client = Client::new("http://127.0.0.1:8000").unwrap();
        assert_eq!(client.poll, Duration::from_millis(500));
    }

    #[test]
    fn a_token_must_be_a_header_value() {
        match Client::builder("http://127.0.0.1:8000")
            .token("line\nbreak")
            .build()
        {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "token"),
            other => panic!("{other:?}"),
        }
    }
}
