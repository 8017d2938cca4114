//! The trainer service: [`TrainerService`] accepts jobs, downloads their
//! datasets from the blob store, trains them one at a time on a blocking
//! thread with a [`Trainer`] its [`Engine`] makes (libtorch's
//! [`crate::TchEngine`] with the `torch` feature; any other in tests),
//! stores a checkpoint set after every epoch ([`checkpoints`]; a relaunched
//! attempt resumes from it), uploads the final checkpoints under
//! `jobs/{job_id}/`, and reports every step of the way through the
//! persisted [`Outbox`]. [`http`] is its HTTP shell (the seed's trainer
//! contract), which the `vtp-trainer-service` binary serves.
//!
//! This file admits, cancels and interrupts jobs; each step of a job's data
//! path has a file named for it: `fetch` (dataset and code in), `run` (the
//! engine or the user's script on the attempt's directory), `reports` (every
//! update through the outbox, heartbeats, the progress sink),
//! [`checkpoints`] (the sets stored after each epoch) and `publish` (the
//! final checkpoints out).
//!
//! Nothing here needs libtorch: the service and its tests build with the
//! `service` feature alone.

pub mod checkpoints;
mod fetch;
pub mod http;
pub mod outbox;
mod publish;
mod reports;
mod run;
pub mod script;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;
use vtp_core::api::ModelInfo;
use vtp_core::{
    BlobKey, BlobStore, BlobStoreExt, Error, JobId, JobStatus, Result, StartTraining, StepProgress,
    TrainConfig, Trainer, TrainingReport, error_chain,
};

pub use outbox::Outbox;
use reports::heartbeat_update;
pub(crate) use reports::unix_now;
use run::job_span;

/// What a [`TrainerService`] trains with: a fresh [`Trainer`] for every job,
/// and what the service tells its clients about it (`GET /models`,
/// `GET /health`). [`crate::TchEngine`] (feature `torch`) trains with
/// libtorch; tests plug in their own.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// A trainer for one job; its [`vtp_core::ProgressSink::step_finished`] calls
    /// feed the heartbeats.
    fn trainer(&self) -> Box<dyn Trainer>;

    /// The models this engine trains, with their sizes.
    ///
    /// # Errors
    /// When the catalog cannot be built.
    fn models(&self) -> Result<Vec<ModelInfo>>;

    /// Whether it trains on a CUDA device.
    fn cuda(&self) -> bool {
        false
    }
}

/// What `start` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOutcome {
    /// The job was queued for training.
    Accepted,
    /// The job is already here; nothing new was started.
    AlreadyRunning,
}

/// A job's state as the service sees it (the wire type of its
/// `GET /training/{job_id}`).
pub use vtp_core::api::TrainerJobState as LocalState;

/// How a job trained here ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// `completed`, `cancelled` or `failed`.
    pub status: JobStatus,
    /// For `failed`: whether trying again may succeed (an outage, not a bad
    /// dataset or config).
    pub retryable: bool,
}

/// What a job trains: a model of the engine's, or the user's own script.
#[derive(Debug)]
enum Work {
    Engine(Box<TrainConfig>),
    /// `framework: "python"`: the script's config and its code archive.
    Script(vtp_core::ScriptConfig, BlobKey),
    /// `config.engine: "package"`: the `ultralytics` package, driven by
    /// the `vtp` package's own SDK script.
    Package(vtp_core::PackageConfig),
}

/// [`Work`] with what it needs on this disk: the engine's config, or the
/// script to run (a `python` job's with its code unpacked, or the package
/// engine).
enum Fetched<'a> {
    Engine(&'a TrainConfig),
    Script(script::Script),
}

/// A request that passed [`TrainerService::admit`].
#[derive(Debug)]
struct Admitted {
    work: Work,
    dataset: BlobKey,
    /// `config.init_weights`, a blob in the store.
    init_weights: Option<BlobKey>,
    slot: Slot,
}

/// A job held here: one attempt at it.
#[derive(Debug, Clone)]
struct Slot {
    attempt: i32,
    /// Stop at the next step.
    cancel: Arc<AtomicBool>,
    /// With `cancel`: the stop was not asked for by the job's owner (the
    /// machine is going away, a later attempt replaced this one), so the
    /// attempt reports a retryable failure, not `cancelled`.
    interrupted: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
}

