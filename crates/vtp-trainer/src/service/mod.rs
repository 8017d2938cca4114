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
//! Nothing here needs libtorch: the service and its tests build with the
//! `service` feature alone.

pub mod checkpoints;
pub mod http;
pub mod outbox;
pub mod script;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;
use vtp_core::api::ModelInfo;
use vtp_core::{
    BlobKey, BlobStore, BlobStoreExt, EpochReport, Error, JobId, JobStatus, ProgressSink, Result,
    StartTraining, StepProgress, TrainConfig, TrainSpec, Trainer, TrainingUpdate, error_chain,
};

pub use outbox::Outbox;

use crate::data::archive::{extract_archive_with, is_archive};

/// What a [`TrainerService`] trains with: a fresh [`Trainer`] for every job,
/// and what the service tells its clients about it (`GET /models`,
/// `GET /health`). [`crate::TchEngine`] (feature `torch`) trains with
/// libtorch; tests plug in their own.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// A trainer for one job; its [`ProgressSink::step_finished`] calls
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
                    TrainingUpdate::new(JobStatus::Failed).with_error(error_chain(&e)),
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
                TrainingUpdate::new(JobStatus::Cancelled).with_message(reason),
                false,
            ),
            Ok(update) => (update, false),
            Err(e) => {
                let message = error_chain(&e);
                let retryable = e.is_retryable();
                tracing::warn!(%job_id, error = %message, retryable, "job failed");
                let update = TrainingUpdate::new(JobStatus::Failed).with_error(message);
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
    fn interrupted_update(&self, detail: Option<&str>) -> TrainingUpdate {
        let detail = detail.unwrap_or("before training");
        if self.replaced_on_interrupt {
            // Not final: the replacement reports on under the same attempt.
            return TrainingUpdate::new(JobStatus::Running).with_message(format!(
                "the trainer was interrupted by its host ({detail}); its replacement resumes from the last stored checkpoint set"
            ));
        }
        TrainingUpdate::new(JobStatus::Failed)
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

    /// Where an attempt at a job works: per attempt, so an attempt still
    /// winding down in a process that is exiting never touches the files of
    /// the next attempt started beside it.
    fn job_dir(&self, job_id: JobId, attempt: i32) -> PathBuf {
        self.work_dir
            .join("jobs")
            .join(job_id.to_string())
            .join(format!("attempt-{attempt}"))
    }

    fn report(&self, request: &StartTraining, update: TrainingUpdate) {
        self.report_in(request, update, &tracing::Span::current());
    }

    /// [`Self::report`], made in `span` (an epoch's): its delivery is traced
    /// under that span.
    fn report_in(&self, request: &StartTraining, update: TrainingUpdate, span: &tracing::Span) {
        // One machine of several that are not node 0 trains its ranks and
        // leaves the reports to node 0's trainer.
        if self
            .script
            .node
            .as_ref()
            .is_some_and(|node| !node.reports())
        {
            tracing::debug!(job_id = %request.job_id, status = %update.status, "node 0 reports for this job");
            return;
        }
        // Every report names its attempt: once the job has moved on to a
        // later one, this attempt's reports change nothing.
        let update = update.with_attempt(request.attempt);
        // Whatever the report says, the trainer is alive and working.
        metrics::gauge!("vtp_trainer_last_heartbeat_timestamp_seconds").set(unix_now());
        if let Err(e) = self.outbox.enqueue(
            request.job_id,
            &request.callback_url,
            request.callback_secret.as_ref(),
            update,
            vtp_http::telemetry::traceparent(span),
        ) {
            tracing::error!(job_id = %request.job_id, error = %e, "cannot queue a report");
        }
    }

    async fn run_job(
        self: &Arc<Self>,
        request: &StartTraining,
        work: &Work,
        dataset: &BlobKey,
        init_weights: Option<&BlobKey>,
        slot: &Slot,
        steps: StepCell,
    ) -> Result<TrainingUpdate> {
        let cancel = &slot.cancel;
        let job_id = request.job_id;
        self.report(
            request,
            TrainingUpdate::new(JobStatus::Running)
                .with_progress(0.0)
                .with_message("downloading the dataset"),
        );
        let dir = self.job_dir(job_id, request.attempt);
        let dataset_dir = self.fetch_dataset(dataset, &dir).await?;
        let work = match work {
            Work::Script(config, code) => Fetched::Script(script::Script::user(
                config,
                self.fetch_code(code, &config.entrypoint, &dir).await?,
            )),
            Work::Package(config) => Fetched::Script(script::Script::package(config)),
            Work::Engine(config) => Fetched::Engine(config),
        };
        if cancel.load(Ordering::SeqCst) {
            return Ok(
                TrainingUpdate::new(JobStatus::Cancelled).with_message("cancelled before training")
            );
        }
        let init_weights = match init_weights {
            // The engine reads a local file: fetch the blob for it; the
            // config (and so the checkpoint) keeps the URI.
            Some(key) => {
                let local = dir.join("init_weights.safetensors");
                self.blobs
                    .download_to(key, &local)
                    .await
                    .map_err(self.missing_is_invalid(key, "config.init_weights", "weights"))?;
                Some(local)
            }
            None => None,
        };
        let output = dir.join("output");
        // Never resume from what an earlier attempt left on this disk (a
        // file cut short by a kill); only from a verified stored set.
        let _ = tokio::fs::remove_dir_all(&output).await;
        // The newest stored set, else the one the request names: a pod that
        // replaces an evicted one of the same attempt resumes from the set
        // its predecessor stored last, not the one its launch named.
        let newest = match checkpoints::newest_set(self.blobs.as_ref(), job_id).await {
            Ok(newest) => newest,
            Err(e) if request.resume_from.is_some() => {
                tracing::warn!(%job_id, error = %error_chain(&e), "cannot list the stored checkpoint sets; resuming from the requested one");
                None
            }
            // Listing fails, and a set may exist: an outage; the attempt
            // fails as retryable and is tried again.
            Err(e) if request.attempt > 1 => return Err(e),
            Err(_) => None,
        };
        let mut candidates: Vec<&String> = newest.iter().collect();
        if let Some(requested) = &request.resume_from
            && newest.as_ref() != Some(requested)
        {
            candidates.push(requested);
        }
        let mut restored_epoch = None;
        for uri in candidates {
            match checkpoints::restore_set(self.blobs.as_ref(), job_id, uri, &output).await {
                Ok(manifest) => {
                    let epoch = manifest.epoch;
                    restored_epoch = Some(epoch);
                    tracing::info!(%job_id, epoch, attempt = request.attempt, "resuming from the stored checkpoint set");
                    let mut update = TrainingUpdate::new(JobStatus::Running)
                        .with_message(format!(
                            "attempt {}: resuming after epoch {epoch} from the stored checkpoint",
                            request.attempt
                        ))
                        .with_last_checkpoint(uri.clone());
                    // The set's epoch again, in case its first report was
                    // lost with the trainer that sent it (stored once).
                    if !manifest.metrics.is_empty() {
                        for (name, value) in &manifest.metrics {
                            update = update.with_metric(name.clone(), *value);
                        }
                        update = update.with_metric("epoch", f64::from(epoch));
                    }
                    self.report(request, update);
                    break;
                }
                // A set that is gone or does not match its manifest is no
                // reason to give up the job: try the next, else train from
                // the start. An outage is (the attempt fails and is retried).
                Err(e @ (Error::InvalidInput { .. } | Error::NotFound { .. })) => {
                    let message = format!(
                        "attempt {}: cannot resume from {uri} ({})",
                        request.attempt,
                        error_chain(&e)
                    );
                    tracing::warn!(%job_id, %message);
                    self.report(
                        request,
                        TrainingUpdate::new(JobStatus::Running).with_message(message),
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let spec = TrainSpec {
            job_id,
            config: request.config.clone(),
            dataset_dir,
            init_weights,
            output_dir: output.clone(),
        };
        let job_span = tracing::Span::current();
        let sink = OutboxSink {
            service: self.clone(),
            request: request.clone(),
            output: output.clone(),
            runtime: tokio::runtime::Handle::current(),
            steps,
            last_step: None,
            epoch: Some(epoch_span(&job_span)),
            epoch_numbered: false,
            job_span,
            last_report: None,
        };
        let config = match work {
            Fetched::Script(script) => {
                let run = script::ScriptRun {
                    options: self.script.clone(),
                    script,
                    raw_config: request.config.clone(),
                    job_id,
                    attempt: request.attempt,
                    job_dir: dir.clone(),
                    dataset_dir: spec.dataset_dir.clone(),
                    output: output.clone(),
                    restored_epoch,
                };
                return self.run_script(request, run, sink, slot).await;
            }
            Fetched::Engine(config) => config,
        };
        let mut sink = sink;
        self.report(
            request,
            TrainingUpdate::new(JobStatus::Running)
                .with_progress(0.0)
                .with_message(format!(
                    "training {} for {} epochs",
                    config.model, config.epochs
                )),
        );
        let flag = cancel.clone();
        let mut trainer = self.engine.trainer();
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _in_job = span.enter();
            trainer.train(&spec, &mut sink, &|| flag.load(Ordering::SeqCst))
        })
        .await
        .map_err(|e| Error::internal(format!("training thread: {e}")))?;
        match result {
            Ok(summary) => {
                let uploaded = self.upload_final(request, &output).await?;
                let best = summary
                    .checkpoint
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("best.safetensors");
                let uri = uploaded
                    .get(best)
                    .cloned()
                    .ok_or_else(|| Error::internal("the checkpoint was not uploaded"))?;
                Ok(TrainingUpdate::new(JobStatus::Completed)
                    .with_progress(1.0)
                    .with_message(match &summary.stopped {
                        Some(reason) => format!("done: {}; {reason}", headline(&summary.metrics)),
                        None => format!("done: {}", headline(&summary.metrics)),
                    })
                    .with_checkpoint(uri)
                    .with_per_class(summary.per_class))
            }
            // Interrupted: the sets stored after each epoch are what the next
            // attempt resumes from; the little time left goes to reporting.
            Err(e @ Error::Cancelled { .. }) if slot.interrupted.load(Ordering::SeqCst) => Err(e),
            Err(Error::Cancelled { reason }) => {
                Ok(self.cancelled_update(job_id, &output, reason).await)
            }
            Err(e) => Err(e),
        }
    }

    /// Turns a blob the request names but the store lacks into a bad
    /// `field` ("no {what} at {uri}"); other errors (an outage) stay.
    fn missing_is_invalid<'a>(
        &'a self,
        key: &'a BlobKey,
        field: &'static str,
        what: &'static str,
    ) -> impl FnOnce(Error) -> Error + 'a {
        move |e| match e {
            Error::NotFound { .. } => {
                Error::invalid(field, format!("no {what} at {}", self.blobs.uri(key)))
            }
            other => other,
        }
    }

    /// Downloads the dataset and unpacks archives; returns the ImageFolder root.
    async fn fetch_dataset(&self, key: &BlobKey, dir: &Path) -> Result<PathBuf> {
        let raw = dir.join("download");
        let _ = tokio::fs::remove_dir_all(&raw).await;
        let files = self
            .blobs
            .download_prefix(key, &raw)
            .await
            .map_err(self.missing_is_invalid(key, "dataset_s3_uri", "dataset"))?;
        match files.as_slice() {
            [single] if is_archive(single) => {
                let archive = single.clone();
                let target = dir.join("dataset");
                let limits = self.archive_limits;
                tokio::task::spawn_blocking(move || extract_archive_with(&archive, &target, limits))
                    .await
                    .map_err(|e| Error::internal(format!("extraction thread: {e}")))?
            }
            [single] => Err(Error::invalid(
                "dataset_s3_uri",
                format!(
                    "{} is a single file that is not a .zip, .tar or .tar.gz archive",
                    single.display()
                ),
            )),
            _ => Ok(raw),
        }
    }

    /// Downloads the job's code archive and unpacks it (with the dataset
    /// archives' limits); returns the directory the entrypoint is relative
    /// to: the archive's root, or the one folder that wraps it all (a
    /// zipped folder) when the entrypoint is there.
    async fn fetch_code(&self, key: &BlobKey, entrypoint: &str, dir: &Path) -> Result<PathBuf> {
        let name = key.as_str().rsplit('/').next().unwrap_or("code");
        let archive = dir.join(format!("code-archive-{name}"));
        self.blobs
            .download_to(key, &archive)
            .await
            .map_err(self.missing_is_invalid(key, "config.code_s3_uri", "code archive"))?;
        if !is_archive(&archive) {
            return Err(Error::invalid(
                "config.code_s3_uri",
                format!(
                    "{} is not a .zip, .tar or .tar.gz archive",
                    self.blobs.uri(key)
                ),
            ));
        }
        let target = dir.join("code");
        let limits = self.archive_limits;
        let unpacked = target.clone();
        tokio::task::spawn_blocking(move || extract_archive_with(&archive, &target, limits))
            .await
            .map_err(|e| Error::internal(format!("extraction thread: {e}")))??;
        if unpacked.join(entrypoint).is_file() {
            return Ok(unpacked);
        }
        let mut folders = Vec::new();
        let mut entries = tokio::fs::read_dir(&unpacked)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", unpacked.display())))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                folders.push(entry.path());
            }
        }
        Ok(match folders.as_slice() {
            [only] if only.join(entrypoint).is_file() => only.clone(),
            _ => unpacked,
        })
    }

    /// Runs a `python` job's script to its end (see [`script`]): its
    /// reports and checkpoints go out exactly as a built-in model's.
    async fn run_script(
        self: &Arc<Self>,
        request: &StartTraining,
        run: script::ScriptRun,
        mut sink: OutboxSink,
        slot: &Slot,
    ) -> Result<TrainingUpdate> {
        let job_id = request.job_id;
        let output = run.output.clone();
        tokio::fs::create_dir_all(&output)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", output.display())))?;
        self.report(
            request,
            TrainingUpdate::new(JobStatus::Running)
                .with_progress(0.0)
                .with_message(format!(
                    "running {} for {} epochs",
                    run.script.program, run.script.epochs
                )),
        );
        let flag = slot.cancel.clone();
        let span = tracing::Span::current();
        let ended = tokio::task::spawn_blocking(move || {
            let _in_job = span.enter();
            run.run(&mut sink, &|| flag.load(Ordering::SeqCst))
        })
        .await
        .map_err(|e| Error::internal(format!("script thread: {e}")))?;
        match ended {
            Ok(script::ScriptEnd::Completed) => {
                let uploaded = self.upload_final(request, &output).await?;
                let mut update = TrainingUpdate::new(JobStatus::Completed)
                    .with_progress(1.0)
                    .with_message("done: the script finished");
                let main = checkpoints::main_file(uploaded.keys(), "best")
                    .or_else(|| checkpoints::main_file(uploaded.keys(), "last"));
                if let Some(uri) = main.and_then(|name| uploaded.get(name)) {
                    update = update.with_checkpoint(uri.clone());
                }
                Ok(update)
            }
            Ok(script::ScriptEnd::Cancelled) if slot.interrupted.load(Ordering::SeqCst) => {
                Err(Error::Cancelled {
                    reason: "the script was stopped".into(),
                })
            }
            Ok(script::ScriptEnd::Cancelled) => {
                Ok(self.cancelled_update(job_id, &output, "cancelled").await)
            }
            Err(e) => Err(e),
        }
    }

    /// A cancelled job's last update: it keeps the last checkpoint saved
    /// (uploaded now, on a best effort: the sets stored after each epoch
    /// are there whatever happens).
    async fn cancelled_update(
        &self,
        job_id: JobId,
        output: &Path,
        reason: impl Into<String>,
    ) -> TrainingUpdate {
        let uploaded = self
            .upload_checkpoints(job_id, output)
            .await
            .unwrap_or_default();
        let mut update = TrainingUpdate::new(JobStatus::Cancelled).with_message(reason);
        if let Some(uri) =
            checkpoints::main_file(uploaded.keys(), "last").and_then(|name| uploaded.get(name))
        {
            update = update.with_checkpoint(uri.clone());
        }
        update
    }

    /// Uploads the trained model, retrying an outage for up to
    /// [`ServiceOptions::upload_budget`] (the files stay on this disk, and
    /// heartbeats keep the job's lease, until every upload is confirmed):
    /// hours of training are not given up for a short S3 outage.
    async fn upload_final(
        &self,
        request: &StartTraining,
        output: &Path,
    ) -> Result<BTreeMap<String, String>> {
        let job_id = request.job_id;
        let started = std::time::Instant::now();
        let mut wait = Duration::from_secs(1);
        loop {
            match self.upload_checkpoints(job_id, output).await {
                Ok(uploaded) => return Ok(uploaded),
                Err(e) if e.is_retryable() && started.elapsed() + wait < self.upload_budget => {
                    let message = format!(
                        "uploading the trained model failed ({}); retrying in {}s",
                        error_chain(&e),
                        wait.as_secs()
                    );
                    tracing::warn!(%job_id, %message);
                    self.report(
                        request,
                        TrainingUpdate::new(JobStatus::Running).with_message(message),
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads every checkpoint file under `jobs/{job_id}/`, each checked
    /// by its stored size; returns file name -> URI.
    async fn upload_checkpoints(
        &self,
        job_id: JobId,
        output: &Path,
    ) -> Result<BTreeMap<String, String>> {
        let mut uploaded = BTreeMap::new();
        let mut entries = tokio::fs::read_dir(output)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", output.display())))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = BlobKey::from_segments(&["jobs", &job_id.to_string(), &name])?;
            let size = entry
                .metadata()
                .await
                .map_err(|e| Error::internal(format!("{}: {e}", entry.path().display())))?
                .len();
            checkpoints::put_file_checked(self.blobs.as_ref(), &key, &entry.path(), size).await?;
            uploaded.insert(name, self.blobs.uri(&key));
        }
        Ok(uploaded)
    }
}

/// The span of everything done for one attempt at a job: its log lines
/// carry `job_id` and `attempt`. Exported, it joins the trace of the
/// launch that sent the request.
fn job_span(request: &StartTraining) -> tracing::Span {
    let span = tracing::info_span!("job", job_id = %request.job_id, attempt = request.attempt);
    vtp_http::telemetry::set_parent(&span, request.traceparent.as_deref());
    span
}

/// The span of one epoch, from the end of the one before (or the start of
/// training) to its report; its number is recorded once known.
fn epoch_span(job: &tracing::Span) -> tracing::Span {
    tracing::info_span!(parent: job, "epoch", epoch = tracing::field::Empty)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A heartbeat: `running`, with the fraction of the run done (whole epochs
/// and the steps of this one) and where it is, when the engine has begun
/// stepping; without, it only renews the lease.
fn heartbeat_update(step: Option<StepProgress>) -> TrainingUpdate {
    let update = TrainingUpdate::new(JobStatus::Running);
    let Some(p) = step else { return update };
    let done = f64::from(p.epoch.saturating_sub(1)) + p.step as f64 / p.steps.max(1) as f64;
    update
        .with_progress((done / f64::from(p.epochs.max(1))).clamp(0.0, 1.0))
        .with_message(format!(
            "epoch {}/{}: step {}/{}, loss {:.4}",
            p.epoch, p.epochs, p.step, p.steps, p.loss
        ))
}

/// The one validation number a person looks for: mAP50-95 for a detector,
/// accuracy for a classifier.
fn headline(metrics: &BTreeMap<String, f64>) -> String {
    match (metrics.get("map"), metrics.get("val_accuracy")) {
        (Some(map), _) => format!(
            "val mAP50-95 {map:.4}, mAP50 {:.4}",
            metrics.get("map50").copied().unwrap_or(f64::NAN)
        ),
        (None, Some(accuracy)) => format!("val accuracy {:.2}%", accuracy * 100.0),
        (None, None) => "no validation metrics".to_owned(),
    }
}

/// After each epoch: uploads the `last` checkpoint (so the store always
/// holds the newest one, whatever happens to this machine) and reports
/// through the outbox. Runs on the training thread.
struct OutboxSink {
    service: Arc<TrainerService>,
    request: StartTraining,
    output: PathBuf,
    runtime: tokio::runtime::Handle,
    /// Where the heartbeats read the training thread's position.
    steps: StepCell,
    /// When the last step of this epoch ended (for step times).
    last_step: Option<std::time::Instant>,
    /// The job's span, and the span of the epoch under way in it (none
    /// after the last).
    job_span: tracing::Span,
    epoch: Option<tracing::Span>,
    /// Whether `epoch` has its number yet.
    epoch_numbered: bool,
    /// A script's last report, stored with the set it saves for that epoch.
    last_report: Option<EpochReport>,
}

impl OutboxSink {
    /// Stores the epoch's checkpoint set; its URI, or `None` when it could
    /// not be stored (not fatal: the job keeps resuming from the set stored
    /// before, and the final upload tries again).
    fn store_set(&self, epoch: u32, metrics: &BTreeMap<String, f64>) -> Option<String> {
        let job_id = self.request.job_id;
        let result = self.runtime.block_on(checkpoints::store_set(
            self.service.blobs.as_ref(),
            job_id,
            epoch,
            metrics,
            &self.output,
        ));
        match result {
            Ok(uri) => Some(uri),
            Err(e) => {
                tracing::warn!(%job_id, epoch, error = %error_chain(&e), "could not store the checkpoint set");
                None
            }
        }
    }
}

impl script::ScriptHost for OutboxSink {
    fn epoch(&mut self, report: &EpochReport) {
        // The script stores its sets itself, with `save_checkpoint`.
        self.finish_epoch(report, false);
        self.last_report = Some(report.clone());
    }

    fn step(&mut self, step: &StepProgress) {
        self.step_finished(step);
    }

    fn checkpoint_saved(&mut self, epoch: u32) -> Option<String> {
        // The epoch's metrics go with its set, as the engine's do: an
        // attempt resuming from it reports them again in case they were lost.
        let metrics = self
            .last_report
            .as_ref()
            .filter(|report| report.epoch == epoch)
            .map(|report| {
                report
                    .metrics
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            })
            .unwrap_or_default();
        let uri = self.store_set(epoch, &metrics)?;
        self.service.report(
            &self.request,
            TrainingUpdate::new(JobStatus::Running)
                .with_message(format!("epoch {epoch}: checkpoint stored"))
                .with_last_checkpoint(uri.clone()),
        );
        Some(uri)
    }
}

impl ProgressSink for OutboxSink {
    fn epoch_finished(&mut self, report: &EpochReport) {
        self.finish_epoch(report, true);
    }

    fn step_finished(&mut self, step: &StepProgress) {
        self.record_step(step);
    }
}

impl OutboxSink {
    /// Reports an epoch; with `store`, stores its checkpoint set first
    /// (the engine's output holds it by now).
    fn finish_epoch(&mut self, report: &EpochReport, store: bool) {
        // Validation and checkpointing come between epochs: no step time.
        self.last_step = None;
        let value = |name: &str| report.metrics.get(name).copied().filter(|v| v.is_finite());
        if let Some(seconds) = value("epoch_seconds") {
            metrics::histogram!("vtp_trainer_epoch_seconds").record(seconds);
        }
        if let Some(rate) = value("images_per_second") {
            metrics::gauge!("vtp_trainer_images_per_second").set(rate);
        }
        if let Some(wait) = value("data_wait_seconds") {
            metrics::gauge!("vtp_trainer_data_wait_seconds").set(wait);
        }
        let loss = report.metrics.get("loss").copied().unwrap_or(f64::NAN);
        let mut update = TrainingUpdate::new(JobStatus::Running)
            .with_progress(f64::from(report.epoch) / f64::from(report.epochs.max(1)))
            .with_message(format!(
                "epoch {}/{}: loss {loss:.4}, {}",
                report.epoch,
                report.epochs,
                headline(&report.metrics)
            ));
        let metrics: BTreeMap<String, f64> = report
            .metrics
            .iter()
            .filter(|(_, value)| value.is_finite())
            .map(|(name, value)| (name.clone(), *value))
            .collect();
        for (name, value) in &metrics {
            update = update.with_metric(name.clone(), *value);
        }
        // After the final epoch the service uploads every checkpoint file at
        // once; storing a set here too would send them twice.
        if store
            && report.epoch < report.epochs
            && let Some(uri) = self.store_set(report.epoch, &metrics)
        {
            update = update.with_last_checkpoint(uri);
        }
        // This epoch's span ends with its report; the next one's begins.
        let span = self
            .epoch
            .take()
            .unwrap_or_else(|| epoch_span(&self.job_span));
        if !self.epoch_numbered {
            span.record("epoch", report.epoch);
        }
        self.service.report_in(&self.request, update, &span);
        drop(span);
        self.epoch = (report.epoch < report.epochs).then(|| epoch_span(&self.job_span));
        self.epoch_numbered = false;
    }

    fn record_step(&mut self, step: &StepProgress) {
        let now = std::time::Instant::now();
        if let Some(last) = self.last_step
            && step.step > 1
        {
            metrics::histogram!("vtp_trainer_step_seconds").record((now - last).as_secs_f64());
        }
        self.last_step = Some(now);
        if !self.epoch_numbered
            && let Some(span) = &self.epoch
        {
            span.record("epoch", step.epoch);
            self.epoch_numbered = true;
        }
        *self.steps.lock().expect("step lock") = Some(*step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_carry_step_progress_inside_an_epoch() {
        let idle = heartbeat_update(None);
        assert_eq!(
            (idle.status, idle.progress, idle.message),
            (JobStatus::Running, None, None)
        );
        // Half way through the third of four epochs: 2.5 / 4.
        let beat = heartbeat_update(Some(StepProgress {
            epoch: 3,
            epochs: 4,
            step: 50,
            steps: 100,
            loss: 0.25,
        }));
        assert_eq!(beat.progress, Some(0.625));
        assert_eq!(
            beat.message.as_deref(),
            Some("epoch 3/4: step 50/100, loss 0.2500")
        );
        // Never past the end, whatever the engine says.
        let odd = heartbeat_update(Some(StepProgress {
            epoch: 9,
            epochs: 4,
            step: 1,
            steps: 0,
            loss: 0.0,
        }));
        assert_eq!(odd.progress, Some(1.0));
    }
}
