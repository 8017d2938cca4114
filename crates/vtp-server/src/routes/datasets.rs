//! Datasets: `POST /datasets/upload`, a multipart upload streamed to the
//! blob store under `users/{user_id}/datasets/{dataset_name}/{file name}`,
//! and `DELETE /datasets/{user_id}/{dataset_name}`; code archives for
//! `python` jobs: `POST /code/upload`, the same upload under
//! `users/{user_id}/code/{code_name}/{file name}`.
//!
//! The file is streamed to a staging key first (the seed's curl sends the
//! file before the names), then copied into place and the staging object
//! removed, so a failed upload leaves nothing under the dataset prefix.
//!
//! An upload is bounded in every way a client could stretch it: the
//! declared and the streamed size ([`AppState::max_upload_bytes`]), each
//! text field (1 KiB), each part's header section ([`MAX_PART_HEADER`],
//! found by [`PartHeaders`]: multer bounds it only by the whole stream, and
//! rescans what it has buffered on every chunk), the silence between
//! two chunks and the whole upload's length
//! ([`crate::limits::LimitSettings::upload_idle`], `upload_total`), and how
//! many run at once, per user and in all.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use vtp_core::api::{Uploaded, UploadedCode};
use vtp_core::{
    BlobKey, BlobStoreExt, Error, JobFilter, JobPages, JobStatus, ObjectMeta, layout, validate_name,
};

use crate::AppState;
use crate::auth::{AuthMode, Caller};
use crate::error::{ApiError, ApiPath, ApiQuery, error_chain};

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

/// The longest header section of one part (its `Content-Disposition` and
/// `Content-Type` lines) that is read while waiting for its end.
pub const MAX_PART_HEADER: u64 = 8 * 1024;

/// Room for the form around the file: boundaries, part headers, names.
const FORM_OVERHEAD: u64 = 64 * 1024;

/// Why the body of an upload was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// A part's header section ran past [`MAX_PART_HEADER`].
    PartHeader,
    /// Nothing arrived for this long.
    Idle(Duration),
    /// The upload took longer than this.
    Total(Duration),
}

impl Cut {
    fn answer(self) -> ApiError {
        match self {
            Cut::PartHeader => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "part_header_too_large",
                format!("a part's header section is longer than {MAX_PART_HEADER} bytes"),
            ),
            Cut::Idle(after) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_stalled",
                format!("the upload sent nothing for {}s", after.as_secs()),
            ),
            Cut::Total(after) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_too_slow",
                format!("the upload took longer than {}s", after.as_secs()),
            ),
        }
    }
}

/// Why the body was cut, shared by the bounded body and the handler.
#[derive(Debug, Default)]
struct Watch {
    cut: Mutex<Option<Cut>>,
}

impl Watch {
    fn cut(&self) -> Option<Cut> {
        *self
            .cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_cut(&self, cut: Cut) {
        self.cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(cut);
    }
}

/// Measures each part's header section as the body streams by: from a
/// delimiter (`CRLF--boundary`) to the blank line (`CRLFCRLF`) that ends
/// the part's headers. It only finds those two markers, across chunk
/// edges, and parses nothing: multer parses, after this has bounded what
/// it may have to buffer while it looks for a header's end.
#[derive(Debug)]
pub struct PartHeaders {
    delimiter: Vec<u8>,
    /// The last bytes of the previous chunk (a marker may span chunks).
    carry: Vec<u8>,
    /// Inside a header section: its bytes so far.
    in_header: Option<u64>,
    limit: u64,
}

impl PartHeaders {
    const END: &'static [u8] = b"\r\n\r\n";

    /// A measure for the body of `boundary`, allowing `limit` bytes of
    /// header per part.
    pub fn new(boundary: &str, limit: u64) -> Self {
        PartHeaders {
            delimiter: [b"\r\n--", boundary.as_bytes()].concat(),
            // The first delimiter opens the body without a line break
            // before it: as if one had come.
            carry: b"\r\n".to_vec(),
            in_header: None,
            limit,
        }
    }

    /// Takes the next chunk; `false` once a header section is longer than
    /// the limit.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let old = self.carry.len();
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        // A match must end in the new bytes (one inside the carry was
        // found with the previous chunk).
        let find = |needle: &[u8], from: usize| {
            let start = from.max(old.saturating_sub(needle.len() - 1));
            memchr::memmem::find(&data[start..], needle).map(|i| start + i)
        };
        let mut at = 0;
        loop {
            match self.in_header {
                None => match find(&self.delimiter, at) {
                    Some(found) => {
                        at = found + self.delimiter.len();
                        self.in_header = Some(0);
                    }
                    None => break,
                },
                Some(seen) => {
                    let from = at.max(old);
                    match find(Self::END, at) {
                        Some(found) => {
                            let end = found + Self::END.len();
                            if seen + end.saturating_sub(from) as u64 > self.limit {
                                return false;
                            }
                            at = end;
                            self.in_header = None;
                        }
                        None => {
                            let seen = seen + data.len().saturating_sub(from) as u64;
                            if seen > self.limit {
                                return false;
                            }
                            self.in_header = Some(seen);
                            break;
                        }
                    }
                }
            }
        }
        let keep = self.delimiter.len().max(Self::END.len()) - 1;
        self.carry = data[data.len().saturating_sub(keep)..].to_vec();
        true
    }
}

