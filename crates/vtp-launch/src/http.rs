//! [`HttpLauncher`]: hands jobs to a trainer service over HTTP, as the seed does.
//!
//! The contract with the trainer service:
//!
//! - `POST {trainer}/training/start` with a [`StartTraining`] body; any 2xx
//!   accepts the job, `409` means the trainer already runs it (adopted).
//! - `POST {trainer}/training/{job_id}/cancel`; 2xx means the trainer will
//!   stop and report `cancelled`, `404` means it does not run the job. With
//!   `?attempt=N` ([`TrainerLauncher::stop`]) it stops only attempt `N` or
//!   an earlier one, as an interruption.
//! - `GET {trainer}/training/{job_id}`: 2xx while the trainer holds the job, `404` otherwise.
//! - Error bodies are [`ErrorBody`] (or FastAPI's `{"detail": ...}`);
//!   their message, and the field a 422 names, are carried into the error.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Response, StatusCode};
use vtp_core::api::ErrorBody;
use vtp_core::{CancelOutcome, Error, JobId, Result, RetryConfig, StartTraining, TrainerLauncher};

/// Launches jobs on a trainer service at a base URL.
#[derive(Debug, Clone)]
pub struct HttpLauncher {
    base: url::Url,
    client: reqwest::Client,
    retry: RetryConfig,
    /// Jobs run at once as configured; `None`: as many as the trainer
    /// says (its `GET /health`'s `slots`).
    slots: Option<u32>,
    /// The trainer's own answer, and when it was read.
    told: std::sync::Arc<std::sync::Mutex<Option<(u32, std::time::Instant)>>>,
}

impl HttpLauncher {
    /// How long one request may take.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// A launcher for the trainer service at `base_url` (`http://127.0.0.1:8001`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `base_url` is not an http(s) URL.
    pub fn new(base_url: &str) -> Result<Self> {
        let mut base = url::Url::parse(base_url)
            .map_err(|e| Error::invalid("trainer_url", format!("{base_url:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::invalid(
                "trainer_url",
                format!("{base_url:?} is not an http(s) URL"),
            ));
        }
        vtp_client::tls::require_for("trainer_url", &base)?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(HttpLauncher {
            base,
            client: client(None)?,
            retry: Self::default_retry(),
            slots: None,
            told: std::sync::Arc::default(),
        })
    }

    /// How long the trainer's own count of slots is trusted before it is
    /// asked again.
    pub const SLOTS_TTL: Duration = Duration::from_secs(30);

    /// Runs at most `slots` jobs at once; `None` (the default): as many as
    /// the trainer service says it trains at once (1 if it does not say).
    #[must_use]
    pub fn with_slots(mut self, slots: Option<u32>) -> Self {
        self.slots = slots;
        self
    }

    /// Sends `Authorization: Bearer <token>` on every request (the trainer
    /// service's `VTP_TRAINER_TOKEN`).
    ///
    /// # Panics
    /// Never for a token of visible ASCII; other bytes are refused by the
    /// HTTP client builder and leave the launcher without a token.
    #[must_use]
    pub fn with_token(mut self, token: &str) -> Self {
        match client(Some(token)) {
            Ok(client) => self.client = client,
            Err(e) => tracing::error!(error = %e, "the trainer token is not a valid header value"),
        }
        self
    }

    /// A few quick retries: the caller (an API request) is waiting.
    pub fn default_retry() -> RetryConfig {
        RetryConfig {
            max_retries: 3,
            timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        }
    }

    /// Replaces the retry policy for unreachable or overloaded trainers.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The trainer's base URL.
    pub fn base_url(&self) -> &url::Url {
        &self.base
    }

    fn endpoint(&self, path: &str) -> url::Url {
        self.base
            .join(path)
            .expect("relative paths join onto an http base")
    }

    async fn post<B: serde::Serialize + Sync>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response> {
        let url = self.endpoint(path);
        self.retry
            .run("trainer request", || async {
                let mut request = self.client.post(url.clone());
                if let Some(body) = body {
                    request = request.json(body);
                }
                let response = request.send().await.map_err(transport_error)?;
                let status = response.status();
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    let message = error_message(response).await;
                    return Err(Error::unavailable(
                        "trainer",
                        format!("{url} answered {status}: {message}"),
                    ));
                }
                Ok(response)
            })
            .await
    }
}

