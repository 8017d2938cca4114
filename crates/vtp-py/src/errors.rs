//! The exception hierarchy and the one place errors become exceptions.
//!
//! ```text
//! VtpError
//! ├── NotFound       404, or a missing job, dataset, checkpoint
//! ├── Conflict       409: the job is not in a state that allows it
//! ├── InvalidInput   400, 413, 422: bad JSON, unknown model, hostile archive
//! ├── Unavailable    503, connection refused, timeouts: try again later
//! └── JobFailed      wait() on a job that ended `failed`
//! ```

use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::PyException;

create_exception!(
    vtp,
    VtpError,
    PyException,
    "Base class of every VTP error; the message is the server's or the engine's."
);
create_exception!(
    vtp,
    NotFound,
    VtpError,
    "The job, dataset or checkpoint does not exist."
);
create_exception!(
    vtp,
    Conflict,
    VtpError,
    "The job's state does not allow the request (starting a finished job, say)."
);
create_exception!(
    vtp,
    InvalidInput,
    VtpError,
    "The request can never succeed as it is: bad JSON, unknown model, bad dataset."
);
create_exception!(
    vtp,
    Unavailable,
    VtpError,
    "The backend, its database or its object store cannot be reached; retrying may work."
);
create_exception!(
    vtp,
    AuthError,
    VtpError,
    "The backend wants a valid token (401), or the token may not do this (403)."
);

create_exception!(
    vtp,
    JobFailed,
    VtpError,
    "A waited-for job ended `failed`; the message is the job's error."
);

/// An engine error as an exception of its category.
pub(crate) fn from_core(error: vtp_core::Error) -> PyErr {
    use vtp_core::Error;
    let message = vtp_core::error_chain(&error);
    match error {
        Error::NotFound { .. } => NotFound::new_err(message),
        Error::AlreadyExists { .. } | Error::Conflict { .. } => Conflict::new_err(message),
        Error::InvalidInput { .. } | Error::TooLarge { .. } => InvalidInput::new_err(message),
        Error::Unauthenticated { .. } | Error::Forbidden { .. } => AuthError::new_err(message),
        Error::Unavailable { .. } | Error::Timeout { .. } | Error::RateLimited { .. } => {
            Unavailable::new_err(message)
        }
        _ => VtpError::new_err(message),
    }
}
