//! Handler tests: `app(state).oneshot(request)` over in-memory stores and the
//! trainer double. Every route, and every bad input the issue names.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use vtp_core::{
    BackoffConfig, BlobKey, BlobStore, BlobStoreExt, CredentialStore, JobStatus, JobStore,
    JobStoreExt, RetryConfig, TrainingReport,
};
use vtp_launch::HttpLauncher;
use vtp_server::{AppState, app};
use vtp_storage::{ObjectStoreBlobStore, Stores};
use vtp_trainer::testing::TrainerDouble;

struct Harness {
    app: Router,
    state: AppState,
    jobs: Arc<dyn JobStore>,
    credentials: Arc<dyn CredentialStore>,
    blobs: Arc<dyn BlobStore>,
    trainer: TrainerDouble,
}

fn fast_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            base: 2.0,
        },
        timeout: Duration::from_secs(5),
    }
}

/// The state and a harness over it: in-memory stores, the trainer double.
async fn state_and_harness(limit: u64) -> (AppState, Harness) {
    let stores = Stores::memory();
    let (jobs, credentials) = (stores.jobs.clone(), stores.credentials.clone());
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let trainer = TrainerDouble::start().await;
    let launcher = Arc::new(
        HttpLauncher::new(&trainer.url())
            .unwrap()
            .with_retry(fast_retry())
            .with_slots(Some(100)),
    );
    let state = AppState::new(stores, blobs.clone(), launcher, "http://backend.test:8000/")
        .with_max_upload_bytes(limit);
    let harness = Harness {
        app: app(state.clone()),
        state: state.clone(),
        jobs,
        credentials,
        blobs,
        trainer,
    };
    (state, harness)
}

async fn harness_with_limit(limit: u64) -> Harness {
    state_and_harness(limit).await.1
}

