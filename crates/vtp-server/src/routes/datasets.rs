//! `POST /datasets/upload`: a multipart dataset upload, streamed to the blob
//! store under `users/{user_id}/datasets/{dataset_name}/{file name}`.
//!
//! The file is streamed to a staging key first (the seed's curl sends the
//! file before the names), then copied into place and the staging object
//! removed, so a failed upload leaves nothing under the dataset prefix.

use axum::Json;
use axum::extract::multipart::{Field, Multipart, MultipartError};
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use vtp_core::api::Uploaded;
use vtp_core::{BlobKey, BlobStoreExt, Error, ObjectMeta, validate_name};

use crate::AppState;
use crate::auth::{AuthMode, Caller};
use crate::error::{ApiError, ApiQuery, error_chain};

/// Names may also come as query parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// The owner, if not a form field (with tokens, the token's user when left out).
    user_id: Option<String>,
    /// The dataset's name, if not a form field.
    dataset_name: Option<String>,
}

/// The multipart form of an upload, as the seed's curl sends it.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Describes the form for the OpenAPI document only.
pub struct UploadForm {
    /// The dataset archive (zip or tar.gz; an ImageFolder or a YOLO
    /// dataset) or any single file.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The owner (letters, digits, `-`, `_`, `.`).
    user_id: Option<String>,
    /// The dataset's name (letters, digits, `-`, `_`, `.`).
    dataset_name: Option<String>,
}

/// Longest accepted text field.
const MAX_TEXT_FIELD: usize = 1024;

fn bad_multipart(e: &MultipartError) -> ApiError {
    ApiError::new(
        e.status(),
        "bad_multipart",
        format!("malformed multipart body: {}", e.body_text()),
    )
}

/// `POST /datasets/upload`
#[utoipa::path(
    post,
    path = "/datasets/upload",
    tag = "datasets",
    params(UploadQuery),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored under `users/{user_id}/datasets/{dataset_name}/`", body = Uploaded),
        crate::openapi::CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<UploadQuery>,
    request: Request,
) -> Result<(StatusCode, Json<Uploaded>), ApiError> {
    if state.auth == AuthMode::Tokens {
        state.limits.check_upload(&caller.principal().user_id)?;
    }
    let limit = state.max_upload_bytes;
    // Refuse from the header alone, before reading a byte of the body.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared
        && size > limit
    {
        return Err(Error::TooLarge { size, limit }.into());
    }
    let mut multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::new(e.status(), "bad_multipart", e.body_text()))?;

    let mut user_id = query.user_id;
    let mut dataset_name = query.dataset_name;
    let mut staged: Option<(BlobKey, String, ObjectMeta)> = None;
    let mut form_names = std::collections::HashSet::new();
    let result = async {
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| bad_multipart(&e))?
        {
            let name = field.name().unwrap_or_default().to_owned();
            // A name given twice is ambiguous (found by schemathesis, which
            // sends a list as repeated fields): refused, not last-one-wins.
            if matches!(name.as_str(), "user_id" | "dataset_name")
                && !form_names.insert(name.clone())
            {
                return Err(Error::invalid(name, "given more than once").into());
            }
            match name.as_str() {
                "user_id" => user_id = Some(text(&mut field, "user_id").await?),
                "dataset_name" => dataset_name = Some(text(&mut field, "dataset_name").await?),
                "file" => {
                    if staged.is_some() {
                        return Err(Error::invalid("file", "send exactly one file").into());
                    }
                    let filename = safe_file_name(field.file_name());
                    let key = BlobKey::parse(&format!("uploads/tmp/{}", uuid::Uuid::new_v4()))?;
                    let meta = stream_field(&state, &key, &mut field, limit).await?;
                    staged = Some((key, filename, meta));
                }
                other => {
                    return Err(Error::invalid(
                        other.to_owned(),
                        format!(
                            "unknown form field {other:?}; expected file, user_id and dataset_name"
                        ),
                    )
                    .into());
                }
            }
        }
        let Some((staging, filename, _)) = &staged else {
            return Err(ApiError::from(Error::invalid(
                "file",
                "a multipart field named `file` is required",
            )));
        };
        // With tokens the owner is the caller: a user_id left out is theirs,
        // someone else's is refused (an admin may upload for anyone).
        if state.auth == AuthMode::Tokens && user_id.is_none() {
            user_id = Some(caller.principal().user_id.clone());
        }
        let user_id = user_id
            .take()
            .ok_or_else(|| Error::invalid("user_id", "is required"))?;
        caller.check_acts_for("user_id", &user_id)?;
        let dataset_name = dataset_name
            .take()
            .ok_or_else(|| Error::invalid("dataset_name", "is required"))?;
        validate_name("user_id", &user_id)?;
        validate_name("dataset_name", &dataset_name)?;
        let key =
            BlobKey::from_segments(&["users", &user_id, "datasets", &dataset_name, filename])?;
        state.blobs.copy(staging, &key).await?;
        let meta = state.blobs.head(&key).await?;
        Ok::<_, ApiError>(Uploaded {
            s3_uri: state.blobs.uri(&key),
            size: meta.size,
            filename: filename.clone(),
            user_id,
            dataset_name,
        })
    }
    .await;

    if let Some((staging, _, _)) = &staged
        && let Err(e) = state.blobs.delete(staging).await
    {
        tracing::warn!(key = %staging.as_str(), error = %error_chain(&e), "could not remove a staged upload");
    }
    let uploaded = result?;
    tracing::info!(uri = %uploaded.s3_uri, size = uploaded.size, "dataset uploaded");
    Ok((StatusCode::CREATED, Json(uploaded)))
}

