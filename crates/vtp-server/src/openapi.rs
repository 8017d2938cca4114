//! The backend's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and the `vtp-core` types they take and
//! answer with; served at `/openapi.json`, rendered at `/docs`, and
//! committed at `docs/openapi.json` (a test fails when the two drift).

use utoipa::OpenApi;
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

pub use vtp_http::openapi::{BearerAuth, Binary, CommonErrors};

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
