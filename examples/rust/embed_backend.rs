//! The VTP backend inside another axum application: the host service
//! keeps its own routes and mounts the training API under `/vtp`, on its
//! own stores (here SQLite and a local directory, as the embedded defaults
//! use), with trainers reached over HTTP.
//!
//! The example serves on a free loopback port, calls both its own route
//! and the mounted API, and exits.
//!
//! ```sh
//! cargo run -p vtp-examples --example embed_backend
//! ```

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use vtp_core::api::Health;
use vtp_core::{Job, JobStatus};
use vtp_launch::HttpLauncher;
use vtp_server::AppState;
use vtp_storage::BlobStoreBuilder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);

    // The backend's three parts: where jobs live, where blobs live, and
    // how trainers are started.
    let stores =
        vtp_storage::connect_stores(&format!("sqlite://{}/jobs.db", work.path().display())).await?;
    let blobs_uri = format!("file://{}", work.path().join("blobs").display());
    let blobs = BlobStoreBuilder::new()
        .with_url(blobs_uri.clone())
        .build()?;
    let launcher = HttpLauncher::new("http://127.0.0.1:8001")?;
    // Trainers call back under the mount point.
    let state = AppState::new(stores, blobs, Arc::new(launcher), format!("{base}/vtp"));

    let app = Router::new()
        .route("/", get(|| async { "the host application's own page" }))
        .nest("/vtp", vtp_server::app(state));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::new();
    let own = http.get(format!("{base}/")).send().await?.text().await?;
    println!("GET /            -> {own}");

    let health: Health = http
        .get(format!("{base}/vtp/health"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "GET /vtp/health  -> {} (database {}, blobs at {})",
        health.status,
        health.database.as_deref().unwrap_or("?"),
        health.blob_store.as_deref().unwrap_or("?")
    );

    // The seed's create body; the answer is the typed Job of vtp-core.
    let job: Job = http
        .post(format!("{base}/vtp/training/jobs"))
        .json(&serde_json::json!({
            "user_id": "host",
            "model_name": "yolo11n",
            "framework": "ultralytics",
            "dataset_s3_uri": format!("{blobs_uri}/users/host/datasets/coco/"),
            "config": {"epochs": 10, "image_size": 320},
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "POST /vtp/training/jobs -> job {} is {}",
        job.id, job.status
    );
    anyhow::ensure!(job.status == JobStatus::Pending);

    // The OpenAPI document is mounted too.
    let document: serde_json::Value = http
        .get(format!("{base}/vtp/openapi.json"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "GET /vtp/openapi.json -> {} paths",
        document["paths"]
            .as_object()
            .map_or(0, serde_json::Map::len)
    );

    server.abort();
    Ok(())
}
