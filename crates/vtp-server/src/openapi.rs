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

/// The document of the backend, as utoipa builds it. Serve
/// [`document_json`], which spells its links as OpenAPI does.
pub fn document() -> utoipa::openapi::OpenApi {
    crate::routes_with_docs().split_for_parts().1
}

/// The document of the backend as [`crate::app`] serves it at
/// `/openapi.json`: [`document`] as JSON, with its response links spelled
/// as OpenAPI spells them.
pub fn document_json() -> serde_json::Value {
    served_json(&document())
}

/// `document` as JSON, with its response links spelled as OpenAPI spells
/// them (see [`document_json`]).
pub(crate) fn served_json(document: &utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut json = serde_json::to_value(document).expect("the document serializes");
    camel_case_links(&mut json);
    json
}

/// utoipa 5.5 writes a Link Object's fields in Rust's spelling
/// (`operation_id`, `operation_ref`, `request_body`), which no OpenAPI tool
/// reads: Schemathesis refuses such links as naming no operation. This
/// renames them under every response's `links` to `operationId`,
/// `operationRef` and `requestBody`.
fn camel_case_links(json: &mut serde_json::Value) {
    let Some(paths) = json.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let links = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        for (from, to) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(from) {
                link.insert(to.to_owned(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_operations_the_document_has() {
        let json = document_json();
        let mut ids = std::collections::BTreeSet::new();
        for item in json["paths"].as_object().unwrap().values() {
            for operation in item.as_object().unwrap().values() {
                if let Some(id) = operation["operationId"].as_str() {
                    ids.insert(id.to_owned());
                }
            }
        }
        let mut links = 0;
        for item in json["paths"].as_object().unwrap().values() {
            for operation in item.as_object().unwrap().values() {
                let Some(responses) = operation["responses"].as_object() else {
                    continue;
                };
                for link in responses
                    .values()
                    .filter_map(|r| r["links"].as_object())
                    .flat_map(|l| l.values())
                {
                    links += 1;
                    let target = link["operationId"].as_str().unwrap_or_default();
                    assert!(ids.contains(target), "{link}");
                    assert!(link.get("operation_id").is_none(), "{link}");
                }
            }
        }
        assert!(
            links >= 8,
            "a created job and an upload link onwards: {links}"
        );
    }

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
