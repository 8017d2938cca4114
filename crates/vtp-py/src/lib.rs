//! # vtp-py
//!
//! The native half of the `vtp` Python package (`vtp._vtp`): the backend
//! client, the platform in process and checkpoints, all on the Rust engine.
//! The pure-Python half (`python/vtp/`) adds job objects, event streams,
//! progress bars, pandas and matplotlib.
//!
//! ```python
//! import vtp
//! result = vtp.local().train(dataset="digits/", model="small_cnn", epochs=5)
//! print(result.metrics[-1]["val_accuracy"], result.checkpoint)
//! ```
//!
//! Every blocking call releases the GIL and stays interruptible by Ctrl-C;
//! errors arrive as `vtp.VtpError` subclasses ([`errors`]).
#![warn(missing_docs)]

use pyo3::prelude::*;

mod checkpoint;
mod client;
pub mod errors;
mod local;
mod run;
mod runtime;

pub use checkpoint::Checkpoint;
pub use client::Client;
pub use local::LocalPlatform;
pub use run::RunConnection;

/// The module `vtp._vtp`.
#[pymodule]
fn _vtp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The package engine's arguments (`python -m vtp.ultralytics_engine`):
    // the list the backend checks a job's config against, not a copy.
    m.add(
        "PACKAGE_TRAIN_ARGS",
        pyo3::types::PyFrozenSet::new(py, vtp_core::PackageConfig::TRAIN_ARGS)?,
    )?;
    // The detectors the native engine builds: the package engine stores
    // their weights as VTP checkpoints too (`adopt_detector`).
    let native_detectors: Vec<&str> = vtp_core::models::MODELS
        .iter()
        .filter(|m| m.task == vtp_core::Task::Detect)
        .map(|m| m.name)
        .collect();
    m.add(
        "NATIVE_DETECTORS",
        pyo3::types::PyFrozenSet::new(py, native_detectors)?,
    )?;
    m.add_function(wrap_pyfunction!(checkpoint::adopt_detector, m)?)?;
    m.add_class::<Client>()?;
    m.add_class::<client::EventStream>()?;
    m.add_class::<LocalPlatform>()?;
    m.add_class::<Checkpoint>()?;
    m.add_class::<RunConnection>()?;
    m.add("VtpError", py.get_type::<errors::VtpError>())?;
    m.add("NotFound", py.get_type::<errors::NotFound>())?;
    m.add("Conflict", py.get_type::<errors::Conflict>())?;
    m.add("InvalidInput", py.get_type::<errors::InvalidInput>())?;
    m.add("Unavailable", py.get_type::<errors::Unavailable>())?;
    m.add("AuthError", py.get_type::<errors::AuthError>())?;
    m.add("JobFailed", py.get_type::<errors::JobFailed>())?;
    Ok(())
}
