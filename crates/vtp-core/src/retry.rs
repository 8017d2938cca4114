//! Retry policy for calls to other services.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::error::{Error, Result};

/// Exponential backoff between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// The first delay.
    pub init_backoff: Duration,
    /// The largest delay.
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub base: f32,
}

impl Default for BackoffConfig {
    /// 100 ms, doubling, at most 5 s.
    fn default() -> Self {
        BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        }
    }
}

/// How a client retries retryable failures ([`Error::is_retryable`]).
///
/// Delays grow exponentially with full jitter; the whole call, retries
/// included, is bounded by `timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Attempts after the first.
    pub max_retries: usize,
    /// Delay between attempts.
    pub backoff: BackoffConfig,
    /// Deadline for the whole call.
    pub timeout: Duration,
}

impl Default for RetryConfig {
    /// Ten retries within three minutes.
    fn default() -> Self {
        RetryConfig {
            max_retries: 10,
            backoff: BackoffConfig::default(),
            timeout: Duration::from_secs(180),
        }
    }
}

impl RetryConfig {
    /// No retries, same deadline.
    pub fn none() -> Self {
        RetryConfig {
            max_retries: 0,
            ..Default::default()
        }
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of retries or time.
    ///
    /// # Errors
    /// The last error of `op`, or [`Error::Timeout`] naming `operation`.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.backoff.init_backoff)
            .with_max_delay(self.backoff.max_backoff)
            .with_factor(self.backoff.base)
            .with_max_times(self.max_retries)
            .with_jitter();
        let attempts = op
            .retry(backoff)
            .when(Error::is_retryable)
            .notify(|err, delay| {
                tracing::warn!(operation, error = %err, ?delay, "retrying");
            });
        tokio::time::timeout(self.timeout, attempts)
            .await
            .map_err(|_| Error::Timeout {
                operation,
                after: self.timeout,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fast(max_retries: usize) -> RetryConfig {
        RetryConfig {
            max_retries,
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                base: 2.0,
            },
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_until_success() {
        let calls = AtomicUsize::new(0);
        let value = fast(5)
            .run("test", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(Error::unavailable("trainer", std::io::Error::other("down")))
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let calls = AtomicUsize::new(0);
        let err = fast(5)
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::invalid("config", "bad"))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries() {
        let calls = AtomicUsize::new(0);
        let err = fast(3)
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::unavailable("trainer", std::io::Error::other("down")))
            })
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
