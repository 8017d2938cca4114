//! The HTTP contract's own types: the answers of the backend and the
//! trainer service that are not domain types themselves, and the one error
//! shape with its mapping to and from [`Error`].
//!
//! The servers answer with these types and clients read them back, so a
//! renamed field breaks the build (or the OpenAPI drift test), not a user.
//! Every type here derives [`utoipa::ToSchema`]: the OpenAPI documents
//! (`docs/openapi.json`) are generated from them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::Error;
use crate::job::{Job, JobId};
use crate::models::Task;
use crate::status::JobStatus;

/// Every failure: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable category: `invalid_input`, `not_found`,
    /// `conflict`, `unauthenticated`, `forbidden`, `rate_limited`,
    /// `too_large`, `unavailable`, ... (see [`error_status`]).
    #[schema(example = "invalid_input")]
    pub code: String,
    /// What a person should read.
    #[schema(example = "invalid config.epochs: 0 is outside 1..=10000")]
    pub message: String,
    /// The offending field, dotted for nested ones (`config.epochs`), for
    /// `invalid_input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "config.epochs")]
    pub field: Option<String>,
}

/// The HTTP status and `code` of an error, the one table both sides use:
/// the servers answer with it, and [`ErrorDetail::into_error`] reads it back.
pub fn error_status(err: &Error) -> (u16, &'static str) {
    match err {
        Error::NotFound { .. } => (404, "not_found"),
        Error::AlreadyExists { .. } => (409, "already_exists"),
        Error::Conflict { .. } => (409, "conflict"),
        Error::InvalidInput { .. } => (422, "invalid_input"),
        Error::TooLarge { .. } => (413, "too_large"),
        Error::Unauthenticated { .. } => (401, "unauthenticated"),
        Error::Forbidden { .. } => (403, "forbidden"),
        Error::RateLimited { .. } => (429, "rate_limited"),
        Error::Unavailable { .. } => (503, "unavailable"),
        Error::Timeout { .. } => (504, "timeout"),
        Error::Backend { .. } => (502, "backend_error"),
        Error::Cancelled { .. } => (409, "cancelled"),
        _ => (500, "internal"),
    }
}

impl ErrorDetail {
    /// The error a client sees for this answer (`status` is the HTTP status;
    /// `retry_after` the `Retry-After` header, if any), so that
    /// [`Error::is_retryable`] means the same on both sides of the wire.
    /// `service` names the server in errors without a field of their own.
    pub fn into_error(
        self,
        status: u16,
        retry_after: Option<Duration>,
        service: &'static str,
    ) -> Error {
        let ErrorDetail {
            code,
            message,
            field,
        } = self;
        // The server's message is its error's Display; the error made here
        // adds the same prefix again, so it is taken off first.
        let bare = |prefix: &str| message.strip_prefix(prefix).unwrap_or(&message).to_owned();
        match (status, code.as_str()) {
            (
                _,
                "invalid_input"
                | "malformed_json"
                | "bad_multipart"
                | "too_large"
                | "unsupported_media_type",
            )
            | (400 | 413 | 415 | 422, _) => {
                let field = field.unwrap_or_else(|| "request".to_owned());
                let message = bare(&format!("invalid {field}: "));
                Error::invalid(field, message)
            }
            (_, "not_found") | (404, _) => not_found(&message),
            (_, "already_exists" | "conflict" | "cancelled") | (409, _) => Error::conflict(message),
            (_, "unauthenticated") | (401, _) => Error::Unauthenticated {
                message: bare("unauthenticated: "),
            },
            (_, "forbidden") | (403, _) => Error::Forbidden {
                message: bare("forbidden: "),
            },
            (_, "rate_limited") | (429, _) => Error::RateLimited {
                message: bare("rate limited: "),
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            (_, "unavailable" | "timeout") | (502..=504, _) => Error::unavailable(service, message),
            _ => Error::backend(service, format!("{status} {code}: {message}")),
        }
    }
}

/// `job 0192... not found` read back: the kinds the servers name, else
/// `resource`.
fn not_found(message: &str) -> Error {
    const KINDS: [&str; 6] = ["job", "dataset", "object", "checkpoint", "token", "blob"];
    let trimmed = message.strip_suffix(" not found").unwrap_or(message);
    match trimmed.split_once(' ') {
        Some((kind, id)) if KINDS.contains(&kind) => Error::NotFound {
            kind: KINDS.into_iter().find(|k| *k == kind).unwrap_or("resource"),
            id: id.to_owned(),
        },
        _ => Error::NotFound {
            kind: "resource",
            id: trimmed.to_owned(),
        },
    }
}

impl From<&Error> for ErrorDetail {
    fn from(err: &Error) -> Self {
        let field = match err {
            Error::InvalidInput { field, .. } => Some(field.clone()),
            _ => None,
        };
        ErrorDetail {
            code: error_status(err).1.to_owned(),
            message: crate::error::error_chain(err),
            field,
        }
    }
}

/// The answer of `POST /training/jobs/{id}/start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Started {
    /// Always `started`.
    #[schema(example = "started")]
    pub status: String,
    /// The job, `queued` (or further along if its trainer reported already).
    pub job: Job,
}

