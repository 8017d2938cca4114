//! HTTP errors: every failure is `{"error": {"code", "message", "field"?}}`
//! with a status that says whose fault it is.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use vtp_core::Error;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// Names the offending field.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }
}

pub use vtp_core::error_chain;

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, code) = vtp_core::api::error_status(&err);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %error_chain(&err), "request failed");
        }
        let field = match &err {
            Error::InvalidInput { field, .. } => Some(field.clone()),
            _ => None,
        };
        let retry_after = match &err {
            Error::RateLimited { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            Error::Unavailable { .. } => Some(1),
            _ => None,
        };
        ApiError {
            status,
            code,
            message: error_chain(&err),
            field,
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = vtp_core::api::ErrorBody {
            error: vtp_core::api::ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON body whose errors name the field: malformed JSON is a 400,
/// well-formed JSON of the wrong shape (unknown or missing field, wrong type)
/// a 422.
///
/// The body must say it is JSON (`Content-Type: application/json`, or an
/// `application/*+json`); anything else, a missing header included, is a
/// 415. A web page can send another site a form or `text/plain` body
/// without asking, but not `application/json`: so no page a user opens can
/// make JSON requests to a local backend on the user's behalf.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime::Mime>().ok())
            .is_some_and(|m| {
                m.type_() == mime::APPLICATION
                    && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserializes `bytes`, naming the failing field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." {
                    backticked(&inner.to_string())
                } else {
                    Some(path)
                };
                let message = match &field {
                    Some(field) => format!("invalid {field}: {inner}"),
                    None => inner.to_string(),
                };
                let error =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", message);
                match field {
                    Some(field) => error.with_field(field),
                    None => error,
                }
            }
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("malformed JSON: {inner}"),
            ),
        }
    })?;
    deserializer.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("malformed JSON: {e}"),
        )
    })?;
    Ok(value)
}

/// The first `` `name` `` in serde's messages ("unknown field `foo`, expected ...").
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// Query parameters with [`ApiError`] rejections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                let text = e.body_text();
                let field = backticked(&text).unwrap_or_else(|| "query".to_owned());
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", text)
                    .with_field(field)
            })
    }
}

/// Path parameters with [`ApiError`] rejections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_input",
                    e.body_text(),
                )
                .with_field("path")
            })
    }
}

/// Answers every 5xx with a generic message and the request id instead of
/// the cause (a database host, a bucket, a stack of errors): the cause is
/// logged with that id, and the client quotes the id.
pub async fn hide_server_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_owned();
    let response = next.run(request).await;
    if !response.status().is_server_error() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !original["error"].is_object() && !bytes.is_empty() && original.is_object() {
        // A designed answer (`/health` degraded), not an error: kept.
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let code = original["error"]["code"]
        .as_str()
        .unwrap_or("internal")
        .to_owned();
    tracing::warn!(
        %request_id,
        status = parts.status.as_u16(),
        cause = %original["error"]["message"].as_str().unwrap_or_else(|| std::str::from_utf8(&bytes).unwrap_or("")),
        "answered a server error"
    );
    let message = match parts.status {
        StatusCode::SERVICE_UNAVAILABLE => {
            "a service the platform depends on is unavailable; try again"
        }
        StatusCode::BAD_GATEWAY => "a service the platform depends on refused the request",
        StatusCode::GATEWAY_TIMEOUT => "a service the platform depends on timed out",
        _ => "internal error",
    };
    let body = serde_json::json!({"error": {
        "code": code,
        "message": format!("{message} (request id {request_id}; the cause is in the server log)"),
        "request_id": request_id,
    }});
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        epochs: u32,
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse_json::<Body>(br#"{"name": "a", "inner": {"epochs": "x"}}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(err.field.as_deref(), Some("inner.epochs"));

        let err = parse_json::<Body>(br#"{"name": "a", "inner": {"epochs": 1}, "colour": 1}"#)
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("colour"), "{err:?}");

        let err = parse_json::<Body>(br#"{"inner": {"epochs": 1}}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("name"), "{err:?}");

        let err = parse_json::<Body>(br#"{"name": "a", "#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err =
            parse_json::<Body>(br#"{"name": "a", "inner": {"epochs": 1}} trailing"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn domain_errors_map_to_statuses() {
        let cases = [
            (Error::not_found("job", "x"), StatusCode::NOT_FOUND),
            (Error::conflict("terminal"), StatusCode::CONFLICT),
            (
                Error::invalid("config", "bad"),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                Error::TooLarge { size: 2, limit: 1 },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                Error::unavailable("database", "down"),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::backend("trainer", "refused"),
                StatusCode::BAD_GATEWAY,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(ApiError::from(err).status, status);
        }
        let err = ApiError::from(Error::unavailable("database", "connection refused"));
        assert_eq!(err.message, "database unavailable: connection refused");
    }
}