impl Slot {
    fn is(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.cancel, &other.cancel)
    }

    /// Stops the attempt at its next step, as an interruption.
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// Where the training thread is, for heartbeats.
type StepCell = Arc<Mutex<Option<StepProgress>>>;

/// How a [`TrainerService`] runs.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Jobs trained at once.
    pub concurrency: usize,
    /// Jobs that may wait for a slot; one more is refused (429).
    pub max_waiting: usize,
    /// The backend this service reports to: a start request whose
    /// `callback_url` has another origin (scheme, host, port) is refused.
    pub backend_url: String,
    /// How often a job under way reports at least, when its start request
    /// names no period (`VTP_HEARTBEAT_SECS`).
    pub heartbeat: Duration,
    /// How long the final upload of a trained model retries an outage
    /// before the attempt fails (as retryable).
    pub upload_budget: Duration,
    /// Whoever runs this process replaces it after an interruption (a
    /// Kubernetes Job re-creates a pod evicted or drained, its pod failure
    /// policy ignoring the disruption): an interrupted job then reports no
    /// failure, only that it was interrupted, and its replacement resumes
    /// it. Otherwise the backend relaunches it after a retryable failure.
    pub replaced_on_interrupt: bool,
    /// What a dataset archive may unpack to.
    pub archive_limits: crate::data::archive::ArchiveLimits,
    /// How `python` jobs' scripts run.
    pub script: script::ScriptOptions,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            concurrency: 1,
            max_waiting: 64,
            backend_url: "http://127.0.0.1:8000".into(),
            heartbeat: Duration::from_secs(vtp_core::launcher::DEFAULT_HEARTBEAT_SECS),
            replaced_on_interrupt: false,
            upload_budget: Duration::from_secs(30 * 60),
            archive_limits: crate::data::archive::ArchiveLimits::default(),
            script: script::ScriptOptions::default(),
        }
    }
}

/// Trains jobs handed to it over the seed's `POST /training/start` contract.
#[derive(Debug)]
pub struct TrainerService {
    engine: Arc<dyn Engine>,
    blobs: Arc<dyn BlobStore>,
    outbox: Arc<Outbox>,
    work_dir: PathBuf,
    slots: Mutex<HashMap<JobId, Slot>>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    backend: url::Url,
    max_waiting: usize,
    heartbeat: Duration,
    replaced_on_interrupt: bool,
    upload_budget: Duration,
    archive_limits: crate::data::archive::ArchiveLimits,
    script: script::ScriptOptions,
}

impl TrainerService {
    /// A service training with `engine`, reading datasets from and writing
    /// checkpoints to `blobs`, working under `work_dir`, training
    /// `concurrency` jobs at a time.
    ///
    /// # Errors
    /// When the outbox under `work_dir` cannot be opened.
    pub fn new(
        engine: Arc<dyn Engine>,
        blobs: Arc<dyn BlobStore>,
        work_dir: &Path,
        concurrency: usize,
    ) -> Result<Arc<Self>> {
        Self::with_options(
            engine,
            blobs,
            work_dir,
            ServiceOptions {
                concurrency,
                ..ServiceOptions::default()
            },
        )
    }

