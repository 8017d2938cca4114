//! The one error type of the VTP libraries.

use std::time::Duration;

/// A boxed error kept as the cause of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a VTP store, launcher or trainer.
///
/// Variants are categories, not call sites: the HTTP edge maps each one to a
/// status code, and [`Error::is_retryable`] tells callers whether trying the
/// same operation again can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named thing does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// What was looked up: `job`, `object`, `checkpoint`, ...
        kind: &'static str,
        /// Its identifier as the caller gave it.
        id: String,
    },

    /// Creating something that exists already.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// What was created.
        kind: &'static str,
        /// Its identifier.
        id: String,
    },

    /// A guarded state change lost: the record is no longer in the expected state.
    #[error("{message}")]
    Conflict {
        /// What was attempted and what was found instead.
        message: String,
    },

    /// The caller sent something that can never succeed as it is.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The offending field, dotted for nested ones (`config.epochs`).
        field: String,
        /// Why it is invalid.
        message: String,
    },

    /// The request carries no valid credentials (a token, a signature).
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// What was missing or wrong, without echoing any secret.
        message: String,
    },

    /// The caller is known but may not do this.
    #[error("forbidden: {message}")]
    Forbidden {
        /// What was refused.
        message: String,
    },

    /// The caller sent too much too fast; try again after `retry_after`.
    #[error("rate limited: {message}")]
    RateLimited {
        /// Which limit was hit.
        message: String,
        /// When trying again may succeed.
        retry_after: Duration,
    },

    /// A payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes seen so far (or announced).
        size: u64,
        /// The configured limit.
        limit: u64,
    },

    /// A dependency (database, object store, trainer) cannot be reached right now.
    #[error("{service} unavailable")]
    Unavailable {
        /// Which dependency: `database`, `object store`, `trainer`.
        service: &'static str,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// A dependency answered, but with a failure that retrying will not fix.
    #[error("{service} failed")]
    Backend {
        /// Which dependency failed.
        service: &'static str,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// An operation ran past its deadline.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },

    /// The operation was cancelled on request.
    #[error("cancelled: {reason}")]
    Cancelled {
        /// Who or what asked for it.
        reason: String,
    },

    /// A bug or broken invariant inside VTP itself.
    #[error("internal error: {message}")]
    Internal {
        /// What broke.
        message: String,
    },
}

impl Error {
    /// Whether the same call may succeed if tried again later.
    ///
    /// Deliberately exhaustive: a new variant must decide.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::RateLimited { .. } => true,
            Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::Conflict { .. }
            | Error::InvalidInput { .. }
            | Error::Unauthenticated { .. }
            | Error::Forbidden { .. }
            | Error::TooLarge { .. }
            | Error::Backend { .. }
            | Error::Cancelled { .. }
            | Error::Internal { .. } => false,
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        Error::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Error::Conflict {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Unauthenticated`].
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Error::Unauthenticated {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Forbidden`].
    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::Forbidden {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(service: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            service,
            source: source.into(),
        }
    }

    /// Shorthand for [`Error::Backend`].
    pub fn backend(service: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            service,
            source: source.into(),
        }
    }
}

/// `error` and its sources joined with `": "`, skipping a source whose text
/// the message already holds: "database unavailable: connection refused".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retryable() {
        let io = || std::io::Error::other("connection refused");
        assert!(Error::unavailable("database", io()).is_retryable());
        assert!(
            Error::Timeout {
                operation: "launch",
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(!Error::backend("trainer", io()).is_retryable());
        assert!(!Error::not_found("job", "x").is_retryable());
        assert!(!Error::conflict("lost race").is_retryable());
        assert!(!Error::invalid("config", "bad").is_retryable());
    }

    #[test]
    fn messages_name_the_identifier() {
        assert_eq!(
            Error::not_found("job", "42").to_string(),
            "job 42 not found"
        );
        assert_eq!(
            Error::invalid("config.epochs", "must be positive").to_string(),
            "invalid config.epochs: must be positive"
        );
    }
}