impl Started {
    /// The answer for `job`.
    pub fn new(job: Job) -> Self {
        Started {
            status: "started".to_owned(),
            job,
        }
    }
}

/// The answer of `POST /training/jobs/{id}/callback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CallbackAck {
    /// Always `ok`: the report was taken (applied or known already).
    #[schema(example = "ok")]
    pub status: String,
    /// Whether the report changed the job; `false` for a replay or an
    /// older report (by `seq`).
    pub applied: bool,
    /// The job's status after the report.
    pub job_status: JobStatus,
}

/// The answer of `GET /health` (the backend's). Anonymous callers get
/// `status` alone; callers with a token (or any, with authentication off)
/// get the rest too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the job store does not answer (with 503).
    #[schema(example = "ok")]
    pub status: String,
    /// `ok` or `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Where datasets and checkpoints are stored (`file:///...`, `s3://...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_store: Option<String>,
    /// Which launcher starts trainers: `subprocess`, `http`, `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<String>,
    /// The backend's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One epoch of `GET /training/jobs/{id}/metrics`: `epoch`, `recorded_at`
/// and every value the trainer reported for it (`loss`, `accuracy`,
/// `val_loss`, `mAP50-95`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EpochMetrics {
    /// The epoch, from 1.
    pub epoch: u32,
    /// When the epoch's report was stored.
    pub recorded_at: DateTime<Utc>,
    /// The epoch's values by name.
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

impl From<crate::report::TrainingMetric> for EpochMetrics {
    fn from(metric: crate::report::TrainingMetric) -> Self {
        EpochMetrics {
            epoch: metric.epoch,
            recorded_at: metric.recorded_at,
            values: metric.values,
        }
    }
}

/// The answer of `POST /datasets/upload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Uploaded {
    /// Where the file landed: `s3://bucket/users/...` or `file:///...`;
    /// what a job's `dataset_s3_uri` names.
    pub s3_uri: String,
    /// Bytes stored.
    pub size: u64,
    /// The stored file name.
    pub filename: String,
    /// Owner.
    pub user_id: String,
    /// Dataset name.
    pub dataset_name: String,
}

/// The answer of `POST /code/upload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UploadedCode {
    /// Where the archive landed; what a `python` job's
    /// `config.code_s3_uri` names.
    pub s3_uri: String,
    /// Bytes stored.
    pub size: u64,
    /// The stored file name.
    pub filename: String,
    /// Owner.
    pub user_id: String,
    /// The code's name.
    pub code_name: String,
}

/// One model of the trainer service's `GET /models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelInfo {
    /// The name used in `model_name` and `config.model`.
    pub name: String,
    /// What it does.
    pub task: Task,
    /// One line about it.
    pub description: String,
    /// Smallest `config.image_size` (`imgsz` for the package engine).
    pub min_image_size: u32,
    /// Trainable parameters with 10 classes (classifiers) or 80
    /// (detectors; Ultralytics' summary calls them "gradients"); not
    /// counted for the package engine's models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<i64>,
    /// Which engine trains it: `native` (VTP's own, the default for every
    /// model it has) or `package` (the `ultralytics` package;
    /// `config.engine: "package"`).
    #[serde(default = "native")]
    pub engine: crate::Engine,
}

fn native() -> crate::Engine {
    crate::Engine::Native
}

/// The trainer service's answer to `POST /training/start` (202) and
/// `POST /training/{job_id}/cancel` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrainerAccepted {
    /// `accepted` (start) or `cancelling` (cancel).
    #[schema(example = "accepted")]
    pub status: String,
    /// The job.
    pub job_id: JobId,
}

