//! Per-user limits (OWASP API4, unrestricted resource consumption): how
//! fast a user may create jobs and upload datasets, how many of their jobs
//! may be active at once, and how large a job's `config` may be.
//!
//! Rates are GCRA buckets from `governor`, one per user, answered with 429
//! and `Retry-After`. They apply with authentication on; the single local
//! user of `VTP_AUTH=off` is not limited.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use vtp_core::{Error, JobFilter, JobStatus, JobStore, Result};

/// The configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Job creations per user per minute (also the burst).
    pub creates_per_minute: u32,
    /// Dataset uploads per user per minute (also the burst).
    pub uploads_per_minute: u32,
    /// A user's jobs that may be queued, running or cancelling at once.
    pub max_active_jobs: u32,
    /// Largest `config` of a job, in bytes of JSON.
    pub max_config_bytes: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            creates_per_minute: 60,
            uploads_per_minute: 30,
            max_active_jobs: 8,
            max_config_bytes: 64 * 1024,
        }
    }
}

/// The limiters, shared by the handlers.
pub struct Limits {
    settings: LimitSettings,
    creates: DefaultKeyedRateLimiter<String>,
    uploads: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl Limits {
    /// Limiters for `settings`.
    pub fn new(settings: LimitSettings) -> Self {
        Limits {
            settings,
            creates: RateLimiter::keyed(per_minute(settings.creates_per_minute)),
            uploads: RateLimiter::keyed(per_minute(settings.uploads_per_minute)),
        }
    }

    /// The settings.
    pub fn settings(&self) -> LimitSettings {
        self.settings
    }

    fn check(limiter: &DefaultKeyedRateLimiter<String>, user: &str, what: &str) -> Result<()> {
        limiter.check_key(&user.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::RateLimited {
                message: format!(
                    "too many {what} by {user}; try again in {}s",
                    wait.as_secs() + 1
                ),
                retry_after: wait.max(Duration::from_secs(1)),
            }
        })
    }

    /// Counts a job creation by `user`.
    ///
    /// # Errors
    /// [`Error::RateLimited`] past the rate.
    pub fn check_create(&self, user: &str) -> Result<()> {
        Self::check(&self.creates, user, "job creations")
    }

    /// Counts a dataset upload by `user`.
    ///
    /// # Errors
    /// [`Error::RateLimited`] past the rate.
    pub fn check_upload(&self, user: &str) -> Result<()> {
        Self::check(&self.uploads, user, "uploads")
    }

    /// Refuses a `config` larger than the limit, and values that would
    /// exhaust a trainer's memory or time: more than 10,000 epochs, a batch
    /// or image side above 4096, or one batch of input above 4 GiB
    /// (`batch_size * image_size² * 3` float32 values).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn check_config(&self, config: &serde_json::Value) -> Result<()> {
        let number = |name: &str| config.get(name).and_then(serde_json::Value::as_f64);
        for (name, max) in [
            ("epochs", 10_000.0),
            ("batch_size", 4096.0),
            ("image_size", 4096.0),
        ] {
            if let Some(value) = number(name)
                && value > max
            {
                return Err(Error::invalid(
                    format!("config.{name}"),
                    format!("{value} is above the platform's limit of {max}"),
                ));
            }
        }
        if let (Some(batch), Some(side)) = (number("batch_size"), number("image_size")) {
            let bytes = batch * side * side * 3.0 * 4.0;
            if bytes > 4.0 * 1024.0 * 1024.0 * 1024.0 {
                return Err(Error::invalid(
                    "config.batch_size",
                    format!(
                        "{batch} images of {side}x{side} are {:.1} GiB per batch; at most 4 GiB",
                        bytes / 1024f64.powi(3)
                    ),
                ));
            }
        }
        let size = serde_json::to_vec(config)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > self.settings.max_config_bytes {
            return Err(Error::invalid(
                "config",
                format!(
                    "is {size} bytes of JSON; at most {} are accepted",
                    self.settings.max_config_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Refuses to start another job of `user` while `max_active_jobs` of
    /// theirs are queued, running or cancelling.
    ///
    /// # Errors
    /// [`Error::RateLimited`] at the cap; store errors.
    pub async fn check_active(&self, jobs: &dyn JobStore, user: &str) -> Result<()> {
        let mut active = 0;
        for status in [JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling] {
            let filter = JobFilter::new()
                .with_user(user)
                .with_status(status)
                .with_page(1, 0);
            active += jobs.list(&filter).await?.total;
        }
        if active >= u64::from(self.settings.max_active_jobs) {
            return Err(Error::RateLimited {
                message: format!(
                    "{user} has {active} active jobs (at most {}); wait for one to finish or cancel one",
                    self.settings.max_active_jobs
                ),
                retry_after: Duration::from_secs(30),
            });
        }
        Ok(())
    }
}
