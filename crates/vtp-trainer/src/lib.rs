//! # vtp-trainer
//!
//! The training side of VTP. Today it holds the launchers that hand jobs to a
//! trainer ([`HttpLauncher`]: the seed's HTTP trainer service); the
//! libtorch engine and the subprocess and Kubernetes launchers build on the
//! same [`vtp_core::TrainerLauncher`] contract.
#![warn(missing_docs)]

pub mod launch;
#[cfg(feature = "testing")]
pub mod testing;

pub use launch::http::HttpLauncher;
