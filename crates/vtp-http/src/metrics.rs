//! The process's one Prometheus recorder: the backend and the trainer
//! service record through the `metrics` facade, and each renders this
//! recorder at its `GET /metrics` (in one process, as the Python package
//! runs them, both pages show everything).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Request latency buckets, in seconds (callbacks take about a millisecond).
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Whole-job buckets, in seconds: ten seconds to a day.
const DURATION_BUCKETS: [f64; 12] = [
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

/// One training step's buckets, in seconds.
const STEP_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One epoch's buckets, in seconds.
const EPOCH_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The process's Prometheus recorder, installed on first use. When the
/// embedding program installed another global recorder first, VTP's
/// metrics go there and this handle renders an empty page.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            ("vtp_http_request_duration_seconds", &LATENCY_BUCKETS),
            ("training_duration_seconds", &DURATION_BUCKETS),
            ("vtp_trainer_step_seconds", &STEP_BUCKETS),
            ("vtp_trainer_epoch_seconds", &EPOCH_BUCKETS),
        ];
        let mut builder = PrometheusBuilder::new();
        for (name, values) in buckets {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.into()), values)
                .expect("non-empty buckets");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!(
                "a metrics recorder was installed already; /metrics renders VTP's own only"
            );
        }
        handle
    })
}

/// `handle()`'s page, as `GET /metrics` answers it.
pub fn render() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle().render(),
    )
}
