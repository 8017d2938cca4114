//! # vtp-examples
//!
//! VTP used as a Rust dependency, one runnable example each (the test
//! command runs all three):
//!
//! - `train_in_process`: the SDK alone, no HTTP: `TchTrainer` trains a CNN
//!   on a generated ImageFolder and a `Predictor` loads the checkpoint
//!   (`--features torch`);
//! - `embed_backend`: the backend's router mounted under `/vtp` inside
//!   another axum application with routes of its own;
//! - `custom_blob_store`: a `BlobStore` of one's own, checked by the
//!   conformance suite every VTP store passes.
//!
//! ```sh
//! cargo run -p vtp-examples --example embed_backend
//! ```
#![warn(missing_docs)]
