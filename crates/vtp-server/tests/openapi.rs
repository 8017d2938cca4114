//! The OpenAPI documents: generated from the handlers, committed under
//! `docs/`, served at `/openapi.json` and rendered at `/docs`.
//!
//! The Python package's wire types (`crates/vtp-py/python/vtp/_schema.py`,
//! `TypedDict`s that type `vtp.Job.data` and the client's answers) are
//! generated from the same document here, so Python reads exactly the
//! fields the backend writes.
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
    check_file(committed(name), &generated);
}

/// Fails when the file at `path` does not hold `generated` (or writes it,
/// with `VTP_UPDATE_OPENAPI` set).
fn check_file(path: PathBuf, generated: &str) {
    let name = path.display().to_string();
    if std::env::var_os("VTP_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, generated).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{name} differs from what the code generates; if the change is \
         meant, regenerate it: VTP_UPDATE_OPENAPI=1 cargo test -p vtp-server --all-features --test openapi"
    );
}

#[test]
fn the_committed_backend_document_is_the_generated_one() {
    let document = vtp_server::openapi::document();
    assert!(document.openapi == utoipa::openapi::OpenApiVersion::Version31);
    check_committed("openapi.json", &vtp_server::openapi::document_json());
}

#[test]
fn the_python_packages_wire_types_are_generated_from_the_document() {
    let python = python_types(&vtp_server::openapi::document_json());
    // Every answer the Python client types is among them.
    for class in [
        "class Job(",
        "class JobPage(",
        "class JobEvent(",
        "class Health(",
    ] {
        assert!(python.contains(class), "{class}");
    }
    assert!(python.contains("JobStatus = Literal["), "{python}");
    check_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vtp-py/python/vtp/_schema.py"),
        &python,
    );
}

/// The components of the OpenAPI `document` as Python: an enum is a
/// `Literal` alias, an object with named fields a `TypedDict` (its optional
/// fields in a `total=False` subclass, as Python 3.10 has no
/// `NotRequired`), an open object or a scalar an alias.
fn python_types(document: &serde_json::Value) -> String {
    use std::fmt::Write;
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("the document has component schemas");
    let mut out = String::from(
        "\"\"\"The backend's wire types, generated from its OpenAPI document: do not edit.\n\n\
         Regenerate with ``VTP_UPDATE_OPENAPI=1 cargo test -p vtp-server --all-features\n\
         --test openapi`` (see ``crates/vtp-server/tests/openapi.rs``).\n\"\"\"\n\n\
         from __future__ import annotations\n\n\
         from typing import Any, Literal, TypedDict\n",
    );
    let is_class = |schema: &serde_json::Value| {
        schema["properties"].is_object() && !schema["additionalProperties"].is_object()
    };
    // Aliases first: they are evaluated when the module loads.
    for (name, schema) in schemas.iter().filter(|(_, schema)| !is_class(schema)) {
        let _ = write!(
            out,
            "\n{}{name} = {}\n",
            comment(schema, ""),
            python_type(schema)
        );
    }
    for (name, schema) in schemas.iter().filter(|(_, schema)| is_class(schema)) {
        let properties = schema["properties"].as_object().expect("an object");
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|names| names.iter().filter_map(|n| n.as_str()).collect())
            .unwrap_or_default();
        let fields = |want_required: bool| {
            let mut body = String::new();
            for (field, property) in properties {
                if required.contains(&field.as_str()) == want_required {
                    let _ = writeln!(
                        body,
                        "{}    {field}: {}",
                        comment(property, "    "),
                        python_type(property)
                    );
                }
            }
            body
        };
        let (always, optional) = (fields(true), fields(false));
        let doc = format!("    \"\"\"{}\"\"\"\n\n", first_sentence(schema));
        let _ = match (always.is_empty(), optional.is_empty()) {
            (false, false) => write!(
                out,
                "\n\nclass _{name}Required(TypedDict):\n{always}\n\n\
                 class {name}(_{name}Required, total=False):\n{doc}{optional}"
            ),
            (false, true) => write!(out, "\n\nclass {name}(TypedDict):\n{doc}{always}"),
            (true, _) => write!(
                out,
                "\n\nclass {name}(TypedDict, total=False):\n{doc}{optional}"
            ),
        };
    }
    out
}

/// The first sentence of a schema's description, on one line.
fn first_sentence(schema: &serde_json::Value) -> String {
    let text = schema["description"]
        .as_str()
        .unwrap_or_default()
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .replace('\n', " ");
    let end = text.find(". ").map_or(text.len(), |at| at + 1);
    text[..end].replace('\\', "\\\\").replace("\"\"\"", "'''")
}

/// `#: <first sentence>` on a line of its own, indented, where the schema
/// has a description.
fn comment(schema: &serde_json::Value, indent: &str) -> String {
    let sentence = first_sentence(schema);
    if sentence.is_empty() {
        String::new()
    } else {
        format!("{indent}#: {sentence}\n")
    }
}

/// The Python type of a schema.
fn python_type(schema: &serde_json::Value) -> String {
    if let Some(reference) = schema["$ref"].as_str() {
        return reference.rsplit('/').next().unwrap_or("Any").to_owned();
    }
    if let Some(values) = schema["enum"].as_array() {
        let names: Vec<String> = values.iter().map(|value| value.to_string()).collect();
        return format!("Literal[{}]", names.join(", "));
    }
    if let Some(members) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let mut types: Vec<String> = members.iter().map(python_type).collect();
        types.dedup();
        return types.join(" | ");
    }
    match &schema["type"] {
        serde_json::Value::String(kind) => scalar(kind, schema),
        serde_json::Value::Array(kinds) => kinds
            .iter()
            .filter_map(|kind| kind.as_str())
            .map(|kind| scalar(kind, schema))
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "Any".to_owned(),
    }
}

/// The Python type of one JSON Schema `type` of `schema`.
fn scalar(kind: &str, schema: &serde_json::Value) -> String {
    match kind {
        "string" if schema["format"] == "binary" => "bytes".to_owned(),
        "string" => "str".to_owned(),
        "integer" => "int".to_owned(),
        "number" => "float".to_owned(),
        "boolean" => "bool".to_owned(),
        "null" => "None".to_owned(),
        "array" => format!("list[{}]", python_type(&schema["items"])),
        "object" => match &schema["additionalProperties"] {
            // Named fields and more: their types differ, so only `Any` holds them all.
            _ if schema["properties"].is_object() => "dict[str, Any]".to_owned(),
            serde_json::Value::Object(_) => {
                format!(
                    "dict[str, {}]",
                    python_type(&schema["additionalProperties"])
                )
            }
            _ => "dict[str, Any]".to_owned(),
        },
        _ => "Any".to_owned(),
    }
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
            schemas["TrainingReport"]["properties"][field].is_object(),
            "TrainingReport.{field}"
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
