//! [`vtp_core::TrainerLauncher`] implementations.

pub mod http;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod subprocess;
