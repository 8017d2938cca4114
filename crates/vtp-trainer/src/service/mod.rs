//! The trainer service's engine room: [`TrainerService`] accepts jobs,
//! downloads their datasets from the blob store, trains them one at a time
//! with [`crate::TchTrainer`] on a blocking thread, stores a checkpoint set
//! after every epoch ([`checkpoints`]; a relaunched attempt resumes from
//! it), uploads the final checkpoints under `jobs/{job_id}/`, and reports
//! every step of the way through the persisted [`Outbox`]. The HTTP shell
//! lives in `vtp-server`.

pub mod checkpoints;
pub mod outbox;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Semaphore;
use vtp_core::{
    BlobKey, BlobStore, BlobStoreExt, EpochReport, Error, JobId, JobStatus, ProgressSink, Result,
    StartTraining, TrainSpec, Trainer, TrainingUpdate, error_chain,
};

pub use outbox::Outbox;

use crate::TchTrainer;
use crate::data::{extract_archive, is_archive};
use crate::engine::TrainConfig;

/// What `start` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOutcome {
    /// The job was queued for training.
    Accepted,
    /// The job is already here; nothing new was started.
    AlreadyRunning,
}

/// A job's state as the service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalState {
    /// Waiting for a training slot.
    Queued,
    /// Training.
    Running,
    /// Asked to stop.
    Cancelling,
    /// Finished here, with reports still waiting for the backend.
    Reporting,
}

/// How a job trained here ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// `completed`, `cancelled` or `failed`.
    pub status: JobStatus,
    /// For `failed`: whether trying again may succeed (an outage, not a bad
    /// dataset or config).
    pub retryable: bool,
}

/// A request that passed [`TrainerService::admit`].
#[derive(Debug)]
struct Admitted {
    config: TrainConfig,
    dataset: BlobKey,
    /// `config.init_weights`, a blob in the store.
    init_weights: Option<BlobKey>,
    cancel: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Slot {
    cancel: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
}

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
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            concurrency: 1,
            max_waiting: 64,
            backend_url: "http://127.0.0.1:8000".into(),
        }
    }
}

/// Trains jobs handed to it over the seed's `POST /training/start` contract.
#[derive(Debug)]
pub struct TrainerService {
    blobs: Arc<dyn BlobStore>,
    outbox: Arc<Outbox>,
    work_dir: PathBuf,
    slots: Mutex<HashMap<JobId, Slot>>,
    permits: Arc<Semaphore>,
    backend: url::Url,
    max_waiting: usize,
}