/// The request body with the upload's bounds: it ends in an error when a
/// part's header section runs past [`MAX_PART_HEADER`] ([`PartHeaders`]),
/// when nothing arrives for `idle`, or when `deadline` passes.
struct Bounded {
    inner: axum::body::BodyDataStream,
    watch: Arc<Watch>,
    headers: PartHeaders,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    total: Duration,
}

impl Bounded {
    fn fail(&self, cut: Cut) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.watch.set_cut(cut);
        Poll::Ready(Some(Err(std::io::Error::other(
            cut.answer().message().to_owned(),
        ))))
    }
}

impl Stream for Bounded {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            let total = self.total;
            return self.fail(Cut::Total(total));
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let idle = self.idle;
                self.idle_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle);
                if !self.headers.feed(&chunk) {
                    return self.fail(Cut::PartHeader);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.idle_timer.as_mut().poll(cx).is_ready() {
                    let idle = self.idle;
                    return self.fail(Cut::Idle(idle));
                }
                Poll::Pending
            }
        }
    }
}

/// The answer to a multipart failure: the bound that cut the body, or
/// what multer found.
fn multipart_error(e: multer::Error, watch: &Watch) -> ApiError {
    form_error(e, watch, None)
}

/// [`multipart_error`], naming the fields of an upload of `kind`.
fn form_error(e: multer::Error, watch: &Watch, kind: Option<Kind>) -> ApiError {
    if let Some(cut) = watch.cut() {
        return cut.answer();
    }
    match e {
        multer::Error::UnknownField { field_name } => {
            let name = field_name.unwrap_or_default();
            Error::invalid(
                name.clone(),
                format!(
                    "unknown form field {name:?}; expected file, user_id and {}",
                    kind.map_or("the upload's name", |kind| kind.name_field)
                ),
            )
            .into()
        }
        multer::Error::FieldSizeExceeded { limit, field_name } => Error::invalid(
            field_name.unwrap_or_default(),
            format!("longer than {limit} bytes"),
        )
        .into(),
        multer::Error::StreamSizeExceeded { limit } => Error::TooLarge {
            size: limit + 1,
            limit,
        }
        .into(),
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_multipart",
            format!("malformed multipart body: {other}"),
        ),
    }
}

/// What an upload stores: datasets, or code archives.
#[derive(Debug, Clone, Copy)]
struct Kind {
    /// Its layout under `users/{user_id}/`.
    upload: layout::Upload,
    /// The form field (and query parameter) naming the upload.
    name_field: &'static str,
    /// For the log.
    what: &'static str,
}

const DATASETS: Kind = Kind {
    upload: layout::Upload::Dataset,
    name_field: "dataset_name",
    what: "dataset",
};

const CODE: Kind = Kind {
    upload: layout::Upload::Code,
    name_field: "code_name",
    what: "code archive",
};

/// `POST /datasets/upload`
#[utoipa::path(
    post,
    path = "/datasets/upload",
    tag = "datasets",
    params(UploadQuery),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored under `users/{user_id}/datasets/{dataset_name}/`", body = Uploaded, links(
            ("DeleteDataset" = (operation_id = "delete", parameters(("dataset_name" = "$response.body#/dataset_name"), ("user_id" = "$response.body#/user_id")), description = "Deletes the dataset")),
        )),
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
    let stored = receive(
        &state,
        &caller,
        query.user_id,
        query.dataset_name,
        request,
        DATASETS,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            s3_uri: stored.s3_uri,
            size: stored.size,
            filename: stored.filename,
            user_id: stored.user_id,
            dataset_name: stored.name,
        }),
    ))
}

/// Names of a code upload, also as query parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CodeUploadQuery {
    /// The owner, if not a form field (with tokens, the token's user when left out).
    user_id: Option<String>,
    /// The code's name, if not a form field.
    code_name: Option<String>,
}

/// The multipart form of a code upload.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Describes the form for the OpenAPI document only.
pub struct CodeUploadForm {
    /// The code archive (zip, tar or tar.gz) holding the entrypoint.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The owner (letters, digits, `-`, `_`, `.`).
    user_id: Option<String>,
    /// The code's name (letters, digits, `-`, `_`, `.`).
    code_name: Option<String>,
}

