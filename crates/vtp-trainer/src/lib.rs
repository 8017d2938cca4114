//! # vtp-trainer
//!
//! The training side of VTP:
//!
//! - [`launch`]: the [`vtp_core::TrainerLauncher`]s a backend starts
//!   trainers with: [`HttpLauncher`] (a trainer service over HTTP),
//!   [`SubprocessLauncher`] (one as a child process) and, with the
//!   `kubernetes` feature, [`KubernetesLauncher`] (each job as a
//!   Kubernetes Job);
//! - [`engine`] and [`data`] (feature `torch`): the libtorch training
//!   engine, [`TchTrainer`], and its datasets and input pipelines;
//! - [`service`] (feature `service`): the trainer service, which takes jobs
//!   over the seed's trainer contract, trains them with an
//!   [`service::Engine`] and reports back over signed callbacks, and its
//!   HTTP shell; the `vtp-trainer-service` binary (features `service` and
//!   `torch`) serves it with [`TchEngine`].
#![warn(missing_docs)]

#[cfg(any(feature = "torch", feature = "service"))]
pub mod data;
#[cfg(any(feature = "torch", feature = "service"))]
mod digest;
#[cfg(feature = "torch")]
pub mod engine;
pub mod launch;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub use vtp_client::tls;

#[cfg(feature = "torch")]
pub use engine::{Predictor, TchEngine, TchTrainer, TrainConfig};
pub use launch::http::HttpLauncher;
#[cfg(feature = "kubernetes")]
pub use launch::kubernetes::{K8sArgs, KubernetesConfig, KubernetesLauncher};
pub use launch::subprocess::SubprocessLauncher;
