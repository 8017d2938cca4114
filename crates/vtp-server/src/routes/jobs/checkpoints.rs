//! The stored checkpoints of a job: the final weights and any file of its
//! set (the sidecar, the optimizer state), streamed from the blob store.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use vtp_core::{BlobKey, BlobStoreExt, Error, JobId};

use super::ApiResult;
use crate::AppState;
use crate::auth::{Caller, owned_job};
use crate::error::{ApiPath, error_chain};
use crate::openapi::{Binary, CommonErrors};

/// `GET /training/jobs/{id}/checkpoint`: streams the job's checkpoint.
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/checkpoint",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)")),
    responses(
        (status = 200, description = "The weights (safetensors); for a job that ended without a final checkpoint, those of its last checkpoint set", body = Binary, content_type = "application/octet-stream"),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn checkpoint(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Response> {
    let key = checkpoint_key(&state, &caller, id).await?;
    stream_blob(&state, &key).await
}

/// Whether `file` can be one of a checkpoint set's files, servable next to
/// its main file: the engine's (`best.safetensors`, `best.json`,
/// `best.optim.safetensors` and their `last.*`), or a script's, which the
/// trainer stores as `best.{name}` and `last.{name}` (the package engine's
/// `best.weights.pt` beside `best.weights.safetensors` and its sidecar).
fn is_set_file(file: &str) -> bool {
    let name = file
        .strip_prefix("best.")
        .or_else(|| file.strip_prefix("last."));
    name.is_some_and(|name| !name.is_empty()) && vtp_core::validate_name("file", file).is_ok()
}

/// `GET /training/jobs/{id}/checkpoint/{file}`: one file of the job's
/// checkpoint directory, such as `best.json` (the sidecar with class names
/// and config that `Checkpoint::open` needs) or `last.safetensors`.
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/checkpoint/{file}",
    tag = "jobs",
    params(
        ("id" = JobId, Path, description = "The job's id (a UUID)"),
        ("file" = String, Path, description = "A file of the set: `best.safetensors`, `best.json`, `best.optim.safetensors` and their `last.*` for the engine's; `best.{name}` and `last.{name}` for a script's (`best.weights.pt`)", pattern = r"^(best|last)\.[A-Za-z0-9_.-]{1,123}$"),
    ),
    responses(
        (status = 200, description = "The file", body = Binary, content_type = "application/octet-stream"),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn checkpoint_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, file)): ApiPath<(JobId, String)>,
) -> ApiResult<Response> {
    if !is_set_file(&file) {
        return Err(Error::invalid(
            "file",
            format!(
                "{file:?} is not a checkpoint file; expected best.* or last.* \
                 (best.safetensors, best.json, last.optim.safetensors, best.weights.pt, ...)"
            ),
        )
        .into());
    }
    let weights = checkpoint_key(&state, &caller, id).await?;
    let dir = weights.as_str().rsplit_once('/').map_or("", |(dir, _)| dir);
    let key = BlobKey::parse(&format!("{dir}/{file}"))?;
    stream_blob(&state, &key).await
}

/// The key of the job's final checkpoint, or, for a job that ended without
/// one (failed, cancelled), of the last checkpoint set it stored; 404 until
/// there is one.
async fn checkpoint_key(state: &AppState, caller: &Caller, id: JobId) -> ApiResult<BlobKey> {
    let job = owned_job(state.jobs.as_ref(), caller, id).await?;
    let last = job
        .status
        .is_terminal()
        .then_some(job.last_checkpoint_s3_uri)
        .flatten();
    let uri = job
        .checkpoint_s3_uri
        .or(last)
        .ok_or_else(|| Error::not_found("checkpoint of job", id))?;
    let key = state.blobs.key_for(&uri)?;
    // Reports are refused when they point elsewhere; a row written before
    // that check existed is not served either.
    if !vtp_core::layout::is_below(&key, &vtp_core::layout::job_prefix(id)) {
        return Err(Error::not_found("checkpoint of job", id).into());
    }
    Ok(key)
}

/// Streams a blob as a download.
async fn stream_blob(state: &AppState, key: &BlobKey) -> ApiResult<Response> {
    let (meta, stream) = state.blobs.get_stream(key).await?;
    let body = Body::from_stream(stream.map_err(|e| std::io::Error::other(error_chain(&e))));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        key.file_name().replace('"', "")
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
