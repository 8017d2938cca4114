//! Training jobs: what a user asks for and what the platform knows about it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::blob::BlobUri;
use crate::error::{Error, Result};
use crate::status::JobStatus;

/// A job's identifier: a UUID (version 7, so ids sort by creation time).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid, example = "01a21c14-5d3a-7c42-9d1e-2f6b7a8c9d0e")]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(JobId)
            .map_err(|e| Error::invalid("job_id", format!("{s:?} is not a UUID: {e}")))
    }
}

impl From<Uuid> for JobId {
    fn from(value: Uuid) -> Self {
        JobId(value)
    }
}

/// The current time as stored: UTC, microsecond precision (what Postgres keeps).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A training job as the platform records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// Identifier.
    pub id: JobId,
    /// Who owns the job.
    pub user_id: String,
    /// Model architecture, e.g. `resnet18`.
    pub model_name: String,
    /// Training framework, e.g. `tch`.
    pub framework: String,
    /// Where the dataset lives: `s3://bucket/key` or `file:///path`.
    pub dataset_s3_uri: String,
    /// Hyperparameters, a JSON object.
    pub config: serde_json::Value,
    /// How many epochs it trains: `config.epochs` with the default of its
    /// model's task filled in. Reports of other epochs are refused.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Life-cycle state.
    pub status: JobStatus,
    /// Its place in the queue: higher runs first; then the user with the
    /// fewest jobs running, then the oldest start. From
    /// [`Job::MIN_PRIORITY`] to [`Job::MAX_PRIORITY`]; how high a user may
    /// go is the backend's setting (admins up to the maximum).
    #[serde(default)]
    pub priority: i32,
    /// When the job was started (moved to `queued`): its age in the queue.
    /// A relaunched attempt keeps it, and so its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    /// When the current attempt was handed to a launcher. `None` while a
    /// `queued` job waits for capacity, for as long as that takes; a
    /// launched one whose trainer never starts has lost its runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<DateTime<Utc>>,
    /// The earliest time the next attempt may be launched: a job that keeps
    /// losing its runner waits longer before each relaunch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// For a job waiting for capacity: its place in the queue, 1 being
    /// next (filled in by the backend in its answers, not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Fraction done, `0.0..=1.0`.
    pub progress: f64,
    /// Last human-readable message from the trainer or the platform.
    pub message: Option<String>,
    /// Why the job failed, when it did.
    pub error: Option<String>,
    /// Where the final checkpoint was stored.
    pub checkpoint_s3_uri: Option<String>,
    /// The weights of the newest complete checkpoint set stored during
    /// training (`jobs/{id}/epochs/{n}/last.safetensors`): what a relaunched
    /// attempt resumes from, and what a job that failed still offers.
    #[serde(default)]
    pub last_checkpoint_s3_uri: Option<String>,
    /// How many times the job has been handed to a launcher: the current
    /// attempt, counting from 1 once started.
    pub attempt: i32,
    /// How each earlier attempt ended, oldest first.
    #[serde(default)]
    pub attempts: Vec<AttemptEnded>,
    /// Highest [`crate::TrainingReport::seq`] applied so far (0: none).
    pub last_seq: i64,
    /// Bumped on every stored change; the optimistic-lock token.
    pub revision: i64,
    /// When the job was created.
    pub created_at: DateTime<Utc>,
    /// When the job last changed.
    pub updated_at: DateTime<Utc>,
    /// Validation per class of the final checkpoint, from the trainer's
    /// final report (when it sent one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<crate::ClassReport>,
    /// When the trainer first reported `running`.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Where its trainer reports (the seed's `callback_url`,
    /// `{public URL}/training/jobs/{id}/callback`): filled in by the backend
    /// in its answers, not stored (it follows the backend's public URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The `Idempotency-Key`s the job was created and started under (not
    /// part of the API's JSON).
    #[serde(skip)]
    pub idempotency: IdempotencyKeys,
    /// When its deletion was asked for (not part of the API's JSON): a
    /// deleted job is answered as missing while its objects and rows are
    /// removed ([`crate::JobStore::delete`]).
    #[serde(skip)]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The `Idempotency-Key`s of the requests that created and started a job,
