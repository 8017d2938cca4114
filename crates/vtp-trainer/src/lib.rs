//! # vtp-trainer
//!
//! The training side of VTP. Today it holds the launchers that hand jobs to a
//! trainer ([`HttpLauncher`]: the seed's HTTP trainer service); the
//! libtorch engine and the subprocess and Kubernetes launchers build on the
//! same [`vtp_core::TrainerLauncher`] contract.
#![warn(missing_docs)]

#[cfg(feature = "torch")]
pub mod data;
#[cfg(feature = "torch")]
pub mod engine;
pub mod launch;
#[cfg(feature = "torch")]
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub use vtp_client::tls;

#[cfg(feature = "torch")]
pub use engine::{Predictor, TchTrainer, TrainConfig};
pub use launch::http::HttpLauncher;
#[cfg(feature = "kubernetes")]
pub use launch::kubernetes::{KubernetesConfig, KubernetesLauncher};
pub use launch::subprocess::SubprocessLauncher;
