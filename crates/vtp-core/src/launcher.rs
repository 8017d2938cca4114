//! Starting trainers: the [`TrainerLauncher`] trait.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::callback_signature::CallbackSecret;
use crate::error::Result;
use crate::job::{Job, JobId};

/// The body of the trainer's `POST /training/start`, as in the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartTraining {
    /// The job to train.
    pub job_id: JobId,
    /// Its framework (`tch`, `ultralytics`, `python`): a `python` job's
    /// config is a [`crate::ScriptConfig`]. `tch` when left out.
    #[serde(default = "default_framework")]
    pub framework: String,
    /// Its hyperparameters, with `model` set to the job's model name.
    pub config: serde_json::Value,
    /// Where its dataset lives.
    pub dataset_s3_uri: String,
    /// Where the trainer posts its reports.
    pub callback_url: String,
    /// The secret the trainer signs its reports with
    /// ([`crate::callback_signature`]). Launchers that put the request where
    /// others can read it (a pod spec) move it into a Secret first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_secret: Option<CallbackSecret>,
    /// Which attempt this is (1 for the first launch); the trainer puts it
    /// on every report, so reports of an attempt given up on change nothing.
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    /// The checkpoint set to resume from (the job's
    /// `last_checkpoint_s3_uri`): a relaunched attempt continues at the
    /// epoch after it instead of starting over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
    /// The longest the trainer may go without a report, in seconds: it
    /// reports at least this often while it works (with step progress
    /// inside an epoch), and the backend gives up on an attempt silent for
    /// a few such periods ([`HEARTBEAT_ENV`]). `None`: the trainer's own
    /// setting, else [`DEFAULT_HEARTBEAT_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs: Option<u64>,
    /// The size of the dataset archive in bytes, when the backend knows it:
    /// launchers that give a trainer its disk (a Kubernetes pod's
    /// ephemeral storage) size it from this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_bytes: Option<u64>,
    /// The W3C trace context of the launch
    /// (`00-<trace id>-<span id>-<flags>`), when the backend exports
    /// traces: the trainer's spans for this attempt join that trace, and
    /// its reports carry it back. Ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The environment variable setting the heartbeat period, in seconds, of
/// the backend (which passes it on in every start request) and of a
/// trainer started without one.
pub const HEARTBEAT_ENV: &str = "VTP_HEARTBEAT_SECS";

/// Exit code of the one-shot trainer for a job that can never succeed as
/// given (bad dataset, bad config): the Kubernetes Job's `podFailurePolicy`
/// fails the Job at once instead of retrying.
pub const EXIT_NON_RETRYABLE: i32 = 3;

/// The variable holding the [`StartTraining`] JSON for the one-shot trainer.
pub const START_TRAINING_ENV: &str = "VTP_START_TRAINING";

/// The variable (and the key of the job's Kubernetes Secret) holding its
/// callback secret, so the secret is never in a pod spec or command line.
pub const CALLBACK_SECRET_ENV: &str = "VTP_CALLBACK_SECRET";

/// The variable telling each one-shot trainer of a run across machines
/// where machine 0 is reached (`torchrun --master-addr`).
pub const MASTER_ADDR_ENV: &str = "VTP_MASTER_ADDR";

/// The variable holding machine 0's rendezvous port (`torchrun --master-port`).
pub const MASTER_PORT_ENV: &str = "VTP_MASTER_PORT";

/// The rendezvous port of a run across machines, on machine 0.
pub const RENDEZVOUS_PORT: u16 = 29500;

/// The line the trainer service prints on stdout once it listens, followed
/// by its base URL (read by the subprocess launcher).
pub const LISTENING_PREFIX: &str = "vtp-trainer-service listening on ";

/// The heartbeat period when none is set.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 30;

/// How many heartbeat periods an attempt may stay silent before the backend
/// takes its runner for lost: its lease.
pub const LEASE_HEARTBEATS: u32 = 4;

fn first_attempt() -> i32 {
    1
}

fn default_framework() -> String {
    "tch".into()
}

impl StartTraining {
    /// The request for `job`, reporting to `callback_url`.
    pub fn for_job(job: &Job, callback_url: String) -> Self {
        let mut config = job.config.clone();
        if let Some(object) = config.as_object_mut() {
            object
                .entry("model")
                .or_insert_with(|| job.model_name.clone().into());
        }
        StartTraining {
            job_id: job.id,
            framework: job.framework.clone(),
            config,
            dataset_s3_uri: job.dataset_s3_uri.clone(),
            callback_url,
            callback_secret: None,
            attempt: job.attempt.max(1),
            resume_from: job.last_checkpoint_s3_uri.clone(),
            heartbeat_secs: None,
            dataset_bytes: None,
            traceparent: None,
        }
    }

    /// Sets the heartbeat period the trainer must keep.
    #[must_use]
    pub fn with_heartbeat(mut self, period: std::time::Duration) -> Self {
        self.heartbeat_secs = Some(period.as_secs().max(1));
        self
    }

    /// Sets the secret the trainer signs its reports with.
    #[must_use]
    pub fn with_secret(mut self, secret: CallbackSecret) -> Self {
        self.callback_secret = Some(secret);
        self
    }
}