/// A job's state as a trainer service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainerJobState {
    /// Waiting for a training slot.
    Queued,
    /// Training.
    Running,
    /// Asked to stop.
    Cancelling,
    /// Finished here, with reports still waiting for the backend.
    Reporting,
}

/// The trainer service's `GET /training/{job_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrainerJob {
    /// The job.
    pub job_id: JobId,
    /// What the trainer is doing with it.
    pub state: TrainerJobState,
}

/// The trainer service's `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrainerHealth {
    /// Always `ok` while it answers.
    #[schema(example = "ok")]
    pub status: String,
    /// The jobs held (queued, running or cancelling).
    pub jobs: Vec<JobId>,
    /// Reports waiting to be delivered to the backend.
    pub pending_reports: usize,
    /// Whether libtorch sees a CUDA device.
    pub cuda: bool,
    /// How many jobs it trains at once: the backend's queue hands it at
    /// most this many (absent from trainers that do not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// The trainer's version.
    pub version: String,
}

/// The trainer service's `GET /models`: every model, and the hyperparameters
/// a job's `config` takes with their defaults per task (the `TrainConfig`
/// schema of the OpenAPI document says what each one means).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelCatalog {
    /// Every model VTP trains, with the engine that trains it (a model both
    /// engines have is listed once for each).
    pub models: Vec<ModelInfo>,
    /// The `config` of a classifier, as defaulted.
    pub classify_defaults: crate::TrainConfig,
    /// The `config` of a detector, as defaulted (the Ultralytics recipe).
    pub detect_defaults: crate::TrainConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_reads_back_as_its_own_kind() {
        let errors = [
            Error::invalid("config.epochs", "0 is outside 1..=10000"),
            Error::NotFound {
                kind: "job",
                id: "x".into(),
            },
            Error::conflict("job x is running"),
            Error::Unauthenticated {
                message: "no token".into(),
            },
            Error::Forbidden {
                message: "not yours".into(),
            },
            Error::RateLimited {
                message: "slow down".into(),
                retry_after: Duration::from_secs(7),
            },
            Error::unavailable("database", "connection refused"),
            Error::internal("bug"),
        ];
        for err in errors {
            let (status, _) = error_status(&err);
            let detail = ErrorDetail::from(&err);
            let wire = serde_json::to_string(&ErrorBody {
                error: detail.clone(),
            })
            .unwrap();
            let back: ErrorBody = serde_json::from_str(&wire).unwrap();
            let retry_after =
                matches!(err, Error::RateLimited { .. }).then(|| Duration::from_secs(7));
            let read = back.error.into_error(status, retry_after, "backend");
            assert_eq!(
                read.is_retryable(),
                status == 429 || status == 503,
                "{wire}"
            );
            assert_eq!(
                std::mem::discriminant(&read),
                std::mem::discriminant(&match err {
                    // A server's own failure is a backend error to its client.
                    Error::Internal { .. } => Error::backend("backend", "x"),
                    other => other,
                }),
                "{wire}"
            );
        }
        let read = ErrorDetail {
            code: "invalid_input".into(),
            message: "bad".into(),
            field: Some("config.lr".into()),
        }
        .into_error(422, None, "backend");
        assert!(matches!(read, Error::InvalidInput { ref field, .. } if field == "config.lr"));
        // The message is not prefixed twice.
        let err = Error::invalid("config.lr", "must be in (0, 10]");
        let read = ErrorDetail::from(&err).into_error(422, None, "backend");
        assert_eq!(read.to_string(), err.to_string());
        let err = Error::not_found("job", "0192");
        let read = ErrorDetail::from(&err).into_error(404, None, "backend");
        assert_eq!(read.to_string(), err.to_string());
    }

    #[test]
    fn epoch_metrics_are_flat_on_the_wire() {
        let row = EpochMetrics {
            epoch: 3,
            recorded_at: "2026-01-02T03:04:05Z".parse().unwrap(),
            values: [("loss".to_owned(), 0.5)].into(),
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"epoch": 3, "recorded_at": "2026-01-02T03:04:05Z", "loss": 0.5})
        );
        assert_eq!(serde_json::from_value::<EpochMetrics>(json).unwrap(), row);
    }
}
