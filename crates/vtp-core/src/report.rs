//! Trainer reports: the callback body and how it changes a job.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::job::{Job, JobId, now};
use crate::status::JobStatus;

/// What a trainer posts to `POST /training/jobs/{id}/callback`.
///
/// The seed's shape, plus `seq`: a per-job sequence number, increasing by
/// event, that makes replays harmless. A report whose `seq` is not above the
/// job's last applied one changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingReport {
    /// The job reported on; must match the URL when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// What the trainer says the job is doing.
    pub status: JobStatus,
    /// Fraction done, `0.0..=1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Human-readable progress message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Named metrics of one epoch; must hold an integral `epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<String, f64>>,
    /// Where the checkpoint was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_s3_uri: Option<String>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per-job event number, starting at 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// The attempt reporting (from the start request). A report of an
    /// attempt the job has moved past changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// The newest complete checkpoint set stored during training (its
    /// `last` weights), to resume from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_s3_uri: Option<String>,
    /// With `failed`: the attempt was interrupted by something that may not
    /// happen again (the trainer was told to stop by its machine, an outage
    /// outlasted its retries), not by the job itself. The backend ends the
    /// attempt and relaunches the job from its last checkpoint set while
    /// attempts are left; a job being cancelled becomes `cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
    /// With `completed`: the final checkpoint's validation per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<crate::ClassReport>,
}

impl TrainingReport {
    /// A report with only a status.
    pub fn new(status: JobStatus) -> Self {
        TrainingReport {
            job_id: None,
            status,
            progress: None,
            message: None,
            metrics: None,
            checkpoint_s3_uri: None,
            error: None,
            seq: None,
            attempt: None,
            last_checkpoint_s3_uri: None,
            retryable: false,
            per_class: None,
        }
    }

    /// Sets `seq`.
    pub fn with_seq(mut self, seq: i64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// Sets `progress`.
    pub fn with_progress(mut self, progress: f64) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Sets `message`.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Adds a metric (use `"epoch"` for the epoch number).
    pub fn with_metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics
            .get_or_insert_with(BTreeMap::new)
            .insert(name.into(), value);
        self
    }

    /// Sets `checkpoint_s3_uri`.
    pub fn with_checkpoint(mut self, uri: impl Into<String>) -> Self {
        self.checkpoint_s3_uri = Some(uri.into());
        self
    }

    /// Sets `attempt`.
    pub fn with_attempt(mut self, attempt: i32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    /// Sets `last_checkpoint_s3_uri`.
    pub fn with_last_checkpoint(mut self, uri: impl Into<String>) -> Self {
        self.last_checkpoint_s3_uri = Some(uri.into());
        self
    }

    /// Sets `error`.
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    /// Sets `per_class`.
    pub fn with_per_class(mut self, per_class: Option<crate::ClassReport>) -> Self {
        self.per_class = per_class;
        self
    }

    /// Marks a `failed` report as worth another attempt (see the field
    /// `retryable`).
    pub fn as_retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// Checks the fields that do not depend on the job.
    pub fn validate(&self, job_id: JobId) -> Result<()> {
        if let Some(claimed) = self.job_id
            && claimed != job_id
        {
            return Err(Error::invalid(
                "job_id",
                format!("body names job {claimed} but the URL names job {job_id}"),
            ));
        }
        if let Some(p) = self.progress
            && !(0.0..=1.0).contains(&p)
        {
            return Err(Error::invalid("progress", format!("{p} is outside 0..=1")));
        }
        if let Some(seq) = self.seq
            && seq < 1
        {
            return Err(Error::invalid("seq", "must be 1 or more"));
        }
        if let Some(metrics) = &self.metrics {
            epoch_of(metrics)?;
            if let Some((name, value)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
                return Err(Error::invalid(
                    format!("metrics.{name}"),
                    format!("{value} is not a finite number"),
                ));
            }
        }
        for (field, uri) in [
            ("checkpoint_s3_uri", &self.checkpoint_s3_uri),
            ("last_checkpoint_s3_uri", &self.last_checkpoint_s3_uri),
        ] {
            if let Some(uri) = uri {
                uri.parse::<crate::BlobUri>().map_err(|_| {
                    Error::invalid(field, format!("{uri:?} must start with s3:// or file://"))
                })?;
            }
        }
        if let Some(attempt) = self.attempt
            && attempt < 1
        {
            return Err(Error::invalid("attempt", "must be 1 or more"));
        }
        if let Some(per_class) = &self.per_class {
            if self.status != JobStatus::Completed {
                return Err(Error::invalid(
                    "per_class",
                    format!("only a completed report carries it, not {}", self.status),
                ));
            }
            per_class.validate()?;
        }
        if self.retryable && self.status != JobStatus::Failed {
            return Err(Error::invalid(
                "retryable",
                format!("only a failed report can be retryable, not {}", self.status),
            ));
        }
        Ok(())
    }
}

fn epoch_of(metrics: &BTreeMap<String, f64>) -> Result<u32> {
    let epoch = metrics
        .get("epoch")
        .ok_or_else(|| Error::invalid("metrics.epoch", "metrics must name their epoch"))?;
    if epoch.fract() != 0.0 || *epoch < 0.0 || *epoch > f64::from(u32::MAX) {
        return Err(Error::invalid(
            "metrics.epoch",
            format!("{epoch} is not a whole, non-negative number"),
        ));
    }
    Ok(*epoch as u32)
}

/// The metrics of one epoch of one job, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetric {
    /// The job.
    pub job_id: JobId,
    /// The epoch, as the trainer numbers them.
    pub epoch: u32,
    /// Every named value reported for the epoch except `epoch`: `loss`, `accuracy`, `val_loss`, ...
    pub values: BTreeMap<String, f64>,
    /// When the epoch's report was stored.
    pub recorded_at: DateTime<Utc>,
}