/// What a trainer asks of the machine it runs on, from `config.resources`
/// of a job: `{"cpu": "2", "memory": "4Gi", "gpu": 1}`. Launchers that
/// schedule (Kubernetes) turn it into requests and limits; the others
/// ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU as a Kubernetes quantity: `"2"`, `"500m"`.
    pub cpu: Option<String>,
    /// Memory as a Kubernetes quantity: `"4Gi"`.
    pub memory: Option<String>,
    /// Whole GPUs (`nvidia.com/gpu`).
    pub gpu: Option<u32>,
}

impl Resources {
    /// The `resources` of a job's config; `None` when absent.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] naming `config.resources` when malformed.
    pub fn from_config(config: &serde_json::Value) -> crate::Result<Option<Self>> {
        match config.get("resources") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value.clone())
                .map(Some)
                .map_err(|e| crate::Error::invalid("config.resources", e.to_string())),
        }
    }
}

/// How many jobs a launcher runs at once: the backend's queue admits jobs
/// to it up to this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// This many at a time (a trainer service's concurrency, the backend's
    /// `--max-running`); the rest wait in the backend's queue.
    Slots(u32),
    /// A scheduler behind the launcher admits them (Kubernetes with Kueue):
    /// every job is handed over at once, and waits there.
    Admitted,
}

/// What a cancel request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The trainer was told to stop; it will report `cancelled`.
    Signalled,
    /// Nothing is running for the job; it can be marked cancelled at once.
    NotRunning,
}

/// Starts and stops trainers: an HTTP trainer service, a child process, a
/// Kubernetes Job. Everything above the launcher is the same for all.
///
/// # Contract
/// - `launch` returns once the trainer has accepted the job; progress then
///   arrives through the callback URL. Launching a job that is already
///   running is not an error (it is adopted, not started twice).
/// - `cancel` asks the trainer to stop at its next step.
///
/// # Errors
/// - [`crate::Error::Unavailable`] when the trainer cannot be reached (retryable).
/// - [`crate::Error::InvalidInput`] when the trainer refuses the job as given.
/// - [`crate::Error::Backend`] for other refusals.
#[async_trait]
pub trait TrainerLauncher: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and `/health`: `http`, `subprocess`, `kubernetes`.
    fn name(&self) -> &'static str;

    /// Refuses a job's `config` that this launcher could never run (for
    /// Kubernetes: `resources` beyond the operator's maxima), so the job is
    /// refused when it is created rather than when it starts. The default
    /// refuses what only a launcher of containers can do: `config.image`,
    /// and `config.distributed.nnodes` above 1.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] naming the offending field.
    fn check_config(&self, config: &serde_json::Value) -> Result<()> {
        // Only a launcher that starts containers can run another image.
        if config.get("image").is_some() {
            return Err(crate::Error::invalid(
                "config.image",
                "this platform runs every job in its trainer's own environment; no image is allow-listed",
            ));
        }
        // Only a launcher that starts a trainer per machine can run ranks
        // on several: refused, not silently run on one.
        if crate::Distributed::nnodes_of(config) > 1 {
            return Err(crate::Error::invalid(
                "config.distributed.nnodes",
                "this platform runs every job on one machine; runs across machines need the Kubernetes launcher",
            ));
        }
        Ok(())
    }

    /// How many jobs it runs at once.
    ///
    /// # Errors
    /// [`crate::Error::Unavailable`] when the trainer that would say cannot
    /// be reached (the queue then admits nothing until it can).
    async fn capacity(&self) -> Result<Capacity>;

    /// Hands `request` to a trainer.
    async fn launch(&self, request: &StartTraining) -> Result<()>;

    /// Whether a launched job still waits for a scheduler behind the
    /// launcher to admit it (a suspended Kubernetes Job under Kueue): it is
    /// waiting, not lost, however long its trainer stays silent. The
    /// default is `false`.
    ///
    /// # Errors
    /// As [`TrainerLauncher::is_running`].
    async fn waiting_for_admission(&self, job_id: JobId) -> Result<bool> {
        let _ = job_id;
        Ok(false)
    }

    /// One pass of upkeep the backend's leader runs every few seconds (the
    /// Kubernetes launcher maps Job and pod status back to the jobs). The
    /// default does nothing.
    ///
    /// # Errors
    /// When the pass failed; it is simply run again.
    async fn reconcile(&self) -> Result<()> {
        Ok(())
    }

    /// Asks the trainer of `job_id` to stop.
    async fn cancel(&self, job_id: JobId) -> Result<CancelOutcome>;

    /// Whether a trainer still holds `job_id` (used to re-adopt jobs after a
    /// backend restart).
    async fn is_running(&self, job_id: JobId) -> Result<bool>;

    /// Stops the runner of attempt `attempt` (or an earlier one) of
    /// `job_id` now, whatever it is doing: its lease expired, so it is hung
    /// or cut off and may not act on a polite cancel. The attempt has
    /// already been ended, and whatever its runner still reports is stale;
    /// a runner of a later attempt is left alone. The default asks the
    /// trainer to cancel.
    ///
    /// # Errors
    /// As [`TrainerLauncher::cancel`].
    async fn stop(&self, job_id: JobId, attempt: i32) -> Result<()> {
        let _ = attempt;
        self.cancel(job_id).await.map(|_| ())
    }
}
