//! Reports: every update of an attempt goes through the persisted
//! [`Outbox`](super::Outbox) to the backend, signed, in order, exactly once;
//! heartbeats carry step progress; [`OutboxSink`] turns the engine's
//! progress (and a script's SDK calls) into reports and checkpoint sets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use vtp_core::{
    EpochReport, JobStatus, ProgressSink, StartTraining, StepProgress, TrainingReport, error_chain,
};

use super::run::epoch_span;
use super::{StepCell, TrainerService, checkpoints, script};

impl TrainerService {
    pub(super) fn report(&self, request: &StartTraining, update: TrainingReport) {
        self.report_in(request, update, &tracing::Span::current());
    }

    /// [`Self::report`], made in `span` (an epoch's): its delivery is traced
    /// under that span.
    pub(super) fn report_in(
        &self,
        request: &StartTraining,
        update: TrainingReport,
        span: &tracing::Span,
    ) {
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
pub(super) fn heartbeat_update(step: Option<StepProgress>) -> TrainingReport {
    let update = TrainingReport::new(JobStatus::Running);
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
pub(super) fn headline(metrics: &BTreeMap<String, f64>) -> String {
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
pub(super) struct OutboxSink {
    pub(super) service: Arc<TrainerService>,
    pub(super) request: StartTraining,
    pub(super) output: PathBuf,
    pub(super) runtime: tokio::runtime::Handle,
    /// Where the heartbeats read the training thread's position.
    pub(super) steps: StepCell,
    /// When the last step of this epoch ended (for step times).
    pub(super) last_step: Option<std::time::Instant>,
    /// The job's span, and the span of the epoch under way in it (none
    /// after the last).
    pub(super) job_span: tracing::Span,
    pub(super) epoch: Option<tracing::Span>,
    /// Whether `epoch` has its number yet.
    pub(super) epoch_numbered: bool,
    /// A script's last report, stored with the set it saves for that epoch.
    pub(super) last_report: Option<EpochReport>,
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
            TrainingReport::new(JobStatus::Running)
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
        let mut update = TrainingReport::new(JobStatus::Running)
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
