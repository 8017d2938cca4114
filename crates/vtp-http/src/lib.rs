//! # vtp-http
//!
//! What VTP's two HTTP services, the backend (`vtp-server`) and the trainer
//! service (`vtp-trainer`'s `service` feature), share, so that both answer
//! and document failures the same way:
//!
//! - [`error`]: every failure is `{"error": {"code", "message", "field"?}}`
//!   ([`ApiError`], mapped from [`vtp_core::Error`] through the one table in
//!   [`vtp_core::api::error_status`]), and extractors ([`ApiJson`],
//!   [`ApiPath`], [`ApiQuery`]) that refuse bad input with it, naming the
//!   field;
//! - [`openapi`]: the `bearer` security scheme and the error answers every
//!   route may give, for both OpenAPI documents;
//! - [`metrics`]: the process's one Prometheus recorder, which both
//!   services' `GET /metrics` render;
//! - [`telemetry`]: logs to stderr (text or JSON lines) and, with the
//!   `otel` feature, OpenTelemetry traces over OTLP, with the W3C trace
//!   context the services hand each other;
//! - [`process`]: the shutdown signals the binaries wait for;
//! - [`serve()`]: the accept loop, with a header-read timeout, a cap on
//!   connections and a bounded graceful shutdown.
#![warn(missing_docs)]

pub mod error;
pub mod metrics;
pub mod openapi;
pub mod process;
pub mod serve;
pub mod telemetry;

pub use error::{ApiError, ApiJson, ApiPath, ApiQuery, error_chain, parse_json};
pub use process::{parent_exited, shutdown_signal};
pub use serve::{ServeOptions, serve};
pub use telemetry::{Telemetry, TelemetryArgs, init_tracing};
