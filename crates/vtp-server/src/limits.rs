//! Limits (OWASP API4, unrestricted resource consumption): how fast a user
//! may create jobs and upload datasets, how many of their jobs may wait or
//! run, how large a job's `config` may be, how many event streams and
//! uploads may be open at once, and how many credential lookups one client
//! address may cause.
//!
//! Rates are GCRA buckets from `governor`, one per user (or per client
//! address), answered with 429 and `Retry-After`. The per-user rates and
//! job quotas apply with authentication on (the single local user of
//! `VTP_AUTH=off` is not limited); the caps on open streams and uploads
//! bound the process, and apply always.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use vtp_core::{Error, Result};

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
    /// A user's jobs that may be created and not started.
    pub max_pending_jobs: u32,
    /// The highest `priority` a user who is not an admin may give a job.
    pub max_user_priority: i32,
    /// Event streams one user may hold open.
    pub streams_per_user: u32,
    /// Event streams open at once, all users together.
    pub max_streams: u32,
    /// The longest one event stream stays open; the client reconnects
    /// with `Last-Event-ID` and misses nothing.
    pub stream_lifetime: Duration,
    /// Uploads under way at once, all users together.
    pub uploads_at_once: u32,
    /// Uploads one user may have under way at once.
    pub uploads_per_user_at_once: u32,
    /// How long an upload may send nothing before it is cut off (408).
    pub upload_idle: Duration,
    /// The longest one upload may take (408).
    pub upload_total: Duration,
    /// Credential lookups that find nothing (an unknown or revoked token,
    /// a report for a job with no secret or with a forged signature) one
    /// client address may cause per minute; past it, that address's
    /// credentials are refused (429) before any database work until the
    /// budget allows again.
    pub auth_lookups_per_minute: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            creates_per_minute: 60,
            uploads_per_minute: 30,
            max_active_jobs: 8,
            max_config_bytes: 64 * 1024,
            max_pending_jobs: 64,
            max_user_priority: 0,
            streams_per_user: 16,
            max_streams: 1024,
            stream_lifetime: Duration::from_secs(3600),
            uploads_at_once: 8,
            uploads_per_user_at_once: 2,
            upload_idle: Duration::from_secs(60),
            upload_total: Duration::from_secs(6 * 3600),
            auth_lookups_per_minute: 120,
        }
    }
}

/// The limiters, shared by the handlers.
pub struct Limits {
    settings: LimitSettings,
    creates: DefaultKeyedRateLimiter<String>,
    uploads: DefaultKeyedRateLimiter<String>,
    lookups: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses whose failed lookups ran past their budget, until when.
    blocked: Mutex<hashlink::LruCache<IpAddr, std::time::Instant>>,
    streams: Arc<Counts>,
    uploading: Arc<Counts>,
}

/// Open things (streams, uploads) per user and in all, under caps.
#[derive(Debug, Default)]
struct Counts {
    per_user: Mutex<(HashMap<String, u32>, u32)>,
}

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, u32>, u32)> {
        self.per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more for `user` unless a cap is reached.
    fn take(self: &Arc<Self>, user: &str, per_user: u32, total: u32) -> Option<Held> {
        let mut counts = self.lock();
        if counts.1 >= total || counts.0.get(user).copied().unwrap_or(0) >= per_user {
            return None;
        }
        counts.1 += 1;
        *counts.0.entry(user.to_owned()).or_default() += 1;
        Some(Held {
            counts: self.clone(),
            user: user.to_owned(),
        })
    }

    fn total(&self) -> u32 {
        self.lock().1
    }
}

/// One open stream or upload, counted until dropped.
#[derive(Debug)]
pub struct Held {
    counts: Arc<Counts>,
    user: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        counts.1 = counts.1.saturating_sub(1);
        if let Some(n) = counts.0.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.0.remove(&self.user);
            }
        }
    }
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
            lookups: RateLimiter::keyed(per_minute(settings.auth_lookups_per_minute)),
            blocked: Mutex::new(hashlink::LruCache::new(4096)),
            streams: Arc::default(),
            uploading: Arc::default(),
        }
    }

    /// Opens an event stream for `user`: refused (429) past the user's cap
    /// or the process's.
    ///
    /// # Errors
    /// [`Error::RateLimited`] at a cap.
    pub fn open_stream(&self, user: &str) -> Result<Held> {
        let s = &self.settings;
        self.streams
            .take(user, s.streams_per_user, s.max_streams)
            .ok_or_else(|| Error::RateLimited {
                message: format!(
                    "too many open event streams (at most {} per user, {} in all); close one first",
                    s.streams_per_user, s.max_streams
                ),
                retry_after: Duration::from_secs(5),
            })
    }

    /// Event streams open now.
    pub fn open_streams(&self) -> u32 {
        self.streams.total()
    }

    /// Starts an upload for `user`: refused (429) while the user's or the
    /// process's uploads at once are under way.
    ///
    /// # Errors
    /// [`Error::RateLimited`] at a cap.
    pub fn start_upload(&self, user: &str) -> Result<Held> {
        let s = &self.settings;
        self.uploading
            .take(user, s.uploads_per_user_at_once, s.uploads_at_once)
            .ok_or_else(|| Error::RateLimited {
                message: format!(
                    "too many uploads under way (at most {} per user, {} in all); try again when one has finished",
                    s.uploads_per_user_at_once, s.uploads_at_once
                ),
                retry_after: Duration::from_secs(5),
            })
    }

    /// Before a credential lookup for a request from `client`: refused
    /// while `client`'s failed lookups are past their budget.
    ///
    /// # Errors
    /// [`Error::RateLimited`] while `client` is refused.
    pub fn check_lookup(&self, client: IpAddr) -> Result<()> {
        let mut blocked = self
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match blocked.get(&client).copied() {
            Some(until) if until > std::time::Instant::now() => {
                let wait = until - std::time::Instant::now();
                Err(Error::RateLimited {
                    message: format!(
                        "too many unrecognised credentials from {client}; try again in {}s",
                        wait.as_secs() + 1
                    ),
                    retry_after: wait.max(Duration::from_secs(1)),
                })
            }
            Some(_) => {
                blocked.remove(&client);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a credential lookup for `client` that found nothing: counts it,
    /// and past the budget refuses `client`'s lookups until it allows again.
    pub fn lookup_failed(&self, client: IpAddr) {
        if let Err(not_until) = self.lookups.check_key(&client) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            tracing::warn!(%client, ?wait, "too many unrecognised credentials; refusing this address for a while");
            self.blocked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(client, std::time::Instant::now() + wait);
        }
    }

    /// Refuses a `priority` above what `admin` or not may give.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `priority`.
    pub fn check_priority(&self, priority: i32, admin: bool) -> Result<()> {
        if !admin && priority > self.settings.max_user_priority {
            return Err(Error::invalid(
                "priority",
                format!(
                    "{priority} is above {}, the highest a user may give (admins may go to {})",
                    self.settings.max_user_priority,
                    vtp_core::Job::MAX_PRIORITY
                ),
            ));
        }
        Ok(())
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

    /// The cap on a user's jobs under way, which the store holds
    /// atomically with the start that queues one.
    pub fn active_quota(&self) -> vtp_core::Quota {
        vtp_core::Quota::active(self.settings.max_active_jobs)
    }

    /// The cap on a user's jobs created and not started.
    pub fn pending_quota(&self) -> vtp_core::Quota {
        vtp_core::Quota::pending(self.settings.max_pending_jobs)
    }
}