/// What applying a report does.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportPlan {
    /// A replay or an older event: the job stays as it is. An epoch metric it
    /// carries is recorded only if that epoch has none yet, so reordered
    /// deliveries lose no epoch.
    Stale {
        /// The epoch metric to record if absent.
        metric: Option<TrainingMetric>,
    },
    /// Store this job state (and metric), if the job is still as read.
    Apply {
        /// The job after the report.
        job: Box<Job>,
        /// The epoch metrics to record, if the report carried any.
        metric: Option<TrainingMetric>,
    },
}

/// Decides what `report` does to `job`, without touching any store.
///
/// # Errors
/// [`Error::InvalidInput`] for a malformed report, [`Error::Conflict`] when
/// the job's status does not allow the reported one (a terminal job).
pub fn plan_report(job: &Job, report: &TrainingReport) -> Result<ReportPlan> {
    report.validate(job.id)?;
    // One metric row per epoch the job trains, and no more: a signed
    // report still cannot grow the job's table past its epochs.
    if let Some(metrics) = &report.metrics {
        let epoch = epoch_of(metrics)?;
        if !(1..=job.epochs).contains(&epoch) {
            return Err(Error::invalid(
                "metrics.epoch",
                format!("{epoch} is outside the job's epochs 1..={}", job.epochs),
            ));
        }
    }
    let metric = |recorded_at| {
        report.metrics.as_ref().map(|metrics| {
            let mut values = metrics.clone();
            let epoch = values.remove("epoch").unwrap_or_default() as u32;
            TrainingMetric {
                job_id: job.id,
                epoch,
                values,
                recorded_at,
            }
        })
    };
    // A replay, or a report of an attempt the job has moved past (a trainer
    // that was given up on and relaunched elsewhere): nothing changes, but an
    // epoch it finished is kept if no attempt has recorded it.
    if report.seq.is_some_and(|seq| seq <= job.last_seq)
        || report.attempt.is_some_and(|attempt| attempt < job.attempt)
    {
        return Ok(ReportPlan::Stale {
            metric: metric(now()),
        });
    }
    // An interrupted attempt (the field `retryable`) of a job
    // under way ends that attempt, below, rather than the job; a cancel the
    // user asked for still ends `cancelled`.
    let interrupted =
        report.retryable && matches!(job.status, JobStatus::Queued | JobStatus::Running);
    let status = if interrupted {
        job.status
    } else if report.retryable && job.status == JobStatus::Cancelling {
        JobStatus::Cancelled
    } else {
        job.status.after_report(report.status)?
    };
    let mut next = job.clone();
    if status != job.status {
        next.set_status(status);
    }
    next.updated_at = now();
    // Progress never goes backwards: a relaunched attempt starts by
    // reporting 0 while it restores the checkpoint it resumes from.
    if let Some(progress) = report.progress {
        next.progress = progress.max(job.progress);
    }
    if report.message.is_some() {
        next.message.clone_from(&report.message);
    }
    // An interrupted attempt's reason goes to its `attempts` entry; a
    // cancelled job has no error.
    if report.error.is_some() && !report.retryable {
        next.error.clone_from(&report.error);
    }
    if status == JobStatus::Failed && next.error.is_none() {
        next.error = Some("trainer reported failure without a reason".into());
    }
    if report.checkpoint_s3_uri.is_some() {
        next.checkpoint_s3_uri.clone_from(&report.checkpoint_s3_uri);
    }
    if report.per_class.is_some() {
        next.per_class.clone_from(&report.per_class);
    }
    if report.last_checkpoint_s3_uri.is_some() {
        next.last_checkpoint_s3_uri
            .clone_from(&report.last_checkpoint_s3_uri);
    }
    // A completed job has its final checkpoint; the backend deletes the sets
    // it trained through, so nothing may point at them.
    if status == JobStatus::Completed && next.checkpoint_s3_uri.is_some() {
        next.last_checkpoint_s3_uri = None;
    }
    if let Some(seq) = report.seq {
        next.last_seq = seq;
    }
    if interrupted {
        let reason = report
            .error
            .as_deref()
            .unwrap_or("the trainer was interrupted");
        next.end_attempt(reason)?;
    }
    let metric = metric(next.updated_at);
    Ok(ReportPlan::Apply {
        job: Box::new(next),
        metric,
    })
}

