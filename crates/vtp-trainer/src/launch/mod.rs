//! [`vtp_core::TrainerLauncher`] implementations.

pub mod http;
pub mod subprocess;
