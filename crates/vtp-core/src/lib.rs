//! # vtp-core
//!
//! The domain of the Vision Training Platform and the four traits the rest
//! of VTP is built on:
//!
//! - [`JobStore`]: durable job state, transitions as compare-and-set;
//! - [`BlobStore`]: datasets and checkpoints in object storage;
//! - [`TrainerLauncher`]: starts and stops trainers;
//! - [`Trainer`]: the training loop itself.
//!
//! A job's life, with any [`JobStore`] (here the in-memory one from `vtp-storage`):
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn vtp_core::JobStore>) -> vtp_core::Result<()> {
//! use vtp_core::{JobStatus, JobStoreExt, NewJob, TrainingReport};
//!
//! let job = store
//!     .create_job(NewJob {
//!         user_id: "alice".into(),
//!         model_name: "resnet18".into(),
//!         framework: "tch".into(),
//!         dataset_s3_uri: "s3://datasets/alice/digits/".into(),
//!         config: serde_json::json!({"epochs": 3}),
//!         priority: 0,
//!     })
//!     .await?;
//! store.transition(job.id, JobStatus::Pending, JobStatus::Queued).await?;
//! let report = TrainingReport::new(JobStatus::Running)
//!     .with_seq(1)
//!     .with_metric("epoch", 1.0)
//!     .with_metric("loss", 0.42);
//! store.apply_report(job.id, &report).await?;
//! // The same report again changes nothing.
//! assert!(!store.apply_report(job.id, &report).await?.applied());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod blob;
pub mod callback_signature;
pub mod class_report;
pub mod error;
pub mod event;
pub mod job;
pub mod job_store;
pub mod launcher;
pub mod layout;
pub mod leader;
pub mod models;
pub mod queue;
pub mod report;
pub mod retry;
pub mod script_config;
pub mod status;
pub mod tls;
pub mod train_config;
pub mod trainer;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use auth::{CredentialStore, CredentialStoreExt, NewToken, Principal, TokenRecord, hash_token};
pub use blob::{BlobKey, BlobStore, BlobStoreExt, BlobUri, ByteStream, ObjectMeta};
pub use callback_signature::CallbackSecret;
pub use class_report::ClassReport;
pub use error::{BoxError, Error, Result, error_chain};
pub use event::{EventKind, JobEvent};
pub use job::{
    AttemptEnded, IDEMPOTENCY_KEY_MAX_LEN, IdempotencyKeys, Job, JobCursor, JobFilter, JobId,
    JobPage, KeyedRequest, NewJob, validate_idempotency_key, validate_name,
};
pub use job_store::{Expected, JobPages, JobStore, JobStoreExt, Quota, next_cursor};
pub use launcher::{CancelOutcome, Capacity, Resources, StartTraining, TrainerLauncher};
pub use layout::{checkpoint_set_epoch, checkpoint_set_prefix, checkpoint_sets_prefix};
pub use leader::{LeaderElector, LeaderTerm, SoleLeader};
pub use models::{
    Engine, Framework, MODELS, ModelSpec, PackageModel, Task, check_model, find_model,
    find_package_model, package_models,
};
pub use queue::queue_order;
pub use report::{ReportOutcome, ReportPlan, TrainingMetric, TrainingReport};
pub use retry::{BackoffConfig, RetryConfig};
pub use script_config::{Distributed, PackageConfig, ScriptConfig};
pub use status::JobStatus;
pub use train_config::{DeviceChoice, OptimizerKind, TrainConfig};
pub use trainer::{EpochReport, ProgressSink, StepProgress, TrainSpec, TrainSummary, Trainer};