/// What [`crate::JobStoreExt::apply_report`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportOutcome {
    /// The report was applied; the job as it now is.
    Applied(Box<Job>),
    /// The report was a replay and changed nothing; the job as it is.
    Duplicate(Box<Job>),
}

impl ReportOutcome {
    /// The job after the call.
    pub fn job(&self) -> &Job {
        match self {
            ReportOutcome::Applied(job) | ReportOutcome::Duplicate(job) => job,
        }
    }

    /// The job after the call, by value.
    pub fn into_job(self) -> Job {
        match self {
            ReportOutcome::Applied(job) | ReportOutcome::Duplicate(job) => *job,
        }
    }

    /// Whether anything changed.
    pub fn applied(&self) -> bool {
        matches!(self, ReportOutcome::Applied(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::NewJob;

    #[test]
    fn metrics_parse_back_to_the_very_values_written() {
        // A value serde_json's default parser reads one ulp off (it failed a
        // detector's `best_fitness` check); `float_roundtrip` reads it exactly.
        let values = [
            0.410_748_626_532_551_95,
            0.1 + 0.2,
            f64::MIN_POSITIVE,
            1e300,
        ];
        let mut report = TrainingReport::new(JobStatus::Running);
        for (i, value) in values.iter().enumerate() {
            report = report.with_metric(format!("m{i}"), *value);
        }
        let json = serde_json::to_string(&report).unwrap();
        let back: TrainingReport = serde_json::from_str(&json).unwrap();
        for (i, value) in values.iter().enumerate() {
            assert_eq!(
                back.metrics.as_ref().unwrap()[&format!("m{i}")].to_bits(),
                value.to_bits()
            );
        }
    }

    fn running_job() -> Job {
        let mut job = NewJob {
            user_id: "u".into(),
            model_name: "cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d".into(),
            config: serde_json::json!({}),
            priority: 0,
        }
        .into_job()
        .unwrap();
        job.transition(JobStatus::Queued).unwrap();
        job.transition(JobStatus::Running).unwrap();
        job
    }

    #[test]
    fn seed_callback_bodies_parse() {
        let body = r#"{"job_id": "0190d3f6-1234-7abc-8def-0123456789ab", "status": "running",
                       "progress": 0.5, "message": "Training in progress...",
                       "metrics": {"epoch": 1, "loss": 0.7, "map": 0.1}}"#;
        let report: TrainingReport = serde_json::from_str(body).unwrap();
        assert_eq!(report.metrics.unwrap()["map"], 0.1);
        let minimal: TrainingReport =
            serde_json::from_str(r#"{"status": "failed", "error": "boom"}"#).unwrap();
        assert_eq!(minimal.error.as_deref(), Some("boom"));
    }

    #[test]
    fn metrics_become_one_row_without_epoch() {
        let job = running_job();
        let report = TrainingReport::new(JobStatus::Running)
            .with_seq(1)
            .with_metric("epoch", 2.0)
            .with_metric("loss", 0.25);
        let ReportPlan::Apply { job: next, metric } = plan_report(&job, &report).unwrap() else {
            panic!("expected an applied plan")
        };
        let metric = metric.unwrap();
        assert_eq!(metric.epoch, 2);
        assert_eq!(metric.values.keys().collect::<Vec<_>>(), vec!["loss"]);
        assert_eq!(next.last_seq, 1);
    }

    #[test]
    fn metrics_of_epochs_the_job_does_not_train_are_refused() {
        // The default config trains 5 epochs.
        let job = running_job();
        assert_eq!(job.epochs, 5);
        for epoch in [0.0, 6.0, 1e9] {
            let report = TrainingReport::new(JobStatus::Running)
                .with_seq(1)
                .with_metric("epoch", epoch)
                .with_metric("loss", 0.25);
            match plan_report(&job, &report) {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "metrics.epoch"),
                other => panic!("epoch {epoch}: {other:?}"),
            }
        }
        let last = TrainingReport::new(JobStatus::Running)
            .with_seq(1)
            .with_metric("epoch", 5.0);
        plan_report(&job, &last).unwrap();
    }

    #[test]
    fn replays_and_older_events_are_duplicates() {
        let mut job = running_job();
        job.last_seq = 5;
        for seq in [3, 5] {
            let report = TrainingReport::new(JobStatus::Running).with_seq(seq);
            assert_eq!(
                plan_report(&job, &report).unwrap(),
                ReportPlan::Stale { metric: None }
            );
        }
        let late_epoch = TrainingReport::new(JobStatus::Running)
            .with_seq(4)
            .with_metric("epoch", 1.0)
            .with_metric("loss", 0.5);
        let ReportPlan::Stale {
            metric: Some(metric),
        } = plan_report(&job, &late_epoch).unwrap()
        else {
            panic!("a late epoch keeps its metric")
        };
        assert_eq!(metric.epoch, 1);
    }

    #[test]
    fn a_superseded_attempt_changes_nothing_and_progress_never_goes_back() {
        let mut job = running_job();
        job.progress = 0.6;
        job.end_attempt("lost").unwrap();
        assert_eq!(job.attempt, 2);
        // The first attempt, still reporting (say, a finish): stale, though
        // the epoch it carries is kept if no attempt recorded it.
        let late = TrainingReport::new(JobStatus::Failed)
            .with_seq(99)
            .with_attempt(1)
            .with_error("boom");
        assert_eq!(
            plan_report(&job, &late).unwrap(),
            ReportPlan::Stale { metric: None }
        );
        // The second attempt starts at 0 while it restores: progress stays.
        let resumed = TrainingReport::new(JobStatus::Running)
            .with_seq(100)
            .with_attempt(2)
            .with_progress(0.0)
            .with_last_checkpoint("s3://b/jobs/x/epochs/3/last.safetensors");
        let ReportPlan::Apply { job: next, .. } = plan_report(&job, &resumed).unwrap() else {
            panic!("the current attempt applies")
        };
        assert_eq!((next.status, next.progress), (JobStatus::Running, 0.6));
        assert_eq!(
            next.last_checkpoint_s3_uri.as_deref(),
            Some("s3://b/jobs/x/epochs/3/last.safetensors")
        );
    }

    #[test]
    fn an_interrupted_attempt_is_relaunched_and_a_cancel_still_cancels() {
        // Running, attempts left: the attempt ends with the trainer's reason
        // and the job waits for its relaunch, keeping its checkpoint set.
        let job = running_job();
        let set = "s3://b/jobs/x/epochs/000002/last.safetensors";
        let interrupted = TrainingReport::new(JobStatus::Failed)
            .with_seq(1)
            .with_attempt(1)
            .with_error("stopped by SIGTERM at epoch 3")
            .with_last_checkpoint(set)
            .as_retryable();
        let ReportPlan::Apply { job: next, .. } = plan_report(&job, &interrupted).unwrap() else {
            panic!("the current attempt applies")
        };
        assert_eq!((next.status, next.attempt), (JobStatus::Queued, 2));
        assert_eq!(next.error, None, "the job itself has not failed");
        assert_eq!(next.attempts[0].reason, "stopped by SIGTERM at epoch 3");
        assert_eq!(next.last_checkpoint_s3_uri.as_deref(), Some(set));
        assert_eq!(next.last_seq, 1);

        // No attempts left: failed, with the reason and the checkpoint.
        let mut last = running_job();
        last.config = serde_json::json!({"max_attempts": 1});
        let ReportPlan::Apply { job: next, .. } = plan_report(&last, &interrupted).unwrap() else {
            panic!("applies")
        };
        assert_eq!(next.status, JobStatus::Failed);
        assert!(next.error.unwrap().contains("SIGTERM"));
        assert_eq!(next.last_checkpoint_s3_uri.as_deref(), Some(set));

        // The user asked for the stop: cancelled.
        let mut cancelling = running_job();
        cancelling.transition(JobStatus::Cancelling).unwrap();
        let ReportPlan::Apply { job: next, .. } = plan_report(&cancelling, &interrupted).unwrap()
        else {
            panic!("applies")
        };
        assert_eq!(next.status, JobStatus::Cancelled);
        assert_eq!(next.error, None, "a cancelled job has no error");

        // Only a failure can be retryable.
        let odd = TrainingReport {
            retryable: true,
            ..TrainingReport::new(JobStatus::Running)
        };
        let err = plan_report(&job, &odd).unwrap_err();
        assert!(err.to_string().contains("retryable"), "{err}");
    }

    #[test]
    fn malformed_updates_name_the_field() {
        let job = running_job();
        let cases = [
            (
                TrainingReport::new(JobStatus::Running).with_progress(1.5),
                "progress",
            ),
            (
                TrainingReport::new(JobStatus::Running).with_metric("loss", 1.0),
                "metrics.epoch",
            ),
            (
                TrainingReport::new(JobStatus::Running).with_metric("epoch", 1.5),
                "metrics.epoch",
            ),
            (
                TrainingReport::new(JobStatus::Running)
                    .with_metric("epoch", 1.0)
                    .with_metric("loss", f64::NAN),
                "metrics.loss",
            ),
            (TrainingReport::new(JobStatus::Running).with_seq(0), "seq"),
            (
                TrainingReport::new(JobStatus::Completed).with_checkpoint("/tmp/x"),
                "checkpoint_s3_uri",
            ),
            (
                TrainingReport::new(JobStatus::Running).with_last_checkpoint("/tmp/x"),
                "last_checkpoint_s3_uri",
            ),
            (
                TrainingReport::new(JobStatus::Running).with_attempt(0),
                "attempt",
            ),
        ];
        for (report, field) in cases {
            match plan_report(&job, &report) {
                Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected invalid input, got {other:?}"),
            }
        }
        let mut foreign = TrainingReport::new(JobStatus::Running);
        foreign.job_id = Some(JobId::new());
        assert!(matches!(
            plan_report(&job, &foreign),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[test]
    fn terminal_jobs_conflict() {
        let mut job = running_job();
        job.transition(JobStatus::Completed).unwrap();
        let err = plan_report(&job, &TrainingReport::new(JobStatus::Running)).unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    }

    #[test]
    fn failure_always_carries_a_reason() {
        let job = running_job();
        let ReportPlan::Apply { job: next, .. } =
            plan_report(&job, &TrainingReport::new(JobStatus::Failed)).unwrap()
        else {
            panic!("expected an applied plan")
        };
        assert_eq!(next.status, JobStatus::Failed);
        assert!(next.error.is_some());
        assert!(next.finished_at.is_some());
    }
}