/// The HTTP client: short timeouts, no redirects (a trainer that redirects
/// is misconfigured, and following one would carry the token elsewhere).
fn client(token: Option<&str>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::invalid("trainer_token", "must be visible ASCII"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    vtp_client::tls::client_builder()?
        .timeout(HttpLauncher::REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(3))
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .map_err(|e| Error::internal(format!("HTTP client: {e}")))
}

fn transport_error(err: reqwest::Error) -> Error {
    if err.is_connect() || err.is_timeout() || err.is_request() {
        Error::unavailable("trainer", err)
    } else {
        Error::backend("trainer", err)
    }
}

/// The message (and field) of an error answer: the API's shape
/// ([`ErrorBody`], the one the trainer service answers with), or FastAPI's
/// `{"detail": ...}` of a seed-style trainer, or the text.
async fn error_detail(response: Response) -> (String, Option<String>) {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if let Ok(body) = serde_json::from_str::<ErrorBody>(&text) {
        return (body.error.message, body.error.field);
    }
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        let message = if text.is_empty() {
            status.to_string()
        } else {
            text
        };
        return (message, None);
    };
    let message = json
        .get("detail")
        .or_else(|| json.get("error"))
        .unwrap_or(&json);
    let message = match message {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (message, None)
}

/// The message of an error answer.
async fn error_message(response: Response) -> String {
    error_detail(response).await.0
}

#[async_trait]
impl TrainerLauncher for HttpLauncher {
    fn name(&self) -> &'static str {
        "http"
    }

    /// The configured slots, else the trainer service's `slots` from its
    /// `GET /health` (read again every [`HttpLauncher::SLOTS_TTL`]; 1 for a
    /// trainer that does not say, such as a seed-style one).
    async fn capacity(&self) -> Result<vtp_core::Capacity> {
        if let Some(slots) = self.slots {
            return Ok(vtp_core::Capacity::Slots(slots));
        }
        let told = *self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((slots, at)) = told
            && at.elapsed() < Self::SLOTS_TTL
        {
            return Ok(vtp_core::Capacity::Slots(slots));
        }
        let url = self.endpoint("health");
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(transport_error)?;
        if !response.status().is_success() {
            return Err(Error::unavailable(
                "trainer",
                format!("{url} answered {}", response.status()),
            ));
        }
        let health: serde_json::Value = response.json().await.map_err(transport_error)?;
        let slots = health
            .get("slots")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        *self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((slots, std::time::Instant::now()));
        Ok(vtp_core::Capacity::Slots(slots))
    }

    async fn launch(&self, request: &StartTraining) -> Result<()> {
        let response = self.post("training/start", Some(request)).await?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::CONFLICT => {
                tracing::info!(job_id = %request.job_id, "trainer already runs the job; adopted");
                Ok(())
            }
            // The trainer names the field it refused (`config.init_weights`);
            // its message already says `invalid <field>: ...`.
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                let (message, field) = error_detail(response).await;
                let field = field.unwrap_or_else(|| "config".to_owned());
                let message = message
                    .strip_prefix(&format!("invalid {field}: "))
                    .map_or_else(|| message.clone(), str::to_owned);
                Err(Error::invalid(field, message))
            }
            status => Err(Error::backend(
                "trainer",
                format!(
                    "training/start answered {status}: {}",
                    error_message(response).await
                ),
            )),
        }
    }

    async fn is_running(&self, job_id: JobId) -> Result<bool> {
        let url = self.endpoint(&format!("training/{job_id}"));
        let response = self
            .retry
            .run("trainer request", || async {
                self.client
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(transport_error)
            })
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(Error::backend(
                "trainer",
                format!(
                    "job status answered {status}: {}",
                    error_message(response).await
                ),
            )),
        }
    }

    /// `POST /training/{job_id}/cancel?attempt=N`: the trainer drops the job
    /// only if it runs that attempt or an earlier one.
    async fn stop(&self, job_id: JobId, attempt: i32) -> Result<()> {
        let response = self
            .post::<()>(&format!("training/{job_id}/cancel?attempt={attempt}"), None)
            .await?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            status => Err(Error::backend(
                "trainer",
                format!("stop answered {status}: {}", error_message(response).await),
            )),
        }
    }

    async fn cancel(&self, job_id: JobId) -> Result<CancelOutcome> {
        let response = self
            .post::<()>(&format!("training/{job_id}/cancel"), None)
            .await?;
        match response.status() {
            s if s.is_success() => Ok(CancelOutcome::Signalled),
            StatusCode::NOT_FOUND => Ok(CancelOutcome::NotRunning),
            status => Err(Error::backend(
                "trainer",
                format!(
                    "cancel answered {status}: {}",
                    error_message(response).await
                ),
            )),
        }
    }
}