    /// A service with every option set.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a backend URL that is not http(s); when
    /// the outbox under `work_dir` cannot be opened.
    pub fn with_options(
        engine: Arc<dyn Engine>,
        blobs: Arc<dyn BlobStore>,
        work_dir: &Path,
        options: ServiceOptions,
    ) -> Result<Arc<Self>> {
        let backend = url::Url::parse(&options.backend_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                Error::invalid(
                    "backend_url",
                    format!("{:?} is not an http(s) URL", options.backend_url),
                )
            })?;
        crate::tls::require_for("backend_url", &backend)?;
        let outbox = Arc::new(Outbox::open(&work_dir.join("outbox"))?);
        Ok(Arc::new(TrainerService {
            engine,
            blobs,
            outbox,
            work_dir: work_dir.to_path_buf(),
            slots: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(options.concurrency.max(1))),
            concurrency: options.concurrency.max(1),
            backend,
            max_waiting: options.max_waiting,
            heartbeat: options.heartbeat.max(Duration::from_secs(1)),
            replaced_on_interrupt: options.replaced_on_interrupt,
            upload_budget: options.upload_budget,
            archive_limits: options.archive_limits,
            script: options.script,
        }))
    }

    /// Refuses a callback URL off the backend's origin: reports carry
    /// training results and are signed, and must not become a way to make
    /// this service send requests anywhere (SSRF).
    fn check_callback_url(&self, callback_url: &str) -> Result<()> {
        let refused = |why: &str| {
            Error::invalid(
                "callback_url",
                format!(
                    "{callback_url:?} {why}; this trainer reports only to {}",
                    self.backend.origin().ascii_serialization()
                ),
            )
        };
        let url =
            url::Url::parse(callback_url).map_err(|e| refused(&format!("is not a URL ({e})")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refused("carries credentials"));
        }
        if url.origin() != self.backend.origin() {
            return Err(refused("is not on the backend's origin"));
        }
        Ok(())
    }

    /// The outbox (run [`Outbox::run`] beside the service).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// What the service trains with.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Checks `request` and queues it. Bad configs and datasets outside the
    /// store are refused here, before any work starts.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn start(self: &Arc<Self>, request: StartTraining) -> Result<StartOutcome> {
        let Some(admitted) = self.admit(&request)? else {
            return Ok(StartOutcome::AlreadyRunning);
        };
        let service = self.clone();
        let span = job_span(&request);
        tokio::spawn(async move { service.execute(request, admitted).await }.instrument(span));
        Ok(StartOutcome::Accepted)
    }

    /// Trains `request` to the end in the caller's task (the one-shot
    /// trainer of a Kubernetes Job) and returns how it ended. Reports go
    /// through the outbox as usual; a refused request is reported `failed`
    /// too, so the backend learns the reason.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad config or dataset URI (reported).
    pub async fn run_once(self: &Arc<Self>, request: StartTraining) -> Result<Finished> {
        // A refused callback URL gets no report: sending one is what is refused.
        self.check_callback_url(&request.callback_url)?;
        let admitted = match self.admit(&request) {
            Ok(Some(admitted)) => admitted,
            Ok(None) => {
                return Err(Error::conflict(format!(
                    "job {} is already here",
                    request.job_id
                )));
            }
            Err(e) => {
                self.report(
                    &request,
                    TrainingReport::new(JobStatus::Failed).with_error(error_chain(&e)),
                );
                return Err(e);
            }
        };
        let span = job_span(&request);
        Ok(self
            .clone()
            .execute(request, admitted)
            .instrument(span)
            .await)
    }

    /// Validates `request` and claims its slot; `None` when it is here already.
    fn admit(&self, request: &StartTraining) -> Result<Option<Admitted>> {
        self.check_callback_url(&request.callback_url)?;
        let work = if request.framework.eq_ignore_ascii_case("python") {
            let config = vtp_core::ScriptConfig::from_json(&request.config)?;
            let code = self
                .blobs
                .key_for(&config.code_s3_uri)
                .map_err(|e| Error::invalid("config.code_s3_uri", e.to_string()))?;
            Work::Script(config, code)
        } else if vtp_core::PackageConfig::wanted(&request.config) {
            Work::Package(vtp_core::PackageConfig::from_json(&request.config)?)
        } else {
            Work::Engine(Box::new(TrainConfig::from_json(&request.config)?))
        };
        let init_weights = match &work {
            Work::Engine(config) => config.init_weights.as_deref(),
            Work::Script(..) | Work::Package(_) => None,
        };
        let dataset = self
            .blobs
            .key_for(&request.dataset_s3_uri)
            .map_err(|e| Error::invalid("dataset_s3_uri", e.to_string()))?;
        let init_weights = init_weights
            .map(|uri| {
                self.blobs
                    .key_for(uri)
                    .map_err(|e| Error::invalid("config.init_weights", e.to_string()))
            })
            .transpose()?;
        let slot = Slot {
            attempt: request.attempt,
            cancel: Arc::new(AtomicBool::new(false)),
            interrupted: Arc::new(AtomicBool::new(false)),
            running: Arc::new(AtomicBool::new(false)),
        };
        let mut slots = self.slots.lock().expect("slots lock");
        // The same attempt again (a retried launch): adopted.
        if slots
            .get(&request.job_id)
            .is_some_and(|held| held.attempt >= request.attempt)
        {
            return Ok(None);
        }
        let waiting = slots
            .values()
            .filter(|slot| !slot.running.load(Ordering::SeqCst))
            .count();
        if waiting >= self.max_waiting {
            return Err(Error::RateLimited {
                message: format!(
                    "{waiting} jobs already wait for this trainer (at most {})",
                    self.max_waiting
                ),
                retry_after: std::time::Duration::from_secs(30),
            });
        }
        // A later attempt: the backend gave up on the one held here (its
        // lease expired). It is told to stop, and its reports are stale
        // already; it winds down in its own directory.
        if let Some(held) = slots.insert(request.job_id, slot.clone()) {
            tracing::warn!(job_id = %request.job_id, old = held.attempt, new = request.attempt, "a later attempt replaces the one held here");
            held.interrupt();
        }
        Ok(Some(Admitted {
            work,
            dataset,
            init_weights,
            slot,
        }))
    }

    /// Waits for a training slot, trains, reports the outcome and frees the slot.
    async fn execute(self: Arc<Self>, request: StartTraining, admitted: Admitted) -> Finished {
        let job_id = request.job_id;
        // Number this attempt's reports above any an earlier attempt sent
        // (from another process, machine or work directory), so the backend
        // never takes them for replays: the microseconds of now, which the
        // backend accepts up to a day ahead.
        let floor = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        if let Err(e) = self.outbox.raise_seq_floor(job_id, floor) {
            tracing::warn!(%job_id, error = %error_chain(&e), "cannot raise the report counter");
        }
        let permit = self.permits.clone().acquire_owned().await;
        let slot = admitted.slot;
        slot.running.store(true, Ordering::SeqCst);
        // Heartbeats from here to the final report: the backend's lease on
        // this attempt stays fresh through downloads, long epochs and uploads.
        let steps: StepCell = Arc::new(Mutex::new(None));
        let beating = Arc::new(Mutex::new(true));
        let period = request
            .heartbeat_secs
            .map_or(self.heartbeat, |secs| Duration::from_secs(secs.max(1)));
        // Aborted when dropped, however `execute` ends.
        let heartbeat = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            self.clone()
                .heartbeat(request.clone(), period, steps.clone(), beating.clone())
                .in_current_span(),
        ));
        let outcome = if slot.cancel.load(Ordering::SeqCst) {
            // Replaced or cancelled while waiting for a slot.
            Err(Error::Cancelled {
                reason: "cancelled before training".into(),
            })
        } else {
            self.run_job(
                &request,
                &admitted.work,
                &admitted.dataset,
                admitted.init_weights.as_ref(),
                &slot,
                steps,
            )
            .await
        };
        drop(permit);
        let interrupted = slot.interrupted.load(Ordering::SeqCst);
        let (update, retryable) = match outcome {
            // Stopped by the machine, not the owner: worth another attempt,
            // from the checkpoint set stored after the last whole epoch.
            Ok(update) if interrupted && update.status == JobStatus::Cancelled => {
                (self.interrupted_update(update.message.as_deref()), true)
            }
            Err(Error::Cancelled { reason }) if interrupted => {
                (self.interrupted_update(Some(&reason)), true)
            }
            Err(Error::Cancelled { reason }) => (
                TrainingReport::new(JobStatus::Cancelled).with_message(reason),
                false,
            ),
            Ok(update) => (update, false),
            Err(e) => {
                let message = error_chain(&e);
                let retryable = e.is_retryable();
                tracing::warn!(%job_id, error = %message, retryable, "job failed");
                let update = TrainingReport::new(JobStatus::Failed).with_error(message);
                // An outage that outlasted its retries: another attempt
                // (after the backend's backoff) may find it over.
                (
                    if retryable {
                        update.as_retryable()
                    } else {
                        update
                    },
                    retryable,
                )
            }
        };
        let status = update.status;
        // No heartbeat may follow the final report.
        *beating.lock().expect("heartbeat lock") = false;
        drop(heartbeat);
        self.report(&request, update);
        {
            let mut slots = self.slots.lock().expect("slots lock");
            if slots.get(&job_id).is_some_and(|held| held.is(&slot)) {
                slots.remove(&job_id);
            }
        }
        let dir = self.job_dir(job_id, request.attempt);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        if let Some(parent) = dir.parent() {
            // Gone once no other attempt works there.
            let _ = tokio::fs::remove_dir(parent).await;
        }
        Finished { status, retryable }
    }

    /// Asks a job to stop at its next step (its owner cancelled it); false
    /// when the service does not run it.
    pub fn cancel(&self, job_id: JobId) -> bool {
        match self.slots.lock().expect("slots lock").get(&job_id) {
            Some(slot) => {
                slot.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Stops attempt `attempt` (or an earlier one) of `job_id` at its next
    /// step, as an interruption: the backend has given up on it. A later
    /// attempt is left alone. False when no such attempt is here.
    pub fn interrupt(&self, job_id: JobId, attempt: i32) -> bool {
        match self.slots.lock().expect("slots lock").get(&job_id) {
            Some(slot) if slot.attempt <= attempt => {
                slot.interrupt();
                true
            }
            _ => false,
        }
    }

    /// Stops every job here at its next step because this trainer is going
    /// away (SIGTERM from an eviction, a drain, a deadline; the backend
    /// gone): each reports a retryable failure, so the backend relaunches
    /// it from its last stored checkpoint set; one its owner was cancelling
    /// ends `cancelled` there. Returns how many jobs were told.
    pub fn interrupt_all(&self) -> usize {
        let slots = self.slots.lock().expect("slots lock");
        for slot in slots.values() {
            slot.interrupt();
        }
        slots.len()
    }

    /// The report of an attempt stopped by its machine rather than its owner.
    fn interrupted_update(&self, detail: Option<&str>) -> TrainingReport {
        let detail = detail.unwrap_or("before training");
        if self.replaced_on_interrupt {
            // Not final: the replacement reports on under the same attempt.
            return TrainingReport::new(JobStatus::Running).with_message(format!(
                "the trainer was interrupted by its host ({detail}); its replacement resumes from the last stored checkpoint set"
            ));
        }
        TrainingReport::new(JobStatus::Failed)
            .with_error(format!(
                "the trainer was stopped by its host ({detail}); the job resumes from its last stored checkpoint set"
            ))
            .as_retryable()
    }

    /// Reports `running` every `period` until `beating` turns false: with
    /// step progress and the running loss while an epoch trains, so
    /// progress moves inside long epochs; without, while the job downloads
    /// or uploads (the report then only renews the lease).
    async fn heartbeat(
        self: Arc<Self>,
        request: StartTraining,
        period: Duration,
        steps: StepCell,
        beating: Arc<Mutex<bool>>,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let update = heartbeat_update(*steps.lock().expect("step lock"));
            // Checked and sent under the lock the final report takes first.
            let open = beating.lock().expect("heartbeat lock");
            if !*open {
                return;
            }
            self.report(&request, update);
        }
    }

    /// The job's state here, when the service still holds it: training, or
    /// done with reports not yet delivered (so a restarted backend re-adopts
    /// the job instead of failing it).
    pub fn state(&self, job_id: JobId) -> Option<LocalState> {
        let slots = self.slots.lock().expect("slots lock");
        let Some(slot) = slots.get(&job_id) else {
            return self
                .outbox
                .has_pending(job_id)
                .then_some(LocalState::Reporting);
        };
        Some(if slot.cancel.load(Ordering::SeqCst) {
            LocalState::Cancelling
        } else if slot.running.load(Ordering::SeqCst) {
            LocalState::Running
        } else {
            LocalState::Queued
        })
    }

    /// How many jobs it trains at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Jobs the service holds.
    pub fn jobs(&self) -> Vec<JobId> {
        self.slots
            .lock()
            .expect("slots lock")
            .keys()
            .copied()
            .collect()
    }
}