async fn harness() -> Harness {
    harness_with_limit(64 * 1024 * 1024).await
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

fn json_request(method: &str, uri: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn raw_json(method: &str, uri: &str, body: &'static str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn empty(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap()
}

/// The seed's job body.
fn seed_job(dataset: &str) -> Value {
    json!({"user_id": "test", "model_name": "yolo11n", "framework": "ultralytics", "dataset_s3_uri": dataset})
}

async fn create(h: &Harness, body: &Value) -> Value {
    let (status, job) = send(&h.app, json_request("POST", "/training/jobs", body)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    job
}

/// A job whose dataset exists in the store.
async fn startable_job(h: &Harness) -> Value {
    let key = BlobKey::parse("users/test/datasets/digits/digits.zip").unwrap();
    h.blobs
        .put_bytes(&key, Bytes::from_static(b"PK fake archive"))
        .await
        .unwrap();
    let mut body = seed_job(&h.blobs.uri(&key));
    body["config"] = json!({"epochs": 3, "lr": 0.01});
    create(h, &body).await
}

/// A started job, launched by the queue's dispatcher.
async fn started_job(h: &Harness) -> String {
    let job = startable_job(h).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, body) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    dispatch(&h.state).await;
    id
}

/// One pass of the queue's dispatcher (what the leader runs); how many
/// jobs it launched.
async fn dispatch(state: &AppState) -> usize {
    vtp_server::queue::dispatch_once(state, &vtp_server::queue::Policy::default())
        .await
        .unwrap()
}

/// A trainer report signed with the job's secret, as a trainer sends it.
async fn report(h: &Harness, id: &str, body: Value) -> (StatusCode, Value) {
    let secret = h
        .credentials
        .job_secret(id.parse().unwrap())
        .await
        .unwrap()
        .expect("a started job has a callback secret");
    let bytes = body.to_string();
    let mut request = json_request("POST", &format!("/training/jobs/{id}/callback"), &body);
    for (name, value) in secret
        .headers(&format!("{id}-test"), bytes.as_bytes())
        .unwrap()
    {
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    send(&h.app, request).await
}

#[tokio::test]
async fn a_job_carries_the_seeds_callback_url_and_its_create_answers_its_location() {
    let h = harness().await;
    let response = h
        .app
        .clone()
        .oneshot(json_request(
            "POST",
            "/training/jobs",
            &seed_job("s3://b/d"),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let job: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let id = job["id"].as_str().unwrap();
    assert_eq!(location, format!("/training/jobs/{id}"));
    let callback = format!("http://backend.test:8000/training/jobs/{id}/callback");
    assert_eq!(job["callback_url"], callback.as_str(), "{job}");
    // The same on every answer that carries the job.
    let (_, read) = send(&h.app, empty("GET", &location)).await;
    assert_eq!(read["callback_url"], callback.as_str(), "{read}");
    let (_, page) = send(&h.app, empty("GET", "/training/jobs")).await;
    assert_eq!(page["jobs"][0]["callback_url"], callback.as_str(), "{page}");
    // Typed, as the client reads it.
    let typed: vtp_core::Job = serde_json::from_value(read).unwrap();
    assert_eq!(typed.callback_url.as_deref(), Some(callback.as_str()));
}

/// Found by schemathesis: the document said `offset` was an int32 (at most
/// 2^31 - 1) while the backend took any u32. The document now gives the
/// ranges the backend keeps, and both agree at the edges. (The store side of
/// the NUL below is a conformance case: `list_filters_pages_and_orders`.)
#[tokio::test]
async fn paging_parameters_are_accepted_and_refused_as_documented() {
    let h = harness().await;
    for (query, expected) in [
        ("offset=2147483648", StatusCode::OK),
        ("offset=4294967295", StatusCode::OK),
        ("offset=4294967296", StatusCode::UNPROCESSABLE_ENTITY),
        ("offset=-1", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=500", StatusCode::OK),
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY),
        // Also found by schemathesis: a NUL in `user_id` reached Postgres,
        // which cannot compare it (a 502); it is a bad name.
        ("user_id=%C3%A8+%00%066", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (status, body) = send(&h.app, empty("GET", &format!("/training/jobs?{query}"))).await;
        assert_eq!(status, expected, "{query}: {body}");
    }
    let id = startable_job(&h).await["id"].as_str().unwrap().to_owned();
    for (query, expected) in [
        ("offset=4294967295", StatusCode::OK),
        ("offset=4294967296", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=10000", StatusCode::OK),
        ("limit=10001", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (status, body) = send(
            &h.app,
            empty("GET", &format!("/training/jobs/{id}/metrics?{query}")),
        )
        .await;
        assert_eq!(status, expected, "{query}: {body}");
    }
    let document = serde_json::to_value(vtp_server::openapi::document()).unwrap();
    let offset = &document["paths"]["/training/jobs"]["get"]["parameters"][3]["schema"];
    assert_eq!(offset["maximum"], 4_294_967_295_i64, "{offset}");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_jobs_created() {
    let h = harness().await;
    let id = started_job(&h).await;
    let missing = uuid::Uuid::new_v4();
    let (status, _) = send(&h.app, empty("GET", &format!("/training/jobs/{missing}"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = h
        .app
        .clone()
        .oneshot(empty("GET", "/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for expected in [
        "vtp_jobs_created_total",
        r#"vtp_http_requests_total{method="GET",route="/training/jobs/{id}",status="404"}"#,
        r#"vtp_http_requests_total{method="POST",route="/training/jobs/{id}/start",status="202"}"#,
        r#"vtp_http_request_duration_seconds_bucket{method="POST",route="/training/jobs""#,
    ] {
        assert!(text.contains(expected), "{expected} in\n{text}");
    }
    assert!(!text.contains(&id), "job ids stay out of label values");
}

#[tokio::test]
async fn health_reports_store_and_launcher() {
    let h = harness().await;
    let (status, body) = send(&h.app, empty("GET", "/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["launcher"], "http");
}

#[tokio::test]
async fn create_and_read_the_seed_job() {
    let h = harness().await;
    let job = create(&h, &seed_job("s3://datasets/test/my-dataset/")).await;
    assert_eq!(job["status"], "pending");
    assert_eq!(
        job["config"],
        json!({}),
        "config defaults to an empty object"
    );
    let id = job["id"].as_str().unwrap();
    let (status, read) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, job);
}

#[tokio::test]
async fn bad_json_is_400_and_wrong_shape_is_422_naming_the_field() {
    let h = harness().await;
    let (status, body) = send(
        &h.app,
        raw_json("POST", "/training/jobs", r#"{"user_id": "x", "#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "malformed_json");

    let mut unknown = seed_job("s3://b/d");
    unknown["colour"] = json!("blue");
    let (status, body) = send(&h.app, json_request("POST", "/training/jobs", &unknown)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "colour");

    let (status, body) = send(
        &h.app,
        json_request("POST", "/training/jobs", &json!({"user_id": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "model_name", "{body}");

    // The catalog decides at create: an unknown model or framework, or a
    // model outside the framework's family, is a 422 naming the field.
    for (model, framework, field) in [
        ("yolo9000", "ultralytics", "model_name"),
        ("yolo11n", "keras", "framework"),
        ("resnet18", "ultralytics", "model_name"),
    ] {
        let mut body = seed_job("s3://b/d");
        body["model_name"] = json!(model);
        body["framework"] = json!(framework);
        let (status, answer) = send(&h.app, json_request("POST", "/training/jobs", &body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let mut bad_config_model = seed_job("s3://b/d");
    bad_config_model["config"] = json!({"model": "yolo9000"});
    let (status, answer) = send(
        &h.app,
        json_request("POST", "/training/jobs", &bad_config_model),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "config.model", "{answer}");
    // config.model may repeat the job's model, not contradict it.
    bad_config_model["config"] = json!({"model": "resnet18"});
    let (status, answer) = send(
        &h.app,
        json_request("POST", "/training/jobs", &bad_config_model),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model_name"),
        "{answer}"
    );

    // Every hyperparameter is checked at create, by the trainer's own
    // TrainConfig, without libtorch in this build: nothing is stored.
    for (config, field) in [
        (json!({"epocs": 3}), "config.epocs"),
        (json!({"image_size": 100}), "config.image_size"),
        (json!({"close_mosaic": -1}), "config.close_mosaic"),
    ] {
        let mut body = seed_job("s3://b/d");
        body["config"] = config.clone();
        let (status, answer) = send(&h.app, json_request("POST", "/training/jobs", &body)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{config}: {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }

    let mut wrong_type = seed_job("s3://b/d");
    wrong_type["config"] = json!([1, 2]);
    let (status, body) = send(&h.app, json_request("POST", "/training/jobs", &wrong_type)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "config", "{body}");

    let (status, _) = send(
        &h.app,
        Request::builder()
            .method("POST")
            .uri("/training/jobs")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        h.jobs
            .list(&vtp_core::JobFilter::new())
            .await
            .unwrap()
            .total,
        0,
        "nothing was stored"
    );
}

#[tokio::test]
async fn dataset_uri_must_be_s3_or_file() {
    let h = harness().await;
    for bad in [
        "http://example.com/data.zip",
        "/data/digits",
        "s3://",
        "file://relative/path",
    ] {
        let (status, body) = send(
            &h.app,
            json_request("POST", "/training/jobs", &seed_job(bad)),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "dataset_s3_uri", "{bad}: {body}");
    }
    create(&h, &seed_job("file:///data/digits")).await;
}

#[tokio::test]
async fn unknown_job_is_404_and_bad_id_is_422() {
    let h = harness().await;
    let id = vtp_core::JobId::new();
    for (method, path) in [
        ("GET", format!("/training/jobs/{id}")),
        ("POST", format!("/training/jobs/{id}/start")),
        ("DELETE", format!("/training/jobs/{id}")),
        ("GET", format!("/training/jobs/{id}/metrics")),
        ("GET", format!("/training/jobs/{id}/checkpoint")),
    ] {
        let (status, body) = send(&h.app, empty(method, &path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    // A report for a job that was never started has no secret to verify.
    let (status, _) = send(
        &h.app,
        json_request(
            "POST",
            &format!("/training/jobs/{id}/callback"),
            &json!({"status": "running"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(&h.app, empty("GET", "/training/jobs/not-a-uuid")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn list_filters_and_pages() {
    let h = harness().await;
    for user in ["alice", "alice", "alice", "bob"] {
        let mut body = seed_job("s3://b/d");
        body["user_id"] = json!(user);
        create(&h, &body).await;
    }
    let (status, page) = send(&h.app, empty("GET", "/training/jobs?user_id=alice&limit=2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 3);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2);
    let (_, rest) = send(
        &h.app,
        empty("GET", "/training/jobs?user_id=alice&limit=2&offset=2"),
    )
    .await;
    assert_eq!(rest["jobs"].as_array().unwrap().len(), 1);
    let (_, pending) = send(&h.app, empty("GET", "/training/jobs?status=pending")).await;
    assert_eq!(pending["total"], 4);
    let (_, running) = send(&h.app, empty("GET", "/training/jobs?status=running")).await;
    assert_eq!(running["total"], 0);
    let (status, body) = send(&h.app, empty("GET", "/training/jobs?status=sleeping")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = send(&h.app, empty("GET", "/training/jobs?limit=100000")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn start_checks_the_dataset_then_queues_and_the_dispatcher_launches() {
    let h = harness().await;
    // A dataset that does not exist: 422, and the job is still pending.
    let job = create(
        &h,
        &seed_job("s3://vtp-memory/users/test/datasets/missing/"),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "dataset_s3_uri");
    // A dataset outside this backend's store: 422 too.
    let job = create(&h, &seed_job("s3://someone-elses-bucket/data.zip")).await;
    let other = job["id"].as_str().unwrap();
    let (status, _) = send(
        &h.app,
        empty("POST", &format!("/training/jobs/{other}/start")),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, read) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(read["status"], "pending");
    assert!(h.trainer.started().is_empty());

    // Started: queued, first in the queue, not yet launched.
    let job = startable_job(&h).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "started");
    assert_eq!(body["job"]["status"], "queued");
    assert_eq!(body["job"]["queue_position"], 1, "{body}");
    assert!(body["job"]["queued_at"].is_string(), "{body}");
    assert!(h.trainer.started().is_empty(), "the dispatcher launches");
    // The dispatcher hands it to the launcher; it leaves the queue.
    assert_eq!(dispatch(&h.state).await, 1);
    let started = h.trainer.started();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].job_id.to_string(), id);
    assert_eq!(
        started[0].callback_url,
        format!("http://backend.test:8000/training/jobs/{id}/callback")
    );
    assert_eq!(started[0].config["model"], "yolo11n");
    assert_eq!(started[0].config["epochs"], 3);
    assert_eq!(
        started[0].dataset_bytes,
        Some(b"PK fake archive".len() as u64),
        "the launcher is told the dataset's size"
    );
    let (_, read) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(read["status"], "queued");
    assert!(read["launched_at"].is_string(), "{read}");
    assert!(read.get("queue_position").is_none(), "{read}");
    assert_eq!(dispatch(&h.state).await, 0, "launched once");

    // Starting twice is a conflict, and launches nothing.
    let (status, _) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(dispatch(&h.state).await, 0);
    assert_eq!(h.trainer.started().len(), 1);
}

#[tokio::test]
async fn the_queue_admits_jobs_to_the_launchers_slots_in_order() {
    let stores = Stores::memory();
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let trainer = TrainerDouble::start().await;
    let launcher = Arc::new(
        HttpLauncher::new(&trainer.url())
            .unwrap()
            .with_slots(Some(2)),
    );
    let state = AppState::new(stores, blobs.clone(), launcher, "http://backend.test:8000/");
    let h = Harness {
        app: app(state.clone()),
        jobs: state.jobs.clone(),
        credentials: state.credentials.clone(),
        state,
        blobs,
        trainer,
    };
    let dataset = BlobKey::parse("users/test/datasets/digits/digits.zip").unwrap();
    h.blobs
        .put_bytes(&dataset, Bytes::from_static(b"PK fake archive"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (user, priority) in [
        ("alice", 0),
        ("alice", 0),
        ("alice", 0),
        ("bob", 0),
        ("carol", 5),
    ] {
        let body = create(
            &h,
            &json!({"user_id": user, "model_name": "yolo11n", "framework": "ultralytics",
                    "dataset_s3_uri": h.blobs.uri(&dataset), "priority": priority}),
        )
        .await;
        let id = body["id"].as_str().unwrap().to_owned();
        let (status, _) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        ids.push(id);
    }
    let (_, page) = send(
        &h.app,
        empty("GET", "/training/jobs?status=queued&limit=100"),
    )
    .await;
    let place = |id: &str| {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|job| job["id"] == id)
            .unwrap()["queue_position"]
            .clone()
    };
    assert_eq!(place(&ids[4]), 1, "priority first");
    assert_eq!(place(&ids[0]), 2);
    assert_eq!(place(&ids[3]), 3, "then Bob's first, before Alice's second");
    assert_eq!(place(&ids[1]), 4);
    // Two slots: Carol's and Alice's first run; the rest wait.
    assert_eq!(dispatch(&h.state).await, 2);
    let launched: Vec<String> = h
        .trainer
        .started()
        .iter()
        .map(|s| s.job_id.to_string())
        .collect();
    assert_eq!(launched, [ids[4].clone(), ids[0].clone()]);
    assert_eq!(dispatch(&h.state).await, 0, "no slot is free");
    // Carol's ends: Bob's first goes next (Alice holds a slot already).
    report(&h, &ids[4], json!({"status": "running", "seq": 1})).await;
    report(&h, &ids[4], json!({"status": "completed", "seq": 2})).await;
    assert_eq!(dispatch(&h.state).await, 1);
    assert_eq!(
        h.trainer.started().last().unwrap().job_id.to_string(),
        ids[3]
    );
    // A waiting job cancelled leaves the queue at once, without a trainer.
    let (status, cancelled) = send(
        &h.app,
        empty("DELETE", &format!("/training/jobs/{}", ids[2])),
    )
    .await;
    assert_eq!(
        (status, &cancelled["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{cancelled}"
    );
    assert_eq!(h.trainer.started().len(), 3);
}

#[tokio::test]
async fn a_refused_launch_fails_the_job_with_the_reason() {
    let h = harness().await;
    h.trainer.fail_next(422, "unknown model yolo11n");
    let job = startable_job(&h).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(dispatch(&h.state).await, 0);
    let (_, read) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(read["status"], "failed");
    assert!(
        read["error"]
            .as_str()
            .unwrap()
            .contains("unknown model yolo11n"),
        "{read}"
    );
}

#[tokio::test]
async fn an_unreachable_trainer_leaves_the_job_waiting_until_it_is_back() {
    let h = harness().await;
    h.trainer.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let job = startable_job(&h).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(dispatch(&h.state).await, 0);
    let job_id: vtp_core::JobId = id.parse().unwrap();
    let waiting = h.jobs.get(job_id).await.unwrap();
    assert!(waiting.is_waiting(), "back in the queue: {waiting:?}");
    assert_eq!(waiting.attempt, 1, "no attempt was used up");
    assert!(
        waiting.not_before.unwrap() > chrono::Utc::now(),
        "tried again a little later"
    );
    assert_eq!(waiting.error, None);
}

#[tokio::test]
async fn callbacks_are_idempotent_and_ordered_by_seq() {
    let h = harness().await;
    let id = started_job(&h).await;
    let epoch = |seq: i64, epoch: u32, loss: f64| {
        json!({"job_id": id, "status": "running", "seq": seq, "progress": f64::from(epoch) / 3.0,
               "metrics": {"epoch": epoch, "loss": loss, "accuracy": 1.0 - loss}})
    };
    let (status, body) = report(
        &h,
        &id,
        json!({"job_id": id, "status": "running", "seq": 1, "message": "started"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], true);
    // Epoch 2 arrives before epoch 1, epoch 1 twice, epoch 3 twice.
    for (seq, e, loss) in [
        (3, 2, 0.5),
        (2, 1, 0.9),
        (2, 1, 0.9),
        (4, 3, 0.2),
        (4, 3, 0.2),
    ] {
        let (status, body) = report(&h, &id, epoch(seq, e, loss)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, job) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(job["last_seq"], 4);
    assert!(
        (job["progress"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "progress follows the newest report: {job}"
    );

    let checkpoint = BlobKey::parse(&format!("jobs/{id}/best.safetensors")).unwrap();
    h.blobs
        .put_bytes(&checkpoint, Bytes::from_static(b"weights"))
        .await
        .unwrap();
    let uri = h.blobs.uri(&checkpoint);
    let done = json!({"job_id": id, "status": "completed", "seq": 5, "progress": 1.0, "checkpoint_s3_uri": uri});
    let (status, _) = report(&h, &id, done.clone()).await;
    assert_eq!(status, StatusCode::OK);

    let (_, metrics) = send(
        &h.app,
        empty("GET", &format!("/training/jobs/{id}/metrics")),
    )
    .await;
    let metrics = metrics.as_array().unwrap();
    assert_eq!(metrics.len(), 3, "{metrics:?}");
    assert_eq!(
        metrics
            .iter()
            .map(|m| m["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(metrics[1]["loss"], 0.5);
    // Paged on request.
    let (_, page) = send(
        &h.app,
        empty(
            "GET",
            &format!("/training/jobs/{id}/metrics?limit=1&offset=1"),
        ),
    )
    .await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["epoch"], 2);
    let (status, _) = send(
        &h.app,
        empty("GET", &format!("/training/jobs/{id}/metrics?limit=100000")),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Terminal: a replay of the final report is a harmless duplicate, a new report is 409.
    let (status, body) = report(&h, &id, done).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], false);
    let (status, body) = report(
        &h,
        &id,
        json!({"status": "running", "seq": 6, "progress": 0.1}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, job) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["checkpoint_s3_uri"], uri.as_str());

    let response = h
        .app
        .clone()
        .oneshot(empty("GET", &format!("/training/jobs/{id}/checkpoint")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "7");
    assert!(
        response.headers()[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .contains("best.safetensors")
    );
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"weights")
    );

    // The files beside it download by name; anything else is refused.
    let sidecar = BlobKey::parse(&format!("jobs/{id}/best.json")).unwrap();
    h.blobs
        .put_bytes(&sidecar, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let response = h
        .app
        .clone()
        .oneshot(empty(
            "GET",
            &format!("/training/jobs/{id}/checkpoint/best.json"),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"{}")
    );
    let (status, body) = send(
        &h.app,
        empty("GET", &format!("/training/jobs/{id}/checkpoint/last.json")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not uploaded: {body}");
    for file in [
        "..%2Fsecret",
        "best.",
        "jobs.db",
        "best.a%20b",
        "first.json",
    ] {
        let (status, body) = send(
            &h.app,
            empty("GET", &format!("/training/jobs/{id}/checkpoint/{file}")),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{file}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a checkpoint file"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn reports_are_decided_on_the_stored_job_when_another_writer_changed_it() {
    let h = harness().await;
    let id = started_job(&h).await;
    let job_id: vtp_core::JobId = id.parse().unwrap();
    let running =
        |seq: i64, progress: f64| json!({"status": "running", "seq": seq, "progress": progress});
    let (status, body) = report(&h, &id, running(1, 0.1)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Another writer (a second replica, the reconciler) moves the job on
    // behind this backend, whose remembered version is now outdated.
    let direct = |update: TrainingReport| {
        let jobs = h.jobs.clone();
        async move { jobs.apply_report(job_id, &update).await.unwrap() }
    };
    direct(
        TrainingReport::new(JobStatus::Running)
            .with_seq(2)
            .with_progress(0.5),
    )
    .await;
    // A replay the outdated version would apply is a duplicate of the stored job.
    let (status, body) = report(&h, &id, running(2, 0.4)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], false);
    let (status, body) = report(&h, &id, running(3, 0.6)).await;
    assert_eq!(
        (status, &body["applied"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    direct(
        TrainingReport::new(JobStatus::Failed)
            .with_seq(4)
            .with_error("evicted"),
    )
    .await;
    // The remembered version is running; the stored job has failed.
    let (status, body) = report(&h, &id, running(5, 0.7)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, job) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(
        (&job["status"], &job["error"], &job["last_seq"]),
        (&json!("failed"), &json!("evicted"), &json!(4)),
        "{job}"
    );
    assert!(
        (job["progress"].as_f64().unwrap() - 0.6).abs() < 1e-9,
        "{job}"
    );
}

#[tokio::test]
async fn bad_callbacks_are_refused_and_change_nothing() {
    let h = harness().await;
    let id = started_job(&h).await;
    let other = vtp_core::JobId::new();
    let cases = [
        json!({"job_id": other, "status": "running"}),
        json!({"status": "running", "progress": 1.5}),
        json!({"status": "running", "metrics": {"loss": 0.3}}),
        json!({"status": "running", "metrics": {"epoch": 1.5}}),
        json!({"status": "completed", "checkpoint_s3_uri": "ftp://x/y"}),
        json!({"status": "running", "seq": 0}),
        json!({"status": "exploded"}),
        json!({"status": "running", "surprise": true}),
        // Per-class results come with the final report only, and sized
        // like the classes they name.
        json!({"status": "running", "per_class": {"metric": "accuracy",
               "classes": ["a", "b"], "values": [0.5, 1.0]}}),
        json!({"status": "completed", "per_class": {"metric": "accuracy",
               "classes": ["a", "b"], "values": [0.5]}}),
        json!({"status": "completed", "per_class": {"metric": "accuracy",
               "classes": ["a"], "values": [1.5]}}),
    ];
    for body in cases {
        let (status, answer) = report(&h, &id, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        if body.get("per_class").is_some() {
            let field = answer["error"]["field"].as_str().unwrap_or_default();
            assert!(field.starts_with("per_class"), "{answer}");
        }
    }
    let (_, job) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(job["status"], "queued");
    assert!(job["per_class"].is_null(), "{job}");
    assert_eq!(
        job["revision"], 2,
        "only the start and the launch changed the job: {job}"
    );
}

#[tokio::test]
async fn cancel_goes_through_the_trainer() {
    let h = harness().await;
    // Pending: cancelled at once.
    let job = create(&h, &seed_job("s3://b/d")).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&h.app, empty("DELETE", &format!("/training/jobs/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "cancelled");
    let (status, _) = send(&h.app, empty("DELETE", &format!("/training/jobs/{id}"))).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a cancelled job stays cancelled"
    );

    // Running: cancelling until the trainer reports.
    let id = started_job(&h).await;
    report(&h, &id, json!({"status": "running", "seq": 1})).await;
    let (status, body) = send(&h.app, empty("DELETE", &format!("/training/jobs/{id}"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelling");
    assert_eq!(h.trainer.cancelled().len(), 1);
    let (status, _) = report(
        &h,
        &id,
        json!({"status": "cancelled", "seq": 2, "message": "stopped at step 12"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, job) = send(&h.app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].is_string());

    // The trainer stops the job but its report is lost; a second cancel
    // finds nothing running (404 from the trainer) and settles the job.
    let id = started_job(&h).await;
    let (_, first) = send(&h.app, empty("DELETE", &format!("/training/jobs/{id}"))).await;
    assert_eq!(first["status"], "cancelling");
    let (_, second) = send(&h.app, empty("DELETE", &format!("/training/jobs/{id}"))).await;
    assert_eq!(
        second["status"], "cancelled",
        "the trainer said it runs nothing: {second}"
    );
}

#[tokio::test]
async fn checkpoint_of_an_unfinished_job_is_404() {
    let h = harness().await;
    let id = started_job(&h).await;
    let (status, body) = send(
        &h.app,
        empty("GET", &format!("/training/jobs/{id}/checkpoint")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("checkpoint")
    );
}

const BOUNDARY: &str = "vtp-test-boundary";

/// A multipart body with `parts` in order: (name, file name, bytes).
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file_name, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match file_name {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn upload_request(uri: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(uri)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}

async fn all_keys(blobs: &Arc<dyn BlobStore>) -> Vec<String> {
    blobs
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key.as_str().to_owned())
        .collect()
}

#[tokio::test]
async fn upload_in_the_seed_field_order() {
    let h = harness().await;
    let data = vtp_core::conformance::blob_store::pattern(3 * 1024 * 1024 + 17, 3);
    let body = multipart(&[
        ("file", Some("sample.zip"), &data),
        ("user_id", None, b"test"),
        ("dataset_name", None, b"my-dataset"),
    ]);
    let (status, answer) = send(&h.app, upload_request("/datasets/upload", body)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["s3_uri"],
        "s3://vtp-memory/users/test/datasets/my-dataset/sample.zip"
    );
    assert_eq!(answer["size"], data.len());
    let key = h.blobs.key_for(answer["s3_uri"].as_str().unwrap()).unwrap();
    assert_eq!(h.blobs.get_bytes(&key).await.unwrap(), data);
    assert_eq!(
        all_keys(&h.blobs).await,
        [key.as_str()],
        "the staging object is gone"
    );
}

#[tokio::test]
async fn upload_names_may_come_as_query_and_file_names_are_sanitised() {
    let h = harness().await;
    let body = multipart(&[("file", Some("../../etc/my set.zip"), b"abc")]);
    let (status, answer) = send(
        &h.app,
        upload_request("/datasets/upload?user_id=alice&dataset_name=digits", body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer["s3_uri"],
        "s3://vtp-memory/users/alice/datasets/digits/my_set.zip"
    );
}

#[tokio::test]
async fn bad_uploads_are_422_and_store_nothing() {
    let h = harness().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            multipart(&[("file", Some("a.zip"), b"abc"), ("user_id", None, b"test")]),
            "dataset_name",
        ),
        (
            multipart(&[("user_id", None, b"test"), ("dataset_name", None, b"d")]),
            "file",
        ),
        (
            multipart(&[
                ("file", Some("a.zip"), b"abc"),
                ("user_id", None, b"../root"),
                ("dataset_name", None, b"d"),
            ]),
            "user_id",
        ),
        (
            multipart(&[
                ("file", Some("a.zip"), b"abc"),
                ("user_id", None, b"u"),
                ("dataset_name", None, b"a/b"),
            ]),
            "dataset_name",
        ),
        (
            multipart(&[
                ("file", Some("a.zip"), b"abc"),
                ("file", Some("b.zip"), b"abc"),
                ("user_id", None, b"u"),
                ("dataset_name", None, b"d"),
            ]),
            "file",
        ),
        (
            multipart(&[("file", Some("a.zip"), b"abc"), ("owner", None, b"u")]),
            "owner",
        ),
        // Found by schemathesis: a name given twice was taken last-one-wins.
        (
            multipart(&[
                ("user_id", None, b"u"),
                ("user_id", None, b"v"),
                ("file", Some("a.zip"), b"abc"),
                ("dataset_name", None, b"d"),
            ]),
            "user_id",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = send(&h.app, upload_request("/datasets/upload", body)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    // A body that is not multipart at all.
    let (status, _) = send(
        &h.app,
        json_request("POST", "/datasets/upload", &json!({"file": "x"})),
    )
    .await;
    assert!(status.is_client_error());
    // A multipart body cut off in the middle of the file.
    let mut cut = multipart(&[
        ("user_id", None, b"u"),
        ("dataset_name", None, b"d"),
        ("file", Some("a.zip"), &[7u8; 10_000]),
    ]);
    cut.truncate(cut.len() - 5_000);
    let (status, _) = send(&h.app, upload_request("/datasets/upload", cut)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        all_keys(&h.blobs).await.is_empty(),
        "{:?}",
        all_keys(&h.blobs).await
    );
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_before_the_body_is_read() {
    let h = harness_with_limit(1024).await;
    let polled = Arc::new(AtomicBool::new(false));
    let flag = polled.clone();
    let body = futures::stream::once(async move {
        flag.store(true, Ordering::SeqCst);
        Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 4096]))
    });
    let request = Request::builder()
        .method("POST")
        .uri("/datasets/upload?user_id=u&dataset_name=d")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .header(header::CONTENT_LENGTH, "4096")
        .body(Body::from_stream(body))
        .unwrap();
    let (status, answer) = send(&h.app, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(!polled.load(Ordering::SeqCst), "the body was never read");
}

#[tokio::test]
async fn an_upload_without_length_is_cut_at_the_limit() {
    let h = harness_with_limit(64 * 1024).await;
    let body = multipart(&[
        ("user_id", None, b"u"),
        ("dataset_name", None, b"d"),
        ("file", Some("big.zip"), &vec![1u8; 200 * 1024]),
    ]);
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(8192)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let request = Request::builder()
        .method("POST")
        .uri("/datasets/upload")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let (status, answer) = send(&h.app, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(
        all_keys(&h.blobs).await.is_empty(),
        "nothing partial is left"
    );
}

#[tokio::test]
async fn recovery_readopts_held_jobs_and_requeues_lost_ones() {
    let (state, h) = state_and_harness(64 * 1024 * 1024).await;
    let jobs = h.jobs.clone();
    let held = started_job(&h).await;
    report(&h, &held, json!({"status": "running", "seq": 1})).await;
    let lost = started_job(&h).await;
    report(&h, &lost, json!({"status": "running", "seq": 1})).await;
    let cancelling = started_job(&h).await;
    send(
        &h.app,
        empty("DELETE", &format!("/training/jobs/{cancelling}")),
    )
    .await;

    // Started, but no trainer has reported on it yet.
    let waiting = started_job(&h).await;

    // The trainer restarted too and kept only the first job.
    h.trainer.forget_all();
    let held_id: vtp_core::JobId = held.parse().unwrap();
    h.trainer.hold(held_id);
    let (adopted, ended) = vtp_server::recover(&state).await.unwrap();
    assert_eq!((adopted, ended), (1, 2));
    assert_eq!(
        jobs.get(held_id).await.unwrap().status,
        vtp_core::JobStatus::Running
    );
    // The lost one goes back to `queued` for its second attempt, with the
    // reason the first ended.
    let lost = jobs.get(lost.parse().unwrap()).await.unwrap();
    assert_eq!(
        (lost.status, lost.attempt),
        (vtp_core::JobStatus::Queued, 2)
    );
    assert!(lost.attempts[0].reason.contains("backend restarted"));
    assert_eq!(
        jobs.get(cancelling.parse().unwrap()).await.unwrap().status,
        vtp_core::JobStatus::Cancelled
    );
    // The launched one no trainer holds lost no runner (none ever
    // reported): it waits to be launched again, on the same attempt.
    let waiting = jobs.get(waiting.parse().unwrap()).await.unwrap();
    assert_eq!(
        (waiting.status, waiting.attempt, waiting.launched_at),
        (vtp_core::JobStatus::Queued, 1, None)
    );
}

#[tokio::test]
async fn a_lost_attempt_is_relaunched_once_from_its_resume_point_then_backs_off() {
    let (state, h) = state_and_harness(64 * 1024 * 1024).await;
    let id = started_job(&h).await;
    let job_id: vtp_core::JobId = id.parse().unwrap();
    // The trainer stored a checkpoint set after epoch 2 and reported it.
    let set = h
        .blobs
        .uri(&BlobKey::parse(&format!("jobs/{id}/epochs/000002/last.safetensors")).unwrap());
    let (status, body) = report(
        &h,
        &id,
        json!({"status": "running", "seq": 1, "attempt": 1, "last_checkpoint_s3_uri": set}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A launched job is not launched again.
    assert_eq!(dispatch(&state).await, 0);

    // Its runner is lost: the attempt ends and the dispatcher launches
    // the next one at once, from the recorded set, with the job's secret.
    h.trainer.forget_all();
    let requeued = h.jobs.end_attempt(job_id, 1, "killed").await.unwrap();
    assert_eq!((requeued.status, requeued.attempt), (JobStatus::Queued, 2));
    assert!(requeued.is_waiting());
    assert_eq!(dispatch(&state).await, 1);
    let sent = h.trainer.started().last().unwrap().clone();
    assert_eq!(
        (sent.job_id, sent.attempt, sent.resume_from.as_deref()),
        (job_id, 2, Some(set.as_str()))
    );
    assert_eq!(
        sent.callback_secret,
        h.credentials.job_secret(job_id).await.unwrap()
    );
    assert_eq!(dispatch(&state).await, 0, "launched once");
    // Lost again at once: the next launch waits out the backoff.
    let requeued = h.jobs.end_attempt(job_id, 2, "killed again").await.unwrap();
    assert_eq!(requeued.attempt, 3);
    assert!(
        requeued.not_before.unwrap() > chrono::Utc::now() + chrono::Duration::seconds(20),
        "{:?}",
        requeued.not_before
    );
    assert_eq!(dispatch(&state).await, 0, "not again within the backoff");
    assert_eq!(h.trainer.started().len(), 2, "the start and one relaunch");
    // The first attempt reporting late changes nothing.
    let (status, body) = report(
        &h,
        &id,
        json!({"status": "failed", "seq": 5, "attempt": 1, "error": "late"}),
    )
    .await;
    assert_eq!(
        (status, &body["applied"]),
        (StatusCode::OK, &json!(false)),
        "{body}"
    );
    assert_eq!(h.jobs.get(job_id).await.unwrap().status, JobStatus::Queued);
}

/// A launcher during whose launch the job's owner cancels it: the cancel
/// found no runner yet and ended the job; the runner starts anyway.
#[derive(Debug)]
struct CancelledDuringLaunch {
    jobs: Arc<dyn JobStore>,
    started: std::sync::Mutex<Vec<vtp_core::JobId>>,
    stopped: std::sync::Mutex<Vec<vtp_core::JobId>>,
}

#[async_trait::async_trait]
impl vtp_core::TrainerLauncher for CancelledDuringLaunch {
    fn name(&self) -> &'static str {
        "cancelled-during-launch"
    }
    async fn capacity(&self) -> vtp_core::Result<vtp_core::Capacity> {
        Ok(vtp_core::Capacity::Slots(1))
    }
    async fn launch(&self, request: &vtp_core::StartTraining) -> vtp_core::Result<()> {
        let id = request.job_id;
        self.jobs
            .transition(id, JobStatus::Queued, JobStatus::Cancelling)
            .await?;
        self.jobs
            .transition(id, JobStatus::Cancelling, JobStatus::Cancelled)
            .await?;
        self.started.lock().unwrap().push(id);
        Ok(())
    }
    async fn cancel(&self, job_id: vtp_core::JobId) -> vtp_core::Result<vtp_core::CancelOutcome> {
        self.stopped.lock().unwrap().push(job_id);
        Ok(vtp_core::CancelOutcome::Signalled)
    }
    async fn is_running(&self, job_id: vtp_core::JobId) -> vtp_core::Result<bool> {
        Ok(self.started.lock().unwrap().contains(&job_id)
            && !self.stopped.lock().unwrap().contains(&job_id))
    }
}

#[tokio::test]
async fn a_cancel_racing_the_launch_stops_the_runner_the_launch_started() {
    let (_, h) = state_and_harness(64 * 1024 * 1024).await;
    let launcher = Arc::new(CancelledDuringLaunch {
        jobs: h.jobs.clone(),
        started: Default::default(),
        stopped: Default::default(),
    });
    let state = AppState::new(
        Stores {
            jobs: h.jobs.clone(),
            credentials: h.credentials.clone(),
            leader: Arc::new(vtp_core::SoleLeader),
        },
        h.blobs.clone(),
        launcher.clone(),
        "http://127.0.0.1:8000",
    );
    let app = app(state.clone());
    let job = startable_job(&h).await;
    let id = job["id"].as_str().unwrap();
    let (status, body) = send(&app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(dispatch(&state).await, 1);
    let (_, read) = send(&app, empty("GET", &format!("/training/jobs/{id}"))).await;
    assert_eq!(read["status"], "cancelled", "{read}");
    let id: vtp_core::JobId = id.parse().unwrap();
    assert_eq!(*launcher.started.lock().unwrap(), vec![id]);
    assert_eq!(
        *launcher.stopped.lock().unwrap(),
        vec![id],
        "the runner started for a cancelled job is stopped"
    );
}

/// `request` with an `Idempotency-Key`.
fn keyed(mut request: Request<Body>, key: &str) -> Request<Body> {
    request
        .headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

/// Status, `Idempotent-Replayed` header and body.
async fn send_keyed(app: &Router, request: Request<Body>) -> (StatusCode, bool, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn idempotency_keys_make_create_and_start_safe_to_retry() {
    let h = harness().await;
    let key = BlobKey::parse("users/test/datasets/digits/digits.zip").unwrap();
    h.blobs
        .put_bytes(&key, Bytes::from_static(b"PK fake archive"))
        .await
        .unwrap();
    let body = seed_job(&h.blobs.uri(&key));
    let post = |body: &Value, key: &str| keyed(json_request("POST", "/training/jobs", body), key);

    // The first create makes the job; the same request again (even many at
    // once) answers with that job, marked as replayed.
    let (status, replayed, first) = send_keyed(&h.app, post(&body, "create-1")).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{first}");
    let retries =
        futures::future::join_all((0..8).map(|_| send_keyed(&h.app, post(&body, "create-1"))))
            .await;
    for (status, replayed, again) in retries {
        assert_eq!((status, replayed), (StatusCode::CREATED, true), "{again}");
        assert_eq!(again["id"], first["id"]);
    }
    // First attempts sent together under a fresh key: one job between them
    // (the insert race itself is the next test's).
    let racing =
        futures::future::join_all((0..8).map(|_| send_keyed(&h.app, post(&body, "create-2"))))
            .await;
    let ids: std::collections::HashSet<String> = racing
        .iter()
        .map(|(status, _, job)| {
            assert_eq!(*status, StatusCode::CREATED, "{job}");
            job["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{racing:?}");
    assert_eq!(
        racing.iter().filter(|(_, replayed, _)| !replayed).count(),
        1
    );
    let page = h
        .jobs
        .list(&vtp_core::JobFilter::new().with_page(100, 0))
        .await
        .unwrap();
    assert_eq!(page.total, 2, "two keys, two jobs");

    // The same key with another body: 422 naming the header, nothing made.
    let mut other = body.clone();
    other["config"] = json!({"epochs": 9});
    let (status, _, refused) = send_keyed(&h.app, post(&other, "create-1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["error"]["field"], "Idempotency-Key");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(first["id"].as_str().unwrap()),
        "{refused}"
    );
    // Another owner's key space is their own.
    let mut theirs = body.clone();
    theirs["user_id"] = json!("someone-else");
    let (status, replayed, job) = send_keyed(&h.app, post(&theirs, "create-1")).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{job}");
    assert_ne!(job["id"], first["id"]);
    // Bad keys are refused before anything happens.
    for bad in ["", "has space", &"k".repeat(256)] {
        let mut request = json_request("POST", "/training/jobs", &body);
        request
            .headers_mut()
            .insert("idempotency-key", bad.parse().unwrap());
        let (status, _, refused) = send_keyed(&h.app, request).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad:?}: {refused}"
        );
        assert_eq!(refused["error"]["field"], "Idempotency-Key");
    }

    // Start: retried under its key, the same answer and no second launch.
    let id = first["id"].as_str().unwrap();
    let start = |key: &str| keyed(empty("POST", &format!("/training/jobs/{id}/start")), key);
    let (status, replayed, started) = send_keyed(&h.app, start("start-1")).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::ACCEPTED, false),
        "{started}"
    );
    for (status, replayed, again) in
        futures::future::join_all((0..4).map(|_| send_keyed(&h.app, start("start-1")))).await
    {
        assert_eq!((status, replayed), (StatusCode::ACCEPTED, true), "{again}");
        assert_eq!(again["job"]["id"], id);
        assert_eq!(again["status"], "started");
    }
    assert_eq!(dispatch(&h.state).await, 1);
    assert_eq!(dispatch(&h.state).await, 0);
    assert_eq!(h.trainer.started().len(), 1, "launched once");
    // Under another key, or none, it is the usual conflict.
    let (status, _, _) = send_keyed(&h.app, start("start-2")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = send(&h.app, empty("POST", &format!("/training/jobs/{id}/start"))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(h.trainer.started().len(), 1);
}

#[tokio::test]
async fn a_queued_job_without_a_callback_secret_gets_one_from_the_dispatcher() {
    let (state, h) = state_and_harness(64 * 1024 * 1024).await;
    // A start that stopped after queueing the job, before storing its secret.
    let job = startable_job(&h).await;
    let job_id: vtp_core::JobId = job["id"].as_str().unwrap().parse().unwrap();
    h.jobs
        .transition(job_id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();
    assert_eq!(h.credentials.job_secret(job_id).await.unwrap(), None);
    assert_eq!(dispatch(&state).await, 1);
    let stored = h.credentials.job_secret(job_id).await.unwrap();
    assert!(stored.is_some(), "the dispatcher stored a secret");
    let sent = h.trainer.started().last().unwrap().clone();
    assert_eq!((sent.job_id, sent.attempt), (job_id, 1));
    assert_eq!(sent.callback_secret, stored, "and launched with it");
    // The trainer's first report verifies with it.
    let (status, body) = report(
        &h,
        &job_id.to_string(),
        json!({"status": "running", "seq": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A job store whose second lookup by `Idempotency-Key` misses: what a
/// retry sees when the first request stores its job between the retry's
/// lookup and its insert.
#[derive(Debug)]
struct SecondKeyLookupMisses {
    inner: Arc<vtp_storage::InMemoryJobStore>,
    lookups: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl JobStore for SecondKeyLookupMisses {
    async fn create(&self, job: &vtp_core::Job) -> vtp_core::Result<()> {
        self.inner.create(job).await
    }
    async fn create_within(
        &self,
        job: &vtp_core::Job,
        quota: vtp_core::Quota,
    ) -> vtp_core::Result<()> {
        self.inner.create_within(job, quota).await
    }
    async fn compare_and_set_within(
        &self,
        expected: vtp_core::Expected,
        next: &vtp_core::Job,
        quota: vtp_core::Quota,
    ) -> vtp_core::Result<vtp_core::Job> {
        self.inner
            .compare_and_set_within(expected, next, quota)
            .await
    }
    async fn queue(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> vtp_core::Result<Vec<vtp_core::Job>> {
        self.inner.queue(now, limit).await
    }
    async fn queue_positions(
        &self,
        user_id: Option<&str>,
    ) -> vtp_core::Result<std::collections::HashMap<vtp_core::JobId, u64>> {
        self.inner.queue_positions(user_id).await
    }
    async fn delete(&self, id: vtp_core::JobId) -> vtp_core::Result<bool> {
        self.inner.delete(id).await
    }
    async fn slots_taken(&self) -> vtp_core::Result<u64> {
        self.inner.slots_taken().await
    }
    async fn get(&self, id: vtp_core::JobId) -> vtp_core::Result<vtp_core::Job> {
        self.inner.get(id).await
    }
    async fn find_created_with_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> vtp_core::Result<Option<vtp_core::Job>> {
        if self.lookups.fetch_add(1, Ordering::SeqCst) == 1 {
            return Ok(None);
        }
        self.inner.find_created_with_key(user_id, key).await
    }
    async fn list(&self, filter: &vtp_core::JobFilter) -> vtp_core::Result<vtp_core::JobPage> {
        self.inner.list(filter).await
    }
    async fn compare_and_set(
        &self,
        expected: vtp_core::Expected,
        next: &vtp_core::Job,
        metric: Option<&vtp_core::TrainingMetric>,
    ) -> vtp_core::Result<vtp_core::Job> {
        self.inner.compare_and_set(expected, next, metric).await
    }
    async fn insert_metric_if_absent(
        &self,
        metric: &vtp_core::TrainingMetric,
    ) -> vtp_core::Result<bool> {
        self.inner.insert_metric_if_absent(metric).await
    }
    async fn metrics(
        &self,
        id: vtp_core::JobId,
    ) -> vtp_core::Result<Vec<vtp_core::TrainingMetric>> {
        self.inner.metrics(id).await
    }
    async fn events(
        &self,
        id: vtp_core::JobId,
        after: i64,
        limit: u32,
    ) -> vtp_core::Result<Vec<vtp_core::JobEvent>> {
        self.inner.events(id, after, limit).await
    }
    async fn ping(&self) -> vtp_core::Result<()> {
        self.inner.ping().await
    }
}

#[tokio::test]
async fn a_create_retry_that_loses_the_insert_race_answers_with_the_winners_job() {
    let inner = Arc::new(vtp_storage::InMemoryJobStore::new());
    let jobs = Arc::new(SecondKeyLookupMisses {
        inner: inner.clone(),
        lookups: std::sync::atomic::AtomicUsize::new(0),
    });
    let stores = Stores {
        jobs: jobs.clone(),
        credentials: inner.clone(),
        leader: Arc::new(vtp_core::SoleLeader),
    };
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let trainer = TrainerDouble::start().await;
    let launcher = Arc::new(HttpLauncher::new(&trainer.url()).unwrap());
    let app = app(AppState::new(
        stores,
        blobs,
        launcher,
        "http://backend.test:8000/",
    ));
    let body = seed_job("s3://vtp-memory/users/test/datasets/d/");
    let post = || keyed(json_request("POST", "/training/jobs", &body), "race-1");
    let (status, replayed, first) = send_keyed(&app, post()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{first}");
    // The retry's lookup misses, its insert meets the unique key, and it
    // answers with the first job.
    let (status, replayed, again) = send_keyed(&app, post()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(jobs.lookups.load(Ordering::SeqCst), 3);
    let page = inner
        .list(&vtp_core::JobFilter::new().with_page(100, 0))
        .await
        .unwrap();
    assert_eq!(page.total, 1);
}

/// One server-sent event: its id, name and JSON data.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: i64,
    event: String,
    data: Value,
}

/// The events of a `text/event-stream` body (keep-alive comments skipped).
fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        .filter_map(|block| {
            let (mut id, mut event, mut data) = (None, None, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse().unwrap());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            Some(Sse {
                id: id?,
                event: event?,
                data: serde_json::from_str(&data).unwrap(),
            })
        })
        .collect()
}

fn events_request(id: &str, last_event_id: Option<&str>) -> Request<Body> {
    let mut request = empty("GET", &format!("/training/jobs/{id}/events"));
    if let Some(last) = last_event_id {
        request
            .headers_mut()
            .insert("last-event-id", last.parse().unwrap());
    }
    request
}

/// The whole stream of a job whose stream ends (a finished job).
async fn whole_stream(h: &Harness, request: Request<Body>) -> Vec<Sse> {
    let response = tokio::time::timeout(Duration::from_secs(10), h.app.clone().oneshot(request))
        .await
        .expect("the stream answers")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let bytes = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("a finished job's stream ends")
        .unwrap()
        .to_bytes();
    parse_sse(std::str::from_utf8(&bytes).unwrap())
}

/// Reads a live stream event by event.
struct LiveStream {
    body: Body,
    buffer: String,
}

impl LiveStream {
    async fn open(h: &Harness, request: Request<Body>) -> Self {
        let response = h.app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        LiveStream {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_sse(&block).pop() {
                    return Some(event);
                }
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event within 10 s")?
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

async fn complete(h: &Harness, id: &str, seq: i64) {
    let checkpoint = BlobKey::parse(&format!("jobs/{id}/best.safetensors")).unwrap();
    h.blobs
        .put_bytes(&checkpoint, Bytes::from_static(b"weights"))
        .await
        .unwrap();
    let done = json!({"job_id": id, "status": "completed", "seq": seq, "progress": 1.0,
                      "checkpoint_s3_uri": h.blobs.uri(&checkpoint)});
    let (status, body) = report(h, id, done).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn epoch_report(id: &str, seq: i64, epoch: u32, loss: f64) -> Value {
    json!({"job_id": id, "status": "running", "seq": seq, "progress": f64::from(epoch) / 3.0,
           "metrics": {"epoch": epoch, "loss": loss}})
}

#[tokio::test]
async fn a_finished_jobs_event_stream_replays_its_history_and_resumes_after_last_event_id() {
    let h = harness().await;
    let id = started_job(&h).await;
    report(
        &h,
        &id,
        json!({"job_id": id, "status": "running", "seq": 1, "message": "started"}),
    )
    .await;
    for (seq, epoch, loss) in [(2, 1, 0.9), (3, 2, 0.5), (3, 2, 0.5), (4, 3, 0.2)] {
        report(&h, &id, epoch_report(&id, seq, epoch, loss)).await;
    }
    complete(&h, &id, 5).await;

    let events = whole_stream(&h, events_request(&id, None)).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "status", "status", "status", "metrics", "metrics", "metrics", "status"
        ],
        "created, queued, running, three epochs (the replay is no event), completed; \
         the launch, progress alone, is no history"
    );
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids are revisions, rising: {ids:?}"
    );
    assert_eq!(ids[2], ids[1] + 2, "the launch's revision is the gap");
    for event in &events {
        assert_eq!(event.data["revision"], event.id);
        assert_eq!(event.data["kind"], event.event.as_str());
        assert_eq!(event.data["job"]["id"], id.as_str());
        assert_eq!(
            event.data["job"]["callback_url"],
            format!("http://backend.test:8000/training/jobs/{id}/callback")
        );
    }
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e.data["job"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[..3], ["pending", "queued", "running"]);
    assert_eq!(statuses[6], "completed");
    let epochs: Vec<(u64, f64)> = events
        .iter()
        .filter_map(|e| {
            let m = e.data.get("metrics")?;
            Some((m["epoch"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
        })
        .collect();
    assert_eq!(epochs, [(1, 0.9), (2, 0.5), (3, 0.2)]);

    // Reconnecting after any event gives exactly the rest, once.
    for seen in 0..events.len() {
        let rest = whole_stream(&h, events_request(&id, Some(&ids[seen].to_string()))).await;
        assert_eq!(rest, events[seen + 1..], "after event {seen}");
    }
    // `?after=` is the same for clients that cannot set the header; the
    // header wins.
    let uri = format!("/training/jobs/{id}/events?after={}", ids[3]);
    assert_eq!(whole_stream(&h, empty("GET", &uri)).await, events[4..]);
    let mut both = empty("GET", &uri);
    both.headers_mut()
        .insert("last-event-id", ids[5].to_string().parse().unwrap());
    assert_eq!(whole_stream(&h, both).await, events[6..]);

    // Bad ids are refused, naming what is wrong; unknown jobs are 404.
    for bad in ["abc", "-2", "1.5"] {
        let (status, body) = send(&h.app, events_request(&id, Some(bad))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "Last-Event-ID", "{body}");
    }
    let (status, _) = send(
        &h.app,
        events_request(&vtp_core::JobId::new().to_string(), None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_live_event_stream_gains_each_change_and_a_reconnect_misses_nothing() {
    let h = harness().await;
    let id = started_job(&h).await;
    let mut stream = LiveStream::open(&h, events_request(&id, None)).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(stream.next().await.unwrap());
    }
    assert_eq!(seen[1].data["job"]["status"], "queued");
    // Its launch is progress, shown as the job is now.
    assert_eq!(seen[2].event, "progress");
    assert!(
        seen[2].data["job"]["launched_at"].is_string(),
        "{:?}",
        seen[2]
    );
    seen.remove(2);

    // Each report reaches the open stream as it is applied.
    report(
        &h,
        &id,
        json!({"job_id": id, "status": "running", "seq": 1}),
    )
    .await;
    seen.push(stream.next().await.unwrap());
    assert_eq!(seen[2].data["job"]["status"], "running");
    report(&h, &id, epoch_report(&id, 2, 1, 0.9)).await;
    let epoch = stream.next().await.unwrap();
    assert_eq!(
        (epoch.event.as_str(), &epoch.data["metrics"]["epoch"]),
        ("metrics", &json!(1))
    );
    seen.push(epoch);

    // The connection drops; two changes happen meanwhile; the client
    // reconnects with the last id it saw and gets exactly those, then the
    // rest live, and the stream ends with the job.
    drop(stream);
    report(&h, &id, epoch_report(&id, 3, 2, 0.5)).await;
    report(&h, &id, json!({"job_id": id, "status": "running", "seq": 4, "progress": 0.8, "message": "step 5/9"})).await;
    let last = seen.last().unwrap().id.to_string();
    let mut stream = LiveStream::open(&h, events_request(&id, Some(&last))).await;
    seen.push(stream.next().await.unwrap());
    seen.push(stream.next().await.unwrap());
    assert_eq!(seen[4].data["metrics"]["epoch"], 2);
    assert_eq!(
        (seen[5].event.as_str(), &seen[5].data["job"]["message"]),
        ("progress", &json!("step 5/9"))
    );
    complete(&h, &id, 5).await;
    seen.push(stream.next().await.unwrap());
    assert_eq!(seen[6].data["job"]["status"], "completed");
    assert_eq!(stream.next().await, None, "the stream ends with the job");

    let ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "no duplicate across the reconnect, in order: {ids:?}"
    );
    // What the live client saw is what a replay gives, but for progress,
    // which is no history.
    let history: Vec<Sse> = seen.into_iter().filter(|e| e.event != "progress").collect();
    assert_eq!(whole_stream(&h, events_request(&id, None)).await, history);
}