/// A short text field.
async fn text(field: &mut Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| bad_multipart(&e))? {
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_TEXT_FIELD {
            return Err(Error::invalid(name, format!("longer than {MAX_TEXT_FIELD} bytes")).into());
        }
    }
    String::from_utf8(buf).map_err(|_| Error::invalid(name, "is not UTF-8").into())
}

/// The last path component of the client's file name, with characters that
/// keys do not allow replaced by `_`.
fn safe_file_name(name: Option<&str>) -> String {
    let base = name
        .and_then(|n| n.rsplit(['/', '\\']).next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("dataset");
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if clean.starts_with('.') {
        clean.replace_range(0..1, "_");
    }
    clean
}

/// Streams one multipart field into the store, aborting past `limit` bytes.
async fn stream_field(
    state: &AppState,
    key: &BlobKey,
    field: &mut Field<'_>,
    limit: u64,
) -> Result<ObjectMeta, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<vtp_core::Result<Bytes>>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed();
    let blobs = state.blobs.clone();
    let target = key.clone();
    let put = tokio::spawn(async move { blobs.put_stream(&target, stream).await });

    let mut size: u64 = 0;
    let mut failure: Option<ApiError> = None;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                size += chunk.len() as u64;
                if size > limit {
                    failure = Some(Error::TooLarge { size, limit }.into());
                    let _ = tx.send(Err(Error::TooLarge { size, limit })).await;
                    break;
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the store gave up; its error is below
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(Error::invalid("file", e.body_text()))).await;
                failure = Some(bad_multipart(&e));
                break;
            }
        }
    }
    drop(tx);
    let stored = put
        .await
        .map_err(|e| Error::internal(format!("upload task: {e}")))?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    Ok(stored?)
}

#[cfg(test)]
mod tests {
    use super::safe_file_name;

    #[test]
    fn file_names_are_made_safe() {
        assert_eq!(safe_file_name(Some("digits.zip")), "digits.zip");
        assert_eq!(safe_file_name(Some("../../etc/passwd")), "passwd");
        assert_eq!(
            safe_file_name(Some("C:\\data\\my set.tar.gz")),
            "my_set.tar.gz"
        );
        assert_eq!(safe_file_name(Some(".hidden")), "_hidden");
        assert_eq!(safe_file_name(Some("..")), "dataset");
        assert_eq!(safe_file_name(None), "dataset");
    }
}
