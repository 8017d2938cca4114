//! Running an attempt: the job's own directory, the engine on a blocking
//! thread (or the user's script), and the final update it ends with.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vtp_core::{
    BlobKey, BlobStoreExt, Error, JobId, JobStatus, Result, StartTraining, TrainSpec,
    TrainingReport, error_chain,
};

use super::reports::{OutboxSink, headline};
use super::{Fetched, Slot, StepCell, TrainerService, Work, checkpoints, script};

impl TrainerService {
    /// Where an attempt at a job works: per attempt, so an attempt still
    /// winding down in a process that is exiting never touches the files of
    /// the next attempt started beside it.
    pub(super) fn job_dir(&self, job_id: JobId, attempt: i32) -> PathBuf {
        self.work_dir
            .join("jobs")
            .join(job_id.to_string())
            .join(format!("attempt-{attempt}"))
    }

    pub(super) async fn run_job(
        self: &Arc<Self>,
        request: &StartTraining,
        work: &Work,
        dataset: &BlobKey,
        init_weights: Option<&BlobKey>,
        slot: &Slot,
        steps: StepCell,
    ) -> Result<TrainingReport> {
        let cancel = &slot.cancel;
        let job_id = request.job_id;
        self.report(
            request,
            TrainingReport::new(JobStatus::Running)
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
                TrainingReport::new(JobStatus::Cancelled).with_message("cancelled before training")
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
                    let mut update = TrainingReport::new(JobStatus::Running)
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
                        TrainingReport::new(JobStatus::Running).with_message(message),
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
            TrainingReport::new(JobStatus::Running)
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
                Ok(TrainingReport::new(JobStatus::Completed)
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

    /// Runs a `python` job's script to its end (see [`script`]): its
    /// reports and checkpoints go out exactly as a built-in model's.
    pub(super) async fn run_script(
        self: &Arc<Self>,
        request: &StartTraining,
        run: script::ScriptRun,
        mut sink: OutboxSink,
        slot: &Slot,
    ) -> Result<TrainingReport> {
        let job_id = request.job_id;
        let output = run.output.clone();
        tokio::fs::create_dir_all(&output)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", output.display())))?;
        self.report(
            request,
            TrainingReport::new(JobStatus::Running)
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
                let mut update = TrainingReport::new(JobStatus::Completed)
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
}

/// The span of everything done for one attempt at a job: its log lines
/// carry `job_id` and `attempt`. Exported, it joins the trace of the
/// launch that sent the request.
pub(super) fn job_span(request: &StartTraining) -> tracing::Span {
    let span = tracing::info_span!("job", job_id = %request.job_id, attempt = request.attempt);
    vtp_http::telemetry::set_parent(&span, request.traceparent.as_deref());
    span
}

/// The span of one epoch, from the end of the one before (or the start of
/// training) to its report; its number is recorded once known.
pub(super) fn epoch_span(job: &tracing::Span) -> tracing::Span {
    tracing::info_span!(parent: job, "epoch", epoch = tracing::field::Empty)
}