/// stored with the job itself (the create key in the same insert, the start
/// key in the same compare-and-set that queues it), so a client retrying
/// either request after a lost answer, even across a backend crash, gets the
/// first answer again and never a second job or a second launch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdempotencyKeys {
    /// The create request's key (unique per owner) and its request digest.
    pub create: Option<KeyedRequest>,
    /// The start request's key.
    pub start: Option<String>,
}

/// An `Idempotency-Key` with the digest of the request it was first sent
/// with: the same key with another request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedRequest {
    /// The client's key.
    pub key: String,
    /// Hex SHA-256 of the request as the server understood it.
    pub digest: String,
}

/// The longest `Idempotency-Key` accepted.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;

/// Checks an `Idempotency-Key`: 1 to [`IDEMPOTENCY_KEY_MAX_LEN`] visible
/// ASCII characters (a UUID is the usual choice).
///
/// # Errors
/// [`Error::InvalidInput`] naming the header.
pub fn validate_idempotency_key(key: &str) -> Result<()> {
    const FIELD: &str = "Idempotency-Key";
    if key.is_empty() {
        return Err(Error::invalid(FIELD, "must not be empty"));
    }
    if key.len() > IDEMPOTENCY_KEY_MAX_LEN {
        return Err(Error::invalid(
            FIELD,
            format!("must be at most {IDEMPOTENCY_KEY_MAX_LEN} characters"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            FIELD,
            "must be visible ASCII characters (no spaces or control characters)",
        ));
    }
    Ok(())
}

/// How one attempt at a job ended: its runner was lost (a killed trainer,
/// an evicted pod, a backend that restarted without it) and the job was
/// relaunched or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptEnded {
    /// The attempt's number (1 is the first).
    pub attempt: i32,
    /// When it was found ended.
    pub ended_at: DateTime<Utc>,
    /// Why.
    pub reason: String,
}

impl Job {
    /// The default of `config.max_attempts`: how many times a job is
    /// launched in all before a lost runner fails it.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
    /// The largest `config.max_attempts` accepted.
    pub const MAX_ATTEMPTS_LIMIT: i32 = 20;
    /// How many earlier attempts are kept in [`Job::attempts`].
    pub const ATTEMPT_HISTORY: usize = 20;
    /// The lowest [`Job::priority`].
    pub const MIN_PRIORITY: i32 = -100;
    /// The highest [`Job::priority`].
    pub const MAX_PRIORITY: i32 = 100;

    /// Whether the job waits in the queue for capacity: `queued` and not
    /// yet handed to a launcher.
    pub fn is_waiting(&self) -> bool {
        self.status == JobStatus::Queued && self.launched_at.is_none()
    }

    /// Whether a runner holds (or should hold) the job: launched and not
    /// finished. These take the launcher's slots.
    pub fn holds_slot(&self) -> bool {
        match self.status {
            JobStatus::Running | JobStatus::Cancelling => true,
            JobStatus::Queued => self.launched_at.is_some(),
            _ => false,
        }
    }

    /// `config.max_attempts`, or [`Job::DEFAULT_MAX_ATTEMPTS`].
    pub fn max_attempts(&self) -> i32 {
        max_attempts_of(&self.config).unwrap_or(Self::DEFAULT_MAX_ATTEMPTS)
    }