impl TrainerService {
    /// A service reading datasets from and writing checkpoints to `blobs`,
    /// working under `work_dir`, training `concurrency` jobs at a time.
    ///
    /// # Errors
    /// When the outbox under `work_dir` cannot be opened.
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        work_dir: &Path,
        concurrency: usize,
    ) -> Result<Arc<Self>> {
        Self::with_options(
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
            blobs,
            outbox,
            work_dir: work_dir.to_path_buf(),
            slots: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(options.concurrency.max(1))),
            backend,
            max_waiting: options.max_waiting,
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
        tokio::spawn(async move { service.execute(request, admitted).await });
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
        Ok(self.clone().execute(request, admitted).await)
    }

    /// Validates `request` and claims its slot; `None` when it is here already.
    fn admit(&self, request: &StartTraining) -> Result<Option<Admitted>> {
        self.check_callback_url(&request.callback_url)?;
        let config = TrainConfig::from_json(&request.config)?;
        let dataset = self
            .blobs
            .key_for(&request.dataset_s3_uri)
            .map_err(|e| Error::invalid("dataset_s3_uri", e.to_string()))?;
        let init_weights = config
            .init_weights
            .as_deref()
            .map(|uri| {
                self.blobs
                    .key_for(uri)
                    .map_err(|e| Error::invalid("config.init_weights", e.to_string()))
            })
            .transpose()?;
        let slot = Slot {
            cancel: Arc::new(AtomicBool::new(false)),
            running: Arc::new(AtomicBool::new(false)),
        };
        let (cancel, running) = (slot.cancel.clone(), slot.running.clone());
        let mut slots = self.slots.lock().expect("slots lock");
        if slots.contains_key(&request.job_id) {
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
        slots.insert(request.job_id, slot);
        Ok(Some(Admitted {
            config,
            dataset,
            init_weights,
            cancel,
            running,
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
        admitted.running.store(true, Ordering::SeqCst);
        let outcome = self
            .run_job(
                &request,
                &admitted.config,
                &admitted.dataset,
                admitted.init_weights.as_ref(),
                admitted.cancel,
            )
            .await;
        drop(permit);
        let (update, retryable) = match outcome {
            Ok(update) => (update, false),
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(%job_id, error = %message, "job failed");
                (
                    TrainingUpdate::new(JobStatus::Failed).with_error(message),
                    e.is_retryable(),
                )
            }
        };
        let status = update.status;
        self.report(&request, update);
        self.slots.lock().expect("slots lock").remove(&job_id);
        let dir = self.job_dir(job_id, request.attempt);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        if let Some(parent) = dir.parent() {
            // Gone once no other attempt works there.
            let _ = tokio::fs::remove_dir(parent).await;
        }
        Finished { status, retryable }
    }

    /// Asks a job to stop at its next step; false when the service does not run it.
    pub fn cancel(&self, job_id: JobId) -> bool {
        match self.slots.lock().expect("slots lock").get(&job_id) {
            Some(slot) => {
                slot.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
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
        // Every report names its attempt: once the job has moved on to a
        // later one, this attempt's reports change nothing.
        let update = update.with_attempt(request.attempt);
        if let Err(e) = self.outbox.enqueue(
            request.job_id,
            &request.callback_url,
            request.callback_secret.as_ref(),
            update,
        ) {
            tracing::error!(job_id = %request.job_id, error = %e, "cannot queue a report");
        }
    }

    async fn run_job(
        self: &Arc<Self>,
        request: &StartTraining,
        config: &TrainConfig,
        dataset: &BlobKey,
        init_weights: Option<&BlobKey>,
        cancel: Arc<AtomicBool>,
    ) -> Result<TrainingUpdate> {
        let job_id = request.job_id;
        self.report(
            request,
            TrainingUpdate::new(JobStatus::Running)
                .with_progress(0.0)
                .with_message("downloading the dataset"),
        );
        let dir = self.job_dir(job_id, request.attempt);
        let dataset_dir = self.fetch_dataset(dataset, &dir).await?;
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
                    .map_err(|e| match e {
                        Error::NotFound { .. } => Error::invalid(
                            "config.init_weights",
                            format!("no weights at {}", self.blobs.uri(key)),
                        ),
                        other => other,
                    })?;
                Some(local)
            }
            None => None,
        };
        let output = dir.join("output");
        // Never resume from what an earlier attempt left on this disk (a
        // file cut short by a kill); only from a verified stored set.
        let _ = tokio::fs::remove_dir_all(&output).await;
        if let Some(uri) = &request.resume_from {
            match checkpoints::restore_set(self.blobs.as_ref(), job_id, uri, &output).await {
                Ok(epoch) => {
                    tracing::info!(%job_id, epoch, attempt = request.attempt, "resuming from the stored checkpoint set");
                    self.report(
                        request,
                        TrainingUpdate::new(JobStatus::Running).with_message(format!(
                            "attempt {}: resuming after epoch {epoch} from the stored checkpoint",
                            request.attempt
                        )),
                    );
                }
                // A set that is gone or does not match its manifest is no
                // reason to give up the job: train from the start. An outage
                // is (the attempt fails and is retried).
                Err(e @ (Error::InvalidInput { .. } | Error::NotFound { .. })) => {
                    let message = format!(
                        "attempt {}: cannot resume ({}); training from the start",
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
        let mut sink = OutboxSink {
            service: self.clone(),
            request: request.clone(),
            output: output.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
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
        let result = tokio::task::spawn_blocking(move || {
            TchTrainer::new().train(&spec, &mut sink, &|| flag.load(Ordering::SeqCst))
        })
        .await
        .map_err(|e| Error::internal(format!("training thread: {e}")))?;
        match result {
            Ok(summary) => {
                let uploaded = self.upload_checkpoints(job_id, &output).await?;
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
                    .with_message(format!("done: {}", headline(&summary.metrics)))
                    .with_checkpoint(uri))
            }
            Err(Error::Cancelled { reason }) => {
                let uploaded = self
                    .upload_checkpoints(job_id, &output)
                    .await
                    .unwrap_or_default();
                let mut update = TrainingUpdate::new(JobStatus::Cancelled).with_message(reason);
                if let Some(uri) = uploaded.get("last.safetensors") {
                    update = update.with_checkpoint(uri.clone());
                }
                Ok(update)
            }
            Err(e) => Err(e),
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
            .map_err(|e| match e {
                Error::NotFound { .. } => Error::invalid(
                    "dataset_s3_uri",
                    format!("no dataset at {}", self.blobs.uri(key)),
                ),
                other => other,
            })?;
        match files.as_slice() {
            [single] if is_archive(single) => {
                let archive = single.clone();
                let target = dir.join("dataset");
                tokio::task::spawn_blocking(move || extract_archive(&archive, &target))
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

    /// Uploads every checkpoint file under `jobs/{job_id}/`; returns file name -> URI.
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
            self.blobs.put_file(&key, &entry.path()).await?;
            uploaded.insert(name, self.blobs.uri(&key));
        }
        Ok(uploaded)
    }
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
}

impl OutboxSink {
    /// Stores the epoch's checkpoint set; its URI, or `None` when it could
    /// not be stored (not fatal: the job keeps resuming from the set stored
    /// before, and the final upload tries again).
    fn store_set(&self, epoch: u32) -> Option<String> {
        let job_id = self.request.job_id;
        let result = self.runtime.block_on(checkpoints::store_set(
            self.service.blobs.as_ref(),
            job_id,
            epoch,
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

impl ProgressSink for OutboxSink {
    fn epoch_finished(&mut self, report: &EpochReport) {
        let loss = report.metrics.get("loss").copied().unwrap_or(f64::NAN);
        let mut update = TrainingUpdate::new(JobStatus::Running)
            .with_progress(f64::from(report.epoch) / f64::from(report.epochs.max(1)))
            .with_message(format!(
                "epoch {}/{}: loss {loss:.4}, {}",
                report.epoch,
                report.epochs,
                headline(&report.metrics)
            ));
        for (name, value) in &report.metrics {
            if value.is_finite() {
                update = update.with_metric(name.clone(), *value);
            }
        }
        // After the final epoch the service uploads every checkpoint file at
        // once; storing a set here too would send them twice.
        if report.epoch < report.epochs
            && let Some(uri) = self.store_set(report.epoch)
        {
            update = update.with_last_checkpoint(uri);
        }
        self.service.report(&self.request, update);
    }
}
