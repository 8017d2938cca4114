//! What the binaries log and trace, and the trace context the services
//! hand each other.
//!
//! - Logs go to stderr as text, or with `VTP_LOG_FORMAT=json` as one JSON
//!   object per line ([`init_tracing`]).
//! - Traces: with the `otel` feature and [`TelemetryArgs::otlp_endpoint`]
//!   set, the spans of VTP's own crates are also exported as OpenTelemetry
//!   spans over OTLP/HTTP (protobuf). Off by default: without the setting no
//!   exporter runs and no trace context is sent.
//! - The trace context travels as a W3C `traceparent`: from the backend to
//!   the trainer in the start request's `traceparent` field, and back on
//!   every report as the `traceparent` header, so one trace shows a job's
//!   launch, its epochs and the callbacks that recorded them.
//!   [`traceparent`] reads it off a span and [`set_parent`] joins a span to
//!   it; without the feature (or the exporter) both do nothing.

use vtp_core::{Error, Result};

/// The variable that picks the log format: `text` (the default) or `json`.
pub const LOG_FORMAT_ENV: &str = "VTP_LOG_FORMAT";

/// The variable naming the OTLP/HTTP collector traces go to.
pub const OTLP_ENDPOINT_ENV: &str = "VTP_OTLP_ENDPOINT";

/// The header (W3C Trace Context) a report carries its span's context in.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The tracing settings both binaries flatten into their arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Export traces as OpenTelemetry spans over OTLP/HTTP (protobuf) to the
    /// collector at this base URL (`http://127.0.0.1:4318`; spans go to
    /// `/v1/traces`). Off when unset. Needs a build with the `otel` feature.
    /// The OpenTelemetry SDK's `OTEL_*` variables (service name, resource
    /// attributes, headers, batching) apply.
    #[arg(long, env = OTLP_ENDPOINT_ENV)]
    pub otlp_endpoint: Option<url::Url>,
}

impl TelemetryArgs {
    /// The settings as variables for a process this one starts (a child
    /// trainer), so that it exports to the same collector.
    pub fn env(&self) -> Vec<(String, String)> {
        self.otlp_endpoint
            .iter()
            .map(|url| (OTLP_ENDPOINT_ENV.to_owned(), url.to_string()))
            .collect()
    }
}

/// Held by `main` for the life of the process: dropping it exports the
/// spans not yet sent and stops the exporter.
#[derive(Debug, Default)]
#[must_use = "dropping it stops the trace exporter"]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.provider.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("could not export the last spans: {e}");
        }
    }
}

/// Logs to stderr, filtered by `VTP_LOG` (default `info`), for the
/// binaries: readable text, or with `VTP_LOG_FORMAT=json` one JSON object
/// per line, carrying the fields of every span it is in (a request's
/// `request_id`, a job's `job_id`) beside its own. With
/// [`TelemetryArgs::otlp_endpoint`] the spans and events of VTP's own
/// crates (`vtp_*`, at `info` and above, whatever `VTP_LOG` says) are
/// exported too, as the service `service` (unless `OTEL_SERVICE_NAME`
/// names another).
///
/// # Errors
/// [`Error::InvalidInput`] naming `otlp_endpoint` when it is set and this
/// build has no `otel` feature, or the exporter cannot be built from it.
pub fn init_tracing(service: &'static str, args: &TelemetryArgs) -> Result<Telemetry> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env("VTP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let (traces, telemetry) = trace_layer(service, args)?;
    let mut layers = vec![logs];
    layers.extend(traces);
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| Error::internal(format!("logging is set up already: {e}")))?;
    Ok(telemetry)
}

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(not(feature = "otel"))]
fn trace_layer(
    _service: &'static str,
    args: &TelemetryArgs,
) -> Result<(Option<BoxedLayer>, Telemetry)> {
    match &args.otlp_endpoint {
        None => Ok((None, Telemetry::default())),
        Some(_) => Err(Error::invalid(
            "otlp_endpoint",
            format!(
                "this build exports no traces; unset {OTLP_ENDPOINT_ENV} or rebuild with the `otel` feature"
            ),
        )),
    }
}

#[cfg(feature = "otel")]
fn trace_layer(
    service: &'static str,
    args: &TelemetryArgs,
) -> Result<(Option<BoxedLayer>, Telemetry)> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::Layer as _;

    let Some(base) = &args.otlp_endpoint else {
        return Ok((None, Telemetry::default()));
    };
    if !matches!(base.scheme(), "http" | "https") {
        return Err(Error::invalid(
            "otlp_endpoint",
            format!("{base} is not an http(s) URL"),
        ));
    }
    let mut endpoint = base.clone();
    if !endpoint.path().ends_with('/') {
        endpoint.set_path(&format!("{}/", endpoint.path()));
    }
    let endpoint = endpoint
        .join("v1/traces")
        .map_err(|e| Error::invalid("otlp_endpoint", e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint.as_str())
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| Error::invalid("otlp_endpoint", e.to_string()))?;
    // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win, as the
    // OpenTelemetry specification says.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("vtp");
    // Only VTP's own spans: a request, a launch, a job, an epoch, a report.
    // Libraries' spans (hyper, sqlx, tower) would bury them.
    let ours = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("vtp") && *meta.level() <= tracing::Level::INFO
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(ours)
        .boxed();
    Ok((
        Some(layer),
        Telemetry {
            provider: Some(provider),
        },
    ))
}

/// The W3C `traceparent` of `span` when it is being exported; `None`
/// otherwise (no `otel` feature, no exporter, or a span filtered out).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let context = span.context();
        if !context.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = std::collections::HashMap::new();
        opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .inject_context(&context, &mut carrier);
        carrier.remove(TRACEPARENT_HEADER)
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = span;
        None
    }
}

/// Makes `span` a child of the remote span `traceparent` names (another
/// service's). Call it before the span is first entered. Does nothing for
/// `None`, a malformed value, or without the `otel` feature.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    #[cfg(feature = "otel")]
    if let Some(value) = traceparent {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let carrier =
            std::collections::HashMap::from([(TRACEPARENT_HEADER.to_owned(), value.to_owned())]);
        let parent =
            opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid()
            && let Err(e) = span.set_parent(parent)
        {
            tracing::debug!(error = %e, "cannot join the remote trace");
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, traceparent);
}

/// [`set_parent`] from a request's `traceparent` header.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    set_parent(
        span,
        headers
            .get(TRACEPARENT_HEADER)
            .and_then(|value| value.to_str().ok()),
    );
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// A span joined to a remote `traceparent` is exported in that trace,
    /// as that span's child, and hands on a `traceparent` of its own.
    #[test]
    fn the_trace_context_round_trips_through_traceparent() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let handed_on = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job");
            set_parent(&span, Some(remote));
            let handed_on = traceparent(&span).expect("an exported span has a traceparent");
            // Malformed values are ignored, not fatal.
            set_parent(&tracing::info_span!("other"), Some("not a traceparent"));
            drop(span);
            handed_on
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let job = spans.iter().find(|s| s.name == "job").unwrap();
        assert_eq!(
            job.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(job.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(
            handed_on,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                job.span_context.span_id()
            )
        );
        let other = spans.iter().find(|s| s.name == "other").unwrap();
        assert_ne!(other.span_context.trace_id(), job.span_context.trace_id());
    }

    #[test]
    fn without_an_exporter_no_context_is_handed_on() {
        assert_eq!(traceparent(&tracing::info_span!("job")), None);
    }
}