    /// Ends the current attempt because its runner was lost: the job goes
    /// back to `queued` for another attempt (the caller relaunches it) while
    /// attempts are left, else fails with `reason`; a job being cancelled
    /// becomes `cancelled`. Returns `false` (and changes nothing) for a job
    /// with no attempt under way (`pending` or final).
    pub fn end_attempt(&mut self, reason: &str) -> Result<bool> {
        match self.status {
            JobStatus::Pending
            | JobStatus::Completed
            | JobStatus::Failed
            | JobStatus::Cancelled => return Ok(false),
            JobStatus::Cancelling => {
                self.end_with_reason(JobStatus::Cancelled, reason)?;
                return Ok(true);
            }
            JobStatus::Queued | JobStatus::Running => {}
        }
        self.attempts.push(AttemptEnded {
            attempt: self.attempt,
            ended_at: now(),
            reason: reason.to_owned(),
        });
        if self.attempts.len() > Self::ATTEMPT_HISTORY {
            self.attempts.remove(0);
        }
        let max = self.max_attempts();
        if self.attempt < max {
            // `queued` again (from `running`, a transition of its own; from
            // `queued`, the same state with the next attempt's number).
            self.set_status(JobStatus::Queued);
            self.message = Some(format!(
                "attempt {} ended: {reason}; relaunching (attempt {} of {max}){}",
                self.attempt - 1,
                self.attempt,
                if self.last_checkpoint_s3_uri.is_some() {
                    ", resuming from the last checkpoint"
                } else {
                    ""
                }
            ));
        } else {
            self.end_with_reason(
                JobStatus::Failed,
                &format!("{reason} (attempt {} of {max}; none left)", self.attempt),
            )?;
        }
        Ok(true)
    }

    /// Moves the job to `to` if the transition table allows it, stamping
    /// `started_at` / `finished_at` and counting launch attempts.
    pub fn transition(&mut self, to: JobStatus) -> Result<()> {
        self.status.check_transition(to)?;
        self.set_status(to);
        Ok(())
    }

    /// Moves to the final state `to` with `reason`: as the error when the
    /// job failed, as the message otherwise.
    ///
    /// # Errors
    /// As [`Job::transition`].
    pub fn end_with_reason(&mut self, to: JobStatus, reason: &str) -> Result<()> {
        self.transition(to)?;
        if to == JobStatus::Failed {
            self.error = Some(reason.to_owned());
        } else {
            self.message = Some(reason.to_owned());
        }
        Ok(())
    }

    /// Sets the status (already validated) with its bookkeeping.
    pub(crate) fn set_status(&mut self, to: JobStatus) {
        let now = now();
        if to == JobStatus::Queued {
            self.attempt += 1;
            // The next attempt waits for capacity again, but keeps its
            // place: its age in the queue is its first start's.
            self.launched_at = None;
            self.queued_at.get_or_insert(now);
        }
        if to == JobStatus::Running && self.started_at.is_none() {
            self.started_at = Some(now);
        }
        if to.is_terminal() {
            self.finished_at = Some(now);
            if to == JobStatus::Completed {
                self.progress = 1.0;
            }
        }
        self.status = to;
        self.updated_at = now;
    }
}

/// What a user sends to create a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// Who owns the job; with authentication on, filled in from the token
    /// when left out. A name as [`validate_name`] checks it.
    #[serde(default)]
    #[schema(max_length = 128, pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]*)?$")]
    pub user_id: String,
    /// Model architecture: a name of the catalog (the trainer service's
    /// `GET /models`), or for `python` the user's own name for it.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"
    )]
    pub model_name: String,
    /// Training framework: `tch` and `ultralytics` train a model of the
    /// catalog on VTP's engine (or the `ultralytics` package's), `python`
    /// runs the user's own code.
    #[schema(value_type = crate::Framework)]
    pub framework: String,
    /// Dataset location, checked for form here and for existence at start.
    pub dataset_s3_uri: String,
    /// Hyperparameters; an object, `{}` when left out. Checked at create
    /// as the trainer reads them ([`crate::TrainConfig`]): an unknown key or
    /// a value out of range is refused, naming it (`config.epochs`).
    #[serde(default = "empty_object")]
    #[schema(value_type = crate::TrainConfig)]
    pub config: serde_json::Value,
    /// Its place in the queue (default 0): higher runs first. From -100 to
    /// 100; above the backend's `VTP_MAX_USER_PRIORITY` (0 unless the
    /// operator raised it) only for admins.
    #[serde(default)]
    #[schema(minimum = -100, maximum = 100)]
    pub priority: i32,
}

