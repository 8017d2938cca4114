//! The OpenAPI documents: generated from the handlers, committed under
//! `docs/`, served at `/openapi.json` and rendered at `/docs`.
//!
//! When a route or a wire type changes, regenerate the committed copies:
//!
//! ```sh
//! VTP_UPDATE_OPENAPI=1 cargo test -p vtp-server --all-features --test openapi
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vtp_server::AppState;
use vtp_storage::{ObjectStoreBlobStore, Stores};

fn committed(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name)
}

/// Fails when `docs/{name}` is not `document` as generated now.
fn check_committed(name: &str, document: &impl serde::Serialize) {
    let generated = format!("{}\n", serde_json::to_string_pretty(document).unwrap());
    let path = committed(name);
    if std::env::var_os("VTP_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/{name} differs from the document the code generates; if the change is \
         meant, regenerate it: VTP_UPDATE_OPENAPI=1 cargo test -p vtp-server --all-features --test openapi"
    );
}

#[test]
fn the_committed_backend_document_is_the_generated_one() {
    let document = vtp_server::openapi::document();
    assert!(document.openapi == utoipa::openapi::OpenApiVersion::Version31);
    check_committed("openapi.json", &vtp_server::openapi::document_json());
}

/// The trainer service's document needs no libtorch to generate.
#[test]
fn the_committed_trainer_document_is_the_generated_one() {
    check_committed(
        "trainer-openapi.json",
        &vtp_trainer::service::http::trainer_document(),
    );
}

#[test]
fn the_document_names_every_field_the_seeds_clients_send() {
    let json = serde_json::to_value(vtp_server::openapi::document()).unwrap();
    let schemas = &json["components"]["schemas"];
    // The seed's create body and its trainer's report.
    for field in [
        "user_id",
        "model_name",
        "framework",
        "dataset_s3_uri",
        "config",
    ] {
        assert!(
            schemas["NewJob"]["properties"][field].is_object(),
            "NewJob.{field}"
        );
    }
    for field in [
        "job_id",
        "status",
        "progress",
        "message",
        "metrics",
        "checkpoint_s3_uri",
        "error",
        "seq",
    ] {
        assert!(
            schemas["TrainingUpdate"]["properties"][field].is_object(),
            "TrainingUpdate.{field}"
        );
    }
    // Every hyperparameter, with its meaning, from the TrainConfig the
    // trainer reads.
    for field in ["epochs", "batch_size", "lr", "image_size", "mosaic", "box"] {
        let property = &schemas["TrainConfig"]["properties"][field];
        assert!(
            property["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "TrainConfig.{field}: {property}"
        );
    }
    assert!(
        json["paths"]["/training/jobs"]["post"]["requestBody"].is_object(),
        "the create route takes a body"
    );
}

async fn get(app: &axum::Router, uri: &str) -> (StatusCode, String, String) {
    let response = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn the_backend_serves_its_document_and_renders_it_at_docs() {
    let state = AppState::new(
        Stores::memory(),
        Arc::new(ObjectStoreBlobStore::in_memory()),
        Arc::new(vtp_launch::HttpLauncher::new("http://127.0.0.1:9").unwrap()),
        "http://127.0.0.1:8000",
    );
    let app = vtp_server::app(state);

    let (status, content_type, body) = get(&app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served, vtp_server::openapi::document_json());

    // Swagger UI, built into the binary: the page, its script and style,
    // and the initializer pointing it at /openapi.json.
    let (status, _, page) = get(&app, "/docs/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("swagger-ui"), "{page}");
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        assert!(page.contains(asset), "the page loads {asset}");
        let (status, _, body) = get(&app, &format!("/docs/{asset}")).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
        assert!(body.len() > 100, "{asset} is {} bytes", body.len());
        if asset == "swagger-initializer.js" {
            assert!(body.contains("/openapi.json"), "{body}");
        }
    }
}
