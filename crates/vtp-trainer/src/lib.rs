//! # vtp-trainer
//!
//! The training side of VTP:
//!
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
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub use vtp_client::tls;

#[cfg(feature = "torch")]
pub use engine::{Predictor, TchEngine, TchTrainer, TrainConfig};
