//! # vtp-launch
//!
//! How a backend starts trainers: the [`vtp_core::TrainerLauncher`]s.
//!
//! - [`HttpLauncher`]: a trainer service over HTTP (the seed's trainer
//!   contract), with a number of slots;
//! - [`SubprocessLauncher`]: a trainer service as a child process of the
//!   backend, one per job;
//! - [`KubernetesLauncher`] (feature `kubernetes`): each job as a
//!   Kubernetes Job, with its reconciler and its settings ([`K8sArgs`]).
//!
//! Nothing here trains, so the backend that links it never links libtorch
//! (the trainer is `vtp-trainer`). The launchers are tested where a trainer
//! can answer them: `vtp-server`'s `tests/http_launcher.rs` and
//! `tests/launchers.rs` (the trainer double, real trainer binaries),
//! `tests/kubernetes.rs` (a fake API server).
#![warn(missing_docs)]

pub mod http;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod subprocess;

pub use http::HttpLauncher;
#[cfg(feature = "kubernetes")]
pub use kubernetes::{K8sArgs, KubernetesConfig, KubernetesLauncher};
pub use subprocess::SubprocessLauncher;