/// `config.max_attempts` when it is a whole number in `1..=MAX_ATTEMPTS_LIMIT`.
fn max_attempts_of(config: &serde_json::Value) -> Option<i32> {
    config
        .get("max_attempts")?
        .as_i64()
        .filter(|n| (1..=i64::from(Job::MAX_ATTEMPTS_LIMIT)).contains(n))
        .and_then(|n| i32::try_from(n).ok())
}

fn default_epochs() -> u32 {
    crate::TrainConfig::default().epochs
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl NewJob {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.checked_epochs().map(|_| ())
    }

    /// Whether the job runs the user's own code (`framework: "python"`).
    pub fn runs_user_code(&self) -> bool {
        self.framework.parse::<crate::Framework>().ok() == Some(crate::Framework::Python)
    }

    /// Whether the `ultralytics` package trains the job
    /// (`framework: "ultralytics"`, `config.engine: "package"`).
    pub fn runs_package(&self) -> bool {
        self.framework.parse::<crate::Framework>().ok() == Some(crate::Framework::Ultralytics)
            && crate::PackageConfig::wanted(&self.config)
    }

    /// Whether the job runs Python code in the trainer's environment (its
    /// own script, or the package engine's): what an operator must allow.
    pub fn runs_python(&self) -> bool {
        self.runs_user_code() || self.runs_package()
    }

    /// Checks every field, naming the first bad one; gives the epochs the
    /// job trains.
    fn checked_epochs(&self) -> Result<u32> {
        if self.runs_user_code() {
            // The user's own script: its model name is its own, its config
            // the script's (VTP's keys checked, the rest handed over).
            self.check_common(|| Ok(()))?;
            return Ok(crate::ScriptConfig::from_json(&self.config)?.epochs);
        }
        if self.runs_package() {
            self.check_common(|| crate::find_package_model(&self.model_name).map(|_| ()))?;
            if let Some(model) = self.config.get("model") {
                let same = model
                    .as_str()
                    .and_then(|m| crate::find_package_model(m).ok())
                    .zip(crate::find_package_model(&self.model_name).ok())
                    .is_some_and(|(given, job)| given == job);
                if !same {
                    return Err(Error::invalid(
                        "config.model",
                        "differs from the job's model_name; leave it out or make them equal",
                    ));
                }
            }
            return Ok(crate::PackageConfig::from_json(&self.config)?.epochs);
        }
        Ok(self.checked_config()?.epochs)
    }

    /// The checks every framework shares, in order: names, priority, the
    /// model (`model`), the dataset URI, `config` an object, its
    /// `max_attempts`.
    fn check_common(&self, model: impl FnOnce() -> Result<()>) -> Result<()> {
        validate_name("user_id", &self.user_id)?;
        validate_name("model_name", &self.model_name)?;
        validate_name("framework", &self.framework)?;
        if !(Job::MIN_PRIORITY..=Job::MAX_PRIORITY).contains(&self.priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "{} is outside {}..={}",
                    self.priority,
                    Job::MIN_PRIORITY,
                    Job::MAX_PRIORITY
                ),
            ));
        }
        model()?;
        self.dataset_s3_uri
            .parse::<BlobUri>()
            .map_err(|e| match e {
                Error::InvalidInput { message, .. } => Error::invalid("dataset_s3_uri", message),
                other => other,
            })?;
        if !self.config.is_object() {
            return Err(Error::invalid("config", "must be a JSON object"));
        }
        if self.config.get("max_attempts").is_some() && max_attempts_of(&self.config).is_none() {
            return Err(Error::invalid(
                "config.max_attempts",
                format!(
                    "must be a whole number from 1 to {}",
                    Job::MAX_ATTEMPTS_LIMIT
                ),
            ));
        }
        Ok(())
    }

    /// Checks every field of a job of VTP's own engine (`tch`,
    /// `ultralytics`), naming the first bad one, and gives the config as
    /// the trainer will read it.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field; for a `python` job, on
    /// `framework` (its config is a [`crate::ScriptConfig`]).
    pub fn checked_config(&self) -> Result<crate::TrainConfig> {
        self.check_common(|| {
            crate::models::check_model(&self.model_name, &self.framework).map(|_| ())
        })?;
        let Some(config) = self.config.as_object() else {
            return Err(Error::invalid("config", "must be a JSON object"));
        };
        if let Some(model) = config.get("model") {
            let name = model
                .as_str()
                .ok_or_else(|| Error::invalid("config.model", "must be a string"))?;
            let given = crate::models::find_model("config.model", name)?;
            let job = crate::models::find_model("model_name", &self.model_name)?;
            if given.name != job.name {
                return Err(Error::invalid(
                    "config.model",
                    format!(
                        "{} differs from the job's model_name {}; leave it out or make them equal",
                        given.name, job.name
                    ),
                ));
            }
        }
        // Every hyperparameter, as the trainer will read it: a typo or an
        // out-of-range value is refused now, not when the job starts.
        let mut with_model = self.config.clone();
        if let Some(object) = with_model.as_object_mut() {
            object
                .entry("model")
                .or_insert_with(|| self.model_name.clone().into());
        }
        crate::train_config::TrainConfig::from_json(&with_model)
    }

    /// Validates and turns the request into a fresh `pending` job.
    pub fn into_job(self) -> Result<Job> {
        let epochs = self.checked_epochs()?;
        let now = now();
        Ok(Job {
            id: JobId::new(),
            user_id: self.user_id,
            model_name: self.model_name,
            framework: self.framework,
            dataset_s3_uri: self.dataset_s3_uri,
            config: self.config,
            epochs,
            status: JobStatus::Pending,
            priority: self.priority,
            queued_at: None,
            launched_at: None,
            not_before: None,
            queue_position: None,
            progress: 0.0,
            message: None,
            error: None,
            checkpoint_s3_uri: None,
            last_checkpoint_s3_uri: None,
            per_class: None,
            attempt: 0,
            attempts: Vec::new(),
            last_seq: 0,
            revision: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            callback_url: None,
            idempotency: IdempotencyKeys::default(),
            deleted_at: None,
        })
    }

    /// The hex SHA-256 of the request as given (after defaults such as the
    /// owner filled in from a token), to tell a retried create from a
    /// different one sent under the same `Idempotency-Key`.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let body = serde_json::to_vec(self).unwrap_or_default();
        crate::auth::hex(&sha2::Sha256::digest(&body))
    }
}