/// `POST /code/upload`: a code archive for `python` jobs (their
/// `config.code_s3_uri`), stored under `users/{user_id}/code/{code_name}/`
/// with every bound of a dataset upload. Only its owner's jobs may name it.
#[utoipa::path(
    post,
    path = "/code/upload",
    tag = "datasets",
    params(CodeUploadQuery),
    request_body(content = CodeUploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored under `users/{user_id}/code/{code_name}/`", body = UploadedCode),
        crate::openapi::CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn upload_code(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<CodeUploadQuery>,
    request: Request,
) -> Result<(StatusCode, Json<UploadedCode>), ApiError> {
    let stored = receive(
        &state,
        &caller,
        query.user_id,
        query.code_name,
        request,
        CODE,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(UploadedCode {
            s3_uri: stored.s3_uri,
            size: stored.size,
            filename: stored.filename,
            user_id: stored.user_id,
            code_name: stored.name,
        }),
    ))
}

/// What an upload stored.
struct Stored {
    s3_uri: String,
    size: u64,
    filename: String,
    user_id: String,
    name: String,
}

/// Streams a multipart upload of `kind` into the store, bounded in every way.
async fn receive(
    state: &AppState,
    caller: &Caller,
    user_id: Option<String>,
    name: Option<String>,
    request: Request,
    kind: Kind,
) -> Result<Stored, ApiError> {
    if state.auth == AuthMode::Tokens {
        state.limits.check_upload(&caller.principal().user_id)?;
    }
    let _under_way = state.limits.start_upload(&caller.principal().user_id)?;
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
    let boundary = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_multipart",
                "expected Content-Type: multipart/form-data with a boundary",
            )
        })?;
    let settings = state.limits.settings();
    let watch = Arc::new(Watch::default());
    let body = Bounded {
        inner: request.into_body().into_data_stream(),
        watch: watch.clone(),
        headers: PartHeaders::new(&boundary, MAX_PART_HEADER),
        idle: settings.upload_idle,
        idle_timer: Box::pin(tokio::time::sleep(settings.upload_idle)),
        deadline: Box::pin(tokio::time::sleep(settings.upload_total)),
        total: settings.upload_total,
    };
    let constraints = multer::Constraints::new()
        .allowed_fields(vec!["file", "user_id", kind.name_field])
        .size_limit(
            multer::SizeLimit::new()
                .whole_stream(limit.saturating_add(FORM_OVERHEAD))
                .per_field(limit)
                .for_field("user_id", MAX_TEXT_FIELD as u64)
                .for_field(kind.name_field, MAX_TEXT_FIELD as u64),
        );
    let mut multipart = multer::Multipart::with_constraints(body, boundary, constraints);

    let mut user_id = user_id;
    let mut dataset_name = name;
    let mut staged: Option<(BlobKey, String, ObjectMeta)> = None;
    let mut form_names = std::collections::HashSet::new();
    let result = async {
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| form_error(e, &watch, Some(kind)))?
        {
            let name = field.name().unwrap_or_default().to_owned();
            // A name given twice is ambiguous (found by schemathesis, which
            // sends a list as repeated fields): refused, not last-one-wins.
            if (name == "user_id" || name == kind.name_field) && !form_names.insert(name.clone()) {
                return Err(Error::invalid(name, "given more than once").into());
            }
            match name.as_str() {
                "user_id" => user_id = Some(text(&mut field, "user_id", &watch).await?),
                other if other == kind.name_field => {
                    dataset_name = Some(text(&mut field, kind.name_field, &watch).await?)
                }
                "file" => {
                    if staged.is_some() {
                        return Err(Error::invalid("file", "send exactly one file").into());
                    }
                    let filename = safe_file_name(field.file_name());
                    let key = layout::staging_key();
                    let meta = stream_field(state, &key, &mut field, limit, &watch).await?;
                    staged = Some((key, filename, meta));
                }
                other => {
                    return Err(Error::invalid(
                        other.to_owned(),
                        format!(
                            "unknown form field {other:?}; expected file, user_id and {}",
                            kind.name_field
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
            .ok_or_else(|| Error::invalid(kind.name_field, "is required"))?;
        validate_name("user_id", &user_id)?;
        validate_name(kind.name_field, &dataset_name)?;
        let key = layout::upload_key(&user_id, kind.upload, &dataset_name, filename)?;
        state.blobs.copy(staging, &key).await?;
        let meta = state.blobs.head(&key).await?;
        Ok::<_, ApiError>(Stored {
            s3_uri: state.blobs.uri(&key),
            size: meta.size,
            filename: filename.clone(),
            user_id,
            name: dataset_name,
        })
    }
    .await;

    if let Some((staging, _, _)) = &staged
        && let Err(e) = state.blobs.delete(staging).await
    {
        tracing::warn!(key = %staging.as_str(), error = %error_chain(&e), "could not remove a staged upload");
    }
    let uploaded = result?;
    tracing::info!(uri = %uploaded.s3_uri, size = uploaded.size, "{} uploaded", kind.what);
    Ok(uploaded)
}

/// Query of `DELETE /datasets/{dataset_name}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteDatasetQuery {
    /// The owner (with tokens, the token's user when left out).
    user_id: Option<String>,
}

/// `DELETE /datasets/{dataset_name}`: deletes the dataset (every object
/// under its prefix, `users/{user_id}/datasets/{dataset_name}/`). 409 while
/// a job that is queued, running or being cancelled names it (cancel it, or
/// wait for it, first); 404 for a dataset that is not there or not the
/// caller's.
#[utoipa::path(
    delete,
    path = "/datasets/{dataset_name}",
    tag = "datasets",
    params(
        ("dataset_name" = String, Path, description = "The dataset's name"),
        DeleteDatasetQuery,
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "A job under way names it", body = vtp_core::api::ErrorBody),
        crate::openapi::CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(dataset_name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteDatasetQuery>,
) -> Result<StatusCode, ApiError> {
    let user_id = match query.user_id {
        Some(user_id) => user_id,
        None if state.auth == AuthMode::Tokens => caller.principal().user_id.clone(),
        None => return Err(Error::invalid("user_id", "is required").into()),
    };
    validate_name("user_id", &user_id)?;
    validate_name("dataset_name", &dataset_name)?;
    let what = format!("{user_id}/{dataset_name}");
    if !caller.principal().may_access(&user_id) {
        return Err(Error::not_found("dataset", what).into());
    }
    let prefix = layout::upload_prefix(&user_id, layout::Upload::Dataset, &dataset_name)?;
    let objects = state.blobs.list(Some(&prefix)).await?;
    if objects.is_empty() {
        return Err(Error::not_found("dataset", what).into());
    }
    for status in [JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling] {
        let filter = JobFilter::new()
            .with_status(status)
            .with_page(JobFilter::MAX_LIMIT, 0);
        let mut pages = JobPages::new(state.jobs.as_ref(), filter);
        while let Some(page) = pages.next().await? {
            if let Some(job) = page.iter().find(|job| {
                // The dataset's prefix itself, or any key below it.
                state
                    .blobs
                    .key_for(&job.dataset_s3_uri)
                    .is_ok_and(|key| key.strip_prefix(&prefix).is_some())
            }) {
                return Err(Error::conflict(format!(
                    "job {} is {} on dataset {what}; cancel it or wait for it to finish first",
                    job.id, job.status
                ))
                .into());
            }
        }
    }
    for object in objects {
        match state.blobs.delete(&object.key).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(dataset = %what, "dataset deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A short text field.
async fn text(
    field: &mut multer::Field<'_>,
    name: &str,
    watch: &Watch,
) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, watch))? {
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
    field: &mut multer::Field<'_>,
    limit: u64,
    watch: &Watch,
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
                let answer = multipart_error(e, watch);
                let _ = tx
                    .send(Err(Error::invalid("file", answer.message().to_owned())))
                    .await;
                failure = Some(answer);
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
    use super::{PartHeaders, safe_file_name};

    fn form(header: &str) -> Vec<u8> {
        format!(
            "--XB\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\nalice\r\n\
             --XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{header}\"\r\n\r\n\
             \r\n\r\n....data without end....\r\n--XB--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn part_headers_are_measured_across_chunks() {
        let ok = form("digits.zip");
        // Whole, and split at every byte: the markers span chunk edges.
        for split in 0..ok.len() {
            let mut measure = PartHeaders::new("XB", 100);
            assert!(
                measure.feed(&ok[..split]) && measure.feed(&ok[split..]),
                "split at {split}"
            );
        }
        let long = form(&"a".repeat(200));
        let mut measure = PartHeaders::new("XB", 100);
        assert!(!measure.feed(&long), "a long header is refused");
        // A header that never ends is refused once past the limit, however
        // it is sent.
        let mut measure = PartHeaders::new("XB", 100);
        assert!(measure.feed(b"--XB\r\nContent-Disposition: form-data; filename=\""));
        let mut refused = false;
        for _ in 0..10 {
            if !measure.feed(b"aaaaaaaaaaaaaaaaaaaa") {
                refused = true;
                break;
            }
        }
        assert!(refused);
        // File data, however long, is no header.
        let mut measure = PartHeaders::new("XB", 100);
        assert!(measure.feed(&form("x.zip")[..60]));
        for _ in 0..1000 {
            assert!(measure.feed(&[7u8; 512]));
        }
    }

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
