//! A job's trace, from the real binaries: with `VTP_OTLP_ENDPOINT` set, the
//! backend and the trainer it starts export their spans over OTLP/HTTP
//! (protobuf) to a collector, here one in this test that decodes what it is
//! sent. One trace runs from the start request through the launch, the
//! trainer's job and each of its epochs, every report's delivery, and the
//! backend's callback request that records it.
//!
//! With `VTP_TRACE_OUT=<file>` the test writes the trace there as an
//! indented tree (the closing notes show one).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::{Value, json};
use support::ServiceProcess;

/// One exported span, as the collector got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    start: u64,
    end: u64,
    attributes: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// An OTLP/HTTP collector on loopback: `POST /v1/traces` with an
/// `ExportTraceServiceRequest` in protobuf.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<u32>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let requests: Arc<Mutex<u32>> = Arc::default();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post({
                let spans = spans.clone();
                let requests = requests.clone();
                move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    assert_eq!(
                        headers.get("content-type").unwrap(),
                        "application/x-protobuf"
                    );
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    *requests.lock().unwrap() += 1;
                    let mut spans = spans.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .map(|r| attributes(&r.attributes))
                            .and_then(|a| a.get("service.name").cloned())
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                spans.push(Span {
                                    service: service.clone(),
                                    name: span.name,
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_id: hex(&span.parent_span_id),
                                    start: span.start_time_unix_nano,
                                    end: span.end_time_unix_nano,
                                    attributes: attributes(&span.attributes),
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector {
            url,
            spans,
            requests,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans called `name`.
fn named<'a>(trace: &'a [Span], name: &'a str) -> impl Iterator<Item = &'a Span> {
    trace.iter().filter(move |s| s.name == name)
}

/// The spans of one job's trace, checked for the shape the issue asks for;
/// `Err` says what is missing yet (spans arrive in batches).
fn job_trace(spans: &[Span], job_id: &str, epochs: u32) -> Result<Vec<Span>, String> {
    let start_uri = format!("/training/jobs/{job_id}/start");
    let start = spans
        .iter()
        .find(|s| s.name == "request" && s.attr("uri") == Some(&start_uri))
        .ok_or("no span for the start request")?;
    let trace: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace_id == start.trace_id)
        .cloned()
        .collect();
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent = |s: &Span| by_id.get(s.parent_id.as_str()).copied();

    if !start.parent_id.is_empty() {
        return Err(format!("the start request's span has a parent: {start:?}"));
    }
    let launch = named(&trace, "launch")
        .find(|s| parent(s).is_some_and(|p| p.span_id == start.span_id))
        .ok_or("no launch span under the start request")?;
    if launch.service != "vtp-backend" || launch.attr("job_id") != Some(job_id) {
        return Err(format!("launch span: {launch:?}"));
    }
    // The trainer's job span: in another process, the launch's child.
    let job = named(&trace, "job")
        .find(|s| s.parent_id == launch.span_id)
        .ok_or("no trainer job span under the launch")?;
    if job.service != "vtp-trainer-service" || job.attr("job_id") != Some(job_id) {
        return Err(format!("job span: {job:?}"));
    }
    let epoch_spans: Vec<&Span> = named(&trace, "epoch")
        .filter(|s| s.parent_id == job.span_id)
        .collect();
    let mut numbers: Vec<u32> = epoch_spans
        .iter()
        .filter_map(|s| s.attr("epoch")?.parse().ok())
        .collect();
    numbers.sort_unstable();
    if numbers != (1..=epochs).collect::<Vec<_>>() {
        return Err(format!("epoch spans under the job: {numbers:?}"));
    }
    // Every epoch's report was delivered in a `report` span under its
    // epoch, and the backend's callback request is that delivery's child.
    let callbacks = |report: &Span| {
        named(&trace, "request")
            .filter(|r| {
                r.parent_id == report.span_id
                    && r.service == "vtp-backend"
                    && r.attr("uri") == Some(&format!("/training/jobs/{job_id}/callback"))
            })
            .count()
    };
    for epoch in &epoch_spans {
        let delivered = named(&trace, "report")
            .find(|r| r.parent_id == epoch.span_id && r.attr("delivered") == Some("true"))
            .ok_or_else(|| format!("no delivered report under epoch {:?}", epoch.attr("epoch")))?;
        if callbacks(delivered) != 1 {
            return Err(format!(
                "no callback span under the report of epoch {:?}",
                epoch.attr("epoch")
            ));
        }
    }
    // The final report comes from the job itself, after the last epoch.
    let last = named(&trace, "report")
        .find(|r| {
            r.parent_id == job.span_id
                && r.attr("status") == Some("completed")
                && r.attr("delivered") == Some("true")
        })
        .ok_or("no delivered final report under the job")?;
    if callbacks(last) != 1 {
        return Err("no callback span under the final report".into());
    }
    // Time runs forward down the tree.
    for span in &trace {
        if let Some(p) = parent(span)
            && span.service == p.service
            && (span.start < p.start || span.end < span.start)
        {
            return Err(format!("{span:?} is not within {p:?}"));
        }
    }
    Ok(trace)
}

/// The trace as an indented tree: name, service, duration, attributes.
fn render(trace: &[Span]) -> String {
    fn walk(out: &mut String, trace: &[Span], span: &Span, depth: usize, t0: u64) {
        let mut attrs: Vec<String> = span
            .attributes
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("code.")
                    && !k.starts_with("thread.")
                    && !matches!(k.as_str(), "busy_ns" | "idle_ns" | "target" | "level")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        attrs.sort();
        out.push_str(&format!(
            "{:indent$}{} [{}] +{:.3}s {:.3}s {}\n",
            "",
            span.name,
            span.service,
            (span.start - t0) as f64 / 1e9,
            (span.end.saturating_sub(span.start)) as f64 / 1e9,
            attrs.join(" "),
            indent = depth * 2
        ));
        let mut children: Vec<&Span> = trace
            .iter()
            .filter(|s| s.parent_id == span.span_id)
            .collect();
        children.sort_by_key(|s| s.start);
        for child in children {
            walk(out, trace, child, depth + 1, t0);
        }
    }
    let mut out = String::new();
    let roots: Vec<&Span> = trace.iter().filter(|s| s.parent_id.is_empty()).collect();
    let t0 = roots.iter().map(|s| s.start).min().unwrap_or_default();
    if let Some(root) = roots.first() {
        out.push_str(&format!("trace {}\n", root.trace_id));
    }
    for root in roots {
        walk(&mut out, trace, root, 0, t0);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_shows_a_jobs_launch_epochs_and_callbacks() {
    let collector = Collector::start().await;
    let work = tempfile::tempdir().unwrap();
    let env = [
        (
            "VTP_DATABASE_URL",
            format!("sqlite://{}", work.path().join("vtp.db").display()),
        ),
        (
            "VTP_BLOB_URL",
            format!("file://{}", work.path().join("blobs").display()),
        ),
        ("VTP_LAUNCHER", "subprocess".to_owned()),
        ("VTP_TRAINER_BIN", support::trainer_bin()),
        (
            "VTP_WORK_DIR",
            work.path().join("trainer").display().to_string(),
        ),
        ("VTP_OTLP_ENDPOINT", collector.url.clone()),
        // Export within a moment of a span ending (the SDK's variable; the
        // subprocess trainer inherits it).
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let backend = ServiceProcess::start(&env).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let dataset = support::upload_shapes(&http, &backend, "tracer", 20, 5).await;
    let epochs = 3;
    let body = json!({
        "user_id": "tracer", "model_name": "small_cnn", "framework": "tch",
        "dataset_s3_uri": dataset,
        "config": {"epochs": epochs, "image_size": 16, "batch_size": 16, "threads": 1, "workers": 1},
    });
    let (status, job) = support::json_of(
        http.post(backend.at("/training/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, started) = support::json_of(
        http.post(backend.at(&format!("/training/jobs/{id}/start")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{started}");

    let mut job = Value::Null;
    for _ in 0..1200 {
        job = support::json_of(
            http.get(backend.at(&format!("/training/jobs/{id}")))
                .send()
                .await
                .unwrap(),
        )
        .await
        .1;
        if matches!(
            job["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(job["status"], "completed", "{job}");

    // The last spans (the final report's delivery and its callback) arrive
    // with the next export batch.
    let mut outcome = Err(String::from("nothing exported"));
    for _ in 0..300 {
        outcome = job_trace(&collector.spans(), &id, epochs);
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let trace = outcome.unwrap_or_else(|missing| {
        panic!(
            "{missing}; {} export requests, spans: {:#?}",
            collector.requests.lock().unwrap(),
            collector.spans()
        )
    });
    let tree = render(&trace);
    println!("{tree}");
    if let Ok(path) = std::env::var("VTP_TRACE_OUT") {
        std::fs::write(path, &tree).unwrap();
    }
    // Both services exported, each under its own name.
    for service in ["vtp-backend", "vtp-trainer-service"] {
        assert!(trace.iter().any(|s| s.service == service), "{tree}");
    }
}
