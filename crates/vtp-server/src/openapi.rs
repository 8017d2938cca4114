//! The backend's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and the `vtp-core` types they take and
//! answer with; served at `/openapi.json`, rendered at `/docs`, and
//! committed at `docs/openapi.json` (a test fails when the two drift).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};
use vtp_core::api::ErrorBody;

/// Tag of the job routes.
pub const JOBS: &str = "jobs";
/// Tag of the dataset routes.
pub const DATASETS: &str = "datasets";
/// Tag of the trainers' report route.
pub const TRAINERS: &str = "trainers";
/// Tag of health and metrics.
pub const OPERATIONS: &str = "operations";

/// The document's fixed part; the paths come from the router
/// ([`crate::app`]), so a route cannot be served undocumented.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "VTP backend",
        description = "The Vision Training Platform's backend: upload datasets, create and \
                       start training jobs, receive their trainers' signed reports, read \
                       progress and per-epoch metrics, download checkpoints.\n\n\
                       With `VTP_AUTH=tokens` (the default beyond loopback) every route but \
                       `/health`, `/metrics` and the trainers' signed callback needs \
                       `Authorization: Bearer <token>`. Every failure is \
                       `{\"error\": {\"code\", \"message\", \"field\"?}}`.",
        license(name = "Apache-2.0"),
    ),
    tags(
        (name = "jobs", description = "Training jobs: create, start, list, read, cancel, metrics, checkpoints"),
        (name = "datasets", description = "Dataset uploads"),
        (name = "trainers", description = "Reports from trainers, signed with the job's secret"),
        (name = "operations", description = "Health and Prometheus metrics"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
)]
pub struct BackendApi;

/// Declares the `bearer` scheme the routes' `security` names.
#[derive(Debug)]
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token made with `vtp-backend token create`; needed when the \
                         backend runs with `VTP_AUTH=tokens`",
                    ))
                    .build(),
            ),
        );
    }
}

/// Bytes of a file, streamed (`application/octet-stream`).
#[derive(Debug, utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(pub Vec<u8>);

/// The failures any authenticated route may answer with, beside its own.
#[derive(Debug, IntoResponses)]
pub enum CommonErrors {
    /// Malformed JSON or request.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid token (with `VTP_AUTH=tokens`).
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// Another user's object.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object (or not the caller's).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The body is larger than the route takes.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not of the media type the route takes.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// A field is wrong; `error.field` names it.
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// Too many requests; `Retry-After` says when to try again.
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// A dependency (the database, the blob store, a trainer) is down;
    /// retry after `Retry-After`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The document of the backend, as [`crate::app`] serves it.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::routes_with_docs().split_for_parts().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_tagged_and_answers_errors_with_the_error_shape() {
        let doc = document();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                ("get", &item.get),
                ("post", &item.post),
                ("delete", &item.delete),
            ] {
                let Some(operation) = operation else { continue };
                operations += 1;
                assert!(
                    operation.tags.as_ref().is_some_and(|t| !t.is_empty()),
                    "{method} {path} has no tag"
                );
                let json = serde_json::to_value(&operation.responses).unwrap();
                let responses = json.get("responses").unwrap_or(&json).as_object().unwrap();
                for (status, response) in responses {
                    // `/health` answers its degraded state as a Health body.
                    let failure = status.starts_with('4') || status.starts_with('5');
                    if failure && path != "/health" {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        assert!(operations >= 11, "{operations} operations");
    }
}