/// Checks a short identifier used in keys and labels: 1..=128 characters of
/// ASCII letters, digits, `-`, `_` and `.`, not starting with a dot.
pub fn validate_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(Error::invalid(field, "must be at most 128 characters"));
    }
    if value.starts_with('.') {
        return Err(Error::invalid(field, "must not start with '.'"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(Error::invalid(
            field,
            format!("{bad:?} is not allowed; use letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// Which jobs to list.
///
/// Every condition left `None` matches everything. Jobs whose deletion was
/// asked for are left out unless [`JobFilter::deleted`] asks for them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobFilter {
    /// Only this user's jobs.
    pub user_id: Option<String>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs not changed since this instant (for the stale-job sweeper).
    pub updated_before: Option<DateTime<Utc>>,
    /// Only jobs that finished before this instant (for retention).
    pub finished_before: Option<DateTime<Utc>>,
    /// Only jobs whose current attempt was (`true`) or was not (`false`)
    /// handed to a launcher.
    pub launched: Option<bool>,
    /// Only jobs whose deletion was (`true`) asked for; `None` and
    /// `Some(false)` both mean the others.
    pub deleted: Option<bool>,
    /// Only jobs listed after this one in the newest-first order: the
    /// cursor of the next page ([`JobPage::next_cursor`]), which unlike an
    /// offset skips nothing when jobs are added or removed meanwhile.
    pub after: Option<JobCursor>,
    /// Page size; [`JobFilter::MAX_LIMIT`] at most.
    pub limit: u32,
    /// Jobs to skip.
    pub offset: u32,
}

/// A place in the newest-first order of jobs: a job's creation time and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCursor {
    /// The job's `created_at`.
    pub created_at: DateTime<Utc>,
    /// The job's id (ties of `created_at` are ordered by id).
    pub id: JobId,
}

impl JobCursor {
    /// The cursor just past `job`.
    pub fn of(job: &Job) -> Self {
        JobCursor {
            created_at: job.created_at,
            id: job.id,
        }
    }
}

impl JobFilter {
    /// The default page size.
    pub const DEFAULT_LIMIT: u32 = 50;
    /// The largest page a store returns.
    pub const MAX_LIMIT: u32 = 500;

    /// All jobs, first page.
    pub fn new() -> Self {
        JobFilter {
            limit: Self::DEFAULT_LIMIT,
            ..Default::default()
        }
    }

    /// Only `user_id`'s jobs.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Only jobs in `status`.
    pub fn with_status(mut self, status: JobStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only jobs last changed before `instant`.
    pub fn with_updated_before(mut self, instant: DateTime<Utc>) -> Self {
        self.updated_before = Some(instant);
        self
    }

    /// Only jobs that finished before `instant`.
    pub fn with_finished_before(mut self, instant: DateTime<Utc>) -> Self {
        self.finished_before = Some(instant);
        self
    }

    /// Only jobs launched (`true`) or waiting for capacity (`false`).
    pub fn with_launched(mut self, launched: bool) -> Self {
        self.launched = Some(launched);
        self
    }

    /// Only jobs whose deletion was asked for.
    pub fn deleted_only(mut self) -> Self {
        self.deleted = Some(true);
        self
    }

    /// Page size and offset.
    pub fn with_page(mut self, limit: u32, offset: u32) -> Self {
        self.limit = limit;
        self.offset = offset;
        self
    }

    /// The page size actually used: at least 1, at most [`Self::MAX_LIMIT`].
    pub fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }

    /// Whether `job` passes the filter (used by in-memory stores).
    pub fn matches(&self, job: &Job) -> bool {
        self.user_id.as_ref().is_none_or(|u| *u == job.user_id)
            && self.status.is_none_or(|s| s == job.status)
            && self.updated_before.is_none_or(|t| job.updated_at < t)
            && self
                .finished_before
                .is_none_or(|t| job.finished_at.is_some_and(|f| f < t))
            && self.launched.is_none_or(|l| l == job.launched_at.is_some())
            && self.deleted.unwrap_or(false) == job.deleted_at.is_some()
            && self
                .after
                .is_none_or(|c| (job.created_at, job.id) < (c.created_at, c.id))
    }
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPage {
    /// The jobs on this page.
    pub jobs: Vec<Job>,
    /// How many jobs match the filter in all.
    pub total: u64,
    /// The page size used.
    pub limit: u32,
    /// The offset used.
    pub offset: u32,
    /// Where the next page starts (`None` on the last page), for callers
    /// that page through every match ([`crate::JobPages`]).
    #[serde(skip)]
    pub next_cursor: Option<JobCursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn new_job() -> NewJob {
        NewJob {
            user_id: "test".into(),
            model_name: "resnet18".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://datasets/test/my-dataset/".into(),
            config: serde_json::json!({"epochs": 3}),
            priority: 0,
        }
    }

    #[test]
    fn seed_create_body_parses_and_validates() {
        let body = r#"{"user_id": "test", "model_name": "yolo11n", "framework": "ultralytics",
                       "dataset_s3_uri": "s3://datasets/test/my-dataset/"}"#;
        let new: NewJob = serde_json::from_str(body).unwrap();
        assert_eq!(new.config, serde_json::json!({}));
        let job = new.into_job().unwrap();
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.attempt, 0);
    }

    #[test]
    fn a_lost_attempt_requeues_until_the_attempts_run_out() {
        let mut new = new_job();
        new.config = serde_json::json!({"epochs": 3, "max_attempts": 2});
        let mut job = new.into_job().unwrap();
        assert!(
            !job.end_attempt("nothing runs yet").unwrap(),
            "pending: no attempt"
        );
        job.transition(JobStatus::Queued).unwrap();
        job.transition(JobStatus::Running).unwrap();
        job.last_checkpoint_s3_uri = Some("s3://b/jobs/x/epochs/1/last.safetensors".into());
        assert!(
            job.end_attempt("the trainer process exited (signal: 9)")
                .unwrap()
        );
        assert_eq!((job.status, job.attempt), (JobStatus::Queued, 2));
        let message = job.message.clone().unwrap();
        assert!(
            message.contains("attempt 1 ended: the trainer process exited"),
            "{message}"
        );
        assert!(
            message.contains("resuming from the last checkpoint"),
            "{message}"
        );
        assert_eq!(job.attempts.len(), 1);
        assert_eq!(job.attempts[0].attempt, 1);
        // Lost again before it ran: the second and last attempt fails it.
        assert!(job.end_attempt("evicted").unwrap());
        assert_eq!(job.status, JobStatus::Failed);
        assert!(
            job.error
                .as_deref()
                .unwrap()
                .contains("evicted (attempt 2 of 2; none left)")
        );
        assert_eq!(
            job.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(
            job.last_checkpoint_s3_uri.is_some(),
            "a failed job keeps its last checkpoint"
        );
        assert!(!job.end_attempt("late").unwrap(), "final stays final");

        // A job being cancelled is cancelled, not relaunched.
        let mut job = new_job().into_job().unwrap();
        job.transition(JobStatus::Queued).unwrap();
        job.transition(JobStatus::Cancelling).unwrap();
        assert!(job.end_attempt("the trainer process exited").unwrap());
        assert_eq!(job.status, JobStatus::Cancelled);
    }

    #[test]
    fn max_attempts_must_be_a_small_whole_number() {
        for bad in [
            serde_json::json!(0),
            serde_json::json!(21),
            serde_json::json!(2.5),
            serde_json::json!("3"),
        ] {
            let mut new = new_job();
            new.config = serde_json::json!({ "max_attempts": bad });
            match new.validate() {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "config.max_attempts"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let mut new = new_job();
        new.config = serde_json::json!({"max_attempts": 1});
        assert_eq!(new.into_job().unwrap().max_attempts(), 1);
        assert_eq!(new_job().into_job().unwrap().max_attempts(), 3);
    }

    #[test]
    fn config_model_may_repeat_the_model_name_but_not_contradict_it() {
        let mut new = new_job();
        new.config = serde_json::json!({"model": "ResNet-18"});
        new.validate().unwrap();
        new.config = serde_json::json!({"model": "small_cnn"});
        match new.validate() {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "config.model"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_config_is_refused_at_create_naming_the_field() {
        let cases = [
            (serde_json::json!({"epocs": 3}), "config.epocs"),
            (serde_json::json!({"lr": -1.0}), "config.lr"),
            (
                serde_json::json!({"batch_size": "big"}),
                "config.batch_size",
            ),
            (serde_json::json!({"image_size": 4}), "config.image_size"),
            (
                serde_json::json!({"resources": {"gpus": 1}}),
                "config.resources.gpus",
            ),
        ];
        for (config, field) in cases {
            let mut new = new_job();
            new.config = config.clone();
            match new.validate() {
                Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{config}"),
                other => panic!("{config}: {other:?}"),
            }
        }
        // The detector's rules come from its model_name, not a `config.model`.
        let mut detector = new_job();
        detector.model_name = "yolo11n".into();
        detector.framework = "ultralytics".into();
        detector.config = serde_json::json!({"image_size": 100});
        match detector.validate() {
            Err(Error::InvalidInput { field, message }) => {
                assert_eq!(field, "config.image_size");
                assert!(message.contains("multiple of 32"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        detector.config = serde_json::json!({"image_size": 96, "mosaic": 0.5});
        detector.validate().unwrap();
    }

    #[test]
    fn a_package_job_takes_the_packages_models_and_arguments() {
        let mut job = new_job();
        job.framework = "ultralytics".into();
        job.model_name = "yolo11n-seg".into();
        job.config = serde_json::json!({"engine": "package", "epochs": 3, "imgsz": 64});
        assert!(job.runs_package() && job.runs_python() && !job.runs_user_code());
        assert_eq!(job.clone().into_job().unwrap().epochs, 3);
        let field_of = |job: &NewJob| match job.validate() {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut bad = job.clone();
        bad.model_name = "resnet18".into();
        assert_eq!(field_of(&bad), "model_name");
        let mut bad = job.clone();
        bad.config["model"] = "yolo11n-pose".into();
        assert_eq!(field_of(&bad), "config.model");
        let mut bad = job.clone();
        bad.config["project"] = "/tmp".into();
        assert_eq!(field_of(&bad), "config.project");
        // The native engine stays the default for the models it has.
        job.model_name = "yolo11n".into();
        job.config = serde_json::json!({"epochs": 3});
        assert!(!job.runs_package() && !job.runs_python());
        job.validate().unwrap();
    }

    #[test]
    fn a_python_job_names_its_own_model_and_its_config_is_the_scripts() {
        let mut job = new_job();
        job.framework = "python".into();
        job.model_name = "my-vit".into();
        job.config = serde_json::json!({"code_s3_uri": "s3://b/users/u/code/c/t.zip",
            "entrypoint": "train.py", "epochs": 4, "lr": 0.5});
        assert!(job.runs_user_code());
        let made = job.clone().into_job().unwrap();
        assert_eq!((made.epochs, made.framework.as_str()), (4, "python"));
        // Its own keys stay for the script; VTP's are checked.
        job.config["entrypoint"] = "../escape.py".into();
        assert!(
            matches!(job.validate(), Err(Error::InvalidInput { field, .. }) if field == "config.entrypoint")
        );
        job.config = serde_json::json!({"entrypoint": "train.py"});
        assert!(
            matches!(job.validate(), Err(Error::InvalidInput { field, .. }) if field == "config.code_s3_uri")
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = serde_json::from_str::<NewJob>(
            r#"{"user_id":"u","model_name":"m","framework":"f","dataset_s3_uri":"s3://b/k","epochs":3}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `epochs`"), "{err}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut bad = new_job();
        bad.dataset_s3_uri = "http://example.com/data".into();
        assert!(
            matches!(bad.validate(), Err(Error::InvalidInput { field, .. }) if field == "dataset_s3_uri")
        );
        let mut bad = new_job();
        bad.user_id = "../etc".into();
        assert!(
            matches!(bad.validate(), Err(Error::InvalidInput { field, .. }) if field == "user_id")
        );
        let mut bad = new_job();
        bad.config = serde_json::json!([1, 2]);
        assert!(
            matches!(bad.validate(), Err(Error::InvalidInput { field, .. }) if field == "config")
        );
    }

    #[test]
    fn transitions_stamp_times_and_attempts() {
        let mut job = new_job().into_job().unwrap();
        job.transition(JobStatus::Queued).unwrap();
        assert_eq!(job.attempt, 1);
        job.transition(JobStatus::Running).unwrap();
        assert!(job.started_at.is_some());
        job.transition(JobStatus::Completed).unwrap();
        assert!(job.finished_at.is_some());
        assert_eq!(job.progress, 1.0);
        assert!(job.transition(JobStatus::Running).is_err());
    }
}
